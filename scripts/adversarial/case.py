"""The Case and Context types, the demo prompts every category edits, and the text helpers of the report."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "src" / "prompt2prompt" / "demo" / "model"
CATEGORIES = ("syntax", "cli", "image", "replay", "batch", "api", "web")

SRC = "a big red circle in the center on a white background"
EDIT = "a big green circle in the center on a white background"
TAIL = " circle in the center on a white background"
INLINE = "a big [red->green]" + TAIL
FAST = ["--steps", "2", "--seed", "1"]
CANARY = "PWNED"  # files whose name starts with this are made only by code that should never run


@dataclass
class Case:
    """One adversarial input. `args` (CLI argv after the program) or `code` (a python snippet) is the input;
    `@IN@`, `@OUT@`, `@ROOT@` in args stand for the case's input folder, its --out and its folder."""

    category: str
    name: str
    args: list[str | bytes] | None = None
    code: str | None = None
    expect: str = "any"  # ok | usage | runtime | error | any
    setup: Callable[[Path, Context], None] | None = None
    env: dict[str, str | None] = field(default_factory=dict)
    allowed: tuple[str, ...] = ("out",)  # folders (relative to the case folder) where writes are allowed
    check: Callable[[Path, dict], list[str]] | None = None  # extra checks; returns violations
    assets: tuple[str, ...] = ()  # the replay assets (real recipes, one demo run each) its setup reads
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclass
class Context:
    base: Path
    python: str
    timeout: float
    threads: int
    jobs: int = 1
    assets: dict[str, tuple[Path, dict]] = field(default_factory=dict)


def edit_args(prompt: str | bytes, *extra: str | bytes) -> list[str | bytes]:
    """`p2p edit PROMPT` on the demo model, 2 steps, into the case's --out."""
    return ["edit", prompt, *FAST, "--out", "@OUT@", *extra]


def with_changes(base: dict, changes: dict, *, drop: Any = None) -> dict:
    """`base` with `changes` applied in place: a key whose new value is `drop` is removed."""
    for key, value in changes.items():
        if value is drop:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def quote(value: str | bytes) -> str:
    """Shell-quote an argument; bytes and non-printable text as $'...' with escapes."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    if all(32 <= b < 127 for b in raw):
        return shlex.quote(raw.decode())
    return "$'" + "".join(chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in raw) + "'"


def short(value: Any, limit: int = 160) -> str:
    """`value` as one printable line of at most `limit` characters."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    text = text.encode("unicode_escape").decode("ascii") if any(not c.isprintable() for c in text) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
