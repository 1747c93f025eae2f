"""`p2p batch`: a manifest of edits, resumable, on local workers or a Ray cluster."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .errors import UsageError, console, say, user_errors, warn
from .options import AllowPickleOption, DeviceOption, DtypeOption, ModelOption

__all__ = ["batch"]

MAX_SHOWN_FAILURES = 20  # failed jobs whose errors `p2p batch` prints; the index has them all
MAX_SHOWN_LINES = 10  # manifest lines that a warning of `p2p batch` names; it counts the rest


def batch(
    manifest: Annotated[Path, typer.Argument(help="JSON Lines manifest, one job per line.", exists=True,
                                             dir_okay=False, show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder; run again on it to resume.", show_default=False)],
    workers: Annotated[int | None, typer.Option(min=0, max=1024, help="Worker processes, one model replica each (0: this "
                                                            "process); default 1, with --ray one actor per GPU.",
                                                show_default=False)] = None,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: auto (a running cluster), ray://HOST:10001, or local.",
                                            show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Jobs of one model and settings per forward batch.")] = 1,
    model: ModelOption = "demo",
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Run the valid jobs of a manifest with "
                                                                      "malformed lines.")] = False,
    score: Annotated[str | None, typer.Option(help="Score hook package.module:function (see docs/batch.md).",
                                              show_default=False)] = None,
    min_score: Annotated[float | None, typer.Option(help="Do not write edits scoring below this.",
                                                    show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Run a manifest of edits into --out (jobs/<id>/ with each job's PNGs and labelled grid, results.jsonl, and
    index.html to browse them): resumable after any stop, on local workers or a Ray cluster."""
    with user_errors():
        from ..batch import BROWSE, INDEX, load_manifest, load_score_hook, run_batch

        if min_score is not None and not math.isfinite(min_score):  # click parses "nan" and "inf" as floats
            raise UsageError(f"--min-score must be a finite number, not {min_score}")
        jobs = load_manifest(manifest, model=model, skip_invalid=skip_invalid)
        for error in jobs.errors:
            say("skipped", "yellow", error)
        _warn_unknown_words(jobs.jobs)
        summary = run_batch(jobs, out, workers=workers, ray_address=ray, batch_size=batch_size, device=device,
                            dtype=dtype, score=load_score_hook(score) if score else None, min_score=min_score,
                            allow_pickle=allow_pickle)
    typer.echo(str(out / INDEX))
    typer.echo(f"browse: {out / BROWSE} (each job's prompt, edits and grid)")
    console.print(f"{summary.done} done, {summary.failed} failed, {summary.skipped} done before; "
                  f"{summary.jobs_per_minute:.1f} jobs/min", highlight=False)
    if summary.failed:
        from ..batch import read_index

        failed = [row for row in read_index(out).values() if row["status"] == "failed"]
        for row in failed[:MAX_SHOWN_FAILURES]:
            error = " ".join(str(row.get("error")).split())[:300]
            say("failed", "red", f"{row['id']} (line {row.get('line')}): {error}")
        if len(failed) > MAX_SHOWN_FAILURES:
            console.print(f"... and {len(failed) - MAX_SHOWN_FAILURES} more, in {out / INDEX}", highlight=False)
        console.print("[red]some jobs failed[/red]: run again to retry them", highlight=False)
        raise typer.Exit(1)


def _warn_unknown_words(jobs) -> None:
    """Before a batch runs, one warning a model: the words of its jobs that it never saw, where its folder lists
    its vocabulary (the demo models; local folders: the workers fetch hub models, not this process)."""
    from ..families.defaults import folder_vocabulary, unknown_words, vocabulary_notice
    from ..loading import DEMO_MODELS

    by_model: dict[str, dict[int, list[str]]] = {}  # model -> manifest line -> its prompts
    for job in jobs:
        by_model.setdefault(job.model, {})[job.line] = [job.source, *(edit["prompt"] for edit in job.edits)]
    for model, prompts in by_model.items():
        folder = DEMO_MODELS.get(model, Path(model))
        vocabulary = folder_vocabulary(folder) if folder.is_absolute() else frozenset()
        lines = [line for line, texts in prompts.items() if unknown_words(vocabulary, texts)]
        if lines:
            shown = ", ".join(map(str, lines[:MAX_SHOWN_LINES]))
            more = f" and {len(lines) - MAX_SHOWN_LINES} more" if len(lines) > MAX_SHOWN_LINES else ""
            notice = vocabulary_notice(vocabulary, [text for line in lines for text in prompts[line]])
            warn(f"{model}, manifest line{'s' if len(lines) > 1 else ''} {shown}{more}: {notice}")
