"""Edit fidelity on the shapes world: Prompt-to-Prompt against plain regeneration, measured by a scene parser.

    .venv/bin/python benchmarks/shapes_fidelity.py --model demo --out runs/fidelity-demo.json
    .venv/bin/python benchmarks/shapes_fidelity.py --model demo-flow --out runs/fidelity-flow.json
    .venv/bin/python benchmarks/shapes_fidelity.py --model runs/export --scenes 8 --plain 40   # a quick look

Every caption is held out (never seen in training) and every seed far from the training seeds. The
windows, the blend threshold, the steps and the guidance are the model's own (its `prompt2prompt.json`)
unless given. Sections:

1. Plain samples: the parser checks each object's colour, shape, size and position (where the caption
   names one), and the background; two-object captions, fixed and free, also "both colours".
2. Fixed-layout edits (captions that name the position): colour, shape and background swaps, made from
   the same seed by plain regeneration of the edited caption (the baseline), P2P, and P2P with local blend.
   Attribute success, layout IoU (the edited object's mask against the source's) and the PSNR of the region
   the edit should leave alone (outside the object; the object itself for background swaps). A shape
   swap's layout IoU is that of the two objects' placements (`parse.placement`: centre and radius, recovered
   for each shape; a new shape cannot cover the old one's pixels, and a circle's and a square's bounding
   boxes differ at one place and size); a line under the table gives the bounding boxes' IoU too, and both
   for the same swaps drawn by the world itself, the perfect edit. "In place" counts edited objects whose
   box centre is within 6 px of the source's.
3. Free-layout edits (no position word: the seed and the whole caption place the object): colour swap,
   shape swap and adding "and a small <colour> <shape>", baseline beside P2P; an added object also by P2P
   with a local blend on its words, less where the first object's words attend (at the model's threshold). The
   IoU is the first object's; an added object counts when it is a separate object of the asked colour and shape
   and the first object is still there, in its colour.
4. Local blend at the model's threshold, on colour swaps of one- and two-object scenes: whether the mask
   (the blend's own, upsampled) covers the edited object without covering the whole image, and the PSNR of
   the decoded pixels outside it against the source.
5. Real images: rendered scenes (drawn by the world, not by the model) inverted by the model's default
   method, then a colour swap; layout IoU against the rendered object's mask.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from prompt2prompt import Edit, Editor, LocalBlend
from prompt2prompt.demo import world
from prompt2prompt.demo.parse import ParsedScene, box_center, boxes_iou, mask_iou, parse, placement_iou
from prompt2prompt.files import write_text_atomic

PLAIN_SEED = 20_000_000  # held-out captions and seeds: far above every training seed
EDIT_SEED = 30_000_000
FREE_SEED = 40_000_000
BLEND_SEED = 50_000_000
REAL_SEED = 60_000_000
FIXED_KINDS = ("color", "shape", "background")
FREE_KINDS = ("color", "shape", "add")
METHODS = ("baseline", "p2p", "p2p+blend")


def to_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """PSNR in dB of two uint8 images over a boolean region (capped at 60 dB for identical pixels)."""
    if not region.any():
        return float("nan")
    diff = (a.astype(np.float32) - b.astype(np.float32))[region]
    mse = float(np.mean(diff ** 2))
    return 60.0 if mse < 1e-6 else min(60.0, 10 * np.log10(255.0 ** 2 / mse))


def mean(values) -> float:
    values = [v for v in values if v == v]  # NaN: nothing to measure in that scene
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------- 1. plain samples


def plain_accuracy(pipe, scenes: list[world.Scene], *, steps: int, guidance: float, seed: int, batch: int = 16) -> dict:
    """Share of objects whose colour, shape, size, position (and of scenes whose background) the parser confirms."""
    hits = {"color": [], "shape": [], "size": [], "position": [], "all": [], "background": [], "both colours": []}
    for start in tqdm(range(0, len(scenes), batch), desc="plain samples"):
        chunk = scenes[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([s.caption() for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators).images
        for scene, image in zip(chunk, images):
            parsed = parse(to_array(image))
            hits["background"].append(parsed.background == scene.background)
            hits["both colours"].append(all(parsed.find(o.color) is not None for o in scene.objects))
            for obj in scene.objects:
                found = parsed.find(obj.color)
                # Without an object of the right colour, judge the largest object not claimed by another colour.
                others = [p for p in parsed.objects if p.color not in {o.color for o in scene.objects}]
                judged = found or (others[0] if others else None)
                hits["color"].append(found is not None)
                hits["shape"].append(judged is not None and judged.shape == obj.shape)
                hits["size"].append(judged is not None and judged.size == obj.size)
                if obj.position is not None:
                    hits["position"].append(judged is not None and judged.position == obj.position)
                hits["all"].append(found is not None and judged.shape == obj.shape and judged.size == obj.size
                                   and (obj.position is None or judged.position == obj.position))
    result = {k: mean(v) for k, v in hits.items()}
    result["captions"] = len(scenes)
    return result


# ----------------------------------------------------------------------------- 2. and 3. edits


def swap(scene: world.Scene, kind: str, rng: np.random.Generator) -> tuple[world.Scene, str, str]:
    """The scene with one attribute of its first object (or its background) changed, and the two words."""
    obj = scene.objects[0]
    if kind == "color":
        new = str(rng.choice([c for c in world.COLORS if c != obj.color and c not in {o.color for o in scene.objects}]))
        return replace(scene, objects=(replace(obj, color=new), *scene.objects[1:])), obj.color, new
    if kind == "shape":
        new = str(rng.choice([s for s in world.SHAPES if s != obj.shape]))
        return replace(scene, objects=(replace(obj, shape=new), *scene.objects[1:])), obj.shape, new
    if kind == "background":
        new = str(rng.choice([b for b in world.BACKGROUNDS if b != scene.background]))
        return replace(scene, background=new), scene.background, new
    # add: "and a small <colour> <shape>" after the first object, a colour no object has
    color = str(rng.choice([c for c in world.COLORS if c != obj.color]))
    added = world.Obj(str(rng.choice(world.SHAPES)), color, "small", None)
    return replace(scene, objects=(obj, added)), obj.color, color


def score(kind: str, source: ParsedScene, source_image: np.ndarray, edited_image: np.ndarray,
          source_scene: world.Scene, target: world.Scene) -> dict | None:
    """Attribute success, the first object's layout IoU, whether it stayed in place, and the untouched region's PSNR;
    None when the source has no object."""
    old = source.find(source_scene.objects[0].color)
    if old is None:
        return None
    edited = parse(edited_image)
    first = target.objects[0]
    found = edited.find(first.color)
    if kind == "color":
        success = found is not None
    elif kind == "shape":
        success = found is not None and found.shape == first.shape
    elif kind == "background":
        success = edited.background == target.background
    else:  # add: a separate object of the asked colour and shape, and the first object still there
        added = edited.find(target.objects[1].color)
        success = (added is not None and found is not None and added.shape == target.objects[1].shape
                   and not (added.mask & old.mask).sum() > 0.5 * added.mask.sum())
    new_mask = found.mask if found is not None else np.zeros_like(old.mask)
    region = old.mask & new_mask if kind == "background" else ~(old.mask | new_mask)
    # A new shape cannot cover the old one's pixels (a star inside a circle's box has IoU ~0.45 with it), nor its
    # bounding box (a square's is 0.83 of a circle's side): the layout of a shape swap is the object's placement.
    iou = placement_iou(old, found) if kind == "shape" else mask_iou(old.mask, new_mask)
    in_place = found is not None and moved(old.mask, new_mask) <= 6
    return {"success": float(success), "iou": iou, "box iou": box_iou(old.mask, new_mask),
            "in place": float(in_place), "psnr": psnr(source_image, edited_image, region)}


def world_swaps(layout: str, kinds: tuple[str, ...], *, num_scenes: int, seed: int) -> dict:
    """The layout IoUs of the benchmark's shape swaps drawn by the world itself (the perfect edit): placements', and
    bounding boxes'."""
    placements, boxes = [], []
    for i in range(num_scenes):
        scene = world.sample_scene(seed + i, split="heldout", layout=layout)
        rng = np.random.default_rng(seed + i)
        target, _, _ = [swap(scene, kind, rng) for kind in kinds][kinds.index("shape")]  # as `edits` draws it
        color = scene.objects[0].color
        old, new = parse(world.render(scene).image).find(color), parse(world.render(target).image).find(color)
        placements.append(placement_iou(old, new))
        boxes.append(box_iou(old.mask, new.mask))
    return {"iou": mean(placements), "box iou": mean(boxes), "n": num_scenes}


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a non-empty mask, exclusive at the end."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks' bounding boxes (0 when either is empty)."""
    return boxes_iou(box(a), box(b)) if a.any() and b.any() else 0.0


