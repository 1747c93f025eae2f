import pytest
import torch

from prompt2prompt.alignment import tokenize
from prompt2prompt.schedules import as_window, cross_mask, step_index, step_mask, step_range


def test_window_bounds_floor_with_tolerance():
    assert step_range((0.2, 0.5), 10) == range(2, 5)
    assert step_range(0.8, 50) == range(0, 40)
    assert step_range(0.29, 100) == range(0, 29)  # 0.29 * 100 is 28.999999999999996 in floating point
    assert step_range(0, 50) == range(0, 0)
    assert step_mask((0.5, 1.0), 4).tolist() == [False, False, True, True]


@pytest.mark.parametrize(
    "window, message",
    [((0.6, 0.2), "starts after it ends"), (1.5, "outside"), ((-0.1, 0.5), "outside"), ("0.5", "number"), ((0.1,), "pair"), (True, "number")],
)
def test_invalid_windows_are_named(window, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_window(window, "cross_steps")


def test_cross_mask_per_word_overrides_default(tokenizer):
    edit = tokenize(tokenizer, "a lasagne riding a bicycle")
    c = cross_mask({"default": 0.5, "lasagne": (0.25, 1.0)}, 4, edit)
    assert c.shape == (4, 77)
    assert c[:, 0].tolist() == [1, 1, 0, 0]
    assert c[:, 2].tolist() == c[:, 3].tolist() == [0, 1, 1, 1]  # both tokens of "lasagne"
    assert c[:, 76].tolist() == [1, 1, 0, 0]


def test_cross_mask_unknown_word_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="'lion'"):
        cross_mask({"default": 0.8, "lion": 0.4}, 10, tokenize(tokenizer, "a cat"))


def test_step_index_for_second_order_and_pndm():
    assert [step_index(k, 2, 3) for k in range(5)] == [0, 0, 1, 1, 2]
    assert [step_index(k, 1, 3) for k in range(4)] == [0, 1, 2, 2]  # PNDM's N+1 iterations
    assert torch.equal(step_mask(1.0, 3), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("window", [10**400, (0, 10**400), -(10**400), float("inf"), (float("nan"), 0.5)])
def test_windows_beyond_any_float_are_a_value_error(window):
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        as_window(window)


@pytest.mark.parametrize("c", [0.55, 0.65, 0.75, 0.85, 0.95])
def test_a_window_ends_at_floor_of_c_n_not_the_references_c_n_plus_one(c):
    # DEPARTS (contract, "Batch and steps"): the reference's window table has N + 1 rows and ends at int(c*(N+1)).
    n = 50
    assert step_range(c, n) == range(0, int(c * n))
    assert int(c * (n + 1)) == int(c * n) + 1  # where the reference would run one step more
    assert int(step_mask(c, n).sum()) == int(c * n)


def test_a_per_word_dict_without_default_gives_the_other_tokens_the_edits_default_window(tokenizer):
    # DEPARTS (contract, "Cross-attention" 3.): the other tokens take 0.8, as a bare Edit has; the reference, (0, 1).
    from prompt2prompt.edits import Edit

    edit = tokenize(tokenizer, "a dog riding a bicycle")
    n = 10
    mask = cross_mask({"dog": (0.0, 1.0)}, n, edit)  # (N, 77)
    dog, riding = edit.word_tokens[1][0], edit.word_tokens[2][0]
    assert mask[:, dog].tolist() == [1.0] * n
    assert mask[:, riding].tolist() == [1.0] * 8 + [0.0] * 2  # floor(0.8 * 10) = 8 steps, not all 10
    assert Edit("a dog", cross_steps={"dog": 0.5}).cross_steps == {"dog": 0.5}  # no default is added to the dict
