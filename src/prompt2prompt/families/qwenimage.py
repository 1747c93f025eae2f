"""Qwen-Image (`QwenImagePipeline`): an MM-DiT of double-stream blocks only, text first in every joint sequence,
Qwen2.5-VL's last hidden states as the text, read through a chat template whose first tokens the pipeline drops.

What differs from the other MM-DiTs, each met by a rule of the contract, not by a special case of the engine:
- The text is the chat template around the prompt, less its first `prompt_template_encode_start_idx` tokens: word
  positions come from character offsets in the templated string (`alignment.tokenize_templated`), so a tokenizer
  whose template prefix is longer than the drop keeps template tokens in no word, and one whose prefix is shorter
  would cut the prompt: such a prompt is refused.
- Each call pads its prompts to the longest and masks the padding: the run's one text length is its longest
  prompt's (`tokenize_run`), every call's text is built here at that length (`call_text`), and the padding is
  masked in every row (the contract's masked padding).
- Guidance is true classifier-free guidance: a separate negative pass after the conditional one, with the
  pipeline's norm rescaling; the editor's `guidance_scale` is the pipeline's `true_cfg_scale` (`pipeline_call`).
- The VAE has a frame axis (B, C, 1, h, w) and normalises its latents per channel.
- Real images: the flow inversions (direct, inverse Euler) on the pipeline's own shifted sigmas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch

from ..alignment import Tokenized, tokenize_templated
from ..attention.joint import JointAttend
from ..limits import check_positive_int
from .mmdit import FlowText, MMDiTFamily, decoded_texts, shift_mu

# The pipeline's own bound on the text it keeps (`QwenImagePipeline.check_inputs`).
QWEN_MAX_TEXT = 1024


def key_mask(text_mask: torch.Tensor | None, image_tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive key mask (B, 1, 1, L + I) of a text padding mask (B, L) (True or 1: attended); image keys all
    attended. None when the pipeline passes no mask (every text token attended)."""
    if text_mask is None:
        return None
    keep = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], image_tokens, dtype=torch.bool)], 1)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))[:, None, None]


