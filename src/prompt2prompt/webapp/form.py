"""The Run button's form by name (`Form`, `EditRow`) and the checks of a request made without the model.

A request's values arrive in the order of `Form.inputs()`; `Form.of` names them, and `check_request` checks the
types (only a forged request sends others), the prompts' syntax, the numbers and the upload.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from ..images import open_image
from ..limits import MAX_STEPS, check_guidance, check_int
from ..syntax import PromptSyntaxError, edit_prompt, inline_edit
from .errors import user_error

MAX_EDITS = 4


def prompt_words(prompt: str | None) -> list[str]:
    """The prompt's distinct words, in order: the choices of the word pickers."""
    return list(dict.fromkeys((prompt or "").split()))



T = TypeVar("T")
P = TypeVar("P")


def _field(label: str | None = None, *types: type) -> Any:
    """A form input: its name in messages, and the types its component sends (None aside); only a forged request
    sends others. An input without types has its own check in `check_request`."""
    return dataclasses.field(metadata={"label": label, "types": types})


class _Input(NamedTuple):
    key: str  # as `user_error`'s field: "source", "edit-1.prompt"
    value: Any
    label: str | None
    types: tuple[type, ...]


@dataclasses.dataclass
class EditRow(Generic[T]):
    """One edit row of the form, by name: its components when the app is built, their values in a request."""

    prompt: T = _field(None, str)
    mode: T = _field(None, str)
    cross: T = _field(None, int, float)
    self_steps: T = _field(None, int, float)
    weight_words: T = _field(None, list)
    weight: T = _field(None, int, float)
    blend_source: T = _field(None, list)
    blend_edit: T = _field(None, list)
    exclude_source: T = _field(None, list)
    exclude_edit: T = _field(None, list)
    threshold: T = _field(None, int, float)


ROW_FIELDS = len(dataclasses.fields(EditRow))


def _row_key(index: int, name: str) -> str:
    """The key of edit row `index`'s (1-based) input `name`."""
    return f"edit-{index}.{name}"


@dataclasses.dataclass
class Form(Generic[T]):
    """The Run button's inputs, by name: their components when the app is built, their values in a request.

    Gradio hands a request's values to a function in the order of `inputs()`; `Form.of` names them again.
    """

    model: T = _field("model", str)
    source: T = _field("source prompt", str)
    seed: T = _field()
    steps: T = _field()
    guidance: T = _field()
    image: T = _field("image", str)
    method: T = _field("inversion method", str)
    count: T = _field("edit count", int, float)
    rows: list[EditRow[T]] = dataclasses.field(default_factory=list)

    def named(self) -> list[_Input]:
        """Every input with its key, its name in messages and its types, in the order Gradio sends them."""
        found = [_Input(f.name, getattr(self, f.name), f.metadata["label"], f.metadata["types"])
                 for f in dataclasses.fields(self) if f.name != "rows"]
        for i, row in enumerate(self.rows, 1):
            found += [_Input(_row_key(i, f.name), getattr(row, f.name), f"edit {i} field {j}", f.metadata["types"])
                      for j, f in enumerate(dataclasses.fields(row), 1)]
        return found

    def inputs(self) -> list[T]:
        """The inputs in the order Gradio sends their values."""
        return [item.value for item in self.named()]

    @classmethod
    def of(cls, values: Sequence[Any]) -> Form[Any]:
        """The form whose `inputs()` are `values`: a request's, named. Raises `user_error` if they cannot be.

        >>> row = ["a dog", "auto", 0.8, 0.4, [], 1.0, [], [], [], [], 0.3]
        >>> form = Form.of(["demo", "a cat", 7, 30, 7.5, None, "direct", 1, *row])
        >>> form.source, form.rows[0].prompt, form.rows[0].threshold
        ('a cat', 'a dog', 0.3)
        """
        top = len(dataclasses.fields(cls)) - 1  # all but the rows
        if len(values) < top or (len(values) - top) % ROW_FIELDS:
            raise user_error(f"the request holds {len(values)} values; the form sends {top} and {ROW_FIELDS} per edit row")
        rows = [EditRow(*values[start:start + ROW_FIELDS]) for start in range(top, len(values), ROW_FIELDS)]
        return cls(*values[:top], rows=rows)


def _parsed(parse: Callable[[str], P], text: str, what: str, field: str) -> P:
    """`parse(text)` (`syntax.inline_edit` or `syntax.edit_prompt`), its errors as the app's `user_error` on `field`: a
    syntax error's message after `what`, and its prompt and caret (its message's last lines) as the detail."""
    try:
        return parse(text)
    except PromptSyntaxError as error:
        first, *rest = str(error).splitlines()
        raise user_error(f"{what}: {first}", "\n".join(rest), field=field) from None
    except ValueError as error:  # edit_prompt's: [old->new] markup in an edit row
        raise user_error(str(error), field=field) from None


