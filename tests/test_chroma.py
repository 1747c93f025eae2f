"""Chroma's masked padding: each prompt attends to its T5 pieces, EOS and one padding token, nothing after, in
every row and both paths; the Editor applies diffusers' float 0/1 mask as the mask it means."""

import pytest
import torch
from conftest import on_device, rel_err
from diffusers import FluxPipeline
from mmdit_pipelines import tiny_chroma_pipeline

import prompt2prompt as p2p
from prompt2prompt.families.chroma import key_mask, masked_processors

SOURCE = "a cat riding a bicycle"
OPTIONS = dict(num_inference_steps=3, seed=0, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_chroma_pipeline())


def test_true_length_is_the_pieces_the_eos_and_one_padding_token(pipe):
    tokens = p2p.Editor(pipe).tokenize(SOURCE, max_sequence_length=16)
    (part,) = tokens.parts
    assert len(part.tokenized.ids) == 7 and part.tokenized.true_length == 8  # ▁a ▁cat ▁riding ▁a ▁bi cycle </s> + 1
    assert tokens.length == 16


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_masked_keys_get_no_probability_in_any_row(pipe, attention):
    edits = [p2p.Edit("a lasagne riding a bicycle"), p2p.Edit("a black cat riding a red bicycle")]
    result = p2p.Editor(pipe, attention=attention).edit(SOURCE, edits, record_attention=True, **OPTIONS)
    (maps,) = result.attention.values()  # (P, h, w, L)
    editor = p2p.Editor(pipe)
    for row, prompt in enumerate([SOURCE, *(e.prompt for e in edits)]):
        n = editor.tokenize(prompt, max_sequence_length=16).parts[0].tokenized.true_length
        assert maps[row, ..., n:].abs().max() == 0, prompt  # the masked padding
        assert maps[row, ..., :n].sum(-1).min() > 0  # and the text it does attend


def test_plain_generation_under_the_editor_is_the_masked_model_not_the_float_mask(pipe):
    shape = (1, 4, 16, 16)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.device)
    packed = FluxPipeline._pack_latents(latents, *shape)
    call = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, output_type="latent",
                guidance_scale=3.0)
    diffusers_own = pipe(SOURCE, latents=packed, **call).images
    saved = pipe.transformer.attn_processors
    masked_processors(pipe)
    try:
        masked = pipe(SOURCE, latents=packed, **call).images
    finally:
        pipe.transformer.set_attn_processor(saved)
    editor = p2p.Editor(pipe).edit(SOURCE, [], output_type="latent", **OPTIONS, guidance_scale=3.0).images
    assert rel_err(editor[0], masked[0]) <= 1e-5
    # diffusers' float mask adds 0 or 1 to the scores instead of masking (diffusers #13619): another image
    assert rel_err(diffusers_own[0], masked[0]) > 1e-3


def test_the_key_mask_reads_a_block_s_product_mask():
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # text: 2 kept, 1 masked; then one image token
    product = m[:, None, None, :] * m[:, None, :, None]  # (1, 1, 4, 4), as a Chroma block hands it over
    out = key_mask(product, torch.float32)
    assert out.shape == (1, 1, 1, 4) and out[0, 0, 0].tolist() == [0.0, 0.0, float("-inf"), 0.0]
    assert key_mask(None, torch.float32) is None
