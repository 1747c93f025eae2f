"""What both samplers' inversion loops use: the image's latent, and the refusal of options they do not take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..families import FAMILIES, Family, family_of, listed
from ..images import to_tensor


def encode_image(pipe, image) -> torch.Tensor:
    """The VAE latent (1, C, h, w) of an RGB PIL image, normalised as the pipeline decodes it, in its denoiser's dtype.

    The family normalises the VAE's posterior mean (an `AutoencoderTiny`'s latent) as its pipeline decodes (SD:
    `latents * scaling_factor`, SDXL first undoing `latents_mean`/`latents_std` where its VAE has them; SD3 and Flux
    also `- shift_factor`).
    """
    family = family_of(pipe)
    vae = pipe.vae
    dtype = vae.dtype
    # SDXL's VAE overflows in fp16: encode in fp32 as the pipeline decodes
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            pixels = to_tensor(image).to(device=family.execution_device(), dtype=vae.dtype)
            encoded = vae.encode(pixels)
            # AutoencoderKL gives a posterior, whose mean is the latent; AutoencoderTiny gives the latent itself.
            mean = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
    finally:
        if upcast:
            vae.to(dtype)
    return family.vae_latents(mean).to(family.model.dtype)


def refuse_options(family: Family, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse `invert()` options that the family's sampler does not use, rather than ignoring them."""
    for name, value in given.items():
        if value != defaults[name]:
            takers = [f.title for f in FAMILIES if f.sampler != family.sampler and f.inversion_methods]
            raise ValueError(f"{name} applies to {listed(takers)} pipelines, not to "
                             f"{type(family.pipe).__name__}; leave it unset")
