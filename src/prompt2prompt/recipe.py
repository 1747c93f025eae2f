"""Recipes: everything needed to regenerate a result, stored as JSON in a text chunk of every PNG we write.

A recipe holds the prompts, the edits, the seed, steps, guidance, the scheduler with its configuration, the
model id and revision, the dtype and the package version. `run_recipe` regenerates its images; on the same
device and dtype they are identical, bit for bit.

A PNG can come from anyone, so a recipe read from one is untrusted input: `Recipe.from_json` checks the type
and range of every field before any model loads, and `run_recipe` takes the recipe's scheduler only from the
pipeline's compatible ones. The `MAX_*` bounds (shared with batch manifests) keep a crafted recipe from running
for days or filling the memory; the environment variable `P2P_ALLOW_LARGE=1` lifts them for a real need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from .files import write_atomic
from .edits import edit_from_dict
from .images import metadata_too_large
from .families import FAMILIES, family_named, inversion_methods
from .limits import ALLOW_LARGE, MAX_GUIDANCE, MAX_INNER_STEPS, MAX_STEPS, allow_large, is_finite_number
from .loading import library_logs, parse_dtype

if TYPE_CHECKING:
    from .engine import SourceStore

__all__ = ["A1111_SAMPLERS", "ALLOW_LARGE", "EDIT_FIELDS", "GRID_TILE", "INVERSION_OPTIONS", "MAX_EDITS",
           "MAX_GUIDANCE", "MAX_INNER_STEPS", "MAX_INPUT_BYTES", "MAX_SIDE", "MAX_STEPS", "MAX_THREADS",
           "MAX_TRAIN_TIMESTEPS", "PARAMETERS_KEY", "RECIPE_KEY", "Recipe", "RecipeError", "a1111_parameters",
           "allow_large", "build_edits", "check_edits", "check_finite", "check_guidance", "check_int",
           "check_inversion", "check_seed", "check_side", "edit_label", "file_digest", "grid_labels", "inversion_available",
           "package_version", "read_recipe", "recipe_for", "run_recipe", "save_grid", "save_png", "save_result",
           "scheduler_config"]

RECIPE_KEY = "prompt2prompt"
FORMAT = 1
KINDS = ("edit", "attention")
EDIT_FIELDS = ("prompt", "mode", "cross_steps", "self_steps", "weights", "blend")  # `prompt2prompt.edits`
INVERSION_OPTIONS = ("method", "fit", "num_inner_steps", "early_stop_epsilon")  # keyword arguments of `invert()`

# Upper bounds of what a recipe or a manifest line may ask for; P2P_ALLOW_LARGE=1 in the environment lifts them.
MAX_SIDE = 4096  # px, 4x SDXL's 1024
MAX_EDITS = 64  # edits of one source: each is one more row of every forward batch
MAX_THREADS = 256  # torch CPU threads; a replay runs on no more than this machine's CPUs (see run_recipe)
MAX_INPUT_BYTES = 256 * 2**20  # an input image file: a 20k x 20k 16-bit PNG is well under this
MAX_TRAIN_TIMESTEPS = 10_000  # any integer and list length of a scheduler's configuration (SD: 1000 timesteps)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RecipeError(ValueError):
    """A recipe that cannot be read or replayed; the message names the field and what it may be."""


def _show(value: Any) -> str:
    """A value as an error message quotes it: its repr, on one line, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _upper(bound: float) -> tuple[float, str]:
    """The bound in force and how a message says so."""
    if allow_large():
        return math.inf, ""
    return bound, f" (set {ALLOW_LARGE}=1 for more)"


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """`value` if it is an integer from `low` to `high` (lifted by P2P_ALLOW_LARGE), else a RecipeError.

    >>> check_int(50, "num_inference_steps", 1, 1000)
    50
    >>> check_int(5000, "num_inference_steps", 1, 1000)
    Traceback (most recent call last):
    ...
    prompt2prompt.recipe.RecipeError: num_inference_steps must be an integer from 1 to 1000 (...), not 5000
    """
    top, hint = _upper(high)
    if not _is_int(value) or not low <= value <= top:
        span = f"from {low} to {high}{hint}" if top < math.inf else f"of at least {low}"
        raise RecipeError(f"{name} must be an integer {span}, not {_show(value)}")
    return value


