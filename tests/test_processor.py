"""The attention processor against a literal implementation of the contract's cross- and self-attention edits."""

import pytest
import torch
from conftest import TORCH_DEVICE, TORCH_DTYPE, tolerance

from prompt2prompt.alignment import tokenize
from prompt2prompt.attention.plan import build_plan
from prompt2prompt.edits import Edit
from prompt2prompt.attention.cross import Layer, P2PAttnProcessor
from prompt2prompt.attention.state import LayerPlan, RunState

SOURCE = "a cat riding a bicycle"
EDITS = [
    Edit("a dog riding a bicycle", cross_steps={"default": 0.5, "dog": (0.25, 1.0)}),
    Edit("a lasagne riding a bicycle", weights={"riding": -0.5, "lasagne": 2.0}),
    Edit("a fluffy cat riding a bicycle", weights={"fluffy": 3.0}, self_steps=(0.25, 0.75)),
    Edit("a cat riding a bicycle", weights={"cat": -1.0}),
]


def contract_cross(probs, plan, step, src):
    """The contract, step by step, one edit and one token at a time."""
    out = probs.clone()
    a_s = probs[src]
    for e in range(plan.num_edits):
        a_e = probs[src + 1 + e]
        a_final = torch.empty_like(a_e)
        for j in range(77):
            if plan.replace[e]:
                mapped = sum(a_s[..., k] * plan.mapper[e, k, j] for k in range(77))
            else:
                alpha = plan.alpha[e, j]
                mapped = alpha * a_s[..., plan.refine_index[e, j]] + (1 - alpha) * a_e[..., j]
            mapped = mapped * plan.weights[e, j]
            c = plan.cross[step, e, j]
            a_final[..., j] = c * mapped + (1 - c) * a_e[..., j]
        out[src + 1 + e] = a_final
    return out


@pytest.fixture(scope="module")
def plan(tokenizer):
    source = tokenize(tokenizer, SOURCE)
    return build_plan(source, EDITS, [tokenize(tokenizer, e.prompt) for e in EDITS], num_inference_steps=4)


def make_state(plan, q_len, explicit, step):
    side = int(q_len**0.5)
    plan = plan.to(TORCH_DEVICE, TORCH_DTYPE)  # as the editor does, once per run
    layers = LayerPlan(sizes={q_len: (side, side)}, self_max_side=side, blend_size=None, explicit=explicit)
    return RunState(plan=plan, layers=layers, step=step)


def on_device(*tensors):
    return [t.to(TORCH_DEVICE, TORCH_DTYPE) for t in tensors]


def assert_close(got, expected):
    """The processor on the test device and dtype against the contract in float32 on the CPU."""
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tolerance(), atol=tolerance(1e-5))


@pytest.mark.parametrize("step", range(4))
@pytest.mark.parametrize("cfg", [True, False])
def test_cross_attention_matches_the_contract(plan, step, cfg):
    torch.manual_seed(step)
    batch = 2 * plan.num_prompts if cfg else plan.num_prompts
    q, k, v = torch.randn(batch, 2, 16, 8), torch.randn(batch, 2, 77, 8), torch.randn(batch, 2, 77, 8)
    src = batch - plan.num_prompts
    probs = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1)
    expected = contract_cross(probs, plan, step, src) @ v
    for explicit in (True, False):
        proc = P2PAttnProcessor(make_state(plan, 16, explicit, step), Layer("down_blocks.0.attn2", is_cross=True, place="down"))
        got = proc.attend(*on_device(q, k, v), None)
        assert_close(got, expected)
    if cfg:  # the unconditional half and the source row are plain attention
        plain = torch.nn.functional.scaled_dot_product_attention(*on_device(q, k, v))
        torch.testing.assert_close(got[: src + 1], plain[: src + 1])


@pytest.mark.parametrize("step", range(4))
def test_self_attention_replacement(plan, step):
    torch.manual_seed(step)
    batch = 2 * plan.num_prompts
    q, k, v = torch.randn(batch, 2, 16, 8), torch.randn(batch, 2, 16, 8), torch.randn(batch, 2, 16, 8)
    src = plan.num_prompts
    probs = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1)
    for e in range(plan.num_edits):
        if plan.self_active[step, e]:
            probs[src + 1 + e] = probs[src]
    expected = probs @ v
    layer = Layer("up_blocks.1.attn1", is_cross=False, place="up")
    for explicit in (True, False):
        got = P2PAttnProcessor(make_state(plan, 16, explicit, step), layer).attend(*on_device(q, k, v), None)
        assert_close(got, expected)


def test_self_attention_untouched_above_the_resolution(plan):
    q, k, v = on_device(torch.randn(10, 2, 64, 8), torch.randn(10, 2, 64, 8), torch.randn(10, 2, 64, 8))
    state = make_state(plan, 64, False, 0)
    state.layers = LayerPlan(sizes=state.layers.sizes, self_max_side=4, blend_size=None)  # the layer's side is 8
    got = P2PAttnProcessor(state, Layer("down_blocks.0.attn1", is_cross=False, place="down")).attend(q, k, v, None)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v))
