"""Model families: what the engine asks of a pipeline, answered once per kind of model.

- `UNetFamily`: Stable Diffusion 1.x/2.x and SDXL (a UNet with cross- and self-attention, CLIP text of 77).
- `SD3Family`: Stable Diffusion 3/3.5 (MM-DiT joint attention; text = 77 CLIP tokens, then the T5 tokens).
- `FluxFamily`: Flux.1 (MM-DiT double- and single-stream blocks, RoPE; text = T5 tokens; packed latents).

`family_of(pipe)` picks one. The editor asks it how prompts tokenize, which processor each attention layer
gets, how big latents are and how the pipeline is called; nothing else in the engine looks at the model's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .alignment import MAX_TOKENS, Tokenized, join, tokenize
from .joint import FluxJointProcessor, JointLayerPlan, SD3JointProcessor
from .processor import P2PAttnProcessor, RunState

FAMILIES = ("unet", "sd3", "flux")  # the `kind` of each family, as recipes and manifests record it
MAX_SEQUENCE_LENGTH = 512  # T5 positions: the most SD3's and Flux's pipelines take

# Stable Flow (Avrahami et al., 2024, "Stable Flow: Vital Layers for Training-Free Image Editing", sec. 4 and
# their code's `vital` layer list): the FLUX.1 blocks, numbered double-stream 0-18 then single-stream 19-56,
# whose removal changes the image most; injecting the source's attention there keeps the structure.
FLUX_VITAL_BLOCKS = (0, 1, 17, 18, 25, 28, 53, 54, 56)


def family_of(pipe) -> UNetFamily | SD3Family | FluxFamily:
    """The family of a diffusers pipeline; a clear error for one the engine does not drive."""
    if getattr(pipe, "unet", None) is not None:
        return UNetFamily(pipe)
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__
    if name.startswith("SD3Transformer"):
        return SD3Family(pipe)
    if name.startswith("FluxTransformer"):
        return FluxFamily(pipe)
    raise TypeError(
        f"Editor needs a Stable Diffusion pipeline (1.x, 2.x, XL, 3, 3.5) or a Flux.1 pipeline; "
        f"{type(pipe).__name__} (with {name if transformer is not None else 'no unet or transformer'}) is not one"
    )


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    return value


class UNetFamily:
    """A UNet pipeline (SD 1.x/2.x, SDXL): 77 CLIP tokens, cross-attention layers by resolution."""

    def max_sequence_length(self, pipeline_kwargs: dict[str, Any]) -> int:
        return MAX_TOKENS

    name = kind = "unet"
    default_steps, default_guidance = 50, 7.5
    default_inversion = "null-text"
    tensor_inputs = ("latents", "prompt_embeds")

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = pipe.unet

    def tokenize(self, prompt: str, pipeline_kwargs: dict[str, Any]) -> Tokenized:
        """The prompt's words and its CLIP token positions."""
        return tokenize(self.pipe.tokenizer, prompt)

    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    def default_size(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    def multiple(self) -> int:
        return max(8, self.pipe.vae_scale_factor)  # diffusers' pipelines require multiples of 8 whatever the VAE

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        return self.model.config.in_channels, height // scale, width // scale

    def processors(self, state: RunState) -> dict[str, Any]:
        return {name: P2PAttnProcessor(state, name) for name in self.model.attn_processors}

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        return [t.replace("</w>", "") for t in self.pipe.tokenizer.convert_ids_to_tokens(tokenized.ids)]

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return latents


class _MMDiTFamily:
    """What SD3 and Flux share: joint-attention blocks, T5 text, block choices for edits and recording."""

    name = "mmdit"
    tensor_inputs = ("latents",)
    default_inversion = "direct"
    default_max_sequence_length = 256

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = pipe.transformer

    def max_sequence_length(self, pipeline_kwargs: dict[str, Any]) -> int:
        length = _positive_int(pipeline_kwargs.get("max_sequence_length", self.default_max_sequence_length),
                               "max_sequence_length")
        if length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be at most {MAX_SEQUENCE_LENGTH}, not {length}")
        return length

    def _t5(self, tokenizer, prompt: str, length: int) -> Tokenized:
        return tokenize(tokenizer, prompt, length, what="(EOS included; raise max_sequence_length up to 512)")

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def block_names(self) -> list[tuple[str, str]]:
        """(processor name, kind) of every attention layer, in the order the blocks run."""
        raise NotImplementedError

    def blocks(self) -> dict[str, tuple[int, str]]:
        """Processor name -> (block number, kind)."""
        numbers: dict[str, int] = {}
        out = {}
        for name, kind in self.block_names():
            block_name = name.rsplit(".attn", 1)[0]
            number = numbers.setdefault(block_name, len(numbers))
            out[name] = (number, kind)
        return out

    def num_blocks(self) -> int:
        return len({number for number, _ in self.blocks().values()})

    def default_self_blocks(self) -> frozenset[int]:
        raise NotImplementedError

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   cross_blocks, self_blocks, record_blocks, explicit: bool) -> JointLayerPlan:
        """Which blocks edit, self-replace and record at this latent size."""
        patch = self.patch_size()
        grid = (latent_size[0] // patch, latent_size[1] // patch)
        every = frozenset(range(self.num_blocks()))
        cross = every if cross_blocks is None else self._blocks(cross_blocks, "cross_blocks")
        selfs = self.default_self_blocks() if self_blocks is None else self._blocks(self_blocks, "self_blocks")
        records = every if record_blocks is None else self._blocks(record_blocks, "record_blocks")
        if record_attention not in (False, None, True):
            raise ValueError(
                f"record_attention on {type(self.pipe).__name__} is True or False (maps live on the {grid[0]}x{grid[1]} "
                f"patch grid; choose blocks with Editor(record_blocks=...)), not {record_attention!r}"
            )
        return JointLayerPlan(
            grid=grid, text_length=text_length, text_first=self.text_first, cross_blocks=cross, self_blocks=selfs,
            record_blocks=records, blend_size=grid if blend else None,
            record_sizes=frozenset({grid}) if record_attention else frozenset(), explicit=explicit,
        )

    def _blocks(self, blocks: Sequence[int], what: str) -> frozenset[int]:
        count = self.num_blocks()
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence | set | frozenset):
            raise TypeError(f"{what} must be a list of block numbers, not {blocks!r}")
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < count:
                raise ValueError(f"{what}: {b!r} is not a block of this model, whose blocks are 0..{count - 1}")
        return frozenset(blocks)

    def processors(self, state: RunState) -> dict[str, Any]:
        cls = self.processor_class
        return {name: cls(state, number, kind) for name, (number, kind) in self.blocks().items()}

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        """One text per position of the joint text: each part's tokens, then "" for its padding."""
        texts: list[str] = []
        for part, tokenizer in zip(tokenized.blocks, self.part_tokenizers()):
            t = part.tokenized
            words = [w.replace("</w>", "").replace("\u2581", "") for w in tokenizer.convert_ids_to_tokens(t.ids)] if t.ids else []
            texts.extend(words + [""] * (t.length - len(words)))
        return texts

    def patch_size(self) -> int:
        raise NotImplementedError


