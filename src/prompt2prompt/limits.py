"""Every bound and default of a run, and the checks that enforce them: the bottom of the package.

The `MAX_*` bounds keep a run from lasting for days, filling the memory or rendering black; the environment
variable `P2P_ALLOW_LARGE=1` lifts them for a real need (`allow_large`). The API (`Editor`, `invert`), recipes,
batch manifests, the CLI and the web app all check their values with the checks here, so that one value gets one
message wherever it comes from. This module imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

ALLOW_LARGE = "P2P_ALLOW_LARGE"

MAX_STEPS = 1000  # SD's schedulers are trained on 1000 timesteps: more steps repeat them
MAX_GUIDANCE = 100.0  # |guidance_scale|; SD uses 5-15, Flux 3.5
MAX_LATENT = 1e4  # |initial latent|: a unit Gaussian's draw stays below 10
# |weight| of a reweighted word: far beyond single digits a word swamps every other token's attention and the
# activations overflow (float16 first), so larger values are refused rather than rendered black.
MAX_WEIGHT = 100.0
MAX_INNER_STEPS = 100  # null-text's Adam iterations per step (10: the paper's)
# Sizes up to 4x a model's native pixel count (1024x1024 for SD 1.5, 2048x2048 for SDXL): beyond, the output
# degrades and self-attention's cost (quadratic in the pixels) turns a run into hours or an out-of-memory error.
MAX_PIXELS_FACTOR = 4
# What a recipe or a manifest line may ask for beyond the API's own bounds (a crafted file must not run for days).
MAX_SIDE = 4096  # px, 4x SDXL's 1024
MAX_EDITS = 64  # edits of one source: each is one more row of every forward batch
MAX_THREADS = 256  # torch CPU threads; a replay runs on no more than this machine's CPUs
MAX_INPUT_BYTES = 256 * 2**20  # an input image file: a 20k x 20k 16-bit PNG is well under this
MAX_TRAIN_TIMESTEPS = 10_000  # any integer and list length of a scheduler's configuration (SD: 1000 timesteps)

# The edit defaults (the paper's demos): cross-attention follows the source for 80% of the steps, self-attention
# for 40%; a local blend thresholds at 0.3 and starts after 20% of the steps.
CROSS_STEPS = 0.8
SELF_STEPS = 0.4
BLEND_THRESHOLD = 0.3
BLEND_START = 0.2


def allow_large() -> bool:
    """Whether `P2P_ALLOW_LARGE` is set (to anything but "" or "0"): the `MAX_*` bounds are then lifted."""
    return os.environ.get(ALLOW_LARGE, "") not in ("", "0")


def lift_hint() -> str:
    """How a message says that a bound can be lifted."""
    return f"set {ALLOW_LARGE}=1 for more"


def bound(high: float) -> tuple[float, str]:
    """The upper bound in force and how a message names it: `high` and the hint that lifts it, or no bound (and no
    hint) when P2P_ALLOW_LARGE is set.

    >>> bound(1000)
    (1000, ' (set P2P_ALLOW_LARGE=1 for more)')
    """
    if allow_large():
        return math.inf, ""
    return high, f" ({lift_hint()})"


def quoted(value: Any, limit: int = 80) -> str:
    """`value` as an error message quotes it, on one line: its repr, cut to about `limit` characters (a string's
    saying how long it was).

    >>> quoted("a cat"), quoted("word " * 40, limit=20), quoted(2**100, limit=20)
    ("'a cat'", "'word word word word '... (200 characters)", '12676506002282294...')
    """
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool; numpy's count) that is finite, even as a float: 10**400 is not.

    >>> is_finite_number(7.5), is_finite_number(True), is_finite_number(float("nan")), is_finite_number(10**400)
    (True, False, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy's integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """`value` if it is an integer from `low` to `high` (the upper bound lifted by P2P_ALLOW_LARGE), else a ValueError.

    >>> check_int(50, "num_inference_steps", 1, 1000)
    50
    >>> check_int(5000, "num_inference_steps", 1, 1000)
    Traceback (most recent call last):
    ...
    ValueError: num_inference_steps must be an integer from 1 to 1000 (set P2P_ALLOW_LARGE=1 for more), not 5000
    """
    top, hint = bound(high)
    if not is_int(value) or not low <= value <= top:
        span = f"from {low} to {high}{hint}" if top < math.inf else f"of at least {low}"
        raise ValueError(f"{name} must be an integer {span}, not {quoted(value)}")
    return value


def check_side(value: Any, name: str) -> int | None:
    """An image side: None (the model's) or a positive multiple of 8 px up to `MAX_SIDE` (lifted by P2P_ALLOW_LARGE),
    else a ValueError."""
    top, hint = bound(MAX_SIDE)
    if value is not None and (not is_int(value) or value <= 0 or value % 8 or value > top):
        span = f" up to {MAX_SIDE}{hint}" if top < math.inf else ""
        raise ValueError(f"{name} must be a positive multiple of 8 px{span}, or null, not {quoted(value)}")
    return value


def check_positive_int(value: Any, what: str) -> int:
    """`value` if it is a positive integer, else a ValueError naming `what`."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    return int(value)


def check_finite_number(value: Any, what: str) -> float:
    """`value` if it is a finite real number, else a ValueError naming `what`."""
    if not is_finite_number(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return value


def check_fraction(value: Any, what: str) -> float:
    """`value` as a float if it is a number in [0, 1], else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], not {value!r}")
    return float(value)


def check_steps(num_inference_steps: Any, scheduler: Any = None) -> int:
    """A step count: a positive integer, at most `MAX_STEPS` unless P2P_ALLOW_LARGE is set, and one that `scheduler`
    (where given) can take (else a ValueError).

    A flow schedule stretched to a terminal sigma (`shift_terminal`: Qwen-Image's) divides zero by zero at one step
    and renders NaN, so it needs two.

    >>> check_steps(50)
    50
    """
    check_positive_int(num_inference_steps, "num_inference_steps")
    if num_inference_steps > MAX_STEPS and not allow_large():
        raise ValueError(f"num_inference_steps must be at most {MAX_STEPS}, not {num_inference_steps} ({lift_hint()})")
    terminal = getattr(scheduler, "config", {}).get("shift_terminal") if scheduler is not None else None
    if num_inference_steps == 1 and terminal:
        raise ValueError(f"this model's {type(scheduler).__name__} stretches its sigmas to shift_terminal={terminal}, "
                         "which one step cannot (it renders NaN); use num_inference_steps of 2 or more")
    return num_inference_steps


def check_guidance(guidance_scale: Any) -> float:
    """A guidance scale as a float: finite, within ±`MAX_GUIDANCE` unless P2P_ALLOW_LARGE is set (else a ValueError).

    >>> check_guidance(7)
    7.0
    >>> check_guidance(1e6)
    Traceback (most recent call last):
    ...
    ValueError: guidance_scale must be a finite number from -100 to 100 (...), not 1000000.0
    """
    if not is_finite_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, not {quoted(guidance_scale)}")
    top, hint = bound(MAX_GUIDANCE)
    if abs(guidance_scale) > top:
        raise ValueError(f"guidance_scale must be a finite number from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}{hint}, "
                         f"not {quoted(guidance_scale)}")
    return float(guidance_scale)


def check_weight(weight: Any, word: Any) -> float:
    """A reweighting factor: finite and within ±`MAX_WEIGHT` (not lifted: beyond, activations overflow)."""
    if not is_finite_number(weight):
        raise ValueError(f"the weight of {word!r} must be a finite number, not {weight!r}")
    if abs(weight) > MAX_WEIGHT:
        raise ValueError(f"the weight of {word!r} is {weight!r}, outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return weight


def check_seed(seed: Any) -> int | None:
    """A seed: None (a random one), or an integer in [0, 2**63), torch's range (else a ValueError)."""
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {quoted(seed)}")
    return seed


def check_pixels(height: int, width: int, native: int) -> None:
    """Refuse more than `MAX_PIXELS_FACTOR` times a model's native `native` x `native` pixels.

    >>> check_pixels(1024, 1024, 512)  # SD 1.5: 4x its pixels pass, 1536x1536 would not
    """
    if allow_large():
        return
    if height * width > MAX_PIXELS_FACTOR * native * native:
        raise ValueError(
            f"height={height} and width={width} make {height * width} pixels, more than {MAX_PIXELS_FACTOR} times "
            f"this model's native {native}x{native}; use at most {MAX_PIXELS_FACTOR * native * native} pixels, "
            f"e.g. {2 * native}x{2 * native} (or {lift_hint()})"
        )