def check_seed(value: Any) -> int | None:
    """A seed: None, or an integer in [0, 2**63), torch's range."""
    if value is not None and (not _is_int(value) or not 0 <= value < 2**63):
        raise RecipeError(f"seed must be a non-negative integer below 2**63 (or null), not {_show(value)}")
    return value


def check_guidance(value: Any) -> float:
    """A guidance scale: a finite number, at most MAX_GUIDANCE either way (lifted by P2P_ALLOW_LARGE)."""
    top, hint = _upper(MAX_GUIDANCE)
    if not is_finite_number(value) or abs(value) > top:
        span = f" from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}{hint}" if top < math.inf else ""
        raise RecipeError(f"guidance_scale must be a finite number{span}, not {_show(value)}")
    return float(value)


def check_side(value: Any, name: str) -> int | None:
    """An image side: None (the model's) or a positive multiple of 8 px up to MAX_SIDE (lifted by P2P_ALLOW_LARGE)."""
    top, hint = _upper(MAX_SIDE)
    if value is not None and (not _is_int(value) or value <= 0 or value % 8 or value > top):
        span = f" up to {MAX_SIDE}{hint}" if top < math.inf else ""
        raise RecipeError(f"{name} must be a positive multiple of 8 px{span}, or null, not {_show(value)}")
    return value


def check_inversion(spec: Any) -> dict[str, Any]:
    """Keyword arguments of `invert()` as a recipe or a manifest holds them: known keys, each in its range."""
    if not isinstance(spec, dict):
        raise RecipeError(f"inversion must be an object with {', '.join(INVERSION_OPTIONS)}, not {_show(spec)}")
    if unknown := sorted(set(spec) - set(INVERSION_OPTIONS)):
        raise RecipeError(f"inversion has unknown fields {_show(unknown)}; the fields are "
                          f"{', '.join(INVERSION_OPTIONS)}")
    methods = inversion_methods()  # which apply depends on the model: invert() checks
    if spec.get("method", "null-text") not in methods:
        raise RecipeError(f"inversion method {_show(spec['method'])} is not one of {', '.join(methods)}")
    if spec.get("fit", "crop") not in ("crop", "pad"):
        raise RecipeError(f"inversion fit must be 'crop' or 'pad', not {_show(spec['fit'])}")
    if "num_inner_steps" in spec:
        check_int(spec["num_inner_steps"], "inversion num_inner_steps", 0, MAX_INNER_STEPS)
    epsilon = spec.get("early_stop_epsilon", 0.0)
    if not is_finite_number(epsilon) or epsilon < 0:
        raise RecipeError(f"inversion early_stop_epsilon must be a finite number >= 0, not {_show(epsilon)}")
    return spec


