"""The shapes world: deterministic 64x64 scenes of flat-coloured shapes, their captions and their masks.

Every attribute is one CLIP token in a fixed place of the caption, so a word swap ("red" -> "green",
"circle" -> "square", "left" -> "right", "white" -> "black") changes exactly one attribute of the scene.

Scenes come in two layouts. A *fixed* layout names each object's position ("on the left"), one of five
fixed centres. A *free* layout names none and puts each object anywhere in the picture: then the seed
and the whole caption decide where things land, so regenerating an edited caption from the same seed
may move them, and Prompt-to-Prompt should not. That is the paper's point, and the free half of the
world is what lets the demo models show it.

The world is otherwise kept small on purpose (two well-separated sizes, neutral backgrounds): the demo
models learn it on a laptop CPU, and a 4x VAE keeps only shapes that are several latent pixels wide.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SIZE = 64
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 55, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (24, 24, 24),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 12.0, "big": 17.0}  # circumradius in pixels
POSITIONS: dict[str, tuple[float, float]] = {  # object centre (x, y) in pixels
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "center": (32.0, 32.0),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Two-object scenes use opposite positions so that the objects rarely overlap.
POSITION_PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
GRADIENT_SHIFT = 70  # the bottom of a gradient background is this much lighter (or darker) than its top
JITTER = 1.5  # pixels of random offset of each object's centre
MARGIN = 2.0  # pixels between a free object's circle of radius SIZES[size] and the picture's edge
# How far each shape reaches from its centre, in units of SIZES[size]: a triangle's base corners reach furthest.
REACH = {"circle": 0.9, "square": 0.75 * 2 ** 0.5, "triangle": 1.38, "star": 1.0}
LAYOUTS = ("fixed", "free")


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its attributes, in caption words, and its exact geometry in pixels."""

    shape: str
    color: str
    size: str
    position: str | None  # None: a free layout, the caption names no position
    center: tuple[float, float] = field(default=(32.0, 32.0), compare=False)

    def phrase(self) -> str:
        """The object's caption phrase, e.g. "a big red circle on the left" (free: "a big red circle")."""
        words = f"a {self.size} {self.color} {self.shape}"
        return words if self.position is None else f"{words} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A scene: one or two objects (drawn in order) on a flat or gradient background."""

    objects: tuple[Obj, ...]
    background: str
    gradient: bool = False

    def caption(self) -> str:
        """The scene's caption, e.g. "a big red circle on the left on a white background"."""
        objects = " and ".join(obj.phrase() for obj in self.objects)
        style = "gradient background" if self.gradient else "background"
        return f"{objects} on a {self.background} {style}"

    def key(self) -> str:
        """The scene's attributes without its jitter: two scenes with the same key share a caption."""
        return self.caption()


@dataclass(frozen=True)
class Rendered:
    """A rendered scene: the image, its caption, the scene itself and each object's visible mask."""

    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    scene: Scene
    masks: np.ndarray  # (num_objects, 64, 64) bool: the pixels where that object is visible


def vocabulary() -> list[str]:
    """Every word of the world's captions, sorted: all that a model trained on them knows (its prompt2prompt.json
    lists them, so that a front end can say which words of a prompt the model never saw)."""
    objects = [Obj(shape, color, size, position) for shape in SHAPES for color in COLORS for size in SIZES
               for position in (*POSITIONS, None)]
    scenes = [Scene((objects[0], objects[-1]), background, gradient) for background in BACKGROUNDS
              for gradient in (False, True)]
    return sorted({word for text in [*(obj.phrase() for obj in objects), *(s.caption() for s in scenes)]
                   for word in text.split()})


def is_held_out(scene: Scene) -> bool:
    """Whether the scene's caption belongs to the held-out tenth of captions, never used in training.

    The split hashes the caption, so it is the same on every machine and for every sampler.
    """
    digest = hashlib.sha256(scene.key().encode()).digest()
    return digest[0] % 10 == 0


def sample_scene(seed: int, *, num_objects: int = 1, split: str = "train", gradient_fraction: float = 0.25,
                 layout: str = "fixed") -> Scene:
    """The scene drawn from `seed`: uniform attributes, restricted to the train or held-out captions.

    `split` is "train" (captions used in training), "heldout" (the other tenth) or "all". `layout` is
    "fixed" (each object at a named position) or "free" (anywhere, no position word).
    """
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'fixed' or 'free', got {layout!r}")
    rng = np.random.default_rng(seed)
    while True:
        scene = _draw_scene(rng, num_objects, gradient_fraction, layout)
        if split == "all" or is_held_out(scene) == (split == "heldout"):
            return scene


def free_centers(rng: np.random.Generator, shapes: tuple[str, ...],
                 sizes: tuple[str, ...]) -> tuple[tuple[float, float], ...]:
    """Centres anywhere in the picture for objects of `shapes` and `sizes`, clear of the edges and of each other.

    Objects never overlap: the circles they reach to (`REACH`) keep apart. All centres are drawn again until
    they do (placing one after the other can corner the second: a small object in the middle leaves a big
    one no room). Two big objects would fit only in opposite corners, so a free scene has at most one.
    """
    margins = [SIZES[size] + MARGIN for size in sizes]
    reach = [SIZES[size] * REACH[shape] for shape, size in zip(shapes, sizes)]
    while True:
        centers = [tuple(float(v) for v in rng.uniform(m, SIZE - m, size=2)) for m in margins]
        if all(np.hypot(a[0] - b[0], a[1] - b[1]) > ra + rb
               for i, (a, ra) in enumerate(zip(centers, reach)) for b, rb in zip(centers[i + 1:], reach[i + 1:])):
            return tuple(centers)


