"""What both samplers' inversion loops use: the image's latent, and the refusal of options they do not take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..families import FAMILIES, Family, family_of, listed
from ..images import to_tensor


def encode_image(pipe, image) -> torch.Tensor:
    """The latent (1, C, h, w) of an RGB PIL image, normalised as the pipeline decodes it, in its denoiser's dtype
    (`Family.encode_pixels`)."""
    return family_of(pipe).encode_pixels(to_tensor(image))


def refuse_options(family: Family, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse `invert()` options that the family's sampler does not use, rather than ignoring them."""
    for name, value in given.items():
        if value != defaults[name]:
            takers = [f.title for f in FAMILIES if f.sampler != family.sampler and f.inversion_methods]
            raise ValueError(f"{name} applies to {listed(takers)} pipelines, not to "
                             f"{type(family.pipe).__name__}; leave it unset")
