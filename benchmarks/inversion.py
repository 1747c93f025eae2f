"""Cost and reconstruction PSNR of each inversion method, against one plain generation and one P2P edit.

Per image, in one process and alternating: plain generation of the caption, one P2P edit (source + 1 edit
prompt), and the inversion by each method. Times are medians over the rounds after a warm-up, as ratios to
plain generation and to the edit (same model, steps and guidance). PSNR is that of the edit's source row on
the inversion (the reconstruction) against the input image, averaged over the images; "vae" is the VAE's own
round trip, the ceiling of every method.

    .venv/bin/python benchmarks/inversion.py                         # SD 1.5 architecture, random weights, 256 px
    .venv/bin/python benchmarks/inversion.py --model demo --steps 50 --images 8     # the shipped demo model
    .venv/bin/python benchmarks/inversion.py --size 512 --steps 50 --device cuda --dtype float16 --json inv.json

The random model times the methods (cost does not depend on the weights, except null-text's early stop, which
a random model never reaches: its figure there is the worst case). A trained model gives the PSNR figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prompt2prompt import Edit, Editor
from prompt2prompt.images import prepare_image, psnr
from prompt2prompt.families.unet import UNetFamily
from prompt2prompt.inversion import encode_image, invert

METHODS = UNetFamily.inversion_methods

COLORS = ("red", "green", "blue", "yellow", "purple")
CAPTION = "a big red circle on the left on a white background"


def _synthetic(size: int) -> Image.Image:
    """A photo stand-in for a random model: a red disc on a white-to-grey gradient."""
    ramp = np.linspace(255, 160, size, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))
    ImageDraw.Draw(image).ellipse([size * 0.1, size * 0.3, size * 0.5, size * 0.7], fill=(220, 30, 30))
    return image


def _recolor(caption: str) -> str:
    """The caption with its first colour word swapped for the next colour: the benchmark's edit."""
    words = caption.split(" ")
    for k, word in enumerate(words):
        if word in COLORS:
            words[k] = COLORS[(COLORS.index(word) + 1) % len(COLORS)]
            return " ".join(words)
    return caption + " in green"


def _scenes(args) -> list[tuple[Image.Image, str]]:
    if args.image:
        return [(Image.open(args.image), args.prompt or CAPTION)]
    if args.model == "demo" or args.shapes:
        from prompt2prompt.demo import world

        rendered = [world.render(world.sample_scene(40_000_000 + k, split="heldout")) for k in range(args.images)]
        return [(Image.fromarray(r.image), r.caption) for r in rendered]
    return [(_synthetic(args.size or 256), args.prompt or CAPTION)] * args.images


def _timed(fn, device: torch.device, calls: list[int]):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, first = time.perf_counter(), calls[0]
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, calls[0] - first, out


def _decode(pipe, latents: torch.Tensor) -> Image.Image:
    with torch.no_grad():
        pixels = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    array = ((pixels[0].float().permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return Image.fromarray(array)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="'demo', a diffusers folder or a hub id (default: SD 1.5 "
                        "architecture with random weights)")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 256 for the random model, "
                        "else the model's own)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--images", type=int, default=1, help="images to average the PSNR over")
    parser.add_argument("--image", default=None, help="one image file to invert instead")
    parser.add_argument("--prompt", default=None, help="the caption of --image")
    parser.add_argument("--shapes", action="store_true", help="use held-out shapes-world scenes as images")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per image (after one warm-up)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--inner-steps", type=int, default=10, help="null-text's Adam iterations per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.model is None:
        from pipelines import sd15_random_pipeline

        pipe = sd15_random_pipeline(device=device, dtype=dtype)  # built on the device: fast on a GPU
        args.size = args.size or 256
    else:
        from prompt2prompt.loading import load_pipeline

        pipe = load_pipeline(args.model, device=device, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler every inversion edits with
    editor = Editor(pipe)
    size = dict(height=args.size, width=args.size) if args.size else {}
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)

    calls = [0]  # UNet forward passes, whatever their batch: the cost unit on a small model
    pipe.unet.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    counts: dict[str, list[int]] = {name: [] for name in ["generate", "edit", *args.methods]}
    times: dict[str, list[float]] = {name: [] for name in ["generate", "edit", *args.methods]}
    scores: dict[str, list[float]] = {name: [] for name in ["vae", *args.methods]}
    scenes = _scenes(args)
    for index, (image, caption) in enumerate(scenes):
        fitted = prepare_image(pipe, image, **size)
        height, width = fitted.height, fitted.width
        scores["vae"].append(psnr(_decode(pipe, encode_image(pipe, fitted)), fitted))
        for round_ in range(args.rounds + (index == 0)):
            keep = not (index == 0 and round_ == 0)
            generator = torch.Generator("cpu").manual_seed(round_)
            runs = {
                "generate": lambda: pipe(caption, generator=generator, height=height, width=width,
                                         output_type="latent", **common),
                "edit": lambda: editor.edit(caption, [Edit(_recolor(caption))], seed=round_, height=height,
                                            width=width, output_type="latent", **common),
            }
            for method in args.methods if keep else ["ddim"]:  # the warm-up skips the costly methods
                runs[method] = lambda method=method: invert(pipe, fitted, caption, method=method, progress=False,
                                                            num_inner_steps=args.inner_steps, **size, **common)
            for name, run in runs.items():
                seconds, count, inv = _timed(run, device, calls)
                if keep:
                    times[name].append(seconds)
                    counts[name].append(count)
                if name in args.methods and round_ == args.rounds + (index == 0) - 1:
                    source = editor.edit(caption, [], inversion=inv, output_type="latent").images[:1]
                    scores[name].append(psnr(_decode(pipe, source), fitted))
        print(f"image {index + 1}/{len(scenes)}: {caption!r}", file=sys.stderr)

    model = args.model or "SD 1.5 architecture, random weights"
    print(f"model: {model}; {height}x{width} px, {args.steps} steps, guidance {args.guidance}, {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} threads; {len(scenes)} image(s), {args.rounds} round(s)")
    generate, edit = statistics.median(times["generate"]), statistics.median(times["edit"])
    print()
    print("| method | time (s) | x plain generation | x one edit | UNet passes | reconstruction PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    rows = [("plain generation (1 prompt)", "generate"), ("one P2P edit (source + 1 edit)", "edit")]
    for name, key in rows + [(f"{method} inversion", method) for method in args.methods]:
        seconds = statistics.median(times[key])
        score = f"{statistics.mean(scores[key]):.2f}" if key in scores else ""
        print(f"| {name} | {seconds:.2f} | {seconds / generate:.2f} | {seconds / edit:.2f} "
              f"| {statistics.mean(counts[key]):.0f} | {score} |")
    print(f"| (VAE round trip, the ceiling) | | | | | {statistics.mean(scores['vae']):.2f} |")

    if args.json:
        methods = {}
        for name, key in rows + [(f"{method} inversion", method) for method in args.methods]:
            seconds = statistics.median(times[key])
            methods[key] = {"name": name, "seconds": seconds, "vs_generate": seconds / generate,
                            "vs_edit": seconds / edit, "unet_passes": statistics.mean(counts[key]),
                            "round_seconds": times[key],
                            "psnr_db": statistics.mean(scores[key]) if key in scores else None}
        result = {
            "benchmark": "inversion", "model": model, "height": height, "width": width, "steps": args.steps,
            "guidance": args.guidance, "inner_steps": args.inner_steps, "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "images": len(scenes), "rounds": args.rounds, "methods": methods,
            "vae_psnr_db": statistics.mean(scores["vae"]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
