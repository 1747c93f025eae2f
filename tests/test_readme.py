"""The documentation's runnable examples run.

A runnable example is a Python block of README.md or of a docs/*.md page marked `<!-- readme-test: NAME -->` on the
line before its fence. The blocks of one NAME in one file run as one program, in their order; the test id is
"FILE:NAME" (for example "docs/mmdit.md:mmdit").
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)


def _blocks() -> dict[str, str]:
    """The code of every marked example, keyed "FILE:NAME" with FILE relative to the repository root."""
    blocks: dict[str, str] = {}
    for page in PAGES:
        for name, code in BLOCK.findall(page.read_text(encoding="utf-8")):
            key = f"{page.relative_to(ROOT).as_posix()}:{name}"
            blocks[key] = blocks.get(key, "") + code
    return blocks


def test_the_docs_mark_their_runnable_examples():
    assert any(key.endswith(":mmdit") for key in _blocks()), "no page marks the mmdit example"


@pytest.mark.parametrize("key", sorted(_blocks()))
def test_doc_example_runs(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save their pictures in the current folder
    exec(compile(_blocks()[key], key, "exec"), {"__name__": "readme"})
    assert any(tmp_path.glob("*.png"))
