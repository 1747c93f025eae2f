"""The embedded demo: the shapes world, its trained text-to-image model, and the demo edits."""

from .showcase import MODEL_DIR, run_demo

__all__ = ["MODEL_DIR", "run_demo"]
