"""The attention processor that applies Prompt-to-Prompt edits inside a diffusers UNet.

Every edit is linear in V, so the fused path runs on `F.scaled_dot_product_attention` alone:
cross-attention becomes `sdpa(Q_s, K_s, M (a * V_e)) + sdpa(Q_e, K_e, b * V_e)` and self-replacement
`sdpa(Q_s, K_s, V_e)`. The explicit path materialises the probabilities and edits them as the contract
says; it is the reference the fused path is tested against. Probabilities are only materialised in the
fused path where they are recorded (cross-attention at the recorded resolutions).
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


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
    mapper: torch.Tensor  # (E, 77, 77) replacement mapper M[k, j]; for refine the one-hot of m
    refine_index: torch.Tensor  # (E, 77) long: refinement mapper m
    alpha: torch.Tensor  # (E, 77) refinement alpha (1 for replace)
    weights: torch.Tensor  # (E, 77) reweighting w
    cross: torch.Tensor  # (N, E, 77) cross window c[i, e, j]
    self_active: torch.Tensor  # (N, E) bool self window
    a: torch.Tensor  # (N, E, 77) fused coefficients: out_e = A_s @ (M (a * V_e)) + A_e @ (b * V_e)
    b: torch.Tensor  # (N, E, 77)
    swap: torch.Tensor  # (N, E) bool: b is all zero, so the edit's own attention drops out
    ra: torch.Tensor  # (N, E, L) a and b without the weights: the text mass an MM-DiT edit keeps (joint.py)
    rb: torch.Tensor
    mix_index: tuple[torch.Tensor | None, ...]  # per step, `flags[i].mix` as a long tensor (None if empty)
    flags: tuple[StepFlags, ...]  # per step, on the host

    @property
    def num_edits(self) -> int:
        return self.num_prompts - 1

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "EditPlan":
        """A copy whose tensors live on `device`, the real-valued ones in `dtype` (the attention's)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        tensors = {name: move(getattr(self, name)) for name in
                   ("mapper", "refine_index", "alpha", "weights", "cross", "self_active", "a", "b", "swap", "ra", "rb")}
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


@dataclass(frozen=True)
class LayerPlan:
    """Which layers self-replace, drive local blending and are recorded, at one run's latent size."""

    sizes: dict[int, tuple[int, int]]  # query length -> (h, w) of the layer
    self_max_side: int
    blend_size: tuple[int, int] | None  # None: no local blend in this run
    record_sizes: frozenset[tuple[int, int]] = frozenset()
    explicit: bool = False

    def recorded(self, size: tuple[int, int], place: str) -> bool:
        """Whether a cross-attention layer of this size and place (down, mid, up) has its maps recorded."""
        return (self.blend_size == size and place != "mid") or size in self.record_sizes

    def self_replaces(self, size: tuple[int, int]) -> bool:
        return max(size) <= self.self_max_side


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
    blend_sum: torch.Tensor | None = None  # (P, h, w, 77) summed over layers and evaluations
    blend_layers: int = 0
    records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    record_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    unconditional_pass: bool = False  # Flux's separate negative pass of true CFG: every row as in plain generation

    def record(self, probs: torch.Tensor, size: tuple[int, int], place: str) -> None:
        """Accumulate conditional cross-attention maps of the last rows (.., heads, Q, 77), averaged over heads.

        `probs` holds the source and the edits, or the edits alone in a cached run (the source's row then
        comes from the cache).
        """
        maps = probs.mean(1).reshape(probs.shape[0], size[0], size[1], probs.shape[-1]).float()
        first = self.plan.num_prompts - maps.shape[0]
        if self.layers.blend_size == size and place != "mid":
            self.blend_sum = _accumulate(self.blend_sum, maps, first, self.plan.num_prompts)
            self.blend_layers += 1
        if size in self.layers.record_sizes:
            self.records[size] = _accumulate(self.records.get(size), maps, first, self.plan.num_prompts)
            self.record_counts[size] = self.record_counts.get(size, 0) + 1


