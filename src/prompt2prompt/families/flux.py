"""Flux.1 (dev, schnell): text tokens first; double-stream blocks, then single-stream blocks over one joint
sequence; RoPE positions; latents packed 2x2 into tokens; text = T5 (CLIP gives only the pooled embedding)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..alignment import Tokenized, join, tokenize
from ..attention.joint import JointAttend
from . import compat
from .mmdit import FlowText, MMDiTFamily, shift_mu

# Stable Flow (Avrahami et al., 2024, "Stable Flow: Vital Layers for Training-Free Image Editing", sec. 4 and
# their code's `vital` layer list): the FLUX.1 blocks, numbered double-stream 0-18 then single-stream 19-56,
# whose removal changes the image most; injecting the source's attention there keeps the structure.
FLUX_VITAL_BLOCKS = (0, 1, 17, 18, 25, 28, 53, 54, 56)


def double_then_single(model) -> list[tuple[str, str]]:
    """(processor name, stream) of a Flux-style transformer's layers as they run: its double-stream blocks' ("joint"),
    then its single-stream blocks' ("single"); Flux.1's and FLUX.2's name them alike."""
    names = list(model.attn_processors)
    double = [n for n in names if n.startswith("transformer_blocks.")]
    single = [n for n in names if n.startswith("single_transformer_blocks.")]
    return [(n, "joint") for n in double] + [(n, "single") for n in single]


class FluxJointProcessor:
    """Flux.1's attention (`FluxAttnProcessor`'s computation, RoPE included) with the run's edits applied by `attend`.

    Double-stream blocks get the text as `encoder_hidden_states`; single-stream blocks get one sequence whose
    first L tokens are the text, L coming from the run's plan.
    """

    projections = staticmethod(compat.flux_qkv_projections)  # the model's own query, key and value projections

    def __init__(self, attend: JointAttend):
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, c_query, c_key, c_value = self.projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, S, heads, d)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            c_query = attn.norm_added_q(c_query.unflatten(-1, (-1, attn.head_dim)))
            c_key = attn.norm_added_k(c_key.unflatten(-1, (-1, attn.head_dim)))
            c_value = c_value.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([c_query, query], 1), torch.cat([c_key, key], 1), torch.cat([c_value, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        context, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


class FluxFamily(MMDiTFamily):
    """Flux.1: text tokens first; double-stream blocks, then single-stream blocks over one joint sequence."""

    name = "flux"
    title = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    components = ("transformer", "text_encoder", "text_encoder_2")
    transformer_prefix = "FluxTransformer"
    single_file_blocks = "double_blocks."
    default_guidance = 3.5
    default_max_sequence_length = 512
    text_first = True
    processor_class = FluxJointProcessor

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The T5 text (`max_sequence_length` positions); CLIP gives only the pooled embedding, which is not edited."""
        tokenize(self.pipe.tokenizer, prompt)  # CLIP would cut a longer prompt silently: refuse it, as for SD
        return join([self._t5(self.pipe.tokenizer_2, prompt, self.max_sequence_length(pipeline_kwargs))])

    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    def part_tokenizers(self) -> list:
        return [self.pipe.tokenizer_2]

    def patch_size(self) -> int:
        return 2  # Flux packs 2x2 latent pixels into one token

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.model.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def block_names(self) -> list[tuple[str, str]]:
        return double_then_single(self.model)

    def default_self_blocks(self) -> frozenset[int]:
        count = self.num_blocks()
        return frozenset(b for b in FLUX_VITAL_BLOCKS if b < count)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return compat.flux_pack_latents(self.pipe, latents)

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        b, _, channels = latents.shape
        h, w = latent_size
        x = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        # True CFG calls the transformer twice a step, the conditional pass first, then the negative.
        return call_kwargs.get("true_cfg_scale", 1.0) > 1 and bool(call_kwargs.get("negative_prompt"))

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                               max_sequence_length=max_sequence_length)
        return FlowText(embeds, pooled, text_ids)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        model = self.model
        dtype, device = model.dtype, latents.device
        x = self.pack(latents.to(dtype))
        t = timestep.to(device).expand(x.shape[0])
        h, w = latents.shape[-2:]
        image_ids = compat.flux_latent_image_ids(self.pipe, x.shape[0], h // 2, w // 2, device, dtype)
        with self.plain_attention():
            out = model(hidden_states=x, timestep=t.to(dtype) / 1000, encoder_hidden_states=text.embeds,
                        txt_ids=text.text_ids, img_ids=image_ids, return_dict=False,
                        **self._conditioning(text, x, guidance))[0]
        return self.unpack(out, (h, w))

    def _conditioning(self, text: FlowText, x: torch.Tensor, guidance: float) -> dict[str, Any]:
        """The transformer's other inputs: the pooled CLIP text, and Flux-dev's embedded guidance."""
        embedded = None
        if self.model.config.guidance_embeds:
            embedded = torch.full([x.shape[0]], guidance, device=x.device, dtype=torch.float32)
        return dict(guidance=embedded, pooled_projections=text.pooled)

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config):
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return sigmas, shift_mu(image_seq_len, config, max_shift=1.15)  # Flux always shifts by the image's size
