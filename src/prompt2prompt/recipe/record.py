"""Recording a run as a recipe: `recipe_for` takes the model, scheduler, dtype and device from the editor, and writes
the model's defaults for whatever the caller left out into the recipe, so that a replay needs no defaults."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .format import Recipe, RecipeError

if TYPE_CHECKING:
    from ..engine import Editor
    from ..loading import Checkpoint

__all__ = ["recipe_for", "scheduler_config"]


def scheduler_config(scheduler) -> dict[str, Any]:
    """A scheduler's class and configuration, as JSON-able data that `from_config` takes back."""
    return json.loads(scheduler.to_json_string())


def recipe_for(editor: Editor, model: Checkpoint, *, used: list[str] | None = None, **fields: Any) -> Recipe:
    """A recipe for a run of `editor`, whose pipeline was loaded from `model` (a `loading.Checkpoint`).

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