def _check_edit(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise RecipeError(f"{where} must be an object with {', '.join(EDIT_FIELDS)}, not {_show(spec)}")
    if unknown := sorted(set(spec) - set(EDIT_FIELDS)):
        raise RecipeError(f"{where} has unknown fields {_show(unknown)}; the fields are {', '.join(EDIT_FIELDS)}")
    if "prompt" not in spec:
        raise RecipeError(f"{where} has no 'prompt'")
    weights = spec.get("weights")
    if weights is not None and not (isinstance(weights, list) and all(
            isinstance(pair, list) and len(pair) == 2 and (isinstance(pair[0], str) or _is_int(pair[0]))
            for pair in weights)):
        raise RecipeError(f"{where}: weights must be a list of [word or position, weight] pairs, not {_show(weights)}")
    blend = spec.get("blend")
    if blend is not None and (not isinstance(blend, dict) or not {"source_words", "edit_words"} <= set(blend)):
        raise RecipeError(f"{where}: blend must be an object with source_words and edit_words (and the other "
                          f"LocalBlend options), not {_show(blend)}")
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
    prompt2prompt.recipe.RecipeError: edit 1: self_steps 1.5 has values outside [0, 1]; windows are fractions of the run
    """
    top, hint = _upper(MAX_EDITS)
    if not isinstance(edits, list) or not (allow_empty or edits) or len(edits) > top:
        span = f" of at most {MAX_EDITS}{hint}" if top < math.inf else ""
        kind = "list" if allow_empty else "non-empty list"
        raise RecipeError(f"edits must be a {kind} of edits{span}, not {_show(edits)}")
    for index, spec in enumerate(edits, 1):
        _check_edit(spec, f"edit {index}")
    return edits


def _check_text(value: Any, name: str, *, optional: bool = False, empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not (empty or value.strip()):
        raise RecipeError(f"{name} must be a {'' if empty else 'non-empty '}string{' or null' if optional else ''}, "
                          f"not {_show(value)}")


def _check_scheduler(config: Any) -> None:
    """A scheduler's configuration, by type and size; `_scheduler_for` checks its class against the pipeline."""
    if not isinstance(config, dict):
        raise RecipeError(f"scheduler must be an object (a diffusers scheduler configuration), not {_show(config)}")
    if not config:
        return  # the pipeline's own
    _check_text(config.get("_class_name"), "scheduler _class_name")
    for key, value in config.items():
        if _is_int(value):
            check_int(abs(value), f"scheduler {_show(key)} (in absolute value)", 0, MAX_TRAIN_TIMESTEPS)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"scheduler {_show(key)} must be a finite number, not {_show(value)}")
        elif isinstance(value, list):
            check_int(len(value), f"the length of scheduler {_show(key)}", 0, MAX_TRAIN_TIMESTEPS)


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
    `blend` as the keyword arguments of `LocalBlend`): the form of `prompt2prompt.edits`. `kind` is "edit", or "attention" for the heatmaps of
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
    family: str = "unet"  # the model family the recipe was made on: unet, sd3 or flux
    max_sequence_length: int | None = None  # the T5 length of an sd3 or flux run (None: unet)
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
        if not _is_int(data["format"]) or data["format"] != FORMAT:
            raise RecipeError(f"recipe format {_show(data.get('format'))} is not {FORMAT}; replay it with the "
                              f"prompt2prompt version that wrote it ({_show(data.get('package_version', 'unknown'))})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if unknown := sorted(set(data) - names):
            raise RecipeError(f"the recipe has unknown fields {_show(unknown)}")
        if missing := sorted(required - set(data)):
            raise RecipeError(f"the recipe lacks the fields {missing}")
        return cls(**data).validate()

    def validate(self) -> Recipe:
        """Check the type and range of every field, before any model loads; returns the recipe.

        Raises RecipeError naming the first bad field and what it may be. The words of the edits are checked
        against the prompts later, by `Editor.prepare`, before any compute.
        """
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
                raise ValueError(f"not {_show(self.dtype)}")
            parse_dtype(self.dtype, "cpu")
        except ValueError as error:
            raise RecipeError(f"dtype must name a torch floating-point dtype (float32, float16, bfloat16): "
                              f"{error}") from None
        _check_text(self.device, "device")
        if self.threads is not None:
            check_int(self.threads, "threads", 1, MAX_THREADS)
        if not isinstance(self.cached_source, bool):
            raise RecipeError(f"cached_source must be true or false, not {_show(self.cached_source)}")
        names = [family.name for family in FAMILIES]
        if self.family not in names:
            raise RecipeError(f"family must be one of {', '.join(names)}, not {_show(self.family)}")
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
            raise RecipeError(f"image must be an object with path and sha256, not {_show(self.image)}")
        _check_text(self.image["path"], "image path")
        if "\0" in self.image["path"]:
            raise RecipeError(f"image path {_show(self.image['path'])} holds a NUL character")
        if not isinstance(self.image["sha256"], str) or not _SHA256.fullmatch(self.image["sha256"]):
            raise RecipeError(f"image sha256 must be 64 lowercase hex digits, not {_show(self.image['sha256'])}")
        if self.seed is not None:
            raise RecipeError("a recipe with an image takes no seed: the inversion supplies the initial latent")
        check_inversion(self.inversion or {})

    def _check_output(self) -> None:
        if self.kind not in KINDS:
            raise RecipeError(f"kind must be one of {', '.join(KINDS)}, not {_show(self.kind)}")
        if not isinstance(self.record_attention, bool):
            check_int(self.record_attention, "record_attention (a layer side, or true/false)", 1, MAX_SIDE)
        if self.kind == "attention" and (self.edits or self.record_attention is False):
            raise RecipeError("an attention recipe records attention (record_attention true or a side) and has no "
                              "edits")
        if self.kind == "edit" and not self.edits:
            raise RecipeError("edits is empty: an edit recipe holds at least one edit (only an attention recipe, kind "
                              "'attention', has none)")
        images = 1 if self.kind == "attention" else 1 + len(self.edits)  # and the grid, index None
        if self.image_index is not None and (not _is_int(self.image_index) or not 0 <= self.image_index < images):
            raise RecipeError(f"image_index must be null (the grid) or an index from 0 to {images - 1} of the "
                              f"{images} image(s) of this recipe, not {_show(self.image_index)}")

    def with_index(self, index: int | None) -> Recipe:
        """The same recipe for another image of the result."""
        return dataclasses.replace(self, image_index=index)


def build_edits(recipe: Recipe) -> list:
    """The `prompt2prompt.Edit` objects a recipe describes."""
    return [edit_from_dict(spec) for spec in recipe.edits]


def _scheduler_for(pipe, recipe: Recipe):
    """The recipe's scheduler, if the pipeline lists its class as compatible, built and set up before any compute."""
    if not recipe.scheduler:
        return pipe.scheduler
    name = recipe.scheduler["_class_name"]
    compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
    if name not in compatible:
        raise RecipeError(f"the recipe's scheduler {_show(name)} is not one that this pipeline takes; the compatible "
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
                          f"{_show(str(error))}") from None


def scheduler_config(scheduler) -> dict[str, Any]:
    """A scheduler's class and configuration, as JSON-able data that `from_config` takes back."""
    return json.loads(scheduler.to_json_string())


def recipe_for(editor, model, *, used: list[str] | None = None, **fields: Any) -> Recipe:
    """A recipe for a run of `editor`, whose pipeline was loaded from `model` (a `loading.ModelSource`).

    The model id and revision, the scheduler, the dtype and the device come from them; `fields` give the rest.
    What `fields` leave out (None, or an edit without windows, a blend without a threshold) is the model's default
    (`editor.defaults`), written into the recipe so that a replay needs no defaults; `used`, if given, gains one
    line per default taken, saying where it came from.
    """
    import torch

    pipe, family = editor.pipe, editor.family
    threads = torch.get_num_threads() if pipe.device.type == "cpu" else None
    if not family.takes_max_sequence_length and fields.get("max_sequence_length") is not None:
        raise RecipeError(f"max_sequence_length is a T5 length, which {type(pipe).__name__} has not")
    if family.takes_max_sequence_length:
        length = fields.get("max_sequence_length")
        fields["max_sequence_length"] = family.max_sequence_length({} if length is None else {"max_sequence_length": length})
    if fields.get("image") is not None and "method" not in (fields.get("inversion") or {}):
        fields["inversion"] = {"method": family.default_inversion, **(fields.get("inversion") or {})}
    defaults, notes = editor.defaults, [] if used is None else used
    by_origin: dict[str, list[str]] = {}
    for name, shown in (("num_inference_steps", "{:g} steps"), ("guidance_scale", "guidance {:g}")):
        if fields.get(name) is None:
            fields[name] = getattr(defaults, name)
            by_origin.setdefault(defaults.origin.get(name, ""), []).append(shown.format(fields[name]))
    notes.extend(f"{', '.join(values)} ({origin})" for origin, values in by_origin.items())
    if fields.get("edits"):
        fields["edits"] = [_edit_defaults(spec, fields.get("source", ""), defaults, i, notes)
                           for i, spec in enumerate(fields["edits"], 1)]
    return Recipe(model=model.id, revision=model.revision, scheduler=scheduler_config(pipe.scheduler),
                  dtype=str(family.model.dtype).removeprefix("torch."), device=pipe.device.type, threads=threads,
                  family=family.name, **fields)


def _edit_defaults(spec: Any, source: str, defaults, index: int, notes: list[str]) -> Any:
    """An edit spec with its missing windows and blend threshold taken from the model's defaults."""
    if not isinstance(spec, dict):
        return spec  # Recipe.validate refuses it with its message
    spec = dict(spec)
    cross, self_steps, rule = defaults.windows_for(source, str(spec.get("prompt", "")))
    taken: dict[str, list[str]] = {}  # where from -> what

    def take(name: str, text: str) -> None:
        taken.setdefault(rule or defaults.origin.get(name, ""), []).append(text)

    if spec.get("cross_steps") is None:
        spec["cross_steps"] = cross
        take("cross_steps", f"cross {cross:g}")
    elif isinstance(spec["cross_steps"], dict) and "default" not in spec["cross_steps"]:
        spec["cross_steps"] = {"default": cross, **spec["cross_steps"]}  # the other words' window
        take("cross_steps", f"cross {cross:g} for the other words")
    if spec.get("self_steps") is None:
        spec["self_steps"] = self_steps
        take("self_steps", f"self {self_steps:g}")
    blend = spec.get("blend")
    if isinstance(blend, dict) and blend.get("threshold") is None:
        spec["blend"] = {**blend, "threshold": defaults.blend_threshold}
        taken.setdefault(defaults.origin.get("blend_threshold", ""), []).append(
            f"blend threshold {defaults.blend_threshold:g}")
    if taken:
        notes.append(f"edit {index}: " + "; ".join(f"{', '.join(what)} ({where})" for where, what in taken.items()))
    return spec


def inversion_available() -> bool:
    """Whether this install can invert real images (`prompt2prompt.inversion`)."""
    return importlib.util.find_spec("prompt2prompt.inversion") is not None


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
                         f"have (set {ALLOW_LARGE}=1 to go beyond)")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite(images: Any) -> None:
    """Raise RuntimeError when a result's images hold NaN or infinite values (a float16 overflow, usually).

    `images`: a float array or tensor, or a list of them or of PIL images. A PIL image can no longer hold NaN:
    diffusers turned those pixels into 0s, so an image that is black in every pixel and channel counts as NaN.
    `run_recipe` checks the float images itself, before they become PIL images.

    >>> import numpy as np
    >>> check_finite(np.full((2, 8, 8, 3), 0.5))
    >>> check_finite([np.full((8, 8, 3), np.nan)])
    Traceback (most recent call last):
    ...
    RuntimeError: the result has NaN/inf values (a float16 overflow, usually): run in float32 ...
    """
    import numpy as np
    import torch

    items = images if isinstance(images, (list, tuple)) else [images]
    for item in items:
        if isinstance(item, Image.Image):
            bad = item.mode in ("RGB", "L") and item.getbbox() is None  # every pixel 0
        elif isinstance(item, torch.Tensor):
            bad = not bool(torch.isfinite(item).all())
        else:
            array = np.asarray(item)
            bad = array.dtype.kind in "fc" and not np.isfinite(array).all()
        if bad:
            raise RuntimeError("the result has NaN/inf values (a float16 overflow, usually): run in float32 "
                               "(--dtype float32), or try another guidance scale or seed")


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


