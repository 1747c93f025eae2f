"""The shapes benchmark's stand-in for the CLIP score: did the edited image gain the attribute its caption names?

The demo world's scene parser (`prompt2prompt.demo.parse`) reads the edited image at the model's size; the
captions, in the world's fixed grammar, say what changed between the source and the edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..demo import parse as parser
from ..demo import world
from .pie import Entry

__all__ = ["CaptionScene", "attribute_success", "caption_scene"]

_OBJECT = re.compile(r"a (small|big) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)")
_BACKGROUND = re.compile(r" on a (\w+)( gradient)? background$")


@dataclass(frozen=True)
class CaptionScene:
    """What a shapes-world caption says: its objects as (size, colour, shape, position) and its background."""

    objects: tuple[tuple[str, str, str, str], ...]
    background: str
    gradient: bool


def caption_scene(caption: str) -> CaptionScene:
    """The scene a shapes-world caption describes.

    >>> caption_scene("a big red circle on the left on a white gradient background")
    CaptionScene(objects=(('big', 'red', 'circle', 'left'),), background='white', gradient=True)
    """
    background = _BACKGROUND.search(caption)
    positions = {phrase: name for name, phrase in world.POSITION_PHRASES.items()}
    objects = tuple((size, color, shape, positions[where]) for size, color, shape, where in _OBJECT.findall(caption))
    if background is None or not objects:
        raise ValueError(f"{caption!r} is not a shapes-world caption")
    return CaptionScene(objects, background.group(1), background.group(2) is not None)


def attribute_success(entry: Entry, image: np.ndarray) -> dict[str, float]:
    """{"success": 1.0 or 0.0}: whether the edit at the model's size shows what its caption changed.

    A background swap: the parsed background is the new one. A removed object: no object of its colour is left.
    A changed object: an object of its colour is there, with its shape where the shape changed. An added object:
    an object of its colour and shape, apart from every other object (not touching it), and each object the
    source had is still there with its colour and shape: one figure that merely took on the new colour, or
    the old object turned into the new one, is not an addition.
    """
    before, after = caption_scene(entry.original_prompt), caption_scene(entry.editing_prompt)
    seen = parser.parse(image)
    if before.background != after.background:
        return {"success": float(seen.background == after.background)}
    removed = [o for o in before.objects if o[1] not in {a[1] for a in after.objects}]
    ok = all(seen.find(color) is None for _, color, _, _ in removed)
    added = len(after.objects) > len(before.objects)
    for i, (size, color, shape, position) in enumerate(after.objects):
        unchanged = i < len(before.objects) and before.objects[i] == (size, color, shape, position)
        if unchanged and not added:
            continue
        found = seen.find(color)
        shape_changed = i < len(before.objects) and before.objects[i][2] != shape
        ok = ok and found is not None and (not (added or shape_changed) or found.shape == shape)
        if ok and i >= len(before.objects):  # the added object: a figure of its own
            ok = not any(_touching(found.mask, other.mask) for other in seen.objects if other is not found)
    return {"success": float(ok)}


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (64, 64) masks overlap or share an edge or a corner: parts of one figure, not two objects."""
    grown = np.pad(a, 1)
    grown = np.logical_or.reduce([grown[1 + dy:1 + dy + a.shape[0], 1 + dx:1 + dx + a.shape[1]]
                                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return bool((grown & b).any())
