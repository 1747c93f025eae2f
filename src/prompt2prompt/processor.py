"""The attention processor that applies Prompt-to-Prompt edits inside a diffusers UNet.

Every edit is linear in V, so the fused path runs on `F.scaled_dot_product_attention` alone:
cross-attention becomes `sdpa(Q_s, K_s, M (a * V_e)) + sdpa(Q_e, K_e, b * V_e)` and self-replacement
`sdpa(Q_s, K_s, V_e)`. The explicit path materialises the probabilities and edits them as the contract
says; it is the reference the fused path is tested against. Probabilities are only materialised in the
fused path where they are recorded (cross-attention at the recorded resolutions).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class EditPlan:
    """Per-run tensors of one edit batch: prompt 0 is the source, prompts 1..E the edits."""

    num_prompts: int
    num_inference_steps: int
    replace: torch.Tensor  # (E,) bool: replace mode (else refine)
    mapper: torch.Tensor  # (E, 77, 77) replacement mapper M[k, j]; for refine the one-hot of m
    refine_index: torch.Tensor  # (E, 77) long: refinement mapper m
    alpha: torch.Tensor  # (E, 77) refinement alpha (1 for replace)
    weights: torch.Tensor  # (E, 77) reweighting w
    cross: torch.Tensor  # (N, E, 77) cross window c[i, e, j]
    self_active: torch.Tensor  # (N, E) bool self window

    @property
    def num_edits(self) -> int:
        return self.num_prompts - 1

    def fused_coefficients(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (E, 77): out_e = A_s @ (M (a * V_e)) + A_e @ (b * V_e) at this step."""
        c, w, alpha = self.cross[step], self.weights, self.alpha
        return c * w * alpha, c * w * (1 - alpha) + (1 - c)


@dataclass
class RunState:
    """What the processors of one edit run share: the plan, the current step and the recorded maps."""

    plan: EditPlan
    sizes: dict[int, tuple[int, int]]  # query length -> (h, w) of the layer
    self_max_side: int
    blend_size: tuple[int, int] | None  # None: no local blend in this run
    record_sizes: set[tuple[int, int]]
    explicit: bool = False
    step: int = 0
    blend_sum: torch.Tensor | None = None  # (P, h, w, 77) summed over layers and evaluations
    blend_layers: int = 0
    records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    record_counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def record(self, probs: torch.Tensor, size: tuple[int, int], place: str) -> None:
        """Accumulate conditional cross-attention maps (P, heads, Q, 77), averaged over heads."""
        maps = probs.mean(1).reshape(probs.shape[0], size[0], size[1], probs.shape[-1]).float()
        if self.blend_size == size and place != "mid":
            self.blend_sum = maps if self.blend_sum is None else self.blend_sum + maps
            self.blend_layers += 1
        if size in self.record_sizes:
            self.records[size] = maps if size not in self.records else self.records[size] + maps
            self.record_counts[size] = self.record_counts.get(size, 0) + 1


def _place(name: str) -> str:
    return "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"


class P2PAttnProcessor:
    """A diffusers attention processor that edits one layer's attention by the run's plan."""

    def __init__(self, state: RunState, name: str):
        self.state = state
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
        """Edited attention output (B, heads, Q, d); the source and unconditional rows are left as they are."""
        state, plan = self.state, self.state.plan
        batch, num_prompts = q.shape[0], plan.num_prompts
        size = state.sizes.get(q.shape[2])
        if batch not in (num_prompts, 2 * num_prompts) or size is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        src = batch - num_prompts  # the conditional half comes last: [uncond..., cond...]
        rows = torch.arange(src + 1, batch, device=q.device)
        if self.is_cross:
            recorded = (state.blend_size == size and self.place != "mid") or size in state.record_sizes
            if state.explicit or recorded:
                probs = _probs(q, k, mask)
                probs = _edit_cross_probs(probs, src, rows, plan, state.step)
                if recorded:
                    state.record(probs[src:], size, self.place)
                return probs @ v
            return _fused_cross(q, k, v, mask, src, rows, plan, state.step)
        active = plan.self_active[state.step] & (max(size) <= state.self_max_side)
        if not bool(active.any()):
            return _probs(q, k, mask) @ v if state.explicit else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if state.explicit:
            probs = _probs(q, k, mask)
            probs[rows[active]] = probs[src].clone()
            return probs @ v
        # Self-replacement is attention(Q_s, K_s, V_e): give the edit rows the source's queries and keys.
        edit_rows = rows[active]
        q = q.index_copy(0, edit_rows, q[src : src + 1].expand(len(edit_rows), -1, -1, -1))
        k = k.index_copy(0, edit_rows, k[src : src + 1].expand(len(edit_rows), -1, -1, -1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, Q, T)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1)


def _edit_cross_probs(probs: torch.Tensor, src: int, rows: torch.Tensor, plan: EditPlan, step: int) -> torch.Tensor:
    """The contract's cross-attention edit on materialised probabilities (B, heads, Q, 77)."""
    if len(rows) == 0:  # no edits: only the source, which is recorded but never edited
        return probs
    a_s = probs[src]  # (heads, Q, 77)
    edited = []
    for e, row in enumerate(rows.tolist()):
        a_e = probs[row]
        mapper, alpha, w, c = plan.mapper[e], plan.alpha[e], plan.weights[e], plan.cross[step, e]
        if plan.replace[e]:
            a_map = a_s @ mapper.to(a_s.dtype)
        else:
            a_map = alpha * a_s[..., plan.refine_index[e]] + (1 - alpha) * a_e
        a_map = a_map * w
        edited.append(c * a_map + (1 - c) * a_e)
    probs = probs.clone()
    probs[rows] = torch.stack(edited).to(probs.dtype)
    return probs


def _fused_cross(q, k, v, mask, src: int, rows: torch.Tensor, plan: EditPlan, step: int) -> torch.Tensor:
    a, b = plan.fused_coefficients(step)
    a, b = a.to(v.dtype), b.to(v.dtype)
    uses_source = (a != 0).any(-1)  # (E,)
    if not bool(uses_source.any()) and bool((b == 1).all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    v_edit = v[rows]  # (E, heads, 77, d)
    v_mapped = torch.einsum("ekj,ehjd->ehkd", plan.mapper.to(v.dtype), v_edit * a[:, None, :, None])
    # Where b is all zero the edit's own attention drops out: run the row as attention(Q_s, K_s, V').
    swap = (b == 0).all(-1)
    both = uses_source & ~swap
    v = v.index_copy(0, rows, torch.where(swap[:, None, None, None], v_mapped, v_edit * b[:, None, :, None]))
    if bool(swap.any()):
        swapped = rows[swap]
        q = q.index_copy(0, swapped, q[src : src + 1].expand(len(swapped), -1, -1, -1))
        k = k.index_copy(0, swapped, k[src : src + 1].expand(len(swapped), -1, -1, -1))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if bool(both.any()):
        n = int(both.sum())
        m = None if mask is None else mask[src : src + 1].expand(n, -1, -1, -1)
        from_source = F.scaled_dot_product_attention(
            q[src : src + 1].expand(n, -1, -1, -1), k[src : src + 1].expand(n, -1, -1, -1), v_mapped[both], attn_mask=m
        )
        out = out.index_add(0, rows[both], from_source)
    return out