def _edit_spec(index: int, row: EditRow[Any]) -> dict[str, Any] | None:
    """Row `index`'s recipe edit spec; None for an empty row. The prompt may weight words inline: "a (fluffy:2) cat"."""
    if not (row.prompt or "").strip():
        return None
    field = _row_key(index, "prompt")
    if row.cross is None or row.self_steps is None or (row.weight_words and row.weight is None):  # a forged request
        raise user_error(f"edit {index}: the cross and self windows and the weight must be numbers", field=field)
    what = f"edit {index}"
    parsed = _parsed(functools.partial(edit_prompt, what=what), row.prompt, what, field)
    blend = None
    if row.blend_source or row.blend_edit or row.exclude_source or row.exclude_edit:
        if not row.blend_source or not row.blend_edit:
            raise user_error(f"edit {index}: local blend needs words on both sides, e.g. source 'cat' and edit 'dog'",
                         field=_row_key(index, "blend_source"))
        blend = {"source_words": list(row.blend_source), "edit_words": list(row.blend_edit),
                 "exclude_source_words": list(row.exclude_source or []),
                 "exclude_edit_words": list(row.exclude_edit or []),
                 "threshold": None if row.threshold is None else float(row.threshold)}
    weights = [*(parsed["weights"] or []), *([word, float(row.weight)] for word in row.weight_words or [])]
    return {"prompt": parsed["prompt"], "mode": row.mode, "cross_steps": float(row.cross),
            "self_steps": float(row.self_steps), "weights": weights or None, "blend": blend}


def check_upload(path: str, max_bytes: int) -> str:
    """`path` if it holds an image within the limits; the upload component takes any file, so that a wrong one
    gets this message and not Gradio's bare "Error". The messages name "the upload", never its path on the server.
    """
    try:
        size = os.path.getsize(path)
    except OSError:  # gone from Gradio's cache (see CacheBound), or never there
        raise user_error("the upload is no longer on the server; upload the image again", field="image") from None
    if size > max_bytes:
        raise user_error(f"the upload is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB", field="image")
    try:
        open_image(path).close()
    except OSError:
        raise user_error("the upload is no longer on the server; upload the image again", field="image") from None
    except ValueError as error:  # its message starts with the quoted path, and Pillow's reason may name it too
        message = str(error).replace(f"'{path}'", "the upload", 1)
        # Pillow's reason ("cannot identify image file '/path'") reads as well without the path.
        message = message.replace(f" '{path}'", "").replace(path, "the upload")
        raise user_error(message, field="image") from None
    return path


def _check_form(form: Form[Any]) -> None:
    """Refuse a forged request whose inputs are not what the form's components send, with a message."""
    for key, value, label, types in form.named():
        if not types:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise user_error(f"the {label} must be a {' or '.join(t.__name__ for t in types)}, not {type(value).__name__}",
                         field=key)
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise user_error(f"the {label} must be a list of words", field=key)
    count = form.count
    if count is None:
        raise user_error("the request holds no edit count", field="count")
    if isinstance(count, float) and not (math.isfinite(count) and count.is_integer()) or count > MAX_EDITS:
        raise user_error(f"the edit count must be a whole number up to {MAX_EDITS}, not {count!r}", field="count")
    if len(form.rows) < int(count):
        raise user_error("the request holds fewer edit rows than its count", field="count")


@dataclasses.dataclass(frozen=True)
class _Request:
    """A Run request, checked as far as it can be without the model (`check_request`)."""

    model: str
    source: str  # without its inline markup
    specs: list[dict[str, Any]]  # the recipe's edits: inline markup's first, then the rows'
    steps: int
    guidance: float
    seed: int | float | None  # as sent: None or below 0 for a random one
    image: str | None
    method: str


def check_request(max_bytes: int, form: Form[Any]) -> _Request:
    """The Run button's inputs, checked without the model: the types, the prompts' syntax, the numbers and the
    upload. Raises `user_error` naming the input at fault."""
    _check_form(form)
    if not (form.source or "").strip():
        raise user_error("type a source prompt first", field="source")
    # Inline markup ("a [cat->dog]") makes an edit, at the model's windows.
    source, inline = _parsed(inline_edit, form.source, "the source prompt", "source")
    specs = []
    if inline is not None:
        specs.append({"prompt": inline["prompt"], "mode": "auto", "cross_steps": None, "self_steps": None,
                      "weights": inline["weights"], "blend": None})
    specs += [spec for i, row in enumerate(form.rows[:max(int(form.count), 0)], 1)
              if (spec := _edit_spec(i, row)) is not None]
    if not specs:
        raise user_error("type at least one edit prompt, or inline markup in the source: 'a [cat->dog]'",
                     field=_row_key(1, "prompt"))
    try:
        steps, guidance = int(form.steps), float(form.guidance)
    except (TypeError, ValueError, OverflowError):  # only a forged request sends these: the sliders give numbers
        raise user_error(f"steps and guidance must be numbers, not {form.steps!r} and {form.guidance!r}",
                     field="steps") from None
    try:
        check_int(steps, "steps", 1, MAX_STEPS)
    except ValueError as error:
        raise user_error(str(error), field="steps") from None
    try:
        check_guidance(guidance)
    except ValueError as error:
        raise user_error(str(error), field="guidance") from None
    seed = form.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed)
                             or seed >= 2**63):  # only a forged request: the seed box gives numbers
        raise user_error(f"the seed must be a whole number from 0 to 2**63 - 1 (-1: random), not {seed!r}", field="seed")
    if form.image:
        check_upload(form.image, max_bytes)
    return _Request(form.model, source, specs, steps, guidance, seed, form.image or None, form.method)

