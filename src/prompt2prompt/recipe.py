"""Recipes: everything needed to regenerate a result, stored as JSON in a text chunk of every PNG we write.

A recipe holds the prompts, the edits, the seed, steps, guidance, the scheduler with its configuration, the
model id and revision, the dtype and the package version. `run_recipe` regenerates its images; on the same
device and dtype they are identical, bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from .files import write_atomic
from .forms import edit_from_dict

if TYPE_CHECKING:
    from .cache import SourceStore

__all__ = ["RECIPE_KEY", "Recipe", "RecipeError", "build_edits", "file_digest", "inversion_available", "package_version", "read_recipe",
           "recipe_for", "run_recipe", "save_png", "save_result", "scheduler_config"]

RECIPE_KEY = "prompt2prompt"
FORMAT = 1


class RecipeError(ValueError):
    """A PNG without a readable recipe."""


def package_version() -> str:
    """The installed prompt2prompt version, or "unknown" when running from a source tree that is not installed."""
    try:
        return metadata.version("prompt2prompt")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Recipe:
    """The inputs of one run, in JSON-able form.

    `edits` are dicts with the keyword arguments of `prompt2prompt.Edit` (`prompt`, `mode`, `cross_steps`,
    `self_steps`, `weights` as a list of [word, weight] pairs so that word positions stay integers, and
    `blend` as the keyword arguments of `LocalBlend`): the form of `prompt2prompt.forms`. `kind` is "edit", or "attention" for the heatmaps of
    `record_attention`. `image` ({"path", "sha256"}, a relative path counting from the PNG's folder) is a real
    image inverted with `invert()`'s keyword arguments `inversion`; its edits take no seed. `image_index`
    says which result image a PNG holds (0 the source), None for a grid.
    """

    source: str
    edits: list[dict[str, Any]]
    seed: int | None
    num_inference_steps: int
    guidance_scale: float
    model: str
    revision: str | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch's CPU threads: CPU sums, and so the last bits, depend on their number
    kind: str = "edit"
    record_attention: bool | int = False
    image: dict[str, str] | None = None
    inversion: dict[str, Any] | None = None
    image_index: int | None = None
    cached_source: bool = False  # made on a cached source (the edits' rows alone): replayed the same way
    package_version: str = field(default_factory=package_version)
    format: int = FORMAT

    def to_json(self) -> str:
        """The recipe as one line of JSON."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Parse a recipe, naming what is missing or unknown."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(f"the recipe is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"the recipe is a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise RecipeError(f"recipe format {data.get('format')!r} is not {FORMAT}; replay it with the "
                              f"prompt2prompt version that wrote it ({data.get('package_version', 'unknown')})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if unknown := sorted(set(data) - names):
            raise RecipeError(f"the recipe has unknown fields {unknown}")
        if missing := sorted(required - set(data)):
            raise RecipeError(f"the recipe lacks the fields {missing}")
        return cls(**data)

    def with_index(self, index: int | None) -> Recipe:
        """The same recipe for another image of the result."""
        return dataclasses.replace(self, image_index=index)


def build_edits(recipe: Recipe) -> list:
    """The `prompt2prompt.Edit` objects a recipe describes."""
    return [edit_from_dict(spec) for spec in recipe.edits]


def _scheduler_for(pipe, recipe: Recipe):
    import diffusers

    if not recipe.scheduler:
        return pipe.scheduler
    name = recipe.scheduler["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise RecipeError(f"the recipe's scheduler {name!r} is not in this diffusers ({diffusers.__version__})")
    return cls.from_config(recipe.scheduler)


def scheduler_config(scheduler) -> dict[str, Any]:
    """A scheduler's class and configuration, as JSON-able data that `from_config` takes back."""
    return json.loads(scheduler.to_json_string())


def recipe_for(editor, model, **fields: Any) -> Recipe:
    """A recipe for a run of `editor`, whose pipeline was loaded from `model` (a `loading.ModelSource`).

    The model id and revision, the scheduler, the dtype and the device come from them; `fields` give the rest.
    """
    import torch

    pipe = editor.pipe
    threads = torch.get_num_threads() if pipe.device.type == "cpu" else None
    return Recipe(model=model.id, revision=model.revision, scheduler=scheduler_config(pipe.scheduler),
                  dtype=str(pipe.unet.dtype).removeprefix("torch."), device=pipe.device.type, threads=threads,
                  **fields)


def inversion_available() -> bool:
    """Whether this install can invert real images (`prompt2prompt.inversion`)."""
    return importlib.util.find_spec("prompt2prompt.inversion") is not None


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _input_image(recipe: Recipe, base_dir: Path) -> Path:
    path = Path(recipe.image["path"])
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise RecipeError(f"the recipe's input image {str(path)!r} is missing; put it back to replay this edit")
    if file_digest(path) != recipe.image["sha256"]:
        raise RecipeError(f"the input image {str(path)!r} has changed since the recipe was written")
    return path


def run_recipe(recipe: Recipe, editor, *, base_dir: str | Path = ".", sources: SourceStore | None = None, **edit_kwargs):
    """Regenerate a recipe's result with `editor` (its model must be the recipe's), with the recipe's scheduler.

    A real input image is inverted first; a relative image path counts from `base_dir`. On the CPU it runs
    on the recipe's number of threads. The editor's pipeline gets its scheduler back afterwards, the process
    its thread count. A recipe with `cached_source` runs its edits on a cached source, as it was made (a cached
    run and a fresh one agree to float precision, not always to the last bit). With `sources`, the inversion
    and the cached source are taken from there when another recipe of the same source (everything but the
    edits) made them, and kept there otherwise: only the edits run. Extra keyword arguments go to `editor.edit`.
    """
    import torch

    pipe = editor.pipe
    previous = pipe.scheduler, torch.get_num_threads()
    settings: dict[str, Any] = dict(
        num_inference_steps=recipe.num_inference_steps, guidance_scale=recipe.guidance_scale,
        height=recipe.height, width=recipe.width,
    )
    source = dict(seed=recipe.seed, negative_prompt=recipe.negative_prompt, record_attention=recipe.record_attention)
    try:
        pipe.scheduler = _scheduler_for(pipe, recipe)
        if recipe.threads and pipe.device.type == "cpu":
            torch.set_num_threads(recipe.threads)
        if recipe.image is not None:
            image = _input_image(recipe, Path(base_dir))

            def invert():
                return editor.invert(image, recipe.source, **settings, **(recipe.inversion or {}))

            key = ("inversion", recipe.model, recipe.revision, recipe.image["sha256"], recipe.source,
                   json.dumps(recipe.inversion, sort_keys=True), *settings.values(), json.dumps(recipe.scheduler))
            settings = dict(inversion=invert() if sources is None else sources.get_or_make(key, invert))
        if recipe.cached_source:
            def make():
                return editor.cache_source(recipe.source, **source, **settings)

            cache = make() if sources is None else sources.get_or_make(("source", source_key(recipe)), make)
            return editor.edit(recipe.source, build_edits(recipe), cache=cache,
                               record_attention=recipe.record_attention, **edit_kwargs)
        return editor.edit(recipe.source, build_edits(recipe), **source, **settings, **edit_kwargs)
    finally:
        pipe.scheduler, threads = previous
        torch.set_num_threads(threads)


def source_key(recipe: Recipe) -> str:
    """What decides a recipe's source: everything but its edits and which image a PNG holds."""
    fields = dataclasses.asdict(recipe)
    for name in ("edits", "image_index", "kind", "package_version", "cached_source"):
        fields.pop(name)
    if recipe.image is not None:
        fields["image"] = recipe.image["sha256"]  # the same picture under another path is the same source
    return json.dumps(fields, sort_keys=True)


def save_png(image: Image.Image, path: str | Path, recipe: Recipe) -> Path:
    """Write `image` as a PNG carrying `recipe`, atomically: readers never see a half-written file."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_KEY, recipe.to_json())
    return write_atomic(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def read_recipe(path: str | Path) -> Recipe:
    """The recipe stored in a PNG written by prompt2prompt."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(RECIPE_KEY)
    except (OSError, Image.UnidentifiedImageError) as error:
        raise RecipeError(f"cannot read {str(path)!r} as a PNG: {error}") from None
    if text is None:
        raise RecipeError(f"{str(path)!r} carries no prompt2prompt recipe; replay a PNG that p2p wrote "
                          "(image editors and some uploads drop PNG text chunks)")
    return Recipe.from_json(text)


def save_result(images: list[Image.Image], recipe: Recipe, out_dir: str | Path) -> list[Path]:
    """Write source.png, edit-1.png, ... and grid.png (side by side) into `out_dir`, each carrying the recipe."""
    from prompt2prompt import image_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["source.png"] + [f"edit-{i}.png" for i in range(1, len(images))]
    paths = [save_png(image, out_dir / name, recipe.with_index(i)) for i, (name, image) in enumerate(zip(names, images))]
    grid = image_grid(images, [recipe.source] + [spec["prompt"] for spec in recipe.edits], width=images[0].width)
    paths.append(save_png(grid, out_dir / "grid.png", recipe.with_index(None)))
    return paths
