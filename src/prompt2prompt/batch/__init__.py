"""Batch jobs: many edits from a JSON Lines manifest, resumable, on one machine or a Ray cluster.

A manifest holds one job per line: a source prompt (or a real image and its caption), its edits with the
fields of `prompt2prompt.Edit`, and the run's settings. `load_manifest` checks every line before any model
is loaded; `run_batch` runs the jobs and writes, under its output folder,

- `jobs/<id>/`: `source.png`, `edit-1.png`, ... (each carrying its recipe), `grid.png` (labelled as `p2p edit`
  labels it) and `job.json` (the job's row);
- `results.jsonl`: one row per job with its prompt, edits, status, timings, output paths, or error;
- `index.html`: a page to browse the run, each job's prompt, edits and grid (or its error).

A job's folder is assembled in `.staging/` and renamed into `jobs/` in one step, so `jobs/<id>/` exists only
once all of it is written; the folder, not the index, says that a job is done. A run killed at any moment
(`kill -9` included) and started again on the same folder skips the finished jobs, redoes the others, and
repairs the index. Workers only compute: they send their images back, and this process alone writes.

Workers are a process pool (`workers=N`), this process (`workers=0`), or Ray actors (`ray_address=`), each
holding one model replica. Jobs that share a model and settings go through the UNet together, up to
`batch_size` jobs in one forward batch.

The package's modules, by concern: `manifest` (parsing and validation), `worker` (a model replica running
groups of jobs), `together` (a group as one forward batch), `executors` (this process, a process pool, Ray)
and `store` (the output folder).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..recipe import run_recipe  # noqa: F401 (reached as prompt2prompt.batch.run_recipe, as before the split)
from .executors import start_executor
from .manifest import Job, Manifest, ManifestError, ScoreHook, load_manifest, load_score_hook, parse_job, plan_groups
from .store import (BROWSE, INDEX, IndexFile, clear_staging, job_row, locked, publish, read_index, recover,
                    write_browse_page, write_index)
from .together import edit_together
from .worker import Outcome, Worker, WorkerConfig

__all__ = ["BROWSE", "INDEX", "Job", "Manifest", "ManifestError", "Outcome", "Summary", "Worker", "WorkerConfig", "edit_together",
           "load_manifest", "load_score_hook", "parse_job", "plan_groups", "read_index", "run_batch"]


@dataclass
class Summary:
    """What a run did: jobs done and failed in this run, those already done before it, and its speed."""

    done: int
    failed: int
    skipped: int
    seconds: float
    out: Path

    @property
    def jobs_per_minute(self) -> float:
        """Jobs finished (done or failed) per minute of this run, its start-up included."""
        return 60.0 * (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


MAX_BATCH = 4096  # jobs per forward batch
MAX_WORKERS = 1024  # worker processes or Ray actors, each with a model replica


def run_batch(
    jobs: Manifest | Sequence[Job],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    score: ScoreHook | None = None,
    min_score: float | None = None,
    progress: bool = True,
    description: str = "p2p batch",
    allow_pickle: bool = False,
) -> Summary:
    """Run every job not yet done in `out`; safe to stop at any moment and to start again.

    Args:
        jobs: a `Manifest` from `load_manifest`, or its jobs.
        out: the output folder (jobs/<id>/ and results.jsonl).
        workers: processes, each with one model replica (default 1); 0 runs in this process. With Ray, the
            number of actors (default: one per GPU of the cluster, else 1).
        ray_address: run on Ray: "auto" (a running cluster), "ray://host:10001", or "local" (a new local
            instance); an already initialised Ray is used as it is.
        batch_size: jobs of one model and settings per forward batch; halved once on out-of-memory.
        threads: torch CPU threads per worker (default: OMP_NUM_THREADS, else the CPUs shared among pool
            workers; as they are in this process and in Ray actors).
        score: `score(source_image, edited_image, source_prompt, edit_prompt) -> float`, e.g. a CLIP
            directional similarity; recorded per edit in the job's row.
        min_score: edits scoring below it are not written (the job stays done).
        progress, description: show one progress bar of jobs, so labelled (the jobs' own steps show none).
        allow_pickle: also load pickle (.bin) weights, read with `torch.load(weights_only=True)`; off by default,
            as unpickling can run code (see `loading.load_pipeline`).

    Example: `run_batch(load_manifest("edits.jsonl"), "runs/edits", batch_size=8)`.
    """
    job_list = list(jobs.jobs if isinstance(jobs, Manifest) else jobs)
    if not 1 <= batch_size <= MAX_BATCH or (workers is not None and not 0 <= workers <= MAX_WORKERS):
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH} and workers from 0 to {MAX_WORKERS}, not "
                         f"{batch_size} and {workers}")
    if ray_address is None and workers is None:
        workers = 1
    if min_score is not None and score is None:
        raise ValueError("min_score filters by the score hook's values; give score= too")
    out = Path(out)
    started = time.time()
    with locked(out):
        index = recover(out)
        finished = {job_id for job_id, row in index.items() if row["status"] == "done"}
        todo = [job for job in job_list if job.id not in finished]
        skipped = len(job_list) - len(todo)
        if threads is None and ray_address is None and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // workers)  # more would oversubscribe the CPUs
        config = WorkerConfig(device=device, dtype=dtype, threads=threads, batch_size=batch_size, score=score,
                              min_score=min_score, allow_pickle=allow_pickle)
        counts = {"done": 0, "failed": 0}
        if not todo:
            write_browse_page(out, index)
            return Summary(0, 0, skipped, time.time() - started, out)
        bar = tqdm(total=len(job_list), initial=skipped, unit="job", desc=description, disable=not progress,
                   dynamic_ncols=True)
        executor = start_executor(config, workers=workers, ray_address=ray_address)
        results = IndexFile(out / INDEX)
        try:
            groups = iter(plan_groups(todo, batch_size))
            in_flight = 0
            for group in _take(groups, executor.capacity):
                executor.submit(group)
                in_flight += 1
            while in_flight:
                for group, outcomes in executor.wait():
                    in_flight -= 1
                    for job, outcome, row in _rows(group, outcomes):
                        if row["status"] == "done":
                            publish(out, job, outcome, row)
                        results.append(row)
                        counts[row["status"]] += 1
                        bar.update(1)
                        bar.set_postfix(failed=counts["failed"], refresh=False)
                    for next_group in _take(groups, 1):
                        executor.submit(next_group)
                        in_flight += 1
        finally:
            executor.close()
            results.close()
            bar.close()
            clear_staging(out)
        write_index(out, read_index(out))  # a retried job's earlier rows go
        write_browse_page(out, read_index(out))
    return Summary(counts["done"], counts["failed"], skipped, time.time() - started, out)


def _take(items: Iterator, n: int) -> list:
    return [item for _, item in zip(range(n), items)]


def _rows(group: list[Job], outcomes: list[Outcome] | BaseException) -> Iterator[tuple[Job, Outcome | None, dict]]:
    if isinstance(outcomes, BaseException):  # the worker itself died
        for job in group:
            yield job, None, job_row(job, None, outcomes)
        return
    by_id = {outcome.job_id: outcome for outcome in outcomes}
    for job in group:
        yield job, by_id[job.id], job_row(job, by_id[job.id])
