"""Real images: invert an image into an edit's starting point, for every family.

`invert` asks the pipeline's family which inversion methods it has, and runs the loops that reverse the step of the
scheduler its edits run on (samplers are separate from models, as in k-diffusion); the loops evaluate the model
through the family's `Denoiser`, one signature for every model:
- `ddim`: DDIM, null-text (Mokady et al., 2022), negative-prompt (Miyake et al., 2023) and direct (Ju et al.,
  2024) inversion on the DDIM step (`DDIMScheduler`: UNet pipelines, SD 1.x, 2.x, XL);
- `flow`: inverse Euler and direct inversion on the pipeline's own flow-matching Euler step
  (`FlowMatchEulerDiscreteScheduler`: SD3/3.5, Flux.1, Chroma).
An `Inversion` (`files`) holds the result and saves to and loads from a pair of files.
"""

from __future__ import annotations

from typing import Literal

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from ..families import FAMILIES, Family, family_of, listed
from ..images import ImageInput
from . import ddim, flow
from .common import encode_image
from .files import Inversion

__all__ = ["Inversion", "encode_image", "invert"]


def invert(
    pipe,
    image: ImageInput,
    prompt: str,
    *,
    method: Literal["null-text", "negative-prompt", "direct", "ddim", "euler"] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    fit: Literal["crop", "pad"] = "crop",
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    max_sequence_length: int | None = None,
    inversion_guidance: float = 1.0,
    progress: bool = True,
) -> Inversion:
    """Invert a real image under `prompt` for editing with `pipe` (any family with inversion methods).

    Args:
        image: a path, PIL image or array; fitted to `height` x `width` (default: the model's size) by `fit`.
        prompt: a caption of the image: the source prompt of the edits to come.
        method: on UNet pipelines "direct" (the default: exact source reconstruction, no optimisation), "null-text"
            (optimises the unconditional embedding, about 9x slower), "negative-prompt" (no optimisation) or "ddim"
            (plain DDIM inversion, the baseline); on flow-matching transformers "direct" (the default) or "euler"
            (plain inverse Euler, the baseline).
        num_inference_steps, guidance_scale: those of the edits to come; an inversion serves only them
            (None: the model's defaults, 50 and 7.5 on SD's UNets, 28 and 7.0 / 3.5 on SD3 / Flux).
        num_inner_steps, early_stop_epsilon: null-text's Adam iterations per step and its early-stop loss
            (`early_stop_epsilon + i * 2e-5` at step i).
        max_sequence_length: SD3's and Flux's T5 length, which the edits then use too (None: the pipeline's 256 / 512).
        inversion_guidance: Flux-dev's embedded guidance for the inversion's velocity (1.0: unguided).

    Example:
        >>> inv = invert(pipe, "cat.jpg", "a photo of a cat", method="direct")  # doctest: +SKIP
        >>> editor.edit(inv.prompt, [Edit("a photo of a dog")], inversion=inv)  # doctest: +SKIP
    """
    family = family_of(pipe)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (the image's caption), not {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt must be the image's caption, not empty")
    if not family.inversion_methods:
        raise ValueError(family.no_inversion_message())
    method = family.default_inversion if method is None else method
    if method not in family.inversion_methods:
        name, methods = type(pipe).__name__, ", ".join(family.inversion_methods)
        others = [f.title for f in FAMILIES if method in f.inversion_methods]
        if others:
            raise ValueError(f"{method!r} inversion is for {listed(others)} pipelines, not {name}; "
                             f"use one of {methods}")
        raise ValueError(f"unknown inversion method {method!r} for {name}; use one of {methods}")
    options = dict(num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon,
                   max_sequence_length=max_sequence_length, inversion_guidance=inversion_guidance)
    return _loops(family)(family, image, prompt, method=method, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width, fit=fit, progress=progress,
                          **options)


# The loops that reverse each scheduler's step.
_LOOPS = ((DDIMScheduler, ddim.invert_ddim), (FlowMatchEulerDiscreteScheduler, flow.invert_flow))


def _loops(family: Family):
    """The inversion loops for the scheduler an edit of an inversion runs on (the family's, else the pipeline's)."""
    scheduler = family.inversion_scheduler()
    scheduler = family.pipe.scheduler if scheduler is None else scheduler
    for scheduler_type, loops in _LOOPS:
        if isinstance(scheduler, scheduler_type):
            return loops
    raise ValueError(f"inversion reverses DDIMScheduler's DDIM step or FlowMatchEulerDiscreteScheduler's Euler step; "
                     f"this pipeline's scheduler is {type(scheduler).__name__}: load the model's own scheduler")
