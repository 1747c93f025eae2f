"""The shapes benchmark: held-out scenes of the shapes world, written in PIE-Bench's folder layout.

`write_shapes_benchmark` writes `mapping_file.json` and `annotation_images/<type>/<id>.png` as PIE-Bench has
them, from rendered scenes (ground truth no model drew) whose captions the demo model never trained on. Each
entry is one of five edits, under PIE's editing type:

- "1" change object: the object's shape is swapped (mask: the old shape's pixels and the new one's);
- "2" add object: a second object at the opposite position (mask: the new object's pixels);
- "3" delete object: a two-object scene loses its second object (mask: that object's pixels);
- "6" change color: the object's colour is swapped (mask: the object's pixels);
- "8" change background: the background is swapped (mask: everything outside the object).

Ids are `f"{type id}{index:011d}"`, 12 digits as in PIE, `index` counting that type's entries from 0.
`blended_word` is "source target" for the words that mark the edited region in each prompt, the words
PIE's P2P protocol blends on and reweights: the colours ("red green") for a colour swap, the shapes ("circle
star") for a shape swap. It is "" where the source prompt has no word for the region (add, background) or
the edit prompt has none (delete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..demo import world
from ..files import write_atomic, write_text_atomic

__all__ = ["EDIT_TYPES", "ShapesEdit", "edit_mask", "rle_encode", "shapes_edits", "write_shapes_benchmark"]

# edit type -> (PIE editing type id, folder under annotation_images/)
EDIT_TYPES: dict[str, tuple[str, str]] = {
    "color": ("6", "6_change_color"),
    "shape": ("1", "1_change_object"),
    "background": ("8", "8_change_background"),
    "add": ("2", "2_add_object"),
    "delete": ("3", "3_delete_object"),
}
OPPOSITE = dict(world.POSITION_PAIRS)  # where an added object goes; "center" has no opposite


@dataclass(frozen=True)
class ShapesEdit:
    """One benchmark edit: the source scene, the edited scene and the PIE fields that are not images."""

    edit_type: str  # a key of EDIT_TYPES
    source: world.Scene
    target: world.Scene
    instruction: str
    blended_word: str


def rle_encode(mask: np.ndarray) -> list[int]:
    """The runs of 1 in `mask`, row-major, as PIE's flat `mask` field: [start, length, start, length, ...].

    >>> rle_encode(np.array([[0, 1, 1], [0, 0, 1]], dtype=bool))
    [1, 2, 5, 1]
    """
    flat = np.concatenate([[0], np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # alternately the start and the end of a run
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).reshape(-1).tolist()


def shapes_edits(num_scenes: int = 40, *, seed: int = 0) -> list[ShapesEdit]:
    """The benchmark's edits: entry i is of type `list(EDIT_TYPES)[i % 5]`, on a held-out scene drawn from (seed, i)."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be at least 1, got {num_scenes}")
    return [_edit(list(EDIT_TYPES)[i % len(EDIT_TYPES)], np.random.default_rng([seed, i])) for i in range(num_scenes)]


def write_shapes_benchmark(out_dir: str | Path, *, num_scenes: int = 40, seed: int = 0, size: int = 512) -> Path:
    """Writes the shapes benchmark under `out_dir` in PIE-Bench's layout and returns the mapping file's path.

    The same arguments give the same bytes. Files already there are replaced one by one (atomically);
    images of an earlier, larger run that the new mapping does not list are left in place.

    Args:
        num_scenes: entries, spread over the five edit types in turn (40: 8 of each).
        seed: draws the scenes and the edits.
        size: side of the images and masks, a multiple of 64 (512: PIE-Bench's).

    Example: `write_shapes_benchmark("shapes-bench")` -> `Path("shapes-bench/mapping_file.json")`.
    """
    if size < world.SIZE or size % world.SIZE:
        raise ValueError(f"size must be a multiple of {world.SIZE} (each scene pixel becomes a block), got {size}")
    out_dir = Path(out_dir)
    counts = dict.fromkeys(EDIT_TYPES, 0)
    mapping = {}
    for edit in shapes_edits(num_scenes, seed=seed):
        type_id, folder = EDIT_TYPES[edit.edit_type]
        entry_id = f"{type_id}{counts[edit.edit_type]:011d}"
        counts[edit.edit_type] += 1
        image_path = f"{folder}/{entry_id}.png"
        (out_dir / "annotation_images" / folder).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(_upscale(world.render(edit.source).image, size))  # (size, size, 3) uint8: RGB
        write_atomic(out_dir / "annotation_images" / image_path, lambda temporary: image.save(temporary, format="PNG"))
        original_prompt, editing_prompt = _bracket(edit.source.caption(), edit.target.caption())
        mapping[entry_id] = {
            "image_path": image_path,
            "original_prompt": original_prompt,
            "editing_prompt": editing_prompt,
            "editing_instruction": edit.instruction,
            "editing_type_id": type_id,
            "blended_word": edit.blended_word,
            "mask": rle_encode(_upscale(edit_mask(edit), size)),
        }
    # The mapping goes last, so that it never names an image not yet written.
    return write_text_atomic(out_dir / "mapping_file.json", json.dumps(dict(sorted(mapping.items()))) + "\n")