def _replay_threads(threads: int) -> int:
    """The recorded thread count, but no more than this machine's CPUs unless P2P_ALLOW_LARGE is set."""
    if allow_large():
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(threads, cpus)


def run_recipe(recipe: Recipe, editor, *, base_dir: str | Path = ".", sources: SourceStore | None = None,
               progress: bool = True, **edit_kwargs):
    """Regenerate a recipe's result with `editor` (its model must be the recipe's), with the recipe's scheduler.

    A real input image is inverted first; a relative image path counts from `base_dir`. On the CPU it runs
    on the recipe's number of threads (no more than the machine's CPUs, unless P2P_ALLOW_LARGE is set). The
    editor's pipeline gets its scheduler back afterwards, the process its thread count. A recipe with
    `cached_source` runs its edits on a cached source, as it was made (a cached run and a fresh one agree to
    float precision, not always to the last bit). With `sources`, the inversion and the cached source are taken
    from there when another recipe of the same source (everything but the edits) made them, and kept there
    otherwise: only the edits run. `progress` shows the inversion's progress bar. Extra keyword arguments go to
    `editor.edit`.

    The scheduler and the edits' words are checked before any compute (RecipeError, a ValueError); a result
    with NaN or infinite values raises RuntimeError (see `check_finite`).
    """
    import torch

    pipe = editor.pipe
    if recipe.family != editor.family.name:
        raise RecipeError(f"this recipe was made on a {recipe.family} model; {recipe.model!r} loaded as a "
                          f"{editor.family.name} one: replay it with its own model")
    output_type = edit_kwargs.pop("output_type", "pil")
    edit_kwargs["output_type"] = "np" if output_type == "pil" else output_type  # NaN shows in floats only
    previous = pipe.scheduler, torch.get_num_threads()
    settings: dict[str, Any] = dict(
        num_inference_steps=recipe.num_inference_steps, guidance_scale=recipe.guidance_scale,
        height=recipe.height, width=recipe.width,
    )
    if recipe.max_sequence_length is not None:
        settings["max_sequence_length"] = recipe.max_sequence_length
    source = dict(seed=recipe.seed, negative_prompt=recipe.negative_prompt, record_attention=recipe.record_attention)
    try:
        pipe.scheduler = _scheduler_for(pipe, recipe)
        if recipe.threads and pipe.device.type == "cpu":
            torch.set_num_threads(_replay_threads(recipe.threads))
        if recipe.image is not None or recipe.cached_source:
            # The words and windows, checked before an inversion or a source run spends any compute.
            editor.prepare(recipe.source, build_edits(recipe), **settings, negative_prompt=recipe.negative_prompt,
                           record_attention=recipe.record_attention, seed=0)
        if recipe.image is not None:
            image = _input_image(recipe, Path(base_dir))

            def invert():
                return editor.invert(image, recipe.source, **settings, **(recipe.inversion or {}), progress=progress)

            key = ("inversion", recipe.model, recipe.revision, recipe.image["sha256"], recipe.source,
                   json.dumps(recipe.inversion, sort_keys=True), *settings.values(), json.dumps(recipe.scheduler))
            settings = dict(inversion=invert() if sources is None else sources.get_or_make(key, invert))
        if recipe.cached_source:
            def make():
                return editor.cache_source(recipe.source, **source, **settings)

            cache = make() if sources is None else sources.get_or_make(("source", source_key(recipe)), make)
            length = {} if recipe.max_sequence_length is None else {"max_sequence_length": recipe.max_sequence_length}
            result = editor.edit(recipe.source, build_edits(recipe), cache=cache,
                                 record_attention=recipe.record_attention, **length, **edit_kwargs)
        else:
            result = editor.edit(recipe.source, build_edits(recipe), **source, **settings, **edit_kwargs)
    finally:
        pipe.scheduler, threads = previous
        torch.set_num_threads(threads)
    check_finite(result.images)
    if output_type == "pil":
        result = dataclasses.replace(result, images=pipe.image_processor.numpy_to_pil(result.images))
    return result


def source_key(recipe: Recipe) -> str:
    """What decides a recipe's source: everything but its edits and which image a PNG holds."""
    fields = dataclasses.asdict(recipe)
    for name in ("edits", "image_index", "kind", "package_version", "cached_source"):
        fields.pop(name)
    if recipe.image is not None:
        fields["image"] = recipe.image["sha256"]  # the same picture under another path is the same source
    return json.dumps(fields, sort_keys=True)


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
    if (recipe.kind == "edit" and isinstance(edits, list) and _is_int(index) and 0 < index <= len(edits)
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
    from .visualize import image_grid

    labels = grid_labels(recipe, range(len(images)) if indices is None else indices)
    width = images[0].width * math.ceil(GRID_TILE / images[0].width)
    grid = image_grid(images, labels, width=width)
    return save_png(grid, Path(path), recipe.with_index(None), size=images[0].size)
