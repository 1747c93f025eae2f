"""FLUX.2 klein: the templated Qwen3 text worked by hand on the tiny pipeline's byte-level BPE, its attended padding,
the guidance pass on the empty prompt, the patchified latents, and its flow inversions.

The tokenizer (tests/flux2_pipelines.py) reads "user" as two pieces and "bicycle" as four (Ġb ic y cle). The text
of "a red cat riding a bicycle" at length 32:
    <|im_start|> u ser Ċ | a Ġred Ġcat Ġriding Ġa Ġb ic y cle | <|im_end|> Ċ <|im_start|> a ss ist ant Ċ <think>
    ĊĊ </think> ĊĊ | <|endoftext|> x 7                (positions 0..31; only the prompt's tokens belong to words)
"""

import numpy as np
import pytest
import torch
from conftest import on_device, rel_err, tolerance
from flow_inversions import blocky_image, check_direct_and_euler
from flux2_pipelines import tiny_flux2_klein_pipeline

import prompt2prompt as p2p

SOURCE = "a red cat riding a bicycle"
OPTIONS = dict(num_inference_steps=3, seed=0, height=32, width=32, max_sequence_length=32, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_flux2_klein_pipeline())


def test_the_template_stays_and_its_padding_is_attended_text_of_no_word(pipe):
    editor = p2p.Editor(pipe)
    t = editor.tokenize(SOURCE, max_sequence_length=32)
    texts = editor.family.token_texts(t)
    assert texts[:4] == ["<|im_start|>", "u", "ser", ""] and texts[13:15] == ["<|im_end|>", ""]
    assert t.word_tokens == [[4], [5], [6], [7], [8], [9, 10, 11, 12]]  # bicycle: Ġb ic y cle
    assert t.length == 32 and t.true_length is None  # padded to 32, no mask: the padding is attended
    assert len(t.ids) == 25 and texts[25:] == [""] * 7
    run = editor.prepare(SOURCE, ["a red dog riding a bicycle"], seed=0, height=32, width=32, max_sequence_length=32)
    assert run.plan.key_mask is None and run.text_length == 32
    # the pipeline's own tokens are ours: its text encoder reads the same ids
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": SOURCE}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert pipe.tokenizer(text, padding="max_length", max_length=32).input_ids[:25] == t.ids


def test_a_prompt_longer_than_its_text_and_a_negative_prompt_are_refused(pipe):
    editor = p2p.Editor(pipe)
    with pytest.raises(ValueError, match="is 25 tokens long in its template, more than the model's 16"):
        editor.prepare(SOURCE, [], seed=0, height=32, width=32, max_sequence_length=16)
    with pytest.raises(ValueError, match="reference images"):
        editor.prepare(SOURCE, [], seed=0, height=32, width=32, max_sequence_length=32, image=[np.zeros((32, 32, 3))])
    with pytest.raises(ValueError, match="FLUX.2 klein pipelines take no negative prompt"):
        editor.prepare(SOURCE, [], seed=0, height=32, width=32, max_sequence_length=32, negative_prompt="blurry")


def test_guidance_is_a_second_pass_on_the_empty_prompt_and_a_distilled_model_has_none(pipe):
    editor = p2p.Editor(pipe)
    assert editor.family.split_passes({"guidance_scale": 4.0}) and not editor.family.split_passes({"guidance_scale": 1.0})
    on, off = (editor.edit(SOURCE, [], **OPTIONS, guidance_scale=g).images for g in (4.0, 1.0))
    assert rel_err(on, off) > 10 * tolerance()
    distilled = on_device(tiny_flux2_klein_pipeline(distilled=True))
    family = p2p.Editor(distilled).family
    assert not family.split_passes({"guidance_scale": 4.0})
    result = p2p.Editor(distilled).edit(SOURCE, ["a red dog riding a bicycle"], **OPTIONS, guidance_scale=4.0)
    latents = torch.randn((1, *family.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    own = distilled(prompt=SOURCE, latents=latents.to(distilled.device), num_inference_steps=3, height=32, width=32,
                    max_sequence_length=32, guidance_scale=4.0, output_type="latent").images
    assert rel_err(result.images[0], own[0]) <= tolerance()


def test_latents_go_in_patchified_and_come_out_as_the_vae_s(pipe):
    family = p2p.Editor(pipe).family
    channels, h, w = family.latent_shape(32, 32)
    assert (channels, h, w) == (pipe.transformer.config.in_channels, 8, 8)
    x = torch.randn(2, channels, h, w)
    assert torch.equal(family.unpack(family.pack(x), (h, w)), x) and torch.equal(family.call_latents(x), x)
    out = family.output_latents(x)
    assert out.shape == (2, channels // 4, 2 * h, 2 * w)
    # a patch's four channels are one VAE channel's 2x2 pixels, after the batch norm is undone
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps)
    c = 1
    torch.testing.assert_close(out[:, c, :2, :2].flatten(1), (x[:, 4 * c : 4 * c + 4, 0, 0] * std[4 * c : 4 * c + 4]
                                                             + bn.running_mean[4 * c : 4 * c + 4]))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_direct_inversion_reconstructs_the_image_s_latent_and_the_edit_runs_free(pipe, guidance):
    check_direct_and_euler(pipe, blocky_image(), SOURCE, "a red dog riding a bicycle", guidance_scale=guidance,
                           num_inference_steps=4, max_sequence_length=32, height=32, width=32)
