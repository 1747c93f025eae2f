"""Qwen-Image: the templated text worked by hand on the tiny pipeline's byte-level BPE, the run's one text length,
masked padding in every row, and true classifier-free guidance.

The tokenizer (tests/qwen_pipelines.py) reads the template's opening in 67 tokens (not the real model's 34), and
"bicycle" as four pieces (Ġb ic y cle). The kept text of "a red cat" is
    a Ġred Ġcat | <|im_end|> Ċ <|im_start|> a ss ist ant Ċ     (positions 0..10; the suffix belongs to no word)
"""

import pytest
import torch
from conftest import on_device, rel_err, tolerance
from qwen_pipelines import template_prefix_tokens, tiny_qwenimage_pipeline

import prompt2prompt as p2p
from prompt2prompt.families.qwenimage import key_mask

SOURCE = "a red cat riding a bicycle"
OPTIONS = dict(num_inference_steps=3, seed=0, height=32, width=32, output_type="latent")
SUFFIX = ["<|im_end|>", "", "<|im_start|>", "a", "ss", "ist", "ant", ""]  # the template after the prompt


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_qwenimage_pipeline())


def test_words_are_found_by_character_offsets_in_the_kept_text(pipe):
    editor = p2p.Editor(pipe)
    t = editor.tokenize(SOURCE)
    assert pipe.prompt_template_encode_start_idx == template_prefix_tokens(pipe) == 67
    assert t.words == ["a", "red", "cat", "riding", "a", "bicycle"]
    assert t.word_tokens == [[0], [1], [2], [3], [4], [5, 6, 7, 8]]  # bicycle: Ġb ic y cle
    assert (t.true_length, t.length) == (9 + len(SUFFIX), 9 + len(SUFFIX))
    assert editor.family.token_texts(t) == ["a", "red", "cat", "riding", "a", "b", "ic", "y", "cle", *SUFFIX]


def test_a_drop_shorter_than_the_template_prefix_keeps_template_tokens_in_no_word():
    pipe = on_device(tiny_qwenimage_pipeline(drop=65))  # the kept text starts with the prefix's last two tokens
    editor = p2p.Editor(pipe)
    t = editor.tokenize("a red cat")
    assert editor.family.token_texts(t)[:5] == ["ser", "", "a", "red", "cat"]
    assert t.word_tokens == [[2], [3], [4]] and t.true_length == 2 + 3 + len(SUFFIX)
    # and the source row is the pipeline's own generation, which drops the same tokens
    result = editor.edit("a red cat", ["a blue cat"], **OPTIONS, guidance_scale=1.0)
    shape = (1, *editor.family.latent_shape(32, 32))
    latents = editor.family.pack(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.device))
    own = pipe("a red cat", latents=latents, num_inference_steps=3, height=32, width=32, true_cfg_scale=1.0,
               output_type="latent").images
    assert rel_err(result.images[0], own[0]) <= tolerance()


def test_a_drop_that_cuts_into_the_prompt_is_refused_before_any_model_call():
    pipe = on_device(tiny_qwenimage_pipeline(drop=69))  # would drop "a" and "Ġred" of "a red cat"
    with pytest.raises(ValueError, match="drops the first 69 tokens of its template, which take part of the prompt"):
        p2p.Editor(pipe).prepare("a red cat", ["a blue cat"], seed=0, height=32, width=32)


def test_a_run_pads_every_prompt_to_its_longest_and_the_pipeline_encodes_the_same_tokens(pipe):
    editor = p2p.Editor(pipe)
    edits = ["a cat", "a red cat riding a lasagne on a bicycle"]
    run = editor.prepare(SOURCE, edits, seed=0, height=32, width=32)
    true = [t.true_length for t in run.tokens]
    assert true[2] > true[0] > true[1] and {t.length for t in run.tokens} == {true[2]} == {run.text_length}
    text = editor.family.call_text(list(run.prompts), None, run.text_length, None, pipe.device)
    assert text["prompt_embeds"].shape[1] == run.text_length
    assert text["prompt_embeds_mask"].sum(1).tolist() == true  # the pipeline keeps as many tokens as we count
    for row, prompt in enumerate(run.prompts):  # each row is that prompt's own encoding, then zeros
        alone, _ = pipe.encode_prompt(prompt, device=pipe.device)
        assert rel_err(text["prompt_embeds"][row, : true[row]], alone[0]) <= 1e-5
        assert not text["prompt_embeds"][row, true[row]:].any()


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_masked_keys_get_no_probability_in_any_row(pipe, attention, guidance):
    edits = [p2p.Edit("a red lasagne riding a bicycle"), p2p.Edit("a cat")]
    result = p2p.Editor(pipe, attention=attention).edit(SOURCE, edits, record_attention=True, **OPTIONS,
                                                        guidance_scale=guidance)
    (maps,) = result.attention.values()  # (P, h, w, L): L is the longest prompt's true length
    editor = p2p.Editor(pipe)
    for row, prompt in enumerate([SOURCE, *(e.prompt for e in edits)]):
        n = editor.tokenize(prompt).true_length
        assert maps.shape[-1] == editor.tokenize(edits[0].prompt).true_length
        if n < maps.shape[-1]:
            assert maps[row, ..., n:].abs().max() == 0, prompt  # its padding
        assert maps[row, ..., :n].sum(-1).min() > 0  # and the text it does attend