def moved(a: np.ndarray, b: np.ndarray) -> float:
    """Pixels between the centres of two masks' bounding boxes."""
    (x0, y0), (x1, y1) = box_center(a), box_center(b)
    return float(np.hypot(x0 - x1, y0 - y1))


def blend_for(kind: str, scene: world.Scene, target: world.Scene, old: str, new: str, threshold: float) -> LocalBlend:
    """The local blend of one edit: a swap's on its old and new words; an added object's on its own words, less where
    the first object's words attend (the paper's exclusion), so that the rest of the picture is the source's."""
    if kind != "add":
        return LocalBlend(old, new, threshold=threshold)
    first, added = scene.objects[0], target.objects[1]
    return LocalBlend([], [added.color, added.shape], threshold=threshold, exclude_source_words=[first.color, first.shape],
                      exclude_edit_words=[first.color, first.shape], exclude_threshold=threshold)


def edits(editor: Editor, *, layout: str, kinds: tuple[str, ...], num_scenes: int, seed: int, steps: int,
          guidance: float, threshold: float, blend: tuple[str, ...]) -> dict:
    """Each kind of edit on `num_scenes` held-out scenes of `layout`, by regeneration, P2P, and for the kinds in
    `blend`, P2P with a local blend at `threshold` (`blend_for`)."""
    scores = {kind: {method: [] for method in (METHODS if kind in blend else METHODS[:2])} for kind in kinds}
    for i in tqdm(range(num_scenes), desc=f"{layout}-layout edits"):
        scene_seed = seed + i
        scene = world.sample_scene(scene_seed, split="heldout", layout=layout)
        rng = np.random.default_rng(scene_seed)
        targets = [swap(scene, kind, rng) for kind in kinds]
        source_caption = scene.caption()

        def make(kind, target, old, new, with_blend):
            cross, self_steps, _ = editor.defaults.windows_for(source_caption, target.caption())
            blend_words = blend_for(kind, scene, target, old, new, threshold) if with_blend else None
            return Edit(target.caption(), cross_steps=cross, self_steps=self_steps, blend=blend_words)

        common = dict(num_inference_steps=steps, guidance_scale=guidance, seed=scene_seed)
        images = {"p2p": editor.edit(source_caption, [make(k, *t, False) for k, t in zip(kinds, targets)],
                                     **common).images}
        blended = [k for k in kinds if k in blend]
        if blended:
            out = editor.edit(source_caption, [make(k, *t, True) for k, t in zip(kinds, targets) if k in blend],
                              **common).images
            images["p2p+blend"] = [out[0]] + [out[1 + blended.index(k)] if k in blend else None for k in kinds]
        images["baseline"] = [None] + [editor.edit(t.caption(), **common).images[0] for t, _, _ in targets]
        source_image = to_array(images["p2p"][0])
        source = parse(source_image)
        for k, (kind, (target, _, _)) in enumerate(zip(kinds, targets)):
            for method in scores[kind]:
                result = score(kind, source, source_image, to_array(images[method][k + 1]), scene, target)
                if result is not None:
                    scores[kind][method].append(result)
    return {"scenes": num_scenes, "table": {
        kind: {method: {metric: mean(s[metric] for s in rows) for metric in ("success", "iou", "box iou", "in place",
                                                                              "psnr")}
               | {"n": len(rows)} for method, rows in by_method.items()} for kind, by_method in scores.items()},
        "world shape swaps": world_swaps(layout, kinds, num_scenes=num_scenes, seed=seed)
                                                            if "shape" in kinds else None}


