"""A CPU-only guard for GPU runs: the processor never mixes devices and never waits for the device.

The processor runs on "meta" tensors, which have a device of their own but no data: any tensor left on the
CPU that meets them raises a device-mismatch error, and any question about their values (`bool(t)`,
`t.item()`, `t.tolist()`, boolean-mask indexing) raises too, exactly where such a call would make a
CUDA run wait for the GPU. (Fake CUDA tensors under `FakeTensorMode` would do the same, but a CPU-only torch
build cannot slice them.)
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from prompt2prompt.alignment import tokenize
from prompt2prompt.attention.plan import build_plan
from prompt2prompt.edits import Edit, LocalBlend
from prompt2prompt.attention.cross import Layer, P2PAttnProcessor
from prompt2prompt.attention.state import LayerPlan, RunState

SOURCE = "a cat riding a bicycle"
EDITS = [  # every kind of step: swap, mix, refine, reweight, self-replacement, windows that open late
    Edit("a dog riding a bicycle", cross_steps={"default": 0.5, "dog": (0.25, 1.0)}, self_steps=(0.25, 0.75)),
    Edit("a lasagne riding a bicycle", weights={"riding": -0.5, "lasagne": 2.0}),
    Edit("a fluffy cat riding a red bicycle", weights={"fluffy": 3.0}),
    Edit(SOURCE, weights={"cat": -1.0}, blend=LocalBlend("cat", "cat")),
]
STEPS = 4
DEVICE, DTYPE = torch.device("meta"), torch.float16
CROSS = Layer("down_blocks.0.attn2", is_cross=True, place="down")
SELF = Layer("up_blocks.1.attn1", is_cross=False, place="up")


@pytest.fixture(scope="module")
def plan(tokenizer):
    source = tokenize(tokenizer, SOURCE)
    return build_plan(source, EDITS, [tokenize(tokenizer, e.prompt) for e in EDITS], STEPS)


def state_for(plan, *, explicit=False, recorded=False, step=0):
    layers = LayerPlan(sizes={16: (4, 4)}, self_max_side=4, blend_size=(4, 4) if recorded else None,
                       record_sizes=frozenset({(4, 4)}) if recorded else frozenset(), explicit=explicit)
    return RunState(plan=plan, layers=layers, step=step)


def attention_layer(cross: bool) -> Attention:
    return Attention(query_dim=16, cross_attention_dim=32 if cross else None, heads=2, dim_head=8).to(DEVICE, DTYPE)


@pytest.mark.parametrize("path", ["fused", "explicit", "recorded"])
@pytest.mark.parametrize("cfg", [True, False])
def test_processor_on_another_device_never_syncs(plan, path, cfg):
    device_plan = plan.to(DEVICE, DTYPE)
    assert all(t.device == DEVICE for t in (device_plan.mapper, device_plan.a, device_plan.b, device_plan.cross))
    batch = 2 * plan.num_prompts if cfg else plan.num_prompts
    hidden = torch.empty(batch, 16, 16, device=DEVICE, dtype=DTYPE)
    text = torch.empty(batch, 77, 32, device=DEVICE, dtype=DTYPE)
    for step in range(STEPS):
        state = state_for(device_plan, explicit=path == "explicit", recorded=path == "recorded", step=step)
        for name, layer, context in ((CROSS, attention_layer(True), text), (SELF, attention_layer(False), None)):
            out = P2PAttnProcessor(state, name)(layer, hidden, encoder_hidden_states=context)
            assert out.device == DEVICE and out.shape == hidden.shape
    if path == "recorded":
        assert state.blend_sum.device == DEVICE and state.records[(4, 4)].device == DEVICE


def test_the_guard_catches_a_plan_left_on_the_cpu(plan):
    hidden = torch.empty(2 * plan.num_prompts, 16, 16, device=DEVICE, dtype=DTYPE)
    text = torch.empty(2 * plan.num_prompts, 77, 32, device=DEVICE, dtype=DTYPE)
    processor = P2PAttnProcessor(state_for(plan), CROSS)  # the CPU plan, not moved
    with pytest.raises(RuntimeError, match="device"):
        processor(attention_layer(True), hidden, encoder_hidden_states=text)


def test_the_guard_catches_a_host_sync():
    with pytest.raises(RuntimeError):
        bool(torch.empty(3, device=DEVICE).any())


@pytest.mark.parametrize("cached", [False, True], ids=["source-row", "cached-source"])
@pytest.mark.parametrize("path", ["fused", "explicit", "recorded"])
@pytest.mark.parametrize("text_first", [True, False], ids=["flux", "sd3"])
def test_joint_attention_on_another_device_never_syncs(tokenizer, path, text_first, cached):
    from prompt2prompt.alignment import join
    from prompt2prompt.attention.joint import image_attend, joint_attend
    from prompt2prompt.attention.state import JointLayerPlan

    source = join([tokenize(tokenizer, SOURCE)])
    plan = build_plan(source, EDITS, [join([tokenize(tokenizer, e.prompt)]) for e in EDITS], STEPS).to(DEVICE, DTYPE)
    layers = JointLayerPlan(grid=(4, 4), text_length=77, text_first=text_first, cross_blocks=frozenset({0}),
                            self_blocks=frozenset({0}), record_blocks=frozenset({0}),
                            blend_size=(4, 4) if path == "recorded" else None, explicit=path == "explicit")
    rows = plan.num_edits if cached else plan.num_prompts  # a cached source's row is not in the batch
    q = torch.empty(2 * rows, 2, 16 + 77, 8, device=DEVICE, dtype=DTYPE)
    image = q[:, :, :16]
    # the cache's (image queries, keys) of the joint layer and (queries, keys) of the image layer
    source = {"joint": (q[:1, :, :16], q[:1]), "image": (image[:1], image[:1])} if cached else None
    for step in range(STEPS):
        state = RunState(plan=plan, layers=layers, step=step, cached=cached, source=source)
        assert joint_attend(q, q, q, state, 0, "joint").shape == q.shape
        assert image_attend(image, image, image, state, 0, "image").device == DEVICE
    if path == "recorded":
        assert state.blend_sum.device == DEVICE
