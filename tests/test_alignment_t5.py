"""T5 word-to-piece alignment and the mappers on T5 and joint (SD3: CLIP then T5) texts, checked by hand."""

import pytest
import torch
from mmdit_pipelines import t5_tokenizer
from pipelines import clip_tokenizer

import prompt2prompt as p2p
from prompt2prompt.alignment import join, refinement_mapper, replacement_mapper, text_mappers, tokenize, word_token_positions
from prompt2prompt.attention.plan import build_plan
from prompt2prompt.schedules import cross_mask

L = 16  # the T5 length of these examples


@pytest.fixture(scope="module")
def t5():
    return t5_tokenizer()


def test_pieces_belong_to_the_word_they_cover_and_eos_to_none(t5):
    tokens = tokenize(t5, "a croutons riding a  bicycle", L)
    # ▁a ▁cr out ons ▁riding ▁a ▁bi cycle </s>: no BOS, the first piece is position 0
    assert tokens.word_tokens == [[0], [1, 2, 3], [4], [5], [6, 7]]
    assert tokens.ids[-1] == t5.eos_token_id and tokens.length == L
    assert word_token_positions(tokens, "a") == [0, 5]


def test_replacement_mapper_on_t5_pieces(t5):
    source = tokenize(t5, "a cat riding a bicycle", L)  # ▁a ▁cat ▁riding ▁a ▁bi cycle </s>
    edit = tokenize(t5, "a croutons riding a bicycle", L)  # ▁a ▁cr out ons ▁riding ▁a ▁bi cycle </s>
    expected = torch.zeros(L, L)
    expected[0, 0] = 1
    expected[1, [1, 2, 3]] = 1 / 3  # one source piece, three edit pieces: each takes a third of it
    for i, j in zip(range(2, 2 + 12), range(4, 16)):  # then the walk: riding, a, bi, cycle, EOS, padding
        expected[i, j] = 1
    assert torch.equal(replacement_mapper(source, edit, L), expected)
    # Equal piece counts map one to one: bicycle (▁bi cycle) -> lasagne (▁las agne).
    swapped = tokenize(t5, "a cat riding a lasagne", L)
    assert torch.equal(replacement_mapper(source, swapped, L), torch.eye(L))


def test_refinement_mapper_on_t5_pieces_maps_padding_to_the_sources(t5):
    source = tokenize(t5, "a cat", L)  # ▁a ▁cat </s>: n_x = 3
    edit = tokenize(t5, "a fluffy cat", L)  # ▁a ▁fluffy ▁cat </s>: n_y = 4
    index, alpha = refinement_mapper(source, edit, L)
    assert index[:4].tolist() == [0, 0, 1, 2] and alpha[:4].tolist() == [1, 0, 1, 1]  # "fluffy" keeps its own
    assert index[4:].tolist() == [min(3 + (j - 4), L - 1) for j in range(4, L)] and alpha[4:].eq(1).all()


def test_sd3_mapper_is_block_diagonal_and_weights_reach_both_parts(t5):
    clip = clip_tokenizer()

    def joint(prompt):
        return join([tokenize(clip, prompt), tokenize(t5, prompt, L)])

    source, edit = joint("a cat riding a bicycle"), joint("a dog riding a bicycle")
    assert source.length == 77 + L and edit.word_tokens[1] == [2, 78]  # "dog": CLIP 2, T5 77 + 1
    mapper, _, _ = text_mappers(source, edit, "replace")
    expected = torch.zeros(77 + L, 77 + L)
    expected[:77, :77] = replacement_mapper(tokenize(clip, "a cat riding a bicycle"), tokenize(clip, "a dog riding a bicycle"))
    expected[77:, 77:] = replacement_mapper(tokenize(t5, "a cat riding a bicycle", L), tokenize(t5, "a dog riding a bicycle", L), L)
    assert torch.equal(mapper, expected)
    assert mapper[:77, 77:].eq(0).all() and mapper[77:, :77].eq(0).all()

    refined = joint("a cat riding a red bicycle")
    _, index, alpha = text_mappers(source, refined, "refine")
    red_clip, red_t5 = refined.word_tokens[4]
    assert alpha[red_clip] == 0 and alpha[red_t5] == 0 and index[77:].ge(77).all() and index[:77].lt(77).all()

    edits = [p2p.Edit("a dog riding a bicycle", weights={"dog": 2.0}, cross_steps={"default": 1.0, "dog": 0.5})]
    plan = build_plan(source, edits, [edit], 4)
    assert plan.weights[0, [2, 78]].tolist() == [2.0, 2.0] and plan.weights[0].sum() == 77 + L + 2
    window = cross_mask(edits[0].cross_steps, 4, edit)
    assert window[:, 2].tolist() == window[:, 78].tolist() == [1, 1, 0, 0] and window[:, 3].eq(1).all()


def test_a_prompt_longer_than_the_t5_length_is_refused(t5):
    with pytest.raises(ValueError, match="EOS included"):
        tokenize(t5, "a cat riding a bicycle", 5, what="(EOS included)")
