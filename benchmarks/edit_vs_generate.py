"""Wall time and peak memory of a P2P edit against plain generation of the same two prompts.

Three things run in one process, alternating, on the same model and latents:
plain generation of [source, edit], a fused P2P edit (1 source + 1 edit), and an explicit P2P edit.
By default the model is Stable Diffusion 1.5's architecture with random weights (the cost does not
depend on the weights) at 256 px and a few steps, so that it runs on a CPU in minutes. `--arch sdxl` is
SDXL base's architecture (random weights, 1024 px by default: build it on a GPU). `--arch sd3` and
`--arch flux`, `--arch chroma` and `--arch pixart` are SD3-medium's, Flux.1-dev's, Chroma1-HD's and PixArt-Σ's
transformers at their real widths with `--depth` blocks
(Flux: that many double- and single-stream blocks), tiny text encoders of the real output widths, and a T5
length of `--max-sequence-length` (128 on the CPU by default; the pipelines' own are 256 and 512). `--arch
qwenimage` is Qwen-Image's transformer at its real width (24 heads of 128, text width 3584) with `--depth` blocks
and a one-layer text encoder of the real width; its text is each call's longest prompt, as the pipeline pads it.
`--arch flux2-klein` is FLUX.2 klein 4B's transformer (24 heads of 128, text width 7680) with `--depth` double- and
`--single-depth` single-stream blocks, and a minimal Qwen3 of the real width; its text is `--max-sequence-length`.
`--arch flux2-dev` is FLUX.2 dev's transformer (48 heads of 128, text width 15360, embedded guidance) with `--depth`
double- and `--single-depth` single-stream blocks (the real model: 8 and 48), and a minimal Mistral3 of the real
width; its text is `--max-sequence-length` (its system message and chat template included, padded on the left).
`--arch zimage` is Z-Image's transformer at its real width (30 heads of 128, caption width 2560) with `--depth` of its
30 main blocks (the two noise- and two context-refiner blocks kept) and a two-layer Qwen3 of the real width; its text
is each prompt's templated caption padded to a multiple of 32 (`--max-sequence-length` only bounds the encoder's input).
`--tiny` swaps in the tests' tiny pipeline of the same family: a check of the plumbing, not a benchmark.

    python benchmarks/edit_vs_generate.py                                 # CPU default
    python benchmarks/edit_vs_generate.py --size 512 --steps 50 --dtype float16 --device cuda --json sd15.json
    python benchmarks/edit_vs_generate.py --arch sdxl --steps 20 --dtype float16 --device cuda --json sdxl.json
    python benchmarks/edit_vs_generate.py --arch flux                      # CPU: 256 px, 2 + 2 blocks
    python benchmarks/edit_vs_generate.py --arch sd3 --size 1024 --steps 28 --depth 24 --max-sequence-length 256 \
        --dtype bfloat16 --device cuda

On CUDA, peak memory is torch.cuda.max_memory_allocated above what was allocated before the run (the
model); on a CPU it is the resident-set growth. A run that runs out of GPU memory is reported as OOM.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

# glibc raises its mmap threshold after large frees, after which freed tensors stay in the heap and
# RSS stops tracking what is in use; a fixed threshold keeps CPU peak-memory readings honest.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import prompt2prompt as p2p

SOURCE = "a painting of a squirrel eating a burger"
EDIT = "a painting of a lion eating a burger"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator stats, or RSS sampled every millisecond on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.used = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.used = max(self.peak, _rss()) - self.base


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# the transformers (benchmark pipelines at the real widths)
MMDIT = ("sd3", "flux", "chroma", "pixart", "qwenimage", "flux2-klein", "flux2-dev", "zimage")


def build_pipeline(args, device: torch.device, dtype: torch.dtype):
    if args.model:
        from prompt2prompt.loading import load_pipeline

        return load_pipeline(args.model, device=args.device, torch_dtype=dtype)
    import pipelines

    if args.arch in ("flux2-klein", "flux2-dev"):
        import flux2_pipelines

        kind = args.arch.removeprefix("flux2-")
        if args.tiny:
            tiny = flux2_pipelines.tiny_flux2_klein_pipeline if kind == "klein" else flux2_pipelines.tiny_flux2_pipeline
            return tiny().to(device=device, dtype=dtype)
        # built on the device, its transformer in `dtype`: dev's 8 + 48 blocks take 64 GB in bfloat16
        return flux2_pipelines.flux2_benchmark_pipeline(kind, args.depth, single_depth=args.single_depth,
                                                        device=device, dtype=dtype)
    if args.arch == "zimage":
        import zimage_pipelines

        if args.tiny:
            return zimage_pipelines.tiny_zimage_pipeline().to(device=device, dtype=dtype)
        # built on the device, its transformer in `dtype`: the 30 + 4 blocks take 25 GB in float32
        return zimage_pipelines.zimage_benchmark_pipeline(args.depth, device=device, dtype=dtype)
    if args.arch == "qwenimage":
        import qwen_pipelines

        if args.tiny:
            return qwen_pipelines.tiny_qwenimage_pipeline().to(device=device, dtype=dtype)
        # built on the device, its transformer in `dtype`: 60 blocks in float32 would not fit an H100
        return qwen_pipelines.qwenimage_benchmark_pipeline(args.depth, device=device, dtype=dtype)
    if args.arch in MMDIT:
        import mmdit_pipelines

        if args.tiny:
            tiny = getattr(mmdit_pipelines, f"tiny_{args.arch}_pipeline")
            return tiny().to(device=device, dtype=dtype)
        return mmdit_pipelines.mmdit_benchmark_pipeline(args.arch, args.depth, single_depth=args.single_depth,
                                                        device=device, dtype=dtype)
    if args.tiny:
        pipe = pipelines.tiny_sdxl_pipeline() if args.arch == "sdxl" else pipelines.tiny_sd_pipeline()
        return pipe.to(device=device, dtype=dtype)
    build = pipelines.sdxl_random_pipeline if args.arch == "sdxl" else pipelines.sd15_random_pipeline
    return build(device=device, dtype=dtype)  # built on the device: a GPU inits billions of weights in seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", *MMDIT], help="random-weight architecture")
    parser.add_argument("--depth", type=int, default=2, help="sd3/flux: blocks of each kind")
    parser.add_argument("--single-depth", type=int, default=None, help="flux: single-stream blocks [default: --depth]")
    parser.add_argument("--skip-explicit", action="store_true", help="time plain and fused only (big models)")
    parser.add_argument("--max-sequence-length", type=int, default=128, help="sd3/flux: T5 tokens")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline of --arch (a smoke check)")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 256 for sd15, 1024 for sdxl)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the first is a warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--model", default=None, help="a real checkpoint instead of a random architecture")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size is None:
        args.size = 32 if args.tiny and args.arch in MMDIT else 1024 if args.arch == "sdxl" and not args.tiny else 256

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()
    pipe = build_pipeline(args, device, dtype)
    build_seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    family = p2p.Editor(pipe).family
    latents = torch.randn(1, *family.latent_shape(args.size, args.size), generator=torch.Generator().manual_seed(0))
    plain_latents = family.call_latents(latents.expand(2, -1, -1, -1).to(device, dtype))
    guidance = family.default_guidance
    common = dict(num_inference_steps=args.steps, guidance_scale=guidance, height=args.size, width=args.size, output_type="latent")
    if family.takes_max_sequence_length:
        common["max_sequence_length"] = args.max_sequence_length
    edit = [p2p.Edit(EDIT, cross_steps=0.8, self_steps=0.4)]
    if family.name == "chroma":  # plain generation with its padding mask applied as the Editor applies it
        from prompt2prompt.families.chroma import masked_processors

        masked_processors(pipe)
    plain_kwargs = dict(getattr(family, "fixed_call", {}))  # PixArt-Σ: the text and size as an edit has them
    # the pipeline's own keywords for the editor's settings (Qwen-Image: guidance is true_cfg_scale, with a negative)
    plain_call = family.pipeline_call({"prompt": [SOURCE, EDIT], "latents": plain_latents, **common, **plain_kwargs})

    def plain():  # fresh prompt lists every call: Z-Image's pipeline writes its templated prompts back into them
        return pipe(**{k: list(v) if isinstance(v, list) else v for k, v in plain_call.items()})

    runs = {
        "plain": plain,
        "fused": lambda: p2p.Editor(pipe).edit(SOURCE, edit, latents=latents, **common),
        "explicit": lambda: p2p.Editor(pipe, attention="explicit").edit(SOURCE, edit, latents=latents, **common),
    }
    if args.skip_explicit:
        del runs["explicit"]
    times = {k: [] for k in runs}
    cpu_times = {k: [] for k in runs}  # the process's CPU seconds: on a shared CPU, what other jobs do not inflate
    memory = {k: [] for k in runs}
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            if name in failed:
                continue
            try:
                with torch.inference_mode(), PeakMemory(device) as peak:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            except OOM as error:
                failed[name] = "OOM"
                print(f"round {r} {name:8s} out of memory: {str(error).splitlines()[0]}", flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if r > 0 or args.rounds == 1:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                memory[name].append(peak.used)
            print(f"round {r} {name:8s} {elapsed:7.2f} s (CPU {cpu:7.2f} s)  peak {peak.used / 2**20:8.1f} MiB",
                  flush=True)

    t = {k: statistics.median(v) if v and k not in failed else None for k, v in times.items()}
    m = {k: max(v) if v and k not in failed else None for k, v in memory.items()}

    def ratio(a, b):
        return a / b if a is not None and b else None

    arch = {"sd15": "SD-1.5", "sdxl": "SDXL", "sd3": f"SD3-medium ({args.depth} blocks)",
            "flux": f"Flux.1-dev ({args.depth}+{args.depth} blocks)",
            "chroma": f"Chroma1-HD ({args.depth}+{args.depth} blocks)",
            "pixart": f"PixArt-Σ ({args.depth} blocks)",
            "qwenimage": f"Qwen-Image ({args.depth} blocks)",
            "flux2-klein": f"FLUX.2 klein 4B ({args.depth}+{args.single_depth or args.depth} blocks)",
            "flux2-dev": f"FLUX.2 dev ({args.depth}+{args.single_depth or args.depth} blocks)",
            "zimage": f"Z-Image ({args.depth} blocks + 2+2 refiner blocks)"}[args.arch]
    arch += " architecture"
    # Qwen-Image's and Z-Image's are a bound, not a padding
    if family.takes_max_sequence_length and args.arch not in ("qwenimage", "zimage"):
        arch += f", text length {args.max_sequence_length}"
    weights = f" ({args.model})" if args.model else (", tests' tiny pipeline" if args.tiny else ", random weights")
    title = (f"{arch}{weights}, {args.size} px, {args.steps} steps, guidance {guidance}, {args.device} {args.dtype}, "
             f"torch threads {torch.get_num_threads()}")
    print(f"\n{title}")
    print("| run | wall time (s) | x plain | peak memory (MiB) | x plain |")
    print("|---|---|---|---|---|")
    for k in runs:
        if k in failed:
            print(f"| {k} | {failed[k]} | | {failed[k]} | |")
            continue
        tr, mr = ratio(t[k], t["plain"]), ratio(m[k], m["plain"])
        print(f"| {k} | {t[k]:.2f} | {'' if tr is None else f'{tr:.2f}'} | {m[k] / 2**20:.0f} "
              f"| {'' if mr is None else f'{mr:.2f}'} |")

    if args.json:
        result = {
            "benchmark": "edit_vs_generate", "title": title, "arch": args.arch, "tiny": args.tiny,
            "model": args.model or "random", "size": args.size, "steps": args.steps, "guidance": guidance,
            "rounds": args.rounds, "warmup_rounds": 1 if args.rounds > 1 else 0, "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "build_seconds": build_seconds,
            "memory_measure": "cuda max_memory_allocated above the allocated baseline" if device.type == "cuda"
            else "resident-set growth",
            "runs": {k: {"status": failed.get(k, "ok"), "seconds": t[k], "peak_bytes": m[k],
                         "round_seconds": times[k], "round_cpu_seconds": cpu_times[k],
                         "round_peak_bytes": memory[k],
                         "time_vs_plain": ratio(t[k], t["plain"]), "memory_vs_plain": ratio(m[k], m["plain"])}
                     for k in runs},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
