"""The README's runnable examples run: the code blocks marked `<!-- readme-test: NAME -->`, in order, per NAME."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)


def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for name, code in BLOCK.findall(README.read_text(encoding="utf-8")):
        blocks[name] = blocks.get(name, "") + code
    return blocks


def test_the_readme_marks_its_runnable_examples():
    assert "mmdit" in _blocks()


@pytest.mark.parametrize("name", sorted(_blocks()))
def test_readme_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save their pictures in the current folder
    exec(compile(_blocks()[name], f"README.md[{name}]", "exec"), {"__name__": "readme"})
    assert any(tmp_path.glob("*.png"))
