"""What every command that runs a model does around the run: make --out first, load the model behind one spinner,
put on the scheduler asked for, publish the run's folder whole, and say what it wrote.

The engine, the loaders and the recipes (torch, diffusers) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..files import LATEST, run_slug, write_folder_atomic
from ..schedulers import scheduler_class
from .errors import console, say

if TYPE_CHECKING:
    from ..engine import Editor, EditResult
    from ..loading import Checkpoint
    from ..recipe import Recipe

__all__ = ["load_editor", "output_folder", "publish", "report", "save_attention", "say_defaults", "use_scheduler"]


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[None]:
    """Create the --out folder before any model loads, so that a path that cannot be one fails at once; if the
    block then fails, the folders made here are removed again (those still empty)."""
    made = []  # what `mkdir -p out` creates, deepest first
    folder = out
    while not (folder.exists() or folder.is_symlink()) and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write into --out {str(out)!r}: {str(folder)!r} is a file; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise type(error)(f"cannot write into --out {str(out)!r}: {reason}; pass another --out") from None
    try:
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write into --out {str(out)!r}: it is not writable; pass another --out")
        yield
    except BaseException:
        for created in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something there
                created.rmdir()
        raise


def load_editor(model: str, device: str | None, dtype: str, *, revision: str | None = None,
                allow_pickle: bool = False) -> tuple[Editor, Checkpoint]:
    """Load `model` behind one spinner; a download, before it, keeps its own progress bars. Returns the editor and
    the model's source, as `engine.load_editor` does."""
    from .. import engine
    from ..loading import CPU_FLOAT16, check_device, parse_dtype, resolve_model, slow_dtype

    checked = check_device(device)
    note = slow_dtype(parse_dtype(dtype, checked), checked)  # a bad --device or --dtype fails before any download
    source = resolve_model(model, revision=revision)
    if note:  # said here once, as the CLI says things, instead of load_pipeline's Python warning
        console.print(f"[yellow]warning:[/yellow] {note} (--dtype float32)", highlight=False)
    with console.status(f"loading {model} ..."), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(CPU_FLOAT16))
        return engine.load_editor(source, device=device, dtype=dtype, allow_pickle=allow_pickle)


def use_scheduler(editor: Editor, name: str | None) -> None:
    """Put the scheduler that --scheduler names on the pipeline, configured as the model's; the recipe records it."""
    if name is not None:
        pipe = editor.pipe
        cls = scheduler_class(name, pipe.scheduler.compatibles, option="--scheduler")  # a ValueError: exit 2
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def save_attention(result: EditResult, recipe: Recipe, out_dir: Path) -> list[Path]:
    """Write image.png and attention.png (the per-token heatmap grid), each carrying the recipe."""
    import prompt2prompt as p2p

    from ..recipe import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    res = None if recipe.record_attention is True else recipe.record_attention
    heatmaps = p2p.attention_heatmaps(result, prompt_index=0, res=res)
    grid = p2p.image_grid(heatmaps, cols=min(len(heatmaps), 8), width=max(result.images[0].width, 128))
    return [save_png(result.images[0], out_dir / "image.png", recipe.with_index(0)),
            save_png(grid, out_dir / "attention.png", recipe.with_index(None))]


def say_defaults(used: list[str]) -> None:
    """One line naming the model's defaults a run took (what the user did not set), and where they came from."""
    if used:
        say("defaults:", "", "; ".join(used))


def _run_label(recipe: Recipe) -> str:
    """A run folder's name after its number: the source prompt's first words, and the seed."""
    return run_slug(recipe.source) + ("" if recipe.seed is None else f"-seed{recipe.seed}")


def publish(out: Path, recipe: Recipe, save: Callable[[Any, Recipe, Path], list[Path]],
            what: Any) -> tuple[Path, list[Path]]:
    """`save(what, recipe, folder)` into a new numbered folder under `out`, renamed into place whole: a run
    never overwrites or mixes with an earlier one. Returns the folder and the paths of its files."""
    written: list[Path] = []
    folder = write_folder_atomic(out, _run_label(recipe), lambda staging: written.extend(save(what, recipe, staging)))
    return folder, [folder / path.name for path in written]


def report(folder: Path, paths: list[Path], seed: int | None) -> None:
    """The run's files on stdout, one a line (for scripts), then its seed and folder on stderr."""
    for path in paths:
        typer.echo(str(path))
    if seed is not None:
        console.print(f"seed {seed}", highlight=False)
    latest = folder.parent / LATEST
    also = f" (also {latest})" if latest.is_symlink() and os.readlink(latest) == folder.name else ""
    say("saved to", "", f"{folder}{also}")
