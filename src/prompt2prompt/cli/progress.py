"""The denoising steps of a run as a rich progress bar on a terminal, as tqdm's lines elsewhere (a log, a pipe)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import console

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["progress"]


class _StepBar:
    """Stands in for diffusers' tqdm bar (`with pipe.progress_bar(total=n) as bar: bar.update()`) on a rich task."""

    def __init__(self, bar: Progress, description: str, total: int | None):
        self.bar = bar
        self.task = bar.add_task(description, total=total)

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.update(self.task, visible=False)

    def update(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


@contextlib.contextmanager
def progress(pipe: DiffusionPipeline, description: str) -> Iterator[None]:
    """Show the pipeline's denoising steps in the block as a rich progress bar on a terminal, as tqdm's lines
    elsewhere, as the inversions show theirs."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)

    def progress_bar(iterable=None, total=None):
        if not console.is_terminal:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=description)
        if iterable is not None:
            return bar.track(iterable, description=description)
        return _StepBar(bar, description, total)

    pipe.progress_bar = progress_bar  # an instance attribute shadows DiffusionPipeline.progress_bar
    try:
        with bar:
            yield
    finally:
        del pipe.progress_bar
