"""Edit fidelity on the shapes world: Prompt-to-Prompt against plain regeneration, measured by a scene parser.

    .venv/bin/python benchmarks/shapes_fidelity.py                 # the shipped demo model, 50 scenes
    .venv/bin/python benchmarks/shapes_fidelity.py --model runs/export --scenes 8 --plain 40

1. Plain samples: held-out captions (never seen in training), one sample each; the parser checks
   colour, shape, size and position of each object, and the background.
2. Edits: for held-out scenes, a colour swap, a shape swap and a background swap of the source
   caption, made three ways from the same seed: plain regeneration of the edited caption (the
   uncontrolled baseline), P2P, and P2P with local blend. For each: attribute success (the parser
   sees the target attribute), layout IoU (the edited object's mask against the source's), and the
   PSNR of the region the edit should leave alone (outside the object for object edits, the object
   itself for background swaps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prompt2prompt import Edit, Editor, LocalBlend
from prompt2prompt.demo import world
from prompt2prompt.demo.parse import ParsedScene, mask_iou, parse
from prompt2prompt.files import write_text_atomic

PLAIN_SEED = 20_000_000  # held-out captions and seeds: far above every training seed
EDIT_SEED = 30_000_000
KINDS = ("color", "shape", "background")
METHODS = ("baseline", "p2p", "p2p+blend")


def to_arrays(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def plain_accuracy(pipe, *, num_captions: int, num_objects: int, steps: int, guidance: float, batch: int = 16) -> dict:
    """Share of objects whose colour, shape, size, position (and of scenes whose background) the parser confirms."""
    scenes = [world.sample_scene(PLAIN_SEED + num_objects * 1_000_000 + i, num_objects=num_objects, split="heldout")
              for i in range(num_captions)]
    hits = {"color": 0, "shape": 0, "size": 0, "position": 0, "all": 0}
    backgrounds, objects = 0, 0
    for start in tqdm(range(0, len(scenes), batch), desc=f"plain samples ({num_objects} object)"):
        chunk = scenes[start:start + batch]
        generators = [torch.Generator().manual_seed(PLAIN_SEED + start + i) for i in range(len(chunk))]
        images = pipe([s.caption() for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators).images
        for scene, image in zip(chunk, to_arrays(images)):
            parsed = parse(image)
            backgrounds += parsed.background == scene.background
            for obj in scene.objects:
                objects += 1
                found = parsed.find(obj.color)
                # Without an object of the right colour, judge the largest object not claimed by another colour.
                others = [p for p in parsed.objects if p.color not in {o.color for o in scene.objects}]
                judged = found or (others[0] if others else None)
                hits["color"] += found is not None
                if judged is None:
                    continue
                hits["shape"] += judged.shape == obj.shape
                hits["size"] += judged.size == obj.size
                hits["position"] += judged.position == obj.position
                hits["all"] += (found is not None and judged.shape == obj.shape and judged.size == obj.size
                                and judged.position == obj.position)
    result = {k: v / objects for k, v in hits.items()}
    result["background"] = backgrounds / len(scenes)
    result["captions"] = len(scenes)
    return result


def swap(scene: world.Scene, kind: str, rng: np.random.Generator) -> tuple[world.Scene, str, str]:
    """The scene with one attribute of its first object (or its background) changed, and the two words."""
    obj = scene.objects[0]
    if kind == "color":
        new = str(rng.choice([c for c in world.COLORS if c != obj.color]))
        return world.Scene((world.Obj(obj.shape, new, obj.size, obj.position, obj.center),), scene.background,
                           scene.gradient), obj.color, new
    if kind == "shape":
        new = str(rng.choice([s for s in world.SHAPES if s != obj.shape]))
        return world.Scene((world.Obj(new, obj.color, obj.size, obj.position, obj.center),), scene.background,
                           scene.gradient), obj.shape, new
    new = str(rng.choice([b for b in world.BACKGROUNDS if b != scene.background]))
    return world.Scene(scene.objects, new, scene.gradient), scene.background, new


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """PSNR in dB of two uint8 images over a boolean region (capped at 60 dB for identical pixels)."""
    if not region.any():
        return float("nan")
    diff = (a.astype(np.float32) - b.astype(np.float32))[region]
    mse = float(np.mean(diff ** 2))
    return 60.0 if mse < 1e-6 else min(60.0, 10 * np.log10(255.0 ** 2 / mse))


def score_edit(kind: str, source: ParsedScene, source_image: np.ndarray, edited_image: np.ndarray,
               source_scene: world.Scene, target: world.Scene) -> dict | None:
    """Attribute success, layout IoU and preserved-region PSNR of one edit; None when the source has no object."""
    old = source.find(source_scene.objects[0].color)
    if old is None:
        return None
    edited = parse(edited_image)
    new_obj = target.objects[0]
    found = edited.find(new_obj.color)
    if kind == "color":
        success = found is not None
    elif kind == "shape":
        success = found is not None and found.shape == new_obj.shape
    else:
        success = edited.background == target.background
    new_mask = found.mask if found is not None else np.zeros_like(old.mask)
    iou = mask_iou(old.mask, new_mask)
    if kind == "background":
        region = old.mask & new_mask
    else:
        region = ~(old.mask | new_mask)
    return {"success": float(success), "iou": iou, "psnr": psnr(source_image, edited_image, region)}


def fidelity(editor: Editor, *, num_scenes: int, steps: int, guidance: float, cross: float, self_steps: float,
             blend_threshold: float) -> dict:
    """Runs the three swaps three ways on `num_scenes` held-out scenes; returns per-kind, per-method means."""
    scores = {kind: {method: [] for method in METHODS} for kind in KINDS}
    skipped = 0
    for i in tqdm(range(num_scenes), desc="edits"):
        seed = EDIT_SEED + i
        scene = world.sample_scene(seed, split="heldout")
        rng = np.random.default_rng(seed)
        targets = [swap(scene, kind, rng) for kind in KINDS]
        plain = [Edit(t.caption(), cross_steps=cross, self_steps=self_steps) for t, _, _ in targets]
        blended = [Edit(t.caption(), cross_steps=cross, self_steps=self_steps, blend=LocalBlend(old, new, threshold=blend_threshold))
                   for t, old, new in targets]
        common = dict(num_inference_steps=steps, guidance_scale=guidance, seed=seed)
        p2p = to_arrays(editor.edit(scene.caption(), plain, **common).images)
        blend = to_arrays(editor.edit(scene.caption(), blended, **common).images)
        baseline = [to_arrays(editor.edit(t.caption(), **common).images)[0] for t, _, _ in targets]
        source_image = p2p[0]
        source = parse(source_image)
        for k, (kind, (target, _, _)) in enumerate(zip(KINDS, targets)):
            results = {"baseline": baseline[k], "p2p": p2p[k + 1], "p2p+blend": blend[k + 1]}
            for method, image in results.items():
                score = score_edit(kind, source, source_image, image, scene, target)
                if score is None:
                    skipped += method == "baseline" and k == 0
                    continue
                scores[kind][method].append(score)
    table = {kind: {method: {metric: float(np.nanmean([s[metric] for s in scores[kind][method]]))
                             if scores[kind][method] else float("nan")
                             for metric in ("success", "iou", "psnr")} for method in METHODS} for kind in KINDS}
    return {"table": table, "scenes": num_scenes, "sources_without_object": skipped}


def markdown(report: dict) -> str:
    """The report as the two Markdown tables of the model card."""
    lines = []
    plain = report["plain"]
    lines += ["| plain samples, held-out captions | colour | shape | size | position | all four | background |",
              "|---|---|---|---|---|---|---|"]
    for name, row in plain.items():
        lines.append(f"| {name} ({row['captions']} captions) | {row['color']:.0%} | {row['shape']:.0%} | "
                     f"{row['size']:.0%} | {row['position']:.0%} | {row['all']:.0%} | {row['background']:.0%} |")
    if "fidelity" in report:
        fid = report["fidelity"]
        lines += ["", f"| swap ({fid['scenes']} held-out scenes) | method | attribute success | layout IoU | "
                      "PSNR of the untouched region (dB) |", "|---|---|---|---|---|"]
        for kind, rows in fid["table"].items():
            for method, row in rows.items():
                lines.append(f"| {kind} | {method} | {row['success']:.0%} | {row['iou']:.2f} | {row['psnr']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo", help="'demo' (the shipped model) or a diffusers folder")
    parser.add_argument("--scenes", type=int, default=50, help="held-out scenes to edit (0: skip the edits)")
    parser.add_argument("--plain", type=int, default=100, help="held-out single-object captions to sample")
    parser.add_argument("--plain-two", type=int, default=32, help="held-out two-object captions to sample")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cross", type=float, default=0.8, help="P2P cross-attention window")
    parser.add_argument("--self-steps", type=float, default=0.2, help="P2P self-attention window")
    # The demo model's attention maps are diffuse: at LocalBlend's default 0.3 the mask covers the whole image.
    parser.add_argument("--blend-threshold", type=float, default=0.8, help="LocalBlend threshold")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here as JSON (and .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from prompt2prompt.loading import load_pipeline

    started = time.time()
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    report: dict = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "cross": args.cross,
                    "self_steps": args.self_steps, "blend_threshold": args.blend_threshold, "plain": {}}
    if args.plain:
        report["plain"]["one object"] = plain_accuracy(pipe, num_captions=args.plain, num_objects=1,
                                                       steps=args.steps, guidance=args.guidance)
    if args.plain_two:
        report["plain"]["two objects"] = plain_accuracy(pipe, num_captions=args.plain_two, num_objects=2,
                                                        steps=args.steps, guidance=args.guidance)
    if args.scenes:
        editor = Editor(pipe, blend_res=8, self_replace_max_res=8)
        report["fidelity"] = fidelity(editor, num_scenes=args.scenes, steps=args.steps, guidance=args.guidance,
                                      cross=args.cross, self_steps=args.self_steps,
                                      blend_threshold=args.blend_threshold)
    report["seconds"] = round(time.time() - started, 1)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(report, indent=1))
        write_text_atomic(args.out.with_suffix(".md"), text + "\n")


if __name__ == "__main__":
    sys.exit(main())
