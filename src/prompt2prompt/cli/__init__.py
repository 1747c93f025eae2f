"""The `p2p` command line: edit by typing, see the attention, replay any result, serve the web app.

One module per command group (`edit`: edit and attention; `replay`; `serve`: serve and demo; `batch`; `bench`),
on the shared options (`options`), run plumbing (`runs`), error reporting (`errors`) and step bar (`progress`).

Exit codes: 0 ok, 2 usage error (bad arguments, prompts or words), 1 runtime error (model, files, device).
"""

from __future__ import annotations

import os
import tempfile

# torch._dynamo, which diffusers imports, makes $TMPDIR/torchinductor_<user> as it is imported. `p2p` compiles
# nothing, so that cache points at the temp folder itself, which exists: a command makes no folder outside --out.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.gettempdir())

import typer

# Only modules that import no torch, at the top: `p2p --help` (and a usage error) answers at once. The engine,
# the loaders and the recipes (torch, diffusers) are imported inside the commands that run a model.
from . import batch, bench, edit, replay, serve
from .errors import Commands

__all__ = ["app", "main"]

app = typer.Typer(
    # No rich markup in help: prompts and defaults are written in square brackets, which rich would swallow.
    cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Prompt-to-Prompt: edit images by editing their prompt.",
)
for command in (edit.edit, edit.attention, replay.replay, serve.serve, serve.demo, batch.batch):
    app.command()(command)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    """Entry point of the `p2p` command."""
    app()
