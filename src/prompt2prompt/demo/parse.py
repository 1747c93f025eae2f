"""A scene parser for the shapes world: finds the objects in an image by colour and names their attributes.

Objects are saturated palette colours and backgrounds are neutral, so a pixel belongs to an object
when it is saturated, and to the palette colour nearest to it. An object's shape is the template
(circle, square, triangle, star) that best overlaps its mask once both are scaled to their bounding
boxes; its size and position are the nearest of the world's sizes and positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from prompt2prompt.demo import world

SATURATION = 60  # max - min of RGB above which a pixel is an object's, not the neutral background's
MIN_PIXELS = 24  # smaller colour specks are noise, not objects
TEMPLATE = 32  # side of the bounding-box-normalised shape templates


@dataclass(frozen=True)
class ParsedObject:
    """An object found in an image: its attributes and its mask."""

    color: str
    shape: str
    size: str
    position: str
    mask: np.ndarray  # (64, 64) bool


@dataclass(frozen=True)
class ParsedScene:
    """What the parser sees in an image: the objects, largest first, and the background colour."""

    objects: tuple[ParsedObject, ...]
    background: str
    gradient: bool

    def find(self, color: str) -> ParsedObject | None:
        """The object of the given colour, or None."""
        return next((obj for obj in self.objects if obj.color == color), None)


def as_array(image) -> np.ndarray:
    """A (64, 64, 3) uint8 array from a PIL image or an array in [0, 255] (uint8) or [0, 1] (float)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    if array.shape != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"the parser reads {world.SIZE}x{world.SIZE} RGB images, got shape {array.shape}")
    return array


def color_labels(image) -> np.ndarray:
    """Per pixel, the index of its palette colour in `world.COLORS`, or -1 for a neutral (background) pixel."""
    pixels = as_array(image).astype(np.float32)
    palette = np.array(list(world.COLORS.values()), dtype=np.float32)
    distance = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    labels = distance.argmin(-1)
    saturated = pixels.max(-1) - pixels.min(-1) > SATURATION
    return np.where(saturated, labels, -1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _normalised(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)
    return np.asarray(resized) >= 128


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    big = {}
    for shape in world.SHAPES:
        coverage = world.shape_coverage(shape, (32.0, 32.0), 28.0)
        big[shape] = _normalised(coverage >= 0.5)
    return big


@lru_cache(maxsize=1)
def _areas() -> dict[tuple[str, str], float]:
    return {(shape, size): float(world.shape_coverage(shape, (32.0, 32.0), radius).sum())
            for shape in world.SHAPES for size, radius in world.SIZES.items()}


@lru_cache(maxsize=1)
def _placements() -> dict[str, tuple[float, float, float]]:
    """Per shape, drawn at radius 1: its area, and where its bounding box's centre sits from the object's centre."""
    radius, units = 28.0, {}
    for shape in world.SHAPES:
        mask = world.shape_coverage(shape, (32.0, 32.0), radius) >= 0.5
        x, y = box_center(mask)
        units[shape] = (float(mask.sum()) / radius**2, (x - 32.0) / radius, (y - 32.0) / radius)
    return units


def box_center(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the centre of a non-empty mask's bounding box, in pixels."""
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def placement(obj: ParsedObject) -> tuple[float, float, float]:
    """Where the world placed an object: its centre (x, y) and radius in pixels, recovered from its mask's area and
    bounding box for its shape. Unlike the mask or the box, this does not change when only the shape does (a circle
    and a square of one size and place have boxes of IoU 0.69, and one placement)."""
    area, dx, dy = _placements()[obj.shape]
    radius = float(np.sqrt(obj.mask.sum() / area))
    x, y = box_center(obj.mask)
    return x - dx * radius, y - dy * radius, radius


def placement_iou(a: ParsedObject | None, b: ParsedObject | None) -> float:
    """Intersection over union of two objects' placements, each the square of side twice its radius around its
    centre (0 when either is missing): the layout of a shape swap, 1 for a perfect one."""
    if a is None or b is None:
        return 0.0
    (x0, y0, r0), (x1, y1, r1) = placement(a), placement(b)
    return boxes_iou((y0 - r0, x0 - r0, y0 + r0, x0 + r0), (y1 - r1, x1 - r1, y1 + r1, x1 + r1))


def boxes_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two non-empty (top, left, bottom, right) boxes."""
    (t0, l0, b0, r0), (t1, l1, b1, r1) = a, b
    overlap = max(0.0, min(b0, b1) - max(t0, t1)) * max(0.0, min(r0, r1) - max(l0, l1))
    return overlap / ((b0 - t0) * (r0 - l0) + (b1 - t1) * (r1 - l1) - overlap)


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose bounding-box-normalised template overlaps the mask best (IoU)."""
    normalised = _normalised(mask)
    scores = {}
    for shape, template in _templates().items():
        scores[shape] = (normalised & template).sum() / max(1, (normalised | template).sum())
    return max(scores, key=scores.get)


def classify_size(mask: np.ndarray, shape: str) -> str:
    """"small" or "big": the nearer, on a log scale, of that shape's two areas."""
    area = max(1.0, float(mask.sum()))
    areas = _areas()
    return min(world.SIZES, key=lambda size: abs(np.log(area / areas[shape, size])))


def classify_position(mask: np.ndarray) -> str:
    """The world position nearest to the centre of the mask's bounding box."""
    center = box_center(mask)
    return min(world.POSITIONS, key=lambda p: np.hypot(center[0] - world.POSITIONS[p][0],
                                                       center[1] - world.POSITIONS[p][1]))


def parse(image) -> ParsedScene:
    """Finds the objects (one per palette colour, largest first) and the background of a shapes-world image."""
    pixels = as_array(image)
    labels = color_labels(pixels)
    objects = []
    for index, color in enumerate(world.COLORS):
        mask = largest_component(labels == index)
        if mask.sum() < MIN_PIXELS:
            continue
        shape = classify_shape(mask)
        objects.append(ParsedObject(color, shape, classify_size(mask, shape), classify_position(mask), mask))
    objects.sort(key=lambda obj: -int(obj.mask.sum()))
    neutral = labels < 0
    brightness = pixels.astype(np.float32).mean(-1)
    levels = {name: float(np.mean(rgb)) for name, rgb in world.BACKGROUNDS.items()}
    rows = [brightness[y][neutral[y]] for y in range(world.SIZE)]
    top = np.concatenate(rows[:12]) if any(len(r) for r in rows[:12]) else np.array([128.0])
    bottom = np.concatenate(rows[-12:]) if any(len(r) for r in rows[-12:]) else np.array([128.0])
    # A gradient's top row is the named colour itself; the bottom drifts towards grey.
    top_level = float(np.median(top)) if len(top) else 128.0
    background = min(levels, key=lambda name: abs(levels[name] - top_level))
    gradient = abs(float(np.median(bottom)) - top_level) > world.GRADIENT_SHIFT / 2 if len(bottom) else False
    return ParsedScene(tuple(objects), background, bool(gradient))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
