"""The tiny Qwen-Image fixture (`qwen_pipelines`): its tokenizer, its template drop, and its generations."""

import itertools

import numpy as np
import pytest
import torch
from qwen_pipelines import (
    qwen_tokenizer,
    template_prefix_tokens,
    tiny_qwenimage_pipeline,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_pipeline()


def _generate(pipe, prompt="a red cat", seed=0, **kwargs):
    kwargs.setdefault("true_cfg_scale", 1.0)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


def _word_tokens(encoding, start: int, end: int) -> list[tuple[int, int]]:
    """The offsets of the tokens inside characters [start, end)."""
    return [(a, b) for a, b in encoding["offset_mapping"] if a >= start and b <= end and b > a]


@pytest.mark.parametrize("word", ["lasagne", "bicycle", "croutons"])
def test_a_left_out_word_is_several_tokens_whose_offsets_cover_it(word):
    tokenizer = qwen_tokenizer()
    prompt = f"a red cat eating {word}"
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(word)
    pieces = _word_tokens(encoding, start, len(prompt))
    assert len(pieces) >= 2
    assert pieces[0][0] == start and pieces[-1][1] == len(prompt)  # from the word's first letter, not its space
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(pieces))  # contiguous
    assert tokenizer.decode(encoding["input_ids"]) == prompt


def test_corpus_words_are_one_token_each_with_exact_offsets():
    tokenizer = qwen_tokenizer()
    encoding = tokenizer("a red cat", return_offsets_mapping=True)
    assert encoding["offset_mapping"] == [(0, 1), (2, 5), (6, 9)]
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"]) == ["a", "Ġred", "Ġcat"]


def test_tokenizer_pads_a_batch_on_the_right_as_the_pipeline_asks():
    tokenizer = qwen_tokenizer()
    batch = tokenizer(["a red cat", "a cat"], max_length=1024, padding=True, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 3)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.input_ids[1, 2] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.padding_side = "left"  # each call gives a new wrapper: this one's change stays here
    assert qwen_tokenizer().padding_side == "right"


def test_default_drop_is_exactly_the_template_prefix(pipe):
    tokenizer, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert drop == template_prefix_tokens(pipe) == len(tokenizer(prefix).input_ids)
    assert drop != 34  # not Qwen's own count: the fixture sets it
    ids = tokenizer(pipe.prompt_template_encode.format("a red cat")).input_ids
    assert ids[:drop] == tokenizer(prefix).input_ids
    assert ids[drop:drop + 3] == tokenizer("a red cat").input_ids  # the prompt is the first thing kept
    embeds, mask = pipe.encode_prompt("a red cat")
    assert embeds.shape[1] == len(ids) - drop and mask is None
    for shift in (-2, 2):
        assert tiny_qwenimage_pipeline(drop=drop + shift).prompt_template_encode_start_idx == drop + shift


def test_generation_is_seeded_and_finite(pipe):
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(image, _generate(pipe))
    assert np.array_equal(image, _generate(tiny_qwenimage_pipeline()))  # the build is seeded too
    assert not np.array_equal(image, _generate(pipe, seed=1))
    assert not np.array_equal(image, _generate(tiny_qwenimage_pipeline(seed=1)))


def test_true_cfg_changes_the_image(pipe):
    plain = _generate(pipe)
    guided = _generate(pipe, negative_prompt="", true_cfg_scale=4.0)
    assert np.isfinite(guided).all() and not np.allclose(plain, guided, atol=1e-3)
    pair = _generate(pipe, ["a red cat", "a blue dog riding a bicycle"], negative_prompt=["", ""], true_cfg_scale=4.0)
    assert pair.shape == (2, 32, 32, 3) and np.isfinite(pair).all()
    np.testing.assert_allclose(pair[0], guided[0], atol=1e-4)  # the padded, masked batch row is the lone prompt