def test_an_edit_that_fills_the_run_s_text_fused_equals_explicit_and_a_cache_serves_it(pipe):
    # The run's text is the edit's length: the source has masked padding keys, the edit none. A word swap's fused
    # rows run on the source's queries and keys with the source's key mask; the cache was made at the source's own
    # shorter length and is re-edited at the longer one.
    source, edit = "a cat riding a bicycle", p2p.Edit("a lasagne riding a bicycle", cross_steps=0.5)
    options = dict(OPTIONS, guidance_scale=4.0)
    fused, explicit = (p2p.Editor(pipe, attention=attention).edit(source, [edit], **options)
                       for attention in ("fused", "explicit"))
    effect = rel_err(explicit.images[1], explicit.images[0])
    assert rel_err(fused.images, explicit.images) <= tolerance() and effect > 10 * tolerance()
    cached_options = {k: v for k, v in options.items() if k not in ("seed", "output_type")}
    cache = p2p.Editor(pipe).cache_source(source, seed=0, **cached_options)
    cached = p2p.Editor(pipe).edit(source, [edit], cache=cache, **{k: v for k, v in options.items() if k != "seed"})
    assert rel_err(cached.images, explicit.images) <= tolerance()


def test_guidance_is_true_cfg_and_its_pipeline_keyword_is_refused(pipe):
    editor = p2p.Editor(pipe)
    with pytest.raises(ValueError, match="true_cfg_scale is the editor's guidance_scale on Qwen-Image"):
        editor.prepare(SOURCE, [], seed=0, height=32, width=32, true_cfg_scale=4.0)
    with pytest.raises(ValueError, match="set by the editor"):
        editor.prepare(SOURCE, [], seed=0, height=32, width=32, prompt_embeds_mask=None)
    on, off = (editor.edit(SOURCE, [], **OPTIONS, guidance_scale=g).images for g in (4.0, 1.0))
    assert rel_err(on, off) > 10 * tolerance()  # the negative pass ran
    negative = editor.edit(SOURCE, [], **OPTIONS, guidance_scale=4.0, negative_prompt="a dog").images
    assert rel_err(negative, on) > 10 * tolerance()  # and took the negative prompt given


def test_the_key_mask_masks_text_padding_and_no_image_token():
    mask = key_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]), 2, torch.float32)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [0, 0, float("-inf"), 0, 0] and mask[1].abs().max() == 0
    assert key_mask(None, 2, torch.float32) is None


def test_an_image_s_latent_is_its_one_frame_vae_mean_as_the_pipeline_decodes_it(pipe):
    family = p2p.Editor(pipe).family
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(pipe.device) * 2 - 1
    latents = family.encode_pixels(pixels)
    assert latents.shape == (1, *family.latent_shape(32, 32))
    vae = pipe.vae
    with torch.no_grad():
        mean = vae.encode(pixels[:, :, None]).latent_dist.mean  # (1, C, 1, h, w): a one-frame video
    # QwenImagePipeline decodes z / (1 / std) + mean: that must give the VAE's own posterior mean back
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    shift = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    torch.testing.assert_close(latents[:, :, None] / (1.0 / std) + shift, mean, rtol=1e-5, atol=1e-6)


def test_one_step_is_refused_before_it_renders_nan(pipe):
    # Qwen-Image's scheduler stretches its sigmas to shift_terminal: at one step that is 0 / 0
    assert pipe.scheduler.config.shift_terminal
    with pytest.raises(ValueError, match="shift_terminal=0.02, which one step cannot"):
        p2p.Editor(pipe).prepare(SOURCE, [], seed=0, height=32, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="which one step cannot"):
        p2p.invert(pipe, torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), SOURCE, num_inference_steps=1,
                   progress=False)
    assert p2p.Editor(pipe).prepare(SOURCE, [], seed=0, height=32, width=32, num_inference_steps=2)


def test_whitespace_tokens_belong_to_no_word_and_must_pair_up(pipe):
    editor = p2p.Editor(pipe)
    t = editor.tokenize("a  cat")  # byte-level BPE keeps the second space as a token of its own: Ġ
    assert editor.family.token_texts(t)[:3] == ["a", "", "cat"] and t.word_tokens == [[0], [2]]
    for source, edit, where in [("a cat riding", "a  dog riding", "after 'a'"),  # in front of the changed word
                                ("a  cat riding", "a cat running", "after 'a'")]:  # among unchanged words
        with pytest.raises(ValueError, match=f"do not line up {where}: one has a token of no word there"):
            editor.prepare(source, [edit], seed=0, height=32, width=32)
    # with the same whitespace on both sides they pair up, and the swap maps cat to dog across it
    run = editor.prepare("a  cat riding", ["a  dog riding"], seed=0, height=32, width=32)
    assert run.plan.mapper[0, 2, 2] == 1 and run.plan.mapper[0, 1, 1] == 1
