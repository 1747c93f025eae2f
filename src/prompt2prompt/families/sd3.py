"""Stable Diffusion 3 and 3.5: MM-DiT joint attention, image tokens then text tokens (77 CLIP, then T5);
SD3.5's blocks add an image-only `attn2`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..alignment import Tokenized, join, tokenize
from ..attention.joint import JointAttend
from .mmdit import FlowText, MMDiTFamily, shift_mu


class SD3JointProcessor:
    """SD3/3.5's attention (`JointAttnProcessor2_0`'s computation) with the run's edits applied by `attend`.

    A block's `attn` gets image tokens, then text tokens; SD3.5's `attn2` gets the image tokens alone.
    """

    def __init__(self, attend: JointAttend):
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # (B, heads, S, d)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:  # SD3.5's image-only attention
            out = self.attend(query, key, value)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query, key, value = torch.cat([query, c_query], 2), torch.cat([key, c_key], 2), torch.cat([value, c_value], 2)
        out = self.attend(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image_len = hidden_states.shape[1]
        out, context = out[:, :image_len], out[:, image_len:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


class SD3Family(MMDiTFamily):
    """Stable Diffusion 3/3.5: image tokens then text tokens in each joint block; SD3.5's `attn2` is image-only."""

    name = "sd3"
    title = "Stable Diffusion 3 and 3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    components = ("transformer", "text_encoder", "text_encoder_2")
    transformer_prefix = "SD3Transformer"
    single_file_blocks = "joint_blocks."
    default_guidance = 7.0
    text_first = False
    processor_class = SD3JointProcessor

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The joint text: 77 CLIP positions, then `max_sequence_length` T5 positions (zeros without T5)."""
        clip = tokenize(self.pipe.tokenizer, prompt)
        tokenizer_3 = getattr(self.pipe, "tokenizer_3", None)
        length = self.max_sequence_length(pipeline_kwargs)
        if getattr(self.pipe, "text_encoder_3", None) is None or tokenizer_3 is None:
            # diffusers then feeds zero tokens in T5's place: they belong to no word.
            t5 = Tokenized(prompt, list(clip.words), [], [[] for _ in clip.words], length=length)
        else:
            t5 = self._t5(tokenizer_3, prompt, length)
        return join([clip, t5])

    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, self.pipe.tokenizer_2, getattr(self.pipe, "tokenizer_3", None)) if t is not None]

    def part_tokenizers(self) -> list:
        return [self.pipe.tokenizer, getattr(self.pipe, "tokenizer_3", None) or self.pipe.tokenizer]

    def patch_size(self) -> int:
        return self.model.config.patch_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.model.config.in_channels, height // scale, width // scale

    def block_names(self) -> list[tuple[str, str]]:
        return [(name, "image" if ".attn2." in name else "joint") for name in self.model.attn_processors]

    def default_self_blocks(self) -> frozenset[int]:
        # No published study names SD3's structure-bearing blocks; every block works at one resolution, so the
        # UNet's per-resolution rule has nothing to choose by. Self-replacement in every block, for the self
        # window only (0.4 by default), keeps the source's layout; choose fewer with Editor(self_blocks=...).
        return frozenset(range(self.num_blocks()))

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=max_sequence_length)
        return FlowText(embeds, pooled)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        x = latents.to(self.model.dtype)
        t = timestep.to(x.device).expand(x.shape[0])
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
                          return_dict=False)[0]

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config):
        if config.get("use_dynamic_shifting"):  # SD3 shifts by the image's size only when its scheduler asks
            return None, shift_mu(image_seq_len, config, max_shift=1.16)
        return None, None
