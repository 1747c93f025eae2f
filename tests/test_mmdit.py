"""Prompt-to-Prompt on tiny random SD3, SD3.5 and Flux pipelines: the joint-attention contract.

fused == explicit for every edit kind; the source row and a no-op edit are plain generation; each edit in a
batch is that edit alone; outside the blend mask the edit keeps the source's latents.
"""

from types import SimpleNamespace

import pytest
import torch
from mmdit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd35_pipeline

import prompt2prompt as p2p
from conftest import on_device, rel_err, tolerance

SOURCE = "a cat riding a bicycle"
STEPS = 4
T5_LENGTH = 16
OPTIONS = dict(num_inference_steps=STEPS, height=32, width=32, max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module")
def sd3_pipe():
    return on_device(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def sd35_pipe():
    return on_device(tiny_sd35_pipeline())


@pytest.fixture(scope="module")
def flux_pipe():
    return on_device(tiny_flux_pipeline())


@pytest.fixture(scope="module")
def flux_dev_pipe():
    return on_device(tiny_flux_pipeline(guidance_embeds=True))


@pytest.fixture(params=["sd3", "sd35", "flux"])
def mmdit_pipe(request, sd3_pipe, sd35_pipe, flux_pipe):
    return {"sd3": sd3_pipe, "sd35": sd35_pipe, "flux": flux_pipe}[request.param]


def latents_of(pipe, images):
    """(P, C, h, w) latents of an output_type="latent" result (Flux returns its packed tokens)."""
    family = p2p.Editor(pipe).family
    return family.unpack(images, (16, 16)) if images.ndim == 3 else images


def run(pipe, edits, attention="fused", editor_kwargs=None, **kwargs):
    options = dict(OPTIONS, seed=0, output_type="latent")
    options.update(kwargs)
    return p2p.Editor(pipe, attention=attention, **(editor_kwargs or {})).edit(SOURCE, edits, **options)


def plain(pipe, prompt, **kwargs):
    """Plain generation of `prompt` from the seed the editor draws from."""
    editor = p2p.Editor(pipe)
    channels, h, w = editor.family.latent_shape(32, 32)
    latents = torch.randn((1, channels, h, w), generator=torch.Generator().manual_seed(0))
    latents = editor.family.pack(latents.to(pipe.device, pipe.transformer.dtype))
    options = dict(OPTIONS, output_type="latent")
    options.update(kwargs)
    return latents_of(pipe, pipe(prompt, latents=latents, **options).images)[0]


CASES = {
    "replace": [p2p.Edit("a dog riding a bicycle")],
    "replace-multi-piece": [p2p.Edit("a cat riding a lasagne", self_steps=(0.25, 0.75))],
    "refine": [p2p.Edit("a black cat riding a red bicycle")],
    "reweight-negative": [p2p.Edit(SOURCE, weights={"cat": -0.5, "bicycle": 2.0})],
    "word-windows": [p2p.Edit("a dog riding a bicycle", cross_steps={"default": 0.5, "dog": (0.25, 1.0)}, self_steps=0.5)],
    "blend": [p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("cat", "dog", threshold=0.5, start=0.25))],
    "blend-exclude": [p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend(
        "cat", "dog", exclude_source_words="bicycle", exclude_edit_words=["bicycle"]))],
    "mixed": [
        p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("cat", "dog")),
        p2p.Edit("a cat riding a rusty bicycle", mode="refine", weights={"rusty": 2.0}),
        p2p.Edit(SOURCE, weights={"riding": -1.0}),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_explicit(mmdit_pipe, case):
    fused, explicit = run(mmdit_pipe, CASES[case]), run(mmdit_pipe, CASES[case], attention="explicit")
    assert rel_err(fused.images, explicit.images) <= tolerance()


@pytest.mark.parametrize("variant", ["sd3-no-cfg", "sd3-without-t5", "flux-dev", "flux-true-cfg", "flux-self-all",
                                     "sd35-some-blocks", "recorded"])
def test_fused_equals_explicit_variants(sd3_pipe, sd35_pipe, flux_pipe, flux_dev_pipe, variant):
    pipe, kwargs, editor_kwargs = sd3_pipe, {}, {}
    if variant == "sd3-no-cfg":
        kwargs = dict(guidance_scale=1.0)
    elif variant == "sd3-without-t5":
        pipe = on_device(tiny_sd3_pipeline(t5=False))
    elif variant == "flux-dev":
        pipe = flux_dev_pipe
    elif variant == "flux-true-cfg":
        pipe, kwargs = flux_pipe, dict(negative_prompt="blurry", true_cfg_scale=4.0)
    elif variant == "flux-self-all":
        pipe, editor_kwargs = flux_pipe, dict(self_blocks=[1], cross_blocks=[1], record_blocks=[0])
    elif variant == "sd35-some-blocks":
        pipe, editor_kwargs = sd35_pipe, dict(self_blocks=[0], record_blocks=[1])
    elif variant == "recorded":
        kwargs = dict(record_attention=True)
    edits = CASES["mixed"]
    fused = run(pipe, edits, editor_kwargs=editor_kwargs, **kwargs)
    explicit = run(pipe, edits, attention="explicit", editor_kwargs=editor_kwargs, **kwargs)
    assert rel_err(fused.images, explicit.images) <= tolerance()
    if variant == "recorded":
        for res, maps in fused.attention.items():
            assert rel_err(maps, explicit.attention[res]) <= tolerance()


@pytest.mark.parametrize("kwargs", [{}, dict(guidance_scale=1.0)], ids=["cfg", "no-cfg"])
def test_source_row_is_plain_generation(sd3_pipe, kwargs):
    result = run(sd3_pipe, CASES["mixed"], **kwargs)
    assert rel_err(result.images[0], plain(sd3_pipe, SOURCE, **kwargs)) <= tolerance()


def test_flux_rows_are_plain_generation_with_true_cfg(flux_pipe):
    kwargs = dict(negative_prompt="blurry", true_cfg_scale=4.0)
    result = run(flux_pipe, [p2p.Edit("a dog riding a bicycle", cross_steps=0.0, self_steps=0.0)], **kwargs)
    images = latents_of(flux_pipe, result.images)
    assert rel_err(images[0], plain(flux_pipe, SOURCE, **kwargs)) <= tolerance()
    assert rel_err(images[1], plain(flux_pipe, "a dog riding a bicycle", **kwargs)) <= tolerance()


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_noop_edit_is_plain_generation_of_its_prompt(mmdit_pipe, attention):
    edit = p2p.Edit("a dog riding a bicycle", cross_steps=0.0, self_steps=0.0)
    result = run(mmdit_pipe, [edit], attention=attention)
    images = latents_of(mmdit_pipe, result.images)
    assert rel_err(images[0], plain(mmdit_pipe, SOURCE)) <= tolerance()
    assert rel_err(images[1], plain(mmdit_pipe, "a dog riding a bicycle")) <= tolerance()


def test_an_active_edit_changes_the_image_and_keeps_more_of_the_source(mmdit_pipe):
    edited = latents_of(mmdit_pipe, run(mmdit_pipe, [p2p.Edit("a dog riding a bicycle")]).images)
    alone = plain(mmdit_pipe, "a dog riding a bicycle")
    assert rel_err(edited[1], alone) > 1e-3  # the edit is not a no-op
    assert (edited[1] - edited[0]).abs().mean() < (alone - edited[0]).abs().mean()


def test_each_edit_in_a_batch_is_that_edit_alone(mmdit_pipe):
    edits = CASES["mixed"]
    together = run(mmdit_pipe, edits)
    for e, edit in enumerate(edits):
        alone = run(mmdit_pipe, [edit])
        assert rel_err(together.images[1 + e], alone.images[1]) <= tolerance()
        if edit.blend is not None:
            assert torch.equal(together.masks[e], alone.masks[0])


def test_outside_the_blend_mask_the_edit_keeps_the_source(mmdit_pipe):
    # A random model's maps are nearly flat: a high threshold and an excluded word leave part of the image out.
    blend = p2p.LocalBlend("cat", "dog", threshold=0.9, exclude_source_words="bicycle", exclude_threshold=0.8)
    edit = p2p.Edit("a dog riding a bicycle", blend=blend)
    result = run(mmdit_pipe, [edit])
    images = latents_of(mmdit_pipe, result.images)
    mask = result.masks[0]
    assert mask.shape == images.shape[-2:] and 0 < mask.sum() < mask.numel()
    outside = ~mask.to(images.device)
    assert torch.equal(images[1][:, outside], images[0][:, outside])
    assert not torch.equal(images[1][:, ~outside], images[0][:, ~outside])


def test_maps_cover_the_joint_text_and_a_word_has_tokens_in_both_parts(sd3_pipe):
    editor = p2p.Editor(sd3_pipe)
    tokens = editor.tokenize(SOURCE, max_sequence_length=T5_LENGTH)
    assert tokens.length == 77 + T5_LENGTH
    # CLIP: BOS a cat riding a bicycle EOS; T5: a cat riding a bi cycle EOS
    assert tokens.word_tokens == [[1, 77], [2, 78], [3, 79], [4, 80], [5, 81, 82]]
    result = run(sd3_pipe, [p2p.Edit("a dog riding a bicycle")], record_attention=True)
    (maps,) = result.attention.values()
    assert maps.shape == (2, 8, 8, 77 + T5_LENGTH)
    assert len(result.tokens[0]) == 77 + T5_LENGTH and result.tokens[0][81:83] == ["bi", "cycle"]
    # Text rows of a joint softmax over image and text tokens: positive, each summing to the text mass < 1.
    assert (maps > 0).all() and (maps.sum(-1) < 1).all()


def test_flux_tokens_are_t5_only(flux_pipe):
    tokens = p2p.Editor(flux_pipe).tokenize("a lasagne with croutons", max_sequence_length=T5_LENGTH)
    assert tokens.length == T5_LENGTH and tokens.word_tokens == [[0], [1, 2], [3], [4, 5, 6]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], inversion=SimpleNamespace(
            method="null-text", uncond_embeddings=torch.zeros(1)), **OPTIONS), "invert the image with this"),
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], skip_guidance_layers=[1], **OPTIONS), "skip_guidance_layers"),
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], prompt_3="x", **OPTIONS), "prompt_3"),
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], record_attention=16, **OPTIONS), "record_attention"),
        (lambda e: e.edit(SOURCE + " and" * 20, ["a dog"], **OPTIONS), "max_sequence_length"),
        (lambda e: e.run([e.prepare(SOURCE, ["a dog riding a bicycle"], **OPTIONS)] * 2), "one by one"),
        (lambda e: e.cache_source(SOURCE, **OPTIONS), "source caches are not supported"),
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], true_cfg_scale=float("nan"), **OPTIONS), "finite"),
        (lambda e: p2p.Editor(e.pipe, blend_res=8), "MM-DiT models choose blocks"),
        (lambda e: p2p.Editor(e.pipe, self_blocks=[7]), "not a block"),
    ],
)
def test_bad_input_is_refused_before_compute(sd3_pipe, make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make(p2p.Editor(sd3_pipe))


def test_unet_editor_refuses_block_choices(sd_pipe):
    with pytest.raises(ValueError, match="UNet models choose layers by side"):
        p2p.Editor(sd_pipe, self_blocks=[0])