def _draw_scene(rng: np.random.Generator, num_objects: int, gradient_fraction: float, layout: str) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    gradient = bool(rng.random() < gradient_fraction)
    if layout == "free":
        colors = tuple(str(c) for c in rng.choice(list(COLORS), size=num_objects, replace=False))
        shapes = tuple(str(rng.choice(SHAPES)) for _ in colors)
        sizes = tuple(str(rng.choice(list(SIZES))) for _ in colors)
        if sizes == ("big", "big"):
            sizes = ("big", "small") if rng.random() < 0.5 else ("small", "big")
        centers = free_centers(rng, shapes, sizes)
        objects = (Obj(*attributes, None, center) for *attributes, center in zip(shapes, colors, sizes, centers))
        return Scene(tuple(objects), background, gradient)
    if num_objects == 1:
        positions = (str(rng.choice(list(POSITIONS))),)
        colors = (str(rng.choice(list(COLORS))),)
    else:
        positions = POSITION_PAIRS[rng.integers(len(POSITION_PAIRS))]
        colors = tuple(str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    objects = []
    for position, color in zip(positions, colors):
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        x, y = POSITIONS[position]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        objects.append(Obj(shape, color, size, position, (x + float(dx), y + float(dy))))
    return Scene(tuple(objects), background, gradient)


def shape_coverage(shape: str, center: tuple[float, float], radius: float, *, size: int = SIZE,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The fraction of each pixel that `shape` covers, (size, size) float32 in [0, 1], anti-aliased."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    xs, ys = np.meshgrid(coords - center[0], coords - center[1])
    inside = _inside(shape, xs, ys, radius)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float32)


def _inside(shape: str, xs: np.ndarray, ys: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return xs**2 + ys**2 <= (0.9 * r) ** 2
    if shape == "square":
        half = 0.75 * r
        return (np.abs(xs) <= half) & (np.abs(ys) <= half)
    if shape == "triangle":
        # An upward equilateral triangle whose bounding box is centred on the object's centre.
        top, base, half_width = -0.9 * r, 0.9 * r, 1.04 * r
        return (ys <= base) & (np.abs(xs) * (base - top) <= half_width * (ys - top))
    # A five-pointed star: the union of its inner pentagon and its five point triangles.
    outer = [_polar(r, -90 + 72 * k) for k in range(5)]
    inner = [_polar(0.45 * r, -54 + 72 * k) for k in range(5)]
    star = _convex(xs, ys, inner)
    for k in range(5):
        star |= _convex(xs, ys, [inner[k - 1], outer[k], inner[k]])
    return star


def _polar(r: float, degrees: float) -> tuple[float, float]:
    a = np.deg2rad(degrees)
    return float(r * np.cos(a)), float(r * np.sin(a))


def _convex(xs: np.ndarray, ys: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Points inside a convex polygon, vertices in either winding order."""
    signs = []
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        signs.append((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0)
    all_left = np.logical_and.reduce(signs)
    all_right = np.logical_and.reduce([~s for s in signs])
    return all_left | all_right


def background_image(background: str, gradient: bool, *, size: int = SIZE) -> np.ndarray:
    """The background alone, (size, size, 3) float32 in [0, 255]: flat, or a vertical gradient."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if gradient:
        # Light backgrounds darken downwards and dark ones lighten, so the gradient stays neutral.
        direction = -1.0 if base.mean() > 128 else 1.0
        ramp = np.linspace(0.0, GRADIENT_SHIFT, size, dtype=np.float32)[:, None, None]
        image = image + direction * ramp
    return image


def render(scene: Scene) -> Rendered:
    """Draws `scene` at 64x64 with 4x supersampling, and returns the image, its caption and its masks."""
    image = background_image(scene.background, scene.gradient)
    coverages = []
    for obj in scene.objects:
        if obj.size not in SIZES or obj.color not in COLORS or obj.position not in (*POSITIONS, None):
            raise ValueError(f"object {obj!r} has an unknown size, colour or position")
        alpha = shape_coverage(obj.shape, obj.center, SIZES[obj.size])
        color = np.array(COLORS[obj.color], dtype=np.float32)
        image = image * (1 - alpha[..., None]) + color * alpha[..., None]
        coverages = [c * (1 - alpha) for c in coverages] + [alpha]
    masks = np.stack(coverages) >= 0.5
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Rendered(pixels, scene.caption(), scene, masks)


def render_dataset(num_images: int, *, seed: int = 0, two_object_fraction: float = 0.25, split: str = "train",
                   free_fraction: float = 0.0, free_two_object_fraction: float | None = None,
                   progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Renders `num_images` scenes drawn from seeds `seed`, `seed + 1`, ...: (N, 64, 64, 3) uint8 and captions.

    A share `free_fraction` of the scenes has a free layout; of those, `free_two_object_fraction` (by
    default `two_object_fraction`) has two objects, and of the fixed ones `two_object_fraction`. Both
    choices are drawn from the scene's seed, so the data set is a pure function of its arguments.
    """
    from tqdm.auto import tqdm

    if free_two_object_fraction is None:
        free_two_object_fraction = two_object_fraction
    images = np.empty((num_images, SIZE, SIZE, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(num_images), desc="rendering scenes", disable=not progress):
        scene_seed = seed + i
        free = np.random.default_rng([scene_seed, 2]).random() < free_fraction
        share = free_two_object_fraction if free else two_object_fraction
        num_objects = 2 if np.random.default_rng([scene_seed, 1]).random() < share else 1
        layout = "free" if free else "fixed"
        rendered = render(sample_scene(scene_seed, num_objects=num_objects, split=split, layout=layout))
        images[i] = rendered.image
        captions.append(rendered.caption)
    return images, captions
