import ast
from pathlib import Path

import prompt2prompt


def test_public_api_is_pinned():
    assert prompt2prompt.__all__ == sorted(prompt2prompt.__all__)
    assert prompt2prompt.__all__ == [
        "Edit", "EditResult", "Editor", "Inversion", "LocalBlend", "attention_heatmaps", "image_grid", "invert",
    ]
    for name in prompt2prompt.__all__:
        assert getattr(prompt2prompt, name).__doc__, f"{name} has no docstring"


# Private names that a module imports from another: none. Every front end goes through the public seam.
ALLOWED_PRIVATE_IMPORTS: dict[str, set[str]] = {}


def private_imports(path: Path) -> set[str]:
    """The names starting with "_" that a module imports from prompt2prompt's other modules."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and node.module != "prompt2prompt" and not (node.module or "").startswith("prompt2prompt."):
            continue  # another package's names are its business
        names |= {alias.name for alias in node.names if alias.name.startswith("_")}
    return names


def test_no_module_imports_another_modules_private_names():
    package = Path(prompt2prompt.__file__).parent
    found = {path.relative_to(package).as_posix(): names for path in sorted(package.rglob("*.py"))
             if (names := private_imports(path))}
    assert found == ALLOWED_PRIVATE_IMPORTS, (
        f"private names imported across modules: {found}, allowed: {ALLOWED_PRIVATE_IMPORTS}; import public names, or "
        "make the name public where it is defined (and drop allowed entries that are gone)"
    )
