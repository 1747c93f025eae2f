"""What both kinds of inversion loop use: the image's latent, and the refusal of options they do not take."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..families import FAMILIES, Family, family_of, listed
from ..images import to_tensor


def encode_image(pipe, image) -> torch.Tensor:
    """The latent (1, C, h, w) of an RGB PIL image, normalised as the pipeline decodes it, in its denoiser's dtype
    (`Family.encode_pixels`)."""
    return family_of(pipe).encode_pixels(to_tensor(image))


# The families each loop-specific option of `invert()` applies to, by what the option is for.
_TAKERS: dict[str, Callable[[type[Family]], bool]] = {
    "num_inner_steps": lambda f: "null-text" in f.inversion_methods,  # null-text's optimisation
    "early_stop_epsilon": lambda f: "null-text" in f.inversion_methods,
    "max_sequence_length": lambda f: bool(f.inversion_methods) and f.takes_max_sequence_length,  # a T5 length
    "inversion_guidance": lambda f: "euler" in f.inversion_methods,  # the inverse Euler velocity's guidance
}


def refuse_options(family: Family, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse `invert()` options that the family's inversion loops do not use, rather than ignoring them."""
    for name, value in given.items():
        if value != defaults[name]:
            takers = [f.title for f in FAMILIES if _TAKERS[name](f)]
            raise ValueError(f"{name} applies to {listed(takers)} pipelines, not to "
                             f"{type(family.pipe).__name__}; leave it unset")
