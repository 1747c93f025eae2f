"""The package's layout holds: imports go one way (no cycle), nothing outside `families/` asks which model it has,
and every diffusers private name is used in `families/compat.py` alone.

Each rule is a small checker over a source tree's ASTs (imports inside functions included; `if TYPE_CHECKING:`
imports, which never run, left out of the import order but not of the family seam: a caller that names one family's
types in an annotation still knows which model it has); each has a control that runs it on a tree built to break it,
so that a checker that can no longer fail is noticed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prompt2prompt.families import FAMILIES
from prompt2prompt.families.protocols import DescribedFamily, EditingFamily, InvertingFamily, SizedFamily, members

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prompt2prompt"

FAMILY_NAMES = {family.name for family in FAMILIES} | {"mmdit"}  # as recipes record them, and the old "mmdit" branch
# Keyword and tensor names of the pipelines' text inputs: only a family knows which of them its pipeline takes.
TENSOR_NAMES = {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                "add_text_embeds", "add_time_ids", "text_embeds", "time_ids", "prompt_attention_mask",
                "negative_prompt_attention_mask", "encoder_attention_mask", "txt_ids", "img_ids"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "development.md"


def documented_layers(text: str) -> tuple[tuple[str, ...], ...]:
    """The layers of a development guide's "Package layout" list, top first: per numbered item, the modules named
    before its first colon (`limits.py` -> "limits", `engine/` -> "engine", the package's `__init__.py` -> "")."""
    section = text.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        item = re.match(r"\d+\. (.*?): ", line)
        if item:
            names = re.findall(r"`([\w.]+?)(?:\.py|/)`", item.group(1))
            layers.append(tuple("" if name == "__init__" else name for name in names))
    return tuple(layers)


# The documented layers, top first: a module imports its own layer and the layers above it only. The package's root
# re-exports the public API lazily, for the front ends.
LAYERS = documented_layers(DOCS.read_text(encoding="utf-8"))
# Attributes that tell one kind of pipeline from another (a UNet, a transformer, SDXL's and SD3's extra encoders).
MODEL_ATTRIBUTES = {"unet", "transformer", "text_encoder_2", "text_encoder_3", "tokenizer_2", "tokenizer_3"}
# Objects that are diffusers' by this package's naming: a private attribute of one is a diffusers private name.
DIFFUSERS_OBJECTS = {"pipe", "pipeline", "scheduler", "unet", "transformer", "vae", "model", "attn"}
# Each consumer of a family (a module, or a package's modules) and the protocol it is held to.
CONSUMERS = {"engine": EditingFamily, "inversion": InvertingFamily, "images": SizedFamily, "loading": DescribedFamily,
             "recipe": DescribedFamily, "cli": DescribedFamily, "webapp": DescribedFamily}
# The demo model's trainer builds its own UNet: it makes a model of one kind, it does not ask a pipeline's kind.
EXEMPT = {"demo/train.py"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, *, type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions (and under
    `if TYPE_CHECKING:` with `type_checking`)."""
    found = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree) if type_checking else _runtime_nodes(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base for a in node.names]
            for target in targets:
                while target and target not in found:  # `import a.b.c` of a name inside a module
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    graph[name].add(target)
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all of them but the bodies of `if TYPE_CHECKING:` (imports for type checkers only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _root_name(child.test) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _root_name(node: ast.AST) -> str | None:
    """The last name of an expression chain: `self.pipe` -> "pipe", `pipe` -> "pipe"."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _is_model_type(node: ast.AST) -> bool:
    """`type(pipe)`, `type(self.pipe.transformer)`, ...: the class of a pipeline or a model."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" and len(node.args) == 1
            and _root_name(node.args[0]) in DIFFUSERS_OBJECTS - {"scheduler", "vae", "attn"})


def kind_checks(root: Path) -> list[str]:
    """"file:line: what" for every place outside `families/` that asks a model's kind or uses a diffusers private
    name outside `families/compat.py`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in EXEMPT:
            continue
        in_families, in_compat = rel.startswith("families/"), rel == "families/compat.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = (rel, getattr(node, "lineno", 0))
            if not in_compat:
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                        and _root_name(node.value) in DIFFUSERS_OBJECTS:
                    found.append((*where, f"diffusers private name {node.attr}"))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers") \
                        and any(a.name.startswith("_") for a in node.names):
                    found.append((*where, "diffusers private import"))
            if in_families:
                continue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                classes = node.args[1] if len(node.args) > 1 else None
                names = [_root_name(c) for c in (classes.elts if isinstance(classes, ast.Tuple) else [classes])]
                if any(n and (n.endswith("Family") or n.endswith("Pipeline")) for n in names):
                    found.append((*where, "isinstance of a model class"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in MODEL_ATTRIBUTES:
                found.append((*where, f"{node.func.id} of {node.args[1].value}"))
            if isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES:
                found.append((*where, f"reads .{node.attr}"))
            if isinstance(node, ast.Constant) and node.value in TENSOR_NAMES:
                found.append((*where, f"names the pipeline input {node.value!r}"))
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                operands += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts]
                for operand in operands:  # `name == "flux"`, `name in ("pixart", "chroma")`
                    if isinstance(operand, ast.Constant) and operand.value in FAMILY_NAMES:
                        found.append((*where, f"compares with {operand.value!r}"))
                    if isinstance(operand, ast.Attribute) and operand.attr == "__name__" and _is_model_type(operand.value):
                        found.append((*where, "compares a model's class name"))
    return [f"{rel}:{line}: {what}" for rel, line, what in sorted(set(found))]


def family_imports(root: Path) -> list[str]:
    """"a -> b" for every import of one family's own module (`families/<name>.py`) from outside `families/`, type
    annotations' included: a caller asks the family it has (`family_of`, `Family`, `Denoiser`), never one family's
    types by name."""
    shared = {"__init__", "base", "compat", "defaults", "protocols"}  # the seam, not one family
    package = root.name
    found = []
    for module, targets in sorted(import_graph(root, type_checking=True).items()):
        if module.startswith(f"{package}.families"):
            continue
        for target in sorted(targets):
            parts = target.split(".")
            if parts[1:2] == ["families"] and len(parts) > 2 and parts[2] not in shared:
                found.append(f"{module} -> {target}")
    return found


def layer_violations(root: Path) -> list[str]:
    """"a -> b" for every import of a lower layer's module (or of a module in no layer), by `LAYERS`."""
    def layer(module: str) -> int | None:
        top = module.split(".")[1] if "." in module else ""
        return next((i for i, names in enumerate(LAYERS) if top in names), None)

    found = []
    for module, targets in sorted(import_graph(root).items()):
        for target in sorted(targets):
            if layer(module) is None or layer(target) is None or layer(target) > layer(module):
                found.append(f"{module} -> {target}")
    return found


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_package_imports_in_one_direction():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "prompt2prompt.engine.editor" in graph
    assert "prompt2prompt.families" in graph["prompt2prompt.engine.editor"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = _write(tmp_path, {"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\nfrom .b import x\nif TYPE_CHECKING:\n    from .sub import c\n",
                            "b.py": "x = 1\ndef f():\n    from . import a\n", "sub/__init__.py": "",
                            "sub/c.py": "from ..a import x\n"})
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_each_module_imports_only_its_own_layer_and_the_layers_above():
    assert len(import_graph(PACKAGE)) > 30
    assert layer_violations(PACKAGE) == []


def test_the_layers_are_the_documented_ones():
    assert LAYERS[0] == ("limits",) and ("engine",) in LAYERS and LAYERS[-1][0] == ""  # the guide's list was read
    top = {path.stem if path.suffix == ".py" else path.name for path in PACKAGE.iterdir()
           if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()}
    assert top == {name for layer in LAYERS for name in layer} - {""}  # every module in a layer, and no stale name
    guide = ("## Package layout\n\n1. `limits.py`: bounds.\n2. `a.py`, `b/`: maths: `c.py` inside.\n"
             "3. `__init__.py`, `cli/`: the front ends.\n\n## Next\n4. `z.py`: not a layer.\n")
    assert documented_layers(guide) == (("limits",), ("a", "b"), ("", "cli"))


def test_the_layer_check_finds_an_import_of_a_lower_layer_and_an_unplaced_module(tmp_path):
    pkg = _write(tmp_path, {"__init__.py": "", "limits.py": "def f():\n    from .engine import editor\n",
                            "engine/__init__.py": "", "engine/editor.py": "from ..limits import f\n",
                            "extras.py": "from . import limits\n"})
    assert layer_violations(pkg) == ["pkg.extras -> pkg.limits", "pkg.limits -> pkg.engine.editor"]


def test_no_module_outside_families_imports_one_family():
    assert family_imports(PACKAGE) == []


def test_the_family_import_check_finds_a_runtime_import_and_a_type_checking_one(tmp_path):
    pkg = _write(tmp_path, {"__init__.py": "", "families/__init__.py": "", "families/base.py": "",
                            "families/unet.py": "from .base import *\n", "families/mmdit.py": "from . import unet\n",
                            "engine.py": "from .families import base\ndef f():\n    from .families.unet import UNetText\n",
                            "inversion.py": ("from typing import TYPE_CHECKING\nfrom .families.base import Family\n"
                                             "if TYPE_CHECKING:\n    from .families.mmdit import FlowText\n")})
    assert family_imports(pkg) == ["pkg.engine -> pkg.families.unet", "pkg.inversion -> pkg.families.mmdit"]
    assert import_graph(pkg)["pkg.inversion"] == {"pkg.families.base"}  # the import order leaves it out


def test_nothing_outside_families_asks_which_model_it_has():
    assert kind_checks(PACKAGE) == []


def test_the_kind_check_finds_each_kind_of_question(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "families/__init__.py": "def f(pipe):\n    return pipe.unet if family.name == 'unet' else pipe._pack_latents\n",
        "families/compat.py": "def pack(pipe):\n    return pipe._pack_latents\n",
        "front.py": ("def f(pipe, family):\n"
                     "    if family.name == 'mmdit':\n"
                     "        return isinstance(family, FluxFamily)\n"
                     "    if hasattr(pipe, 'text_encoder_2'):\n"
                     "        return pipe.unet\n"
                     "    if type(pipe).__name__ == 'FluxPipeline':\n"
                     "        return pipe._execution_device\n"
                     "    from diffusers.models.transformers.transformer_flux import _get_qkv_projections\n"
                     "    if family.name in ('pixart', 'chroma'):\n"
                     "        return {'add_text_embeds': pipe.unet}\n"),
    })
    found = kind_checks(pkg)
    assert found == [
        "families/__init__.py:2: diffusers private name _pack_latents",
        "front.py:2: compares with 'mmdit'",
        "front.py:3: isinstance of a model class",
        "front.py:4: hasattr of text_encoder_2",
        "front.py:5: reads .unet",
        "front.py:6: compares a model's class name",
        "front.py:7: diffusers private name _execution_device",
        "front.py:8: diffusers private import",
        "front.py:9: compares with 'chroma'",
        "front.py:9: compares with 'pixart'",
        "front.py:10: names the pipeline input 'add_text_embeds'",
        "front.py:10: reads .unet",
    ]


def protocol_violations(root: Path, consumers: dict[str, type]) -> list[str]:
    """`module: family.attr` for every member a consumer reads of a family (a name `family`, or `x.family`) that its
    protocol does not declare."""
    found = modules(root)
    out = []
    for consumer, protocol in consumers.items():
        allowed = members(protocol)
        prefix = f"{root.name}.{consumer}"
        for name, path in found.items():
            if name != prefix and not name.startswith(prefix + "."):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Attribute):
                    continue
                owner = node.value
                is_family = (isinstance(owner, ast.Name) and owner.id == "family") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "family")
                if is_family and node.attr not in allowed:
                    out.append(f"{name}: family.{node.attr} is not in {protocol.__name__}")
    return sorted(set(out))


def test_each_consumer_asks_a_family_only_what_its_protocol_declares():
    assert protocol_violations(PACKAGE, CONSUMERS) == []


def test_the_protocol_check_finds_a_member_outside_the_protocol(tmp_path):
    root = _write(tmp_path, {"engine/__init__.py": "", "engine/run.py": "def f(self):\n    return self.family.tokenizers()\n",
                             "images.py": "def g(family):\n    return family.default_size(), family.denoiser\n"})
    assert protocol_violations(root, {"engine": EditingFamily, "images": SizedFamily}) == [
        "pkg.engine.run: family.tokenizers is not in EditingFamily", "pkg.images: family.denoiser is not in SizedFamily"]
