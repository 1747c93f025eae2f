"""FLUX.2 (`Flux2Pipeline`, dev; `Flux2KleinPipeline`, klein): FLUX.2's transformer (double-stream blocks, then
single-stream blocks over one joint sequence, text first; 4-axis RoPE), a language model read through its chat
template, the hidden states of three of its layers side by side per token.

What the contract asks here (docs/semantics.md, "Newer families"):
- The text is the whole templated prompt, nothing dropped, padded to `max_sequence_length` (512) with no mask: every
  padding token is attended text of no word, as T5's padding on Flux.1. Word positions come from character offsets
  in the templated string (`alignment.tokenize_templated`, nothing dropped).
  - klein: Qwen3, `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`,
    padded on the right.
  - dev: Mistral-Small-3.1, `<s>[SYSTEM_PROMPT]{the pipeline's system message}[/SYSTEM_PROMPT][INST]{prompt}[/INST]`,
    padded on the LEFT (its processor's side): the text ends at the last position, and a prompt's tokens sit at
    positions that depend on its length. The mappers are built from each text's first token, as the rules are
    stated, then put back in place (`Tokenized.lead`): padding maps to padding at the same position.
- Guidance: klein base models run true classifier-free guidance, a separate pass on the empty prompt after the
  conditional one (the pipeline takes no negative prompt); distilled klein has none; dev embeds it in the model
  (every row conditional, one pass).
- Latents: both pipelines take their initial latents patchified and unpacked, (B, 4C, H/16, W/16), and pack them into
  tokens themselves. `output_type="latent"` returns dev's packed tokens, and klein's VAE latents (batch-norm undone,
  unpatchified).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch

from ..alignment import Tokenized, padded_left, tokenize_templated
from ..limits import quoted
from ..attention.joint import JointAttend
from . import compat
from .flux import FluxJointProcessor, double_then_single
from .mmdit import FlowText, MMDiTFamily, decoded_texts

_SENTINEL = "\x00"  # stands for the prompt while the chat template is rendered
_IMAGE_TOKEN = "[IMG]"  # FLUX.2 dev's pipeline deletes it from prompts (its processor counts image tokens)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # (B, S, heads * d) -> (B, S, heads, d)
    return x.unflatten(-1, (-1, head_dim))


class Flux2JointProcessor(FluxJointProcessor):
    """`Flux2AttnProcessor`'s computation, which is Flux.1's (QK norms, RoPE over [text, image]) on FLUX.2's
    projections, with the run's edits applied by `attend`."""

    projections = staticmethod(compat.flux2_qkv_projections)


class Flux2SingleProcessor:
    """`Flux2ParallelSelfAttnProcessor`'s computation (one projection for QKV and the MLP, run in parallel) with the
    run's edits applied by `attend`; the sequence is [text, image], the text's length the run's."""

    def __init__(self, attend: JointAttend):
        self.attend = attend

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        query, key, value = (_heads(x, attn.head_dim) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2Family(MMDiTFamily):
    """What FLUX.2 dev and klein share: the transformer, its latents and blocks, a templated text padded to its length
    (the padding attended). Each model's own file of answers is a subclass below."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    components = ("transformer", "text_encoder")
    transformer_prefix = "Flux2Transformer"
    loads_single_file = False  # diffusers loads FLUX.2's transformer from one file, not its pipeline
    default_steps = 50  # the pipelines' defaults
    default_guidance = 4.0
    default_max_sequence_length = 512
    max_text_length = 512
    text_first = True
    takes_negative_prompt = False  # its negative pass is the empty prompt's, always
    other_prompts = ()
    text_inputs: ClassVar[tuple[str, ...]] = ("prompt", "prompt_embeds", "negative_prompt_embeds")

    @classmethod
    def detect(cls, pipe) -> bool:
        # the FLUX.2 pipelines that take reference images (kv, inpaint) share the transformer: the text-to-image one
        return type(pipe).__name__ in cls.pipeline_classes

    def processors(self, states, counts):
        processors = super().processors(states, counts)
        for name, (_, stream) in self.blocks().items():
            if stream == "single":  # the parallel single-stream block has its own projections
                processors[name] = Flux2SingleProcessor(processors[name].attend)
        return processors

    processor_class = Flux2JointProcessor

    # -- Text ----------------------------------------------------------------------------------------------------

    def _template(self) -> str:
        """The chat template around a prompt, as the pipeline renders it, with "{}" where the prompt goes."""
        raise NotImplementedError

    def _tokenizer(self):
        return self.pipe.tokenizer

    def tokenizers(self) -> list:
        return [self._tokenizer()]

    part_tokenizers = tokenizers

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The templated prompt's tokens from the template's first on, padded to `max_sequence_length`; the padding
        is attended (the pipeline passes no mask): it belongs to no word."""
        length = self.max_sequence_length(pipeline_kwargs)
        t = tokenize_templated(self._tokenizer(), prompt, self._template(), 0, length,
                               what="(its chat template included; raise max_sequence_length up to 512)")
        return replace(t, true_length=None)

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        return decoded_texts(self._tokenizer(), tokenized)

    # -- Sizes and latents ---------------------------------------------------------------------------------------

    def patch_size(self) -> int:
        return 1  # the latents are patchified 2x2 already: one token per latent pixel

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def size_unit(self) -> str:
        return f"a 2x2 patch of a {self.pipe.vae_scale_factor}x VAE"

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.model.config.in_channels, height // scale, width // scale

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h * w, C), row-major, as `Flux2KleinPipeline._pack_latents`."""
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        b, _, c = latents.shape
        return latents.permute(0, 2, 1).reshape(b, c, *latent_size)

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the pipeline packs them itself

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mode, patchified 2x2 and normalised by its batch-norm statistics, as the pipeline
        encodes a reference image: (1, 4C, H/16, W/16)."""
        vae = self.pipe.vae
        with torch.no_grad():
            mean = vae.encode(pixels.to(device=self.execution_device(), dtype=vae.dtype)).latent_dist.mode()
        b, c, h, w = mean.shape
        x = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        bn_mean, bn_std = self._bn(x)
        return ((x - bn_mean) / bn_std).to(self.model.dtype)

    # -- Blocks --------------------------------------------------------------------------------------------------

    def block_names(self) -> list[tuple[str, str]]:
        return double_then_single(self.model)

    def default_self_blocks(self) -> frozenset[int]:
        # Our choice (no study names FLUX.2's structural blocks yet), as on SD3 and Qwen-Image: every block.
        return frozenset(range(self.num_blocks()))

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        if pipeline_kwargs.get("image") is not None:
            raise ValueError("image (FLUX.2's reference images) adds image tokens the edits do not know; leave it unset")
        super().check_call_kwargs(pipeline_kwargs, inversion)

    # -- Inversion: the flow loops' text, model call and schedule ------------------------------------------------

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            embeds, text_ids = self.pipe.encode_prompt(prompt=prompt, device=device,
                                                       max_sequence_length=max_sequence_length)
        return FlowText(embeds, embeds.new_zeros(embeds.shape[0], 0), text_ids)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        model = self.model
        x = self.pack(latents.to(model.dtype))
        t = timestep.to(latents.device).expand(x.shape[0]).to(model.dtype)
        image_ids = compat.flux2_latent_ids(self.pipe, latents).to(latents.device)
        text_ids = text.text_ids.expand(x.shape[0], -1, -1) if text.text_ids.shape[0] == 1 else text.text_ids
        with self.plain_attention():
            out = model(hidden_states=x, timestep=t / 1000, guidance=self._embedded(guidance, x),
                        encoder_hidden_states=text.embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return self.unpack(out[:, : x.shape[1]], tuple(latents.shape[-2:]))

    def _embedded(self, guidance: float, x: torch.Tensor) -> torch.Tensor | None:
        """dev's embedded guidance, one value per row; klein has none."""
        if not self.model.config.guidance_embeds:
            return None
        return torch.full([x.shape[0]], guidance, device=x.device, dtype=torch.float32)

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # klein's is the same function

        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return sigmas, compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_inference_steps)


