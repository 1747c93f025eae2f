"""Chroma (Chroma1-HD, -Base, -Flash): Flux.1's architecture with T5 alone, no CLIP and no embedded guidance, true
classifier-free guidance as a second (negative) pass, and masked text padding: each prompt's T5 tokens, its EOS and
one padding token are attended, the rest of the padding is masked.

The mask is the contract's "masked padding" (docs/semantics.md): every masked key gets no probability, in every
row and path. diffusers' `ChromaPipeline` builds it as a float 0/1 tensor, which scaled-dot-product attention adds
to the scores instead of masking (diffusers issues #12116 and #13619: masked keys keep about e^-1 of their weight);
this family's processor reads it as the mask it means, so Chroma under the Editor, with or without edits, attends
as the model was trained to (the official code and ComfyUI mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..alignment import Tokenized, join
from .flux import FluxFamily, FluxJointProcessor
from .mmdit import FlowText


def key_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive key mask (B, 1, 1, S) of the mask a Chroma block hands its attention.

    A block passes `m[:, None, None, :] * m[:, None, :, None]` (B, 1, S, S) of the sequence mask m (text, then the
    image tokens, all attended); its last row, an image query's, is m itself.
    """
    if attention_mask is None:
        return None
    keep = attention_mask[:, :, -1:, :] > 0 if attention_mask.dim() == 4 else attention_mask[:, None, None, :] > 0
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


class ChromaJointProcessor(FluxJointProcessor):
    """Flux's attention with Chroma's padding mask applied as a key mask (see the module's note)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, key_mask(attention_mask, hidden_states.dtype),
                                image_rotary_emb)


def _plain_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def masked_processors(pipe) -> None:
    """Give a Chroma pipeline's transformer processors that apply its padding mask as a mask, for plain generation
    outside the Editor that matches the Editor's (and the model's training): `masked_processors(pipe); pipe(...)`."""
    pipe.transformer.set_attn_processor(ChromaJointProcessor(_plain_attend))


class ChromaFamily(FluxFamily):
    """Chroma: Flux's blocks; T5 text alone, masked after its EOS and one padding token; true CFG."""

    name = "chroma"
    title = "Chroma"
    pipeline_classes = ("ChromaPipeline",)
    components = ("transformer", "text_encoder")
    transformer_prefix = "ChromaTransformer"
    single_file_blocks = "distilled_guidance_layer."  # Chroma's modulation approximator; Flux has none
    default_guidance = 3.0  # ChromaPipeline's default
    default_steps = 28
    processor_class = ChromaJointProcessor
    other_prompts = ()

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The T5 text: the prompt's pieces and EOS, then one attended padding token; the rest is masked."""
        length = self.max_sequence_length(pipeline_kwargs)
        t5 = self._t5(self.pipe.tokenizer, prompt, length)
        return join([replace(t5, true_length=min(len(t5.ids) + 1, length))])

    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    def part_tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        # Guidance runs the transformer twice a step: the conditional pass first, then the negative.
        return call_kwargs.get("guidance_scale", self.default_guidance) > 1

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            embeds, text_ids, mask, *_ = self.pipe.encode_prompt(prompt=prompt, device=device,
                                                                 do_classifier_free_guidance=False,
                                                                 max_sequence_length=max_sequence_length)
        return FlowText(embeds, embeds.new_zeros(1, 0), text_ids, mask)

    def _conditioning(self, text: FlowText, x: torch.Tensor, guidance: float) -> dict[str, Any]:
        """The padding mask of the text, then every image token attended (no pooled text, no embedded guidance)."""
        mask = torch.cat([text.mask.to(x.device), text.mask.new_ones(x.shape[0], x.shape[1]).to(x.device)], 1)
        return dict(attention_mask=mask)

    @contextlib.contextmanager
    def plain_attention(self) -> Iterator[None]:
        """The padding mask applied as a mask (see the module's note), as the edits apply it."""
        saved = self.model.attn_processors
        masked_processors(self.pipe)
        try:
            yield
        finally:
            self.model.set_attn_processor(saved)
