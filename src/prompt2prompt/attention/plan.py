"""The plan of one edit run: every per-run tensor the attention layers read, built once on the CPU.

`build_plan` turns the edits, their tokens and the step count into an `EditPlan` (mappers, alpha, weights,
per-step windows, the fused coefficients); `EditPlan.to` moves it once per run to the model's device and dtype,
and `StepFlags` carry the per-step decisions on the host, so that no layer call waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..alignment import Tokenized, replacement_mapper, text_mappers, word_token_positions
from ..schedules import cross_mask, step_mask

if TYPE_CHECKING:
    from ..edits import Edit


@dataclass(frozen=True)
class StepFlags:
    """What the layers do at one step, decided on the host so that no layer asks the device.

    Edits are numbered 0..E-1 (edit e is prompt 1 + e).
    """

    cross: bool  # some edit's cross-attention differs from its own attention (or its text block, in MM-DiT)
    swap: tuple[int, ...]  # edits whose cross-attention row runs as attention(Q_s, K_s, V') alone
    mix: tuple[int, ...]  # edits that need the source's attention and their own
    self_replace: tuple[int, ...]  # edits whose self-attention is the source's (where the layer is small enough)


@dataclass
class EditPlan:
    """Per-run tensors of one edit batch: prompt 0 is the source, prompts 1..E the edits.

    `editor.build_plan` makes it on the CPU; `to(device, dtype)` moves it, once per run, to where the UNet
    runs. The per-step decisions (`flags`) stay on the host.
    """

    num_prompts: int
    num_inference_steps: int
    replace: tuple[bool, ...]  # (E,) replace mode (else refine)
    mapper: torch.Tensor  # (E, L, L) replacement mapper M[k, j]; for refine the one-hot of m
    refine_index: torch.Tensor  # (E, L) long: refinement mapper m
    alpha: torch.Tensor  # (E, L) refinement alpha (1 for replace)
    weights: torch.Tensor  # (E, L) reweighting w
    cross: torch.Tensor  # (N, E, L) cross window c[i, e, j]
    self_active: torch.Tensor  # (N, E) bool self window
    a: torch.Tensor  # (N, E, L) fused coefficients: out_e = A_s @ (M (a * V_e)) + A_e @ (b * V_e)
    b: torch.Tensor  # (N, E, L)
    swap: torch.Tensor  # (N, E) bool: b is all zero, so the edit's own attention drops out
    a_unweighted: torch.Tensor  # (N, E, L) a and b without the weights: the text mass an MM-DiT edit keeps (joint.py)
    b_unweighted: torch.Tensor
    mix_index: tuple[torch.Tensor | None, ...]  # per step, `flags[i].mix` as a long tensor (None if empty)
    flags: tuple[StepFlags, ...]  # per step, on the host
    # (P, L) additive key mask of each prompt's text: 0 on its true tokens, -inf on its masked padding; None when
    # the text has no masked padding (CLIP, SD3's and Flux's T5).
    key_mask: torch.Tensor | None = None

    @property
    def num_edits(self) -> int:
        return self.num_prompts - 1

    def to(self, device: torch.device | str, dtype: torch.dtype) -> EditPlan:
        """A copy whose tensors live on `device`, the real-valued ones in `dtype` (the attention's)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        tensors = {name: move(getattr(self, name)) for name in
                   ("mapper", "refine_index", "alpha", "weights", "cross", "self_active", "a", "b", "swap", "a_unweighted", "b_unweighted")}
        if self.key_mask is not None:
            tensors["key_mask"] = move(self.key_mask)
        mix_index = tuple(None if t is None else move(t) for t in self.mix_index)
        return replace(self, **tensors, mix_index=mix_index)


def fused_schedule(cross: torch.Tensor, weights: torch.Tensor, alpha: torch.Tensor, self_active: torch.Tensor):
    """The fused coefficients (a, b), the swap mask, the mix indices and the host-side flags of every step.

    Args: the plan's `cross` (N, E, L), `weights` and `alpha` (E, L) and `self_active` (N, E), on the CPU.
    """
    a, b = cross * weights * alpha, cross * weights * (1 - alpha) + (1 - cross)
    uses_source = (a != 0).any(-1)  # (N, E)
    swap = (b == 0).all(-1)
    own = ~uses_source & (b == 1).all(-1)  # the edit's own attention, unchanged
    mix = uses_source & ~swap

    def edits(mask: torch.Tensor) -> tuple[int, ...]:
        return tuple(torch.nonzero(mask).flatten().tolist())

    flags = tuple(
        StepFlags(cross=not bool(own[i].all()), swap=edits(swap[i]), mix=edits(mix[i]), self_replace=edits(self_active[i]))
        for i in range(cross.shape[0])
    )
    mix_index = tuple(torch.tensor(f.mix, dtype=torch.long) if f.mix else None for f in flags)
    return a, b, swap, mix_index, flags


def build_plan(source: Tokenized, edits: Sequence[Edit], tokenized: Sequence[Tokenized], num_inference_steps: int) -> EditPlan:
    """Turn the edits into the per-run tensors the attention processor reads (on the CPU; see `EditPlan.to`).

    Every tensor over tokens spans the text's length L (77 for CLIP; a joint text's whole length).
    """
    n, e, length = num_inference_steps, len(edits), source.length
    replace = [False] * e
    mapper = torch.zeros(e, length, length)
    refine_index = torch.arange(length).repeat(e, 1)
    alpha = torch.ones(e, length)
    weights = torch.ones(e, length)
    cross = torch.zeros(n, e, length)
    self_active = torch.zeros(n, e, dtype=torch.bool)
    for i, (edit, target) in enumerate(zip(edits, tokenized)):
        mode = edit.mode
        if mode == "auto":
            mode = "replace" if len(source.words) == len(target.words) else "refine"
        if mode == "replace" and len(source.words) != len(target.words):
            replacement_mapper(source, target)  # its clear error about the word counts
        replace[i] = mode == "replace"
        mapper[i], refine_index[i], alpha[i] = text_mappers(source, target, mode)
        for word, weight in (edit.weights or {}).items():
            weights[i, word_token_positions(target, word)] = float(weight)
        cross[:, i] = cross_mask(edit.cross_steps, n, target)
        self_active[:, i] = step_mask(edit.self_steps, n, "self_steps")
    a, b, swap, mix_index, flags = fused_schedule(cross, weights, alpha, self_active)
    return EditPlan(
        num_prompts=e + 1, num_inference_steps=n, replace=tuple(replace), mapper=mapper, refine_index=refine_index,
        alpha=alpha, weights=weights, cross=cross, self_active=self_active, a=a, b=b, swap=swap, mix_index=mix_index,
        flags=flags, a_unweighted=cross * alpha, b_unweighted=cross * (1 - alpha) + (1 - cross), key_mask=key_mask([source, *tokenized]),
    )


def key_mask(prompts: Sequence[Tokenized]) -> torch.Tensor | None:
    """(P, L) additive masks of the prompts' texts: -inf from each part's true length on, else 0; None if unmasked."""
    if all(part.tokenized.true_length is None for t in prompts for part in t.blocks):
        return None
    mask = torch.zeros(len(prompts), prompts[0].length)
    for p, t in enumerate(prompts):
        for part in t.blocks:
            n = part.tokenized.true_length
            if n is not None:
                mask[p, part.offset + n : part.offset + part.tokenized.length] = float("-inf")
    return mask
