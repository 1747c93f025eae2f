"""The output folder of a batch run: its lock, its results index, and the publication of each job's folder.

    jobs/<id>/       source.png, edit-1.png, ... (each carrying its recipe), grid.png (labelled as `p2p edit`
                     labels it) and job.json (the job's row)
    results.jsonl    one row per job: its status, timings, output paths, or error
    index.html       a page to browse the run: each job's prompt, edits and grid, or its error
    .staging/        where a job's folder is assembled before its rename into jobs/
    .lock            held by the run writing to the folder

A job's folder is renamed into `jobs/` in one step, so `jobs/<id>/` exists only once all of it is written:
the folder, not the index, says that a job is done. `recover` makes the folder consistent after a stop at any
moment (`kill -9` included), and tolerates index lines damaged by hand (the job folders index their jobs
again); only the run's own process writes here.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import files
from ..files import write_folder_atomic, write_text_atomic
from ..recipe import edit_label, save_grid, save_png
from .manifest import Job
from .worker import Outcome, describe_error

__all__ = ["BROWSE", "GRID", "INDEX", "JOBS", "LOCK", "STAGING", "IndexFile", "clear_staging", "image_name", "job_row",
           "locked", "publish", "read_index", "recover", "write_browse_page", "write_index"]

INDEX = "results.jsonl"
BROWSE = "index.html"
GRID = "grid.png"
JOBS = "jobs"
STAGING = ".staging"
LOCK = ".lock"


def _now(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def read_index(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The results index of an output folder: per job id, its last row ("done" rows are final).

    Lines that are not rows (the torn last line of a killed run, a line damaged by hand) are skipped.
    """
    rows: dict[str, dict[str, Any]] = {}
    path = Path(out) / INDEX
    if not path.is_file():
        return rows
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and row.get("status") in ("done", "failed")):
            continue
        if rows.get(row["id"], {}).get("status") != "done":
            rows[row["id"]] = row
    return rows


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's lock for the block, creating the folder; a second run on it fails at once."""
    if out.exists() and not out.is_dir():
        raise RuntimeError(f"the output folder {str(out)!r} is a file; give another folder")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another p2p batch is writing to {str(out)!r}; wait for it to end, or use another --out") from None
        yield  # the lock goes with the process, kill -9 included


def _in_the_way(path: Path, why: str) -> RuntimeError:
    return RuntimeError(f"{str(path)!r} {why}; move it out of the output folder and run again")


def clear_staging(out: Path) -> None:
    """Remove `.staging/`, whatever is there: half-built job folders, or a file in its place."""
    files.clear_staging(out / STAGING)


def recover(out: Path) -> dict[str, dict[str, Any]]:
    """Make the folder consistent after any stop: drop half-built jobs, index every finished one, once.

    A "done" row counts only with its job's folder; a folder with no row gets one from its job.json. Anything
    in the way of the layout (a file where `jobs/`, the index or a job folder should be, a job folder without
    its job.json) is an error, raised before any compute.
    """
    clear_staging(out)
    if (out / INDEX).exists() and not (out / INDEX).is_file():
        raise _in_the_way(out / INDEX, "is not a file (the results index goes there)")
    if (out / JOBS).exists() and not (out / JOBS).is_dir():
        raise _in_the_way(out / JOBS, "is not a folder (the job folders go there)")
    index = {job_id: row for job_id, row in read_index(out).items()
             if row["status"] != "done" or (out / JOBS / job_id).is_dir()}
    folders = os.scandir(out / JOBS) if (out / JOBS).is_dir() else []
    for folder in folders:
        if not folder.is_dir(follow_symlinks=False):
            raise _in_the_way(Path(folder.path), "is not a job folder")
        if index.get(folder.name, {}).get("status") != "done":
            # The folder is the proof: the run stopped after its rename, before its index line.
            index[folder.name] = _folder_row(Path(folder.path))
    write_index(out, index)  # also cuts a torn last line
    return index


