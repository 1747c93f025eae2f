"""`p2p serve` (the web app) and `p2p demo` (the built-in demo edits)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .errors import UsageError, console, user_errors
from .options import AllowPickleOption, DeviceOption, DtypeOption
from .runs import output_folder

__all__ = ["demo", "serve"]


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the app to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    model: Annotated[list[str], typer.Option("--model", envvar="P2P_MODEL",
                                             help="Model(s) to offer (repeatable); the first is the default.")] = ["demo"],  # noqa: B006
    out: Annotated[Path, typer.Option(help="The only folder the app writes to.")] = Path("outputs/web"),
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024, help="Largest accepted upload.")] = 10.0,
    cache_mb: Annotated[float, typer.Option(min=0, max=2**20, help="Memory for the sources and inversions of recent "
                                                                  "runs, reused when only the edits change.")] = 2048,
    queue: Annotated[int, typer.Option(min=1, max=10_000, help="Requests that may wait for their turn (runs go one "
                                                               "at a time); one more is told the queue is full.")] = 64,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Start the web app."""
    with user_errors():
        for option, value in (("--max-upload-mb", max_upload_mb), ("--cache-mb", cache_mb)):
            if math.isnan(value):  # NaN passes click's range checks
                raise UsageError(f"{option} must be a number, not {value}")
        from ..loading import check_device, parse_dtype

        parse_dtype(dtype, check_device(device))
        try:
            from ..webapp import launch
        except ImportError as error:
            raise RuntimeError(f"the web app needs the 'web' extra ({error}): pip install 'prompt2prompt[web]'") from None
        with output_folder(out):
            console.print(f"starting the web app on http://{host}:{port} with {', '.join(model)} (Ctrl+C stops it)",
                          highlight=False)
            launch(models=model, host=host, port=port, out_dir=out, max_upload_mb=max_upload_mb, device=device,
                   dtype=dtype, cache_mb=cache_mb, allow_pickle=allow_pickle, queue_size=queue)


def demo(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/demo"),
         model: Annotated[str, typer.Option(help="An embedded model: 'demo' (UNet) or 'demo-flow' (joint attention, "
                                                 "SD3-style), or a shapes-world model folder.")] = "demo") -> None:
    """Run the built-in demo edits on an embedded demo model."""
    with user_errors():
        from ..loading import quiet_loading

        try:
            from ..demo import run_demo
        except ImportError as error:
            raise RuntimeError(f"the demo is missing from this install ({error})") from None
        with output_folder(out), quiet_loading():
            paths = run_demo(out, model=model)
    for path in paths:
        typer.echo(str(path))
