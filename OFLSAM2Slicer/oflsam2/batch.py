"""Apply one learner file to many volumes: one job per volume, the same code on this machine
and on a Dask worker (:mod:`oflsam2.cluster`).

A process keeps one engine per (learner file, settings): the backbone and the learner are
loaded once however many volumes it segments. Each volume starts from the file's learner and
the engine's seed, so its result does not depend on which process ran it, nor after which
volume. Outputs are written atomically by whoever segments the volume.
"""

from __future__ import annotations

import hashlib
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError, first_line
from .progress import Progress
from .settings import Settings

# Image files a folder given to `oflsam2 apply` is searched for (a .seg.nrrd is a label map).
IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".nhdr")
_LABEL_SUFFIXES = (".seg.nrrd",)


@dataclass(frozen=True)
class VolumeJob:
    """One volume to segment and where its label map goes."""

    image: str
    output: str


@dataclass
class VolumeRecord:
    """What happened to one volume, for the report."""

    image: str
    output: str
    status: str  # written, skipped, failed
    error: str | None = None
    kind: str | None = None  # input (bad input, not retried) or internal
    attempts: int = 0
    seconds: float = 0.0
    seeds: dict[str, int] = field(default_factory=dict)  # segment value -> seed slice
    missing: list[int] = field(default_factory=list)  # segments not found
    voxels: dict[str, int] = field(default_factory=dict)
    slices_predicted: dict[str, int] = field(default_factory=dict)
    slices_encoded: int = 0
    worker: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def stem(path: str | Path) -> str:
    """A volume's name without its image extension (a DICOM folder: the folder's name)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (label maps ``*.seg.nrrd`` left out), sorted."""
    if not folder.is_dir():
        raise InputError(f"--input-dir {folder} is not a folder")
    found = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and p.name.lower().endswith(IMAGE_SUFFIXES)
        and not p.name.lower().endswith(_LABEL_SUFFIXES)
        and not p.name.startswith(".")
    ]
    if not found:
        raise InputError(f"--input-dir {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return found


def plan_jobs(images: list[str], output_dir: Path, suffix: str) -> list[VolumeJob]:
    """One job per image; two images that would write the same output are refused."""
    jobs, seen = [], {}
    for image in images:
        out = output_dir / f"{stem(image)}{suffix}"
        if out in seen:
            raise InputError(
                f"{image} and {seen[out]} would both be written to {out}: rename one of them"
            )
        seen[out] = image
        jobs.append(VolumeJob(str(image), str(out)))
    return jobs


class Engine:
    """A segmenter and a learner file, loaded once per process."""

    def __init__(self, learner_bytes: bytes, settings: Settings, name: str = "learner") -> None:
        from . import learner_file
        from .segmenter import OFLSegmenter
        from .transfer import model_name, settings_for

        self.learner = learner_file.from_bytes(learner_bytes, name)
        self.settings = settings_for(self.learner, settings)
        self.segmenter = OFLSegmenter(self.settings)
        bb = self.segmenter.backbone
        learner_file.check_backbone(self.learner, bb.name, model_name(self.settings), name)


_ENGINES: dict[tuple, Engine] = {}


def engine(learner_bytes: bytes, settings: Settings, name: str = "learner") -> Engine:
    """This process's engine for ``learner_bytes`` and ``settings`` (built on first use)."""
    key = (hashlib.sha256(learner_bytes).hexdigest(), settings)
    if key not in _ENGINES:
        _ENGINES.clear()  # one engine per process: a new learner replaces the old one
        _ENGINES[key] = Engine(learner_bytes, settings, name)
    return _ENGINES[key]


def segment_volume(
    eng: Engine, job: VolumeJob, stride: int = 1, progress: Progress | None = None
) -> VolumeRecord:
    """Read, check, segment and write one volume; InputError for bad input."""
    from . import volume as vol
    from .transfer import apply_learner, check_modality

    t0 = time.perf_counter()
    image = vol.read_image(job.image)
    lf, seg = eng.learner, eng.segmenter
    check_modality(lf, image.array, image.modality, job.image)
    calls = seg.encoder_calls
    applied = apply_learner(
        seg, lf, image.array, image.geometry, image.modality, stride=stride, progress=progress
    )
    result = applied.result
    vol.write_labels(job.output, result.labels, image.geometry, lf.names, lf.colors)
    return VolumeRecord(
        image=job.image,
        output=job.output,
        status="written",
        seconds=round(time.perf_counter() - t0, 2),
        seeds={str(v): t for v, t in applied.seeds.items()},
        missing=applied.missing,
        voxels={str(v): int((result.labels == v).sum()) for v in lf.values},
        slices_predicted={str(v): len(s) for v, s in result.predicted_slices.items()},
        slices_encoded=seg.encoder_calls - calls,
    )


def run_job(
    learner_bytes: bytes,
    settings: Settings,
    job: VolumeJob,
    stride: int = 1,
    name: str = "learner",
    progress: Progress | None = None,
) -> dict:
    """One volume as a task: bad input becomes a failed record (retrying cannot help); any
    other error is raised, for the caller (or Dask) to retry."""
    try:
        eng = engine(learner_bytes, settings, name)
        record = segment_volume(eng, job, stride, progress)
    except InputError as exc:
        record = VolumeRecord(job.image, job.output, "failed", first_line(exc, 300), "input")
    record.worker = socket.gethostname()
    return record.as_dict()


def failed(job: VolumeJob, exc: BaseException, attempts: int) -> dict:
    """The record of a volume whose task raised ``attempts`` times."""
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    record = VolumeRecord(
        job.image, job.output, "failed", first_line(Exception(detail), 300), "internal"
    )
    record.attempts = attempts
    return record.as_dict()
