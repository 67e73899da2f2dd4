"""Learner files: bit-exact round trips, no pickle ever, one clear line for a wrong file."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from oflsam2 import cli, learner_file
from oflsam2.errors import InputError
from oflsam2.learner import Learner
from oflsam2.learner_file import LearnerFile


def make(values=(1, 3), backbone="litemedsam", model="litemedsam") -> LearnerFile:
    tensors = {}
    for v in values:
        torch.manual_seed(v)
        learner = Learner(256)
        for p in learner.parameters():  # every tensor non-trivial, none all zeros
            p.data.normal_()
        tensors[v] = {k: t.numpy().copy() for k, t in learner.state_dict().items()}
    meta = {
        "format": learner_file.FORMAT,
        "backbone": backbone,
        "model": model,
        "window": {"modality": "CT", "rule": "fixed", "values": [-160.0, 240.0]},
        "axis": {"index": 0},
        "segments": [{"value": v, "name": f"s{v}", "color": [0.1, 0.2, 0.3]} for v in values],
    }
    return LearnerFile(tensors, meta)


def test_round_trip_is_bit_exact(tmp_path):
    original = make()
    path = learner_file.save(original, tmp_path / "x.oflsam2")
    loaded = learner_file.load(path)
    assert loaded.meta == original.meta
    assert loaded.values == [1, 3]
    for v in original.values:
        assert loaded.tensors[v].keys() == original.tensors[v].keys()
        for k, a in original.tensors[v].items():
            b = loaded.tensors[v][k]
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), k
    # saved again, the same bytes (fixed zip timestamps, sorted entries)
    assert learner_file.to_bytes(loaded) == path.read_bytes()
    # a state dict loads strictly into a learner and gives the same tensors back
    fresh = Learner(256)
    fresh.load_state_dict({k: torch.from_numpy(a) for k, a in loaded.tensors[1].items()})
    for k, t in fresh.state_dict().items():
        assert torch.equal(t, torch.from_numpy(original.tensors[1][k]))
    assert loaded.names == {1: "s1", 3: "s3"} and loaded.colors[3] == (0.1, 0.2, 0.3)


def test_the_file_is_a_plain_npz_without_objects(tmp_path):
    path = learner_file.save(make(), tmp_path / "x.oflsam2")
    with np.load(path, allow_pickle=False) as npz:
        assert "meta.json" in npz.files
        assert all(npz[name].dtype != object for name in npz.files)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind", ["pickle", "torch", "object-npz"])
def test_a_pickle_is_refused_and_never_run(tmp_path, kind, capsys):
    path = tmp_path / f"evil.{kind}"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"a": Evil()}))
    elif kind == "torch":
        torch.save({"a": Evil()}, path)
    else:
        np.savez(path, **{"meta.json": np.array([Evil()], dtype=object)})
        path = path.with_name(path.name + ".npz")
    with pytest.raises(InputError, match="pickle") as info:
        learner_file.load(path)
    assert "\n" not in str(info.value)
    assert "pwned" not in capsys.readouterr().out


def test_corrupt_foreign_and_mismatched_files(tmp_path):
    good = learner_file.to_bytes(make())
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"hello, I am not a learner\n",
        "zip": _zip({"a.txt": b"x"}),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match="not an oflsam2 learner file") as info:
            learner_file.load(path)
        assert "\n" not in str(info.value), name
    other = make()
    other.meta["format"] = "oflsam2-learner-1"
    with pytest.raises(InputError, match="format"):
        learner_file.from_bytes(learner_file.to_bytes(other))
    wrong = make()
    wrong.meta["segments"] = wrong.meta["segments"][:1]
    with pytest.raises(InputError, match="do not match"):
        learner_file.from_bytes(learner_file.to_bytes(wrong))
    with pytest.raises(InputError, match="does not exist"):
        learner_file.load(tmp_path / "missing.oflsam2")


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_another_backbone_or_model_is_refused_in_one_line():
    lf = make(backbone="sam2", model="sam2.1_hiera_tiny")
    learner_file.check_backbone(lf, "sam2", "sam2.1_hiera_tiny")
    with pytest.raises(InputError, match="trained for backbone sam2.*--backbone sam2"):
        learner_file.check_backbone(lf, "litemedsam", "litemedsam")
    with pytest.raises(InputError, match="model sam2.1_hiera_tiny, not sam2.1_hiera_large"):
        learner_file.check_backbone(lf, "sam2", "sam2.1_hiera_large")


def test_apply_refuses_bad_learner_files_with_exit_code_2(tmp_path, capsys):
    image = tmp_path / "img.nrrd"
    image.write_bytes(b"")
    evil = tmp_path / "evil.pt"
    torch.save({"a": 1}, evil)
    sam2 = learner_file.save(make(backbone="sam2", model="sam2.1_hiera_tiny"), tmp_path / "s")
    lite = learner_file.save(make(), tmp_path / "l")
    cases = [
        (["--learner", str(evil)], "pickle"),
        (["--learner", str(tmp_path / "nope")], "does not exist"),
        (["--learner", str(lite), "--backbone", "sam2"], "trained for backbone litemedsam"),
        (["--learner", str(sam2), "--backbone", "litemedsam"], "trained for backbone sam2"),
        (["--learner", str(lite), "--stride", "0"], "--stride"),
    ]
    for options, message in cases:
        argv = ["apply", *options, "--image", str(image), "--output-dir", str(tmp_path / "o")]
        assert cli.main(argv) == 2, options
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
