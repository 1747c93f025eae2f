"""Where a guided batch holds its conditional rows is the family's to say (`Family.conditional_first`), and the run
state carries it: every rule applies to the conditional rows wherever they sit. A batch [cond..., uncond...] gives,
row for row, what the same rows give as [uncond..., cond...], in cross-, self- and joint attention."""

import pytest
import torch
from mmdit_pipelines import tiny_sd3_pipeline
from pipelines import tiny_sd_pipeline

import prompt2prompt as p2p
from prompt2prompt.attention.cross import Layer, P2PAttnProcessor
from prompt2prompt.attention.joint import JointAttend
from prompt2prompt.attention.state import RunState

EDITS = [p2p.Edit("a dog riding a bicycle"), p2p.Edit("a cat riding a red bicycle", weights={"red": 2.0})]


def swap(x):
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]])


def states(run, step):
    last, first = (RunState(plan=run.plan, layers=run.layers, conditional_first=flag) for flag in (False, True))
    last.step = first.step = step
    return last, first


def qkv(rows, queries, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, queries, 8, generator=g), torch.randn(rows, 2, keys, 8, generator=g),
            torch.randn(rows, 2, keys, 8, generator=g))


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("is_cross", [True, False])
def test_unet_layers_apply_the_rules_to_the_conditional_rows_wherever_they_sit(attention, is_cross):
    editor = p2p.Editor(tiny_sd_pipeline(), attention=attention, self_replace_max_res=16)  # every layer self-replaces
    run = editor.prepare("a cat riding a bicycle", EDITS, seed=0, num_inference_steps=4, height=32, width=32)
    queries = min(run.layers.sizes)
    layer = Layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", is_cross=is_cross, place="down")
    last, first = states(run, step=0)
    rows = 2 * run.plan.num_prompts
    q, k, v = qkv(rows, queries, 77 if is_cross else queries)
    out_last = P2PAttnProcessor(last, layer).attend(q, k, v, None)
    out_first = P2PAttnProcessor(first, layer).attend(swap(q), swap(k), swap(v), None)
    assert torch.equal(swap(out_first), out_last)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out_last[-2:], plain[-2:], atol=1e-4)  # the edits' rows were edited
    torch.testing.assert_close(out_last[: rows // 2], plain[: rows // 2])  # the unconditional rows were not


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_joint_layers_apply_the_rules_to_the_conditional_rows_wherever_they_sit(attention):
    run = p2p.Editor(tiny_sd3_pipeline(), attention=attention).prepare(
        "a cat riding a bicycle", EDITS, seed=0, num_inference_steps=4, height=32, width=32, max_sequence_length=16)
    last, first = states(run, step=0)
    grid = run.layers.grid
    length = run.layers.text_length + grid[0] * grid[1]
    rows = 2 * run.plan.num_prompts
    q, k, v = qkv(rows, length, length)
    out_last = JointAttend(last, 0, "transformer_blocks.0.attn.processor", "joint")(q, k, v)
    out_first = JointAttend(first, 0, "transformer_blocks.0.attn.processor", "joint")(swap(q), swap(k), swap(v))
    assert torch.equal(swap(out_first), out_last)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out_last[-2:], plain[-2:], atol=1e-4)
    torch.testing.assert_close(out_last[: rows // 2], plain[: rows // 2])


def test_a_batch_of_one_half_and_a_separate_pass_are_left_as_they_are():
    run = p2p.Editor(tiny_sd_pipeline()).prepare("a cat riding a bicycle", EDITS, seed=0, num_inference_steps=4,
                                                 height=32, width=32)
    _, first = states(run, step=1)
    x = torch.arange(run.plan.num_prompts * 2.0)
    assert torch.equal(first.in_conditional_last(x, len(x)), swap(x))
    one_half = torch.arange(float(run.plan.num_prompts))  # no guidance: every row is conditional
    assert torch.equal(first.in_conditional_last(one_half, len(one_half)), one_half)
    assert first.in_conditional_last(None, len(x)) is None
