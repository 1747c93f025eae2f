"""The inline edit syntax: one string that holds a source prompt, its edit, and word weights.

    a [cat->dog] riding a bicycle          replace: source "a cat ...", edit "a dog ..."
    a house on a mountain[+ at winter]     refine: the edit gains " at winter"
    a [- fluffy] teddy bear                the edit drops "fluffy" ([fluffy->] is an error: a forgotten new word)
    a (fluffy:2.5) teddy bear              reweight "fluffy" in the edit by 2.5

A backslash makes the next character literal (``\\[``, ``\\(``, ``\\\\``, ``\\->``). Runs of whitespace collapse to
one space, and words are what runs of whitespace separate, as everywhere in prompt2prompt. Weights are keyed by
word position in the edit prompt; they are bounded by `MAX_WEIGHT`.

What the syntax means for a recipe is here too, for every front end alike (the CLI, the web app, batch manifests):
`inline_edit` turns a source prompt's markup into its edit, `edit_prompt` turns an edit prompt (which may weight
words but swaps none) into an edit, each as a recipe's edit spec `{"prompt": ..., "weights": ...}`.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .limits import MAX_WEIGHT

__all__ = ["ParsedPrompt", "PromptSyntaxError", "edit_prompt", "inline_edit", "parse_prompt"]


class PromptSyntaxError(ValueError):
    """A malformed inline prompt; `column` (1-based) points at the offending character."""

    def __init__(self, text: str, column: int, message: str):
        self.text = text
        self.column = column
        self.reason = message
        start = max(0, column - 1 - _CONTEXT) if len(text) > 2 * _CONTEXT else 0  # a long prompt: the part around it
        shown = text[start : start + 2 * _CONTEXT] if start or len(text) > 2 * _CONTEXT else text
        before, after = ("…" if start else ""), ("…" if start + len(shown) < len(text) else "")
        pointer = " " * (len(before) + column - 1 - start) + "^"
        super().__init__(f"column {column}: {message}\n  {before}{_visible(shown)}{after}\n  {pointer}")


_CONTEXT = 40  # characters shown on each side of the column in the error of a long prompt


def _visible(text: str) -> str:
    """`text` on one line, one character per character so that the caret stays under its column."""
    return "".join("↵" if c in "\r\n" else "→" if c == "\t" else "·" if unicodedata.category(c)[0] == "C" else c
                   for c in text)


@dataclass(frozen=True)
class ParsedPrompt:
    """What an inline prompt says: the source, the edit (None without markup) and per-word weights."""

    source: str
    edit: str | None
    weights: dict[int, float] = field(default_factory=dict)  # word position in `edit` -> weight


@dataclass
class _Output:
    """Characters of one prompt being built, each tagged with the weight group (start column) it came from."""

    chars: list[str] = field(default_factory=list)
    groups: list[int | None] = field(default_factory=list)

    def add(self, char: str, group: int | None = None) -> None:
        self.chars.append(char)
        self.groups.append(group)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.source = _Output()
        self.edit = _Output()
        self.weights: dict[int, float] = {}  # weight group column -> weight
        self.marked = False

    def error(self, pos: int, message: str) -> PromptSyntaxError:
        return PromptSyntaxError(self.text, pos + 1, message)

    def literal(self, stop: str) -> tuple[str, int] | None:
        """Read one (possibly escaped) character that is not in `stop`; None at a stop character or the end."""
        if self.pos >= len(self.text) or self.text[self.pos] in stop:
            return None
        start = self.pos
        if self.text[self.pos] == "\\":
            if self.pos + 1 >= len(self.text):
                raise self.error(self.pos, "a backslash must be followed by the character it escapes, e.g. '\\['")
            self.pos += 1
        self.pos += 1
        return self.text[self.pos - 1], start

    def parse(self) -> ParsedPrompt:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "[":
                self.swap()
            elif char == "(":
                self.weighted(self.source, self.edit)
            elif char in "])":
                opener = "[" if char == "]" else "("
                raise self.error(self.pos, f"'{char}' without a matching '{opener}'; write '\\{char}' for a literal one")
            else:
                read = self.literal("")
                assert read is not None
                self.source.add(read[0])
                self.edit.add(read[0])
        return self.result()

    def swap(self) -> None:
        """`[old->new]`, `[+added]` or `[-removed]`; weight groups are allowed in the new text only."""
        opened = self.pos
        self.pos += 1
        self.marked = True
        source_start, edit_start = len(self.source.chars), len(self.edit.chars)
        if self.text.startswith("+", self.pos) or (self.text.startswith("-", self.pos)
                                                   and not self.text.startswith("->", self.pos)):
            sign = self.text[self.pos]
            self.pos += 1
            out, start = (self.edit, edit_start) if sign == "+" else (self.source, source_start)
            self.span(out, opened, allow_weights=sign == "+", arrow=False)
            if not "".join(out.chars[start:]).strip():
                verb, example = ("adds", "[+ at winter]") if sign == "+" else ("removes", "[- fluffy]")
                raise self.error(opened, f"'[{sign}...]' {verb} nothing: put words after the '{sign}', e.g. {example}")
            return
        self.span(self.source, opened, allow_weights=False, arrow=True)
        if not self.text.startswith("->", self.pos):
            raise self.error(self.pos, "expected '->' inside '[...]': write [old->new], [+added] or [-removed]")
        old = _visible(" ".join(self.text[opened + 1 : self.pos].split()))  # as typed, escapes kept: a fix quotes it
        self.pos += 2
        self.span(self.edit, opened, allow_weights=True, arrow=False)
        removed = "".join(self.source.chars[source_start:]).strip()
        added = "".join(self.edit.chars[edit_start:]).strip()
        if not (removed or added):
            raise self.error(opened, "'[->]' changes nothing: put the old words before '->' and the new ones after it")
        if not added:  # a swap whose new words were forgotten would silently delete the old ones
            old = old if len(old) <= _CONTEXT else "old words"
            raise self.error(opened, f"'[{old}->]' names no new words: to remove words, write [-{old}]; to swap "
                                     "them, put the new ones after '->'")

    def span(self, out: _Output, opened: int, *, allow_weights: bool, arrow: bool) -> None:
        """Read text into `out` up to the closing ']' (or up to '->' when `arrow`), consuming the ']'."""
        while True:
            if self.pos >= len(self.text):
                raise self.error(opened, "'[' is never closed: add ']' after the edited words")
            char = self.text[self.pos]
            if self.text.startswith("->", self.pos):
                if arrow:
                    return
                raise self.error(self.pos, "'->' stands once in an edit, between the old and the new words of "
                                           "[old->new]; write '\\->' for a literal arrow")
            if char == "]":
                if arrow:
                    raise self.error(self.pos, "expected '->' before ']': write [old->new], [+added] or [-removed]")
                self.pos += 1
                return
            if char == "[":
                raise self.error(self.pos, "'[' inside '[...]': edits cannot nest; write '\\[' for a literal one")
            if char == "(":
                if not allow_weights:
                    raise self.error(self.pos, "a (word:weight) group can only stand outside '[...]' or in its new text")
                self.weighted(out)
                continue
            if char == ")":
                raise self.error(self.pos, "')' without a matching '('; write '\\)' for a literal one")
            read = self.literal("")
            assert read is not None
            out.add(read[0])

    def weighted(self, *outs: _Output) -> None:
        """`(words:weight)`: the words go to every output in `outs`, tagged with this group."""
        opened = self.pos
        self.pos += 1
        self.marked = True
        words: list[str] = []
        while (read := self.literal("[]():")) is not None:
            words.append(read[0])
        if self.pos >= len(self.text):
            raise self.error(opened, "'(' is never closed: write (word:weight), e.g. (fluffy:2.5)")
        char = self.text[self.pos]
        if char in "[(":
            raise self.error(self.pos, f"'{char}' inside a (word:weight) group: groups and edits cannot nest in one")
        if char != ":":
            raise self.error(self.pos, "expected ':weight' before this character: write (word:weight), e.g. (fluffy:2.5)")
        if not "".join(words).strip():
            raise self.error(opened, "a (word:weight) group needs at least one word, e.g. (fluffy:2.5)")
        colon = self.pos
        self.pos += 1
        number_start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in "[]()":
            self.pos += 1
        if self.pos >= len(self.text) or self.text[self.pos] != ")":
            raise self.error(opened, "'(' is never closed: write (word:weight), e.g. (fluffy:2.5)")
        number = self.text[number_start:self.pos].strip()
        try:
            weight = float(number)
        except ValueError:
            raise self.error(colon + 1, f"the weight {number!r} is not a number: write (word:weight), e.g. (fluffy:2.5)") from None
        if not math.isfinite(weight):
            raise self.error(colon + 1, f"the weight {number!r} must be a finite number")
        if abs(weight) > MAX_WEIGHT:
            raise self.error(colon + 1, f"the weight {number!r} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        self.pos += 1
        self.weights[opened] = weight
        for out in outs:
            for char in words:
                out.add(char, opened)

    def result(self) -> ParsedPrompt:
        source, _ = _words(self.source)
        if not source:
            raise self.error(0, "the source prompt is empty")
        if not self.marked:
            return ParsedPrompt(source=" ".join(source), edit=None)
        edit, groups = _words(self.edit)
        if not edit:
            raise self.error(0, "the edit prompt is empty: an edit must keep or add at least one word")
        weights: dict[int, float] = {}
        for position, word_groups in enumerate(groups):
            if len(word_groups) > 1:
                raise self.error(sorted(word_groups)[1], f"the word {edit[position]!r} is inside two weight groups")
            if word_groups:
                weights[position] = self.weights[word_groups.pop()]
        return ParsedPrompt(source=" ".join(source), edit=" ".join(edit), weights=weights)


def _words(out: _Output) -> tuple[list[str], list[set[int]]]:
    """Split on whitespace, collecting for each word the weight groups its characters came from."""
    words: list[str] = []
    groups: list[set[int]] = []
    current: list[str] = []
    current_groups: set[int] = set()
    for char, group in zip(out.chars + [" "], out.groups + [None]):
        if char.isspace():
            if current:
                words.append("".join(current))
                groups.append(current_groups)
            current, current_groups = [], set()
            continue
        current.append(char)
        if group is not None:
            current_groups.add(group)
    return words, groups


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse an inline prompt into its source, edit and weights.

    Raises `PromptSyntaxError` (a `ValueError`) whose `column` points at the problem.

    >>> parse_prompt("a [cat->dog] riding a bicycle")
    ParsedPrompt(source='a cat riding a bicycle', edit='a dog riding a bicycle', weights={})
    >>> parse_prompt("a house on a mountain[+ at winter]").edit
    'a house on a mountain at winter'
    >>> parse_prompt("a (fluffy:2.5) teddy bear")
    ParsedPrompt(source='a fluffy teddy bear', edit='a fluffy teddy bear', weights={1: 2.5})
    """
    for column, char in enumerate(text, 1):
        if "\ud800" <= char <= "\udfff":  # how Python hands over bytes of a command line that are not UTF-8
            raise PromptSyntaxError(text, column, "this is not a character: the text has bytes that are not UTF-8")
    return _Parser(text).parse()


