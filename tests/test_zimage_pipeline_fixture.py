"""The tiny Z-Image fixture (`zimage_pipelines`), and the facts of diffusers' `ZImagePipeline` that Prompt-to-Prompt
relies on (docs/zimage-notes.md): the text path, the joint sequence, its positions, the processors, CFG and time."""

import contextlib
import itertools

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from qwen_pipelines import qwen_tokenizer
from zimage_pipelines import (
    ZIMAGE_TURBO,
    image_positions_after,
    wrapped_patchify,
    caption_length,
    chat_prompt,
    padded_length,
    tiny_zimage_pipeline,
    zimage_tokenizer,
)

LONG = "a red cat " + " ".join(["and a blue dog"] * 6)  # 39 caption tokens: padded to 64


@pytest.fixture(scope="module")
def pipe():
    return tiny_zimage_pipeline()


def _generate(pipe, prompt="a red cat", seed=0, **kwargs):
    kwargs.setdefault("guidance_scale", 0.0)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


@contextlib.contextmanager
def _transformer_calls(pipe):
    """Each transformer call's (timesteps, caption lengths, outputs), in order."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[1].tolist(), [len(c) for c in args[2]], [o.clone() for o in output[0]]))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def _patchified(pipe):
    """Each call's `patchify_and_embed` result: (images, captions, sizes, image pos ids, caption pos ids, pad masks)."""
    results = []

    def wrap(original):
        def spy(*args, **kwargs):
            results.append(original(*args, **kwargs))
            return results[-1]
        return spy

    with wrapped_patchify(pipe.transformer, wrap):
        yield results