# ----------------------------------------------------------------------------- 4. local blend


def blend_locality(editor: Editor, *, num_scenes: int, seed: int, steps: int, guidance: float,
                   threshold: float, words: str = "object") -> dict:
    """Colour swaps with a local blend: does the mask find the object, and do the pixels outside it stay put?

    The blend's words are the object's colour and shape ("red circle" -> "green circle") with `words="object"`,
    the colour words alone with "colour".
    """
    rows = {}
    for num_objects in (1, 2):
        found, psnrs, coverage = [], [], []
        for i in tqdm(range(num_scenes), desc=f"local blend ({num_objects} object)"):
            scene_seed = seed + 1000 * num_objects + i
            layout = "free" if i % 2 else "fixed"
            scene = world.sample_scene(scene_seed, num_objects=num_objects, split="heldout", layout=layout)
            target, old, new = swap(scene, "color", np.random.default_rng(scene_seed))
            cross, self_steps, _ = editor.defaults.windows_for(scene.caption(), target.caption())
            shape = () if words == "colour" else (scene.objects[0].shape,)
            edit = Edit(target.caption(), cross_steps=cross, self_steps=self_steps,
                        blend=LocalBlend((old, *shape), (new, *shape), threshold=threshold))
            result = editor.edit(scene.caption(), [edit], num_inference_steps=steps, guidance_scale=guidance,
                                 seed=scene_seed)
            source_image, edited_image = to_array(result.images[0]), to_array(result.images[1])
            mask = result.masks[0].float()[None, None]
            mask = torch.nn.functional.interpolate(mask, size=(world.SIZE, world.SIZE), mode="nearest")[0, 0] > 0.5
            mask = mask.numpy()
            obj = parse(source_image).find(old)
            if obj is None:
                continue
            covered = (mask & obj.mask).sum() / obj.mask.sum()
            coverage.append(float(mask.mean()))
            found.append(covered > 0.9 and mask.mean() < 0.9)
            psnrs.append(psnr(source_image, edited_image, ~mask))
        rows[f"{num_objects} object"] = {"mask finds the object": mean(found), "mask area": mean(coverage),
                                         "psnr outside": mean(psnrs),
                                         "psnr outside, min": min(psnrs, default=float("nan")),
                                         "psnr >= 35 dB": mean([p >= 35 for p in psnrs]), "n": len(found)}
    return rows


