"""The output folder of a batch run: its lock, its results index, and the publication of each job's folder.

    jobs/<id>/       source.png, edit-1.png, ... (each carrying its recipe) and job.json (the job's row)
    results.jsonl    one row per job: its status, timings, output paths, or error
    .staging/        where a job's folder is assembled before its rename into jobs/
    .lock            held by the run writing to the folder

A job's folder is renamed into `jobs/` in one step, so `jobs/<id>/` exists only once all of it is written:
the folder, not the index, says that a job is done. `recover` makes the folder consistent after a stop at any
moment (`kill -9` included); only the run's own process writes here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from ..recipe import save_png
from .manifest import Job
from .worker import Outcome, describe_error

__all__ = ["INDEX", "JOBS", "LOCK", "STAGING", "IndexFile", "image_name", "job_row", "locked", "publish", "read_index",
           "recover", "write_index"]

INDEX = "results.jsonl"
JOBS = "jobs"
STAGING = ".staging"
LOCK = ".lock"


def _now(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def read_index(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The results index of an output folder: per job id, its last row ("done" rows are final)."""
    rows: dict[str, dict[str, Any]] = {}
    path = Path(out) / INDEX
    if not path.is_file():
        return rows
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:  # the torn last line of a killed run
            continue
        if rows.get(row["id"], {}).get("status") != "done":
            rows[row["id"]] = row
    return rows


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's lock for the block, creating the folder; a second run on it fails at once."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another p2p batch is writing to {str(out)!r}; wait for it to end, or use another --out") from None
        yield  # the lock goes with the process, kill -9 included


def recover(out: Path) -> dict[str, dict[str, Any]]:
    """Make the folder consistent after any stop: drop half-built jobs, index every finished one, once."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    index = read_index(out)
    folders = os.scandir(out / JOBS) if (out / JOBS).is_dir() else []
    for folder in folders:
        if index.get(folder.name, {}).get("status") != "done":
            # The folder is the proof: the run stopped after its rename, before its index line.
            row = json.loads((Path(folder.path) / "job.json").read_text(encoding="utf-8"))
            index[row["id"]] = row
    write_index(out, index)  # also cuts a torn last line
    return index


def write_index(out: Path, index: dict[str, dict[str, Any]]) -> None:
    """Rewrite the index with one row per job, atomically."""
    write_text_atomic(out / INDEX, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in index.values()))


def job_row(job: Job, outcome: Outcome | None, error: BaseException | None = None) -> dict[str, Any]:
    """A job's index row: from its outcome, or, without one, from the error that killed its worker."""
    if outcome is None:
        now = time.time()
        return {"id": job.id, "line": job.line, "status": "failed", "error": describe_error(error), "started": _now(now),
                "finished": _now(now), "seconds": 0.0, "batch": 0, "worker": None, "paths": []}
    row = {"id": job.id, "line": job.line, "status": outcome.status, "error": outcome.error,
           "started": _now(outcome.started), "finished": _now(outcome.finished),
           "seconds": round(outcome.finished - outcome.started, 4), "batch": outcome.batch, "worker": outcome.worker,
           "paths": [f"{JOBS}/{job.id}/{image_name(i)}" for i in outcome.indices]}
    if outcome.scores is not None:
        row["scores"] = outcome.scores
    return row


def publish(out: Path, job: Job, outcome: Outcome, row: dict[str, Any]) -> None:
    """Write a job's images into .staging/ and rename the finished folder into jobs/ in one step."""
    final = out / JOBS / job.id
    staging = out / STAGING / job.id
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for index, image in zip(outcome.indices, outcome.images):
        save_png(image, staging / image_name(index), outcome.recipe.with_index(index))
    (staging / "job.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    final.parent.mkdir(exist_ok=True)
    os.rename(staging, final)  # a job is published once: done jobs are never run again


class IndexFile:
    """The results index, open for appending: each row is on disk (fsync) before `append` returns."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def image_name(index: int) -> str:
    """The file name of a result's image: source.png, then edit-1.png, edit-2.png, ... as `p2p edit` writes them."""
    return "source.png" if index == 0 else f"edit-{index}.png"
