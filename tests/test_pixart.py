"""PixArt-Σ, a cross-attention DiT: its prompt as the pipeline reads it, its masked padding, self-replacement by
block, its step callback, and real images refused with a message (it has no inversion here)."""

import numpy as np
import pytest
import torch
from conftest import on_device, rel_err, tolerance
from mmdit_pipelines import tiny_pixart_pipeline

import prompt2prompt as p2p
from prompt2prompt.inversion import invert

SOURCE = "a cat riding a bicycle"
OPTIONS = dict(num_inference_steps=3, seed=0, height=32, width=32, max_sequence_length=16, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_pixart_pipeline())


def test_the_prompt_is_read_lowercased_and_its_padding_masked(pipe):
    tokens = p2p.Editor(pipe).tokenize("A Cat riding a bicycle ", max_sequence_length=16)
    assert tokens.words == ["a", "cat", "riding", "a", "bicycle"] and tokens.word_tokens[1] == [1]
    assert (tokens.true_length, tokens.length) == (7, 16)  # ▁a ▁cat ▁riding ▁a ▁bi cycle </s>, then masked padding
    upper = p2p.Editor(pipe).edit("A CAT riding a bicycle", ["A DOG riding a bicycle"], **OPTIONS).images
    lower = p2p.Editor(pipe).edit(SOURCE, ["a dog riding a bicycle"], **OPTIONS).images
    assert torch.equal(upper, lower)  # the pipeline lowercases: so do the edits


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_masked_keys_get_no_probability(pipe, attention):
    edits = [p2p.Edit("a lasagne riding a bicycle"), p2p.Edit("a black cat riding a red bicycle")]
    result = p2p.Editor(pipe, attention=attention).edit(SOURCE, edits, record_attention=True, **OPTIONS)
    (maps,) = result.attention.values()  # (P, h, w, L)
    editor = p2p.Editor(pipe)
    for row, prompt in enumerate([SOURCE, *(e.prompt for e in edits)]):
        n = editor.tokenize(prompt, max_sequence_length=16).true_length
        assert maps[row, ..., n:].abs().max() == 0, prompt


def test_self_replacement_is_chosen_by_block(pipe):
    edit = [p2p.Edit("a dog riding a bicycle", cross_steps=0.0, self_steps=1.0)]
    every = p2p.Editor(pipe).edit(SOURCE, edit, **OPTIONS).images
    none = p2p.Editor(pipe, self_blocks=[]).edit(SOURCE, edit, **OPTIONS).images
    first = p2p.Editor(pipe, self_blocks=[0]).edit(SOURCE, edit, **OPTIONS).images
    plain_dog = p2p.Editor(pipe).edit("a dog riding a bicycle", [], **OPTIONS).images
    assert rel_err(none[1], plain_dog[0]) <= tolerance()  # no block replaced, no cross window: the edit's own image
    assert rel_err(every[1], first[1]) > 1e-4 and rel_err(first[1], none[1]) > 1e-4
    with pytest.raises(ValueError, match="self_blocks: 2 is not a block of this model, whose blocks are 0..1"):
        p2p.Editor(pipe, self_blocks=[2])
    with pytest.raises(ValueError, match="do not apply to PixArtSigmaPipeline"):
        p2p.Editor(pipe, blend_res=8)


def test_keywords_that_would_change_the_text_or_size_are_refused(pipe):
    editor = p2p.Editor(pipe)
    for name, value in (("clean_caption", True), ("use_resolution_binning", True)):
        with pytest.raises(ValueError, match=f"{name}=True would change what the edits align"):
            editor.edit(SOURCE, ["a dog riding a bicycle"], **OPTIONS, **{name: value})
    with pytest.raises(ValueError, match="callback would bypass"):
        editor.edit(SOURCE, ["a dog riding a bicycle"], **OPTIONS, callback=print)


def test_real_images_are_refused_with_a_message(pipe):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="real images cannot be edited on PixArt-Σ models: PixArt-Σ samples with"):
        invert(pipe, image, SOURCE)
    with pytest.raises(ValueError, match="real images cannot be edited on PixArt-Σ models"):
        p2p.Editor(pipe).invert(image, SOURCE, method="direct")
