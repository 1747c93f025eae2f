"""`p2p bench`: PIE-Bench, and the shapes benchmark in its format, through the benchmark harness."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .errors import UsageError, console, user_errors
from .options import DeviceOption, DtypeOption
from .runs import output_folder

__all__ = ["bench_app"]

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks: PIE-Bench, and the shapes benchmark in its format.")

MethodsOption = Annotated[str, typer.Option("--inversion", help="Inversion methods, comma-separated.")]
MetricsOption = Annotated[str, typer.Option("--metrics", help="Metrics, comma-separated, from structure_distance, psnr, "
                                                              "lpips, mse, ssim, clip_whole, clip_edited.")]


def _bench_lists(methods: str, metrics: str, guidance: float) -> tuple[list[str], list[str]]:
    """--inversion and --metrics as lists, and --guidance, checked before anything is written or loaded."""
    from ..bench.metrics import METRICS

    if not math.isfinite(guidance):  # click parses "nan" and "inf" as floats
        raise UsageError(f"--guidance must be a finite number, not {guidance}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if not chosen:
        raise UsageError("--inversion names no method; e.g. --inversion ddim,null-text,negative-prompt,direct")
    if unknown := sorted(set(names) - set(METRICS)):
        raise UsageError(f"unknown metrics {unknown}; the metrics are {', '.join(METRICS)}")
    return chosen, names


def _bench(data: Path, out: Path, protocol, methods: str, metrics: str, *, types: str | None, dino: str, clip: str,
           workers: int, ray: str | None, device: str | None, dtype: str, extra=None) -> None:
    """Run a PIE-format benchmark folder through the harness and print where its table is."""
    from ..bench.metrics import Metrics
    from ..bench.pie import load_pie
    from ..bench.run import run_bench, table
    from ..loading import check_device

    chosen, names = _bench_lists(methods, metrics, protocol.guidance_scale)
    entries = load_pie(data, types=None if types is None else [t.strip() for t in types.split(",")])
    if not entries:
        raise UsageError(f"{str(data)!r} has no entries" + (f" of the editing types {types}" if types else ""))
    scorer = Metrics(names, device=check_device(device), dino=dino, clip=clip) if names else None
    result = run_bench(entries, out, methods=chosen, protocol=protocol, metrics=scorer, extra=extra, device=device,
                       dtype=dtype, workers=workers, ray_address=ray)
    table(result, out)
    typer.echo((out / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"written to {out / 'table.md'} (also table.csv, table.json)")
    failed = sum(len(f) for f in result.failed.values())
    if failed:
        console.print(f"[red]{failed} edits failed[/red]: their errors are in each method's results.jsonl; run again "
                      "to retry them", highlight=False)
        raise typer.Exit(1)


@bench_app.command("pie")
def bench_pie(
    data: Annotated[Path, typer.Option(help="The PIE-Bench folder (mapping_file.json, annotation_images/).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder; run again on it to resume.", show_default=False)],
    model: Annotated[str, typer.Option(help="Hub id, diffusers folder, .safetensors file, or 'demo'.")] = "CompVis/stable-diffusion-v1-4",
    inversion: MethodsOption = "ddim,null-text,negative-prompt,direct",
    metrics: MetricsOption = "structure_distance,psnr,lpips,mse,ssim,clip_whole,clip_edited",
    types: Annotated[str | None, typer.Option(help="Editing types to run, e.g. 0,1,6 (default: all).",
                                              show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    cross: Annotated[float, typer.Option(min=0, max=1, help="Cross-attention window of the refinement.")] = 0.4,
    self_steps: Annotated[float, typer.Option("--self", min=0, max=1, help="Self-attention window.")] = 0.6,
    dino: Annotated[str, typer.Option(help="Structure-distance model: hub id or folder.")] = "facebook/dino-vitb8",
    clip: Annotated[str, typer.Option(help="CLIP-score model: hub id or folder.")] = "openai/clip-vit-large-patch14",
    workers: Annotated[int, typer.Option(min=0, max=1024, help="Worker processes (0: this process).")] = 0,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: auto, ray://HOST:10001, or local.",
                                            show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """PIE-Bench with the published P2P protocol: every method, the seven metrics, the table beside the paper's."""
    with user_errors():
        from ..bench.pie import Protocol

        _bench_lists(inversion, metrics, guidance)
        protocol = Protocol(model=model, num_inference_steps=steps, guidance_scale=guidance, cross_steps=cross,
                            self_steps=self_steps)
        with output_folder(out):
            _bench(data, out, protocol, inversion, metrics, types=types, dino=dino, clip=clip, workers=workers,
                   ray=ray, device=device, dtype=dtype)


@bench_app.command("shapes")
def bench_shapes(
    out: Annotated[Path, typer.Option(help="Output folder (the benchmark's data in out/data); run again to resume.",
                                      show_default=False)],
    model: Annotated[str, typer.Option(help="A shapes-world model: 'demo', 'demo-flow', or a folder.")] = "demo",
    scenes: Annotated[int, typer.Option(min=5, max=10_000, help="Entries, spread over five editing types.")] = 40,
    inversion: Annotated[str | None, typer.Option(
        "--inversion", help="Inversion methods, comma-separated [default: every method of the model's family: "
                            "ddim,null-text,negative-prompt,direct on 'demo', direct,euler on 'demo-flow']",
        show_default=False)] = None,
    metrics: MetricsOption = "psnr,mse,ssim",
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale (5: the demo model's).")] = 5.0,
    workers: Annotated[int, typer.Option(min=0, max=1024, help="Worker processes (0: this process).")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """The shapes benchmark: rendered scenes no model drew, exact masks, the PIE harness on a demo model; prints the
    table (also in --out's table.md) with what each column measures."""
    with user_errors():
        from ..bench.attributes import attribute_success
        from ..bench.pie import Protocol
        from ..bench.shapes import write_shapes_benchmark

        if inversion is None:
            from ..loading import inversion_methods

            inversion = ",".join(inversion_methods(model))
        _bench_lists(inversion, metrics, guidance)
        protocol = Protocol(model=model, num_inference_steps=steps, guidance_scale=guidance)
        with output_folder(out):
            write_shapes_benchmark(out / "data", num_scenes=scenes)
            _bench(out / "data", out, protocol, inversion, metrics, types=None, dino="", clip="", workers=workers,
                   ray=None, device=device, dtype=dtype, extra=attribute_success)
