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

import torch
import torch.nn.functional as F

from .cross import apply_probs, attention_probs, edited_map, replace_self, with_source
from .state import RunState

STREAMS = ("joint", "single", "image")  # SD3 and Flux double-stream blocks; Flux single-stream; SD3.5's attn2


def _sdpa_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sdpa(q, k, [v, extra])` split into its `v` and `extra` outputs (`mask`: an additive key mask).

    Fused kernels want one width for queries, keys and values (and stay fast at multiples of 8): the value is
    padded to the queries' width, or all three to the next multiple of 8 above it, with the scale of the true
    width.
    """
    d_q, d, x = q.shape[-1], v.shape[-1], extra.shape[-1]
    width = d_q if d + x <= d_q else d_q + -(-(d + x - d_q) // 8) * 8
    extra = extra.expand(*v.shape[:-1], x).to(v.dtype)
    value = torch.cat([v, extra, v.new_zeros(*v.shape[:-1], width - d - x)], -1)
    q, k = F.pad(q, (0, width - d_q)), F.pad(k, (0, width - d_q))
    out = F.scaled_dot_product_attention(q, k, value, attn_mask=mask, scale=d_q**-0.5)
    return out[..., :d], out[..., d : d + x]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _keys(mask: torch.Tensor | None, keys: slice) -> torch.Tensor | None:
    """The part of an additive key mask (.., S) over `keys`."""
    return None if mask is None else mask[..., keys]


def row_masks(state: RunState, mask: torch.Tensor | None, rows: int, text: slice, length: int):
    """Additive key masks (B, 1, 1, S) of a batch's rows and (1, 1, 1, S) of the source, or (None, None).

    The conditional rows (the last ones: source and edits, or the edits alone with a cached source) mask each
    prompt's padding from its true length on (`plan.key_mask`, the contract's masked-padding rule); the rows
    before them (the unconditional half) keep the mask the pipeline gave.
    """
    plan = state.plan
    if plan.key_mask is None:
        return mask, None
    ours = plan.key_mask.new_zeros(plan.num_prompts, length)
    ours[:, text] = plan.key_mask
    conditional = ours[1:] if state.cached else ours
    before = rows - conditional.shape[0]
    if before:
        theirs = mask.reshape(rows, -1)[:before] if mask is not None else ours.new_zeros(before, length)
        conditional = torch.cat([theirs.to(ours.dtype), conditional])
    return conditional[:, None, None, :], ours[:1, None, None, :]


def _text_probs(q: torch.Tensor, k_text: torch.Tensor, mass: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text block of a joint softmax, `mass * softmax over the text keys` (float32)."""
    return attention_probs(q, k_text, mask) * mass.float()


def _edit_text_block(t_s: torch.Tensor, t_e: torch.Tensor, plan, e: int, step: int, cross_on: bool):
    """(T_final, r) of edit e from the source's and the edit's text blocks (.., I, L), as the contract says."""
    if not cross_on:
        return t_e, t_e.sum(-1, keepdim=True)
    t_final, mixed = edited_map(t_s, t_e, plan, e, step)
    return t_final, mixed.sum(-1, keepdim=True)


def joint_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RunState, block: int,
                 name: str = "", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Joint attention (B, heads, S, d) of one block with the edit rows' image queries edited.

    The batch is [uncond..., source, edits...] (or its conditional half alone); with a cached source
    (`state.cached`) the source's row is left out and its image queries and keys come from the cache, by the
    layer's `name`. A run that builds a cache hands them to `state.recorder`. `mask` is the pipeline's additive
    key mask (B, 1, 1, S), if it masks padding; the conditional rows use the plan's (`row_masks`).
    """
    plan, layers = state.plan, state.layers
    per_half = state.rows_per_half
    if state.unconditional_pass or q.shape[0] not in (per_half, 2 * per_half):
        return _sdpa(q, k, v, mask)
    text, image = layers.slices(q.shape[2])
    mask, mask_s = row_masks(state, mask, q.shape[0], text, q.shape[2])
    step = state.step
    flags = plan.flags[step]
    first = q.shape[0] - plan.num_edits  # the source, when in the batch, is row first - 1
    if state.recorder is not None and (block in layers.cross_blocks or block in layers.self_blocks):
        state.recorder(name, q[first - 1 : first, :, image], k[first - 1 : first])
    cross_on = block in layers.cross_blocks and flags.cross
    replaced = flags.self_replace if block in layers.self_blocks else ()
    record = layers.records(block)
    if plan.num_edits == 0 and not record or not (cross_on or replaced or record):
        return _sdpa(q, k, v, mask)
    source = None
    if state.cached:  # (image queries, keys) of the source, (1, heads, ., d); its keys at this run's text length
        qi_s, k_s = state.source[name]
        source = qi_s, layers.fit_keys(k_s, q.shape[2])
    if layers.explicit:
        return _explicit(q, k, v, state, text, image, first, cross_on, replaced, record, source, mask, mask_s)
    return _fused(q, k, v, state, text, image, first, cross_on, replaced, record, source, mask, mask_s)


def _explicit(q, k, v, state: RunState, text: slice, image: slice, first: int, cross_on: bool, replaced, record: bool,
              source=None, mask=None, mask_s=None):
    """The reference: every probability materialised and edited as the contract writes it."""
    plan, step = state.plan, state.step
    probs = attention_probs(q, k, mask)
    out = apply_probs(probs, v)
    p_s = probs[first - 1][:, image] if source is None else attention_probs(*source, mask_s)[0]
    t_s, g_s = p_s[..., text], p_s[..., image]
    mass_s = t_s.sum(-1, keepdim=True)
    edited, recorded = [], [] if source is not None else [t_s]  # a cached source's maps come from the cache
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


def _fused(q, k, v, state: RunState, text: slice, image: slice, first: int, cross_on: bool, replaced, record: bool,
           source=None, mask=None, mask_s=None):
    """The contract on scaled-dot-product attention; text probabilities only where they are recorded."""
    plan, step, num_edits = state.plan, state.step, state.plan.num_edits
    is_text = torch.zeros(q.shape[2], 1, dtype=v.dtype, device=v.device)
    is_text[text] = 1
    m = (lambda rows: None) if mask is None else (lambda rows: mask[rows].to(q.dtype))  # noqa: E731
    if source is None:
        s = first - 1
        mask_s = None if mask is None else m(slice(s, s + 1))
        plain = _sdpa(q[:s], k[:s], v[:s], m(slice(0, s))) if s else q[:0]
        out_s, mass_s = _sdpa_with(q[s : s + 1], k[s : s + 1], v[s : s + 1], is_text, mask_s)  # the source, its text mass
        rows_s = [plain, out_s]
        mass_s = mass_s[:, :, image]
        qi_s, k_s = q[s : s + 1, :, image], k[s : s + 1]
    else:  # a cached source: only its image queries' text mass is needed
        qi_s, k_s = source
        mask_s = None if mask_s is None else mask_s.to(q.dtype)
        _, mass_s = _sdpa_with(qi_s, k_s, k_s[..., :0], is_text, mask_s)
        rows_s = [_sdpa(q[:first], k[:first], v[:first], m(slice(0, first))) if first else q[:0]]
    if num_edits == 0:  # the source alone, recorded
        state.record(_text_probs(qi_s, k_s[:, :, text], mass_s, _keys(mask_s, text)), state.layers.grid, "joint")
        return torch.cat(rows_s)
    q_e, k_e, v_e = q[first:], k[first:], v[first:]
    mask_e = m(slice(first, None))
    qi_e = q_e[:, :, image]
    out_text = _sdpa(q_e[:, :, text], k_e, v_e, mask_e)  # text queries: as in plain generation

    # The image block, of the edit's own row or (self-replacement) the source's, and that row's text mass.
    rows = plan.self_active[step] if replaced else None
    q_g = qi_e if rows is None else with_source(qi_e, 0, qi_s, rows)
    k_g = k_e if rows is None else with_source(k_e, 0, k_s, rows)
    mask_g = mask_e if rows is None or mask_e is None else with_source(mask_e, 0, mask_s, rows)
    g_out, mass_g = _sdpa_with(q_g, k_g, v_e * (1 - is_text), is_text, mask_g)
    if rows is None:
        mass_e = mass_g
    else:
        _, mass_own = _sdpa_with(qi_e, k_e, v_e[..., :0], is_text, mask_e)
        mass_e = torch.where(rows.view(-1, 1, 1, 1), mass_own, mass_g)

    v_text = v_e[:, :, text]
    mt_s, mt_e = _keys(mask_s, text), _keys(mask_e, text)
    if record:
        t_s = _text_probs(qi_s[0], k_s[0, :, text], mass_s[0], None if mt_s is None else mt_s[0])
        t_e = _text_probs(qi_e, k_e[:, :, text], mass_e, mt_e)
        finals, rs = zip(*(_edit_text_block(t_s, t_e[e], plan, e, step, cross_on) for e in range(num_edits)))
        t_final, r = torch.stack(finals), torch.stack(rs)
        state.record(t_final if source is not None else torch.cat([t_s[None], t_final]), state.layers.grid, "joint")
        text_out, r = apply_probs(t_final, v_text), r.to(v.dtype)
    else:
        text_out, r = _text_terms(qi_s, k_s[:, :, text], mass_s, qi_e, k_e[:, :, text], mass_e, v_text, plan, step,
                                  cross_on, mt_s, mt_e)
    out_image = text_out + g_out * ((1 - r) / (1 - mass_g))
    parts = [out_text, out_image] if state.layers.text_first else [out_image, out_text]
    return torch.cat([*rows_s, torch.cat(parts, 2)])


def _text_terms(qi_s, kt_s, mass_s, qi_e, kt_e, mass_e, v_text, plan, step: int, cross_on: bool, mask_s=None,
                mask_e=None):
    """`T_final @ V_e[T]` and `r` of every edit, by two text-only attentions (the source's and the edit's own).

    With `a = c w alpha`, `b = c w (1 - alpha) + 1 - c` (and their unweighted `a_unweighted`, `b_unweighted` for r), the text block
    is `t_s M diag(a) + t_e diag(b)`: `t_s @ (M (a V)) = mass_s * sdpa(Q_s, K_s[T], M (a V))`.
    """
    num_edits = v_text.shape[0]
    if not cross_on:  # the edit's own text block: a = 0, b = 1
        own, r = _sdpa_with(qi_e, kt_e, v_text, torch.ones_like(v_text[..., :1]), mask_e)
        return mass_e * own, mass_e * r
    a, b = plan.a[step].to(v_text.dtype), plan.b[step].to(v_text.dtype)  # (E, L)
    ra, rb = plan.a_unweighted[step].to(v_text.dtype), plan.b_unweighted[step].to(v_text.dtype)
    mapper = plan.mapper.to(v_text.dtype)
    v_mapped = torch.einsum("ekj,ehjd->ehkd", mapper, v_text * a[:, None, :, None])
    r_mapped = torch.einsum("ekj,ej->ek", mapper, ra)[:, None, :, None]
    from_source, r_source = _sdpa_with(
        qi_s.expand(num_edits, -1, -1, -1), kt_s.expand(num_edits, -1, -1, -1), v_mapped, r_mapped,
        None if mask_s is None else mask_s.expand(num_edits, -1, -1, -1),
    )
    own, r_own = _sdpa_with(qi_e, kt_e, v_text * b[:, None, :, None], rb[:, None, :, None], mask_e)
    return mass_s * from_source + mass_e * own, mass_s * r_source + mass_e * r_own


def image_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RunState, block: int,
                 name: str = "") -> torch.Tensor:
    """SD3.5's image-only attention (attn2): the UNet's self-attention rule in the self-replacement blocks."""
    plan, layers = state.plan, state.layers
    per_half = state.rows_per_half
    if state.unconditional_pass or q.shape[0] not in (per_half, 2 * per_half):
        return _plain(q, k, v, layers.explicit)
    first = q.shape[0] - plan.num_edits
    if state.recorder is not None and block in layers.self_blocks:
        state.recorder(name, q[first - 1 : first], k[first - 1 : first])
    replaced = plan.flags[state.step].self_replace if block in layers.self_blocks else ()
    if not replaced:
        return _plain(q, k, v, layers.explicit)
    q_s, k_s = state.source[name] if state.cached else (q[first - 1 : first], k[first - 1 : first])
    return replace_self(q, k, v, None, first, q_s, k_s, None, state)


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, explicit: bool) -> torch.Tensor:
    return apply_probs(attention_probs(q, k, None), v) if explicit else F.scaled_dot_product_attention(q, k, v)


class JointAttend:
    """One MM-DiT attention layer's edited attention for one run: `(q, k, v, mask) -> out`, (B, heads, S, d).

    `stream` is "joint" (a double-stream block's attention over image and text), "single" (a single-stream block's,
    text first) or "image" (SD3.5's image-only `attn2`). A family's processor computes q, k and v as the model's
    own processor does and hands them here.
    """

    def __init__(self, state: RunState, block: int, name: str, stream: str):
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        self.state, self.block, self.name, self.stream = state, block, name, stream

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: an additive key mask (B, 1, 1, S) that a family built from its pipeline's padding mask. The rules
        read the conditional rows last; a batch that holds them first is turned around and back."""
        rows, last = q.shape[0], self.state.in_conditional_last
        q, k, v, mask = last(q, rows), last(k, rows), last(v, rows), last(mask, rows)
        if self.stream == "image":
            if mask is not None:
                raise ValueError("Prompt-to-Prompt on image-only attention does not take an attention mask")
            return last(image_attend(q, k, v, self.state, self.block, self.name), rows)
        return last(joint_attend(q, k, v, self.state, self.block, self.name, mask), rows)