def _spec(prompt: str, weights: dict[int, float]) -> dict[str, Any]:
    """A recipe's edit spec: the prompt, and its weights as [word position, weight] pairs (None without any)."""
    return {"prompt": prompt, "weights": [[position, weight] for position, weight in weights.items()] or None}


def inline_edit(text: str) -> tuple[str, dict[str, Any] | None]:
    """The source prompt of an inline prompt, and the edit spec its markup makes (None for a plain prompt).

    The spec holds the edit's prompt and weights, as a recipe's edits do; the caller adds its other fields.
    Raises `PromptSyntaxError` as `parse_prompt` does.

    >>> inline_edit("a [cat->dog] on a (red:1.5) mat")
    ('a cat on a red mat', {'prompt': 'a dog on a red mat', 'weights': [[4, 1.5]]})
    >>> inline_edit("a cat on a mat")
    ('a cat on a mat', None)
    """
    parsed = parse_prompt(text)
    return parsed.source, None if parsed.edit is None else _spec(parsed.edit, parsed.weights)


def edit_prompt(text: str, *, what: str = "an edit") -> dict[str, Any]:
    """The edit spec of an edit prompt: one that may weight words, "a (fluffy:2) cat", but swaps, adds or drops
    none, since [old->new] markup belongs in the source prompt.

    `what` names the prompt in the error (the option or field it came from). Raises `PromptSyntaxError` as
    `parse_prompt` does, and a ValueError for [old->new] markup.

    >>> edit_prompt("a (fluffy:2) cat")
    {'prompt': 'a fluffy cat', 'weights': [[1, 2.0]]}
    >>> edit_prompt("a dog")
    {'prompt': 'a dog', 'weights': None}
    """
    parsed = parse_prompt(text)
    if parsed.edit is not None and parsed.edit != parsed.source:
        raise ValueError(f"{what} takes an edit prompt, optionally with (word:weight) groups, not [old->new] markup: "
                         f"{text!r}; put the markup in the source prompt instead")
    return _spec(parsed.source, parsed.weights)
