"""Wall time and peak memory of a P2P edit against plain generation of the same two prompts.

Three things run in one process, alternating, on the same model and latents:
plain generation of [source, edit], a fused P2P edit (1 source + 1 edit), and an explicit P2P edit.
By default the model is Stable Diffusion 1.5's architecture with random weights (the cost does not
depend on the weights) at 256 px and a few steps, so that it runs on a CPU in minutes.

    python benchmarks/edit_vs_generate.py                                 # CPU default
    python benchmarks/edit_vs_generate.py --size 512 --steps 50 --dtype float16 --device cuda
"""

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the first is a warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--model", default=None, help="a real checkpoint instead of the random SD-1.5 architecture")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:
        from prompt2prompt.loading import load_pipeline

        pipe = load_pipeline(args.model, device=args.device, torch_dtype=dtype)
    else:
        from pipelines import sd15_random_pipeline

        pipe = sd15_random_pipeline().to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.unet.config.in_channels
    latents = torch.randn(1, c, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size, output_type="latent")
    edit = [p2p.Edit(EDIT, cross_steps=0.8, self_steps=0.4)]
    runs = {
        "plain": lambda: pipe([SOURCE, EDIT], latents=latents.expand(2, -1, -1, -1).to(device, dtype), **common),
        "fused": lambda: p2p.Editor(pipe).edit(SOURCE, edit, latents=latents, **common),
        "explicit": lambda: p2p.Editor(pipe, attention="explicit").edit(SOURCE, edit, latents=latents, **common),
    }
    times = {k: [] for k in runs}
    memory = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            with torch.inference_mode(), PeakMemory(device) as peak:
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            if r > 0 or args.rounds == 1:
                times[name].append(elapsed)
                memory[name].append(peak.used)
            print(f"round {r} {name:8s} {elapsed:7.2f} s  peak {peak.used / 2**20:8.1f} MiB", flush=True)

    t = {k: statistics.median(v) for k, v in times.items()}
    m = {k: max(v) for k, v in memory.items()}
    print(f"\nSD-1.5 architecture{' (' + args.model + ')' if args.model else ', random weights'}, {args.size} px, "
          f"{args.steps} steps, guidance 7.5, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}")
    print("| run | wall time (s) | x plain | peak memory (MiB) | x plain |")
    print("|---|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {t[k]:.2f} | {t[k] / t['plain']:.2f} | {m[k] / 2**20:.0f} | {m[k] / m['plain']:.2f} |")


if __name__ == "__main__":
    main()