class SD3Family(_MMDiTFamily):
    """Stable Diffusion 3/3.5: image tokens then text tokens in each joint block; SD3.5's `attn2` is image-only."""

    kind = "sd3"
    default_steps, default_guidance = 28, 7.0
    text_first = False
    processor_class = SD3JointProcessor

    def tokenize(self, prompt: str, pipeline_kwargs: dict[str, Any]) -> Tokenized:
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

    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.patch_size()

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

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return latents


class FluxFamily(_MMDiTFamily):
    """Flux.1: text tokens first; double-stream blocks, then single-stream blocks over one joint sequence."""

    kind = "flux"
    default_steps, default_guidance = 28, 3.5
    default_max_sequence_length = 512
    text_first = True
    processor_class = FluxJointProcessor

    def tokenize(self, prompt: str, pipeline_kwargs: dict[str, Any]) -> Tokenized:
        """The T5 text (`max_sequence_length` positions); CLIP gives only the pooled embedding, which is not edited."""
        tokenize(self.pipe.tokenizer, prompt)  # CLIP would cut a longer prompt silently: refuse it, as for SD
        return join([self._t5(self.pipe.tokenizer_2, prompt, self.max_sequence_length(pipeline_kwargs))])

    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    def part_tokenizers(self) -> list:
        return [self.pipe.tokenizer_2]

    def patch_size(self) -> int:
        return 2  # Flux packs 2x2 latent pixels into one token

    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.model.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def block_names(self) -> list[tuple[str, str]]:
        names = list(self.model.attn_processors)
        double = [n for n in names if n.startswith("transformer_blocks.")]
        single = [n for n in names if n.startswith("single_transformer_blocks.")]
        return [(n, "joint") for n in double] + [(n, "single") for n in single]

    def default_self_blocks(self) -> frozenset[int]:
        count = self.num_blocks()
        return frozenset(b for b in FLUX_VITAL_BLOCKS if b < count)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        b, _, channels = latents.shape
        h, w = latent_size
        x = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)


def check_text_length(family, prompt: str, what: str, pipeline_kwargs: dict[str, Any]) -> None:
    """Refuse a text (a negative prompt) that a text encoder would cut, as a prompt is refused."""
    for tokenizer in family.tokenizers():
        clip = "CLIP" in type(tokenizer).__name__
        limit = MAX_TOKENS if clip else family.max_sequence_length(pipeline_kwargs)
        length = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if length > limit:
            raise ValueError(
                f"{what} {prompt!r} is {length} tokens long, more than the text encoder's {limit} "
                f"({'BOS and EOS' if clip else 'EOS'} included); shorten it"
            )
