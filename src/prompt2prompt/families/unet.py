"""Stable Diffusion 1.x, 2.x and XL: a UNet with cross- and self-attention layers at several resolutions, and
77 CLIP tokens of text (SDXL: two CLIP encoders, one tokenization)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..alignment import Tokenized, tokenize
from ..attention.cross import Layer, cross_processors
from ..attention.state import LayerPlan, RunState
from . import compat
from .base import Conditioning, Denoiser, Family

# Inverted images' latents are kept to multiples of 8: every SD-family UNet (at most three 2x downsamplings)
# accepts them, and the default blend resolution (latent side / 4) stays an integer.
LATENT_MULTIPLE = 8


@dataclass
class UNetText(Conditioning):
    """One or more prompts' UNet conditioning: embeddings, and SDXL's pooled embeddings and time ids."""

    embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor | None = None  # (B, D2)
    time_ids: torch.Tensor | None = None  # (B, 6)

    @staticmethod
    def cat(*texts: UNetText) -> UNetText:
        def cat(name):
            parts = [getattr(text, name) for text in texts]
            return None if parts[0] is None else torch.cat(parts)
        return UNetText(cat("embeds"), cat("pooled"), cat("time_ids"))

    def with_embeds(self, embeds: torch.Tensor) -> UNetText:
        return UNetText(embeds, self.pooled, self.time_ids)


class UNetFamily(Family):
    """A UNet pipeline (SD 1.x/2.x, SDXL): 77 CLIP tokens, cross-attention layers chosen by their side."""

    name = "unet"
    title = "Stable Diffusion 1.x, 2.x and XL"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    components = ("unet", "text_encoder")
    inversion_methods = ("direct", "null-text", "negative-prompt", "ddim")  # direct: exact, and 9x faster than null-text
    takes_uncond_embeddings = True
    loads_single_file = True
    layer_options = ("self_replace_max_res", "blend_res")
    layer_hint = "UNet models choose layers by side"

    @classmethod
    def detect(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None

    @classmethod
    def pipeline_class_for(cls, index: Mapping[str, Any]) -> str | None:
        if not index.get("unet"):
            return super().pipeline_class_for(index)
        return "StableDiffusionXLPipeline" if index.get("text_encoder_2") else "StableDiffusionPipeline"

    @classmethod
    def single_file_class(cls, names: Sequence[str]) -> str | None:
        if not any(key.startswith("model.diffusion_model.") for key in names):
            return None
        # SDXL checkpoints carry a second text encoder under conditioner.embedders.1.
        xl = any(key.startswith("conditioner.embedders.1.") for key in names)
        return "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def is_xl(self) -> bool:
        """SDXL: pooled text embeddings and size micro-conditioning beside the CLIP tokens."""
        return getattr(self.model.config, "addition_embed_type", None) == "text_time"

    # -- Text ----------------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The prompt's words and its CLIP token positions."""
        return tokenize(self.pipe.tokenizer, prompt)

    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        return [t.replace("</w>", "") for t in self.pipe.tokenizer.convert_ids_to_tokens(tokenized.ids)]

    # -- Sizes ---------------------------------------------------------------------------------------------------

    def native_size(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        return max(8, self.pipe.vae_scale_factor)  # diffusers' pipelines require multiples of 8 whatever the VAE

    def inversion_multiple(self) -> int:
        return LATENT_MULTIPLE * self.pipe.vae_scale_factor

    def size_unit(self) -> str:
        return f"{LATENT_MULTIPLE} latent pixels of a {self.pipe.vae_scale_factor}x VAE"

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.model.config.in_channels, height // scale, width // scale

    def vae_latents(self, mean: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        latents_mean, latents_std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self.is_xl and latents_mean is not None and latents_std is not None:  # SDXL decodes with them undone first
            latents_mean = torch.tensor(latents_mean, device=mean.device).view(1, -1, 1, 1)
            latents_std = torch.tensor(latents_std, device=mean.device).view(1, -1, 1, 1)
            mean = (mean - latents_mean) / latents_std
        return super().vae_latents(mean)

    # -- Layers --------------------------------------------------------------------------------------------------

    def check_layer_options(self, options: Mapping[str, Any]) -> None:
        super().check_layer_options(options)
        for name in self.layer_options:
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (a layer's side in latent pixels) or None, "
                                 f"not {value!r}")

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   explicit: bool, options: Mapping[str, Any]) -> LayerPlan:
        """Layers by their side at this latent size: self-replacement up to a side, blending and recording at one."""
        config = self.model.config
        sizes = _level_sizes(latent_size, len(config.block_out_channels))
        down_up, mid = _cross_levels(config)
        default_size = sizes[min(2, len(sizes) - 1)]  # latent side / 4
        blend_size = _size_for(options.get("blend_res"), "blend_res", sizes, down_up, default_size) if blend else None
        if record_attention is False or record_attention is None:
            requested = []
        elif record_attention is True:
            requested = [None]
        elif isinstance(record_attention, int):
            requested = [record_attention]
        else:
            requested = list(record_attention)
        record_sizes = frozenset(_size_for(r, "record_attention", sizes, down_up | mid, default_size) for r in requested)
        self_max = options.get("self_replace_max_res")
        return LayerPlan(sizes={h * w: (h, w) for h, w in sizes}, self_max_side=max(default_size) if self_max is None else self_max,
                         blend_size=blend_size, record_sizes=record_sizes, explicit=explicit)

    def processors(self, states: Sequence[RunState], counts: Sequence[int]) -> dict[str, Any]:
        # diffusers' UNets name each processor by its place ("down_blocks.1.attentions.0...attn2.processor")
        layers = [Layer(name, is_cross=".attn2." in name, place=name.split("_", 1)[0]) for name in self.model.attn_processors]
        return cross_processors(layers, states, counts)

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def callback_tensor_inputs(self, inversion) -> list[str]:
        names = ["latents", "prompt_embeds"]
        if (inversion is not None and inversion.uncond_pooled is not None
                and "add_text_embeds" in compat.callback_tensor_inputs(self.pipe)):
            names.append("add_text_embeds")
        return names

    def step_text_inputs(self, inputs: dict[str, Any], inversion, step: int, rows: int) -> dict[str, Any]:
        """Null-text inversion's unconditional embedding of `step` (and SDXL's pooled one) in the unconditional half."""
        if inversion is None or inversion.uncond_embeddings is None:
            return {}
        out = {"prompt_embeds": swap_uncond(inputs["prompt_embeds"], inversion.uncond_embeddings[step], rows)}
        if inversion.uncond_pooled is not None and "add_text_embeds" in inputs:
            out["add_text_embeds"] = swap_uncond(inputs["add_text_embeds"], inversion.uncond_pooled[step], rows)
        return out

    def inversion_scheduler(self):
        """An inversion is exact for the DDIM step it was made with."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    def inversion_call_kwargs(self, prompts: list[str], inversion, device) -> dict[str, torch.Tensor]:
        pipe, num_prompts = self.pipe, len(prompts)
        if self.is_xl:
            # No negative_prompt: like the plain pipeline, so that force_zeros_for_empty_prompt still applies.
            cond, _, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=True)
            out = dict(prompt_embeds=cond, pooled_prompt_embeds=pooled)
            uncond_pooled = neg_pooled if inversion.uncond_pooled is None else inversion.uncond_pooled[0].to(neg_pooled).expand(num_prompts, -1)
            out["negative_pooled_prompt_embeds"] = uncond_pooled
        else:
            cond, _ = pipe.encode_prompt(prompts, device, 1, False)
            out = dict(prompt_embeds=cond)
        out["negative_prompt_embeds"] = inversion.uncond_embeddings[0].to(cond).expand(num_prompts, -1, -1)
        return out

    # -- Inversion: the DDIM loops' model ------------------------------------------------------------------------

    def denoiser(self, scheduler, *, height: int, width: int, max_sequence_length: int, device) -> UNetDenoiser:
        return UNetDenoiser(self, scheduler, (height, width), device)


class UNetDenoiser(Denoiser):
    """A UNet as the DDIM loops evaluate it: its prediction, called as the pipeline calls it (the input scaled by the
    scheduler; SDXL's pooled text and time ids for an image of `size`, no crop)."""

    def __init__(self, family: UNetFamily, scheduler, size: tuple[int, int], device):
        self.pipe, self.model, self.is_xl = family.pipe, family.model, family.is_xl
        self.scheduler, self.size, self.device = scheduler, size, device

    def encode(self, prompt: str) -> UNetText:
        return self._text(prompt, negative=False)

    def negative(self) -> UNetText:
        return self._text("", negative=True)  # no negative prompt: the pipeline's own unconditional branch

    def _text(self, prompt: str, *, negative: bool) -> UNetText:
        """The prompt's conditioning, or the unconditional one that the pipeline encodes beside it."""
        pipe, device = self.pipe, self.device
        with torch.no_grad():
            if not self.is_xl:
                embeds, uncond = pipe.encode_prompt(prompt, device, 1, negative)
                return UNetText(uncond if negative else embeds)
            embeds, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=negative)
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        projection = encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])
        # the pipeline's defaults: original and target size = the image size, no crop
        time_ids = compat.sdxl_time_ids(pipe, self.size, embeds.dtype, projection).to(device)
        return UNetText(uncond, uncond_pooled, time_ids) if negative else UNetText(embeds, pooled, time_ids)

    def batch(self, *conds: UNetText) -> UNetText:
        return UNetText.cat(*conds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: UNetText, *, guidance: float = 1.0) -> torch.Tensor:
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.model(self.scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond.embeds,
                          added_cond_kwargs=added, return_dict=False)[0]


