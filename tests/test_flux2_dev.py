"""FLUX.2 dev: its Mistral text worked by hand on the tiny pipeline's byte-level BPE (the system message kept, the
padding on the left), its embedded guidance, its packed latents and its flow inversions.

The tokenizer (tests/flux2_pipelines.py) reads each word of the system message as one token and "lasagne" as five
pieces (la s ag n e). The text of "a cat riding a lasagne" at length 48:
    <pad> x 7 | <s> [SYSTEM_PROMPT] You are ... speculation . [/SYSTEM_PROMPT] [INST] | a Ġcat Ġriding Ġa Ġla s ag n e
    | [/INST]              (positions 0..47: the template takes 31 tokens before the prompt and 1 after it, the
                            prompt 9, so 48 - 41 = 7 padding tokens lead; only the prompt's tokens belong to words)
A longer prompt starts earlier: its tokens sit at other positions than the source's.
"""

import numpy as np
import pytest
import torch
from conftest import on_device, rel_err, tolerance
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from flow_inversions import blocky_image, check_direct_and_euler
from flux2_pipelines import tiny_flux2_pipeline

import prompt2prompt as p2p

SOURCE = "a cat riding a lasagne"
LONGER = "a black cat riding a red lasagne"
OPTIONS = dict(num_inference_steps=3, seed=0, height=32, width=32, max_sequence_length=48, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_flux2_pipeline())


def test_the_system_message_stays_and_the_text_ends_at_the_last_position(pipe):
    editor = p2p.Editor(pipe)
    assert editor.family.name == "flux2-dev"
    t = editor.tokenize(SOURCE, max_sequence_length=48)
    texts = editor.family.token_texts(t)
    assert t.length == 48 and t.lead == 7 and len(t.ids) == 41 and t.true_length is None  # no mask: all attended
    assert texts[:7] == [""] * 7 and texts[7:10] == ["<s>", "[SYSTEM_PROMPT]", "You"]
    end = texts.index("[/SYSTEM_PROMPT]")
    assert "".join(texts[9:end]) == "".join(pipe.system_message.split())  # the whole system message, kept
    assert (end, texts[37], texts[47]) == (36, "[INST]", "[/INST]")
    assert t.word_tokens == [[38], [39], [40], [41], [42, 43, 44, 45, 46]]  # lasagne: la s ag n e
    # the pipeline's own tokens are ours, at the same positions: padding on the left, then the templated prompt
    (messages,) = format_input([SOURCE], system_message=pipe.system_message)
    own = pipe.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, padding="max_length",
                                             truncation=True, max_length=48)["input_ids"]
    assert own == [pipe.tokenizer.pad_token_id] * 7 + t.ids


def test_a_longer_edit_starts_earlier_and_its_words_take_the_source_s(pipe):
    run = p2p.Editor(pipe).prepare(SOURCE, [LONGER], seed=0, height=32, width=32, max_sequence_length=48)
    source, edit = run.tokens
    assert (source.lead, edit.lead) == (7, 5) and run.plan.key_mask is None
    # the edit (11 prompt tokens, 2 fewer padding): BOS at 5, [INST] at 35, then a 36, black 37, cat 38, riding 39,
    # a 40, red 41, lasagne 42-46, [/INST] 47; the source's: BOS at 7, a 38, cat 39, riding 40, a 41, lasagne 42-46
    assert edit.word_tokens[:3] == [[36], [37], [38]] and edit.word_tokens[-1] == [42, 43, 44, 45, 46]
    index, alpha = run.plan.refine_index[0], run.plan.alpha[0]
    assert [index[j].item() for j in (5, 35, 36, 38, 39, 47)] == [7, 37, 38, 39, 40, 47]  # BOS [INST] a cat riding
    assert index[42:47].tolist() == [42, 43, 44, 45, 46] and alpha[[37, 41]].tolist() == [0, 0]  # black, red: new
    assert index[:5].tolist() == [0, 1, 2, 3, 4] and alpha[:5].tolist() == [1] * 5  # padding: the same positions


def test_a_tokenizer_that_pads_on_the_right_puts_the_text_first(pipe):
    pipe.tokenizer.padding_side = "right"
    try:
        editor = p2p.Editor(pipe)
        assert editor.tokenize(SOURCE, max_sequence_length=48).lead == 0
        result = editor.edit(SOURCE, [p2p.Edit(LONGER, cross_steps=0.0, self_steps=0.0)], **OPTIONS)
        for row, prompt in enumerate((SOURCE, LONGER)):
            latents = torch.randn((1, *editor.family.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
            own = pipe(prompt=prompt, latents=latents.to(pipe.device), num_inference_steps=3, height=32, width=32,
                       max_sequence_length=48, output_type="latent").images
            assert rel_err(result.images[row], own[0]) <= tolerance()
    finally:
        pipe.tokenizer.padding_side = "left"


def test_refusals_name_what_the_pipeline_would_change(pipe):
    editor = p2p.Editor(pipe)
    options = dict(seed=0, height=32, width=32, max_sequence_length=48)
    with pytest.raises(ValueError, match="is 41 tokens long in its template, more than the model's 40"):
        editor.prepare(SOURCE, [], **{**options, "max_sequence_length": 40})
    with pytest.raises(ValueError, match=r"holds \[IMG\], which FLUX.2 dev's pipeline deletes"):
        editor.prepare("a cat [IMG] riding", [], **options)
    with pytest.raises(ValueError, match="caption_upsample_temperature rewrites the prompt"):
        editor.prepare(SOURCE, [], caption_upsample_temperature=0.15, **options)
    with pytest.raises(ValueError, match="reference images"):
        editor.prepare(SOURCE, [], image=[np.zeros((32, 32, 3))], **options)
    with pytest.raises(ValueError, match="FLUX.2 dev pipelines take no negative prompt"):
        editor.prepare(SOURCE, [], negative_prompt="blurry", **options)


def test_guidance_is_embedded_one_pass_a_step_every_row_conditional(pipe):
    editor = p2p.Editor(pipe)
    assert not editor.family.split_passes({"guidance_scale": 4.0})
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist())),
        with_kwargs=True)
    try:
        on = editor.edit(SOURCE, [LONGER], **{**OPTIONS, "guidance_scale": 4.0}).images
    finally:
        hook.remove()
    assert calls == [(2, [4.0, 4.0])] * 3  # source and edit, one call a step
    off = editor.edit(SOURCE, [LONGER], **{**OPTIONS, "guidance_scale": 1.0}).images
    assert rel_err(on, off) > 10 * tolerance()


def test_latents_go_in_patchified_and_come_out_packed(pipe):
    family = p2p.Editor(pipe).family
    channels, h, w = family.latent_shape(32, 32)
    assert (channels, h, w) == (pipe.transformer.config.in_channels, 8, 8)
    x = torch.randn(2, channels, h, w)
    assert torch.equal(family.call_latents(x), x)
    out = family.output_latents(x)  # the pipeline's (B, h * w, C) tokens, row-major
    assert out.shape == (2, h * w, channels) and torch.equal(out[:, 1 * w + 3], x[:, :, 1, 3])


def test_direct_inversion_reconstructs_the_image_s_latent_and_the_edit_runs_free(pipe):
    check_direct_and_euler(pipe, blocky_image(), SOURCE, LONGER, num_inference_steps=4, max_sequence_length=48,
                           height=32, width=32)