class Flux2KleinFamily(Flux2Family):
    """FLUX.2 klein: templated Qwen3 text padded on the right; true CFG (a pass on the empty prompt) on the base
    models, none on the distilled ones."""

    name = "flux2-klein"
    title = "FLUX.2 klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    # default_steps 50 and guidance 4.0: the pipeline's (a distilled klein is meant for 4 steps: its card says)

    def _template(self) -> str:
        text = self.pipe.tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=False)
        return text.replace(_SENTINEL, "{}")

    def output_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's own latents (B, C / 4, 2h, 2w), as the pipeline returns them: batch-norm undone, unpatchified."""
        mean, std = self._bn(latents)
        x = latents * std + mean
        b, c, h, w = x.shape
        return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        # A base klein's guidance runs the transformer twice a step: the conditional pass, then the empty prompt's.
        guidance = call_kwargs.get("guidance_scale", self.default_guidance)
        return guidance > 1 and not self.pipe.config.get("is_distilled", False)


class Flux2DevFamily(Flux2Family):
    """FLUX.2 dev: the pipeline's system message and the prompt in Mistral's template, padded on the left; embedded
    guidance (one pass, every row conditional); `output_type="latent"` gives the packed tokens."""

    name = "flux2-dev"
    title = "FLUX.2 dev"
    pipeline_classes = ("Flux2Pipeline",)
    # default_steps 50 and guidance 4.0: Flux2Pipeline's

    def _tokenizer(self):
        return getattr(self.pipe.tokenizer, "tokenizer", self.pipe.tokenizer)  # the real pipeline's is a processor

    def _template(self) -> str:
        system = {"role": "system", "content": [{"type": "text", "text": self.pipe.system_message}]}
        user = {"role": "user", "content": [{"type": "text", "text": _SENTINEL}]}
        text = self.pipe.tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=False)
        return text.replace(_SENTINEL, "{}")

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The templated prompt (the system message kept), padded to `max_sequence_length` on the tokenizer's side
        (Mistral's processor pads on the left: the text ends at the last position); the padding is attended text of
        no word."""
        if isinstance(prompt, str) and _IMAGE_TOKEN in prompt:
            raise ValueError(f"the prompt {quoted(prompt)} holds {_IMAGE_TOKEN}, which FLUX.2 dev's pipeline deletes "
                             "from prompts; leave it out")
        t = super().tokenize(prompt, pipeline_kwargs)
        # the padding side is the tokenizer's setting, not the model's
        return padded_left(t) if self._tokenizer().padding_side == "left" else t

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        if pipeline_kwargs.get("caption_upsample_temperature"):
            raise ValueError("caption_upsample_temperature rewrites the prompt with the language model, so the edits' "
                             "words are no longer the model's; leave it unset")
        super().check_call_kwargs(pipeline_kwargs, inversion)
