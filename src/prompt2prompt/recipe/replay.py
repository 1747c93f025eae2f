"""Replay: a recipe becomes a `PreparedRun` on an editor, and the editor sends it.

`prepare_recipe` is the one mapping of a recipe's fields to the editor's arguments (inverting its image and caching
its source first where the recipe says so); `replaying` holds the recipe's scheduler and CPU thread count, the two
settings a run takes from outside its arguments, and gives the previous ones back. `run_recipe` is both, then
`Editor.run`. On the same device, dtype and thread count a replay is identical to the run, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..edits import check_edit_words
from ..limits import MAX_INPUT_BYTES, allow_large, lift_hint, quoted
from ..loading import library_logs
from .format import Recipe, RecipeError, build_edits

if TYPE_CHECKING:
    from ..engine import Editor, EditResult, PreparedRun, SourceStore

__all__ = ["file_digest", "prepare_recipe", "replaying", "run_recipe", "source_key"]


def file_digest(path: str | Path) -> str:
    """The SHA-256 of an input file's bytes, in hex, read a MiB at a time.

    Only a regular file of at most `MAX_INPUT_BYTES` (unless P2P_ALLOW_LARGE is set) is read: a pipe or a device
    (/dev/zero) would never end, and a huge (sparse) file would take hours. Raises ValueError for those.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"'{path}' is not a regular file (a folder, a pipe or a device); pass an image file")
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES and not allow_large():
        raise ValueError(f"'{path}' is {size} bytes, more than the {MAX_INPUT_BYTES // 2**20} MiB an input image may "
                         f"have ({lift_hint()})")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_key(recipe: Recipe) -> str:
    """What decides a recipe's source: everything but its edits and which image a PNG holds."""
    fields = dataclasses.asdict(recipe)
    for name in ("edits", "image_index", "kind", "package_version", "cached_source"):
        fields.pop(name)
    if recipe.image is not None:
        fields["image"] = recipe.image["sha256"]  # the same picture under another path is the same source
    return json.dumps(fields, sort_keys=True)


def _check_model(recipe: Recipe, editor: Editor) -> None:
    if recipe.family != editor.family.name:
        raise RecipeError(f"this recipe was made on a {recipe.family} model; {recipe.model!r} loaded as a "
                          f"{editor.family.name} one: replay it with its own model")


def _scheduler_for(pipe, recipe: Recipe):
    """The recipe's scheduler, if the pipeline lists its class as compatible, built and set up before any compute."""
    if not recipe.scheduler:
        return pipe.scheduler
    name = recipe.scheduler["_class_name"]
    compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
    if name not in compatible:
        raise RecipeError(f"the recipe's scheduler {quoted(name)} is not one that this pipeline takes; the compatible "
                          f"ones are {', '.join(sorted(compatible))}")
    try:
        # A trial set_timesteps, on a scheduler of its own, so that a bad configuration fails here and not mid-run;
        # the configuration is untrusted, so any failure of diffusers on it is the recipe's. Its warnings (keys
        # this diffusers does not know, which it ignores) are not printed: a recipe from another version has some.
        # (numpy's warnings too: a step count the run then refuses with its own message, Qwen-Image's one step)
        with library_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = compatible[name].from_config(recipe.scheduler)
            # A resolution-shifted flow schedule takes its shift from the pipeline's call: any one will do here.
            shift = {"mu": 1.0} if trial.config.get("use_dynamic_shifting") else {}
            trial.set_timesteps(recipe.num_inference_steps, **shift)
            return compatible[name].from_config(recipe.scheduler)
    except Exception as error:  # noqa: BLE001
        raise RecipeError(f"the recipe's {name} configuration does not work: {type(error).__name__}: "
                          f"{quoted(str(error))}") from None


def _replay_threads(threads: int) -> int:
    """The recorded thread count, but no more than this machine's CPUs unless P2P_ALLOW_LARGE is set."""
    if allow_large():
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(threads, cpus)


@contextlib.contextmanager
def replaying(recipe: Recipe, editor: Editor) -> Iterator[None]:
    """Hold the recipe's scheduler on `editor`'s pipeline and, on the CPU, its thread count, for the block; then give
    the previous ones back.

    A run takes both from outside its arguments, so both prepare (inversions, source caches) and run happen inside.
    The scheduler must be one that the pipeline lists as compatible, and its configuration must set up for the
    recipe's steps: else a RecipeError, before any compute. The thread count is the recorded one (CPU sums, and so
    the last bits, depend on it), but no more than this machine's CPUs unless P2P_ALLOW_LARGE is set.
    """
    import torch

    _check_model(recipe, editor)
    pipe = editor.pipe
    previous = pipe.scheduler, torch.get_num_threads()
    try:
        pipe.scheduler = _scheduler_for(pipe, recipe)
        if recipe.threads and pipe.device.type == "cpu":
            torch.set_num_threads(_replay_threads(recipe.threads))
        yield
    finally:
        pipe.scheduler, threads = previous
        torch.set_num_threads(threads)


