"""What the MM-DiT families (Stable Diffusion 3/3.5, Flux.1) share: joint-attention blocks, T5 text, blocks chosen
by number for edits and recording, flow-matching Euler sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..alignment import Tokenized, tokenize
from ..attention.cross import attend_by_run
from ..attention.joint import JointAttend
from ..attention.state import JointLayerPlan, RunState
from ..limits import check_finite_number
from .base import Conditioning, Denoiser, Family, check_blocks, t5_length


@dataclass
class FlowText(Conditioning):
    """One or more prompts' conditioning, as the pipeline's `encode_prompt` makes it (no guidance)."""

    embeds: torch.Tensor  # (B, T, D): SD3's joint CLIP + T5 text, or Flux's T5 text
    pooled: torch.Tensor  # (B, D2)
    text_ids: torch.Tensor | None = None  # Flux's text positions for RoPE, the same for every row: (T, 3)
    mask: torch.Tensor | None = None  # a padding mask the pipeline passes with it (Chroma's): (B, T), 1 = attended

    def with_embeds(self, embeds: torch.Tensor) -> FlowText:
        return replace(self, embeds=embeds)

    @staticmethod
    def cat(*texts: FlowText) -> FlowText:
        """One batch of several conditionings; a masked text padded (and masked) to the longest (Qwen-Image's)."""
        masks = [text.mask for text in texts]
        length = max(text.embeds.shape[1] for text in texts)
        if masks[0] is not None:
            masks = [F.pad(mask, (0, length - mask.shape[1])) for mask in masks]
        embeds = [F.pad(text.embeds, (0, 0, 0, length - text.embeds.shape[1])) for text in texts]
        return replace(texts[0], embeds=torch.cat(embeds), pooled=torch.cat([text.pooled for text in texts]),
                       mask=None if masks[0] is None else torch.cat(masks))


class MMDiTFamily(Family):
    """Joint-attention blocks numbered as they run; text = T5 (and CLIP) tokens; flow-matching Euler."""

    default_steps = 28
    inversion_methods = ("direct", "euler")
    takes_max_sequence_length = True
    max_text_length = 512  # T5's positions
    map_unit = "word"  # a word has tokens in every text part (SD3: CLIP and T5): one map per word
    layer_options = ("cross_blocks", "self_blocks", "record_blocks")
    layer_hint = "MM-DiT models choose blocks"
    default_max_sequence_length: ClassVar[int] = 256
    text_first: ClassVar[bool]  # whether the text tokens come before the image tokens in a joint sequence
    # Pipeline keywords that would give a text encoder another prompt than the one the edits align.
    other_prompts: ClassVar[tuple[str, ...]] = ("negative_prompt_2", "negative_prompt_3", "prompt_2", "prompt_3")

    @classmethod
    def detect(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return type(transformer).__name__.startswith(cls.transformer_prefix)

    transformer_prefix: ClassVar[str]
    single_file_blocks: ClassVar[str] = ""  # the weight-name prefix of its blocks in an original single-file checkpoint
    loads_single_file = True  # a family whose pipeline diffusers cannot load from one file says False

    @classmethod
    def single_file_class(cls, names: Sequence[str]) -> str | None:
        if not cls.loads_single_file or not cls.single_file_blocks:
            return None
        stripped = (name.removeprefix("model.diffusion_model.") for name in names)
        return cls.pipeline_classes[0] if any(name.startswith(cls.single_file_blocks) for name in stripped) else None

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.transformer

    # -- Text ----------------------------------------------------------------------------------------------------

    def max_sequence_length(self, pipeline_kwargs: Mapping[str, Any]) -> int:
        return t5_length(pipeline_kwargs, self.default_max_sequence_length, self.max_text_length)

    def _t5(self, tokenizer, prompt: str, length: int) -> Tokenized:
        return tokenize(tokenizer, prompt, length, what="(EOS included; raise max_sequence_length up to 512)")

    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]  # one text encoder (SD3 and Flux have more)

    def part_tokenizers(self) -> list:
        """The tokenizer of each part of the joint text (one part, by default)."""
        return [self.pipe.tokenizer]

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        """One text per position of the joint text: each part's tokens, then "" for its padding."""
        texts: list[str] = []
        for part, tokenizer in zip(tokenized.blocks, self.part_tokenizers()):
            t = part.tokenized
            words = [w.replace("</w>", "").replace("\u2581", "") for w in tokenizer.convert_ids_to_tokens(t.ids)] if t.ids else []
            texts.extend(words + [""] * (t.length - len(words)))
        return texts

    # -- Sizes ---------------------------------------------------------------------------------------------------

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def patch_size(self) -> int:
        raise NotImplementedError

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.patch_size()

    def size_unit(self) -> str:
        return f"a {self.patch_size()}x{self.patch_size()} patch of a {self.pipe.vae_scale_factor}x VAE"

    # -- Blocks --------------------------------------------------------------------------------------------------

    def block_names(self) -> list[tuple[str, str]]:
        """(processor name, stream) of every attention layer, in the order the blocks run."""
        raise NotImplementedError

    def blocks(self) -> dict[str, tuple[int, str]]:
        """Processor name -> (block number, stream)."""
        numbers: dict[str, int] = {}
        out = {}
        for name, stream in self.block_names():
            block_name = name.rsplit(".attn", 1)[0]
            number = numbers.setdefault(block_name, len(numbers))
            out[name] = (number, stream)
        return out

    def num_blocks(self) -> int:
        return len({number for number, _ in self.blocks().values()})

    def default_self_blocks(self) -> frozenset[int]:
        raise NotImplementedError

    def check_layer_options(self, options: Mapping[str, Any]) -> None:
        super().check_layer_options(options)
        for name in self.layer_options:
            if options.get(name) is not None:
                self._blocks(options[name], name)

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   explicit: bool, options: Mapping[str, Any]) -> JointLayerPlan:
        """Which blocks edit, self-replace and record at this latent size."""
        patch = self.patch_size()
        grid = (latent_size[0] // patch, latent_size[1] // patch)
        every = frozenset(range(self.num_blocks()))

        def chosen(name: str, default: frozenset[int]) -> frozenset[int]:
            return default if options.get(name) is None else self._blocks(options[name], name)

        if record_attention not in (False, None, True):
            raise ValueError(
                f"record_attention on {type(self.pipe).__name__} is True or False (maps live on the {grid[0]}x{grid[1]} "
                f"patch grid; choose blocks with Editor(record_blocks=...)), not {record_attention!r}"
            )
        return JointLayerPlan(
            grid=grid, text_length=text_length, text_first=self.text_first, cross_blocks=chosen("cross_blocks", every),
            self_blocks=chosen("self_blocks", self.default_self_blocks()), record_blocks=chosen("record_blocks", every),
            blend_size=grid if blend else None, record_sizes=frozenset({grid}) if record_attention else frozenset(),
            explicit=explicit,
        )

    def _blocks(self, blocks: Sequence[int], what: str) -> frozenset[int]:
        return check_blocks(blocks, self.num_blocks(), what)

    def processors(self, states: Sequence[RunState], counts: Sequence[int]) -> dict[str, Any]:
        processors = {}
        for name, (number, stream) in self.blocks().items():
            attends = [JointAttend(state, number, name, stream) for state in states]
            attend = attends[0] if len(attends) == 1 else _Grouped(attends, list(counts))
            processors[name] = self.processor_class(attend)
        return processors

    processor_class: ClassVar[type]

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        super().check_call_kwargs(pipeline_kwargs, inversion)
        length = getattr(inversion, "max_sequence_length", None)
        if length is not None and pipeline_kwargs.setdefault("max_sequence_length", length) != length:
            raise ValueError(f"this inversion was made with max_sequence_length={length}; edit it with the same, "
                             f"not {pipeline_kwargs['max_sequence_length']}")
        if "true_cfg_scale" in pipeline_kwargs:
            check_finite_number(pipeline_kwargs["true_cfg_scale"], "true_cfg_scale")
        if pipeline_kwargs.get("skip_guidance_layers"):
            raise ValueError("skip_guidance_layers adds a forward pass the edits do not know; leave it unset")
        for key in self.other_prompts:
            if key in pipeline_kwargs:
                raise ValueError(f"{key} would give a text encoder another prompt than the one the edits align; "
                                 "leave it unset")

    # -- Inversion: the flow loops' schedule and model -----------------------------------------------------------

    def inversion_schedule(self, num_inference_steps: int, height: int, width: int, *, device=None):
        """A copy of the pipeline's scheduler with the sigmas (and shift) its `__call__` sets at this size."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        _, h, w = self.latent_shape(height, width)
        patch = self.patch_size()
        image_seq_len = (h // patch) * (w // patch)  # image tokens, as each pipeline counts them
        sigmas, mu = self.flow_sigmas(num_inference_steps, image_seq_len, scheduler.config)
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return scheduler

    def denoiser(self, scheduler, *, height: int, width: int, max_sequence_length: int, device) -> FlowDenoiser:
        return FlowDenoiser(self, max_sequence_length, device)

    def encode_text(self, prompt: str, *, max_sequence_length: int, device) -> FlowText:
        """The prompt's conditional embeddings from the pipeline's own `encode_prompt` (no negative branch)."""
        raise NotImplementedError

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        """The transformer's velocity at unpacked `latents` (B, C, h, w) and `timestep` (0..1000), called as the
        pipeline calls it; returned unpacked, in the model's dtype."""
        raise NotImplementedError

    def flow_sigmas(self, num_inference_steps: int, image_seq_len: int, config) -> tuple[Any, float | None]:
        """The (sigmas, mu) the pipeline's `__call__` sets on its scheduler (None: the scheduler's own)."""
        raise NotImplementedError


def decoded_texts(tokenizer, tokenized: Tokenized) -> list[str]:
    """One readable text per position of a one-part text whose tokenizer marks spaces in its pieces (byte-level
    BPE's "Ġ"): each token decoded, and "" for the padding, before the text (`lead`) and after it."""
    texts = [tokenizer.decode([i]).strip() for i in tokenized.ids]
    return [""] * tokenized.lead + texts + [""] * (tokenized.length - tokenized.lead - len(texts))


class FlowDenoiser(Denoiser):
    """An MM-DiT as the flow loops evaluate it: its velocity at the scheduler's timestep (sigma x 1000), by the
    family's `encode_text` and `denoise`, with the text at the run's T5 length."""

    def __init__(self, family: MMDiTFamily, max_sequence_length: int, device):
        self.family, self.max_sequence_length, self.device = family, max_sequence_length, device

    def encode(self, prompt: str) -> FlowText:
        return self.family.encode_text(prompt, max_sequence_length=self.max_sequence_length, device=self.device)

    def negative(self) -> FlowText:
        return self.encode("")  # the empty prompt: SD3's and Chroma's unconditional text without a negative prompt

    def batch(self, *conds: FlowText) -> FlowText:
        return FlowText.cat(*conds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: FlowText, *, guidance: float = 1.0) -> torch.Tensor:
        return self.family.denoise(x, t, cond, guidance=guidance)


class _Grouped:
    """Several runs' `JointAttend`s as one: each run's rows of the batch go through its own."""

    def __init__(self, attends: list[JointAttend], counts: list[int]):
        self.attends, self.counts = attends, counts

    def __call__(self, q, k, v, mask=None):
        return attend_by_run(self.attends, self.counts, q, k, v, mask)


def shift_mu(image_seq_len: int, config, *, max_shift: float) -> float:
    """The resolution-dependent shift `mu` of diffusers' `calculate_shift`, with the scheduler's settings.

    `max_shift` is the pipeline's own fallback when the configuration has none (Flux: 1.15, SD3: 1.16).

    >>> shift_mu(256, {}, max_shift=1.15), round(shift_mu(4096, {}, max_shift=1.15), 6)
    (0.5, 1.15)
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)
