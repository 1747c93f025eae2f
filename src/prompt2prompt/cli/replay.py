"""`p2p replay`: regenerate a result from the recipe in its PNG, and compare the two pixel for pixel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .errors import console, say, user_errors
from .options import AllowPickleOption, DeviceOption
from .progress import progress
from .runs import load_editor, output_folder, publish, report, save_attention

__all__ = ["replay"]


def replay(
    png: Annotated[Path, typer.Argument(help="A PNG written by p2p.", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Where the replay's new numbered folder goes [default: <png "
                                                  "folder>/replay].", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Use this model instead of the recipe's (same weights).",
                                              show_default=False)] = None,
    device: DeviceOption = None,
    dtype: Annotated[str | None, typer.Option(help="[default: the recipe's]", show_default=False)] = None,
    allow_pickle: AllowPickleOption = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the replay is identical, bit for bit.")] = False,
) -> None:
    """Regenerate a result from the recipe in its PNG, into a new folder, and compare it with the PNG."""
    with user_errors():
        from ..recipe import read_recipe, run_recipe, save_result

        recipe = read_recipe(png)
        out = out or _through_link(png.parent) / "replay"
        with output_folder(out):
            revision = None if model else recipe.revision
            editor, _ = load_editor(model or recipe.model, device, dtype or recipe.dtype, revision=revision,
                                    allow_pickle=allow_pickle)
            with progress(editor.pipe, "replaying"):
                result = run_recipe(recipe, editor, base_dir=png.parent)
            if recipe.kind == "attention":
                folder, paths = publish(out, recipe, save_attention, result)
                replayed = paths[0] if recipe.image_index == 0 else paths[1]
            else:
                folder, paths = publish(out, recipe, save_result, result.images)
                replayed = paths[-1] if recipe.image_index is None else paths[recipe.image_index]
        difference = _pixel_difference(png, replayed)
    report(folder, paths, recipe.seed)
    if difference is None:
        console.print(f"identical to {png}, bit for bit", highlight=False)
        return
    say(f"differs from {png}:", "yellow", difference)
    if check:
        raise typer.Exit(1)


def _through_link(folder: Path) -> Path:
    """The folder a link names (`outputs/latest` gives its run folder, which a later run does not move), else itself."""
    return folder.parent / os.readlink(folder) if folder.is_symlink() else folder


def _pixel_difference(original: Path, replayed: Path) -> str | None:
    """None when both PNGs hold the same pixels, else a short description of the difference."""
    import numpy as np
    from PIL import Image

    with Image.open(original) as a, Image.open(replayed) as b:
        a, b = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return f"size {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"
    delta = np.abs(a - b)
    if not delta.any():
        return None
    changed = int((delta.max(-1) > 0).sum())
    return f"{changed} of {delta.shape[0] * delta.shape[1]} pixels differ, by at most {int(delta.max())}/255"
