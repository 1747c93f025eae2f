"""Every use of a diffusers private name, in one place, so that a diffusers release that renames one breaks this
file only.

Checked against diffusers 0.42.0 and 0.42.1 (the versions the tests and the GPU image run). Each function is the
one spot that reaches into diffusers' internals; its docstring names what it uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

def execution_device(pipe) -> torch.device:
    """The device the pipeline runs its models on (`DiffusionPipeline._execution_device`: offloading-aware)."""
    return pipe._execution_device


def callback_tensor_inputs(pipe) -> list[str]:
    """The tensors the pipeline's step-end callback may read and replace (`_callback_tensor_inputs`)."""
    return list(pipe._callback_tensor_inputs)


def flux_pack_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Flux's (B, C, h, w) latents as (B, h/2 * w/2, 4C) tokens (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def flux_latent_image_ids(pipe, batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """Flux's RoPE positions of the image tokens on a `height` x `width` token grid (`_prepare_latent_image_ids`)."""
    return pipe._prepare_latent_image_ids(batch, height, width, device, dtype)


def sdxl_time_ids(pipe, size: tuple[int, int], dtype: torch.dtype, projection_dim: int) -> torch.Tensor:
    """SDXL's micro-conditioning for original and target size `size`, no crop (`_get_add_time_ids`)."""
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)


def flux_qkv_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Flux's image and text query, key and value projections (`transformer_flux._get_qkv_projections`)."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def flux2_qkv_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """FLUX.2's image and text query, key and value projections (`transformer_flux2._get_qkv_projections`)."""
    from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def flux2_latent_ids(pipe, latents: torch.Tensor) -> torch.Tensor:
    """FLUX.2's RoPE positions (B, h * w, 4) of (B, C, h, w) patchified latents (`_prepare_latent_ids`)."""
    return pipe._prepare_latent_ids(latents)


@contextmanager
def progress_bar_off(pipe) -> Iterator[None]:
    """The pipeline's own progress bar off for one call, its settings restored after (`_progress_bar_config`)."""
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(**{**(saved or {}), "disable": True})
    try:
        yield
    finally:
        if saved is None:
            del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = saved
