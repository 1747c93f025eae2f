"""Prompt-to-Prompt in cross- and self-attention layers (diffusers' `Attention` with `AttnProcessor2_0`'s computation).

Every edit is linear in V, so the fused path runs on `F.scaled_dot_product_attention` alone:
cross-attention becomes `sdpa(Q_s, K_s, M (a * V_e)) + sdpa(Q_e, K_e, b * V_e)` and self-replacement
`sdpa(Q_s, K_s, V_e)`. The explicit path materialises the probabilities and edits them as the contract
says; it is the reference the fused path is tested against. Probabilities are only materialised in the
fused path where they are recorded (cross-attention at the recorded resolutions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import EditPlan
from .state import RunState


@dataclass(frozen=True)
class Layer:
    """What an attention layer is, as the model's family tells it (never guessed from its name here)."""

    name: str  # diffusers' processor name: the key of the model's processors and of a cache's recorded source
    is_cross: bool  # text-conditioned cross-attention; else self-attention
    place: str  # "down", "mid" or "up" in a UNet; "block" in a DiT of one resolution (local blending skips "mid")
    block: int | None = None  # a DiT layer's block number, as they run; None in a UNet


class P2PAttnProcessor:
    """A diffusers attention processor that edits one layer's attention by the run's plan."""

    def __init__(self, state: RunState, layer: Layer):
        self.state = state
        self.name = layer.name
        self.is_cross, self.place, self.block = layer.is_cross, layer.place, layer.block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        # Same pre- and post-processing as diffusers' AttnProcessor2_0; only the attention core differs.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Edited attention output (B, heads, Q, d); the source and unconditional rows are left as they are.

        Every branch is decided from host-side values (the plan's step flags, shapes), so a layer call never
        waits for the device. The rules read the conditional rows last; a batch that holds them first is turned
        around for them and back (`RunState.in_conditional_last`).
        """
        rows, last = q.shape[0], self.state.in_conditional_last
        out = self._attend(last(q, rows), last(k, rows), last(v, rows), last(mask, rows))
        return last(out, rows)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        state, plan, layers = self.state, self.state.plan, self.state.layers
        size = layers.sizes.get(q.shape[2])
        per_half = state.rows_per_half
        if size is None or q.shape[0] not in (per_half, 2 * per_half):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        first = q.shape[0] - plan.num_edits  # the conditional half comes last: [uncond..., source, edits...]
        step = state.step
        if self.is_cross:
            q_s, k_s, mask_s = self._source(q, k, mask, first)
            recorded = layers.recorded(size, self.place)
            if layers.explicit or recorded:
                probs = attention_probs(q, k, mask)
                a_s = attention_probs(q_s, k_s, mask_s)[0] if state.cached else probs[first - 1]
                probs = _edit_cross_probs(probs, first, a_s, plan, step)
                if recorded:
                    state.record(probs[first if state.cached else first - 1 :], size, self.place)
                if layers.explicit or first == 0:
                    return apply_probs(probs, v)
                # A fused run's recorded layer: the edit rows from their edited probabilities, the other rows as
                # plain generation computes them, so that recording never changes the source's or an
                # unconditional row's numbers (a direct inversion's source row relies on that).
                m = None if mask is None else mask[:first]
                plain = F.scaled_dot_product_attention(q[:first], k[:first], v[:first], attn_mask=m)
                return torch.cat([plain, apply_probs(probs[first:], v[first:])])
            return _fused_cross(q, k, v, mask, first, q_s, k_s, mask_s, plan, step)
        if not layers.self_replaces(size, self.block):
            return apply_probs(attention_probs(q, k, mask), v) if layers.explicit else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q_s, k_s, mask_s = self._source(q, k, mask, first)
        if not plan.flags[step].self_replace:
            return apply_probs(attention_probs(q, k, mask), v) if layers.explicit else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return replace_self(q, k, v, mask, first, q_s, k_s, mask_s, state)

    def _source(self, q, k, mask, first: int):
        """The source's conditional (query, key, mask), each (1, ...): its batch row, or the cache's."""
        state = self.state
        if state.cached:
            q_s, k_s = state.source[self.name]
            if self.is_cross and k_s.shape[2] < k.shape[2]:  # a shorter cached text: zero keys on its masked padding
                k_s = F.pad(k_s, (0, 0, 0, k.shape[2] - k_s.shape[2]))
            if mask is not None and state.plan.key_mask is not None:  # masked padding: the source's own length
                return q_s, k_s, state.plan.key_mask[:1, None, None, :].to(mask.dtype)
            return q_s, k_s, None if mask is None else mask[first : first + 1]
        q_s, k_s = q[first - 1 : first], k[first - 1 : first]
        if state.recorder is not None:
            state.recorder(self.name, q_s, k_s)
        return q_s, k_s, None if mask is None else mask[first - 1 : first]


def replace_self(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, first: int,
                 q_s: torch.Tensor, k_s: torch.Tensor, mask_s: torch.Tensor | None, state: RunState) -> torch.Tensor:
    """The contract's self-attention rule: edit rows whose self window is open take the source's probabilities.

    `q_s`, `k_s` (1, heads, ., d) are the source's (its batch row, or the cache's); the rows before `first` and
    the edit rows whose window is closed are computed as they are.
    """
    plan, step = state.plan, state.step
    if state.layers.explicit:
        probs = attention_probs(q, k, mask)
        a_s = attention_probs(q_s, k_s, mask_s)[0] if state.cached else probs[first - 1]
        for e in plan.flags[step].self_replace:
            probs[first + e] = a_s
        return apply_probs(probs, v)
    # Self-replacement is attention(Q_s, K_s, V_e): give the edit rows the source's queries and keys.
    rows = plan.self_active[step]
    q, k = with_source(q, first, q_s, rows), with_source(k, first, k_s, rows)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def with_source(x: torch.Tensor, first: int, x_s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x` (B, ...) with the edit rows (from `first` on) where `rows` (E,) is set replaced by the source's `x_s`."""
    picked = torch.where(rows.view(-1, *[1] * (x.dim() - 1)), x_s, x[first:])
    return torch.cat([x[:first], picked])


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities (B, heads, Q, T) in float32, whatever the inputs' dtype.

    Fused kernels accumulate in float32; materialised probabilities that are edited and multiplied in float32
    too (`apply_probs`) keep half-precision explicit runs, and the recorded layers of fused runs, as close to them.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`probs @ v` in float32, returned in v's dtype."""
    return (probs @ v.float()).to(v.dtype)


