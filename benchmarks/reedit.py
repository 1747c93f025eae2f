"""Re-editing a cached source against a fresh edit: wall time, peak memory and the cache's size.

Two things run in one process, alternating, on the same model and latent: a fresh P2P edit (1 source +
1 edit) and the same edit on a `SourceCache` of the source, made once before the timed rounds. By default
the model is Stable Diffusion 1.5's architecture with random weights (the cost does not depend on the
weights) at 256 px and 3 steps, so that it runs on a CPU in minutes; `--arch sd3` and `--arch flux` are
SD3-medium's and Flux.1-dev's transformers at their real widths with `--depth` blocks of each kind (see
`edit_vs_generate.py`), at the model's own guidance.

    python benchmarks/reedit.py                                                         # CPU default
    python benchmarks/reedit.py --arch flux --depth 2 --max-sequence-length 128         # CPU: 256 px
    python benchmarks/reedit.py --size 512 --steps 50 --dtype float16 --device cuda --json reedit.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_vs_generate import EDIT, SOURCE, PeakMemory, build_pipeline  # noqa: E402  (re-executes with a fixed mmap threshold)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import prompt2prompt as p2p  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "sd3", "flux"], help="random-weight architecture")
    parser.add_argument("--depth", type=int, default=2, help="sd3/flux: blocks of each kind")
    parser.add_argument("--single-depth", type=int, default=None, help="flux: single-stream blocks [default: --depth]")
    parser.add_argument("--max-sequence-length", type=int, default=128, help="sd3/flux: T5 tokens")
    parser.add_argument("--model", default=None, help="a real checkpoint instead of a random architecture")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the first is a warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cache-device", default=None, help="where the cache lives (default: the run's device)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline (a smoke check)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny and args.arch in ("sd3", "flux"):
        args.size = 32
    pipe = build_pipeline(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    editor = p2p.Editor(pipe)
    guidance = editor.family.default_guidance
    settings = dict(num_inference_steps=args.steps, guidance_scale=guidance, height=args.size, width=args.size)
    if editor.family.takes_max_sequence_length:
        settings["max_sequence_length"] = args.max_sequence_length
    edit = [p2p.Edit(EDIT, cross_steps=0.8, self_steps=0.4)]

    with torch.inference_mode(), PeakMemory(device) as peak:
        start = time.perf_counter()
        cache = editor.cache_source(SOURCE, seed=0, device=args.cache_device, **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cache_seconds = time.perf_counter() - start
    print(f"cache_source {cache_seconds:7.2f} s  peak {peak.used / 2**20:8.1f} MiB  cache {cache.nbytes / 2**20:.1f} MiB "
          f"on {cache.device}", flush=True)

    runs = {
        "fresh": lambda: editor.edit(SOURCE, edit, seed=0, output_type="latent", **settings),
        "re-edit": lambda: editor.edit(SOURCE, edit, cache=cache, output_type="latent", **{
            k: v for k, v in settings.items() if k == "max_sequence_length"}),
    }
    times = {k: [] for k in runs}
    memory = {k: [] for k in runs}
    outputs = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            with torch.inference_mode(), PeakMemory(device) as peak:
                start = time.perf_counter()
                outputs[name] = fn().images
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            if r > 0 or args.rounds == 1:
                times[name].append(elapsed)
                memory[name].append(peak.used)
            print(f"round {r} {name:8s} {elapsed:7.2f} s  peak {peak.used / 2**20:8.1f} MiB", flush=True)

    t = {k: statistics.median(v) for k, v in times.items()}
    m = {k: max(v) for k, v in memory.items()}
    difference = (outputs["fresh"].float() - outputs["re-edit"].float()).abs().max().item()
    arch = {"sd15": "SD-1.5", "sdxl": "SDXL", "sd3": f"SD3-medium ({args.depth} blocks)",
            "flux": f"Flux.1-dev ({args.depth}+{args.single_depth or args.depth} blocks)"}[args.arch] + " architecture"
    if editor.family.takes_max_sequence_length:
        arch += f", T5 length {args.max_sequence_length}"
    weights = f" ({args.model})" if args.model else ("tests' tiny pipeline" if args.tiny else "random weights")
    title = (f"{arch}, {weights}, {args.size} px, {args.steps} steps, guidance {guidance}, {args.device} {args.dtype}, "
             f"torch threads {torch.get_num_threads()}")
    print(f"\n{title}")
    print("| run | wall time (s) | x fresh | peak memory (MiB) | x fresh |")
    print("|---|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {t[k]:.2f} | {t[k] / t['fresh']:.2f} | {m[k] / 2**20:.0f} | "
              f"{m[k] / m['fresh'] if m['fresh'] else float('nan'):.2f} |")
    print(f"\ncache: {cache.nbytes / 2**20:.1f} MiB on {cache.device}, made in {cache_seconds:.2f} s; "
          f"re-edit vs fresh latents: max abs difference {difference:.2e}")
    if args.json:
        result = dict(title=title, args=vars(args), seconds=t, peak_bytes=m, cache_bytes=cache.nbytes,
                      cache_seconds=cache_seconds, max_abs_difference=difference,
                      ratio_seconds=t["re-edit"] / t["fresh"],
                      ratio_memory=m["re-edit"] / m["fresh"] if m["fresh"] else None)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
