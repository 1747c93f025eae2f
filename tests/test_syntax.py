import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompt2prompt.syntax import ParsedPrompt, PromptSyntaxError, edit_prompt, inline_edit, parse_prompt


@pytest.mark.parametrize(
    "text, source, edit, weights",
    [
        ("a [cat->dog] riding a bicycle", "a cat riding a bicycle", "a dog riding a bicycle", {}),
        ("a photo of a house on a mountain[+ at winter]", "a photo of a house on a mountain",
         "a photo of a house on a mountain at winter", {}),
        ("a (fluffy:2.5) teddy bear", "a fluffy teddy bear", "a fluffy teddy bear", {1: 2.5}),
        ("a [- fluffy] teddy bear", "a fluffy teddy bear", "a teddy bear", {}),
        ("a [cat->big dog] riding", "a cat riding", "a big dog riding", {}),
        ("a [cat->(dog:-0.5)] on a (red:2) bike", "a cat on a red bike", "a dog on a red bike", {1: -0.5, 4: 2.0}),
        ("a (very fluffy:3) bear", "a very fluffy bear", "a very fluffy bear", {1: 3.0, 2: 3.0}),
        ("a cat  on\ta mat ", "a cat on a mat", None, {}),
        (r"a \[cat\] and a \(dog\) \\", r"a [cat] and a (dog) \ ".strip(), None, {}),
        ("a [cat->dog] (on:1e-1) a mat", "a cat on a mat", "a dog on a mat", {2: 0.1}),
        ("a [+ x\\->y] d", "a d", "a x->y d", {}),  # an escaped arrow is text
        ("a [->dog] d", "a d", "a dog d", {}),  # an empty old side inserts, as [+dog] does
        ("a (red:-100) cat", "a red cat", "a red cat", {1: -100.0}),
    ],
)
def test_parses_examples(text, source, edit, weights):
    assert parse_prompt(text) == ParsedPrompt(source=source, edit=edit, weights=weights)


@pytest.mark.parametrize(
    "text, column, fragment",
    [
        ("a [cat->dog riding", 3, "never closed"),
        ("a [cat] riding", 7, "expected '->'"),
        ("a cat] riding", 6, "without a matching '['"),
        ("a (fluffy) bear", 10, "expected ':weight'"),
        ("a (fluffy:lots) bear", 11, "'lots' is not a number"),
        ("a (fluffy:inf) bear", 11, "finite"),
        ("a (:2) bear", 3, "at least one word"),
        ("a (fluffy:2 bear", 3, "never closed"),
        ("a [cat->[dog]]", 9, "cannot nest"),
        ("a [(cat:2)->dog]", 4, "outside '[...]'"),
        ("a ((cat:2):3)", 4, "cannot nest"),
        ("(a:2)(b:3) cat", 6, "two weight groups"),
        ("[-cat]", 1, "edit prompt is empty"),
        ("  ", 1, "source prompt is empty"),
        ("a cat\\", 6, "backslash"),
        ("a [a->b->c] d", 8, "'->' stands once in an edit"),
        ("a [- x->y] d", 7, "'->' stands once in an edit"),
        ("a [->] d", 3, "'[->]' changes nothing"),
        ("a [ -> ] d", 3, "'[->]' changes nothing"),
        ("a [+] d", 3, "adds nothing"),
        ("a [+  ] d", 3, "adds nothing"),
        ("a [-] d", 3, "removes nothing"),
        # A swap whose new words were forgotten is a typo, not a deletion: the error shows how to remove words.
        ("a big [red->] circle", 7, "'[red->]' names no new words: to remove words, write [-red]; to swap them"),
        ("a [fluffy ->]teddy bear", 3, "write [-fluffy]"),
        ("a [\\[x -> ] b", 3, "write [-\\[x]"),  # as typed, escape and all
        ("a (red:1e39) cat", 8, "outside [-100, 100]"),
        ("a (red:-101) cat", 8, "outside [-100, 100]"),
        ("a (red:1e400) cat", 8, "finite"),
    ],
)
def test_errors_point_at_the_column(text, column, fragment):
    with pytest.raises(PromptSyntaxError) as info:
        parse_prompt(text)
    assert info.value.column == column
    assert fragment in str(info.value)
    # The message repeats the input with a caret under the column.
    lines = str(info.value).splitlines()
    assert lines[1] == "  " + text
    assert lines[2] == "  " + " " * (column - 1) + "^"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab :.-+>\\[]()0123456789é\t")), max_size=40))