class QwenJointProcessor:
    """`QwenDoubleStreamAttnProcessor2_0`'s computation (QK norms, Qwen's RoPE, text first) with the run's edits
    applied by `attend`, which gets the padding mask as an additive key mask."""

    def __init__(self, attend: JointAttend):
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads

        def heads(x):  # (B, S, heads * d) -> (B, S, heads, d)
            return x.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        txt_q = heads(attn.add_q_proj(encoder_hidden_states))
        txt_k = heads(attn.add_k_proj(encoder_hidden_states))
        txt_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False), apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q, txt_k = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False), apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        # Text first: (B, heads, L + I, d)
        query = torch.cat([txt_q, img_q], 1).transpose(1, 2)
        key = torch.cat([txt_k, img_k], 1).transpose(1, 2)
        value = torch.cat([txt_v, img_v], 1).transpose(1, 2)
        mask = key_mask(encoder_hidden_states_mask, hidden_states.shape[1], query.dtype)
        out = self.attend(query, key, value, mask).transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_len = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :text_len], out[:, text_len:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


class QwenImageFamily(MMDiTFamily):
    """Qwen-Image: double-stream joint attention, text first; templated Qwen2.5-VL text, padded per call and masked;
    true classifier-free guidance."""

    name = "qwenimage"
    title = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    components = ("transformer", "text_encoder")
    transformer_prefix = "QwenImageTransformer"
    loads_single_file = False  # diffusers loads no single-file QwenImagePipeline (only its transformer)
    default_steps = 50  # QwenImagePipeline's defaults: 50 steps, true_cfg_scale 4.0
    default_guidance = 4.0
    default_max_sequence_length = 512  # the pipeline's `max_sequence_length`: a bound, not a padded length
    max_text_length = QWEN_MAX_TEXT
    text_first = True
    processor_class = QwenJointProcessor
    other_prompts = ()
    text_inputs: ClassVar[tuple[str, ...]] = ("prompt", "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                                              "negative_prompt_embeds_mask")

    @classmethod
    def detect(cls, pipe) -> bool:
        # Qwen-Image's edit and control pipelines share its transformer but take images: only the text-to-image one
        return type(pipe).__name__ in cls.pipeline_classes

    # -- Text ----------------------------------------------------------------------------------------------------

    def _template(self) -> tuple[str, int]:
        return self.pipe.prompt_template_encode, self.pipe.prompt_template_encode_start_idx

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The kept tokens of the templated prompt, at its own length (a run pads its prompts to the longest)."""
        template, drop = self._template()
        return tokenize_templated(self.pipe.tokenizer, prompt, template, drop, self.max_sequence_length(pipeline_kwargs),
                                  what="(its template's kept tokens included; raise max_sequence_length up to 1024)",
                                  padded=False)

    def tokenize_run(self, prompts, pipeline_kwargs: Mapping[str, Any], length: int | None = None) -> list[Tokenized]:
        """Every prompt padded to the run's one text length: its longest prompt's (or `length`), the padding masked,
        as the pipeline pads a call."""
        tokens = [self.tokenize(prompt, pipeline_kwargs) for prompt in prompts]
        longest = max(t.true_length for t in tokens)
        if length is not None and length < longest:
            raise ValueError(f"a text of {length} positions cannot hold these prompts, the longest of which takes {longest}")
        return [replace(t, length=longest if length is None else length) for t in tokens]

    def max_sequence_length(self, pipeline_kwargs: Mapping[str, Any]) -> int:
        length = check_positive_int(pipeline_kwargs.get("max_sequence_length", self.default_max_sequence_length),
                                    "max_sequence_length")
        if length > self.max_text_length:
            raise ValueError(f"max_sequence_length must be at most {self.max_text_length}, not {length}")
        return length

    def check_text_length(self, prompt: str, what: str, pipeline_kwargs: Mapping[str, Any]) -> None:
        """A negative prompt is read through the template as a prompt is, and bounded alike."""
        template, drop = self._template()
        try:
            tokenize_templated(self.pipe.tokenizer, prompt, template, drop, self.max_sequence_length(pipeline_kwargs),
                               padded=False)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        """Each kept token's text (template tokens included), then "" for the padding."""
        return decoded_texts(self.pipe.tokenizer, tokenized)

    # -- Sizes and latents ---------------------------------------------------------------------------------------

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def patch_size(self) -> int:
        return 2  # 2x2 latent pixels per token

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.model.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C), as `QwenImagePipeline._pack_latents` packs its (B, 1, C, h, w) draw."""
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        b, _, channels = latents.shape
        h, w = latent_size
        x = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mean of the image as a one-frame video, normalised per channel as the pipeline
        decodes ((z - mean) / std), the frame axis dropped: (1, C, h, w)."""
        vae = self.pipe.vae
        with torch.no_grad():
            frames = pixels.to(device=self.execution_device(), dtype=vae.dtype)[:, :, None]  # (1, 3, 1, H, W)
            mean = vae.encode(frames).latent_dist.mean[:, :, 0]  # (1, C, h, w)
        config = vae.config
        latents_mean = torch.tensor(config.latents_mean, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1)
        latents_std = torch.tensor(config.latents_std, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1)
        return ((mean - latents_mean) / latents_std).to(self.model.dtype)

    # -- Blocks --------------------------------------------------------------------------------------------------

    def block_names(self) -> list[tuple[str, str]]:
        return [(name, "joint") for name in self.model.attn_processors]

    def default_self_blocks(self) -> frozenset[int]:
        # Our choice, as on SD3 (no study names Qwen-Image's structural blocks yet): every block, within the window.
        return frozenset(range(self.num_blocks()))

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        if "true_cfg_scale" in pipeline_kwargs:
            raise ValueError("true_cfg_scale is the editor's guidance_scale on Qwen-Image: pass guidance_scale")
        super().check_call_kwargs(pipeline_kwargs, inversion)

    def call_text(self, prompts: list[str], negative: list[str] | None, length: int, inversion, device) -> dict[str, Any]:
        """The prompts' embeddings from the pipeline's own `encode_prompt`, padded with masked zeros to the run's
        one text length; the negative prompts as they are (their pass is plain generation)."""
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompts, device=device)
        n, kept, _ = embeds.shape
        mask = torch.ones(n, kept, dtype=torch.long, device=embeds.device) if mask is None else mask
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - kept))
        mask = torch.nn.functional.pad(mask, (0, length - kept))
        out: dict[str, Any] = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if negative is not None:
            out["negative_prompt"] = negative
        return out

    def pipeline_call(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The editor's guidance as the pipeline's `true_cfg_scale`; above 1, a negative prompt (" ", as Qwen-Image's
        examples give, when none is) turns its negative pass on."""
        call = dict(call_kwargs)
        guidance = call.pop("guidance_scale", self.default_guidance)
        call["true_cfg_scale"] = guidance
        rows = len(call["prompt_embeds"]) if "prompt_embeds" in call else len(call.get("prompt") or [])
        if guidance > 1 and call.get("negative_prompt") is None and "negative_prompt_embeds" not in call:
            call["negative_prompt"] = [" "] * rows
        elif guidance <= 1:
            call.pop("negative_prompt", None)
        return call

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        # Guidance runs the transformer twice a step: the conditional pass first, then the negative.
        return call_kwargs.get("guidance_scale", self.default_guidance) > 1

    # -- Inversion: the flow loops' text, model call and schedule ------------------------------------------------

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        return FlowText(embeds, embeds.new_zeros(embeds.shape[0], 0), mask=mask)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        model = self.model
        x = self.pack(latents.to(model.dtype))
        h, w = latents.shape[-2:]
        t = timestep.to(latents.device).expand(x.shape[0]).to(model.dtype)
        embedded = None
        if model.config.guidance_embeds:  # a guidance-distilled Qwen-Image takes its guidance as an input
            embedded = torch.full([x.shape[0]], guidance, device=x.device, dtype=torch.float32)
        with self.plain_attention():
            out = model(hidden_states=x, timestep=t / 1000, guidance=embedded, encoder_hidden_states=text.embeds,
                        encoder_hidden_states_mask=text.mask, img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                        return_dict=False)[0]
        return self.unpack(out, (h, w))

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config):
        # QwenImagePipeline: linspace(1, 1/N, N), shifted by the image's size (1.15 its fallback max_shift)
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), shift_mu(image_seq_len, config, max_shift=1.15)
