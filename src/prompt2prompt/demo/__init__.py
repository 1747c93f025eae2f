"""The embedded demo: the shapes world, its trained text-to-image model, and the demo edits."""

from ..loading import DEMO_MODEL as MODEL_DIR  # the embedded UNet model's folder, as `--model demo` finds it
from .showcase import run_demo

__all__ = ["MODEL_DIR", "run_demo"]