def test_random_strings_parse_or_point_inside_the_input(text):
    try:
        parsed = parse_prompt(text)
    except PromptSyntaxError as error:
        assert 1 <= error.column <= max(len(text), 1)
        return
    assert parsed.source and parsed.source == " ".join(parsed.source.split())
    if parsed.edit is None:
        assert not parsed.weights
    else:
        words = parsed.edit.split(" ")
        assert all(0 <= position < len(words) for position in parsed.weights)


_word = st.text(alphabet=st.sampled_from(list("abcxyz")), min_size=1, max_size=6)
_words = st.lists(_word, min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(_words, _words, _words, _words)
def test_replacement_markup_builds_both_prompts(before, old, new, after):
    text = " ".join(before) + " [" + " ".join(old) + "->" + " ".join(new) + "] " + " ".join(after)
    parsed = parse_prompt(text)
    assert parsed.source == " ".join(before + old + after)
    assert parsed.edit == " ".join(before + new + after)
    assert parsed.weights == {}


@settings(max_examples=200, deadline=None)
@given(_words, _words, _words, st.floats(min_value=-10, max_value=10, allow_nan=False))
def test_weight_groups_key_the_edit_words_by_position(before, weighted, after, weight):
    text = " ".join(before) + " (" + " ".join(weighted) + f":{weight!r}) " + " ".join(after)
    parsed = parse_prompt(text)
    assert parsed.source == parsed.edit == " ".join(before + weighted + after)
    assert parsed.weights == {len(before) + i: weight for i in range(len(weighted))}


@pytest.mark.parametrize("text", ["a big\n[red->green\ncircle", "a\t[cat->dog", "a [\x00cat->dog", "a\r\n[(x:2"])
def test_an_error_shows_the_prompt_on_one_line_with_the_caret_under_its_column(text):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(text)
    header, shown, caret = str(caught.value).split("\n")  # three lines, whatever the prompt holds
    assert len(shown) == len(text) + 2 and shown.strip() and caret.index("^") == caught.value.column + 1


@pytest.mark.parametrize(
    "text, source, spec",
    [
        ("a [cat->dog] riding a (red:1.5) bike", "a cat riding a red bike",
         {"prompt": "a dog riding a red bike", "weights": [[4, 1.5]]}),
        ("a house[+ at winter]", "a house", {"prompt": "a house at winter", "weights": None}),
        ("a (fluffy:2) cat", "a fluffy cat", {"prompt": "a fluffy cat", "weights": [[1, 2.0]]}),  # a pure reweight
        (r"a  cat\[1\]", "a cat[1]", None),
    ],
)
def test_inline_markup_makes_a_recipes_first_edit(text, source, spec):
    assert inline_edit(text) == (source, spec)


def test_an_edit_prompt_weights_words_but_swaps_none():
    assert edit_prompt("a  (big:2) dog") == {"prompt": "a big dog", "weights": [[1, 2.0]]}
    assert edit_prompt("a [dog->dog]") == {"prompt": "a dog", "weights": None}  # markup that changes nothing
    with pytest.raises(ValueError, match=r"^--to takes an edit prompt, .* not \[old->new\] markup: 'a \[cat->dog\]'"):
        edit_prompt("a [cat->dog]", what="--to")
    with pytest.raises(PromptSyntaxError, match="column 8: the weight .x. is not a number"):
        edit_prompt("a (big:x) dog")
