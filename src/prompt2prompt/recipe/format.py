"""The recipe format: the `Recipe` dataclass, its JSON form and the checks of every field.

A recipe read from a PNG is untrusted input: `Recipe.from_json` checks the type and range of every field before any
model loads, naming the first bad field and what it may be in one line (a `RecipeError`). The value checks and
bounds themselves are `prompt2prompt.limits`'; here they are applied to a recipe's fields, and their ValueErrors
become RecipeErrors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..edits import Edit, edit_from_dict
from ..families import FAMILIES, family_named, inversion_methods
from ..limits import (MAX_EDITS, MAX_INNER_STEPS, MAX_SIDE, MAX_STEPS, MAX_THREADS, MAX_TRAIN_TIMESTEPS, bound,
                      check_guidance, check_int, check_seed, check_side, is_finite_number, is_int, quoted)
from ..loading import parse_dtype

__all__ = ["EDIT_FIELDS", "FORMAT", "INVERSION_OPTIONS", "KINDS", "Recipe", "RecipeError", "build_edits", "check_edits",
           "check_inversion", "package_version"]

FORMAT = 1
KINDS = ("edit", "attention")
EDIT_FIELDS = ("prompt", "mode", "cross_steps", "self_steps", "weights", "blend")  # `prompt2prompt.edits`
INVERSION_OPTIONS = ("method", "fit", "num_inner_steps", "early_stop_epsilon")  # keyword arguments of `invert()`
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RecipeError(ValueError):
    """A recipe that cannot be read or replayed; the message names the field and what it may be."""


@contextlib.contextmanager
def _as_recipe_error() -> Iterator[None]:
    """A ValueError of the block (a check of `limits`) raised again as a RecipeError, with its message."""
    try:
        yield
    except RecipeError:
        raise
    except ValueError as error:
        raise RecipeError(str(error)) from None


def check_inversion(spec: Any) -> dict[str, Any]:
    """Keyword arguments of `invert()` as a recipe or a manifest holds them: known keys, each in its range.

    >>> check_inversion({"method": "direct", "fit": "pad"})
    {'method': 'direct', 'fit': 'pad'}
    """
    if not isinstance(spec, dict):
        raise RecipeError(f"inversion must be an object with {', '.join(INVERSION_OPTIONS)}, not {quoted(spec)}")
    if unknown := sorted(set(spec) - set(INVERSION_OPTIONS)):
        raise RecipeError(f"inversion has unknown fields {quoted(unknown)}; the fields are "
                          f"{', '.join(INVERSION_OPTIONS)}")
    methods = inversion_methods()  # which apply depends on the model: invert() checks
    if spec.get("method", "null-text") not in methods:
        raise RecipeError(f"inversion method {quoted(spec['method'])} is not one of {', '.join(methods)}")
    if spec.get("fit", "crop") not in ("crop", "pad"):
        raise RecipeError(f"inversion fit must be 'crop' or 'pad', not {quoted(spec['fit'])}")
    if "num_inner_steps" in spec:
        with _as_recipe_error():
            check_int(spec["num_inner_steps"], "inversion num_inner_steps", 0, MAX_INNER_STEPS)
    epsilon = spec.get("early_stop_epsilon", 0.0)
    if not is_finite_number(epsilon) or epsilon < 0:
        raise RecipeError(f"inversion early_stop_epsilon must be a finite number >= 0, not {quoted(epsilon)}")
    return spec


def _check_edit(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise RecipeError(f"{where} must be an object with {', '.join(EDIT_FIELDS)}, not {quoted(spec)}")
    if unknown := sorted(set(spec) - set(EDIT_FIELDS)):
        raise RecipeError(f"{where} has unknown fields {quoted(unknown)}; the fields are {', '.join(EDIT_FIELDS)}")
    if "prompt" not in spec:
        raise RecipeError(f"{where} has no 'prompt'")
    weights = spec.get("weights")
    if weights is not None and not (isinstance(weights, list) and all(
            isinstance(pair, list) and len(pair) == 2 and (isinstance(pair[0], str) or is_int(pair[0]))
            for pair in weights)):
        raise RecipeError(f"{where}: weights must be a list of [word or position, weight] pairs, not {quoted(weights)}")
    blend = spec.get("blend")
    if blend is not None and (not isinstance(blend, dict) or not {"source_words", "edit_words"} <= set(blend)):
        raise RecipeError(f"{where}: blend must be an object with source_words and edit_words (and the other "
                          f"LocalBlend options), not {quoted(blend)}")
    try:
        edit_from_dict(spec)  # the Edit and LocalBlend checks: windows, weights, words, thresholds
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {error}") from None


def check_edits(edits: Any, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Edits in the form of `prompt2prompt.edits`: a list of at most MAX_EDITS dicts, each a valid `Edit`.

    >>> check_edits([{"prompt": "a dog", "cross_steps": [0.2, 0.9]}])
    [{'prompt': 'a dog', 'cross_steps': [0.2, 0.9]}]
    >>> check_edits([{"prompt": "a dog", "self_steps": 1.5}])
    Traceback (most recent call last):
    ...
    prompt2prompt.recipe.format.RecipeError: edit 1: self_steps 1.5 has values outside [0, 1]; windows are fractions ...
    """
    top, hint = bound(MAX_EDITS)
    if not isinstance(edits, list) or not (allow_empty or edits) or len(edits) > top:
        span = f" of at most {MAX_EDITS}{hint}" if top < math.inf else ""
        kind = "list" if allow_empty else "non-empty list"
        raise RecipeError(f"edits must be a {kind} of edits{span}, not {quoted(edits)}")
    for index, spec in enumerate(edits, 1):
        _check_edit(spec, f"edit {index}")
    return edits


