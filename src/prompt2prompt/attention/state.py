"""One run's layer choices (`LayerPlan`, `JointLayerPlan`) and its running values (`RunState`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .plan import EditPlan


@dataclass(frozen=True)
class LayerPlan:
    """Which layers self-replace, drive local blending and are recorded, at one run's latent size."""

    sizes: dict[int, tuple[int, int]]  # query length -> (h, w) of the layer
    self_max_side: int
    blend_size: tuple[int, int] | None  # None: no local blend in this run
    record_sizes: frozenset[tuple[int, int]] = frozenset()
    explicit: bool = False
    # A DiT of one resolution (PixArt-Σ) chooses by block: the blocks whose self-attention is replaced (None: by
    # side, `self_max_side`, as in a UNet).
    self_blocks: frozenset[int] | None = None

    def recorded(self, size: tuple[int, int], place: str) -> bool:
        """Whether a cross-attention layer of this size and place (down, mid, up) has its maps recorded."""
        return (self.blend_size == size and place != "mid") or size in self.record_sizes

    def self_replaces(self, size: tuple[int, int], block: int | None = None) -> bool:
        """Whether a self-attention layer of this size (in this block, for a DiT) takes the source's attention."""
        if self.self_blocks is not None:
            return block in self.self_blocks
        return max(size) <= self.self_max_side

    def with_text_length(self, length: int) -> LayerPlan:
        """These layer choices for a run whose text is `length` long (a UNet's layers do not depend on it)."""
        return self

    def cache_settings(self) -> dict:
        """What a cached source must share with the runs that use it."""
        blocks = None if self.self_blocks is None else sorted(self.self_blocks)
        return dict(self_max_side=self.self_max_side, blend_size=self.blend_size, explicit=self.explicit,
                    self_blocks=blocks)


@dataclass
class RunState:
    """One run's running values, made fresh by every run: the step and the maps recorded so far.

    With a cached source (`cached`), the batch holds only the edits' rows and `source` gives, at the current
    evaluation, the source's conditional queries and keys per layer; a run that builds a cache passes each
    layer's source queries and keys to `recorder`.
    """

    plan: EditPlan
    layers: LayerPlan
    step: int = 0
    cached: bool = False
    source: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    recorder: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
    blend_sum: torch.Tensor | None = None  # (P, h, w, L) summed over layers and evaluations
    blend_layers: int = 0
    records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    record_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    unconditional_pass: bool = False  # Flux's separate negative pass of true CFG: every row as in plain generation
    # Where a guided batch holds its conditional rows, as the model's family says: last ([uncond..., cond...], SD's,
    # SD3's, Flux's) or first ([cond..., uncond...]). A separate negative pass holds them alone.
    conditional_first: bool = False

    def in_conditional_last(self, x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """A batch (or its key mask) of `rows` rows with its conditional half last, where the family puts it first:
        the edit rules read the conditional rows at the end of the batch. Applied twice, it gives the batch back."""
        if not self.conditional_first or x is None or x.shape[0] != rows or rows != 2 * self.rows_per_half:
            return x
        return torch.cat([x[rows // 2 :], x[: rows // 2]])

    @property
    def rows_per_half(self) -> int:
        """The rows of one guidance half: every prompt's, or the edits' alone when the source is cached."""
        return self.plan.num_edits if self.cached else self.plan.num_prompts

    def record(self, probs: torch.Tensor, size: tuple[int, int], place: str) -> None:
        """Accumulate conditional cross-attention maps of the last rows (.., heads, Q, L), averaged over heads.

        `probs` holds the source and the edits, or the edits alone in a cached run (the source's row then
        comes from the cache).
        """
        grid = size[0] * size[1]  # queries past it are a model's image padding (Z-Image's), on no grid position
        maps = probs[:, :, :grid].mean(1).reshape(probs.shape[0], size[0], size[1], probs.shape[-1]).float()
        first = self.plan.num_prompts - maps.shape[0]
        if self.layers.blend_size == size and place != "mid":
            self.blend_sum = _accumulate(self.blend_sum, maps, first, self.plan.num_prompts)
            self.blend_layers += 1
        if size in self.layers.record_sizes:
            self.records[size] = _accumulate(self.records.get(size), maps, first, self.plan.num_prompts)
            self.record_counts[size] = self.record_counts.get(size, 0) + 1


def pad_text(maps: torch.Tensor, length: int) -> torch.Tensor:
    """Text maps (.., L) of a cached source whose text was shorter, at this run's text `length`: zero on the
    positions it did not have (masked padding, which no row attends).

    >>> pad_text(torch.ones(1, 2), 4)
    tensor([[1., 1., 0., 0.]])
    """
    return torch.nn.functional.pad(maps, (0, length - maps.shape[-1]))


def _accumulate(total: torch.Tensor | None, maps: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    if total is None:
        total = maps.new_zeros(rows, *maps.shape[1:])
    return torch.cat([total[:first], total[first:] + maps])


@dataclass(frozen=True)
class JointLayerPlan:
    """Which blocks of an MM-DiT take cross edits, self-replacement and recording, at one run's size.

    Blocks are numbered in the order the transformer runs them (Flux: double-stream blocks, then single-stream).
    """

    grid: tuple[int, int]  # the image tokens' (h, w) patch grid
    text_length: int  # L, the joint text's length
    text_first: bool  # Flux puts the text tokens first, SD3 last
    cross_blocks: frozenset[int]
    self_blocks: frozenset[int]
    record_blocks: frozenset[int]
    blend_size: tuple[int, int] | None  # the grid when the run blends, else None (RunState reads these two)
    record_sizes: frozenset[tuple[int, int]] = frozenset()
    explicit: bool = False

    def slices(self, length: int) -> tuple[slice, slice]:
        """(text, image) positions in a joint sequence of `length` tokens."""
        t = self.text_length
        return (slice(0, t), slice(t, length)) if self.text_first else (slice(length - t, length), slice(0, length - t))

    def records(self, block: int) -> bool:
        return block in self.record_blocks and (self.blend_size is not None or bool(self.record_sizes))

    def with_text_length(self, length: int) -> JointLayerPlan:
        """These block choices for a run whose text is `length` long."""
        return replace(self, text_length=length)

    def fit_keys(self, k: torch.Tensor, length: int) -> torch.Tensor:
        """Joint keys (.., S, d) of a cached source whose text was shorter, at a joint `length`: zero keys fill its
        text up to this run's. They sit on the source's masked padding (its key mask is -inf from its true length
        on), so they get no probability: the source attends exactly as it did."""
        missing = length - k.shape[-2]
        if missing <= 0:
            return k
        source_text = self.text_length - missing  # the source's text length, when it was cached
        zeros = k.new_zeros(*k.shape[:-2], missing, k.shape[-1])
        if self.text_first:  # [text, image] -> [text, zeros, image]
            return torch.cat([k[..., :source_text, :], zeros, k[..., source_text:, :]], -2)
        return torch.cat([k, zeros], -2)  # [image, text] -> [image, text, zeros]

    def cache_settings(self) -> dict:
        """What a cached source must share with the runs that use it (not its text length: a run's text spans its
        longest prompt, the source's padding is masked, and `fit_keys` fills it)."""
        return dict(cross_blocks=sorted(self.cross_blocks), self_blocks=sorted(self.self_blocks),
                    record_blocks=sorted(self.record_blocks), blend_size=self.blend_size, explicit=self.explicit)
