"""`oflsam2 apply --scheduler ADDRESS`: one Dask task per volume on an existing cluster.

Researchers already run Dask on their clusters and GPU nodes, so the batch uses it rather
than a pool or server of its own: the learner file's bytes are broadcast to the workers once,
each worker process builds its engine once (:func:`oflsam2.batch.engine`) and writes its
outputs atomically (images and the output folder must be on a file system the workers see),
a task that fails is retried once by Dask, and the driver reports each volume as it ends.
"""

from __future__ import annotations

from collections.abc import Callable

from . import batch
from .errors import InputError, first_line
from .settings import Settings

RETRIES = 1  # a volume whose task raises is run once more, then reported as failed
CONNECT_TIMEOUT_S = 20


def client_for(address: str):
    """A Dask client connected to ``address``; InputError when Dask or the scheduler is missing."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError(
            "--scheduler needs Dask's distributed scheduler: pip install 'dask[distributed]'"
        ) from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(
            f"cannot reach the Dask scheduler at {address}: {first_line(exc, 120)}"
        ) from None


def run_on_cluster(
    address: str,
    learner_bytes: bytes,
    settings: Settings,
    jobs: list[batch.VolumeJob],
    stride: int = 1,
    name: str = "learner",
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Segment ``jobs`` on the cluster at ``address``; one record per job, in job order."""
    from distributed import as_completed

    client = client_for(address)
    records: dict[int, dict] = {}
    with client:
        blob = client.scatter(learner_bytes, broadcast=True, hash=True)
        futures = {}
        for i, job in enumerate(jobs):
            future = client.submit(
                batch.run_job,
                blob,
                settings,
                job,
                stride,
                name,
                key=f"oflsam2-apply-{i}-{batch.stem(job.image)}",
                retries=RETRIES,
                pure=False,
            )
            futures[future] = i
        for future in as_completed(futures):
            i = futures[future]
            if future.status == "error":
                record = batch.failed(jobs[i], future.exception(), RETRIES + 1)
            else:
                record = future.result()
                record["attempts"] = max(1, int(record.get("attempts") or 0))
            records[i] = record
            if on_record is not None:
                on_record(record)
    return [records[i] for i in range(len(jobs))]