class _Recorder(ZSingleStreamAttnProcessor):
    """Z-Image's own processor, recording what each module's call is given."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        self.log.append((self.name, hidden_states, attention_mask, freqs_cis))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)


def _attention_modules(transformer) -> dict[str, Attention]:
    return {name: m for name, m in transformer.named_modules() if isinstance(m, Attention)}


def _rope(transformer, positions) -> torch.Tensor:
    return transformer.rope_embedder(torch.tensor(positions, dtype=torch.int32))


# The tokenizer and the text path.

@pytest.mark.parametrize("word", ["lasagne", "bicycle"])
def test_a_left_out_word_is_several_tokens_whose_offsets_cover_it(word):
    tokenizer = zimage_tokenizer()
    prompt = f"a cat riding a {word}"
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(word)
    pieces = [(a, b) for a, b in encoding["offset_mapping"] if a >= start]
    assert len(pieces) >= 2 and pieces[0][0] == start and pieces[-1][1] == len(prompt)
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(pieces))
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red cat")["input_ids"]) == ["a", "Ġred", "Ġcat"]


def test_chat_template_has_qwen3s_structure():
    tokenizer = zimage_tokenizer()
    assert chat_prompt(tokenizer, "a red cat") == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    no_thinking = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tokenizer("<think></think><|im_start|><|im_end|>")["input_ids"]
    assert len(ids) == 4 and tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"
    assert len(qwen_tokenizer()) == len(tokenizer) - 2 and qwen_tokenizer().chat_template is None  # a copy


def test_caption_is_the_whole_template_from_the_next_to_last_layer(pipe):
    (embeds,), negative = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
    ids = pipe.tokenizer(chat_prompt(pipe.tokenizer, "a red cat"), return_tensors="pt").input_ids
    assert negative == [] and embeds.shape == (ids.shape[1], 32) == (caption_length(pipe, "a red cat"), 32) == (15, 32)
    outputs = []
    handle = pipe.text_encoder.layers[0].register_forward_hook(lambda m, a, o: outputs.append(o))
    try:
        pipe.text_encoder(input_ids=ids)
    finally:
        handle.remove()
    first_layer = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    torch.testing.assert_close(embeds, first_layer[0])  # hidden_states[-2] of two layers: the first one's output


def test_encode_prompt_overwrites_the_callers_prompt_list(pipe):
    prompts, negatives = ["a red cat", "a dog"], ["", "blurry"]
    pipe.encode_prompt(prompts, negative_prompt=negatives)
    assert prompts == [chat_prompt(pipe.tokenizer, "a red cat"), chat_prompt(pipe.tokenizer, "a dog")]
    assert negatives[1] == chat_prompt(pipe.tokenizer, "blurry")
    (again, _), _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)  # the same list, once more
    assert len(again) == caption_length(pipe, chat_prompt(pipe.tokenizer, "a red cat")) == 15 + 12  # templated twice


# Generation, CFG and time.

def test_generation_is_seeded_and_finite(pipe):
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(image, _generate(pipe))
    assert np.array_equal(image, _generate(tiny_zimage_pipeline()))
    assert not np.array_equal(image, _generate(pipe, seed=1))
    assert not np.array_equal(image, _generate(tiny_zimage_pipeline(seed=1)))


def test_guidance_above_zero_runs_cfg_with_conditional_rows_first(pipe):
    with _transformer_calls(pipe) as calls:
        plain = _generate(pipe)
        guided = _generate(pipe, guidance_scale=3.0)
        pair = _generate(pipe, ["a red cat", LONG], negative_prompt=["", "a dog"], guidance_scale=3.0)
    assert np.isfinite(guided).all() and not np.allclose(plain, guided, atol=1e-3)
    assert [c[1] for c in calls] == [[15]] * 2 + [[15, 12]] * 2 + [[15, 39, 12, 14]] * 2  # [cond..., uncond...]
    np.testing.assert_allclose(pair[0], guided[0], atol=1e-5)  # a padded, masked batch row is the lone prompt
    with _transformer_calls(pipe) as calls:
        _generate(pipe, guidance_scale=1.0)
    assert len(calls[0][1]) == 2  # 1.0 still guides: only 0 turns CFG off


def _one_step(pipe, **kwargs):
    """A single step from sigma 1 to 0, from fixed latents: the result is latents + the guided model output."""
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with _transformer_calls(pipe) as calls:
        result = pipe("a red cat", height=32, width=32, num_inference_steps=1, latents=latents.clone(),
                      output_type="latent", **kwargs).images
    outputs = [o.squeeze(1) for o in calls[0][2]]
    return latents, result, calls[0][0], outputs


def test_time_runs_from_zero_and_the_model_output_is_negated(pipe):
    latents, result, t, (out,) = _one_step(pipe, guidance_scale=0.0)
    assert t == [0.0]  # (1000 - t) / 1000 at sigma 1
    assert result.dtype == torch.float32 and result.shape == latents.shape  # latents as they are: not decoded
    torch.testing.assert_close(result[0], latents[0] + out)  # Euler: x + (0 - 1) * (-out)
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([1000, 900, 750, 500], abs=1e-3)  # shift 3, static


def test_cfg_is_cond_plus_scale_times_the_difference_and_normalisation_caps_the_norm(pipe):
    latents, result, t, (pos, neg) = _one_step(pipe, guidance_scale=2.0)
    torch.testing.assert_close(result[0], latents[0] + pos + 2.0 * (pos - neg))
    latents, result, _, (pos, _) = _one_step(pipe, guidance_scale=2.0, cfg_normalization=True)
    assert torch.linalg.vector_norm(result[0] - latents[0]) <= torch.linalg.vector_norm(pos) * (1 + 1e-5)


def test_cfg_truncation_drops_the_unconditional_rows_late_in_the_run(pipe):
    with _transformer_calls(pipe) as calls:
        pipe("a red cat", height=32, width=32, num_inference_steps=4, guidance_scale=2.0, cfg_truncation=0.2,
             output_type="latent")
    assert [len(c[0]) for c in calls] == [2, 2, 1, 1]  # t_norm 0, 0.1 <= 0.2 < 0.25, 0.5
    assert calls[2][1] == [15]


# The transformer's sequence and positions.

def test_captions_pad_to_32_and_move_the_image_positions(pipe):
    with _patchified(pipe) as results:
        _generate(pipe, ["a red cat", LONG])
    images, captions, _, image_pos, caption_pos, image_pads, caption_pads = results[0]
    assert [len(c) for c in captions] == [padded_length(15), padded_length(39)] == [32, 64]
    assert [int(p.sum()) for p in caption_pads] == [17, 25] and not any(p.any() for p in image_pads)
    assert caption_pos[0][:15, 0].tolist() == list(range(1, 16))
    assert [p[:, 0].unique().tolist() for p in image_pos] == [[33], [65]]  # after each caption's padded length
    assert image_pos[0][:, 1:].tolist() == [[h, w] for h in range(8) for w in range(8)]


def test_an_image_not_a_multiple_of_32_is_padded_too(pipe):
    with _patchified(pipe) as results:
        pipe("a red cat", height=24, width=24, num_inference_steps=1, guidance_scale=0.0, output_type="latent")
    images, _, _, image_pos, _, image_pads, _ = results[0]
    assert len(images[0]) == 64 and int(image_pads[0].sum()) == 64 - 36 and image_pos[0][36].tolist() == [0, 0, 0]


def test_joint_rows_are_image_then_caption_with_attended_pads_and_a_key_mask():
    pipe, log = tiny_zimage_pipeline(), []
    for name, module in _attention_modules(pipe.transformer).items():
        module.set_processor(_Recorder(name, log))
    image = _generate(pipe, ["a red cat", LONG], guidance_scale=3.0)
    assert np.allclose(image, _generate(tiny_zimage_pipeline(), ["a red cat", LONG], guidance_scale=3.0), atol=1e-6)
    calls = {name: (h.shape, m, f) for name, h, m, f in log[:6]}
    assert list(calls) == ["noise_refiner.0.attention", "noise_refiner.1.attention", "context_refiner.0.attention",
                           "context_refiner.1.attention", "layers.0.attention", "layers.1.attention"]
    shape, mask, _ = calls["noise_refiner.0.attention"]
    assert shape == (4, 64, 32) and mask is None  # image tokens only
    # Rows 1 and 3 (LONG and its unconditional "") share latents but not image positions (65 and 33): image-only
    # attention is blind to the common shift, so the second refiner block gets the same input.
    refined = next(h for name, h, _, _ in log if name == "noise_refiner.1.attention")
    torch.testing.assert_close(refined[1], refined[3], atol=1e-5, rtol=1e-5)
    shape, mask, freqs = calls["context_refiner.0.attention"]
    assert shape == (4, 64, 32) and mask.sum(-1).tolist() == [32, 64, 32, 32]  # captions only, pads attended
    torch.testing.assert_close(freqs[0, :32], _rope(pipe.transformer, [[1 + k, 0, 0] for k in range(32)]))
    shape, mask, freqs = calls["layers.0.attention"]
    assert shape == (4, 128, 32) and mask.dtype == torch.bool and mask.shape == (4, 128)
    assert mask.sum(-1).tolist() == [96, 128, 96, 96]  # 64 image tokens + the padded caption, each row
    image_rope = _rope(pipe.transformer, [[33, h, w] for h in range(8) for w in range(8)])
    torch.testing.assert_close(freqs[0, :64], image_rope)
    torch.testing.assert_close(freqs[0, 64:96], _rope(pipe.transformer, [[1 + k, 0, 0] for k in range(32)]))


def test_pad_tokens_are_the_learned_ones_and_the_context_refiner_ignores_time(pipe):
    inputs, outputs = [], []
    refiner = pipe.transformer.context_refiner
    handles = [refiner[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0])),
               refiner[-1].register_forward_hook(lambda m, a, o: outputs.append(o))]
    try:
        _generate(pipe)
    finally:
        for handle in handles:
            handle.remove()
    pad = pipe.transformer.cap_pad_token[0]
    assert torch.equal(inputs[0][0, 15:], pad.expand(17, -1)) and not torch.equal(inputs[0][0, 14], pad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)  # the same caption at both steps


def test_caption_embeddings_of_another_length_are_all_real_tokens(pipe):
    (embeds,), _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)

    def run(rows):
        with _patchified(pipe) as results:
            image = pipe(prompt_embeds=[rows], height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
        return image, results[0]

    plain, (_, _, _, image_pos, _, _, pads) = run(embeds)
    assert np.array_equal(plain, _generate(pipe)) and int(pads[0].sum()) == 17
    for rows, start in ((20, 33), (39, 65)):
        image, (_, _, _, image_pos, _, _, pads) = run(torch.cat([embeds, embeds.new_zeros(rows - 15, 32)]))
        assert int(image_pos[0][0, 0]) == start and int(pads[0].sum()) == padded_length(rows) - rows
        assert not np.allclose(image, plain, atol=1e-4)  # zero rows are captions, not the learned pad


# Attention processors.

def test_processors_are_per_module_and_must_name_freqs_cis():
    pipe = tiny_zimage_pipeline()
    transformer = pipe.transformer
    assert not hasattr(transformer, "attn_processors") and not hasattr(transformer, "set_attn_processor")
    modules = _attention_modules(transformer)
    assert len(modules) == 2 * ZIMAGE_TURBO["n_refiner_layers"] + 2
    assert all(type(m.processor) is ZSingleStreamAttnProcessor for m in modules.values())
    plain = _generate(pipe)

    class Generic(ZSingleStreamAttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):  # freqs_cis is filtered out by Attention.forward
            assert "freqs_cis" not in kwargs
            return super().__call__(attn, hidden_states, *args, **kwargs)

    for module in modules.values():
        module.set_processor(Generic())
    assert not np.allclose(_generate(pipe), plain, atol=1e-3)  # no RoPE at all


def test_a_run_can_give_every_row_the_image_positions_of_its_longest_caption(pipe):
    pair = _generate(pipe, ["a red cat", LONG])
    with image_positions_after(pipe.transformer, 64), _patchified(pipe) as results:
        moved = _generate(pipe, ["a red cat", LONG])
        alone = _generate(pipe, "a red cat")
    assert [p[:, 0].unique().tolist() for p in results[0][3]] == [[65]] * 2  # plainly 33 and 65
    np.testing.assert_allclose(moved[1], pair[1], atol=1e-5)  # the longest caption's row is as it was
    assert not np.allclose(moved[0], pair[0], atol=1e-4)  # the short one's image now sits 32 further from its text
    np.testing.assert_allclose(moved[0], alone[0], atol=1e-5)  # and a row is still its lone prompt
