import pytest
import torch

from prompt2prompt.alignment import (
    check_words,
    find_words,
    needleman_wunsch,
    refinement_mapper,
    replacement_mapper,
    tokenize,
    word_token_positions,
)


def test_multi_token_words_get_all_their_tokens(tokenizer):
    t = tokenize(tokenizer, "a lasagne with croutons")
    assert t.words == ["a", "lasagne", "with", "croutons"]
    assert t.word_tokens == [[1], [2, 3], [4], [5, 6, 7]]
    assert len(t.ids) == 9  # BOS + 7 + EOS


def test_punctuation_stays_with_its_word(tokenizer):
    t = tokenize(tokenizer, "A Painting, of a squirrel!")
    assert t.word_tokens == [[1], [2, 3], [4], [5], [6, 7]]


def test_words_by_text_position_and_fallback(tokenizer):
    t = tokenize(tokenizer, "A Painting, of a squirrel!")
    assert find_words(t, "a") == [3]  # exact match wins over the case-insensitive "A"
    assert find_words(t, "painting") == [1]  # case-insensitive, punctuation stripped
    assert find_words(t, -1) == [4]
    assert word_token_positions(t, ["squirrel", 0]) == [1, 6, 7]
    assert word_token_positions(t, "of squirrel!") == [4, 6, 7]


def test_missing_word_names_word_and_prompt(tokenizer):
    t = tokenize(tokenizer, "a cat riding a bicycle")
    with pytest.raises(ValueError, match=r"'dog'.*'a cat riding a bicycle'"):
        find_words(t, "dog")
    with pytest.raises(ValueError, match="position 7"):
        find_words(t, 7)


def test_prompt_over_77_tokens_is_refused(tokenizer):
    with pytest.raises(ValueError, match="more than the text encoder's 77"):
        tokenize(tokenizer, " ".join(["cat"] * 80))


def test_replacement_mapper_same_token_counts_is_identity(tokenizer):
    m = replacement_mapper(tokenize(tokenizer, "a cat riding a bicycle"), tokenize(tokenizer, "a dog riding a bicycle"))
    assert torch.equal(m, torch.eye(77))


def test_replacement_mapper_one_to_two_tokens(tokenizer):
    # source: BOS a cat riding a bicycle EOS ; edit: BOS a lasag ne riding a bicycle EOS
    m = replacement_mapper(tokenize(tokenizer, "a cat riding a bicycle"), tokenize(tokenizer, "a lasagne riding a bicycle"))
    assert m[0, 0] == 1 and m[1, 1] == 1
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5
    for k in range(3, 76):  # riding onwards shifts by one token
        assert m[k, k + 1] == 1
    assert m.sum(0).tolist() == [1.0, 1.0, 0.5, 0.5] + [1.0] * 73  # every other edit column is fed once


def test_replacement_mapper_two_to_one_tokens_stays_aligned_after_the_word(tokenizer):
    # source: BOS a lasag ne riding a bicycle EOS ; edit: BOS a cat riding a bicycle EOS
    m = replacement_mapper(tokenize(tokenizer, "a lasagne riding a bicycle"), tokenize(tokenizer, "a cat riding a bicycle"))
    assert m[2, 2] == 1 and m[3, 2] == 1  # both source tokens feed the one edit token
    assert m[4, 3] == 1 and m[3, 3] == 0  # the FIX: "riding" maps to "riding", not to "ne"
    assert m[7, 6] == 1  # EOS -> EOS
    assert m[76, 76] == 1  # the column the walk never reached maps to itself


def test_replacement_mapper_several_changed_words(tokenizer):
    # source: BOS a(1) cat(2) eats(3) cr(4) out(5) ons(6) EOS(7); edit: BOS a(1) lasag(2) ne(3) eats(4) soup(5) EOS(6)
    m = replacement_mapper(tokenize(tokenizer, "a cat eats croutons"), tokenize(tokenizer, "a lasagne eats soup"))
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5
    assert m[3, 4] == 1
    assert m[4, 5] == m[5, 5] == m[6, 5] == 1  # 3 source tokens -> 1 edit token, each with weight 1/1
    assert m[7, 6] == 1


def test_replacement_needs_equal_word_counts(tokenizer):
    with pytest.raises(ValueError, match="same number of words.*mode='refine'"):
        replacement_mapper(tokenize(tokenizer, "a cat"), tokenize(tokenizer, "a fluffy cat"))


def test_needleman_wunsch_ties_prefer_left_then_up():
    assert needleman_wunsch([1, 2], [2, 1]) == [1, -1]
    assert needleman_wunsch([1, 5, 9], [1, 5, 7, 9]) == [0, 1, -1, 2]
    assert needleman_wunsch([4, 4], [4, 4]) == [0, 1]


def test_refinement_mapper_added_word(tokenizer):
    mapper, alpha = refinement_mapper(tokenize(tokenizer, "a cat riding a bicycle"), tokenize(tokenizer, "a black cat riding a bicycle"))
    assert mapper[:8].tolist()[:2] == [0, 1] and mapper[3:8].tolist() == [2, 3, 4, 5, 6]
    assert alpha[:8].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    # padding after the edit's EOS (n_y = 8) maps to the source's padding (n_x = 7)
    assert mapper[8:].tolist() == list(range(7, 76))
    assert alpha[8:].eq(1).all()


def test_refinement_mapper_removed_word_clamps_padding(tokenizer):
    mapper, alpha = refinement_mapper(tokenize(tokenizer, "a black cat riding a bicycle"), tokenize(tokenizer, "a cat riding a bicycle"))
    assert mapper[:7].tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert alpha.eq(1).all()
    assert mapper[7:].tolist() == list(range(8, 77)) + [76]


def test_a_tokenizer_without_offsets_gets_a_clear_error(tokenizer):
    class SlowTokenizer:  # what transformers 4's Python tokenizers do when asked for offsets
        def __call__(self, text, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return tokenizer(text, **kwargs)

    with pytest.raises(TypeError, match="transformers >= 5.17"):
        tokenize(SlowTokenizer(), "a cat")


@pytest.mark.parametrize("source", [
    "a  cat riding a bicycle",  # two spaces in a row
    "a cat\triding a\nbicycle",  # tabs and newlines separate words too
    "  a cat riding a bicycle ",  # leading and trailing spaces
    "a \t\n cat   riding  a  bicycle",
])
def test_runs_of_whitespace_separate_words_and_make_no_empty_word(tokenizer, source):
    spaced = tokenize(tokenizer, source)
    single = tokenize(tokenizer, "a cat riding a bicycle")
    assert spaced.words == single.words == ["a", "cat", "riding", "a", "bicycle"]
    assert spaced.word_tokens == single.word_tokens
    edit = tokenize(tokenizer, "a dog riding a bicycle")
    assert torch.equal(replacement_mapper(spaced, edit), replacement_mapper(single, edit))
    lasagne = tokenize(tokenizer, "a lasagne riding  a bicycle")  # a changed word of another token count
    assert torch.equal(replacement_mapper(spaced, lasagne),
                       replacement_mapper(single, tokenize(tokenizer, "a lasagne riding a bicycle")))
    assert find_words(spaced, "riding") == [2] and word_token_positions(spaced, "a  bicycle") == [1, 4, 5]


def test_words_are_checked_without_a_tokenizer_on_the_same_split():
    check_words("a  cat\triding", ["cat", "riding", 2])
    with pytest.raises(ValueError, match="position 3"):
        check_words("a  cat\triding", [3])  # three words, not four
    with pytest.raises(ValueError, match="must hold some text"):
        check_words("a cat", " ")
