"""Attended padding on the LEFT (FLUX.2 dev's tokenizer pads before the text): the mappers of texts whose tokens sit
at other positions than their edit's, worked by hand on made-up token ids (L = 8).

The contract states its mapper rules on a text that starts at position 0 with its padding after it; a left-padded
text is mapped in that form, then put back in place (docs/semantics.md, "Padding that the model attends to is text").
"""

import torch

from prompt2prompt.alignment import Tokenized, text_mappers, word_token_positions

L = 8
BOS, EOS, A, CAT, BLACK, LAS, AGNE = 1, 2, 10, 11, 12, 20, 21


def left_padded(prompt: str, ids: list[int], word_tokens: list[list[int]]) -> Tokenized:
    """A text of `ids` padded on the left to L; `word_tokens` count from its first token (BOS at 0)."""
    lead = L - len(ids)
    return Tokenized(prompt, prompt.split(), ids, [[lead + p for p in ps] for ps in word_tokens], length=L, lead=lead)


SOURCE = left_padded("a cat", [BOS, A, CAT, EOS], [[1], [2]])  # padding 0-3, BOS 4, a 5, cat 6, EOS 7


def test_a_left_padded_word_keeps_its_absolute_positions():
    assert SOURCE.lead == 4
    assert word_token_positions(SOURCE, "cat") == [6]


def test_refine_aligns_the_texts_from_their_first_tokens_and_maps_padding_to_the_same_position():
    edit = left_padded("a black cat", [BOS, A, BLACK, CAT, EOS], [[1], [2], [3]])  # padding 0-2, BOS 3 .. EOS 7
    _, index, alpha = text_mappers(SOURCE, edit, "refine")
    # From the first tokens: BOS->BOS, a->a, black inserted, cat->cat, EOS->EOS, then padding j -> source 4 + (j - 5)
    # (the FIX); placed back: edit 3..7 -> source 4, 5, (4), 6, 7, and edit padding 0, 1, 2 -> source 0, 1, 2.
    assert index.tolist() == [0, 1, 2, 4, 5, 4, 6, 7]
    assert alpha.tolist() == [1, 1, 1, 1, 1, 0, 1, 1]


def test_replace_walks_the_texts_from_their_first_tokens():
    edit = left_padded("a lasagne", [BOS, A, LAS, AGNE, EOS], [[1], [2, 3]])  # padding 0-2, BOS 3, a 4, las 5 agne 6
    mapper, _, _ = text_mappers(SOURCE, edit, "replace")
    expected = torch.zeros(L, L)
    expected[4, 3] = expected[5, 4] = expected[7, 7] = 1  # BOS, a, EOS
    expected[6, 5] = expected[6, 6] = 0.5  # cat -> las agne, half each
    expected[0, 0] = expected[1, 1] = expected[2, 2] = 1  # padding to padding; the source's padding 3 maps nowhere
    assert torch.equal(mapper, expected)


def test_texts_of_equal_length_map_position_to_position():
    edit = left_padded("a dog", [BOS, A, 13, EOS], [[1], [2]])
    mapper, index, alpha = text_mappers(SOURCE, edit, "replace")
    assert torch.equal(mapper, torch.eye(L))
    _, index, alpha = text_mappers(SOURCE, edit, "refine")
    # "dog" does not align with "cat" (a mismatch scores -1, gaps 0): alpha 0, its index the text's first (unused)
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 4, 7] and alpha.tolist() == [1, 1, 1, 1, 1, 1, 0, 1]


def test_a_source_that_fills_the_length_gives_the_edit_s_padding_its_last_token():
    full = Tokenized("a big cat", ["a", "big", "cat"], [BOS, A, 30, 31, 32, 33, CAT, EOS], [[1], [2, 3, 4, 5], [6]],
                     length=L, lead=0)
    edit = left_padded("a cat", [BOS, A, CAT, EOS], [[1], [2]])  # padding 0-3, BOS 4, a 5, cat 6, EOS 7
    _, index, alpha = text_mappers(full, edit, "refine")
    # the text aligns to BOS, a, cat, EOS; the padding FIX clamps the edit's padding to the source's last position
    assert index.tolist() == [7, 7, 7, 7, 0, 1, 6, 7]
    assert alpha.tolist() == [1.0] * L
