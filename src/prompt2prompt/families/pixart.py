"""PixArt-Σ: a cross-attention DiT. Its image tokens (a 2x2-patch grid of the latent) run through blocks of
self-attention (`attn1`) and cross-attention to the T5 text (`attn2`), all at one resolution; the text is padded to
`max_sequence_length` (300) and the padding masked.

The contract's cross-attention section applies to every `attn2` (with its masked-padding rule: each prompt's true
length is its T5 pieces and EOS), and the UNet's self-attention rule to the `attn1` of the blocks chosen for
self-replacement: by block, since every block has the same resolution. No study names PixArt's layout blocks, so
the default is every block, as for SD3 (our choice). The layers' maths is the UNet's (`attention/cross.py`).

The pipeline lowercases prompts (`clean_caption=False`; its `clean_caption=True`, the default, rewrites them with
bs4 and ftfy, and `use_resolution_binning=True` changes the size), so an edit runs with both off: the text the
words are found in is the text the model reads, and the latents are the size asked for. Its `__call__` has only
the old per-step `callback`, which the engine's step callback is handed through (it changes the latents in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..alignment import Tokenized, tokenize
from ..attention.cross import Layer, cross_processors
from ..attention.state import LayerPlan, RunState
from .base import Family, check_blocks, t5_length


class PixArtFamily(Family):
    """PixArt-Σ: self- and cross-attention blocks at one resolution; T5 text, its padding masked."""

    name = "pixart"
    title = "PixArt-Σ"
    pipeline_classes = ("PixArtSigmaPipeline",)
    components = ("transformer", "text_encoder")
    default_steps = 20  # PixArtSigmaPipeline's defaults
    default_guidance = 4.5
    default_max_sequence_length = 300
    inversion_methods = ()
    no_inversion = "PixArt-Σ samples with DPM-Solver on a noise prediction, and this project's inversions are DDIM's (for UNets) and the flow's"
    takes_max_sequence_length = True
    max_text_length = 512  # T5's positions
    map_unit = "word"  # T5 has no BOS and splits words into pieces: one map per word, as on SD3 and Flux
    layer_options = ("self_blocks",)
    layer_hint = "PixArt-Σ chooses blocks (all at one resolution)"
    # What the edits need the pipeline to leave alone: the prompt as written (lowercased), the size as asked.
    fixed_call = {"clean_caption": False, "use_resolution_binning": False}

    @classmethod
    def detect(cls, pipe) -> bool:
        return type(pipe).__name__ in cls.pipeline_classes and hasattr(pipe, "transformer")

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.transformer

    # -- Text ----------------------------------------------------------------------------------------------------

    def max_sequence_length(self, pipeline_kwargs: Mapping[str, Any]) -> int:
        return t5_length(pipeline_kwargs, self.default_max_sequence_length, self.max_text_length)

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The T5 text as the pipeline reads it (lowercased, stripped); its padding after EOS is masked."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string, not {type(prompt).__name__}")
        read = prompt.lower().strip()
        t5 = tokenize(self.pipe.tokenizer, read, self.max_sequence_length(pipeline_kwargs),
                      what="(EOS included; raise max_sequence_length up to 512)")
        return dataclasses.replace(t5, prompt=prompt, true_length=len(t5.ids))

    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        pieces = self.pipe.tokenizer.convert_ids_to_tokens(tokenized.ids)
        return [p.replace("\u2581", "") for p in pieces] + [""] * (tokenized.length - len(pieces))

    # -- Sizes ---------------------------------------------------------------------------------------------------

    def native_size(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.model.config.patch_size

    def size_unit(self) -> str:
        patch = self.model.config.patch_size
        return f"a {patch}x{patch} patch of a {self.pipe.vae_scale_factor}x VAE"

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.model.config.in_channels, height // scale, width // scale

    # -- Layers --------------------------------------------------------------------------------------------------

    def num_blocks(self) -> int:
        return len(self.model.transformer_blocks)

    def check_layer_options(self, options: Mapping[str, Any]) -> None:
        super().check_layer_options(options)
        if options.get("self_blocks") is not None:
            check_blocks(options["self_blocks"], self.num_blocks(), "self_blocks")

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   explicit: bool, options: Mapping[str, Any]) -> LayerPlan:
        """Every block at the patch grid: self-replacement in the chosen blocks, blending and maps in all."""
        patch = self.model.config.patch_size
        grid = (latent_size[0] // patch, latent_size[1] // patch)
        if record_attention not in (False, None, True):
            raise ValueError(f"record_attention on {type(self.pipe).__name__} is True or False (every block is at the "
                             f"{grid[0]}x{grid[1]} patch grid), not {record_attention!r}")
        chosen = options.get("self_blocks")
        count = self.num_blocks()
        blocks = frozenset(range(count)) if chosen is None else check_blocks(chosen, count, "self_blocks")
        return LayerPlan(sizes={grid[0] * grid[1]: grid}, self_max_side=max(grid), blend_size=grid if blend else None,
                         record_sizes=frozenset({grid}) if record_attention else frozenset(), explicit=explicit,
                         self_blocks=blocks)

    def processors(self, states: Sequence[RunState], counts: Sequence[int]) -> dict[str, Any]:
        # PixArtTransformer2DModel's processors: "transformer_blocks.<block>.attn1|attn2.processor"
        layers = [Layer(name, is_cross=".attn2." in name, place="block", block=int(name.split(".")[1]))
                  for name in self.model.attn_processors]
        return cross_processors(layers, states, counts)

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        super().check_call_kwargs(pipeline_kwargs, inversion)
        for name, value in self.fixed_call.items():
            if pipeline_kwargs.get(name, value) != value:
                raise ValueError(f"{name}={pipeline_kwargs[name]!r} would change what the edits align or the "
                                 f"latents' size; leave it unset ({value} for an edit)")
        for name in ("prompt_embeds", "negative_prompt_embeds", "callback", "callback_steps"):
            if name in pipeline_kwargs:
                raise ValueError(f"{name} would bypass what the edits need of the pipeline's call; leave it unset")

    def pipeline_call(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The step callback handed over as the pipeline's per-step `callback`, which sees the latents it steps."""
        call = {**call_kwargs, **self.fixed_call}
        on_step_end = call.pop("callback_on_step_end", None)
        call.pop("callback_on_step_end_tensor_inputs", None)
        if on_step_end is None:
            return call
        pipe = self.pipe

        def callback(step: int, t, latents: torch.Tensor) -> None:
            out = on_step_end(pipe, step, t, {"latents": latents})
            if "latents" in out:
                latents.copy_(out["latents"])  # the loop goes on from this tensor

        return {**call, "callback": callback, "callback_steps": 1}
