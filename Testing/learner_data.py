"""Small labelled volumes cut from the slicerio chest CT, and a learner trained on one of them,
made once per test process (the engine's encoder costs seconds per slice on a CPU)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import CT_PATH, RIGHT_LUNG, SEG_PATH

from oflsam2 import volume as vol

# Axial slice ranges of the two volumes: the right lung holds every slice of both.
RANGES = {"a": (9, 16), "b": (14, 20)}
FIT = {"positives": 3, "negatives": 0, "steps": 9, "presence_steps": 60}
# Dice of the prompt-free result of the learner trained on volume "a", on "a" itself and on
# "b" (measured 0.87 and 0.85 with these settings); the floor is what a test asserts.
PROMPT_FREE_FLOOR = 0.75


@functools.cache
def folder() -> Path:
    """The volumes as files: <name>.nrrd (CT) and <name>_lab.nrrd (right lung = 1)."""
    out = Path(tempfile.mkdtemp(prefix="oflsam2-learner-"))
    image = sitk.ReadImage(CT_PATH)
    labels = vol.read_labels(SEG_PATH, vol.Geometry.from_sitk(image))
    lung = sitk.GetImageFromArray((labels.array == RIGHT_LUNG).astype(np.uint8))
    lung.CopyInformation(image)
    for name, (lo, hi) in RANGES.items():
        sitk.WriteImage(image[:, :, lo:hi], str(out / f"{name}.nrrd"))
        sitk.WriteImage(lung[:, :, lo:hi], str(out / f"{name}_lab.nrrd"))
    return out


def volume(name: str) -> tuple[vol.Volume, np.ndarray]:
    """The image and its right-lung truth (uint8)."""
    image = vol.read_image(folder() / f"{name}.nrrd")
    truth = vol.read_labels(folder() / f"{name}_lab.nrrd", image.geometry).array
    return image, truth


@functools.cache
def learner_bytes() -> bytes:
    """A learner file trained on volume "a" (right lung, 3 slices)."""
    from oflsam2 import learner_file
    from oflsam2.settings import DEFAULTS
    from oflsam2.transfer import LabelledVolume, train_learner

    image, truth = volume("a")
    lf = train_learner(
        [LabelledVolume("a", image.array, truth, image.geometry, image.modality)],
        DEFAULTS,
        {1: "right lung"},
        {1: (0.5, 0.7, 0.9)},
        **FIT,
    )
    return learner_file.to_bytes(lf)


def learner_path() -> Path:
    path = folder() / "lung.oflsam2"
    if not path.exists():
        path.write_bytes(learner_bytes())
    return path
