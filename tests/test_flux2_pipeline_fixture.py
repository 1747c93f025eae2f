"""The tiny FLUX.2 fixtures (`flux2_pipelines`): their tokenizers, the text each pipeline encodes, and their
generations."""

import inspect
import itertools

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from diffusers.utils.torch_utils import randn_tensor
from flux2_pipelines import (
    DEV_LAYERS,
    KLEIN_LAYERS,
    mistral_tokenizer,
    prompt_span,
    qwen3_tokenizer,
    templated_text,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
)
from qwen_pipelines import qwen_tokenizer

BUILDERS = {"dev": tiny_flux2_pipeline, "klein": tiny_flux2_klein_pipeline}


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, build in BUILDERS.items()}


def _generate(pipe, prompt="a red cat", seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("max_sequence_length", 64)
    return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def _encoder_inputs(pipe, prompt, max_sequence_length):
    """The `input_ids` and `attention_mask` the pipeline hands its text encoder, and the prompt embedding."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = pipe.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        embeds, text_ids = pipe.encode_prompt(prompt, max_sequence_length=max_sequence_length)
    finally:
        handle.remove()
    return seen["input_ids"][0], seen["attention_mask"][0], embeds, text_ids


@pytest.mark.parametrize(("make", "word"), itertools.product([mistral_tokenizer, qwen3_tokenizer],
                                                              ["lasagne", "bicycle", "croutons"]))
def test_a_left_out_word_is_several_tokens_whose_offsets_cover_it(make, word):
    tokenizer = make()
    prompt = f"a red cat eating {word}"
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    start = prompt.index(word)
    pieces = [(a, b) for a, b in encoding["offset_mapping"] if a >= start and b > a]
    assert len(pieces) >= 2
    assert pieces[0][0] == start and pieces[-1][1] == len(prompt)  # from the word's first letter, not its space
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(pieces))  # contiguous
    assert tokenizer.decode(encoding["input_ids"]) == prompt
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red cat", add_special_tokens=False).input_ids) == [
        "a", "Ġred", "Ġcat"]


def test_qwen3_tokenizer_leaves_the_shared_qwen_tokenizer_alone():
    assert len(qwen3_tokenizer()) == len(qwen_tokenizer()) + 2  # <think>, </think>
    assert "<think>" not in qwen_tokenizer().get_vocab()


def test_dev_encodes_the_system_message_and_the_prompt_left_padded(pipes):
    pipe = pipes["dev"]
    tokenizer = pipe.tokenizer
    assert templated_text(pipe) == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{{}}[/INST]"
    ids, mask, embeds, text_ids = _encoder_inputs(pipe, "a red cat", 64)
    kept = int(mask.sum())
    assert ids.shape == (64,) and mask.tolist() == [0] * (64 - kept) + [1] * kept  # padded on the left, masked
    assert (ids[:64 - kept] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(ids[64 - kept:]) == templated_text(pipe).format("a red cat")  # nothing dropped
    span = prompt_span(pipe, "a red cat", 64)
    assert tokenizer.convert_ids_to_tokens(ids[span]) == ["a", "Ġred", "Ġcat"]
    assert (span.start, span.stop) == (60, 63) and tokenizer.convert_ids_to_tokens(ids[63:]) == ["[/INST]"]
    assert kept == 31 + 3 + 1  # the system prefix, the prompt, [/INST]
    # The embedding: all 64 positions (no mask), layers 10, 20 and 30 side by side for each token.
    hidden = pipe.text_encoder(input_ids=ids[None], attention_mask=mask[None], output_hidden_states=True).hidden_states
    assert len(hidden) == DEV_LAYERS[-1] + 2  # the embeddings, 31 layers (the last one normed)
    torch.testing.assert_close(embeds[0], torch.cat([hidden[k][0] for k in DEV_LAYERS], dim=-1))
    assert embeds.shape == (1, 64, 48) and text_ids[0, :, 3].tolist() == list(range(64))
    assert (text_ids[0, :, :3] == 0).all()  # text positions (0, 0, 0, l), l counting the padding too
    # At 32 tokens the system prefix (31) leaves room for the prompt's first token alone.
    assert tokenizer.convert_ids_to_tokens(_encoder_inputs(pipe, "a red cat", 32)[0][prompt_span(
        pipe, "a red cat", 32)]) == ["a"]
    torch.testing.assert_close(_encoder_inputs(pipe, "a blue dog", 32)[2], _encoder_inputs(pipe, "a red cat", 32)[2])


def test_klein_encodes_the_user_turn_and_an_empty_thought_right_padded(pipes):
    pipe = pipes["klein"]
    tokenizer = pipe.tokenizer
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert templated_text(pipe) == template
    ids, mask, embeds, text_ids = _encoder_inputs(pipe, "a red cat", 32)
    kept = int(mask.sum())
    assert mask.tolist() == [1] * kept + [0] * (32 - kept)  # padded on the right, masked
    assert (ids[kept:] == tokenizer.pad_token_id).all() and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.decode(ids[:kept]) == template.format("a red cat")
    span = prompt_span(pipe, "a red cat", 32)
    # "user" is two pieces here ("u", "ser"; one token in Qwen's own), so the prompt starts at 4, not 3.
    assert (span.start, span.stop) == (4, 7)
    assert tokenizer.convert_ids_to_tokens(ids[:span.stop]) == ["<|im_start|>", "u", "ser", "Ċ", "a", "Ġred", "Ġcat"]
    assert tokenizer.convert_ids_to_tokens(ids[kept - 4:kept]) == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    hidden = pipe.text_encoder(input_ids=ids[None], attention_mask=mask[None], output_hidden_states=True).hidden_states
    assert len(hidden) == KLEIN_LAYERS[-1] + 2
    torch.testing.assert_close(embeds[0], torch.cat([hidden[k][0] for k in KLEIN_LAYERS], dim=-1))
    assert embeds.shape == (1, 32, 48) and text_ids[0, :, 3].tolist() == list(range(32))


@pytest.mark.parametrize("name", BUILDERS)
def test_generation_is_seeded_and_finite(pipes, name):
    pipe = pipes[name]
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(image, _generate(pipe))
    assert np.array_equal(image, _generate(BUILDERS[name]()))  # the build is seeded too
    assert not np.array_equal(image, _generate(pipe, seed=1))
    assert not np.array_equal(image, _generate(BUILDERS[name](seed=1)))
    assert not np.array_equal(image, _generate(pipe, "a blue dog riding a bicycle"))
    # The plain call at max_sequence_length 32 (dev keeps only the prompt's first token).
    assert np.isfinite(_generate(pipe, max_sequence_length=32)).all()
    with pytest.raises(ValueError, match="Provide either `prompt`"):  # the first positional parameter is `image`
        pipe("a red cat", height=32, width=32, num_inference_steps=2)


def test_latents_in_and_out(pipes):
    """`latents=` takes the noise patchified but not packed: (B, 4 x latent channels, H / 16, W / 16) here at
    factor 2, (B, 128, H / 16, W / 16) at the real factor 8. `output_type="latent"` differs: dev returns the
    packed tokens as the transformer sees them (B, tokens, 4 x channels), still batch-normed; klein unpacks,
    de-normalises and unpatchifies them into the VAE's own latents (B, channels, H / 2, W / 2), ready to decode."""
    noise = randn_tensor((1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    for name, shape in (("dev", (1, 64, 16)), ("klein", (1, 4, 16, 16))):
        pipe = pipes[name]
        out = _generate(pipe, output_type="latent")
        assert out.shape == shape
        torch.testing.assert_close(_generate(pipe, output_type="latent", latents=noise), out, rtol=0, atol=0)
    dev = pipes["dev"]
    packed = _generate(dev, output_type="latent")
    grid = packed.transpose(1, 2).reshape(1, 16, 8, 8)  # tokens are row-major over the 8x8 grid
    torch.testing.assert_close(dev._unpack_latents_with_ids(packed, dev._prepare_latent_ids(grid)), grid)


def test_guidance_dev_embeds_it_klein_runs_a_negative_pass(pipes):
    calls = []

    def grab(module, args, kwargs):
        calls.append((kwargs["guidance"], kwargs["encoder_hidden_states"].shape))

    def transformer_calls(pipe, **kwargs):
        calls.clear()
        handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            _generate(pipe, max_sequence_length=32, **kwargs)
        finally:
            handle.remove()
        return list(calls)

    dev = transformer_calls(pipes["dev"], guidance_scale=2.5)
    assert len(dev) == 2 and all(g.tolist() == [2.5] for g, _ in dev)  # one call a step, the scale embedded
    assert pipes["dev"].transformer.config.guidance_embeds
    assert len(transformer_calls(pipes["klein"], guidance_scale=1.0)) == 2
    guided = transformer_calls(pipes["klein"], guidance_scale=4.0)
    assert len(guided) == 4 and all(g is None for g, _ in guided)  # prompt, then "" on its own call, each step
    distilled = tiny_flux2_klein_pipeline(distilled=True)
    assert distilled.config.is_distilled and len(transformer_calls(distilled, guidance_scale=4.0)) == 2


def test_attention_processors_and_what_they_receive(pipes):
    transformer = pipes["dev"].transformer
    kinds = {name.split(".")[0]: type(p).__name__ for name, p in transformer.attn_processors.items()}
    assert kinds == {"transformer_blocks": "Flux2AttnProcessor",
                     "single_transformer_blocks": "Flux2ParallelSelfAttnProcessor"}
    double = transformer.transformer_blocks[0].attn.processor
    single = transformer.single_transformer_blocks[0].attn.processor
    assert list(inspect.signature(double.__call__).parameters) == [
        "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"]
    # The single-stream processor gets the joint [text; image] sequence and no text length.
    assert list(inspect.signature(single.__call__).parameters) == [
        "attn", "hidden_states", "attention_mask", "image_rotary_emb"]