def edit_mask(edit: ShapesEdit) -> np.ndarray:
    """The (64, 64) bool region the edit changes, from the world's own masks of the source and edited renders.

    The world's masks are the pixels an object covers at least half of, so the anti-aliased rim just outside
    them changes too: a perfect edit is not quite unchanged outside the mask.
    """
    source, target = world.render(edit.source).masks, world.render(edit.target).masks
    if edit.edit_type == "color":
        return source[0]
    if edit.edit_type == "shape":
        return source[0] | target[0]
    if edit.edit_type == "background":
        return ~source[0]
    if edit.edit_type == "add":
        return target[1]
    return source[1]  # delete


def _edit(edit_type: str, rng: np.random.Generator) -> ShapesEdit:
    """One edit of `edit_type` on a held-out scene, every choice drawn from `rng`."""
    if edit_type == "delete":
        source = world.sample_scene(int(rng.integers(2**32)), num_objects=2, split="heldout")
        gone = source.objects[1]
        return ShapesEdit(edit_type, source, replace(source, objects=source.objects[:1]),
                          f"Remove the {gone.color} {gone.shape}", "")
    source = world.sample_scene(int(rng.integers(2**32)), split="heldout")
    while edit_type == "add" and source.objects[0].position not in OPPOSITE:
        source = world.sample_scene(int(rng.integers(2**32)), split="heldout")
    obj = source.objects[0]
    if edit_type == "color":
        color = str(rng.choice([c for c in world.COLORS if c != obj.color]))
        target = replace(source, objects=(replace(obj, color=color),))
        return ShapesEdit(edit_type, source, target, f"Make the {obj.shape} {color}", f"{obj.color} {color}")
    if edit_type == "shape":
        shape = str(rng.choice([s for s in world.SHAPES if s != obj.shape]))
        target = replace(source, objects=(replace(obj, shape=shape),))
        return ShapesEdit(edit_type, source, target, f"Change the {obj.shape} to a {shape}", f"{obj.shape} {shape}")
    if edit_type == "background":
        background = str(rng.choice([b for b in world.BACKGROUNDS if b != source.background]))
        return ShapesEdit(edit_type, source, replace(source, background=background),
                          f"Change the background to {background}", "")
    # add: a second object as the world's two-object scenes have it, another colour at the opposite position
    position = OPPOSITE[obj.position]
    x, y = world.POSITIONS[position]
    dx, dy = rng.uniform(-world.JITTER, world.JITTER, size=2)
    new = world.Obj(str(rng.choice(world.SHAPES)), str(rng.choice([c for c in world.COLORS if c != obj.color])),
                    str(rng.choice(list(world.SIZES))), position, (x + float(dx), y + float(dy)))
    return ShapesEdit(edit_type, source, replace(source, objects=(obj, new)), f"Add {new.phrase()}", "")


def _bracket(original: str, edited: str) -> tuple[str, str]:
    """Both captions with `[ ]` around the words between their common first and last words (none: no brackets)."""
    a, b = original.split(), edited.split()
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1

    def mark(words: list[str]) -> str:
        middle = words[head:len(words) - tail]
        return " ".join(words[:head] + ([f"[{' '.join(middle)}]"] if middle else []) + words[len(words) - tail:])

    return mark(a), mark(b)


def _upscale(array: np.ndarray, size: int) -> np.ndarray:
    """A (64, 64, ...) array blown up to (size, size, ...) by repeating each pixel (nearest neighbour)."""
    factor = size // world.SIZE
    return array.repeat(factor, axis=0).repeat(factor, axis=1)
