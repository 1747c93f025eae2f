"""prompt2prompt: edit images by editing their prompt (Prompt-to-Prompt on diffusers)."""

from .editor import Edit, Editor, EditResult, LocalBlend
from .inversion import Inversion, invert
from .visualize import attention_heatmaps, image_grid

__version__ = "0.1.0"

__all__ = ["Edit", "EditResult", "Editor", "Inversion", "LocalBlend", "attention_heatmaps", "image_grid", "invert"]
