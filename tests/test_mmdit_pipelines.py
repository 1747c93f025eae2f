import pytest
import torch
from mmdit_pipelines import t5_tokenizer, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd35_pipeline


def _generate(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat riding a bicycle", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=generator, **kwargs).images


@pytest.mark.parametrize("build", [
    tiny_sd3_pipeline,
    lambda: tiny_sd3_pipeline(t5=False),
    tiny_sd35_pipeline,
    tiny_flux_pipeline,
    lambda: tiny_flux_pipeline(guidance_embeds=True),
], ids=["sd3", "sd3-no-t5", "sd35", "flux", "flux-guidance"])
def test_tiny_pipeline_generates_a_finite_image(build):
    image = _generate(build(), max_sequence_length=32)
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()
    assert image.std() > 0.01  # not a flat image


def test_tiny_pipelines_are_deterministic_and_depend_on_the_prompt():
    pipe = tiny_flux_pipeline()
    a, b = _generate(pipe), _generate(pipe)
    assert torch.equal(a, b)
    other = pipe("a dog riding a bicycle", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(a, other)


def test_sd35_has_dual_attention_and_qk_norm():
    blocks = tiny_sd35_pipeline().transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[-1].attn2 is None
    assert blocks[0].attn.norm_q is not None
    assert tiny_sd3_pipeline().transformer.transformer_blocks[0].attn.norm_q is None


def test_t5_tokenizer_splits_words_into_pieces():
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    pieces = {word: tokenizer.tokenize(word) for word in ("bicycle", "lasagne", "croutons", "cat")}
    assert pieces == {"bicycle": ["▁bi", "cycle"], "lasagne": ["▁las", "agne"], "croutons": ["▁cr", "out", "ons"],
                      "cat": ["▁cat"]}
    assert tokenizer("a cat").input_ids[-1] == 1


def test_t5_tokenizer_has_no_unknown_ascii():
    text = "".join(chr(c) for c in range(33, 127)) + " Zebra 42 x-ray, (CAT)!"
    tokenizer = t5_tokenizer()
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids


def test_t5_offsets_cover_each_word_without_the_space():
    prompt = "a cat riding a bicycle"
    encoding = t5_tokenizer()(prompt, return_offsets_mapping=True)
    assert encoding.input_ids[-1] == 1
    spans = [prompt[start:end] for start, end in encoding.offset_mapping[:-1]]
    assert spans == ["a", "cat", "riding", "a", "bi", "cycle"]
    assert encoding.offset_mapping == [(0, 1), (2, 5), (6, 12), (13, 14), (15, 17), (17, 22), (0, 0)]