def _level_sizes(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    sizes = [latent_size]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))  # stride-2 convs with padding 1 round up
    return sizes


def _cross_levels(config) -> tuple[set[int], set[int]]:
    """Levels with cross-attention in the down/up blocks, and in the mid block."""
    n = len(config.block_out_channels)
    down_up = {i for i, t in enumerate(config.down_block_types) if "CrossAttn" in t}
    down_up |= {n - 1 - i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    mid = {n - 1} if config.mid_block_type and "CrossAttn" in config.mid_block_type else set()
    return down_up, mid


def _size_for(res, what: str, sizes, allowed: set[int], default) -> tuple[int, int]:
    if res is None:
        size = default
        if sizes.index(size) not in allowed and allowed:
            # A small model may lack cross-attention at latent side / 4: take the nearest level that has it.
            size = sizes[min(allowed, key=lambda level: (abs(level - sizes.index(default)), -level))]
    else:
        if isinstance(res, bool) or not isinstance(res, int):
            raise ValueError(f"{what} must be a layer side (an integer), not {res!r}")
        matches = [s for s in sizes if max(s) == res]
        if not matches:
            raise ValueError(f"{what} {res} is not a layer side of this model at this size; the sides are {[max(s) for s in sizes]}")
        size = matches[0]
    if sizes.index(size) not in allowed:
        with_cross = [max(sizes[i]) for i in sorted(allowed)]
        raise ValueError(f"{what}: the model has no cross-attention at side {max(size)}; it has it at {with_cross}")
    return size


def swap_uncond(embeds: torch.Tensor, uncond: torch.Tensor, rows: int) -> torch.Tensor:
    """Replace the unconditional half of [uncond..., cond...] embeddings (`rows` each) with the inversion's."""
    if embeds.shape[0] != 2 * rows:  # no classifier-free guidance: there is no unconditional half
        return embeds
    return torch.cat([uncond.to(embeds).expand(rows, *embeds.shape[1:]), embeds[rows:]])
