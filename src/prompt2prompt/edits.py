"""The edits: `Edit`, `LocalBlend`, and their plain-data form, at the bottom of the package with `limits`.

The dict form is the JSON that recipes, manifests, the CLI and the web app write: the keyword arguments of
`Edit` (`prompt`, `mode`, `cross_steps`, `self_steps`, `weights` as a list of [word, weight] pairs, since JSON
object keys are text and a pair keeps a word position an integer, and `blend` as the keyword arguments of
`LocalBlend`, or None). JSON has no tuples, so (start, end) windows are lists there.
`edit_from_dict(edit_to_dict(edit)) == edit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .alignment import WordRef, check_words, word_spans
from .limits import BLEND_START, BLEND_THRESHOLD, CROSS_STEPS, SELF_STEPS, check_fraction, check_weight, quoted
from .schedules import CrossSteps, Window, as_window

__all__ = ["MODES", "Edit", "LocalBlend", "Words", "blend_from_dict", "blend_to_dict", "check_edit_words", "edit_from_dict",
           "edit_to_dict"]

Words = WordRef | Sequence[WordRef]
MODES = ("auto", "replace", "refine")


def _check_words(words: Words, what: str) -> Words:
    items = [words] if isinstance(words, (str, int)) else words
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not all(
        isinstance(w, (str, int)) and not isinstance(w, bool) for w in items
    ):
        raise TypeError(f"{what} must be a word (text or position) or a sequence of words, not {words!r}")
    return words


@dataclass
class LocalBlend:
    """Confine an edit to where its words attend: outside the mask, the edit keeps the source's latents.

    Args:
        source_words: words of the source prompt whose region may change.
        edit_words: words of the edit prompt whose region may change.
        threshold: mask threshold on the max-normalised attention (0.3: the paper's notebooks).
        start: fraction of the run after which blending starts (0.2).
        exclude_source_words, exclude_edit_words: words whose region must not change.
        exclude_threshold: threshold of the exclusion masks.
    """

    source_words: Words
    edit_words: Words
    _: KW_ONLY
    threshold: float = BLEND_THRESHOLD
    start: float = BLEND_START
    exclude_source_words: Words = ()
    exclude_edit_words: Words = ()
    exclude_threshold: float = BLEND_THRESHOLD

    def __post_init__(self):
        _check_words(self.source_words, "LocalBlend source_words")
        _check_words(self.edit_words, "LocalBlend edit_words")
        _check_words(self.exclude_source_words, "LocalBlend exclude_source_words")
        _check_words(self.exclude_edit_words, "LocalBlend exclude_edit_words")
        check_fraction(self.threshold, "LocalBlend threshold")
        check_fraction(self.start, "LocalBlend start")
        check_fraction(self.exclude_threshold, "LocalBlend exclude_threshold")

    def to_dict(self) -> dict[str, Any]:
        """Its keyword arguments as plain data (the recipe and manifest form); `LocalBlend.from_dict` reads it back."""
        return blend_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalBlend:
        """The LocalBlend that `data` (its keyword arguments) describes."""
        return blend_from_dict(data)


@dataclass
class Edit:
    """One edit of the source prompt.

    Args:
        prompt: the edited prompt.
        mode: "replace" (word swap, same number of words), "refine" (added or removed words), or "auto".
        cross_steps: cross-attention window: a fraction, a (start, end) pair, or a dict with "default" and
            per-word windows (0.8: the paper's demos). A window (a, b) is active at step i of N iff
            floor(a*N) <= i < floor(b*N), so 0.8 of 50 steps is steps 0..39 (the reference code ends at
            int(0.8*(N+1)); see docs/semantics.md, DEPARTS). A dict without "default" gives the other tokens
            0.8, as a bare Edit has (the reference gives them the whole run).
        self_steps: self-attention window (0.4: the paper's demos).
        weights: reweighting of edit-prompt words, e.g. {"fluffy": 2.0}; negative values allowed.
        blend: an optional LocalBlend.
    """

    prompt: str
    _: KW_ONLY
    mode: str = "auto"
    cross_steps: CrossSteps = CROSS_STEPS
    self_steps: Window = SELF_STEPS
    weights: Mapping[WordRef, float] | None = None
    blend: LocalBlend | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"an Edit needs a non-empty prompt, not {self.prompt!r}")
        if self.mode not in MODES:
            raise ValueError(f"Edit mode must be one of {MODES}, not {self.mode!r}")
        if isinstance(self.cross_steps, Mapping):
            for word, window in self.cross_steps.items():
                if isinstance(word, bool) or not isinstance(word, (str, int)):
                    raise TypeError(f"cross_steps keys are 'default', words or word positions, not {word!r}")
                as_window(window, f"cross_steps[{word!r}]")
        else:
            as_window(self.cross_steps, "cross_steps")
        as_window(self.self_steps, "self_steps")
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise TypeError(f"weights must be a dict of word -> weight, not {self.weights!r}")
            for word, weight in self.weights.items():
                check_weight(weight, word)
        if self.blend is not None and not isinstance(self.blend, LocalBlend):
            raise TypeError(f"blend must be a LocalBlend, not {self.blend!r}")

    def to_dict(self) -> dict[str, Any]:
        """This edit as plain data (the recipe and manifest form, see `edit_to_dict`).

        >>> Edit.from_dict(Edit("a dog", weights={"dog": 2.0}).to_dict()) == Edit("a dog", weights={"dog": 2.0})
        True
        """
        return edit_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Edit:
        """The Edit that `data` describes (the form `to_dict` writes); a clear error for a malformed one."""
        return edit_from_dict(data)


def _window_from_json(window: Any) -> Any:
    return tuple(window) if isinstance(window, list) else window


def _window_to_json(window: Any) -> Any:
    return list(window) if isinstance(window, tuple) else window


def _words_to_json(words: Any) -> Any:
    return words if isinstance(words, (str, int)) else list(words)


def blend_to_dict(blend: LocalBlend) -> dict[str, Any]:
    """A LocalBlend as its keyword arguments: the words always, the other options where they are not the default.

    >>> blend_to_dict(LocalBlend(["cat"], "dog", threshold=0.5))
    {'source_words': ['cat'], 'edit_words': 'dog', 'threshold': 0.5}
    """
    data: dict[str, Any] = {}
    for option in dataclasses.fields(LocalBlend):
        value = getattr(blend, option.name)
        if option.default is dataclasses.MISSING or value != option.default:
            data[option.name] = _words_to_json(value) if option.name.endswith("_words") else value
    return data


def blend_from_dict(data: Mapping[str, Any]) -> LocalBlend:
    """The LocalBlend that `data` (its keyword arguments) describes.

    >>> blend_from_dict({"source_words": ["cat"], "edit_words": ["dog"], "start": 0.3}).start
    0.3
    """
    names = [option.name for option in dataclasses.fields(LocalBlend)]
    if unknown := sorted(set(data) - set(names), key=str):
        raise ValueError(f"blend has unknown fields {quoted(', '.join(map(str, unknown)))}; the fields are "
                         f"{', '.join(names)}")
    options = dict(data)
    return LocalBlend(options.pop("source_words"), options.pop("edit_words"), **options)


def edit_to_dict(edit: Edit) -> dict[str, Any]:
    """An Edit in its JSON form, every field present.

    >>> edit_to_dict(Edit("a dog", cross_steps=(0.1, 0.9), weights={"dog": 2.0}))
    {'prompt': 'a dog', 'mode': 'auto', 'cross_steps': [0.1, 0.9], 'self_steps': 0.4, 'weights': [['dog', 2.0]], 'blend': None}
    """
    cross_steps = edit.cross_steps
    if isinstance(cross_steps, Mapping):
        cross_steps = {word: _window_to_json(window) for word, window in cross_steps.items()}
    return {
        "prompt": edit.prompt,
        "mode": edit.mode,
        "cross_steps": _window_to_json(cross_steps),
        "self_steps": _window_to_json(edit.self_steps),
        "weights": None if edit.weights is None else [[word, weight] for word, weight in edit.weights.items()],
        "blend": None if edit.blend is None else blend_to_dict(edit.blend),
    }


def edit_from_dict(data: Mapping[str, Any]) -> Edit:
    """The Edit that `data` describes; fields left out take Edit's defaults.

    >>> edit_from_dict({"prompt": "a dog", "cross_steps": {"default": 0.8, "dog": [0.2, 0.6]}}).cross_steps
    {'default': 0.8, 'dog': (0.2, 0.6)}
    """
    fields = dict(data)
    if fields.get("weights") is not None:
        fields["weights"] = {word: weight for word, weight in fields["weights"]}
    for key in ("cross_steps", "self_steps"):
        if isinstance(fields.get(key), Mapping):
            fields[key] = {word: _window_from_json(window) for word, window in fields[key].items()}
        elif key in fields:
            fields[key] = _window_from_json(fields[key])
    if fields.get("blend") is not None:
        fields["blend"] = blend_from_dict(fields["blend"])
    return Edit(fields.pop("prompt"), **fields)


def check_edit_words(source: str, edits: Sequence[Edit]) -> None:
    """Refuse, without a model, edits that cannot run on `source`: a word they name (weights, per-word windows,
    blend words) missing from its prompt, or a replace between prompts of different word counts.

    Words are those of `alignment.word_spans`, as the engine has them; the engine checks the rest (token counts).

    >>> check_edit_words("a cat", [Edit("a dog", blend=LocalBlend("cat", "bird"))])
    Traceback (most recent call last):
    ...
    ValueError: the word 'bird' is not in the prompt 'a dog'; its words are ['a', 'dog']
    """
    source_words = len(word_spans(source))
    for edit in edits:
        edit_words = len(word_spans(edit.prompt))
        if edit.mode == "replace" and edit_words != source_words:
            raise ValueError(f"replace needs prompts with the same number of words, but the source {source!r} has "
                             f"{source_words} and the edit {edit.prompt!r} has {edit_words}; use mode refine to add "
                             "words")
        check_words(edit.prompt, list(edit.weights or {}))
        if isinstance(edit.cross_steps, Mapping):
            check_words(edit.prompt, [word for word in edit.cross_steps if word != "default"])
        if edit.blend is not None:
            blend = edit.blend
            for prompt, words in ((source, blend.source_words), (edit.prompt, blend.edit_words),
                                  (source, blend.exclude_source_words), (edit.prompt, blend.exclude_edit_words)):
                check_words(prompt, words)
