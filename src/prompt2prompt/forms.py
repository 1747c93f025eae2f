"""Edits as plain data: the JSON form that recipes, manifests, the CLI and the web app write.

An edit is a dict with the keyword arguments of `Edit`: `prompt`, `mode`, `cross_steps`, `self_steps`,
`weights` as a list of [word, weight] pairs (JSON object keys are text, and a pair keeps a word position an
integer) and `blend` as the keyword arguments of `LocalBlend`, or None. JSON has no tuples, so (start, end)
windows are lists there. `edit_from_dict(edit_to_dict(edit)) == edit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .editor import Edit, LocalBlend

__all__ = ["blend_from_dict", "blend_to_dict", "edit_from_dict", "edit_to_dict"]


def _window_from_json(window: Any) -> Any:
    return tuple(window) if isinstance(window, list) else window


def _window_to_json(window: Any) -> Any:
    return list(window) if isinstance(window, tuple) else window


def _words_to_json(words: Any) -> Any:
    return words if isinstance(words, (str, int)) else list(words)


def blend_to_dict(blend: LocalBlend) -> dict[str, Any]:
    """A LocalBlend as its keyword arguments: the words always, the other options where they are not the default.

    >>> blend_to_dict(LocalBlend(["cat"], "dog", threshold=0.5))
    {'source_words': ['cat'], 'edit_words': 'dog', 'threshold': 0.5}
    """
    data: dict[str, Any] = {}
    for option in dataclasses.fields(LocalBlend):
        value = getattr(blend, option.name)
        if option.default is dataclasses.MISSING or value != option.default:
            data[option.name] = _words_to_json(value) if option.name.endswith("_words") else value
    return data


def blend_from_dict(data: Mapping[str, Any]) -> LocalBlend:
    """The LocalBlend that `data` (its keyword arguments) describes.

    >>> blend_from_dict({"source_words": ["cat"], "edit_words": ["dog"], "start": 0.3}).start
    0.3
    """
    options = dict(data)
    return LocalBlend(options.pop("source_words"), options.pop("edit_words"), **options)


def edit_to_dict(edit: Edit) -> dict[str, Any]:
    """An Edit in its JSON form, every field present.

    >>> edit_to_dict(Edit("a dog", cross_steps=(0.1, 0.9), weights={"dog": 2.0}))
    {'prompt': 'a dog', 'mode': 'auto', 'cross_steps': [0.1, 0.9], 'self_steps': 0.4, 'weights': [['dog', 2.0]], 'blend': None}
    """
    cross_steps = edit.cross_steps
    if isinstance(cross_steps, Mapping):
        cross_steps = {word: _window_to_json(window) for word, window in cross_steps.items()}
    return {
        "prompt": edit.prompt,
        "mode": edit.mode,
        "cross_steps": _window_to_json(cross_steps),
        "self_steps": _window_to_json(edit.self_steps),
        "weights": None if edit.weights is None else [[word, weight] for word, weight in edit.weights.items()],
        "blend": None if edit.blend is None else blend_to_dict(edit.blend),
    }


def edit_from_dict(data: Mapping[str, Any]) -> Edit:
    """The Edit that `data` describes; fields left out take Edit's defaults.

    >>> edit_from_dict({"prompt": "a dog", "cross_steps": {"default": 0.8, "dog": [0.2, 0.6]}}).cross_steps
    {'default': 0.8, 'dog': (0.2, 0.6)}
    """
    fields = dict(data)
    if fields.get("weights") is not None:
        fields["weights"] = {word: weight for word, weight in fields["weights"]}
    for key in ("cross_steps", "self_steps"):
        if isinstance(fields.get(key), Mapping):
            fields[key] = {word: _window_from_json(window) for word, window in fields[key].items()}
        elif key in fields:
            fields[key] = _window_from_json(fields[key])
    if fields.get("blend") is not None:
        fields["blend"] = blend_from_dict(fields["blend"])
    return Edit(fields.pop("prompt"), **fields)