# ----------------------------------------------------------------------------- 5. real images


def real_images(editor: Editor, *, num_scenes: int, seed: int, steps: int, guidance: float) -> dict:
    """Rendered scenes inverted by the model's default method, then a colour swap: IoU against the rendered mask."""
    ious, success = [], []
    for i in tqdm(range(num_scenes), desc="real images"):
        scene_seed = seed + i
        scene = world.sample_scene(scene_seed, split="heldout", layout="free" if i % 2 else "fixed")
        rendered = world.render(scene)
        target, old, new = swap(scene, "color", np.random.default_rng(scene_seed))
        inversion = editor.invert(Image.fromarray(rendered.image), scene.caption(), num_inference_steps=steps,
                                  guidance_scale=guidance)
        cross, self_steps, _ = editor.defaults.windows_for(scene.caption(), target.caption())
        result = editor.edit(scene.caption(), [Edit(target.caption(), cross_steps=cross, self_steps=self_steps)],
                             inversion=inversion)
        found = parse(to_array(result.images[1])).find(new)
        success.append(found is not None)
        ious.append(mask_iou(rendered.masks[0], found.mask if found is not None else np.zeros_like(rendered.masks[0])))
    return {"success": mean(success), "iou": mean(ious), "n": len(ious)}


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The report as the Markdown tables of the model card."""
    lines = ["| plain samples, held-out captions | colour | shape | size | position | all | background "
             "| both colours |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["plain"].items():
        both = f"{row['both colours']:.0%}" if name.startswith("two") else ""
        position = f"{row['position']:.0%}" if row["position"] == row["position"] else "(none named)"
        lines.append(f"| {name} ({row['captions']} captions) | {row['color']:.0%} | {row['shape']:.0%} | "
                     f"{row['size']:.0%} | {position} | {row['all']:.0%} | {row['background']:.0%} | {both} |")
    for section in ("fixed", "free"):
        if section not in report:
            continue
        part = report[section]
        lines += ["", f"| {section}-layout edit ({part['scenes']} held-out scenes) | method | attribute success | "
                      "layout IoU | object in place | PSNR of the untouched region (dB) |", "|---|---|---|---|---|---|"]
        for kind, rows in part["table"].items():
            for method, row in rows.items():
                lines.append(f"| {kind} | {method} | {row['success']:.0%} | {row['iou']:.2f} | {row['in place']:.0%} | "
                             f"{row['psnr']:.1f} |")
        if "shape" in part["table"]:
            shape, perfect = part["table"]["shape"], part["world shape swaps"]
            by_box = ", ".join(f"{method} {row['box iou']:.2f}" for method, row in shape.items())
            lines += ["", f"Shape swaps' layout IoU is the placements' (centre and radius). By bounding boxes: {by_box}. "
                          f"The same swaps drawn by the world (the perfect edit): placements {perfect['iou']:.2f}, "
                          f"bounding boxes {perfect['box iou']:.2f}."]
    if "blend" in report:
        lines += ["", f"| local blend, colour swaps (threshold {report['blend_threshold']:g}) | mask finds the object "
                      "(covers it, not the whole image) | mask area | PSNR outside the mask (dB): mean | min | "
                      "share >= 35 dB |", "|---|---|---|---|---|---|"]
        for name, row in report["blend"].items():
            lines.append(f"| {name} ({row['n']} scenes) | {row['mask finds the object']:.0%} | "
                         f"{row['mask area']:.0%} | "
                         f"{row['psnr outside']:.1f} | {row['psnr outside, min']:.1f} | {row['psnr >= 35 dB']:.0%} |")
    if "real" in report:
        row = report["real"]
        lines += ["", "| real images: inversion, then a colour swap | new colour | layout IoU against the render |",
                  "|---|---|---|", f"| {row['n']} rendered scenes | {row['success']:.0%} | {row['iou']:.2f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo", help="'demo', 'demo-flow' or a diffusers folder")
    parser.add_argument("--scenes", type=int, default=50, help="held-out scenes per edit section (0: skip them)")
    parser.add_argument("--free-scenes", type=int, default=40, help="held-out free-layout scenes (0: skip)")
    parser.add_argument("--plain", type=int, default=100, help="held-out one-object captions to sample")
    parser.add_argument("--plain-two", type=int, default=40, help="held-out two-object captions, per layout")
    parser.add_argument("--blend-scenes", type=int, default=30, help="colour swaps with a blend, per object count")
    parser.add_argument("--real", type=int, default=20, help="rendered scenes to invert and edit (0: skip)")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--guidance", type=float, help="default: the model's")
    parser.add_argument("--blend-threshold", type=float, help="LocalBlend threshold (default: the model's)")
    parser.add_argument("--blend-words", choices=("object", "colour"), default="object",
                        help="the blend's words in section 4: the object's colour and shape, or its colour alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here as JSON (and .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.time()
    editor = Editor.from_pretrained(args.model, device="cpu", torch_dtype=torch.float32)  # layers: the model's
    editor.pipe.set_progress_bar_config(disable=True)
    defaults = editor.defaults
    steps = args.steps or defaults.num_inference_steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    threshold = defaults.blend_threshold if args.blend_threshold is None else args.blend_threshold
    common = dict(steps=steps, guidance=guidance)
    report: dict = {"model": args.model, "steps": steps, "guidance": guidance, "blend_threshold": threshold,
                    "defaults": defaults.describe(), "plain": {}}
    if args.plain:
        scenes = [world.sample_scene(PLAIN_SEED + i, split="heldout") for i in range(args.plain)]
        report["plain"]["one object, fixed layout"] = plain_accuracy(editor.pipe, scenes, seed=PLAIN_SEED, **common)
    if args.plain_two:
        for layout in world.LAYOUTS:
            scenes = [world.sample_scene(PLAIN_SEED + 1_000_000 + i, num_objects=2, split="heldout", layout=layout)
                      for i in range(args.plain_two)]
            report["plain"][f"two objects, {layout} layout"] = plain_accuracy(editor.pipe, scenes,
                                                                              seed=PLAIN_SEED + 1_000_000, **common)
    if args.scenes:
        report["fixed"] = edits(editor, layout="fixed", kinds=FIXED_KINDS, num_scenes=args.scenes, seed=EDIT_SEED,
                                threshold=threshold, blend=FIXED_KINDS, **common)
    if args.free_scenes:
        report["free"] = edits(editor, layout="free", kinds=FREE_KINDS, num_scenes=args.free_scenes, seed=FREE_SEED,
                               threshold=threshold, blend=("add",), **common)
    if args.blend_scenes:
        report["blend"] = blend_locality(editor, num_scenes=args.blend_scenes, seed=BLEND_SEED, threshold=threshold,
                                         words=args.blend_words, **common)
    if args.real:
        report["real"] = real_images(editor, num_scenes=args.real, seed=REAL_SEED, **common)
    report["seconds"] = round(time.time() - started, 1)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(report, indent=1))
        write_text_atomic(args.out.with_suffix(".md"), text + "\n")


if __name__ == "__main__":
    sys.exit(main())
