"""Prompt-to-Prompt on tiny random SD3, SD3.5 and Flux pipelines: what the conformance suite does not cover.

Variants (SD3 without T5, Flux's true CFG, block choices, recorded maps), the joint text's tokens, and errors.
fused == explicit, the source and no-op rows == plain generation, batches and local blending for every edit case
and family are in test_conformance.py.
"""

from types import SimpleNamespace

import pytest
import torch
from mmdit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd35_pipeline

import prompt2prompt as p2p
from conftest import on_device, rel_err, tolerance
from test_conformance import CASES, SIZE, SOURCE, STEPS, T5_LENGTH, latents_of, plain, run

OPTIONS = dict(num_inference_steps=STEPS, max_sequence_length=T5_LENGTH, **SIZE)


@pytest.fixture(scope="module")
def sd3_pipe():
    return on_device(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def sd35_pipe():
    return on_device(tiny_sd35_pipeline())


@pytest.fixture(scope="module")
def flux_pipe():
    return on_device(tiny_flux_pipeline())


@pytest.fixture(params=["sd3", "sd35", "flux"])
def mmdit_pipe(request, sd3_pipe, sd35_pipe, flux_pipe):
    return {"sd3": sd3_pipe, "sd35": sd35_pipe, "flux": flux_pipe}[request.param]


@pytest.mark.parametrize("variant", ["sd3-without-t5", "flux-true-cfg", "flux-self-all", "sd35-some-blocks",
                                     "recorded"])
def test_fused_equals_explicit_variants(sd3_pipe, sd35_pipe, flux_pipe, variant):
    pipe, kwargs, editor_kwargs = sd3_pipe, {}, {}
    if variant == "sd3-without-t5":
        pipe = on_device(tiny_sd3_pipeline(t5=False))
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


def test_flux_rows_are_plain_generation_with_true_cfg(flux_pipe):
    kwargs = dict(negative_prompt="blurry", true_cfg_scale=4.0)
    result = run(flux_pipe, [p2p.Edit("a dog riding a bicycle", cross_steps=0.0, self_steps=0.0)], **kwargs)
    images = latents_of(flux_pipe, result.images)
    assert rel_err(images[0], plain(flux_pipe, SOURCE, **kwargs)) <= tolerance()
    assert rel_err(images[1], plain(flux_pipe, "a dog riding a bicycle", **kwargs)) <= tolerance()


def test_an_active_edit_changes_the_image_and_keeps_more_of_the_source(mmdit_pipe):
    edited = latents_of(mmdit_pipe, run(mmdit_pipe, [p2p.Edit("a dog riding a bicycle")]).images)
    alone = plain(mmdit_pipe, "a dog riding a bicycle")
    assert rel_err(edited[1], alone) > 1e-3  # the edit is not a no-op
    assert (edited[1] - edited[0]).abs().mean() < (alone - edited[0]).abs().mean()


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
        (lambda e: e.edit(SOURCE, ["a dog riding a bicycle"], true_cfg_scale=2.0, **OPTIONS),
         "StableDiffusion3Pipeline takes no keyword 'true_cfg_scale'"),  # Flux's, not SD3's
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


def test_flux_true_cfg_must_be_finite(flux_pipe):
    with pytest.raises(ValueError, match="true_cfg_scale must be a finite number"):
        p2p.Editor(flux_pipe).prepare(SOURCE, ["a dog riding a bicycle"], true_cfg_scale=float("nan"), **OPTIONS)