def edited_map(a_s: torch.Tensor, a_e: torch.Tensor, plan: EditPlan, e: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's edit of edit e's text map `a_e` at `step`, from the source's `a_s` (.., keys), in float32.

    The source's map through the mapper (replace) or the refinement index and alpha (refine), reweighted, mixed with
    the edit's own by the token windows: (A_final, the same mix before reweighting, whose sum is the joint rule's r).
    """
    c, w, alpha = plan.cross[step, e].float(), plan.weights[e].float(), plan.alpha[e].float()
    if plan.replace[e]:
        a_map = a_s @ plan.mapper[e].float()
    else:
        a_map = alpha * a_s[..., plan.refine_index[e]] + (1 - alpha) * a_e
    return c * (a_map * w) + (1 - c) * a_e, c * a_map + (1 - c) * a_e


def _edit_cross_probs(probs: torch.Tensor, first: int, a_s: torch.Tensor, plan: EditPlan, step: int) -> torch.Tensor:
    """The contract's cross-attention edit on materialised probabilities (B, heads, Q, L) of the edit rows.

    `a_s` (heads, Q, L) is the source's; the rows before `first` are returned as they are.
    """
    if plan.num_edits == 0:  # only the source, which is recorded but never edited
        return probs
    edited = [edited_map(a_s, probs[first + e], plan, e, step)[0] for e in range(plan.num_edits)]
    return torch.cat([probs[:first], torch.stack(edited).to(probs.dtype)])  # float32, as `attention_probs` gives


def _fused_cross(q, k, v, mask, first: int, q_s, k_s, mask_s, plan: EditPlan, step: int) -> torch.Tensor:
    """Cross-attention of the whole batch with the edit rows (from `first` on) edited, on fused attention only."""
    flags = plan.flags[step]
    if not flags.cross:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = plan.a[step].to(v.dtype)[:, None, :, None]  # (E, 1, L, 1); a no-op when the plan is in v's dtype
    b = plan.b[step].to(v.dtype)[:, None, :, None]
    v_edit = v[first:]  # (E, heads, L, d)
    v_mapped = torch.einsum("ekj,ehjd->ehkd", plan.mapper.to(v.dtype), v_edit * a)
    v_own = v_edit * b
    if flags.swap:
        # Where b is all zero the edit's own attention drops out: run the row as attention(Q_s, K_s, V').
        swap = plan.swap[step]
        v_own = torch.where(swap[:, None, None, None], v_mapped, v_own)
        q, k = with_source(q, first, q_s, swap), with_source(k, first, k_s, swap)
        if mask is not None:  # the source's keys with the source's key mask: its padding gets no probability
            mask = with_source(mask.expand(q.shape[0], -1, -1, -1), first, mask_s.to(mask.dtype), swap)
    out = F.scaled_dot_product_attention(q, k, torch.cat([v[:first], v_own]), attn_mask=mask)
    if flags.mix:
        n, index = len(flags.mix), plan.mix_index[step]
        m = None if mask_s is None else mask_s.expand(n, -1, -1, -1)
        from_source = F.scaled_dot_product_attention(
            q_s.expand(n, -1, -1, -1), k_s.expand(n, -1, -1, -1), v_mapped.index_select(0, index), attn_mask=m
        )
        out = torch.cat([out[:first], out[first:].index_add(0, index, from_source)])
    return out


class GroupAttnProcessor(P2PAttnProcessor):
    """One layer's processor for several runs in one forward batch: each run's rows go to its own processor."""

    def __init__(self, processors: list[P2PAttnProcessor], counts: list[int]):  # only `attend` differs
        self.processors = processors
        self.counts = counts

    def attend(self, q, k, v, mask):
        return attend_by_run([p.attend for p in self.processors], self.counts, q, k, v, mask)


def attend_by_run(attends: list, counts: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of several runs in one batch, each run's rows through its own `attend(q, k, v, mask)`.

    The batch is [uncond of every prompt..., cond of every prompt...] (or only the cond half without
    guidance); a run's rows are one slice per half, which is the batch its own attention expects.
    """
    total = sum(counts)
    halves = q.shape[0] // total
    starts = [sum(counts[:i]) for i in range(len(counts))]
    outs: list[list[torch.Tensor]] = [[] for _ in range(halves)]
    for attend, start, count in zip(attends, starts, counts):
        spans = [slice(h * total + start, h * total + start + count) for h in range(halves)]

        def rows(x):  # slices need no index tensor on the device
            return None if x is None else torch.cat([x[span] for span in spans])

        out = attend(rows(q), rows(k), rows(v), rows(mask))
        for h, part in enumerate(out.split(count)):
            outs[h].append(part)
    return torch.cat([part for half in outs for part in half])


def cross_processors(layers: Sequence[Layer], states, counts) -> dict:
    """A `P2PAttnProcessor` for every layer, for one run's state; several runs' in one forward batch, grouped."""
    if len(states) == 1:
        return {layer.name: P2PAttnProcessor(states[0], layer) for layer in layers}
    return {layer.name: GroupAttnProcessor([P2PAttnProcessor(s, layer) for s in states], list(counts))
            for layer in layers}