def _folder_row(folder: Path) -> dict[str, Any]:
    try:
        row = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        why = f"has no readable job.json ({type(error).__name__}), so it is no finished job's folder"
        raise _in_the_way(folder, why) from None
    if not isinstance(row, dict) or row.get("id") != folder.name or row.get("status") != "done":
        raise _in_the_way(folder, "holds a job.json that is not this job's")
    return row


def write_index(out: Path, index: dict[str, dict[str, Any]]) -> None:
    """Rewrite the index with one row per job, atomically."""
    write_text_atomic(out / INDEX, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in index.values()))


def job_row(job: Job, outcome: Outcome | None, error: BaseException | None = None) -> dict[str, Any]:
    """A job's index row: from its outcome, or, without one, from the error that killed its worker."""
    # what the job is, for a reader of the index (and the browse page): its prompt and what each edit changes
    about = {"id": job.id, "line": job.line, "source": job.source,
             "edits": [edit_label(job.source, spec) or spec["prompt"] for spec in job.edits]}
    if outcome is None:
        now = time.time()
        return {**about, "status": "failed", "error": describe_error(error), "started": _now(now),
                "finished": _now(now), "seconds": 0.0, "batch": 0, "worker": None, "paths": []}
    row = {**about, "status": outcome.status, "error": outcome.error,
           "started": _now(outcome.started), "finished": _now(outcome.finished),
           "seconds": round(outcome.finished - outcome.started, 4), "batch": outcome.batch, "worker": outcome.worker,
           "paths": [f"{JOBS}/{job.id}/{image_name(i)}" for i in outcome.indices]}
    if outcome.scores is not None:
        row["scores"] = outcome.scores
    return row


def publish(out: Path, job: Job, outcome: Outcome, row: dict[str, Any]) -> None:
    """Write a job's images into .staging/ and rename the finished folder into jobs/ in one step."""

    def write(folder: Path) -> None:
        for index, image in zip(outcome.indices, outcome.images):
            save_png(image, folder / image_name(index), outcome.recipe.with_index(index))
        save_grid(outcome.images, outcome.recipe, folder / GRID, outcome.indices)
        (folder / "job.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")

    (out / JOBS).mkdir(exist_ok=True)
    # A job is published once (done jobs are never run again): a folder of its id in jobs/ is an error, not replaced.
    write_folder_atomic(out / JOBS, job.id, write, numbered=False, staging=out / STAGING)


def write_browse_page(out: Path, index: dict[str, dict[str, Any]]) -> Path:
    """Write index.html: one table row per job (in manifest order) with its prompt, edits and grid, or its error."""
    rows = []
    for row in sorted(index.values(), key=lambda row: (row.get("line") or 0, row["id"])):
        job_id = html.escape(row["id"])
        edits = "".join(f"<li>{html.escape(str(edit))}</li>" for edit in row.get("edits") or [])
        if row["status"] == "done":
            result = (f'<a href="{JOBS}/{job_id}/"><img src="{JOBS}/{job_id}/{GRID}" alt="grid of {job_id}" '
                      f'loading="lazy"></a>')
        else:
            result = f'<span class="error">{html.escape(str(row.get("error")))}</span>'
        rows.append(f"<tr><td>{row.get('line')}</td><td><code>{job_id}</code></td>"
                    f"<td class=\"prompt\">{html.escape(str(row.get('source', '')))}</td><td><ul>{edits}</ul></td>"
                    f"<td>{row['status']}, {row.get('seconds', 0):.1f} s</td><td>{result}</td></tr>")
    done = sum(row["status"] == "done" for row in index.values())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>p2p batch: {html.escape(out.name)}</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:4px 8px;border-bottom:1px solid #ddd}}
img{{max-height:12em;image-rendering:pixelated}} ul{{margin:0;padding-left:1.2em}} li{{white-space:nowrap}}
.prompt{{min-width:14em;max-width:24em}} .error{{color:#b00}}</style></head>
<body><h1>p2p batch: {html.escape(out.name)}</h1><p>{done} of {len(index)} jobs done; rows from {INDEX}.</p>
<table><tr><th>line</th><th>job</th><th>source prompt</th><th>edits</th><th>status</th><th>result</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    return write_text_atomic(out / BROWSE, page)


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
