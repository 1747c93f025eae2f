"""Z-Image (`ZImagePipeline`): a single-stream DiT whose rows are `[image tokens, caption tokens]`, image first, with
an image-only refiner and a text-only refiner before its main blocks; a Qwen3 text encoder read through its chat
template.

What the contract asks here (docs/semantics.md, "Newer families"):
- The text is the templated prompt, nothing dropped (`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>
  assistant\\n`), each prompt its own length `n`; the transformer pads each caption to a multiple of 32 with a
  learned token that is attended (text of no word), then a batch's rows to the longest with a mask. So a prompt's
  text has `true_length` = n rounded up to 32 (the attended part) and the run's length L = the longest of those; the
  refinement mapper's padding FIX starts at n.
- One stream from the first block: the main blocks are joint blocks whose text sits after the image; the
  `noise_refiner` blocks see the image alone (the self-attention rule in the blocks chosen for self-replacement);
  the `context_refiner` blocks see the text alone and run as in plain generation (our processors are not put there).
- One text length per run: the image tokens' RoPE positions start after the caption's padded length, so every
  conditional row of a run gets its image at the run's L + 1 (`installed` shifts them; the pipeline would put a
  shorter prompt's image closer to its text). The unconditional rows keep the pipeline's own positions: they are
  plain generation. Where every prompt of a run pads to the same length, nothing moves.
- Rows: CFG is on at any guidance > 0 (not > 1), the batch `[cond..., uncond...]` (`conditional_first`); late in a
  run with `cfg_truncation` < 1 the batch is the conditional rows alone.
- Image padding: a token grid that is not a multiple of 32 gets learned image pads after the image tokens; they are
  image tokens for every rule (keys of the image block, queries like any other), and the maps leave them out.
- Time and sign: the model is given `(1000 - t) / 1000` and predicts `x0 - noise`; the inversions negate it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..alignment import Tokenized, tokenize_templated
from ..attention.joint import JointAttend
from ..attention.state import JointLayerPlan, RunState
from ..limits import quoted
from .mmdit import FlowText, MMDiTFamily, decoded_texts

_SENTINEL = "\x00"  # stands for the prompt while the chat template is rendered
SEQ_MULTIPLE = 32  # the transformer pads captions and images to a multiple of this


def padded(tokens: int) -> int:
    """A caption's length in the transformer: `tokens` rounded up to a multiple of 32.

    >>> padded(15), padded(32), padded(33)
    (32, 32, 64)
    """
    return tokens + (-tokens) % SEQ_MULTIPLE


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding: x (B, S, heads, d) as d/2 complex numbers times `freqs` (B, S, d/2), in float32."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class ZImageProcessor:
    """`ZSingleStreamAttnProcessor`'s computation (q/k RMS norms, then complex RoPE) with the run's edits applied by
    `attend`; the boolean row mask the model passes becomes an additive key mask."""

    def __init__(self, attend: JointAttend):
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query, key, value = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rope(query, freqs_cis), _rope(key, freqs_cis)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # (B, S), True = attended
            mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~attention_mask.bool(), float("-inf"))[:, None, None, :]
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(query.dtype))


@dataclass(frozen=True)
class ZImageLayerPlan(JointLayerPlan):
    """Z-Image's block choices, and where its conditional rows' image positions start: after `image_start`, the run's
    own text length (kept when a group of runs plans it at a longer one). A cached source must share it."""

    image_start: int = 0

    def cache_settings(self) -> dict:
        return {**super().cache_settings(), "text_length": self.image_start}


class ZImageFamily(MMDiTFamily):
    """Z-Image: image-first single-stream blocks after an image-only and a text-only refiner; templated Qwen3 text,
    each caption padded to 32 with an attended learned token; CFG in one batch, conditional rows first."""

    name = "zimage"
    title = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    components = ("transformer", "text_encoder")
    transformer_prefix = "ZImageTransformer"
    loads_single_file = False  # diffusers loads Z-Image's transformer from one file, not its pipeline
    default_steps = 50  # ZImagePipeline's defaults (Z-Image-Turbo's card: 8 or 9 steps at guidance 0)
    default_guidance = 5.0
    default_max_sequence_length = 512
    max_text_length = 512
    text_first = False
    conditional_first = True
    other_prompts = ()
    text_inputs: ClassVar[tuple[str, ...]] = ("prompt", "prompt_embeds", "negative_prompt_embeds")

    @classmethod
    def detect(cls, pipe) -> bool:
        return type(pipe).__name__ in cls.pipeline_classes

    @property
    def latents_dtype(self) -> torch.dtype:
        return torch.float32  # the pipeline draws its latents in float32 whatever the model's dtype

    # -- Text ----------------------------------------------------------------------------------------------------

    def _template(self) -> str:
        text = self.pipe.tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        return text.replace(_SENTINEL, "{}")

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The templated prompt's tokens, nothing dropped, at its caption's padded length (a multiple of 32)."""
        return self.tokenize_run([prompt], pipeline_kwargs)[0]

    def tokenize_run(self, prompts: Sequence[str], pipeline_kwargs: Mapping[str, Any],
                     length: int | None = None) -> list[Tokenized]:
        """Every prompt at the run's length L, the longest caption's padded length (or `length`): a prompt of n tokens
        has attended learned pads up to its padded length (`true_length`), and masked padding after it."""
        limit = self.max_sequence_length(pipeline_kwargs)
        tokens = [self._caption(p, limit) for p in prompts]
        run_length = max([padded(len(t.ids)) for t in tokens] + [length or 0])
        return [replace(t, length=run_length, true_length=padded(len(t.ids))) for t in tokens]

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        return decoded_texts(self.pipe.tokenizer, tokenized)

    def _caption(self, prompt: str, limit: int | None = None) -> Tokenized:
        """The prompt's caption: the templated prompt's tokens, nothing dropped, unpadded (at most `limit`)."""
        return tokenize_templated(self.pipe.tokenizer, prompt, self._template(), 0, limit, padded=False,
                                  what="(its chat template included; raise max_sequence_length up to 512)")

    def call_text(self, prompts: list[str], negative: list[str] | None, length: int, inversion, device) -> dict[str, Any]:
        if inversion is not None:
            source = padded(len(self._caption(prompts[0]).ids))
            if source != length:
                raise ValueError(f"this inversion placed the image after the source's {source} caption tokens, and "
                                 f"the edits' text pads to {length}, which moves it: the source row would not be the "
                                 "image; shorten the edits")
        # Lists of their own: the pipeline writes the templated prompts back into the lists it is given.
        if negative is not None:
            caption = padded(len(self._caption(negative[0]).ids))
            if caption > length:
                raise ValueError(f"the negative prompt {quoted(negative[0])} pads to {caption} caption tokens, more "
                                 f"than the prompts' {length}: Z-Image would then move the edits' image; shorten it")
            return {"prompt": list(prompts), "negative_prompt": list(negative)}
        return {"prompt": list(prompts)}

    # -- Sizes and latents ---------------------------------------------------------------------------------------

    def native_size(self) -> int:
        return 1024  # ZImagePipeline's default height and width (its transformer's config names no size)

    def patch_size(self) -> int:
        return self.model.config.all_patch_size[0]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.model.config.in_channels, 2 * (height // scale), 2 * (width // scale)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mode in the pipeline's latent space: (mode - shift) * scale."""
        vae = self.pipe.vae
        with torch.no_grad():
            mean = vae.encode(pixels.to(device=self.execution_device(), dtype=vae.dtype)).latent_dist.mode()
        return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).float()

    # -- Blocks --------------------------------------------------------------------------------------------------

    def block_names(self) -> list[tuple[str, str]]:
        """The image-only refiner's attention layers, then the main blocks' (the text-only refiner is not edited)."""
        names = [(name, "image") for name, _ in self.model.noise_refiner.named_children()]
        names = [(f"noise_refiner.{name}.attention", stream) for name, stream in names]
        return names + [(f"layers.{name}.attention", "single") for name, _ in self.model.layers.named_children()]

    def default_self_blocks(self) -> frozenset[int]:
        # Our choice (no study names Z-Image's structural blocks), as on SD3, Qwen-Image and FLUX.2: every block.
        return frozenset(range(self.num_blocks()))

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   explicit: bool, options: Mapping[str, Any]) -> ZImageLayerPlan:
        plan = super().layer_plan(latent_size, text_length, blend=blend, record_attention=record_attention,
                                  explicit=explicit, options=options)
        return ZImageLayerPlan(**vars(plan), image_start=text_length)

    processor_class = ZImageProcessor

    @contextlib.contextmanager
    def installed(self, processors: dict[str, Any], states: Sequence[RunState], counts: Sequence[int]) -> Iterator[None]:
        """Each layer's processor set on its module (the model has no `set_attn_processor`), and the conditional rows'
        image positions started after their run's text length (`ZImageLayerPlan.image_start`)."""
        model = self.model
        modules = dict(model.named_modules())
        saved = {name: modules[name].processor for name in processors}
        starts = [state.layers.image_start for state, count in zip(states, counts) for _ in range(count)]
        before = model.__dict__.get("patchify_and_embed")  # a wrapper someone put there, if any
        patchify = model.patchify_and_embed

        def patchify_and_embed(images, captions, patch_size, f_patch_size):
            out = patchify(images, captions, patch_size, f_patch_size)
            positions, pads = out[3], out[5]  # per row: (tokens, 3) RoPE positions, and which tokens are image pads
            if len(images) in (len(starts), 2 * len(starts)):  # the conditional rows first, then any unconditional
                for row, start in enumerate(starts):
                    positions[row][~pads[row], 0] = start + 1
            return out

        model.patchify_and_embed = patchify_and_embed
        try:
            for name, processor in processors.items():
                modules[name].set_processor(processor)
            yield
        finally:
            for name, processor in saved.items():
                modules[name].set_processor(processor)
            if before is None:
                del model.patchify_and_embed  # the class's own again
            else:
                model.patchify_and_embed = before

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        return False  # guidance is one batch, [cond..., uncond...]

    # -- Inversion: the flow loops' text, model call and schedule ------------------------------------------------

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        with torch.no_grad():
            (embeds,), _ = self.pipe.encode_prompt([prompt], device=device, do_classifier_free_guidance=False,
                                                   max_sequence_length=max_sequence_length)
        return FlowText(embeds[None], embeds.new_zeros(1, 0))

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        """The velocity (noise - x0) at `latents` (B, C, h, w): the model is given (1000 - t) / 1000 and lists, and
        predicts x0 - noise."""
        model = self.model
        x = list(latents.to(model.dtype).unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        t = ((1000 - timestep.to(latents.device)) / 1000).expand(len(x)).to(model.dtype)
        captions = [text.embeds[i % text.embeds.shape[0]] for i in range(len(x))]
        with self.plain_attention():
            out = model(x, t, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return get_default_z_image_sigmas(num_inference_steps), mu
