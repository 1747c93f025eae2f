"""Jobs per minute of `p2p batch` on this machine: a process pool and local Ray, in one run, on the same jobs.

Each configuration runs the same manifest into a fresh output folder. Two rates are printed per row:
end to end (worker start and model load included, what a short run sees) and steady (from the first job
finished to the last, what a long run converges to). The model is the tests' tiny random SD pipeline, so the
numbers measure the runner's overhead and batching more than the UNet; on a GPU, run with a real model:

    python benchmarks/batch_throughput.py                                   # tiny model, this CPU
    python benchmarks/batch_throughput.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 50 \\
        --size 512 --jobs 64 --device cuda --batch-sizes 1 8
"""

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prompt2prompt.batch import INDEX, load_manifest, run_batch  # noqa: E402

ANIMALS = ["cat", "dog", "fox", "owl", "bear", "horse", "lion", "duck"]


def write_manifest(path: Path, *, jobs: int, steps: int, size: int | None, model: str) -> Path:
    """`jobs` word swaps of one model and settings, each with its own seed."""
    lines = []
    for i in range(jobs):
        a, b = ANIMALS[i % len(ANIMALS)], ANIMALS[(i + 3) % len(ANIMALS)]
        job = {"source": f"a {a} riding a bike", "edits": [f"a {b} riding a bike"], "seed": i,
               "num_inference_steps": steps, "model": model}
        if size:
            job.update(height=size, width=size)
        lines.append(json.dumps(job))
    path.write_text("\n".join(lines) + "\n")
    return path


def steady_rate(out: Path) -> float:
    """Jobs per minute after the first forward batch finished: the jobs finished later, over the time they took."""
    finished = sorted(datetime.fromisoformat(json.loads(line)["finished"]).timestamp()
                      for line in (out / INDEX).read_text().splitlines())
    later = [t for t in finished if t > finished[0]]  # a batch's jobs share one finish time
    return 60.0 * len(later) / (finished[-1] - finished[0]) if later else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the tests' tiny random SD pipeline")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: the model's)")
    parser.add_argument("--workers", type=int, default=2, help="pool processes and Ray actors")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from pipelines import tiny_sd_pipeline

            model = str(tmp / "tiny-sd")
            tiny_sd_pipeline().save_pretrained(model)
        manifest = load_manifest(write_manifest(tmp / "jobs.jsonl", jobs=args.jobs, steps=args.steps, size=args.size,
                                                model=model))
        threads = max(1, cpus // args.workers)
        # Pool and Ray alternate, so that a change in the machine's load does not favour one of them.
        configs = [(name, dict(options, workers=args.workers, threads=threads), size) for size in args.batch_sizes
                   for name, options in ((f"pool x{args.workers}", {}), (f"ray x{args.workers}", {"ray_address": "auto"}))]
        print(f"{args.jobs} jobs (1 source + 1 edit, {args.steps} steps) on {'the tiny model' if args.model is None else model}, "
              f"{cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}, load average {os.getloadavg()[0]:.1f}")
        print(f"{'runner':<10} {'batch':>5} {'end-to-end':>14} {'steady':>14} {'load':>6}")
        rates = {}
        for name, options, batch_size in configs:
            if "ray_address" in options and not ray.is_initialized():
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            out = tmp / f"{name.replace(' ', '')}-b{batch_size}"
            summary = run_batch(manifest, out, batch_size=batch_size, device=args.device, progress=False, **options)
            assert summary.done == args.jobs, f"{summary.failed} jobs failed; see {out / INDEX}"
            rates[name, batch_size] = (summary.jobs_per_minute, steady_rate(out))
            print(f"{name:<10} {batch_size:>5} {rates[name, batch_size][0]:>9.1f} /min {rates[name, batch_size][1]:>9.1f} /min "
                  f"{os.getloadavg()[0]:>6.1f}", flush=True)
        ray.shutdown()
    for size in args.batch_sizes:
        plain, distributed = rates[f"pool x{args.workers}", size], rates[f"ray x{args.workers}", size]
        print(f"ray / pool at batch {size}: end-to-end {distributed[0] / plain[0]:.2f}x, steady {distributed[1] / plain[1]:.2f}x")


if __name__ == "__main__":
    main()
