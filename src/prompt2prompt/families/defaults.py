"""A model's defaults: steps, guidance, the edit windows and the blend threshold a run uses when it is not told.

They come from three places, in order: the model's own `prompt2prompt.json` (beside its `model_index.json`; the
demo model ships one), its family (Stable Diffusion's 50 steps and guidance 7.5, Flux's 28 and 3.5, ...), and the
paper (cross-attention 0.8, self-attention 0.4, blend threshold 0.3). A model file may also name words whose swaps
need other windows (the demo model's shape words: a shape swap takes only with a short cross-attention window), the
layers an `Editor` of it uses when not told (`Editor`'s layer keywords: `blend_res` and `self_replace_max_res` on
UNet models, `cross_blocks`, `self_blocks` and `record_blocks` on MM-DiT models), and, for a model trained on a
closed set of captions (the demo models), its `vocabulary`: the front ends name the words of a prompt outside it.

The front ends (CLI, web app, batch, recipes) fill what the user left out from these and say which they used; the
Python `Edit` and `LocalBlend` keep the paper's defaults, as the contract states them.

A `prompt2prompt.json`:

    {"num_inference_steps": 30, "guidance_scale": 5.0, "cross_steps": 0.8, "self_steps": 0.2,
     "blend_threshold": 0.8,
     "word_windows": [{"name": "shape swap", "words": ["circle", "star"], "cross_steps": 0.5, "self_steps": 0.0}],
     "layers": {"blend_res": 8},
     "example": ["a big red circle in the center", "a big purple circle in the center"],
     "vocabulary": ["a", "big", "blue", "center", "circle", "in", "purple", "red", "the", ...]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..limits import BLEND_THRESHOLD, CROSS_STEPS, SELF_STEPS, check_fraction, check_guidance, check_steps, quoted

DEFAULTS_FILE = "prompt2prompt.json"
FIELDS = ("num_inference_steps", "guidance_scale", "cross_steps", "self_steps", "blend_threshold")
_FILE_FIELDS = (*FIELDS, "word_windows", "layers", "example", "vocabulary", "notes")
LAYER_FIELDS = ("self_replace_max_res", "blend_res", "cross_blocks", "self_blocks", "record_blocks")  # Editor's keywords
EXAMPLE = ("a cat riding a bicycle", "a dog riding a bicycle")  # a source and an edit, for a form's placeholders
_WORD = re.compile(r"[\w'-]+")
MAX_SHOWN_WORDS = 10  # unknown words a notice names; it counts the rest


@dataclass(frozen=True)
class WordWindows:
    """The windows of an edit that swaps, adds or removes one of `words` (e.g. a model's shape words)."""

    name: str
    words: frozenset[str]
    cross_steps: float
    self_steps: float


@dataclass(frozen=True)
class ModelDefaults:
    """What a run of one model uses when it is not told; `origin` says where each value came from."""

    num_inference_steps: int
    guidance_scale: float
    cross_steps: float = CROSS_STEPS
    self_steps: float = SELF_STEPS
    blend_threshold: float = BLEND_THRESHOLD
    word_windows: tuple[WordWindows, ...] = ()
    layers: Mapping[str, Any] = field(default_factory=dict)  # Editor layer keyword -> value, for those not given
    origin: Mapping[str, str] = field(default_factory=dict)  # field -> "the model's prompt2prompt.json", ...
    example: tuple[str, str] = EXAMPLE  # a source prompt and an edit the model draws (the web app's placeholders)
    vocabulary: frozenset[str] = frozenset()  # every word the model was trained on, lowercased; empty: not known

    def windows_for(self, source: str, prompt: str) -> tuple[float, float, str | None]:
        """(cross_steps, self_steps, rule) for an edit of `source` into `prompt` that gives no windows; `rule` names
        the model's word windows that apply ("the model's shape swap windows"), None when the plain defaults do."""
        changed = _words(source) ^ _words(prompt)
        for rule in self.word_windows:
            if changed & rule.words:
                return rule.cross_steps, rule.self_steps, f"the model's {rule.name} windows"
        return self.cross_steps, self.self_steps, None

    def describe(self) -> str:
        """One line: the defaults and where they came from, e.g. for `p2p edit` to print."""
        by_origin: dict[str, list[str]] = {}
        shown = {"num_inference_steps": f"{self.num_inference_steps} steps", "guidance_scale": f"guidance {self.guidance_scale:g}",
                 "cross_steps": f"cross {self.cross_steps:g}", "self_steps": f"self {self.self_steps:g}",
                 "blend_threshold": f"blend threshold {self.blend_threshold:g}"}
        for name in FIELDS:
            by_origin.setdefault(self.origin.get(name, "?"), []).append(shown[name])
        parts = [f"{', '.join(values)} ({origin})" for origin, values in by_origin.items()]
        rules = [f"{rule.name}: cross {rule.cross_steps:g}, self {rule.self_steps:g}" for rule in self.word_windows]
        return "; ".join(parts + rules)


def _words(text: str) -> set[str]:
    return {word.lower() for word in _WORD.findall(text)}


def unknown_words(vocabulary: frozenset[str], prompts: Iterable[str]) -> list[str]:
    """The words of `prompts` outside a model's `vocabulary`, lowercased, once each, in order (none when the
    vocabulary is empty: not known).

    >>> unknown_words(frozenset({"a", "red", "circle"}), ["a red circle", "a light red circle"])
    ['light']
    """
    if not vocabulary:
        return []
    found = [word for prompt in prompts for word in _WORD.findall(prompt.lower())]
    return list(dict.fromkeys(word for word in found if word not in vocabulary))


def vocabulary_notice(vocabulary: frozenset[str], prompts: Iterable[str]) -> str | None:
    """One line naming the words of `prompts` that a model of this `vocabulary` never saw; None when it knows them
    all or lists no vocabulary. The front ends show it as a warning: the run goes ahead."""
    unknown = unknown_words(vocabulary, prompts)
    if not unknown:
        return None
    many = len(unknown) > 1
    words = ", ".join(repr(word) for word in unknown[:MAX_SHOWN_WORDS])
    more = f" and {len(unknown) - MAX_SHOWN_WORDS} more" if len(unknown) > MAX_SHOWN_WORDS else ""
    return (f"the model was never trained on the word{'s' if many else ''} {words}{more}, so it may ignore "
            f"{'them' if many else 'it'} or draw something else; its words are {', '.join(sorted(vocabulary))} "
            f"(the vocabulary in its {DEFAULTS_FILE})")


def folder_vocabulary(folder: str | Path) -> frozenset[str]:
    """The vocabulary that the `prompt2prompt.json` in a model's `folder` lists (empty: it lists none, or has no
    such file); for a front end that checks prompts before it loads the model."""
    path = Path(folder) / DEFAULTS_FILE
    return read_defaults_file(path).get("vocabulary", frozenset()) if path.is_file() else frozenset()


def model_defaults(family, folder: str | Path | None) -> ModelDefaults:
    """The defaults of a model of `family` (a `Family` class or instance) whose files are in `folder` (None: none)."""
    values: dict[str, Any] = {"num_inference_steps": family.default_steps, "guidance_scale": family.default_guidance}
    origin = {name: f"the {family.title} default" for name in values} | {
        name: "the paper's default" for name in ("cross_steps", "self_steps", "blend_threshold")}
    rules: tuple[WordWindows, ...] = ()
    path = Path(folder) / DEFAULTS_FILE if folder is not None else None
    if path is not None and path.is_file():
        data = read_defaults_file(path)
        rules = data.pop("word_windows")
        example = data.pop("example", EXAMPLE)
        layers = data.pop("layers", {})
        vocabulary = data.pop("vocabulary", frozenset())
        values |= data
        origin |= {name: f"the model's {DEFAULTS_FILE}" for name in data}
        return ModelDefaults(**values, word_windows=rules, layers=layers, origin=origin, example=example,
                             vocabulary=vocabulary)
    return ModelDefaults(**values, word_windows=rules, origin=origin)


def read_defaults_file(path: Path) -> dict[str, Any]:
    """A `prompt2prompt.json`, checked as untrusted input: a ValueError naming the file and the field if it is bad."""
    where = f"{str(path)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the model's defaults {where}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the model's defaults {where} must be a JSON object, not {quoted(str(data))}")
    if unknown := sorted(set(data) - set(_FILE_FIELDS)):
        raise ValueError(f"the model's defaults {where} have unknown fields {unknown}; the fields are "
                         f"{', '.join(_FILE_FIELDS)}")
    try:
        out: dict[str, Any] = {}
        if "num_inference_steps" in data:
            out["num_inference_steps"] = check_steps(data["num_inference_steps"])
        if "guidance_scale" in data:
            out["guidance_scale"] = check_guidance(data["guidance_scale"])
        for name in ("cross_steps", "self_steps", "blend_threshold"):
            if name in data:
                out[name] = check_fraction(data[name], name)
        out["word_windows"] = tuple(_word_windows(rule, i) for i, rule in enumerate(data.get("word_windows", []), 1))
        if "layers" in data:
            out["layers"] = _layers(data["layers"])
        if "example" in data:
            example = data["example"]
            if not (isinstance(example, list) and len(example) == 2 and all(isinstance(p, str) and p.strip()
                                                                             for p in example)):
                raise ValueError("example must be [source prompt, edit prompt]")
            out["example"] = tuple(example)
        if "vocabulary" in data:
            out["vocabulary"] = _vocabulary(data["vocabulary"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"the model's defaults {where}: {error}") from None
    return out


def _word_windows(rule: Any, index: int) -> WordWindows:
    what = f"word_windows[{index}]"
    if not isinstance(rule, dict) or not {"words", "cross_steps", "self_steps"} <= set(rule):
        raise ValueError(f"{what} must be an object with name, words, cross_steps and self_steps")
    words = rule["words"]
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{what}.words must be a non-empty list of words")
    name = rule.get("name", "word")
    if not isinstance(name, str):
        raise ValueError(f"{what}.name must be text")
    return WordWindows(name=name, words=frozenset(w.strip().lower() for w in words),
                       cross_steps=check_fraction(rule["cross_steps"], f"{what}.cross_steps"),
                       self_steps=check_fraction(rule["self_steps"], f"{what}.self_steps"))


def _vocabulary(words: Any) -> frozenset[str]:
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and _WORD.fullmatch(w) for w in words):
        raise ValueError("vocabulary must be a non-empty list of words (letters, digits, ' and -), e.g. [\"a\", "
                         "\"red\", \"circle\"]")
    return frozenset(word.lower() for word in words)


def _layers(layers: Any) -> dict[str, Any]:
    """The file's `layers`: Editor layer keywords with an int (a layer side) or a list of ints (block numbers).

    Whether the model's family takes them, and whether the values fit it, the family checks when an Editor is made.
    """
    if not isinstance(layers, dict):
        raise ValueError(f"layers must be an object of Editor layer keywords ({', '.join(LAYER_FIELDS)})")
    if unknown := sorted(set(layers) - set(LAYER_FIELDS)):
        raise ValueError(f"layers has unknown keywords {unknown}; they are {', '.join(LAYER_FIELDS)}")
    for name, value in layers.items():
        one = isinstance(value, int) and not isinstance(value, bool)
        many = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not (one or many):
            raise ValueError(f"layers.{name} must be a number or a list of block numbers, not {quoted(str(value))}")
    return dict(layers)
