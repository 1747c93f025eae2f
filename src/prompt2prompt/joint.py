"""Prompt-to-Prompt in the joint attention of MM-DiT models (Stable Diffusion 3/3.5, Flux.1).

Each prompt row attends over its image tokens I and its text tokens T with one softmax. Only the image
queries of the edit rows are edited (the contract's "Joint attention" section): their text block takes the
cross-attention rules, and their image block (the edit's own, or the source's while self-replacement is
active) fills the mass the edited text block leaves. Text queries, the source row and every unconditional
row are computed as in plain generation.

The fused path runs on scaled-dot-product attention only, with the text mass carried in an extra value
channel: `t_s @ X = mass_s * sdpa(Q_s, K_s[T], X)` and `g @ V[I] = sdpa(Q, K, [0 on T; V[I]])`. The explicit
path materialises every probability and is the reference the fused path is tested against. Probabilities are
materialised in the fused path only in the blocks whose text maps are recorded (local blending, maps).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .processor import RunState, apply_probs, attention_probs, with_source

KINDS = ("joint", "single", "image")  # SD3 and Flux double-stream blocks; Flux single-stream; SD3.5's attn2


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


def _sdpa_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sdpa(q, k, [v, extra])` split into its `v` and `extra` outputs.

    Fused kernels want one width for queries, keys and values (and stay fast at multiples of 8): the value is
    padded to the queries' width, or all three to the next multiple of 8 above it, with the scale of the true
    width.
    """
    d_q, d, x = q.shape[-1], v.shape[-1], extra.shape[-1]
    width = d_q if d + x <= d_q else d_q + -(-(d + x - d_q) // 8) * 8
    extra = extra.expand(*v.shape[:-1], x).to(v.dtype)
    value = torch.cat([v, extra, v.new_zeros(*v.shape[:-1], width - d - x)], -1)
    q, k = F.pad(q, (0, width - d_q)), F.pad(k, (0, width - d_q))
    out = F.scaled_dot_product_attention(q, k, value, scale=d_q**-0.5)
    return out[..., :d], out[..., d : d + x]


def _text_probs(q: torch.Tensor, k_text: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The text block of a joint softmax, `mass * softmax over the text keys` (float32)."""
    return attention_probs(q, k_text, None) * mass.float()


def _edit_text_block(t_s: torch.Tensor, t_e: torch.Tensor, plan, e: int, step: int, cross_on: bool):
    """(T_final, r) of edit e from the source's and the edit's text blocks (.., I, L), as the contract says."""
    if not cross_on:
        return t_e, t_e.sum(-1, keepdim=True)
    c, w, alpha = plan.cross[step, e].float(), plan.weights[e].float(), plan.alpha[e].float()
    if plan.replace[e]:
        t_map = t_s @ plan.mapper[e].float()
    else:
        t_map = alpha * t_s[..., plan.refine_index[e]] + (1 - alpha) * t_e
    t_final = c * (t_map * w) + (1 - c) * t_e
    r = (c * t_map + (1 - c) * t_e).sum(-1, keepdim=True)
    return t_final, r


def joint_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RunState, block: int) -> torch.Tensor:
    """Joint attention (B, heads, S, d) of one block with the edit rows' image queries edited."""
    plan, layers = state.plan, state.layers
    rows = plan.num_prompts
    if state.unconditional_pass or q.shape[0] not in (rows, 2 * rows):
        return F.scaled_dot_product_attention(q, k, v)
    text, image = layers.slices(q.shape[2])
    step = state.step
    flags = plan.flags[step]
    cross_on = block in layers.cross_blocks and flags.cross
    replaced = flags.self_replace if block in layers.self_blocks else ()
    record = layers.records(block)
    if plan.num_edits == 0 and not record or not (cross_on or replaced or record):
        return F.scaled_dot_product_attention(q, k, v)
    first = q.shape[0] - plan.num_edits  # [uncond..., source, edits...]: the source is row first - 1
    if layers.explicit:
        return _explicit(q, k, v, state, text, image, first, cross_on, replaced, record)
    return _fused(q, k, v, state, text, image, first, cross_on, replaced, record)


def _explicit(q, k, v, state: RunState, text: slice, image: slice, first: int, cross_on: bool, replaced, record: bool):
    """The reference: every probability materialised and edited as the contract writes it."""
    plan, step = state.plan, state.step
    probs = attention_probs(q, k, None)
    out = apply_probs(probs, v)
    p_s = probs[first - 1][:, image]
    t_s, g_s = p_s[..., text], p_s[..., image]
    mass_s = t_s.sum(-1, keepdim=True)
    edited, recorded = [], [t_s]
    for e in range(plan.num_edits):
        p_e = probs[first + e][:, image]
        t_e, g_e = p_e[..., text], p_e[..., image]
        mass_e = t_e.sum(-1, keepdim=True)
        t_final, r = _edit_text_block(t_s, t_e, plan, e, step, cross_on)
        g = g_s * (1 - r) / (1 - mass_s) if e in replaced else g_e * (1 - r) / (1 - mass_e)
        v_e = v[first + e].float()
        edited.append(t_final @ v_e[:, text] + g @ v_e[:, image])
        recorded.append(t_final)
    if record:
        state.record(torch.stack(recorded), state.layers.grid, "joint")
    if not edited:
        return out
    out_edits = out[first:].clone()
    out_edits[:, :, image] = torch.stack(edited).to(out.dtype)
    return torch.cat([out[:first], out_edits])


def _fused(q, k, v, state: RunState, text: slice, image: slice, first: int, cross_on: bool, replaced, record: bool):
    """The contract on scaled-dot-product attention; text probabilities only where they are recorded."""
    plan, step, num_edits = state.plan, state.step, state.plan.num_edits
    is_text = torch.zeros(q.shape[2], 1, dtype=v.dtype, device=v.device)
    is_text[text] = 1
    s = first - 1
    plain = F.scaled_dot_product_attention(q[:s], k[:s], v[:s]) if s else q[:0]
    out_s, mass_s = _sdpa_with(q[s : s + 1], k[s : s + 1], v[s : s + 1], is_text)  # the source, and its text mass
    mass_s = mass_s[:, :, image]
    qi_s, k_s = q[s : s + 1, :, image], k[s : s + 1]
    if num_edits == 0:  # the source alone, recorded
        state.record(_text_probs(qi_s, k_s[:, :, text], mass_s), state.layers.grid, "joint")
        return torch.cat([plain, out_s])
    q_e, k_e, v_e = q[first:], k[first:], v[first:]
    qi_e = q_e[:, :, image]
    out_text = F.scaled_dot_product_attention(q_e[:, :, text], k_e, v_e)  # text queries: as in plain generation

    # The image block, of the edit's own row or (self-replacement) the source's, and that row's text mass.
    rows = plan.self_active[step] if replaced else None
    q_g = qi_e if rows is None else with_source(qi_e, 0, qi_s, rows)
    k_g = k_e if rows is None else with_source(k_e, 0, k_s, rows)
    g_out, mass_g = _sdpa_with(q_g, k_g, v_e * (1 - is_text), is_text)
    if rows is None:
        mass_e = mass_g
    else:
        _, mass_own = _sdpa_with(qi_e, k_e, v_e[..., :0], is_text)
        mass_e = torch.where(rows.view(-1, 1, 1, 1), mass_own, mass_g)

    v_text = v_e[:, :, text]
    if record:
        t_s = _text_probs(qi_s[0], k_s[0, :, text], mass_s[0])
        t_e = _text_probs(qi_e, k_e[:, :, text], mass_e)
        finals, rs = zip(*(_edit_text_block(t_s, t_e[e], plan, e, step, cross_on) for e in range(num_edits)))
        t_final, r = torch.stack(finals), torch.stack(rs)
        state.record(torch.cat([t_s[None], t_final]), state.layers.grid, "joint")
        text_out, r = apply_probs(t_final, v_text), r.to(v.dtype)
    else:
        text_out, r = _text_terms(qi_s, k_s[:, :, text], mass_s, qi_e, k_e[:, :, text], mass_e, v_text, plan, step, cross_on)
    out_image = text_out + g_out * ((1 - r) / (1 - mass_g))
    parts = [out_text, out_image] if state.layers.text_first else [out_image, out_text]
    return torch.cat([plain, out_s, torch.cat(parts, 2)])


def _text_terms(qi_s, kt_s, mass_s, qi_e, kt_e, mass_e, v_text, plan, step: int, cross_on: bool):
    """`T_final @ V_e[T]` and `r` of every edit, by two text-only attentions (the source's and the edit's own).

    With `a = c w alpha`, `b = c w (1 - alpha) + 1 - c` (and their unweighted `ra`, `rb` for r), the text block
    is `t_s M diag(a) + t_e diag(b)`: `t_s @ (M (a V)) = mass_s * sdpa(Q_s, K_s[T], M (a V))`.
    """
    num_edits = v_text.shape[0]
    if not cross_on:  # the edit's own text block: a = 0, b = 1
        own, r = _sdpa_with(qi_e, kt_e, v_text, torch.ones_like(v_text[..., :1]))
        return mass_e * own, mass_e * r
    a, b = plan.a[step].to(v_text.dtype), plan.b[step].to(v_text.dtype)  # (E, L)
    ra, rb = plan.ra[step].to(v_text.dtype), plan.rb[step].to(v_text.dtype)
    mapper = plan.mapper.to(v_text.dtype)
    v_mapped = torch.einsum("ekj,ehjd->ehkd", mapper, v_text * a[:, None, :, None])
    r_mapped = torch.einsum("ekj,ej->ek", mapper, ra)[:, None, :, None]
    from_source, r_source = _sdpa_with(
        qi_s.expand(num_edits, -1, -1, -1), kt_s.expand(num_edits, -1, -1, -1), v_mapped, r_mapped
    )
    own, r_own = _sdpa_with(qi_e, kt_e, v_text * b[:, None, :, None], rb[:, None, :, None])
    return mass_s * from_source + mass_e * own, mass_s * r_source + mass_e * r_own


def image_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RunState, block: int) -> torch.Tensor:
    """SD3.5's image-only attention (attn2): the UNet's self-attention rule in the self-replacement blocks."""
    plan, layers = state.plan, state.layers
    rows = plan.num_prompts
    replaced = plan.flags[state.step].self_replace if block in layers.self_blocks else ()
    if state.unconditional_pass or q.shape[0] not in (rows, 2 * rows) or not replaced:
        return apply_probs(attention_probs(q, k, None), v) if layers.explicit else F.scaled_dot_product_attention(q, k, v)
    first = q.shape[0] - plan.num_edits
    if layers.explicit:
        probs = attention_probs(q, k, None)
        for e in replaced:
            probs[first + e] = probs[first - 1]
        return apply_probs(probs, v)
    active = plan.self_active[state.step]
    q = with_source(q, first, q[first - 1 : first], active)
    k = with_source(k, first, k[first - 1 : first], active)
    return F.scaled_dot_product_attention(q, k, v)


class SD3JointProcessor:
    """Stable Diffusion 3/3.5's joint attention (`JointAttnProcessor2_0`'s computation) with the edits applied.

    `kind` is "joint" for a block's `attn` (image tokens, then text tokens) and "image" for SD3.5's `attn2`.
    """

    def __init__(self, state: RunState, block: int, kind: str):
        self.state, self.block, self.kind = state, block, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:  # SD3.5's image-only attention
            out = image_attend(query, key, value, self.state, self.block)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query, key, value = torch.cat([query, c_query], 2), torch.cat([key, c_key], 2), torch.cat([value, c_value], 2)
        out = joint_attend(query, key, value, self.state, self.block)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image_len = hidden_states.shape[1]
        out, context = out[:, :image_len], out[:, image_len:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


class FluxJointProcessor:
    """Flux.1's attention (`FluxAttnProcessor`'s computation, RoPE included) with the edits applied.

    Double-stream blocks get the text as `encoder_hidden_states`; single-stream blocks get one sequence whose
    first L tokens are the text, L coming from the run's plan.
    """

    def __init__(self, state: RunState, block: int, kind: str):
        self.state, self.block, self.kind = state, block, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("Prompt-to-Prompt on Flux does not take an attention mask")
        query, key, value, c_query, c_key, c_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            c_query = attn.norm_added_q(c_query.unflatten(-1, (-1, attn.head_dim)))
            c_key = attn.norm_added_k(c_key.unflatten(-1, (-1, attn.head_dim)))
            c_value = c_value.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([c_query, query], 1), torch.cat([c_key, key], 1), torch.cat([c_value, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = joint_attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.state, self.block)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        context, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())