def _check_text(value: Any, name: str, *, optional: bool = False, empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not (empty or value.strip()):
        raise RecipeError(f"{name} must be a {'' if empty else 'non-empty '}string{' or null' if optional else ''}, "
                          f"not {quoted(value)}")


def _check_scheduler(config: Any) -> None:
    """A scheduler's configuration, by type and size; replay checks its class against the pipeline."""
    if not isinstance(config, dict):
        raise RecipeError(f"scheduler must be an object (a diffusers scheduler configuration), not {quoted(config)}")
    if not config:
        return  # the pipeline's own
    _check_text(config.get("_class_name"), "scheduler _class_name")
    for key, value in config.items():
        if is_int(value):
            check_int(abs(value), f"scheduler {quoted(key)} (in absolute value)", 0, MAX_TRAIN_TIMESTEPS)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"scheduler {quoted(key)} must be a finite number, not {quoted(value)}")
        elif isinstance(value, list):
            check_int(len(value), f"the length of scheduler {quoted(key)}", 0, MAX_TRAIN_TIMESTEPS)


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
    `blend` as the keyword arguments of `LocalBlend`): the form of `prompt2prompt.edits`. `kind` is "edit", or
    "attention" for the heatmaps of `record_attention`. `image` ({"path", "sha256"}, a relative path counting from
    the PNG's folder) is a real image inverted with `invert()`'s keyword arguments `inversion`; its edits take no
    seed. `image_index` says which result image a PNG holds (0 the source), None for a grid.
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
    family: str = "unet"  # the model family the recipe was made on (`prompt2prompt.families`)
    max_sequence_length: int | None = None  # the T5 length of a run whose family has one (None: a UNet's)
    package_version: str = field(default_factory=package_version)
    format: int = FORMAT

    def to_json(self) -> str:
        """The recipe as one line of JSON."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Parse and validate a recipe, naming what is missing, unknown or out of range (see `validate`)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            if "integer string conversion" in str(error):  # Python's own advice (raise a global limit) is not ours
                raise RecipeError("the recipe holds an integer of more than 4300 digits, which no field takes") from None
            raise RecipeError(f"the recipe is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"the recipe is a JSON {type(data).__name__}, not an object")
        if "format" not in data:
            raise RecipeError(f"the recipe lacks the field 'format' ({FORMAT} in every recipe p2p writes): it is not "
                              "a prompt2prompt recipe, or was cut")
        if not is_int(data["format"]) or data["format"] != FORMAT:
            raise RecipeError(f"recipe format {quoted(data.get('format'))} is not {FORMAT}; replay it with the "
                              f"prompt2prompt version that wrote it ({quoted(data.get('package_version', 'unknown'))})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if unknown := sorted(set(data) - names):
            raise RecipeError(f"the recipe has unknown fields {quoted(unknown)}")
        if missing := sorted(required - set(data)):
            raise RecipeError(f"the recipe lacks the fields {missing}")
        return cls(**data).validate()

    def validate(self) -> Recipe:
        """Check the type and range of every field, before any model loads; returns the recipe.

        Raises RecipeError naming the first bad field and what it may be. The words of the edits are checked
        against the prompts later, by replay, before any compute.
        """
        with _as_recipe_error():
            _check_text(self.source, "source")
            check_edits(self.edits, allow_empty=True)
            check_seed(self.seed)
            check_int(self.num_inference_steps, "num_inference_steps", 1, MAX_STEPS)
            check_guidance(self.guidance_scale)
            _check_text(self.model, "model")
            _check_text(self.revision, "revision", optional=True)
            _check_scheduler(self.scheduler)
            _check_text(self.negative_prompt, "negative_prompt", optional=True, empty=True)
            check_side(self.height, "height")
            check_side(self.width, "width")
            self._check_settings()
            self._check_image()
            self._check_output()
        return self

    def _check_settings(self) -> None:
        try:
            if not isinstance(self.dtype, str):
                raise ValueError(f"not {quoted(self.dtype)}")
            parse_dtype(self.dtype, "cpu")
        except ValueError as error:
            raise RecipeError(f"dtype must name a torch floating-point dtype (float32, float16, bfloat16): "
                              f"{error}") from None
        _check_text(self.device, "device")
        if self.threads is not None:
            check_int(self.threads, "threads", 1, MAX_THREADS)
        if not isinstance(self.cached_source, bool):
            raise RecipeError(f"cached_source must be true or false, not {quoted(self.cached_source)}")
        names = [family.name for family in FAMILIES]
        if self.family not in names:
            raise RecipeError(f"family must be one of {', '.join(names)}, not {quoted(self.family)}")
        family = family_named(self.family)
        if not family.takes_max_sequence_length:
            if self.max_sequence_length is not None:
                raise RecipeError(f"max_sequence_length is a T5 length: a {self.family} recipe has none (null)")
        else:
            check_int(self.max_sequence_length, "max_sequence_length", 1, family.max_text_length)
        _check_text(self.package_version, "package_version")

    def _check_image(self) -> None:
        if self.image is None:
            if self.inversion is not None:
                raise RecipeError("the recipe's inversion needs an image to invert, and the recipe has none")
            if self.seed is None:  # a random seed would replay as another picture, and record null again
                raise RecipeError("a recipe without an image needs a seed (an integer): the seed is what makes the "
                                  "generated picture the same on every replay")
            return
        if not isinstance(self.image, dict) or set(self.image) != {"path", "sha256"}:
            raise RecipeError(f"image must be an object with path and sha256, not {quoted(self.image)}")
        _check_text(self.image["path"], "image path")
        if "\0" in self.image["path"]:
            raise RecipeError(f"image path {quoted(self.image['path'])} holds a NUL character")
        if not isinstance(self.image["sha256"], str) or not _SHA256.fullmatch(self.image["sha256"]):
            raise RecipeError(f"image sha256 must be 64 lowercase hex digits, not {quoted(self.image['sha256'])}")
        if self.seed is not None:
            raise RecipeError("a recipe with an image takes no seed: the inversion supplies the initial latent")
        check_inversion(self.inversion or {})

    def _check_output(self) -> None:
        if self.kind not in KINDS:
            raise RecipeError(f"kind must be one of {', '.join(KINDS)}, not {quoted(self.kind)}")
        if not isinstance(self.record_attention, bool):
            check_int(self.record_attention, "record_attention (a layer side, or true/false)", 1, MAX_SIDE)
        if self.kind == "attention" and (self.edits or self.record_attention is False):
            raise RecipeError("an attention recipe records attention (record_attention true or a side) and has no "
                              "edits")
        if self.kind == "edit" and not self.edits:
            raise RecipeError("edits is empty: an edit recipe holds at least one edit (only an attention recipe, kind "
                              "'attention', has none)")
        images = 1 if self.kind == "attention" else 1 + len(self.edits)  # and the grid, index None
        if self.image_index is not None and (not is_int(self.image_index) or not 0 <= self.image_index < images):
            raise RecipeError(f"image_index must be null (the grid) or an index from 0 to {images - 1} of the "
                              f"{images} image(s) of this recipe, not {quoted(self.image_index)}")

    def with_index(self, index: int | None) -> Recipe:
        """The same recipe for another image of the result."""
        return dataclasses.replace(self, image_index=index)


def build_edits(recipe: Recipe) -> list[Edit]:
    """The `prompt2prompt.Edit` objects a recipe describes."""
    return [edit_from_dict(spec) for spec in recipe.edits]
