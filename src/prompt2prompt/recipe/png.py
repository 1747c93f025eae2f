"""PNGs that carry their recipe: `save_png` writes the recipe (JSON, what replay reads) and Automatic1111's
"parameters" text into every PNG, `read_recipe` reads the recipe back, and `save_result` / `save_grid` write a
result's images and its labelled grid."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..files import write_atomic
from ..images import metadata_too_large
from ..limits import is_finite_number, is_int
from .format import Recipe, RecipeError

__all__ = ["A1111_SAMPLERS", "GRID_TILE", "PARAMETERS_KEY", "RECIPE_KEY", "a1111_parameters", "edit_label",
           "grid_labels", "read_recipe", "save_grid", "save_png", "save_result"]

RECIPE_KEY = "prompt2prompt"  # the PNG text chunk of the recipe

# Automatic1111's sampler names for diffusers' schedulers (its infotext's "Sampler"); others show their class name.
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "HeunDiscreteScheduler": "Heun", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a", "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM", "DEISMultistepScheduler": "DEIS", "LCMScheduler": "LCM",
    "FlowMatchEulerDiscreteScheduler": "Euler",
}
PARAMETERS_KEY = "parameters"  # the PNG text chunk of Automatic1111's infotext, which PNG Info readers show


def _a1111_value(value: Any) -> str:
    """A value as Automatic1111 writes it into its infotext: JSON-quoted if it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(recipe: Recipe, size: tuple[int, int]) -> str:
    """The recipe as Automatic1111's infotext (its PNG "parameters" text), for the tools that read that format.

    The prompt is that of the image the PNG holds (an edit's for an edit, the source's for the source and the
    grid); `size` is (width, height). Only the JSON recipe is replayed: this text says less (no edits).

    >>> print(a1111_parameters(Recipe("a cat", [], 7, 30, 5.0, "demo", negative_prompt="blurry, dark",
    ...                               scheduler={"_class_name": "EulerDiscreteScheduler"}), (64, 64)))
    a cat
    Negative prompt: blurry, dark
    Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Model: demo
    """
    # Written for any recipe, a crafted one too (tests write those to check that replay refuses them): the text
    # takes what it can and never fails.
    index, edits, prompt = recipe.image_index, recipe.edits, recipe.source
    if (recipe.kind == "edit" and isinstance(edits, list) and is_int(index) and 0 < index <= len(edits)
            and isinstance(edits[index - 1], dict)):
        prompt = edits[index - 1].get("prompt", prompt)
    lines = [str(prompt)] + ([f"Negative prompt: {recipe.negative_prompt}"] if recipe.negative_prompt else [])
    scheduler = recipe.scheduler.get("_class_name") if isinstance(recipe.scheduler, dict) else None
    scheduler = scheduler if isinstance(scheduler, str) else None
    guidance = recipe.guidance_scale
    model = Path(str(recipe.model))
    fields = {"Steps": recipe.num_inference_steps, "Sampler": A1111_SAMPLERS.get(scheduler, scheduler),
              "CFG scale": f"{guidance:g}" if is_finite_number(guidance) else guidance, "Seed": recipe.seed,
              "Size": f"{size[0]}x{size[1]}",
              # A checkpoint's name, as Automatic1111 gives it: a local path would say where the user keeps files.
              "Model": (model.stem if model.suffix == ".safetensors" else model.name) if model.is_absolute() else recipe.model}
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, recipe: Recipe, *, size: tuple[int, int] | None = None) -> Path:
    """Write `image` as a PNG carrying `recipe`, atomically: readers never see a half-written file.

    Besides the recipe (JSON, what `read_recipe` and replay read), the PNG carries Automatic1111's "parameters"
    text (`a1111_parameters`), so that PNG Info readers show the prompt, steps, sampler, seed and model; `size`
    is the generated images' size it gives (default: this image's; a grid passes its images').
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_KEY, recipe.to_json())
    info.add_text(PARAMETERS_KEY, a1111_parameters(recipe, size or image.size))  # iTXt if it is not Latin-1
    return write_atomic(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def read_recipe(path: str | Path) -> Recipe:
    """The recipe stored in a PNG written by prompt2prompt."""
    if Path(path).exists() and not Path(path).is_file():  # a pipe or a device would block the read forever
        raise RecipeError(f"{str(path)!r} is not a regular file (a folder, a pipe or a device); replay a PNG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to twice its limit
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get(RECIPE_KEY)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        metadata = metadata_too_large(error)
        reason = f"it has {metadata}, and p2p's recipes take a few KiB" if metadata else error
        raise RecipeError(f"cannot read {str(path)!r} as a PNG: {' '.join(str(reason).split())}") from None
    if text is None:
        raise RecipeError(f"{str(path)!r} carries no prompt2prompt recipe; replay a PNG that p2p wrote "
                          "(image editors and some uploads drop PNG text chunks)")
    return Recipe.from_json(text)


GRID_TILE = 256  # px: a grid tile's least width, so that small images (the demo's 64 px) and their labels read


def edit_label(source: str, spec: dict[str, Any]) -> str:
    """What an edit changes, as a short caption: its words against `source`'s, its reweighted words, its blend.

    Weights at word positions count in the edit's prompt, as `Edit` counts them. Empty when nothing differs.

    >>> edit_label("a big red circle", {"prompt": "a big purple circle"})
    'red -> purple'
    >>> edit_label("a circle on a white background", {"prompt": "a circle on a white gradient background"})
    '+ gradient'
    >>> edit_label("a fluffy red cat", {"prompt": "a red cat", "weights": [[1, 2.0], ["cat", -2]]})
    '- fluffy, reweight red x2, cat x -2'
    """
    import difflib

    before, after = source.split(), str(spec.get("prompt", "")).split()
    parts = []
    for change, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
        old, new = " ".join(before[i1:i2]), " ".join(after[j1:j2])
        parts += {"replace": [f"{old} -> {new}"], "insert": [f"+ {new}"], "delete": [f"- {old}"]}.get(change, [])
    by_weight: dict[float, list[str]] = {}  # words of the same weight share it: "red, circle x -2"
    for word, weight in spec.get("weights") or []:
        if isinstance(word, int):
            word = after[word] if -len(after) <= word < len(after) else f"word {word}"
        by_weight.setdefault(weight, []).append(str(word))
    if by_weight:
        parts.append("reweight " + ", ".join(f"{', '.join(words)} x{'' if weight >= 0 else ' '}{weight:g}"
                                             for weight, words in by_weight.items()))
    if spec.get("blend"):
        parts.append("local blend")
    return ", ".join(parts)


def save_result(images: list[Image.Image], recipe: Recipe, out_dir: str | Path) -> list[Path]:
    """Write source.png, edit-1.png, ... and grid.png into `out_dir`, each carrying the recipe (see `save_grid`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["source.png"] + [f"edit-{i}.png" for i in range(1, len(images))]
    paths = [save_png(image, out_dir / name, recipe.with_index(i)) for i, (name, image) in enumerate(zip(names, images))]
    return [*paths, save_grid(images, recipe, out_dir / "grid.png")]


def grid_labels(recipe: Recipe, indices: Sequence[int]) -> list[str]:
    """The grid's caption of each of a result's images (0: the source row, i: edit i).

    >>> recipe = Recipe(model="demo", family="unet", source="a big red circle", seed=7, num_inference_steps=30,
    ...                 guidance_scale=5.0, edits=[{"prompt": "a big green circle"}])
    >>> grid_labels(recipe, [0, 1])
    ['source (seed 7)', 'red -> green']
    >>> import dataclasses
    >>> grid_labels(dataclasses.replace(recipe, seed=None, image={"path": "cat.png", "sha256": "0"}), [0])
    ['reconstruction']
    """
    return [("reconstruction" if recipe.image is not None else "source" if recipe.seed is None
             else f"source (seed {recipe.seed})") if i == 0
            else edit_label(recipe.source, recipe.edits[i - 1]) or f"edit {i}" for i in indices]


def save_grid(images: list[Image.Image], recipe: Recipe, path: str | Path,
              indices: Sequence[int] | None = None) -> Path:
    """Write the labelled grid of a result's images (those at `indices` of the recipe, default all) to `path`.

    The first image is labelled "source (seed N)", or "reconstruction" when it is an inverted real image (the
    picture after the autoencoder's round trip, not the file); each edit with what it changes (`edit_label`).
    Small images are enlarged, pixel for pixel (nearest neighbour, a whole factor), to at least GRID_TILE px wide.
    """
    from ..visualize import image_grid

    labels = grid_labels(recipe, range(len(images)) if indices is None else indices)
    width = images[0].width * math.ceil(GRID_TILE / images[0].width)
    grid = image_grid(images, labels, width=width)
    return save_png(grid, Path(path), recipe.with_index(None), size=images[0].size)