def _accumulate(total: torch.Tensor | None, maps: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    if total is None:
        total = maps.new_zeros(rows, *maps.shape[1:])
    return torch.cat([total[:first], total[first:] + maps])


def _place(name: str) -> str:
    return "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"


class P2PAttnProcessor:
    """A diffusers attention processor that edits one layer's attention by the run's plan."""

    def __init__(self, state: RunState, name: str):
        self.state = state
        self.name = name
        self.is_cross = ".attn2." in name or name.endswith("attn2.processor")
        self.place = _place(name)

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
        waits for the device.
        """
        state, plan, layers = self.state, self.state.plan, self.state.layers
        size = layers.sizes.get(q.shape[2])
        per_half = plan.num_edits if state.cached else plan.num_prompts
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
        if not layers.self_replaces(size):
            return apply_probs(attention_probs(q, k, mask), v) if layers.explicit else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q_s, k_s, mask_s = self._source(q, k, mask, first)
        replaced = plan.flags[step].self_replace
        if not replaced:
            return apply_probs(attention_probs(q, k, mask), v) if layers.explicit else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if layers.explicit:
            probs = attention_probs(q, k, mask)
            a_s = attention_probs(q_s, k_s, mask_s)[0] if state.cached else probs[first - 1]
            for e in replaced:
                probs[first + e] = a_s
            return apply_probs(probs, v)
        # Self-replacement is attention(Q_s, K_s, V_e): give the edit rows the source's queries and keys.
        rows = plan.self_active[step]
        q, k = with_source(q, first, q_s, rows), with_source(k, first, k_s, rows)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _source(self, q, k, mask, first: int):
        """The source's conditional (query, key, mask), each (1, ...): its batch row, or the cache's."""
        state = self.state
        if state.cached:
            q_s, k_s = state.source[self.name]
            return q_s, k_s, None if mask is None else mask[first : first + 1]
        q_s, k_s = q[first - 1 : first], k[first - 1 : first]
        if state.recorder is not None:
            state.recorder(self.name, q_s, k_s)
        return q_s, k_s, None if mask is None else mask[first - 1 : first]


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


def _edit_cross_probs(probs: torch.Tensor, first: int, a_s: torch.Tensor, plan: EditPlan, step: int) -> torch.Tensor:
    """The contract's cross-attention edit on materialised probabilities (B, heads, Q, 77) of the edit rows.

    `a_s` (heads, Q, 77) is the source's; the rows before `first` are returned as they are.
    """
    if plan.num_edits == 0:  # only the source, which is recorded but never edited
        return probs
    edited = []
    for e in range(plan.num_edits):
        a_e = probs[first + e]
        alpha, w, c = plan.alpha[e], plan.weights[e], plan.cross[step, e]
        if plan.replace[e]:
            a_map = a_s @ plan.mapper[e].to(a_s.dtype)
        else:
            a_map = alpha * a_s[..., plan.refine_index[e]] + (1 - alpha) * a_e
        a_map = a_map * w
        edited.append(c * a_map + (1 - c) * a_e)
    return torch.cat([probs[:first], torch.stack(edited).to(probs.dtype)])  # float32, as `attention_probs` gives


def _fused_cross(q, k, v, mask, first: int, q_s, k_s, mask_s, plan: EditPlan, step: int) -> torch.Tensor:
    """Cross-attention of the whole batch with the edit rows (from `first` on) edited, on fused attention only."""
    flags = plan.flags[step]
    if not flags.cross:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = plan.a[step].to(v.dtype)[:, None, :, None]  # (E, 1, 77, 1); a no-op when the plan is in v's dtype
    b = plan.b[step].to(v.dtype)[:, None, :, None]
    v_edit = v[first:]  # (E, heads, 77, d)
    v_mapped = torch.einsum("ekj,ehjd->ehkd", plan.mapper.to(v.dtype), v_edit * a)
    v_own = v_edit * b
    if flags.swap:
        # Where b is all zero the edit's own attention drops out: run the row as attention(Q_s, K_s, V').
        swap = plan.swap[step]
        v_own = torch.where(swap[:, None, None, None], v_mapped, v_own)
        q, k = with_source(q, first, q_s, swap), with_source(k, first, k_s, swap)
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
    """One layer's processor for several runs in one forward batch: each run's rows go to its own processor.

    The batch is [uncond of every prompt..., cond of every prompt...] (or only the cond half without
    guidance); a run's rows are one slice per half, which is the batch its processor expects.
    """

    def __init__(self, processors: list[P2PAttnProcessor], counts: list[int]):  # only `attend` differs
        self.processors = processors
        self.counts = counts

    def attend(self, q, k, v, mask):
        total = sum(self.counts)
        halves = q.shape[0] // total
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        outs: list[list[torch.Tensor]] = [[] for _ in range(halves)]
        for processor, start, count in zip(self.processors, starts, self.counts):
            spans = [slice(h * total + start, h * total + start + count) for h in range(halves)]

            def rows(x):  # slices need no index tensor on the device
                return None if x is None else torch.cat([x[span] for span in spans])

            out = processor.attend(rows(q), rows(k), rows(v), rows(mask))
            for h, part in enumerate(out.split(count)):
                outs[h].append(part)
        return torch.cat([part for half in outs for part in half])
