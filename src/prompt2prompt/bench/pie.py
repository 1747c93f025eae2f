"""PIE-Bench (Ju et al., "Direct Inversion", ICLR 2024): its folder, its masks and the P2P protocol of its rows.

A PIE-Bench folder holds `mapping_file.json` (entries keyed by a 12-digit id) and `annotation_images/`. Each
entry has `image_path`, `original_prompt` and `editing_prompt` with `[ ]` around the changed words,
`editing_instruction`, `editing_type_id` (a string, "0".."9"), `blended_word` ("source target" or "") and `mask`,
run-length (start, length) pairs over the row-major 512x512 array, 1 where the edit may change the image.
`decode_mask` follows the reference evaluator (cure-lab/PnPInversion `evaluation/evaluate.py`), which also sets
the border rows and columns to 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..edits import Edit, LocalBlend

__all__ = ["EDITING_TYPES", "Entry", "PieError", "Protocol", "blended_words", "decode_mask", "load_pie",
           "protocol_edit", "strip_brackets"]

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
SIZE = 512  # PIE-Bench's images and masks
EDITING_TYPES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change color", "7": "change material", "8": "change background", "9": "change style",
}


class PieError(ValueError):
    """A benchmark folder or entry that cannot be read; the message names the file or entry and the field."""


@dataclass(frozen=True)
class Entry:
    """One benchmark image and its edit, prompts with their brackets removed."""

    id: str
    image: Path  # absolute
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type: str  # "0".."9"
    blended_word: str  # "source target" or ""
    mask: np.ndarray  # (512, 512) uint8, 1 where the edit may change the image (border forced to 1)


@dataclass(frozen=True)
class Protocol:
    """The settings of the published P2P rows (Direct Inversion, Table 1); every one can be changed.

    SD 1.4 with DDIM (its own scheduler configuration), 50 steps, guidance 7.5, seed 1234 before every image;
    always a refinement edit with cross-attention 0.4 and self-attention 0.6 of the steps; where `blended_word`
    is given, a local blend on those words (start 0.2, thresholds 0.3) and the target word reweighted x2.
    """

    model: str = "CompVis/stable-diffusion-v1-4"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 1234  # the reference seeds torch before every image; an inversion draws no noise, so it changes nothing
    cross_steps: float = 0.4
    self_steps: float = 0.6
    blend_start: float = 0.2
    blend_threshold: float = 0.3
    target_weight: float = 2.0


def strip_brackets(prompt: str) -> str:
    """A PIE prompt without the `[ ]` that mark its changed words, as the evaluator reads it.

    >>> strip_brackets("a [cat] sitting on a [wooden] bench")
    'a cat sitting on a wooden bench'
    """
    return prompt.replace("[", "").replace("]", "")


def blended_words(blended_word: str) -> tuple[str, str] | None:
    """(source word, target word) of a `blended_word` field, or None when it is empty.

    >>> blended_words("cat dog"), blended_words("")
    (('cat', 'dog'), None)
    """
    words = blended_word.split()
    if not words:
        return None
    if len(words) != 2:
        raise PieError(f"blended_word must be 'source target' or empty, not {blended_word!r}")
    return words[0], words[1]


def decode_mask(pairs: Sequence[int], shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """The (h, w) uint8 mask of run-length `pairs` (start, length, start, length, ...) over the row-major array.

    As the reference evaluator decodes it: a run is cut at the array's end, and the border rows and columns are
    set to 1 ("to avoid annotation errors in boundary").

    >>> decode_mask([5, 2], (4, 4))
    array([[1, 1, 1, 1],
           [1, 1, 1, 1],
           [1, 0, 0, 1],
           [1, 1, 1, 1]], dtype=uint8)
    """
    total = shape[0] * shape[1]
    if len(pairs) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pairs):
        raise PieError(f"a mask is a list of (start, length) pairs of non-negative integers, not {str(pairs)[:80]}")
    flat = np.zeros(total, dtype=np.uint8)
    for start, length in zip(pairs[::2], pairs[1::2]):
        flat[start : start + max(0, min(length, total - start))] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return mask


def _field(entry: dict[str, Any], name: str, key: str, expected: type = str) -> Any:
    value = entry.get(name)
    if not isinstance(value, expected):
        raise PieError(f"entry {key!r} of {MAPPING_FILE}: {name} must be a {expected.__name__}, not {str(value)[:60]!r}")
    return value


def load_pie(data_dir: str | Path, *, types: Sequence[str] | None = None) -> list[Entry]:
    """The entries of a PIE-Bench folder (`mapping_file.json`, `annotation_images/`), in the file's order.

    `types` keeps only those editing types ("0".."9"). A missing file or a malformed entry is a `PieError`
    naming it, before anything runs.
    """
    root = Path(data_dir).expanduser().resolve()
    mapping = root / MAPPING_FILE
    if not mapping.is_file():
        raise PieError(f"{str(root)!r} is not a PIE-Bench folder: it has no {MAPPING_FILE}")
    try:
        data = json.loads(mapping.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PieError(f"cannot read {str(mapping)!r}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise PieError(f"{str(mapping)!r} must hold an object of entries keyed by id")
    entries = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise PieError(f"entry {key!r} of {MAPPING_FILE} must be an object")
        editing_type = _field(entry, "editing_type_id", key)
        if editing_type not in EDITING_TYPES:
            raise PieError(f"entry {key!r}: editing_type_id must be one of 0..9, not {editing_type!r}")
        if types is not None and editing_type not in types:
            continue
        relative = _field(entry, "image_path", key)
        image = (root / IMAGES / relative).resolve()
        if not image.is_relative_to(root) or not image.is_file():
            raise PieError(f"entry {key!r}: its image {relative!r} is not a file under {IMAGES}/")
        blended = entry.get("blended_word") or ""
        if not isinstance(blended, str):
            raise PieError(f"entry {key!r}: blended_word must be a string")
        blended_words(blended)  # a malformed one is refused here
        entries.append(Entry(
            id=str(key), image=image, original_prompt=strip_brackets(_field(entry, "original_prompt", key)),
            editing_prompt=strip_brackets(_field(entry, "editing_prompt", key)),
            editing_instruction=entry.get("editing_instruction") or "", editing_type=editing_type, blended_word=blended,
            mask=decode_mask(_field(entry, "mask", key, list)),
        ))
    return entries


def protocol_edit(entry: Entry, protocol: Protocol = Protocol()) -> Edit:
    """The edit the published P2P rows make of an entry: a refinement, a local blend and a x2 target word.

    >>> e = protocol_edit(Entry("1", Path("x"), "a cat", "a dog", "", "1", "cat dog", np.zeros((1, 1))))
    >>> e.mode, e.cross_steps, e.self_steps, e.weights, e.blend.source_words, e.blend.edit_words
    ('refine', 0.4, 0.6, {'dog': 2.0}, 'cat', 'dog')
    """
    words = blended_words(entry.blended_word)
    blend = weights = None
    if words is not None:
        source, target = words
        blend = LocalBlend(source, target, threshold=protocol.blend_threshold, start=protocol.blend_start,
                           exclude_threshold=protocol.blend_threshold)
        weights = {target: protocol.target_weight}
    return Edit(entry.editing_prompt, mode="refine", cross_steps=protocol.cross_steps, self_steps=protocol.self_steps,
                weights=weights, blend=blend)
