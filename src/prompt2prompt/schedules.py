"""Edit schedules: which denoising steps an edit is active at, per step and per token.

A window `(a, b)` (fractions of the run, 0 <= a <= b <= 1) is active at step i iff
`floor(a*N) <= i < floor(b*N)`; a single number c means `(0, c)`.
"""

import math
from collections.abc import Mapping

import torch

from .alignment import Tokenized, word_token_positions
from .limits import CROSS_STEPS

Window = float | tuple[float, float]
CrossSteps = Window | Mapping[str | int, Window]

_EPS = 1e-6  # so that 0.3 * 10 counts as 3 despite floating point


def as_window(window: Window, what: str = "window") -> tuple[float, float]:
    """Validate a window and return it as `(start, end)`.

    >>> as_window(0.8)
    (0.0, 0.8)
    """
    if isinstance(window, bool):
        raise TypeError(f"{what} must be a number or a (start, end) pair, not {window!r}")
    if isinstance(window, (int, float)):
        values = (0.0, window)
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in window
    ):
        values = tuple(window)
    else:
        raise TypeError(f"{what} must be a number or a (start, end) pair, not {window!r}")
    if not all(-1 <= v <= 2 for v in values):  # compared as given: 10**400 has no float, and fails here, not there
        shown = repr(window) if len(repr(window)) <= 60 else repr(window)[:57] + "..."
        raise ValueError(f"{what} {shown} has values outside [0, 1]; windows are fractions of the run")
    start, end = float(values[0]), float(values[1])
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what} {window!r} has values outside [0, 1]; windows are fractions of the run")
    if start > end:
        raise ValueError(f"{what} {window!r} starts after it ends; give (start, end) with start <= end")
    return start, end


def step_range(window: Window, num_inference_steps: int, what: str = "window") -> range:
    """The steps at which `window` is active.

    >>> step_range((0.2, 0.5), 10)
    range(2, 5)
    """
    start, end = as_window(window, what)
    return range(math.floor(start * num_inference_steps + _EPS), math.floor(end * num_inference_steps + _EPS))


def step_mask(window: Window, num_inference_steps: int, what: str = "window") -> torch.Tensor:
    """A (N,) boolean mask of the steps at which `window` is active.

    >>> step_mask(0.4, 5).tolist()
    [True, True, False, False, False]
    """
    mask = torch.zeros(num_inference_steps, dtype=torch.bool)
    steps = step_range(window, num_inference_steps, what)
    mask[steps.start : steps.stop] = True
    return mask


def cross_mask(cross_steps: CrossSteps, num_inference_steps: int, edit: Tokenized, default: Window = CROSS_STEPS) -> torch.Tensor:
    """The (N, L) mask c[i, j]: 1 where token j's cross-attention window is active at step i (L: the text's length).

    `cross_steps` is one window for every token, or a dict with a `"default"` window and per-word windows
    (words by text or position in the edit prompt) that override it for that word's tokens.
    """
    if isinstance(cross_steps, Mapping):
        per_word = {k: v for k, v in cross_steps.items() if k != "default"}
        base = cross_steps.get("default", default)
    else:
        per_word, base = {}, cross_steps
    mask = step_mask(base, num_inference_steps, "cross_steps").float()[:, None].repeat(1, edit.length)
    for word, window in per_word.items():
        positions = word_token_positions(edit, word)
        mask[:, positions] = step_mask(window, num_inference_steps, f"cross_steps[{word!r}]").float()[:, None]
    return mask


def step_index(loop_index: int, order: int, num_inference_steps: int) -> int:
    """The denoising step of a sampling-loop iteration: a 2nd-order scheduler's extra evaluation shares its step.

    >>> [step_index(k, 2, 3) for k in range(5)]  # Heun runs 2N-1 iterations
    [0, 0, 1, 1, 2]
    """
    return min(loop_index // order, num_inference_steps - 1)
