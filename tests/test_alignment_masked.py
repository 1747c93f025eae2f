"""Templated text (a chat template whose prefix the pipeline drops) and masked padding, worked by hand on the
in-process T5 vocabulary (pieces: ▁a ▁image ▁: | ▁a ▁cat ▁riding ▁a ▁bi cycle | ▁do n e)."""

import pytest
import torch
from mmdit_pipelines import t5_tokenizer

from prompt2prompt.alignment import text_mappers, tokenize, tokenize_templated, word_token_positions

TEMPLATE = "a image : {} done"  # the prefix "▁a ▁image" is dropped (drop=2); "▁:" and "▁do n e" stay
L = 16  # the padded length of a batch


@pytest.fixture(scope="module")
def t5():
    return t5_tokenizer()


def test_positions_count_from_the_first_kept_token_and_template_words_belong_to_none(t5):
    t = tokenize_templated(t5, "a cat riding a bicycle", TEMPLATE, drop=2, max_length=L)
    # kept: ▁: ▁a ▁cat ▁riding ▁a ▁bi cycle ▁do n e -> positions 0..9; the template's "a" is not the prompt's
    assert t5.convert_ids_to_tokens(t.ids) == ["▁:", "▁a", "▁cat", "▁riding", "▁a", "▁bi", "cycle", "▁do", "n", "e"]
    assert t.words == ["a", "cat", "riding", "a", "bicycle"]
    assert t.word_tokens == [[1], [2], [3], [4], [5, 6]]
    assert (t.true_length, t.length) == (10, L)
    assert word_token_positions(t, "a") == [1, 4]


def test_a_templated_prompt_too_long_for_the_model_is_refused(t5):
    with pytest.raises(ValueError, match="10 tokens long in its template, more than the model's 8"):
        tokenize_templated(t5, "a cat riding a bicycle", TEMPLATE, drop=2, max_length=8)
    with pytest.raises(ValueError, match="holds '{}'"):
        tokenize_templated(t5, "a cat", "no slot", drop=0)


def test_replace_with_masked_padding_maps_no_masked_position(t5):
    source = tokenize_templated(t5, "a cat riding a bicycle", TEMPLATE, drop=2, max_length=L)     # n_s = 10
    edit = tokenize_templated(t5, "a croutons riding a bicycle", TEMPLATE, drop=2, max_length=L)  # n_e = 12
    assert (source.true_length, edit.true_length) == (10, 12) and edit.word_tokens[1] == [2, 3, 4]
    mapper, _, alpha = text_mappers(source, edit, "replace")
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1                       # ▁: and ▁a
    expected[2, [2, 3, 4]] = 1 / 3                            # cat -> ▁cr out ons, a third each
    for k, j in zip(range(3, 10), range(5, 12)):              # riding a bi cycle ▁do n e
        expected[k, j] = 1
    # The walk would go on (source 10.. -> edit 12..), but those are masked padding on both sides: zero.
    assert torch.equal(mapper, expected)
    assert alpha[:12].eq(1).all() and alpha[12:].eq(0).all()  # the edit's masked keys keep nothing


def test_refine_with_masked_padding_leaves_out_the_padding_fix(t5):
    source = tokenize_templated(t5, "a cat", TEMPLATE, drop=2, max_length=L)         # ▁: ▁a ▁cat ▁do n e: n_x = 6
    edit = tokenize_templated(t5, "a fluffy cat", TEMPLATE, drop=2, max_length=L)    # ▁: ▁a ▁fluffy ▁cat ▁do n e
    assert (source.true_length, edit.true_length) == (6, 7)
    mapper, index, alpha = text_mappers(source, edit, "refine")
    assert index[:7].tolist() == [0, 1, 0, 2, 3, 4, 5]
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1, 1] + [0] * (L - 7)   # "fluffy" and the masked padding: their own
    expected = torch.zeros(L, L)
    for j, k in enumerate([0, 1, 0, 2, 3, 4, 5]):
        expected[k, j] = 1
    # Unmasked, the padding FIX would map edit padding 7.. to source padding 6..; masked, it maps nothing.
    assert torch.equal(mapper, expected)


def test_without_a_mask_the_padding_rules_are_unchanged(t5):
    source, edit = tokenize(t5, "a cat", L), tokenize(t5, "a fluffy cat", L)
    assert source.true_length is None
    mapper, index, alpha = text_mappers(source, edit, "refine")
    assert index[4:].tolist() == [min(3 + (j - 4), L - 1) for j in range(4, L)] and alpha[4:].eq(1).all()
    assert mapper[index[5], 5] == 1


def test_a_drop_that_cuts_into_the_prompt_is_refused_and_unpadded_text_is_its_own_length(t5):
    # drop=4 takes "▁a ▁image ▁:" and the prompt's own "▁a": the prompt would lose its first word
    with pytest.raises(ValueError, match="drops the first 4 tokens of its template, which take part of the prompt"):
        tokenize_templated(t5, "a cat riding a bicycle", TEMPLATE, drop=4, max_length=L)
    with pytest.raises(ValueError, match="drops the first 40 tokens"):  # more tokens than the whole text has
        tokenize_templated(t5, "a cat", TEMPLATE, drop=40)
    t = tokenize_templated(t5, "a cat riding a bicycle", TEMPLATE, drop=3, max_length=L, padded=False)
    # kept: ▁a ▁cat ▁riding ▁a ▁bi cycle ▁do n e: the prompt starts at the first kept position here
    assert t.word_tokens == [[0], [1], [2], [3], [4, 5]]
    assert (t.true_length, t.length) == (9, 9)
