"""The data of an edit run: what `Editor.prepare` builds (`PreparedRun`), the rows of one pipeline call (`CallRows`),
and what a run returns (`EditResult`). They hold no behaviour of the run, so the modules that drive it (the editor,
its step callback, the sender) all read them from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..alignment import Tokenized
from ..attention.blend import BlendSpec
from ..attention.plan import EditPlan
from ..attention.state import LayerPlan
from ..edits import Edit
from .cache import SourceCache


@dataclass(frozen=True)
class PreparedRun:
    """Everything one edit run needs, checked and built by `Editor.prepare`; `Editor.run` sends it as it is.

    Its running values (the step, recorded maps, blend masks) are not here: every run makes them afresh.
    """

    prompts: tuple[str, ...]  # the source first, then the edits
    tokens: tuple[Tokenized, ...]  # every prompt's, at the run's one text length
    edits: tuple[Edit, ...]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    plan: EditPlan  # on the pipeline's device
    layers: LayerPlan
    blends: dict[int, BlendSpec]  # edit index -> its local blend
    latents: torch.Tensor  # (P, C, h, w) initial latents, on the pipeline's device
    inversion: Any = None  # an Inversion on the pipeline's device
    cache: SourceCache | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the run's latents."""
        return tuple(self.latents.shape[-2:])

    @property
    def text_length(self) -> int:
        """The length of the text every row of the run attends to (its pipeline call's)."""
        return self.tokens[0].length


@dataclass(frozen=True)
class CallRows:
    """The rows of one pipeline call: one run's (its source left out when cached), or several runs' end to end."""

    latents: torch.Tensor  # (rows, C, h, w), unpacked
    prompts: list[str]
    negative: list[str] | None
    counts: list[int]  # rows of each run
    tensor_inputs: list[str]


@dataclass
class EditResult:
    """The outcome of `Editor.edit`: the source first, then one image per edit."""

    images: Any  # list of PIL images, an array, or a (P, C, h, w) latent tensor, by output_type
    prompts: list[str]
    tokens: list[list[str]]  # per prompt, the token texts from BOS to EOS (MM-DiT: one per joint-text position)
    attention: dict[int, torch.Tensor] | None = None  # resolution -> (P, h, w, L) maps (L: the run's text length)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # edit index -> last local-blend mask (h, w)
    family: str = "unet"  # the model family's name (`prompt2prompt.families`)
    map_unit: str = "token"  # how the maps are best drawn: per "token", or per "word" (a word spans text parts)
    words: list[list[tuple[str, list[int]]]] = field(default_factory=list)  # per prompt, each word and its positions
