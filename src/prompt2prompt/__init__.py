"""prompt2prompt: edit images by editing their prompt (Prompt-to-Prompt on diffusers)."""

from .edits import Edit, LocalBlend
from .engine import Editor, EditResult
from .visualize import attention_heatmaps, image_grid

__version__ = "0.1.0"

__all__ = ["Edit", "EditResult", "Editor", "Inversion", "LocalBlend", "attention_heatmaps", "image_grid", "invert"]


def __getattr__(name: str):
    # The inversion module imports diffusers (and so torch._dynamo, which makes a cache folder in $TMPDIR as it is
    # imported): it loads on first use, so that `import prompt2prompt` is light and `p2p` can place that cache first.
    if name in ("Inversion", "invert"):
        from . import inversion

        return getattr(inversion, name)
    raise AttributeError(f"module 'prompt2prompt' has no attribute {name!r}")