def _input_image(recipe: Recipe, base_dir: Path) -> Path:
    path = Path(recipe.image["path"])
    path = path if path.is_absolute() else base_dir / path
    try:
        found = path.is_file()
    except OSError as error:  # a name too long, say
        raise RecipeError(f"the recipe's input image path is unusable: {error.strerror}") from None
    if not found:
        if path.exists():  # a folder, a pipe or a device: reading it would fail, or never end
            raise RecipeError(f"the recipe's input image {str(path)!r} is not a regular file (a folder, a pipe or a "
                              "device); point the recipe at the image file")
        raise RecipeError(f"the recipe's input image {str(path)!r} is missing; put it back to replay this edit")
    if file_digest(path) != recipe.image["sha256"]:
        raise RecipeError(f"the input image {str(path)!r} has changed since the recipe was written")
    return path


def prepare_recipe(recipe: Recipe, editor: Editor, *, base_dir: str | Path = ".", sources: SourceStore | None = None,
                   progress: bool = True) -> PreparedRun:
    """The recipe's run on `editor` (its model must be the recipe's), built by `Editor.prepare` from the recipe's
    fields. Call it inside `replaying(recipe, editor)`, and run the result there.

    A real input image is inverted first (a relative path counts from `base_dir`; `progress` shows the inversion's
    bar), and a recipe with `cached_source` gets its source cached, as it was made (a cached run and a fresh one
    agree to float precision, not always to the last bit). With `sources`, the inversion and the cached source are
    taken from there when another recipe of the same source made them, and kept there otherwise. Before either
    spends compute, the edits' words are checked against their prompts.

    Example:
        >>> with replaying(recipe, editor):  # doctest: +SKIP
        ...     result = editor.run(prepare_recipe(recipe, editor), output_type="np")
    """
    _check_model(recipe, editor)
    edits = build_edits(recipe)
    length = {} if recipe.max_sequence_length is None else {"max_sequence_length": recipe.max_sequence_length}
    settings: dict[str, Any] = {"num_inference_steps": recipe.num_inference_steps,
                                "guidance_scale": recipe.guidance_scale, "height": recipe.height,
                                "width": recipe.width, **length}
    source = {"seed": recipe.seed, "negative_prompt": recipe.negative_prompt,
              "record_attention": recipe.record_attention}
    if recipe.image is not None or recipe.cached_source:
        check_edit_words(recipe.source, edits)
    if recipe.image is not None:  # the inversion brings the steps, guidance, size and text length
        settings = {"inversion": _inversion(recipe, editor, settings, Path(base_dir), sources, progress)}
    if recipe.cached_source:
        def make():
            return editor.cache_source(recipe.source, **source, **settings)

        cache = make() if sources is None else sources.get_or_make(("source", source_key(recipe)), make)
        return editor.prepare(recipe.source, edits, cache=cache, record_attention=recipe.record_attention, **length)
    return editor.prepare(recipe.source, edits, **source, **settings)


def _inversion(recipe: Recipe, editor: Editor, settings: dict[str, Any], base_dir: Path,
               sources: SourceStore | None, progress: bool):
    """The inversion of the recipe's image at `settings`, or, with `sources`, the one another recipe of the same
    source made (else made and kept there)."""
    image = _input_image(recipe, base_dir)

    def invert():
        return editor.invert(image, recipe.source, **settings, **(recipe.inversion or {}), progress=progress)

    key = ("inversion", recipe.model, recipe.revision, recipe.image["sha256"], recipe.source,
           json.dumps(recipe.inversion, sort_keys=True), *settings.values(), json.dumps(recipe.scheduler))
    return invert() if sources is None else sources.get_or_make(key, invert)


def run_recipe(recipe: Recipe, editor: Editor, *, base_dir: str | Path = ".", sources: SourceStore | None = None,
               progress: bool = True, output_type: str = "pil") -> EditResult:
    """Regenerate a recipe's result with `editor` (its model must be the recipe's): `prepare_recipe`, then
    `Editor.run`, both inside `replaying`.

    See `prepare_recipe` for `base_dir`, `sources` and `progress`; `output_type` is `Editor.run`'s. The scheduler
    and the edits' words are checked before any compute (RecipeError, a ValueError); a result with NaN or infinite
    values raises RuntimeError (the engine's `images.check_finite_images`).
    """
    with replaying(recipe, editor):
        run = prepare_recipe(recipe, editor, base_dir=base_dir, sources=sources, progress=progress)
        return editor.run(run, output_type=output_type)
