"""prompt2prompt: edit images by editing their prompt (Prompt-to-Prompt on diffusers)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Edit", "EditResult", "Editor", "Inversion", "LocalBlend", "attention_heatmaps", "image_grid", "invert"]

# Where each public name lives. They load on first use (PEP 562): the modules import torch, and the inversion
# diffusers (and so torch._dynamo, which makes a cache folder in $TMPDIR as it is imported), so that importing a
# light submodule (`prompt2prompt.cli`, whose `p2p --help` needs neither) costs no torch import, and `p2p` can
# place that cache first.
_HOMES = {"Edit": "edits", "LocalBlend": "edits", "Editor": "engine", "EditResult": "engine",
          "attention_heatmaps": "visualize", "image_grid": "visualize", "Inversion": "inversion", "invert": "inversion"}

if TYPE_CHECKING:
    from .edits import Edit, LocalBlend
    from .engine import Editor, EditResult
    from .inversion import Inversion, invert
    from .visualize import attention_heatmaps, image_grid


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'prompt2prompt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
