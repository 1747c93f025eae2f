"""Model families: what the engine asks of a pipeline, answered once per kind of model, one file each.

- `unet.UNetFamily`: Stable Diffusion 1.x/2.x and SDXL (a UNet with cross- and self-attention, CLIP text of 77).
- `sd3.SD3Family`: Stable Diffusion 3/3.5 (MM-DiT joint attention; text = 77 CLIP tokens, then the T5 tokens).
- `flux.FluxFamily`: Flux.1 (MM-DiT double- and single-stream blocks, RoPE; text = T5 tokens; packed latents).
- `chroma.ChromaFamily`: Chroma (Flux's blocks; T5 alone, its padding masked; true classifier-free guidance).
- `pixart.PixArtFamily`: PixArt-Σ (a cross-attention DiT at one resolution; T5 text, its padding masked).
- `flux2.Flux2DevFamily`, `flux2.Flux2KleinFamily`: FLUX.2 dev and klein (FLUX.2's double- and single-stream
  blocks; templated text padded to its length, the padding attended: dev's Mistral text on the left with its system
  message, embedded guidance; klein's Qwen3 text on the right, true CFG on the base models).
- `zimage.ZImageFamily`: Z-Image (image-first single-stream blocks after an image-only and a text-only refiner;
  templated Qwen3 text, each caption padded to 32 with an attended learned token; CFG in one batch, conditional
  rows first).
- `qwenimage.QwenImageFamily`: Qwen-Image (double-stream joint attention; templated Qwen2.5-VL text, each call
  padded to its longest prompt and masked; true classifier-free guidance).

`family_of(pipe)` picks one. Outside this package nothing looks at a model's class or kind: callers ask the
family (`base.Family` lists the questions). A new family is one new file here, added to `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import Family
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2DevFamily, Flux2KleinFamily
from .pixart import PixArtFamily
from .qwenimage import QwenImageFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .zimage import ZImageFamily

__all__ = ["FAMILIES", "MAX_TEXT_LENGTH", "Family", "family_named", "family_of", "inversion_methods",
           "listed", "pipeline_class_for", "single_file_class", "single_file_models", "supported_models"]

FAMILIES: tuple[type[Family], ...] = (UNetFamily, SD3Family, FluxFamily, ChromaFamily, PixArtFamily, QwenImageFamily,
                                      Flux2KleinFamily, Flux2DevFamily, ZImageFamily)
# The longest `max_sequence_length` any family takes: the bound before the model is known (a manifest's line); a
# run checks its own family's `max_text_length`.
MAX_TEXT_LENGTH = max(family.max_text_length or 0 for family in FAMILIES)


def family_of(pipe) -> Family:
    """The family of a diffusers pipeline; a clear error for one the engine does not drive."""
    for family in FAMILIES:
        if family.detect(pipe):
            return family(pipe)
    transformer = getattr(pipe, "transformer", None)
    inner = type(transformer).__name__ if transformer is not None else "no unet or transformer"
    raise TypeError(f"Editor needs a {supported_models()} pipeline; {type(pipe).__name__} (with {inner}) is not one")


def family_named(name: str) -> type[Family]:
    """The family class that recipes and manifests record as `name`."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; the families are {', '.join(f.name for f in FAMILIES)}")


def inversion_methods() -> tuple[str, ...]:
    """Every family's inversion methods, each once."""
    return tuple(dict.fromkeys(method for family in FAMILIES for method in family.inversion_methods))


def single_file_models() -> tuple[str, str]:
    """(the models that load from one original checkpoint, those that load from a folder or hub id only), for a
    message."""
    single = [family.title for family in FAMILIES if family.loads_single_file]
    others = [family.title for family in FAMILIES if not family.loads_single_file]
    return listed(single), listed(others) if others else ""


def supported_models() -> str:
    """The models the families drive, for a message."""
    return listed([family.title for family in FAMILIES], "or")


def listed(titles: Sequence[str], last: str = "and") -> str:
    """Titles for a message: "A", "A and B", "A, B and C"."""
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + f" {last} " + titles[-1]


def pipeline_class_for(index: Mapping[str, Any]) -> tuple[str, type[Family]] | None:
    """(pipeline class name, family) to load a diffusers folder with, from its model_index.json; None if no family's."""
    for family in reversed(FAMILIES):  # the most specific first: a UNet folder is any folder with a "unet"
        name = family.pipeline_class_for(index)
        if name is not None:
            return name, family
    return None


def single_file_class(names: Sequence[str]) -> str | None:
    """The pipeline class of an original single-file checkpoint, from its weight names; None if no family's."""
    for family in reversed(FAMILIES):  # the most specific first: SD3 files share SD's "model.diffusion_model." prefix
        name = family.single_file_class(names)
        if name is not None:
            return name
    return None
