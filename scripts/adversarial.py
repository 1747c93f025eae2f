#!/usr/bin/env python3
"""Adversarial harness: hostile inputs against every entry point of prompt2prompt, on the demo model.

Not a pytest file: a standalone runner for the "hardening" acceptance (no tracebacks, no hangs, no silent black
images, no code execution, no file written outside --out, one-line errors with exit code 2 for usage and 1 for
runtime). It generates its cases deterministically (no randomness), runs each one in a fresh subprocess with a
timeout, in a fresh folder that is its cwd, HOME and TMPDIR (and holds its --out and its input files), and
classifies the outcome:

- ok           exit 0 (or, for API/web cases, a returned value), and no PNG it wrote is all black or uniform;
- clean-error  exit 1 or 2 with one `error:` line (a prompt syntax error adds the prompt and a caret line);
               for API cases a ValueError/TypeError (or OSError, or a RuntimeError raised by prompt2prompt) with
               a one-line message; for web cases a gradio.Error (or an error the app's run_edit shows as is);
- VIOLATION    a traceback, a timeout, a crash (signal) or an exit code other than 0/1/2, a black or uniform
               image with exit 0, a file written outside --out (HOME, TMPDIR, cwd, the inputs), a canary file
               made by code that should never have run, a multi-line error, an unexpected exception type
               (AttributeError, KeyError, OverflowError, a library's RuntimeError, ...).

Softer findings are "notes" (an exit code other than the one the case expects, a help/usage box, an --out folder
left behind by a failed run, raw control characters echoed to the terminal, ...): reported, never violations.

Usage (use the project's virtual environment: the harness needs Pillow and numpy to build its inputs):

    .venv/bin/python scripts/adversarial.py --list                      # the cases, per category
    .venv/bin/python scripts/adversarial.py --limit 2 --report /tmp/adv.json
    .venv/bin/python scripts/adversarial.py --only replay,batch --report adv.json
    .venv/bin/python scripts/adversarial.py --only cli --match steps --keep

Categories: syntax (inline prompt markup), cli (options), image (--image files), replay (crafted recipes in PNGs),
batch (manifests and output folders), api (the Python API, as python -c snippets), web (webapp._run).
The folders of cases with a violation are kept (see the report) unless --no-keep; --keep keeps every folder.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "src" / "prompt2prompt" / "demo" / "model"
CATEGORIES = ("syntax", "cli", "image", "replay", "batch", "api", "web")
CLI_CODE = "from prompt2prompt.cli import main; main()"  # what the `p2p` entry point runs

SRC = "a big red circle in the center on a white background"
EDIT = "a big green circle in the center on a white background"
TAIL = " circle in the center on a white background"
INLINE = "a big [red->green]" + TAIL
FAST = ["--steps", "2", "--seed", "1"]
CANARY = "PWNED"  # files whose name starts with this are made only by code that should never run

# Environment variables that would send files elsewhere than the case's HOME/TMPDIR, or change the model.
SCRUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE",
             "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "GRADIO_TEMP_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "TRITON_CACHE_DIR", "MPLCONFIGDIR", "P2P_MODEL", "P2P_ALLOW_LARGE", "PYTHONSTARTUP", "TMP", "TEMP",
             "TEMPDIR", "PYTHONHOME", "RAY_ADDRESS")

EXPECT_CODES = {"ok": {0}, "usage": {2}, "runtime": {1}, "error": {1, 2}, "any": {0, 1, 2}}


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------

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
    needs_assets: bool = False
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


def _q(value: str | bytes) -> str:
    """Shell-quote an argument; bytes and non-printable text as $'...' with escapes."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    if all(32 <= b < 127 for b in raw):
        return shlex.quote(raw.decode())
    return "$'" + "".join(chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in raw) + "'"


def _short(value: Any, limit: int = 160) -> str:
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    text = text.encode("unicode_escape").decode("ascii") if any(not c.isprintable() for c in text) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Input files: images, models, PNG recipes
# ----------------------------------------------------------------------------------------------------------------

def _gradient(width: int = 64, height: int = 64):
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, depth: int, color: int, rows: bytes, extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def _png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def write_image(path: Path, kind: str) -> Path:
    """Write one test picture of `kind` at `path` (made here, deterministically)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    photo = _gradient()
    if kind == "png":
        photo.save(path, format="PNG")
    elif kind == "truncated-png":
        data = _png_bytes(photo)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-jpeg":
        data = _jpeg_bytes(photo)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bad-crc-png":
        data = bytearray(_png_bytes(photo))
        at = data.index(b"IDAT") + 20
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind.startswith("bomb-"):  # a few bytes claiming side x side pixels
        side = int(kind.split("-")[1])
        path.write_bytes(_raw_png(side, side, 8, 2, b"\0" * 64))
    elif kind == "zero-width-png":
        path.write_bytes(_raw_png(0, 64, 8, 2, b"\0" * 64))
    elif kind == "one-pixel":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path, format="PNG")
    elif kind == "wide-100000x1":
        _gradient(100_000, 1).save(path, format="PNG")
    elif kind == "tall-1x20000":
        _gradient(1, 20_000).save(path, format="PNG")
    elif kind == "gif-animated":
        frames = [Image.new("P", (64, 64), i * 40) for i in range(4)]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    elif kind == "gray16":
        Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(path, format="PNG")
    elif kind == "rgb16":
        row = np.linspace(0, 65535, 64 * 3).astype(">u2").tobytes()
        path.write_bytes(_raw_png(64, 64, 16, 2, (b"\0" + row) * 64))
    elif kind == "cmyk-jpeg":
        Image.new("CMYK", (64, 64), (0, 128, 255, 0)).save(path, format="JPEG")
    elif kind == "palette-trns":
        image = photo.convert("P")
        image.info["transparency"] = 0
        image.save(path, format="PNG", transparency=0)
    elif kind == "la":
        photo.convert("LA").save(path, format="PNG")
    elif kind == "rgba-transparent":
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path, format="PNG")
    elif kind == "mode1":
        photo.convert("1").save(path, format="PNG")
    elif kind == "int32-tiff":
        Image.fromarray(np.full((64, 64), 2**31 - 1, np.int32), "I").save(path, format="TIFF")
    elif kind == "float-nan-tiff":
        Image.fromarray(np.full((64, 64), np.nan, np.float32), "F").save(path, format="TIFF")
    elif kind == "float-inf-tiff":
        Image.fromarray(np.full((64, 64), np.inf, np.float32), "F").save(path, format="TIFF")
    elif kind == "multipage-tiff":
        photo.save(path, format="TIFF", save_all=True, append_images=[photo.rotate(90)] * 3)
    elif kind == "bmp":
        photo.save(path, format="BMP")
    elif kind == "webp":
        try:
            photo.save(path, format="WEBP")
        except (KeyError, OSError):
            photo.save(path, format="PNG")
    elif kind == "ico":
        photo.save(path, format="ICO")
    elif kind == "svg":
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" '
                        'height="64" fill="red"/></svg>')
    elif kind == "jpeg-named-png":
        path.write_bytes(_jpeg_bytes(photo))
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pdf":
        path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    elif kind == "ztxt-bomb":  # a valid PNG with a text chunk that inflates to 64 MB
        data = _png_bytes(photo)
        bomb = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b" " * (64 << 20), 9))
        at = data.index(b"IDAT") - 4
        path.write_bytes(data[:at] + bomb + data[at:])
    elif kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.save(path, format="JPEG", exif=exif)
    elif kind == "exif-corrupt":
        data = _jpeg_bytes(photo)
        garbage = b"Exif\0\0II*\0" + struct.pack("<I", 8) + b"\xff\xff" + b"\x12\x01\x03\x00" * 40
        path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:])
    elif kind == "huge-exif-ifd-count":
        data = _jpeg_bytes(photo)
        garbage = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 0xFFFF) + b"\0" * 64
        path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:])
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return path


def make_fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def demo_index() -> dict:
    return json.loads((DEMO_MODEL / "model_index.json").read_text())


def model_folder(root: Path, *, index: Any = None, index_text: str | None = None, name: str = "model",
                 components: tuple[str, ...] = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")) -> Path:
    """A model folder whose components are symlinks to the demo model's, with its own model_index.json."""
    folder = root / "in" / name
    folder.mkdir(parents=True)
    for component in components:
        (folder / component).symlink_to(DEMO_MODEL / component, target_is_directory=True)
    if index_text is None:
        index_text = json.dumps(demo_index() if index is None else index)
    (folder / "model_index.json").write_text(index_text)
    return folder


def real_component(folder: Path, component: str) -> Path:
    """Turn a symlinked component into a folder of symlinked files, so that one file can be changed."""
    link = folder / component
    link.unlink()
    link.mkdir()
    for file in (DEMO_MODEL / component).iterdir():
        (link / file.name).symlink_to(file)
    return link


def _pickle_payload(target: Path) -> bytes:
    """A pickle that writes `target` when loaded by an unrestricted unpickler."""
    code = f"open({str(target)!r}, 'w').write('pickle payload ran')"
    # protocol 2: PROTO, GLOBAL builtins exec, the code string, TUPLE1, REDUCE, STOP
    return (b"\x80\x02cbuiltins\nexec\n" + b"X" + struct.pack("<I", len(code.encode())) + code.encode()
            + b"\x85R.")


def canary_module(root: Path, name: str = "canary_mod") -> None:
    """A module in the case's cwd (first on sys.path for `python -c`): importing it leaves a canary file."""
    (root / "cwd" / f"{name}.py").write_text(
        "import os\n"
        f"open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '{CANARY}-{name}'), 'w').write('imported')\n"
        "class Canary:\n    pass\n")


def write_recipe_png(source_png: Path, target: Path, text: str | None, how: str = "itxt") -> Path:
    """A copy of `source_png`'s pixels carrying `text` as its prompt2prompt chunk (written as `how` says)."""
    from PIL import Image, PngImagePlugin

    with Image.open(source_png) as image:
        pixels = image.convert("RGB")
    info = PngImagePlugin.PngInfo()
    if how == "itxt":
        info.add_itxt("prompt2prompt", text)
    elif how == "itxt-zip":
        info.add_itxt("prompt2prompt", text, zip=True)
    elif how == "text":
        info.add_text("prompt2prompt", text)
    elif how == "text-zip":
        info.add_text("prompt2prompt", text, zip=True)
    elif how == "twice":
        info.add_itxt("prompt2prompt", text)
        info.add_itxt("prompt2prompt", json.dumps({"format": 1}))
    elif how == "other-key":
        info.add_itxt("Prompt2Prompt", text)
    elif how != "none":
        raise ValueError(how)
    target.parent.mkdir(parents=True, exist_ok=True)
    pixels.save(target, format="PNG", pnginfo=info)
    return target


def _system_file() -> Path:
    """A small readable file outside the case folder (for recipes that point at one)."""
    return next(p for p in (Path("/etc/hostname"), Path("/etc/passwd"), Path(__file__)) if p.is_file())


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Snippet wrapper (API and web cases)
# ----------------------------------------------------------------------------------------------------------------

WRAPPER = r'''
import json, os, sys, traceback
ROOT, IN, OUT = sys.argv[1:4]

def _origin(tb):
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?", "?"
    last = frames[-1]
    where = f"{last.filename}:{last.lineno} in {last.name}"
    name = last.filename
    if os.sep + "prompt2prompt" + os.sep in name:
        return "prompt2prompt", where
    if "site-packages" + os.sep in name:
        return "library:" + name.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0], where
    if name.startswith("<"):
        return "snippet", where
    return "stdlib", where

def _save(result):
    info = {"repr": repr(result)[:300]}
    images = getattr(result, "images", None)
    if images is None:
        return info
    import numpy as np
    saved, nonfinite = [], False
    items = [images[i] for i in range(len(images))]
    for i, item in enumerate(items):
        if hasattr(item, "save"):
            path = os.path.join(OUT, f"api-{i}.png")
            item.save(path)
            saved.append(path)
            continue
        array = item.detach().float().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            nonfinite = True
    info.update(saved=saved, nonfinite=nonfinite, count=len(items))
    return info

def _report(payload):
    sys.stdout.write("\n@@P2P@@" + json.dumps(payload, default=repr) + "\n")
    sys.stdout.flush()

RESULT = None
try:
    exec(compile(PRELUDE, "<prelude>", "exec"), globals())
    exec(compile(SNIPPET, "<case>", "exec"), globals())
except BaseException as error:
    origin, where = _origin(error.__traceback__)
    gradio = any(c.__name__ == "Error" and c.__module__.startswith("gradio") for c in type(error).__mro__)
    message = getattr(error, "message", None) if gradio else None
    _report({"status": "raised", "type": type(error).__name__, "module": type(error).__module__,
             "mro": [c.__name__ for c in type(error).__mro__], "gradio_error": gradio,
             "message": str(message if message is not None else error), "origin": origin, "where": where})
else:
    _report({"status": "returned", **_save(RESULT)})
'''

API_PRELUDE = f'''
import math, numbers
import numpy as np
import torch
import prompt2prompt as p2p
SRC = {SRC!r}
EDIT = {EDIT!r}
FAST = dict(num_inference_steps=2, seed=1)
_EDITOR = []
def editor():
    if not _EDITOR:
        _EDITOR.append(p2p.Editor.from_pretrained("demo"))
    return _EDITOR[0]
'''

WEB_PRELUDE = f'''
import os
from pathlib import Path
import prompt2prompt.cli  # as `p2p serve` does, before the web app
os.environ["GRADIO_TEMP_DIR"] = os.path.join(OUT, ".gradio")  # as build_app does, before gradio is imported
import gradio as gr
from prompt2prompt import webapp
SRC = {SRC!r}
EDIT = {EDIT!r}
NAN, INF = float("nan"), float("inf")
def row(prompt=EDIT, mode="auto", cross=0.8, self_steps=0.4, weight_words=None, weight=1.0, blend_source=None,
        blend_edit=None, exclude_source=None, exclude_edit=None, threshold=0.3):
    return [prompt, mode, cross, self_steps, weight_words or [], weight, blend_source or [], blend_edit or [],
            exclude_source or [], exclude_edit or [], threshold]
def rows(*given):
    values = [None] * (webapp.ROW_FIELDS * webapp.MAX_EDITS)
    for i, r in enumerate(given):
        values[i * webapp.ROW_FIELDS:(i + 1) * webapp.ROW_FIELDS] = r
    return values
EDITORS = webapp._Editors(["demo"], "cpu", "auto")
def run(source=SRC, *, model="demo", seed=1, steps=2, guidance=7.5, image=None, method="null-text", count=1,
        edit_rows=None, max_bytes=10 * 2**20):
    values = rows(row()) if edit_rows is None else edit_rows
    return webapp._run(EDITORS, Path(OUT), max_bytes, model, source, seed, steps, guidance, image, method, count,
                       *values)
'''


def snippet_program(prelude: str, snippet: str) -> str:
    return f"PRELUDE = {prelude!r}\nSNIPPET = {snippet!r}\n" + WRAPPER


# ----------------------------------------------------------------------------------------------------------------
# Case generation
# ----------------------------------------------------------------------------------------------------------------

def _edit(prompt: str | bytes, *extra: str | bytes) -> list[str | bytes]:
    return ["edit", prompt, *FAST, "--out", "@OUT@", *extra]


def syntax_cases() -> list[Case]:
    """Inline markup, prompt text and words: `p2p edit PROMPT` (and `attention`), each prompt new to the tests."""
    cases: list[tuple[str, str | bytes, str]] = [
        # brackets
        ("two-swaps", "a big [red->green] circle [in->at] the center", "ok"),
        ("nested-swap-in-old", "a big [[red->green]->blue] circle", "usage"),
        ("nested-swap-in-new", "a big [red->[green->blue]] circle", "usage"),
        ("double-close", "a big [red->green]] circle", "usage"),
        ("stray-close-before-edit", "a big red] circle[+ shiny]", "usage"),
        ("reversed-brackets", "a big ]red->green[ circle", "usage"),
        ("unclosed-at-end", "a big circle [red->", "usage"),
        ("open-only", "[", "usage"),
        ("close-only", "]", "usage"),
        ("2000-opens", "[" * 2000, "usage"),
        ("20000-parens", "(" * 20000, "usage"),
        ("alternating-opens", "[(" * 500, "usage"),
        ("balanced-deep", "[" * 300 + "a->b" + "]" * 300, "usage"),
        ("four-arrows", "a big [red->green->blue->pink] circle", "usage"),
        ("arrow-arrow", "a big [red->->green] circle", "usage"),
        ("bare-swap-markup", "[->]", "usage"),
        ("spaces-around-arrow", "a big [ -> ] circle", "usage"),
        ("insert-via-arrow", "a big [->shiny] red" + TAIL, "ok"),
        ("delete-via-arrow", "a big [red->]" + TAIL, "usage"),  # a forgotten new word: [-red] removes one
        ("bare-plus", "[+]", "usage"),
        ("bare-minus", "[-]", "usage"),
        ("plus-tab", "a big red circle[+\t]", "usage"),
        ("minus-spaces", "a big red circle [-   ]", "usage"),
        ("minus-then-arrow", "a big [-->] circle", "usage"),
        ("plus-then-arrow", "a big [+->green] circle", "usage"),
        ("plus-with-weight", "a big red circle[+ (shiny:2)]", "ok"),
        ("minus-with-weight", "a big [-(red:2)] circle", "usage"),
        ("weight-in-old-words", "a big [(red:2)->green] circle", "usage"),
        ("markup-only-swap", "[red->green]", "ok"),
        # weights
        ("weight-nan", "a big (red:nan)" + TAIL, "usage"),
        ("weight-NaN-mixed-case", "a big (red:NaN)" + TAIL, "usage"),
        ("weight-minus-inf", "a big (red:-inf)" + TAIL, "usage"),
        ("weight-Infinity", "a big (red:Infinity)" + TAIL, "usage"),
        ("weight-1e309", "a big (red:1e309)" + TAIL, "usage"),
        ("weight-minus-1e39", "a big (red:-1e39)" + TAIL, "usage"),
        ("weight-just-over-100", "a big (red:100.0000001)" + TAIL, "usage"),
        ("weight-minus-100", "a big (red:-100)" + TAIL, "any"),
        ("weight-plus-100", "a big (red:100)" + TAIL, "any"),
        ("weight-zero", "a big (red:0)" + TAIL, "ok"),
        ("weight-minus-zero", "a big (red:-0.0)" + TAIL, "ok"),
        ("weight-underscore-1000", "a big (red:1_000)" + TAIL, "usage"),
        ("weight-underscore-15", "a big (red:1_5)" + TAIL, "any"),
        ("weight-hex", "a big (red:0x10)" + TAIL, "usage"),
        ("weight-empty-number", "a big (red:)" + TAIL, "usage"),
        ("weight-no-word", "a big (:2)" + TAIL, "usage"),
        ("weight-space-word", "a big ( :2)" + TAIL, "usage"),
        ("weight-two-colons", "a big (red:2:3)" + TAIL, "usage"),
        ("weight-fullwidth-digit", "a big (red:\uff12)" + TAIL, "any"),
        ("weight-arabic-digit", "a big (red:\u0663)" + TAIL, "any"),
        ("weight-1e-400", "a big (red:1e-400)" + TAIL, "ok"),
        ("weight-groups-touching", "a big (red:2)(green:3)" + TAIL, "usage"),
        ("weight-multiword-group", "a (big red:1.5)" + TAIL, "ok"),
        ("weight-unclosed", "a big (red:2" + TAIL, "usage"),
        ("weight-close-only", "a big red:2)" + TAIL, "usage"),
        ("weight-negative-in-new", "a big [red->(green:-2.5)]" + TAIL, "ok"),
        ("weight-after-swap", "a big [red->green](circle:2) in the center", "ok"),
        ("weight-spaces-around", "a big (red : 2 )" + TAIL, "any"),
        ("weight-whole-prompt", "(a big red circle in the center on a white background:1.3)", "ok"),
        # escapes
        ("escaped-brackets-only", r"a big \[red\] circle", "usage"),
        ("escaped-paren-and-edit", r"a big \(red:2\) circle[+ shiny]", "ok"),
        ("trailing-backslash", "a big red circle[+ shiny]\\", "usage"),
        ("escaped-close-in-new", r"a big [red->gr\]een]" + TAIL, "ok"),
        ("escaped-arrow-no-arrow", r"a big [red\->green] circle", "usage"),
        ("double-backslash-in-new", r"a big [red->green\\]" + TAIL, "ok"),
        ("backslash-before-letter", r"a big [red->\g\r\e\e\n]" + TAIL, "ok"),
        # unicode and invisible characters
        ("cjk-new-word", "a big [red->\u7ea2\u8272]" + TAIL, "ok"),
        ("emoji-new-word", "a big [red->\U0001f534]" + TAIL, "ok"),
        ("emoji-zwj-family", "a big [red->\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466]" + TAIL, "ok"),
        ("emoji-only-prompt", "\U0001f7e5 [\U0001f7e5->\U0001f7e9]", "ok"),
        ("zwsp-inside-word", "a big [red->gr\u200been]" + TAIL, "ok"),
        ("zwsp-as-new-word", "a big [red->\u200b]" + TAIL, "any"),
        ("zwsp-added-word", "a big red circle[+\u200b]", "any"),
        ("zwsp-weighted", "a big (\u200b:2) red" + TAIL, "any"),
        ("zwsp-source-with-add", "\u200b[+ red]", "any"),
        ("zwj-replaced", "[\u200d->red] circle", "any"),
        ("soft-hyphen-word", "a big [red->\u00ad]" + TAIL, "any"),
        ("variation-selector-word", "a big [red->\ufe0f]" + TAIL, "any"),
        ("bom-prefix", "\ufeffa big [red->green]" + TAIL, "ok"),
        ("nbsp-separators", "a\u00a0big\u00a0[red->green]\u00a0circle", "ok"),
        ("ideographic-space", "a\u3000big [red->green]\u3000circle", "ok"),
        ("line-separator", "a big [red->green]\u2028circle", "ok"),
        ("rtl-arabic-word", "a big [red->\u0623\u062d\u0645\u0631]" + TAIL, "ok"),
        ("rtl-override", "a big \u202e[red->green]\u202c" + TAIL, "any"),
        ("bidi-isolates", "\u2067a big [red->green]" + TAIL + "\u2069", "any"),
        ("combining-accent", "a big [red->gree\u0301n]" + TAIL, "ok"),
        ("nfc-vs-nfd-swap", "a [caf\u00e9->cafe\u0301]" + TAIL, "ok"),
        ("bell-char", "a big [red->green]\x07" + TAIL, "any"),
        ("ansi-escape-in-word", "a big [red->\x1b[31mgreen\x1b[0m]" + TAIL, "any"),
        ("ansi-clear-in-error", "a big [red->\x1b[2J", "usage"),
        ("carriage-return", "a big \r[red->green]" + TAIL, "ok"),
        ("newlines-in-error", "a big\n[red->green\ncircle", "usage"),
        ("tabs", "a\tbig\t[red->green]\tcircle", "ok"),
        ("vtab-formfeed", "a\x0bbig\x0c[red->green]" + TAIL, "ok"),
        ("file-separator-x1c", "a\x1cbig [red->green]" + TAIL, "any"),
        ("del-char", "a big [red->gr\x7feen]" + TAIL, "any"),
        ("nel-x85", "a big\x85[red->green]" + TAIL, "any"),
        ("private-use-char", "a big [red->\ue000]" + TAIL, "any"),
        ("math-bold-letters", "a big [red->\U0001d420\U0001d42b\U0001d41e\U0001d41e\U0001d427]" + TAIL, "ok"),
        ("non-utf8-argv-byte", b"a big [red->gr\xffeen]" + TAIL.encode(), "any"),
        ("latin1-argv-bytes", b"a big [red->gr\xe9en] circle", "any"),
        ("lone-surrogate-argv", b"a big [red->\xed\xa0\x80]" + TAIL.encode(), "any"),
        # lengths
        ("over-77-tokens", "a big red circle " * 25 + "[red->green]", "usage"),
        ("75-words", " ".join(["red"] * 74) + " [red->green]", "ok"),
        ("76-words", " ".join(["red"] * 75) + " [red->green]", "usage"),
        ("single-3000-char-word", "x" * 3000 + " [a->b]", "usage"),
        ("100k-chars", "red " * 25000 + "[red->green]", "usage"),
        ("long-only-in-new", "a big [red->" + "green " * 80 + "]" + TAIL, "usage"),
        ("long-only-in-addition", "a big red circle[+" + " shiny" * 80 + "]", "usage"),
        ("30-swaps", " ".join(f"[w{i}->v{i}]" for i in range(30)), "any"),
        ("40-weight-groups", " ".join(f"(w{i}:1.{i})" for i in range(40)), "any"),
        # empty-ish, punctuation, repeats, case
        ("whitespace-only", "   \t  ", "usage"),
        ("newlines-only", "\n\n\n", "usage"),
        ("unicode-spaces-only", "\u00a0\u2003\u3000", "usage"),
        ("punctuation-swap", "!!! [?->.] ,,,", "ok"),
        ("punctuation-only-markup", "[.->,]", "ok"),
        ("punctuation-weight", "(!:2) !!", "ok"),
        ("punctuation-addition", "...[+ !!!]", "ok"),
        ("repeated-words", "red red red [red->green] red", "ok"),
        ("identity-swap", "a big [circle->circle] circle", "ok"),
        ("case-only-swap", "a big [Red->red]" + TAIL, "ok"),
        ("uppercase-swap", "a big [red->RED]" + TAIL, "ok"),
        ("punctuation-attached-swap", "a big [red->red.]" + TAIL, "ok"),
        ("comma-removed-swap", "a big [red,->red]" + TAIL, "ok"),
        ("prompt-starting-with-dash", "-a big [red->green]" + TAIL, "usage"),
    ]
    out = [Case("syntax", name, args=_edit(prompt), expect=expect) for name, prompt, expect in cases]
    out += [
        Case("syntax", "dash-prompt-after-double-dash", args=["edit", *FAST, "--out", "@OUT@", "--",
                                                              "-a big [red->green]" + TAIL], expect="ok"),
        Case("syntax", "to-with-weight-nan", args=_edit(SRC, "--to", "a big (green:nan)" + TAIL), expect="usage"),
        Case("syntax", "to-empty", args=_edit(SRC, "--to", ""), expect="usage"),
        Case("syntax", "to-whitespace", args=_edit(SRC, "--to", " \t "), expect="usage"),
        Case("syntax", "to-zwsp", args=_edit(SRC, "--to", "\u200b"), expect="any"),
        Case("syntax", "to-unclosed-group", args=_edit(SRC, "--to", "a big (green" + TAIL), expect="usage"),
        Case("syntax", "to-plus-markup", args=_edit(SRC, "--to", "a big red circle[+ shiny]"), expect="usage"),
        Case("syntax", "to-same-as-source", args=_edit(SRC, "--to", SRC), expect="ok"),
        Case("syntax", "weight-option-case-differs", args=_edit(INLINE, "--weight", "GREEN=2"), expect="usage"),
        Case("syntax", "weight-option-punctuated-word", args=_edit("a big [red->green.]" + TAIL, "--weight",
                                                                    "green.=2"), expect="ok"),
        Case("syntax", "blend-case-differs", args=_edit(INLINE, "--blend", "Red:green"), expect="usage"),
        Case("syntax", "blend-punctuation-differs", args=_edit("a big [red->green.]" + TAIL, "--blend", "red:green"),
             expect="usage"),
        Case("syntax", "blend-nfd-vs-nfc", args=_edit("a [caf\u00e9->tea]" + TAIL, "--blend", "cafe\u0301:tea"),
             expect="usage"),
        Case("syntax", "cross-word-zwsp", args=_edit("a big [red->\u200b]" + TAIL, "--cross-word", "\u200b=0.5"),
             expect="any"),
        Case("syntax", "attention-weight-markup", args=["attention", "a big (red:2)" + TAIL, *FAST, "--out", "@OUT@"],
             expect="usage"),
        Case("syntax", "attention-zwsp", args=["attention", "\u200b", *FAST, "--out", "@OUT@"], expect="any"),
        Case("syntax", "attention-over-77", args=["attention", "red " * 90, *FAST, "--out", "@OUT@"], expect="usage"),
        Case("syntax", "attention-unclosed", args=["attention", "a big [red", *FAST, "--out", "@OUT@"], expect="usage"),
        Case("syntax", "attention-punctuation", args=["attention", "?!.,", *FAST, "--out", "@OUT@"], expect="ok"),
        Case("syntax", "negative-with-markup", args=_edit(INLINE, "--negative", "[blurry->sharp]"), expect="any"),
        Case("syntax", "negative-zwsp", args=_edit(INLINE, "--negative", "\u200b"), expect="any"),
        Case("syntax", "negative-ansi", args=_edit(INLINE, "--negative", "\x1b[2J\x1b[H"), expect="any"),
        Case("syntax", "negative-over-77-tokens", args=_edit(INLINE, "--negative", "dark " * 90), expect="usage"),
    ]
    return out


def _afile(root: Path, _ctx: Context) -> None:
    (root / "in" / "afile").write_text("a file, not a folder\n")


def _setup_all(*steps: Callable[[Path, Context], None]) -> Callable[[Path, Context], None]:
    def setup(root: Path, ctx: Context) -> None:
        for step in steps:
            step(root, ctx)
    return setup


def _image_at(name: str, kind: str) -> Callable[[Path, Context], None]:
    return lambda root, ctx: write_image(root / "in" / name, kind)


def _model_setup(**kwargs) -> Callable[[Path, Context], None]:
    return lambda root, ctx: model_folder(root, **kwargs)


def cli_cases() -> list[Case]:
    """Options: numbers, devices, dtypes, output folders, edit options and models."""
    cases: list[Case] = []

    def add(name, args, expect="any", **kwargs):
        cases.append(Case("cli", name, args=args, expect=expect, **kwargs))

    big = str(10**30)
    # numbers
    for value, expect in [("-1", "usage"), (big, "usage"), ("2.5", "usage"), ("nan", "usage"), ("inf", "usage"),
                          ("", "usage"), ("0x10", "usage"), ("1e3", "usage"), (" 2", "any"), ("+2", "any"),
                          ("\u0662", "any"), ("1001", "usage"), ("1000", "ok")]:
        add(f"steps={value!r}", _edit(INLINE, "--steps", value), expect)
    for value, expect in [("0", "ok"), ("-1", "ok"), ("1e30", "usage"), ("100.0001", "usage"), ("-100", "any"),
                          ("100", "any"), ("1e309", "usage"), ("-1e309", "usage"), ("abc", "usage"), ("", "usage"),
                          ("0x10", "usage"), ("1_0", "any"), ("-nan", "usage")]:
        add(f"guidance={value!r}", _edit(INLINE, "--guidance", value), expect)
    for value, expect in [("-1", "usage"), (str(2**63), "usage"), (str(2**63 - 1), "ok"), ("1.5", "usage"),
                          ("nan", "usage"), (big, "usage"), ("0", "ok"), ("0" * 30 + "1", "ok"), ("", "usage")]:
        add(f"seed={value!r}", ["edit", INLINE, "--steps", "2", "--out", "@OUT@", "--seed", value], expect)
    for option in ("--height", "--width"):
        for value, expect in [("1", "usage"), ("7", "usage"), ("63", "usage"), ("65", "usage"), ("0", "usage"),
                              ("-64", "usage"), ("8", "usage"), ("24", "usage"), ("40", "usage"), ("4104", "usage"),
                              (big, "usage"), ("2.5", "usage"), ("nan", "usage")]:
            add(f"{option[2:]}={value!r}", _edit(INLINE, option, value), expect)
    for height, width, expect in [("128", "128", "ok"), ("96", "32", "ok"), ("32", "32", "ok"), ("4096", "4096", "usage"),
                                  ("128", "160", "usage"), ("32", "4096", "usage"), ("32", "96", "ok")]:
        add(f"size={height}x{width}", _edit(INLINE, "--height", height, "--width", width), expect)
    for value, expect in [("77", "usage"), ("1", "usage"), ("512", "usage"), ("0", "usage"), ("513", "usage"),
                          (big, "usage"), ("abc", "usage")]:
        add(f"max-sequence-length={value}", _edit(INLINE, "--max-sequence-length", value), expect)
    for value, expect in [("0", "usage"), ("-1", "usage"), ("3", "usage"), ("5", "usage"), (big, "usage"),
                          ("1", "any"), ("2", "any"), ("16", "ok"), ("abc", "usage")]:
        add(f"attention-res={value}", ["attention", SRC, *FAST, "--out", "@OUT@", "--res", value], expect)
    # devices and dtypes
    for value, expect in [("cuda", "runtime"), ("cuda:7", "runtime"), ("mps", "runtime"), ("meta", "usage"),
                          ("cpu:0", "ok"), ("cpu:99", "any"), ("xpu", "runtime"), ("CPU", "usage"), ("", "usage"),
                          ("cuda:-1", "usage"), ("cpu,cuda", "usage"), ("hpu", "usage"), ("vulkan", "usage"),
                          ("privateuseone", "usage"), ("cpu\n", "usage")]:
        add(f"device={value!r}", _edit(INLINE, "--device", value), expect)
    for value, expect in [("bogus", "usage"), ("int8", "usage"), ("float8_e4m3fn", "usage"), ("torch.float32", "usage"),
                          ("bool", "usage"), ("float64", "any"), ("bfloat16", "any"), ("float16", "any"),
                          ("half", "any"), ("", "usage"), ("FLOAT32", "usage"), ("complex64", "usage"),
                          ("uint8", "usage")]:
        add(f"dtype={value!r}", _edit(INLINE, "--dtype", value), expect)
    add("attention-dtype-int8", ["attention", SRC, *FAST, "--out", "@OUT@", "--dtype", "int8"], "usage")
    # output folders
    add("out-is-a-file", ["edit", INLINE, *FAST, "--out", "@IN@/afile"], "runtime", setup=_afile)
    add("out-in-proc", ["edit", INLINE, *FAST, "--out", "/proc/p2p-adversarial"], "runtime")
    add("out-under-proc-file", ["edit", INLINE, *FAST, "--out", "/proc/self/status/x"], "runtime")
    add("out-dev-null", ["edit", INLINE, *FAST, "--out", "/dev/null"], "runtime")
    add("out-dev-full-child", ["edit", INLINE, *FAST, "--out", "/dev/full/x"], "runtime")
    add("out-in-sys", ["edit", INLINE, *FAST, "--out", "/sys/p2p-adversarial"], "runtime")
    add("out-newline-name", ["edit", INLINE, *FAST, "--out", "out\nnl"], "any", allowed=("cwd/out\nnl",))
    add("out-ansi-name", ["edit", INLINE, *FAST, "--out", "out\x1b[31mred"], "any", allowed=("cwd/out\x1b[31mred",))
    add("out-space-name", ["edit", INLINE, *FAST, "--out", " "], "any", allowed=("cwd/ ",))
    add("out-dash-name", ["edit", INLINE, *FAST, "--out", "-weird"], "any", allowed=("cwd/-weird",))
    add("out-literal-tilde", ["edit", INLINE, *FAST, "--out", "~"], "any", allowed=("cwd/~",))
    add("out-empty-string", ["edit", INLINE, *FAST, "--out", ""], "any", allowed=("cwd",))
    add("out-300-char-name", ["edit", INLINE, *FAST, "--out", "@ROOT@/" + "x" * 300], "runtime")
    add("out-path-over-path-max", ["edit", INLINE, *FAST, "--out", "@ROOT@/out/" + "/".join(["d" * 50] * 90)], "runtime")
    add("out-symlink-loop", ["edit", INLINE, *FAST, "--out", "@IN@/loop/x"], "runtime",
        setup=lambda root, ctx: (root / "in" / "loop").symlink_to(root / "in" / "loop"))
    add("out-dangling-symlink", ["edit", INLINE, *FAST, "--out", "@IN@/dangling"], "runtime",
        setup=lambda root, ctx: (root / "in" / "dangling").symlink_to(root / "in" / "nowhere" / "x"))
    add("out-fifo", ["edit", INLINE, *FAST, "--out", "@IN@/fifo"], "runtime",
        setup=lambda root, ctx: make_fifo(root / "in" / "fifo"))
    add("attention-out-is-a-file", ["attention", SRC, *FAST, "--out", "@IN@/afile"], "runtime", setup=_afile)
    add("demo-out-is-a-file", ["demo", "--out", "@IN@/afile"], "runtime", setup=_afile)
    add("demo-out-proc", ["demo", "--out", "/proc/p2p-demo"], "runtime")
    # windows, weights, blends, modes, edit prompts
    for value, expect in [("-0.1", "usage"), ("1.0001", "usage"), ("0.5:0.2", "usage"), ("0.2:0.5:0.8", "usage"),
                          (":", "usage"), ("0.2:", "usage"), ("nan:0.5", "usage"), ("inf", "usage"),
                          ("1e-400", "ok"), ("", "usage"), ("  ", "usage"), ("0.5 ", "any"), ("\u0661", "any"),
                          ("0:0", "ok"), ("1:1", "ok")]:
        add(f"cross={value!r}", _edit(INLINE, "--cross", value), expect)
    for value, expect in [("-1", "usage"), ("2", "usage"), ("nan", "usage"), (":0.5", "usage"), ("0.1:0.1", "ok"),
                          ("-inf:inf", "usage"), ("0.5:nan", "usage")]:
        add(f"self={value!r}", _edit(INLINE, "--self", value), expect)
    for value, expect in [("=0.4", "usage"), ("green=", "usage"), ("green=0.4:0.2", "usage"), ("green==0.4", "usage"),
                          ("green=nan", "usage"), ("1=0.4", "any"), ("-1=0.4", "any"), ("99=0.4", "usage"),
                          ("green=0.4:1.2", "usage"), ("default=0.3", "any"), ("green=0.1:0.2:0.3", "usage")]:
        add(f"cross-word={value!r}", _edit(INLINE, "--cross-word", value), expect)
    add("cross-word-twice", _edit(INLINE, "--cross-word", "green=0.4", "--cross-word", "green=0.6"), "any")
    for value, expect in [("green=nan", "usage"), ("green=inf", "usage"), ("green=-100.1", "usage"), ("green=", "usage"),
                          ("=2", "usage"), ("green=2=3", "usage"), ("0=2", "any"), ("99=2", "usage"), ("-1=2", "any"),
                          ("green=1e-320", "ok"), ("green=0x10", "usage"), ("green=1_0", "any"),
                          ("green=100", "any"), ("green=-100", "any")]:
        add(f"weight={value!r}", _edit(INLINE, "--weight", value), expect)
    add("weight-on-pure-source", _edit(SRC, "--weight", "red=2"), "ok")
    for value, expect in [(":", "usage"), ("red:", "usage"), (":green", "usage"), ("red:green:blue", "usage"),
                          (",,:,,", "usage"), ("red,red:green", "any"), ("99:0", "usage"), ("2:2", "any"),
                          ("red:green,circle", "ok"), ("red :green", "usage")]:
        add(f"blend={value!r}", _edit(INLINE, "--blend", value), expect)
    add("blend-word-missing-from-to", _edit(SRC, "--to", "a big blue" + TAIL, "--blend", "red:green"), "usage")
    for value, expect in [("", "usage"), ("REPLACE", "usage"), ("refine", "ok"), ("replace", "ok"), ("auto ", "usage")]:
        add(f"mode={value!r}", _edit(INLINE, "--mode", value), expect)
    add("65-to-edits", _edit(SRC, *[arg for _ in range(65) for arg in ("--to", EDIT)]), "any")
    add("prompt-twice", ["edit", INLINE, "--prompt", SRC, *FAST, "--out", "@OUT@"], "usage")
    add("to-without-value", ["edit", INLINE, *FAST, "--out", "@OUT@", "--to"], "usage")
    add("option-given-twice", _edit(INLINE, "--steps", "3"), "ok")
    add("unknown-short-option", _edit(INLINE, "-z"), "usage")
    add("no-arguments", [], "usage")
    add("edit-help", ["edit", "--help"], "ok")
    add("uppercase-command", ["EDIT", INLINE], "usage")
    add("version-flag", ["--version"], "usage")
    add("inversion-without-image", _edit(INLINE, "--inversion", "bogus"), "usage")
    # models
    missing_models = [("nonexistent-abs", "/nonexistent/model"), ("nonexistent-rel", "./nope"), ("empty", ""),
                      ("uppercase-demo", "DEMO"), ("demo-slash", "demo/"), ("dotdot", ".."), ("root", "/"),
                      ("dev-null", "/dev/null"), ("proc-environ", "/proc/self/environ"), ("four-slashes", "a/b/c/d"),
                      ("300-chars", "x" * 300), ("url", "https://example.com/model"), ("newline", "demo\nx"),
                      ("traversal-to-etc", "../../../../../../etc"), ("tilde-nobody", "~nobody/model")]
    for name, model in missing_models:
        add(f"model-{name}", _edit(INLINE, "--model", model), "error")
    add("model-bogus-hub-offline", _edit(INLINE, "--model", "bogus-org/bogus-model"), "runtime",
        env={"HF_HUB_OFFLINE": "1"})
    add("model-bogus-hub-online", _edit(INLINE, "--model", "bogus-org/bogus-model"), "runtime")
    add("model-env-bogus", _edit(INLINE), "runtime", env={"P2P_MODEL": "/nonexistent/model"})
    index_cases = [
        ("index-invalid-json", dict(index_text="{"), "runtime"),
        ("index-list", dict(index_text="[]"), "runtime"),
        ("index-empty-object", dict(index_text="{}"), "runtime"),
        ("index-not-utf8", dict(index_text=None), "runtime"),
        ("index-class-os-system", dict(index={**demo_index(), "_class_name": "os.system"}), "any"),
        ("index-class-list", dict(index={**demo_index(), "_class_name": ["canary_mod", "Canary"]}), "any"),
        ("index-unet-from-canary", dict(index={**demo_index(), "unet": ["canary_mod", "Canary"]}), "runtime"),
        ("index-extra-canary-component", dict(index={**demo_index(), "evil": ["canary_mod", "Canary"]}), "runtime"),
        ("index-unet-from-os", dict(index={**demo_index(), "unet": ["os", "system"]}), "runtime"),
        ("index-unet-class-pipeline", dict(index={**demo_index(), "unet": ["diffusers", "StableDiffusionPipeline"]}),
         "runtime"),
        ("index-sd3-class-on-demo", dict(index={**demo_index(), "_class_name": "StableDiffusion3Pipeline"}), "runtime"),
        ("index-flux-class-on-demo", dict(index={**demo_index(), "_class_name": "FluxPipeline"}), "runtime"),
        ("index-unet-null", dict(index={**demo_index(), "unet": [None, None]}), "runtime"),
        ("index-unet-int", dict(index={**demo_index(), "unet": 5}), "runtime"),
        ("index-tokenizer-bogus-class", dict(index={**demo_index(), "tokenizer": ["transformers", "NoSuchTokenizer"]}),
         "runtime"),
        ("index-safety-checker-missing", dict(index={**demo_index(), "safety_checker": ["stable_diffusion",
                                                                                         "StableDiffusionSafetyChecker"]}),
         "any"),
        ("index-missing-unet-folder", dict(components=("scheduler", "text_encoder", "tokenizer", "vae")), "runtime"),
        ("index-deep-nesting", dict(index_text='{"_class_name": "StableDiffusionPipeline", "unet": '
                                               + "[" * 5000 + "]" * 5000 + "}"), "runtime"),
    ]
    for name, kwargs, expect in index_cases:
        def setup(root, ctx, kwargs=kwargs, name=name):
            canary_module(root)
            if name == "index-not-utf8":
                folder = model_folder(root)
                (folder / "model_index.json").write_bytes(b'{"_class_name": "\xff\xfe"}')
            else:
                model_folder(root, **kwargs)
        add(f"model-{name}", _edit(INLINE, "--model", "@IN@/model"), expect, setup=setup)

    def recursive(root, ctx):
        folder = model_folder(root, index={**demo_index(), "unet": ["diffusers", "StableDiffusionPipeline"]},
                              components=("scheduler", "text_encoder", "tokenizer", "vae"))
        (folder / "unet").symlink_to(folder, target_is_directory=True)
    add("model-recursive-pipeline-component", _edit(INLINE, "--model", "@IN@/model"), "runtime", setup=recursive)

    def weights(kind):
        def setup(root, ctx):
            canary_module(root)
            folder = model_folder(root)
            unet = real_component(folder, "unet")
            target = unet / "diffusion_pytorch_model.safetensors"
            target.unlink()
            if kind == "garbage":
                target.write_bytes(b"not safetensors at all" * 10)
            elif kind == "empty":
                target.write_bytes(b"")
            elif kind == "huge-header":
                target.write_bytes(struct.pack("<Q", 2**62) + b"{}")
            elif kind == "header-lies":
                header = json.dumps({"conv_in.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                                         "data_offsets": [0, 4 * 10**12]}}).encode()
                target.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
            elif kind == "no-tensors":
                header = b'{"__metadata__":{}}'
                target.write_bytes(struct.pack("<Q", len(header)) + header)
            elif kind in ("pickle", "pickle-allowed"):
                (unet / "diffusion_pytorch_model.bin").write_bytes(_pickle_payload(root / "cwd" / f"{CANARY}-pickle"))
            elif kind == "config-bad":
                (unet / "config.json").unlink()
                config = json.loads((DEMO_MODEL / "unet" / "config.json").read_text())
                config.update(attention_head_dim=0, sample_size=-1)
                (unet / "config.json").write_text(json.dumps(config))
            elif kind == "config-not-json":
                (unet / "config.json").unlink()
                (unet / "config.json").write_text("{{{{")
                target.symlink_to(DEMO_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
            if kind == "config-bad":
                target.symlink_to(DEMO_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
        return setup
    for kind in ("garbage", "empty", "huge-header", "header-lies", "no-tensors", "pickle", "config-bad",
                 "config-not-json"):
        add(f"model-unet-weights-{kind}", _edit(INLINE, "--model", "@IN@/model"), "runtime", setup=weights(kind))
    add("model-unet-weights-pickle-allowed", _edit(INLINE, "--model", "@IN@/model", "--allow-pickle"), "runtime",
        setup=weights("pickle"))

    def tokenizer_auto_map(root, ctx):
        folder = model_folder(root)
        tokenizer = real_component(folder, "tokenizer")
        (tokenizer / "tokenizer_config.json").unlink()
        config = json.loads((DEMO_MODEL / "tokenizer" / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["canary_tok.CanaryTokenizer", None]}
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
        (tokenizer / "canary_tok.py").write_text(
            f"open({str(root / 'cwd' / (CANARY + '-tokenizer'))!r}, 'w').write('x')\n"
            "from transformers import CLIPTokenizer\nclass CanaryTokenizer(CLIPTokenizer):\n    pass\n")
    add("model-tokenizer-auto-map", _edit(INLINE, "--model", "@IN@/model"), "any", setup=tokenizer_auto_map)

    def single_file(kind):
        def setup(root, ctx):
            path = root / "in" / ("model.ckpt" if kind == "ckpt" else "model.safetensors")
            if kind == "garbage":
                path.write_bytes(b"\x00garbage" * 100)
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "huge-header":
                path.write_bytes(struct.pack("<Q", 2**63 - 1) + b"{")
            elif kind == "no-tensors":
                header = b'{"__metadata__":{"format":"pt"}}'
                path.write_bytes(struct.pack("<Q", len(header)) + header)
            elif kind == "unknown-keys":
                header = json.dumps({"foo.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
                path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
            elif kind == "sd-keys-no-config":
                header = json.dumps({"model.diffusion_model.x": {"dtype": "F32", "shape": [1],
                                                                  "data_offsets": [0, 4]}}).encode()
                path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
            elif kind == "ckpt":
                path.write_bytes(_pickle_payload(root / "cwd" / f"{CANARY}-ckpt"))
        return setup
    for kind in ("garbage", "empty", "huge-header", "no-tensors", "unknown-keys", "sd-keys-no-config"):
        add(f"model-single-file-{kind}", _edit(INLINE, "--model", "@IN@/model.safetensors"), "error",
            setup=single_file(kind), env={"HF_HUB_OFFLINE": "1"})
    add("model-ckpt-pickle", _edit(INLINE, "--model", "@IN@/model.ckpt"), "error", setup=single_file("ckpt"),
        env={"HF_HUB_OFFLINE": "1"})
    add("model-ckpt-pickle-allowed", _edit(INLINE, "--model", "@IN@/model.ckpt", "--allow-pickle"), "error",
        setup=single_file("ckpt"), env={"HF_HUB_OFFLINE": "1"})
    # serve: only arguments that must fail before a server starts (a valid one would serve until the timeout)
    for name, args, expect in [
        ("port-0", ["--port", "0"], "usage"), ("port-70000", ["--port", "70000"], "usage"),
        ("port-negative", ["--port", "-1"], "usage"), ("max-upload-0", ["--max-upload-mb", "0"], "usage"),
        ("max-upload-inf", ["--max-upload-mb", "inf"], "usage"), ("cache-negative", ["--cache-mb", "-1"], "usage"),
        ("cache-nan", ["--cache-mb", "nan"], "usage"), ("device-cuda", ["--device", "cuda"], "runtime"),
        ("dtype-int8", ["--dtype", "int8"], "usage"), ("out-is-a-file", ["--out", "@IN@/afile"], "runtime"),
        ("max-upload-huge", ["--max-upload-mb", "1e30"], "usage"),
    ]:
        add(f"serve-{name}", ["serve", *args], expect, setup=_afile if "afile" in args[-1] else None)
    return cases


def image_cases() -> list[Case]:
    """`p2p edit --image FILE`: pictures that are broken, huge, odd, or not files at all."""
    def args(path: str, *extra: str) -> list[str]:
        return ["edit", "--image", path, "--prompt", SRC, "--to", EDIT, "--steps", "2", "--inversion", "ddim",
                "--out", "@OUT@", *extra]

    cases: list[Case] = []
    kinds = [("png", "ok"), ("truncated-png", "usage"), ("truncated-jpeg", "usage"), ("bad-crc-png", "usage"),
             ("bomb-30000", "usage"), ("bomb-10000", "usage"), ("zero-width-png", "usage"), ("one-pixel", "ok"),
             ("wide-100000x1", "ok"), ("tall-1x20000", "ok"), ("gif-animated", "ok"), ("gray16", "ok"),
             ("rgb16", "ok"), ("cmyk-jpeg", "ok"), ("palette-trns", "ok"), ("la", "ok"), ("rgba-transparent", "ok"),
             ("mode1", "ok"), ("int32-tiff", "ok"), ("float-nan-tiff", "any"), ("float-inf-tiff", "any"),
             ("multipage-tiff", "ok"), ("bmp", "ok"), ("webp", "ok"), ("ico", "ok"), ("svg", "usage"),
             ("jpeg-named-png", "ok"), ("text", "usage"), ("empty", "usage"), ("pdf", "usage"), ("ztxt-bomb", "any"),
             ("exif-rotated", "ok"), ("exif-corrupt", "any"), ("huge-exif-ifd-count", "any")]
    for kind, expect in kinds:
        name = f"photo.{'png' if 'tiff' not in kind else 'tif'}"
        cases.append(Case("image", kind, args=args(f"@IN@/{name}"), expect=expect, setup=_image_at(name, kind)))
    cases += [
        Case("image", "missing-file", args=args("@IN@/nowhere.png"), expect="usage"),
        Case("image", "directory", args=args("@IN@"), expect="usage"),
        Case("image", "fifo", args=args("@IN@/fifo.png"), expect="error",
             setup=lambda root, ctx: make_fifo(root / "in" / "fifo.png")),
        Case("image", "dev-zero", args=args("/dev/zero"), expect="error"),
        Case("image", "dev-null", args=args("/dev/null"), expect="error"),
        Case("image", "dev-stdin", args=args("/dev/stdin"), expect="error"),
        Case("image", "proc-self-cmdline", args=args("/proc/self/cmdline"), expect="error"),
        Case("image", "symlink-to-etc-passwd", args=args("@IN@/passwd.png"), expect="usage",
             setup=lambda root, ctx: (root / "in" / "passwd.png").symlink_to("/etc/passwd")),
        Case("image", "sparse-200GB", args=args("@IN@/huge.png"), expect="error",
             setup=lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30),
             why="the CLI hashes the file (file_digest) before it opens it as an image"),
        Case("image", "default-null-text", args=["edit", "--image", "@IN@/photo.png", "--prompt", SRC, "--to", EDIT,
                                                 "--steps", "2", "--out", "@OUT@"], expect="ok",
             setup=_image_at("photo.png", "png")),
    ]
    for method, expect in [("bogus", "usage"), ("euler", "usage"), ("", "usage"), ("NULL-TEXT", "usage"),
                           ("negative-prompt", "ok"), ("direct", "ok")]:
        cases.append(Case("image", f"inversion={method!r}", args=args("@IN@/photo.png")[:-4] + [
            "--inversion", method, "--out", "@OUT@"], expect=expect, setup=_image_at("photo.png", "png")))
    cases += [
        Case("image", "caption-over-77-tokens", args=["edit", "--image", "@IN@/photo.png", "--prompt", "red " * 90,
                                                      "--to", EDIT, "--steps", "2", "--inversion", "ddim", "--out",
                                                      "@OUT@"], expect="usage", setup=_image_at("photo.png", "png")),
        Case("image", "inline-markup-caption", args=["edit", INLINE, "--image", "@IN@/photo.png", "--steps", "2",
                                                     "--inversion", "ddim", "--out", "@OUT@"], expect="ok",
             setup=_image_at("photo.png", "png")),
        Case("image", "size-32x96", args=args("@IN@/photo.png", "--height", "32", "--width", "96"), expect="ok",
             setup=_image_at("photo.png", "png")),
        Case("image", "size-8x8", args=args("@IN@/photo.png", "--height", "8", "--width", "8"), expect="usage",
             setup=_image_at("photo.png", "png")),
        Case("image", "guidance-1-null-text", args=["edit", "--image", "@IN@/photo.png", "--prompt", SRC, "--to", EDIT,
                                                    "--steps", "2", "--guidance", "1", "--out", "@OUT@"],
             expect="usage", setup=_image_at("photo.png", "png")),
        Case("image", "steps-1000-ddim", args=args("@IN@/photo.png", "--steps", "1000"), expect="ok",
             setup=_image_at("photo.png", "png")),
    ]
    return cases


# --- replay ---------------------------------------------------------------------------------------------------

def _set(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data.update(values)
    return mutate


def _drop(*keys) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        for key in keys:
            data.pop(key, None)
    return mutate


def _edit0(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data["edits"][0].update(values)
    return mutate


def _sched(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data["scheduler"].update(values)
    return mutate


def _replace(value) -> Callable[[dict, Path], Any]:
    return lambda data, root: copy.deepcopy(value)


def replay_cases() -> list[Case]:
    """`p2p replay FILE.png`: recipes crafted into PNG text chunks (starting from real recipes of the demo)."""
    cases: list[Case] = []

    def add(name, mutate=None, expect="usage", *, asset="edit", raw=None, how="itxt", extra=(), png="@IN@/crafted.png",
            setup_extra=None, allowed=("out",), out=True, why=""):
        def setup(root, ctx):
            source_png, recipe = ctx.assets[asset]
            data = copy.deepcopy(recipe)
            if data.get("image"):
                shutil.copyfile(ctx.assets["photo"][0], root / "in" / "photo.png")
                data["image"]["path"] = "photo.png"
            if mutate is not None:
                changed = mutate(data, root)
                data = data if changed is None else changed
            text = raw(root) if callable(raw) else raw
            if text is None:
                text = json.dumps(data, ensure_ascii=False)
            write_recipe_png(source_png, root / "in" / "crafted.png", text, how)
            if setup_extra is not None:
                setup_extra(root, ctx)
        args = ["replay", png, *(["--out", "@OUT@"] if out else []), *extra]
        cases.append(Case("replay", name, args=args, expect=expect, setup=setup, needs_assets=True, allowed=allowed,
                          why=why))

    add("baseline-edit", expect="ok")
    add("baseline-real-image", asset="img", expect="ok")
    add("baseline-attention", asset="attn", expect="ok")
    # source and edits
    add("source-int", _set(source=5))
    add("source-list", _set(source=["a"]))
    add("source-whitespace", _set(source="\t\n"))
    add("source-zwsp", _set(source="\u200b"), "any")
    add("source-over-77-tokens", _set(source=SRC * 10))
    add("source-with-markup", _set(source="a big [red->green] circle"), "any")
    add("source-control-chars", _set(source="a big\x1b[2J red\x00 circle"), "any")
    add("edits-object", _set(edits={"prompt": EDIT}))
    add("edits-string", _set(edits=EDIT))
    add("edits-null-item", _set(edits=[None]))
    add("edits-empty-source-only", _set(edits=[], image_index=0), "any")
    add("edits-65", lambda d, r: d.update(edits=[d["edits"][0]] * 65))
    add("edits-64", lambda d, r: d.update(edits=[d["edits"][0]] * 64), "ok")
    add("edit-weights-object", _edit0(weights={"green": 2}))
    add("edit-weights-string-weight", _edit0(weights=[["green", "2"]]))
    add("edit-weights-bool-weight", _edit0(weights=[["green", True]]))
    add("edit-weights-bool-word", _edit0(weights=[[True, 2]]))
    add("edit-weights-float-position", _edit0(weights=[[1.5, 2]]))
    add("edit-weights-position-99", _edit0(weights=[[99, 2]]))
    add("edit-weights-position-negative", _edit0(weights=[[-1, 2]]), "any")
    add("edit-weights-nan", _edit0(weights=[["green", float("nan")]]))
    add("edit-weights-triple", _edit0(weights=[["green", 2, 3]]))
    add("edit-weights-huge-list", _edit0(weights=[["green", 1.0]] * 100_000), "any")
    add("edit-cross-one-element", _edit0(cross_steps=[0.2]))
    add("edit-cross-three-elements", _edit0(cross_steps=[0.1, 0.5, 0.9]))
    add("edit-cross-string", _edit0(cross_steps="0.8"))
    add("edit-cross-word-absent", _edit0(cross_steps={"default": 0.8, "zebra": 0.3}))
    add("edit-cross-no-default", _edit0(cross_steps={"green": 0.3}), "any")
    add("edit-cross-bool", _edit0(cross_steps=True))
    add("edit-self-null", _edit0(self_steps=None), "any")
    add("edit-mode-uppercase", _edit0(mode="REPLACE"))
    add("edit-mode-null", _edit0(mode=None))
    add("edit-blend-threshold-2", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "threshold": 2}))
    add("edit-blend-extra-key", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "bogus": 1}))
    add("edit-blend-empty-words", _edit0(blend={"source_words": [], "edit_words": []}), "any")
    add("edit-blend-word-absent", _edit0(blend={"source_words": ["zebra"], "edit_words": ["green"]}))
    add("edit-blend-nested-words", _edit0(blend={"source_words": [["red"]], "edit_words": ["green"]}))
    add("edit-blend-start-nan", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "start": float("nan")}))
    add("edit-unknown-field", _edit0(strength=1))
    add("edit-empty-object", _set(edits=[{}]))
    add("edit-prompt-over-77", _edit0(prompt=EDIT * 10))
    # numbers
    for name, value in [("negative", -5), ("2-pow-63", 2**63), ("float", 1.0), ("string", "1"), ("bool", True)]:
        add(f"seed-{name}", _set(seed=value))
    add("seed-null", _set(seed=None), "ok")
    for name, value in [("zero", 0), ("1001", 1001), ("float", 2.0), ("bool", True), ("string", "2")]:
        add(f"steps-{name}", _set(num_inference_steps=value))
    add("steps-5000-digits", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "9" * 5000),
        mutate=None)
    for name, value in [("string", "7.5"), ("bool", True), ("1e308", 1e308), ("minus-101", -101.0)]:
        add(f"guidance-{name}", _set(guidance_scale=value))
    add("guidance-NaN-literal", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2").replace(
        '7.5', 'NaN'))
    add("guidance-Infinity-literal", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace(
        '"@STEPS@"', "2").replace('7.5', '-Infinity'))
    add("guidance-100", _set(guidance_scale=100.0), "any")
    for name, values in [("height-63", dict(height=63)), ("height-8", dict(height=8)), ("height-negative", dict(height=-64)),
                         ("height-bool", dict(height=True)), ("width-4104", dict(width=4104)),
                         ("size-4096", dict(height=4096, width=4096)), ("width-float", dict(width=64.0))]:
        add(name, _set(**values))
    add("size-128", _set(height=128, width=128), "ok")
    # model, revision, dtype, device, threads
    add("model-empty", _set(model=""))
    add("model-traversal", _set(model="../../../../etc"), "runtime")
    add("model-etc-passwd", _set(model="/etc/passwd"), "runtime")
    add("model-bogus-hub", _set(model="bogus-org/bogus-model"), "runtime")
    add("model-int", _set(model=5))
    add("model-url", _set(model="https://example.com/model"), "error")
    add("model-canary-folder", lambda d, r: d.update(model=str(r / "in" / "model")), "runtime",
        setup_extra=lambda root, ctx: (canary_module(root),
                                       model_folder(root, index={**demo_index(), "unet": ["canary_mod", "Canary"]})))
    add("model-relative-folder", _set(model="model"), "any",
        setup_extra=lambda root, ctx: model_folder(root))
    add("revision-traversal", _set(revision="../../../../etc/passwd"), "any")
    add("revision-int", _set(revision=5))
    add("revision-huge", _set(revision="r" * 100_000), "any")
    add("dtype-int8", _set(dtype="int8"))
    add("dtype-float16", _set(dtype="float16"), "any")
    add("dtype-int", _set(dtype=5))
    add("device-meta", _set(device="meta"), "any")
    add("device-int", _set(device=5))
    add("threads-zero", _set(threads=0))
    add("threads-257", _set(threads=257))
    add("threads-256", _set(threads=256), "ok")
    add("threads-float", _set(threads=1.5))
    # kind, attention, image index, cached source
    add("kind-attention-with-edits", _set(kind="attention"))
    add("kind-bogus", _set(kind="edit2"))
    add("record-attention-zero", _set(record_attention=0))
    add("record-attention-3", _set(record_attention=3))
    add("record-attention-4097", _set(record_attention=4097))
    add("record-attention-string", _set(record_attention="yes"))
    add("attention-record-false", _set(record_attention=False), asset="attn")
    add("attention-image-index-1", _set(image_index=1), asset="attn")
    add("image-index-negative", _set(image_index=-1))
    add("image-index-bool", _set(image_index=True))
    add("cached-source-string", _set(cached_source="yes"))
    add("cached-source-true", _set(cached_source=True), "ok")
    add("negative-prompt-int", _set(negative_prompt=5))
    add("negative-prompt-over-77", _set(negative_prompt="dark " * 90))
    # real images
    add("image-traversal", lambda d, r: d.update(image={"path": "../../../../etc/passwd", "sha256": "0" * 64}),
        asset="img")
    add("image-absolute-system-file", lambda d, r: d.update(image={"path": str(_system_file()),
                                                                  "sha256": _sha256(_system_file())}),
        asset="img")
    add("image-dev-zero", lambda d, r: d["image"].update(path="/dev/zero"), asset="img")
    add("image-sha-mismatch", lambda d, r: d["image"].update(sha256="ab" * 32), asset="img")
    add("image-sha-uppercase", lambda d, r: d["image"].update(sha256=d["image"]["sha256"].upper()), asset="img")
    add("image-extra-key", lambda d, r: d["image"].update(size=5), asset="img")
    add("image-dir-path", lambda d, r: d["image"].update(path="."), asset="img")
    add("image-fifo", lambda d, r: d["image"].update(path="fifo"), asset="img",
        setup_extra=lambda root, ctx: make_fifo(root / "in" / "fifo"))
    add("image-not-an-image", lambda d, r: d["image"].update(path="text.png", sha256=_sha256(
        write_image(r / "in" / "text.png", "text"))), asset="img")
    add("image-bomb", lambda d, r: d["image"].update(path="bomb.png", sha256=_sha256(
        write_image(r / "in" / "bomb.png", "bomb-30000"))), asset="img")
    add("image-with-seed", _set(seed=1), asset="img")
    add("image-sparse-200GB", lambda d, r: d["image"].update(path="huge.png", sha256="0" * 64), asset="img",
        expect="error", setup_extra=lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30),
        why="replay hashes the recipe's input image before anything else reads it")
    add("inversion-euler-on-unet", lambda d, r: d["inversion"].update(method="euler"), asset="img")
    add("inversion-fit-stretch", lambda d, r: d["inversion"].update(fit="stretch"), asset="img")
    add("inversion-epsilon-negative", lambda d, r: d["inversion"].update(early_stop_epsilon=-1), asset="img")
    add("inversion-inner-steps-100", lambda d, r: d["inversion"].update(method="null-text", num_inner_steps=100),
        asset="img", expect="ok")
    add("inversion-without-image", _set(inversion={"method": "ddim"}))
    # schedulers
    for name, values, expect in [
        ("flowmatch-incompatible", dict(_class_name="FlowMatchEulerDiscreteScheduler"), "usage"),
        ("nonexistent-class", dict(_class_name="NoSuchScheduler"), "usage"),
        ("dotted-os-system", dict(_class_name="os.system"), "usage"),
        ("dunder-import", dict(_class_name="__import__"), "usage"),
        ("class-int", dict(_class_name=5), "usage"),
        ("zero-train-timesteps", dict(num_train_timesteps=0), "usage"),
        ("one-train-timestep", dict(num_train_timesteps=1), "any"),
        ("bad-beta-schedule", dict(beta_schedule="bogus"), "usage"),
        ("bad-prediction-type", dict(prediction_type="bogus"), "error"),
        ("bad-timestep-spacing", dict(timestep_spacing="bogus"), "usage"),
        ("dpm-bad-algorithm", dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="bogus"), "usage"),
        ("euler-ancestral", dict(_class_name="EulerAncestralDiscreteScheduler"), "ok"),
        ("trained-betas-zeros", dict(trained_betas=[0.0] * 1000), "any"),
        ("trained-betas-nan", dict(trained_betas=[float("nan")] * 1000), "any"),
        ("trained-betas-ones", dict(trained_betas=[1.0] * 1000), "any"),
        ("trained-betas-strings", dict(trained_betas=["x"] * 1000), "usage"),
        ("clip-sample-range-1e308", dict(clip_sample=True, clip_sample_range=1e308), "any"),
        ("steps-offset-5000", dict(steps_offset=5000), "any"),
        ("beta-end-negative", dict(beta_schedule="linear", beta_end=-1.0), "any"),
        ("betas-above-one", dict(beta_schedule="linear", beta_start=2.0, beta_end=3.0), "any"),
        ("thresholding-negative-max", dict(thresholding=True, sample_max_value=-1.0), "any"),
        ("set-alpha-to-one-string", dict(set_alpha_to_one="no"), "any"),
        ("deeply-nested-value", dict(steps_offset=[[[[[[[[[[1]]]]]]]]]]), "any"),
    ]:
        add(f"scheduler-{name}", _sched(**values), expect)
    add("scheduler-empty-object", _set(scheduler={}), "ok")
    add("scheduler-list", _set(scheduler=[]))
    add("scheduler-string", _set(scheduler="DDIMScheduler"))
    # family and format
    add("family-sd3-on-demo", _set(family="sd3", max_sequence_length=77))
    add("family-flux-without-length", _set(family="flux"))
    add("family-unet-with-length", _set(max_sequence_length=77))
    add("family-bogus", _set(family="bogus"))
    add("family-int", _set(family=5))
    for name, value in [("2", 2), ("string", "1"), ("float", 1.0), ("bool", True), ("null", None)]:
        add(f"format-{name}", _set(format=value))
    add("format-missing", _drop("format"))
    add("package-version-empty", _set(package_version=""))
    add("package-version-list", _set(package_version=[1]))
    # the recipe as a whole
    for name, value in [("list", []), ("number", 5), ("string", "recipe"), ("null", None), ("bool", True)]:
        add(f"recipe-json-{name}", _replace(value))
    add("recipe-empty-text", raw="")
    add("recipe-deep-list", raw="[" * 100_000 + "]" * 100_000)
    add("recipe-deep-source-950", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2")
        .replace(json.dumps(SRC), "[" * 950 + "]" * 950, 1))
    add("recipe-deep-edits-5000", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2")
        .replace('"edits": [', '"edits": [' + "[" * 5000 + "]" * 5000 + ",", 1))
    add("recipe-deep-scheduler-value", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2")
        .replace('"scheduler": {', '"scheduler": {"_class_name": "DDIMScheduler", "x": ' + "[" * 900 + "]" * 900 + ",",
                 1), expect="any")
    add("recipe-10MB-source", _set(source="a " * 5_000_000), "usage")
    add("recipe-10MB-garbage", raw="x" * 10_000_000)
    add("recipe-duplicate-keys", raw=lambda root: "{" + json.dumps(_RECIPE_PLACEHOLDER)[1:].replace(
        '"@STEPS@"', "2") .replace('"source": ', '"source": 5, "source": ', 1), expect="any")
    add("recipe-unknown-dunder-key", _set(__class__="os.system"))
    add("recipe-missing-source", _drop("source"))
    add("recipe-bom-prefix", raw=lambda root: "\ufeff" + json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2"),
        expect="any")
    add("recipe-trailing-garbage", raw=lambda root: json.dumps(_RECIPE_PLACEHOLDER).replace('"@STEPS@"', "2") + " x")
    add("recipe-latin1-text-chunk", how="text", expect="ok")
    add("recipe-compressed-itxt", how="itxt-zip", expect="ok")
    add("recipe-compressed-text-bomb", raw=lambda root: " " * (64 << 20) + "{}", how="itxt-zip", expect="usage")
    add("recipe-two-chunks", how="twice", expect="any")
    add("recipe-key-other-case", how="other-key")
    add("recipe-no-chunk", how="none")
    # the PNG file itself
    def truncated(root, ctx):
        path = root / "in" / "crafted.png"
        data = path.read_bytes()
        path.write_bytes(data[:-40])
    add("png-truncated-after-recipe", expect="any", setup_extra=truncated)

    def jpeg_named_png(root, ctx):
        from PIL import Image
        Image.open(ctx.assets["edit"][0]).convert("RGB").save(root / "in" / "crafted.png", format="JPEG",
                                                              comment=json.dumps(ctx.assets["edit"][1]).encode())
    add("png-is-a-jpeg-with-comment", setup_extra=jpeg_named_png)

    def bomb_with_recipe(root, ctx):
        text = json.dumps(ctx.assets["edit"][1]).encode()
        itxt = _chunk(b"iTXt", b"prompt2prompt\0\0\0\0\0" + text)
        (root / "in" / "crafted.png").write_bytes(_raw_png(30000, 30000, 8, 2, b"\0" * 64, itxt))
    add("png-bomb-header-with-recipe", setup_extra=bomb_with_recipe)

    def bomb_10000_with_recipe(root, ctx):
        text = json.dumps(ctx.assets["edit"][1]).encode()
        itxt = _chunk(b"iTXt", b"prompt2prompt\0\0\0\0\0" + text)
        (root / "in" / "crafted.png").write_bytes(_raw_png(10000, 10000, 8, 2, b"\0" * 64, itxt))
    add("png-10000-side-with-recipe", setup_extra=bomb_10000_with_recipe, expect="any")
    add("png-fifo", png="@IN@/fifo.png", setup_extra=lambda root, ctx: make_fifo(root / "in" / "fifo.png"),
        expect="error")
    add("png-directory", png="@IN@")
    add("png-missing", png="@IN@/nowhere.png")
    add("png-dev-null", png="/dev/null")
    add("png-dev-zero", png="/dev/zero", expect="error")
    add("default-out-beside-png", expect="ok", out=False, allowed=("in/replay",))
    add("override-model-bogus", extra=("--model", "/nonexistent/model"), expect="runtime")
    add("override-dtype-bogus", extra=("--dtype", "bogus"))
    add("override-device-meta", extra=("--device", "meta"))
    add("out-is-the-png", extra=(), png="@IN@/crafted.png", out=False, expect="runtime",
        setup_extra=lambda root, ctx: None)
    cases[-1].args = ["replay", "@IN@/crafted.png", "--out", "@IN@/crafted.png"]
    return cases


# A recipe skeleton for raw-text cases: filled from the edit asset at setup (see _raw_recipe below).
_RECIPE_PLACEHOLDER: dict = {}


def batch_cases() -> list[Case]:
    """`p2p batch MANIFEST`: malformed manifests, odd files, bad options, and damaged output folders."""
    good = {"source": SRC, "edits": [EDIT], "num_inference_steps": 2, "seed": 1}
    cases: list[Case] = []

    def line(**changes) -> dict:
        data = copy.deepcopy(good)
        for key, value in changes.items():
            if value is _DROP:
                data.pop(key, None)
            else:
                data[key] = value
        return data

    def add(name, lines=None, expect="usage", *, raw: bytes | Callable[[Path], bytes] | None = None,
            extra=("--workers", "0"), manifest="@IN@/m.jsonl", setup_extra=None, check=None, env=None):
        def setup(root, ctx):
            if raw is not None:
                data = raw(root) if callable(raw) else raw
            else:
                data = "\n".join(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
                                 for item in lines).encode("utf-8", "surrogatepass") + b"\n"
            (root / "in" / "m.jsonl").write_bytes(data)
            if setup_extra is not None:
                setup_extra(root, ctx)
        cases.append(Case("batch", name, args=["batch", manifest, "--out", "@OUT@", *extra], expect=expect,
                          setup=setup, check=check, env=env or {}))

    add("baseline", [good], "ok")
    add("empty-file", raw=b"")
    add("blank-lines-only", raw=b"\n\n   \n")
    add("whitespace-lines", raw=b"\t\n\r\n \x0b\n")
    add("bom-then-good", raw=b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n", expect="any")
    add("crlf-endings", raw=(json.dumps(good) + "\r\n" + json.dumps(line(seed=2)) + "\r\n").encode(), expect="ok")
    add("cr-only-endings", raw=(json.dumps(good) + "\r" + json.dumps(line(seed=2)) + "\r").encode(), expect="ok")
    add("u2028-inside-string", [line(source="a big red circle\u2028in the center on a white background")], "ok")
    add("nel-x85-inside-string", [line(source="a big red circle\x85in the center on a white background")], "ok")
    add("non-utf8-byte", raw=json.dumps(good).encode().replace(b"big", b"b\xe9g") + b"\n")
    add("utf16-manifest", raw=(json.dumps(good) + "\n").encode("utf-16"))
    add("line-5MB-garbage", raw=b"x" * (5 << 20) + b"\n")
    add("line-5MB-source", [line(source="red " * (5 << 18))], "error")
    for name, value in [("list", []), ("number", 5), ("string", "job"), ("null", None)]:
        add(f"line-json-{name}", [json.dumps(value)])
    add("line-deep-nesting", ["[" * 100_000 + "]" * 100_000])
    add("line-seed-5000-digits", [json.dumps(good).replace('"seed": 1', '"seed": ' + "7" * 5000)])
    for name, changes in [("seed-string", dict(seed="1")), ("seed-float", dict(seed=1.5)), ("seed-negative", dict(seed=-1)),
                          ("seed-2-pow-63", dict(seed=2**63)), ("steps-bool", dict(num_inference_steps=True)),
                          ("steps-string", dict(num_inference_steps="2")),
                          ("steps-million", dict(num_inference_steps=10**6)),
                          ("guidance-string", dict(guidance_scale="7.5")), ("height-string", dict(height="64")),
                          ("edits-string", dict(edits=EDIT)), ("edits-empty", dict(edits=[])),
                          ("edits-int-item", dict(edits=[5])), ("edit-prompt-null", dict(edits=[{"prompt": None}])),
                          ("negative-prompt-int", dict(negative_prompt=5)), ("model-empty", dict(model="")),
                          ("model-int", dict(model=5)), ("edits-65", dict(edits=[EDIT] * 65)),
                          ("max-sequence-length-string", dict(max_sequence_length="77"))]:
        add(name, [line(**changes)])
    add("guidance-NaN-literal", [json.dumps(good).replace('"seed": 1', '"seed": 1, "guidance_scale": NaN')])
    add("height-24", [line(height=24)], "error")
    add("weights-empty-word", [line(edits=[{"prompt": EDIT, "weights": {"": 2}}])], "error")
    add("weights-position-0", [line(edits=[{"prompt": EDIT, "weights": [[0, 2]]}])], "ok")
    add("weights-position-99", [line(edits=[{"prompt": EDIT, "weights": [[99, 2]]}])], "error")
    add("weights-digit-key", [line(edits=[{"prompt": EDIT, "weights": {"1": 2}}])], "any")
    add("blend-word-absent", [line(edits=[{"prompt": EDIT, "blend": {"source_words": ["zebra"],
                                                                      "edit_words": ["green"]}}])], "error")
    add("negative-prompt-over-77", [line(negative_prompt="dark " * 90)], "error")
    add("max-sequence-length-on-demo", [line(max_sequence_length=77)], "error")
    for name, key in [("alias-steps", "steps"), ("capitalised-Source", "Source"), ("proto", "__proto__")]:
        add(f"unknown-field-{name}", [{**good, key: 2}])
    for name, job_id in [("newline-at-end", "a\n"), ("slash", "a/b"), ("dotdot", ".."), ("dot", "."),
                         ("traversal", "../../x"), ("leading-dash", "-a"), ("101-chars", "a" * 101), ("empty", ""),
                         ("int", 5), ("fullwidth-letter", "\uff41"), ("nul", "a\u0000"), ("space", "a b"),
                         ("trailing-dot-ok", "a."), ("unicode-digit", "\u0661")]:
        add(f"id-{name}", [line(id=job_id)], "ok" if name == "trailing-dot-ok" else "usage")
    add("duplicate-explicit-ids", [line(id="j1"), line(id="j1", seed=2)])
    add("duplicate-identical-lines", [good, good])
    add("duplicate-ids-skip-invalid", [line(id="j1"), line(id="j1", seed=2)], "ok",
        extra=("--workers", "0", "--skip-invalid"))
    # images and inversions
    photo = _image_at("photo.png", "png")
    for name, value, setup_extra in [("missing", "nowhere.png", None), ("empty-string", "", None), ("dir", ".", None),
                                     ("etc-passwd", "/etc/passwd", None),
                                     ("traversal", "../../../../../../etc/hostname", None),
                                     ("tilde-nobody", "~nobody/x.png", None),
                                     ("fifo", "fifo.png", lambda root, ctx: make_fifo(root / "in" / "fifo.png")),
                                     ("truncated", "t.png", _image_at("t.png", "truncated-png")),
                                     ("bomb", "b.png", _image_at("b.png", "bomb-30000")),
                                     ("sparse-200GB", "huge.png",
                                      lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30)),
                                     ("int", 5, None)]:
        add(f"image-{name}", [line(image=value, seed=_DROP)], "usage", setup_extra=setup_extra)
    add("image-valid-ddim", [line(image="photo.png", inversion="ddim", seed=_DROP)], "ok", setup_extra=photo)
    add("image-with-seed", [line(image="photo.png", inversion="ddim")], setup_extra=photo)
    add("inversion-without-image", [line(inversion="ddim")])
    add("inversion-euler-on-demo", [line(image="photo.png", inversion="euler", seed=_DROP)], "error",
        setup_extra=photo)
    add("inversion-bogus", [line(image="photo.png", inversion="bogus", seed=_DROP)], setup_extra=photo)
    add("inversion-inner-steps-huge", [line(image="photo.png", inversion={"method": "null-text",
                                                                          "num_inner_steps": 10**9}, seed=_DROP)],
        setup_extra=photo)
    # models named by lines
    for name, model, expect in [("relative-missing", "./nope", "usage"), ("absolute-missing", "/nonexistent/model", "usage"),
                                ("safetensors-missing", "x.safetensors", "usage"), ("three-slashes", "a/b/c", "usage"),
                                ("hub-bogus", "bogus-org/bogus-model", "error"), ("nul", "demo\u0000", "usage")]:
        add(f"model-{name}", [line(model=model)], expect, env={"HF_HUB_OFFLINE": "1"})
    add("model-malformed-index", [line(model="model")], "error",
        setup_extra=lambda root, ctx: model_folder(root, index_text="{"))
    add("model-canary-library", [line(model="model")], "error",
        setup_extra=lambda root, ctx: (canary_module(root),
                                       model_folder(root, index={**demo_index(), "unet": ["canary_mod", "Canary"]})))

    # good and bad jobs together
    mixed = [line(id="good-1"), line(id="bad-2", edits=[{"prompt": EDIT, "blend": {"source_words": ["zebra"],
                                                                                   "edit_words": ["green"]}}]),
             line(id="good-3", seed=3)]
    expected = _rows_check({1: "done", 2: "failed", 3: "done"}, {2: "zebra"})
    add("mixed-good-bad-inline", mixed, "runtime", check=expected)
    add("mixed-good-bad-batch-size-4", mixed, "runtime", extra=("--workers", "0", "--batch-size", "4"), check=expected)
    add("mixed-good-bad-process-pool", mixed, "runtime", extra=(), check=expected)
    add("mixed-valid-and-invalid-skip", [line(id="good-1"), line(id="bad", seed="x")], "ok",
        extra=("--workers", "0", "--skip-invalid"), check=_rows_check({1: "done"}, {}))
    add("skip-invalid-all-invalid", [line(seed="x"), "not json", line(edits=[])], "error",
        extra=("--workers", "0", "--skip-invalid"))
    # options
    for name, extra, expect in [("batch-size-0", ("--batch-size", "0"), "usage"),
                                ("batch-size-negative", ("--batch-size", "-1"), "usage"),
                                ("batch-size-huge", ("--workers", "0", "--batch-size", str(10**30)), "ok"),
                                ("workers-negative", ("--workers", "-1"), "usage"),
                                ("workers-huge", ("--workers", str(10**30)), "any"),
                                ("workers-string", ("--workers", "two"), "usage"),
                                ("ray-bogus-scheme", ("--ray", "bogus://x"), "error"),
                                ("ray-auto-no-cluster", ("--ray", "auto"), "error"),
                                ("ray-client-closed-port", ("--ray", "ray://127.0.0.1:1"), "error"),
                                ("score-missing-module", ("--workers", "0", "--score", "no_such_module:f"), "usage"),
                                ("score-not-callable", ("--workers", "0", "--score", "os:sep"), "usage"),
                                ("score-wrong-signature", ("--workers", "0", "--score", "builtins:len"), "error"),
                                ("score-no-colon", ("--workers", "0", "--score", "os.path"), "usage"),
                                ("score-canary-module", ("--workers", "0", "--score", "canary_mod:Canary"), "any"),
                                ("min-score-without-score", ("--workers", "0", "--min-score", "0.2"), "usage"),
                                ("min-score-minus-inf", ("--workers", "0", "--min-score", "-inf"), "usage"),
                                ("min-score-1e309", ("--workers", "0", "--min-score", "1e309"), "usage"),
                                ("model-option-missing", ("--workers", "0", "--model", "/nonexistent/model"), "usage"),
                                ("model-option-empty", ("--workers", "0", "--model", ""), "usage"),
                                ("device-cuda", ("--workers", "0", "--device", "cuda"), "runtime"),
                                ("dtype-int8", ("--workers", "0", "--dtype", "int8"), "usage"),
                                ("out-is-a-file", ("--workers", "0"), "runtime")]:
        setup_extra = (lambda root, ctx: canary_module(root)) if "canary" in name else None
        add(name, [good], expect, extra=extra, setup_extra=setup_extra)
    cases[-1].args = ["batch", "@IN@/m.jsonl", "--out", "@IN@/afile", "--workers", "0"]
    cases[-1].setup = _setup_all(cases[-1].setup, _afile)
    for name, manifest, expect, setup_extra in [
        ("manifest-directory", "@IN@", "usage", None),
        ("manifest-fifo", "@IN@/fifo.jsonl", "error", lambda root, ctx: make_fifo(root / "in" / "fifo.jsonl")),
        ("manifest-dev-null", "/dev/null", "usage", None),
        ("manifest-proc-status", "/proc/self/status", "usage", None),
        ("manifest-missing", "@IN@/nowhere.jsonl", "usage", None),
    ]:
        add(name, [good], expect, manifest=manifest, setup_extra=setup_extra)
    # damaged output folders (files a user can leave there)
    def out_state(**files):
        def setup(root, ctx):
            out = root / "out"
            for rel, content in files.items():
                path = out / rel.replace("__", "/")
                path.parent.mkdir(parents=True, exist_ok=True)
                if content is _DIR:
                    path.mkdir()
                elif isinstance(content, tuple) and content[0] == "symlink":
                    path.symlink_to(content[1])
                else:
                    path.write_bytes(content)
        return setup
    for name, files, expect in [
        ("results-is-a-directory", {"results.jsonl": _DIR}, "runtime"),
        ("jobs-is-a-file", {"jobs": b"x"}, "runtime"),
        ("results-garbage-bytes", {"results.jsonl": b"\xff\xfe\x00garbage\n{\n"}, "ok"),
        ("results-odd-rows", {"results.jsonl": b'{"id": 5, "status": "done"}\n{"status": "done"}\n[]\n'
                                               b'{"id": "j1", "status": ["done"]}\n'}, "ok"),
        ("staging-is-a-file", {".staging": b"x"}, "ok"),
        ("job-folder-without-job-json", {"jobs__j1": _DIR}, "runtime"),
        ("job-json-is-a-list", {"jobs__j1__job.json": b"[]"}, "runtime"),
        ("job-json-is-garbage", {"jobs__j1__job.json": b"\xff{"}, "runtime"),
        ("job-json-deep", {"jobs__j1__job.json": b"[" * 100_000 + b"]" * 100_000}, "runtime"),
        ("job-json-done-with-odd-paths", {"jobs__j1__job.json": json.dumps(
            {"id": "j1", "status": "done", "paths": ["../../../../etc/passwd"], "line": "x"}).encode()}, "any"),
        ("job-folder-symlink-to-etc", {"jobs__j1": ("symlink", "/etc")}, "runtime"),
        ("stale-lock-file", {".lock": b"12345\n"}, "ok"),
        ("lock-is-a-directory", {".lock": _DIR}, "runtime"),
    ]:
        add(f"out-{name}", [line(id="j1")], expect, setup_extra=out_state(**files))
    return cases


_DROP = object()
_DIR = object()


def _rows_check(statuses: dict[int, str], error_mentions: dict[int, str]) -> Callable[[Path, dict], list[str]]:
    """Check results.jsonl: each manifest line's status, and that failed rows name their own problem."""
    def check(root: Path, result: dict) -> list[str]:
        index = root / "out" / "results.jsonl"
        if not index.is_file():
            return ["results.jsonl is missing"]
        rows: dict[Any, dict] = {}
        problems = []
        for text in index.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                problems.append(f"results.jsonl has a line that is not JSON: {text[:80]!r}")
                continue
            rows[row.get("line")] = row
        for number, status in statuses.items():
            row = rows.get(number)
            if row is None:
                problems.append(f"manifest line {number} has no row in results.jsonl")
            elif row.get("status") != status:
                problems.append(f"manifest line {number} is {row.get('status')!r}, expected {status!r} "
                                f"(error: {_short(row.get('error'))})")
        for number, text in error_mentions.items():
            error = str((rows.get(number) or {}).get("error"))
            if text not in error:
                problems.append(f"manifest line {number}'s error does not name its problem {text!r}: {_short(error)}")
        return problems
    return check


# --- Python API -------------------------------------------------------------------------------------------------

def api_cases() -> list[Case]:
    """The Python API with hostile values: each snippet should raise ValueError/TypeError (one line) or return
    images that are not black; `RESULT = ...` marks a value whose images the harness checks."""
    specs: list[tuple[str, str, str]] = []

    def add(name, code, expect="error"):
        specs.append((name, code, expect))

    # Edit
    for name, value in [("nan", "float('nan')"), ("inf", "float('inf')"), ("10-pow-400", "10**400"),
                        ("one-tuple", "(0.2,)"), ("reversed", "(0.5, 0.2)"), ("three", "[0.2, 0.5, 0.9]"),
                        ("string", "'0.8'"), ("none", "None"), ("bool", "True"), ("np-nan", "np.float64('nan')"),
                        ("complex", "1j"), ("set", "{0.2, 0.8}"), ("tensor", "torch.tensor(0.5)"),
                        ("dict-non-string-key", "{'default': 0.8, 1.5: 0.3}"), ("dict-none-key", "{None: 0.3}"),
                        ("dict-tuple-key", "{('a',): 0.1}"), ("dict-nan-window", "{'default': float('nan')}"),
                        ("dict-empty", "{}")]:
        add(f"edit-cross-steps-{name}", f"RESULT = p2p.Edit(EDIT, cross_steps={value})")
    for name, value in [("np-int64-1", "np.int64(1)"), ("bool", "True"), ("decimal", "__import__('decimal').Decimal('0.5')"),
                        ("fraction", "__import__('fractions').Fraction(1, 2)"), ("np-float16-inf", "np.float16('inf')"),
                        ("huge-int", "10**400")]:
        add(f"edit-self-steps-{name}", f"RESULT = p2p.Edit(EDIT, self_steps={value})", "any")
    for name, value in [("nan", "{'green': float('nan')}"), ("10-pow-400", "{'green': 10**400}"),
                        ("bool", "{'green': True}"), ("np-float16-overflow", "{'green': np.float16(70000)}"),
                        ("position-huge", "{10**30: 2.0}"), ("none-key", "{None: 2.0}"), ("float-key", "{1.5: 2.0}"),
                        ("bytes-key", "{b'green': 2.0}"), ("tuple-key", "{('green',): 2.0}"),
                        ("string-weight", "{'green': '2'}"), ("decimal-weight", "{'green': __import__('decimal').Decimal(2)}"),
                        ("list-of-pairs", "[('green', 2.0)]"), ("set", "{'green'}"), ("complex", "{'green': 2j}"),
                        ("tensor-weight", "{'green': torch.tensor(2.0)}"), ("np-array-weight", "{'green': np.array([2.0])}")]:
        add(f"edit-weights-{name}", f"RESULT = p2p.Edit(EDIT, weights={value})")
    for name, value in [("none", "None"), ("int", "5"), ("bytes", "b'a dog'"), ("empty", "''"), ("list", "[EDIT]")]:
        add(f"edit-prompt-{name}", f"RESULT = p2p.Edit({value})")
    for name, value in [("none", "None"), ("int", "5"), ("uppercase", "'Replace'")]:
        add(f"edit-mode-{name}", f"RESULT = p2p.Edit(EDIT, mode={value})")
    add("edit-blend-not-localblend", "RESULT = p2p.Edit(EDIT, blend={'source_words': ['red'], 'edit_words': ['green']})")
    # LocalBlend
    for name, kwargs in [("threshold-nan", "threshold=float('nan')"), ("threshold-bool", "threshold=True"),
                         ("threshold-np-float32", "threshold=np.float32(0.3)"), ("start-2", "start=2"),
                         ("exclude-threshold-inf", "exclude_threshold=float('inf')"),
                         ("exclude-words-none", "exclude_source_words=None")]:
        add(f"blend-{name}", f"RESULT = p2p.LocalBlend('red', 'green', {kwargs})", "any")
    for name, words in [("empty-list", "[]"), ("nested-list", "[['red']]"), ("float", "5.5"), ("bool", "True"),
                        ("np-int", "np.int64(2)"), ("huge-list", "['red'] * 1_000_000"), ("range", "range(10)"),
                        ("bytes", "b'red'"), ("none", "None")]:
        add(f"blend-source-words-{name}", f"RESULT = p2p.LocalBlend({words}, 'green')", "any")
    # prepare / edit
    def ed(kwargs, edits="[EDIT]", prompt="SRC", method="edit"):
        call = f"editor().{method}({prompt}, {edits}, {kwargs})"
        return f"RESULT = {call}"
    for name, value in [("negative", "-1"), ("zero", "0"), ("float", "2.0"), ("bool", "True"), ("np-int64", "np.int64(2)"),
                        ("10-pow-30", "10**30"), ("10-pow-7", "10**7"), ("string", "'2'")]:
        add(f"edit-steps-{name}", ed(f"num_inference_steps={value}, seed=1"),
            "any" if name in ("np-int64",) else "error")
    for name, value in [("nan", "float('nan')"), ("inf", "float('inf')"), ("10-pow-400", "10**400"), ("string", "'7.5'"),
                        ("np-float64", "np.float64(7.5)"), ("bool", "True"), ("1e30", "1e30"), ("minus-1e30", "-1e30")]:
        add(f"edit-guidance-{name}", ed(f"num_inference_steps=2, seed=1, guidance_scale={value}"),
            "ok" if name == "np-float64" else "error")
    for name, value in [("negative", "-1"), ("2-pow-63", "2**63"), ("float", "1.5"), ("string", "'1'"),
                        ("np-int64", "np.int64(1)"), ("bool", "True")]:
        add(f"edit-seed-{name}", ed(f"num_inference_steps=2, seed={value}"), "any" if name == "np-int64" else "error")
    for name, value in [("63", "height=63"), ("8", "height=8"), ("1", "height=1"), ("10-pow-30", "height=10**30"),
                        ("np-int64", "height=np.int64(64)"), ("bool", "height=True"), ("float", "height=64.0"),
                        ("huge-pixels", "height=4096, width=4096"), ("negative", "width=-64")]:
        add(f"edit-size-{name}", ed(f"num_inference_steps=2, seed=1, {value}"), "any" if "np" in name else "error")
    for name, value in [("int", "5"), ("over-77", "'dark ' * 90"), ("bytes", "b'dark'")]:
        add(f"edit-negative-prompt-{name}", ed(f"num_inference_steps=2, seed=1, negative_prompt={value}"))
    for name, value, expect in [
        ("nan", "torch.full((1, 4, 16, 16), float('nan'))", "error"),
        ("inf", "torch.full((1, 4, 16, 16), float('inf'))", "error"),
        ("huge", "torch.full((1, 4, 16, 16), 1e30)", "any"),
        ("wrong-shape", "torch.zeros(1, 4, 8, 8)", "error"),
        ("three-for-two-prompts", "torch.zeros(3, 4, 16, 16)", "error"),
        ("int-dtype", "torch.zeros(1, 4, 16, 16, dtype=torch.int64)", "any"),
        ("meta-device", "torch.zeros(1, 4, 16, 16, device='meta')", "error"),
        ("numpy-array", "np.zeros((1, 4, 16, 16), np.float32)", "error"),
        ("one-dim", "torch.zeros(16)", "error"),
        ("bool-dtype", "torch.ones(1, 4, 16, 16, dtype=torch.bool)", "any"),
    ]:
        add(f"edit-latents-{name}", ed(f"num_inference_steps=2, latents={value}"), expect)
    for name, value in [("negative", "-1"), ("zero", "0"), ("10-pow-30", "10**30"), ("side-3", "3"),
                        ("list-with-bogus", "[16, 3]"), ("string", "'yes'"), ("float", "16.0")]:
        add(f"edit-record-attention-{name}", ed(f"num_inference_steps=2, seed=1, record_attention={value}"))
    add("edit-output-type-bogus", ed("num_inference_steps=2, seed=1, output_type='bogus'"))
    add("edit-generator-string", ed("num_inference_steps=2, generator='x'"))
    add("edit-seed-and-generator", ed("num_inference_steps=2, seed=1, generator=torch.Generator()"))
    for name, edits in [("none", "None"), ("int", "5"), ("none-item", "[None]"), ("empty-string-item", "['']"),
                        ("dict-item", "[{'prompt': EDIT}]"), ("generator", "(e for e in [EDIT])")]:
        add(f"edit-edits-{name}", ed("num_inference_steps=2, seed=1", edits=edits), "any" if name == "generator" else "error")
    add("edit-edits-65", ed("num_inference_steps=2, seed=1", edits="[EDIT] * 65"), "any")
    add("edit-edits-400", ed("num_inference_steps=2, seed=1", edits="[EDIT] * 400"), "any")
    for name, kwargs, expect in [("eta-nan", "eta=float('nan')", "error"), ("eta-negative", "eta=-1.0", "any"),
                                 ("guidance-rescale-nan", "guidance_rescale=float('nan')", "error"),
                                 ("lora-scale-nan", "cross_attention_kwargs={'scale': float('nan')}", "error"),
                                 ("unknown-kwarg", "bogus_keyword=1", "error"),
                                 ("callback-int", "callback_on_step_end=5", "error"),
                                 ("prompt-embeds-reserved", "prompt_embeds=torch.zeros(1)", "error"),
                                 ("clip-skip-huge", "clip_skip=10**6", "error"),
                                 ("timesteps-garbage", "timesteps=[5, 'x']", "error"),
                                 ("sigmas-nan", "sigmas=[float('nan')] * 2", "error")]:
        add(f"edit-kwargs-{name}", ed(f"num_inference_steps=2, seed=1, {kwargs}"), expect)
    for name, prompt in [("none", "None"), ("int", "5"), ("zwsp", "'\\u200b'"), ("over-77", "SRC * 10"),
                         ("10000-chars", "'a' * 10000"), ("bytes", "b'a cat'")]:
        add(f"edit-source-{name}", ed("num_inference_steps=2, seed=1", prompt=prompt), "any" if name == "zwsp" else "error")
    add("prepare-then-run-twice", "run = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "editor().run(run)\nRESULT = editor().run(run)", "ok")
    add("run-empty-list", "RESULT = editor().run([])")
    add("run-not-prepared", "RESULT = editor().run(5)")
    add("run-mixed-sizes", "a = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "b = editor().prepare(SRC, [EDIT], num_inference_steps=2, seed=1, height=32, width=32)\n"
        "RESULT = editor().run([a, b])")
    # Editor construction
    for name, code in [("pipe-none", "p2p.Editor(None)"), ("pipe-string", "p2p.Editor('demo')"),
                       ("self-replace-negative", "p2p.Editor(editor().pipe, self_replace_max_res=-1)"),
                       ("blend-res-zero", "p2p.Editor(editor().pipe, blend_res=0)"),
                       ("blend-res-3", "p2p.Editor(editor().pipe, blend_res=3)"),
                       ("blend-res-nan", "p2p.Editor(editor().pipe, blend_res=float('nan'))"),
                       ("attention-bogus", "p2p.Editor(editor().pipe, attention='bogus')"),
                       ("from-pretrained-missing", "p2p.Editor.from_pretrained('/nonexistent/model')"),
                       ("from-pretrained-device-bogus", "p2p.Editor.from_pretrained('demo', device='bogus')"),
                       ("from-pretrained-dtype-string", "p2p.Editor.from_pretrained('demo', torch_dtype='float16x')"),
                       ("from-pretrained-dtype-int8", "p2p.Editor.from_pretrained('demo', torch_dtype=torch.int8)"),
                       ("tokenize-int", "editor().tokenize(5)"), ("tokenize-zwsp", "editor().tokenize('\\u200b')")]:
        add(f"editor-{name}", f"RESULT = {code}", "any" if name == "tokenize-zwsp" else "error")
    add("editor-blend-res-3-run", "RESULT = p2p.Editor(editor().pipe, blend_res=3).edit(SRC, [p2p.Edit(EDIT, "
        "blend=p2p.LocalBlend('red', 'green'))], num_inference_steps=2, seed=1)")
    # inversion
    def inv(image, extra="method='ddim', num_inference_steps=2", prompt="SRC"):
        return f"RESULT = editor().invert({image}, {prompt}, {extra})"
    for kind in ("truncated-png", "bomb-30000", "text", "empty", "gif-animated", "float-nan-tiff", "wide-100000x1",
                 "exif-corrupt", "zero-width-png"):
        add(f"invert-file-{kind}", inv(f"IN + '/{kind}.img'"), "any" if kind in ("gif-animated", "wide-100000x1",
                                                                                 "float-nan-tiff", "exif-corrupt")
            else "error")
    for name, image, expect in [("missing", "IN + '/nowhere.png'", "error"), ("directory", "IN", "error"),
                                ("fifo", "IN + '/fifo.png'", "error"),
                                ("empty-array", "np.zeros((0, 0, 3), np.uint8)", "error"),
                                ("nan-array", "np.full((64, 64, 3), np.nan)", "error"),
                                ("five-channels", "np.zeros((64, 64, 5), np.uint8)", "error"),
                                ("complex-array", "np.zeros((64, 64), complex)", "error"),
                                ("object-array", "np.zeros((64, 64, 3), object)", "error"),
                                ("int64-array", "np.full((64, 64, 3), 10**12, np.int64)", "error"),
                                ("tensor", "torch.zeros(3, 64, 64)", "error"), ("nested-list", "[[0]]", "error"),
                                ("pil-F-nan", "__import__('PIL.Image').Image.fromarray(np.full((64, 64), np.nan, "
                                              "np.float32), 'F')", "any"),
                                ("pil-zero-size", "__import__('PIL.Image').Image.new('RGB', (0, 0))", "error"),
                                ("pil-1x1", "__import__('PIL.Image').Image.new('RGB', (1, 1))", "ok"),
                                ("bytes", "b'\\x89PNG'", "error"), ("none", "None", "error")]:
        add(f"invert-{name}", inv(image), expect)
    for name, extra, expect in [("method-bogus", "method='bogus', num_inference_steps=2", "error"),
                                ("method-euler", "method='euler', num_inference_steps=2", "error"),
                                ("inner-steps-negative", "method='null-text', num_inference_steps=2, num_inner_steps=-1",
                                 "error"),
                                ("inner-steps-huge", "method='null-text', num_inference_steps=2, num_inner_steps=10**9",
                                 "any"),
                                ("epsilon-nan", "method='null-text', num_inference_steps=2, early_stop_epsilon=float('nan')",
                                 "error"),
                                ("fit-stretch", "method='ddim', num_inference_steps=2, fit='stretch'", "error"),
                                ("height-63", "method='ddim', num_inference_steps=2, height=63", "error"),
                                ("steps-10-pow-30", "method='ddim', num_inference_steps=10**30", "any"),
                                ("null-text-guidance-1", "method='null-text', num_inference_steps=2, guidance_scale=1",
                                 "error"),
                                ("guidance-nan", "method='direct', num_inference_steps=2, guidance_scale=float('nan')",
                                 "error")]:
        add(f"invert-{name}", inv("IN + '/png.img'", extra), expect)
    add("invert-prompt-empty", inv("IN + '/png.img'", prompt="''"))
    add("invert-prompt-int", inv("IN + '/png.img'", prompt="5"))
    # saved inversions (files a user can be handed)
    save = ("inv = editor().invert(IN + '/png.img', SRC, method='ddim', num_inference_steps=2)\n"
            "inv.save(OUT + '/inv')\nimport json as _j\n"
            "side = _j.loads(open(OUT + '/inv.json').read())\n")
    reload_ = "\nopen(OUT + '/inv.json', 'w').write(_j.dumps(side))\nloaded = p2p.Inversion.load(OUT + '/inv')\n" \
              "RESULT = editor().edit(loaded.prompt, [EDIT], inversion=loaded)"
    for name, change in [("tensors-not-list", "side['tensors'] = 5"), ("tensors-mismatch", "side['tensors'] = ['x']"),
                         ("steps-negative", "side['num_inference_steps'] = -1"),
                         ("guidance-nan", "side['guidance_scale'] = float('nan')"),
                         ("height-string", "side['height'] = '64'"), ("prompt-int", "side['prompt'] = 5"),
                         ("method-bogus", "side['method'] = 'bogus'"), ("sidecar-list", "side = []"),
                         ("steps-mismatch-trajectory", "side['num_inference_steps'] = 50")]:
        add(f"inversion-load-{name}", save + change + reload_)
    add("inversion-load-nan-latents", save + "from safetensors.torch import load_file, save_file\n"
        "t = load_file(OUT + '/inv.safetensors')\nt['latents'] = torch.full_like(t['latents'], float('nan'))\n"
        "save_file(t, OUT + '/inv.safetensors')" + reload_)
    add("inversion-load-garbage-tensors", save + "open(OUT + '/inv.safetensors', 'wb').write(b'garbage' * 10)" + reload_)
    add("inversion-load-missing", "RESULT = p2p.Inversion.load(IN + '/nowhere')")
    # visualisation helpers
    add("heatmaps-without-record", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1)\n"
        "RESULT = p2p.attention_heatmaps(r)")
    add("heatmaps-prompt-index-99", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1, record_attention=True)\n"
        "RESULT = p2p.attention_heatmaps(r, prompt_index=99)")
    add("heatmaps-res-3", "r = editor().edit(SRC, [EDIT], num_inference_steps=2, seed=1, record_attention=True)\n"
        "RESULT = p2p.attention_heatmaps(r, res=3)")
    add("image-grid-empty", "RESULT = p2p.image_grid([])")
    add("image-grid-width-zero", "from PIL import Image\nRESULT = p2p.image_grid([Image.new('RGB', (8, 8))], width=0)")
    add("image-grid-captions-mismatch", "from PIL import Image\nRESULT = p2p.image_grid([Image.new('RGB', (8, 8))], "
        "['a', 'b'])")
    add("cache-source-stochastic", "from diffusers import EulerAncestralDiscreteScheduler\ne = editor()\n"
        "e.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(e.pipe.scheduler.config)\n"
        "RESULT = e.cache_source(SRC, seed=1, num_inference_steps=2)")
    add("cache-other-prompt", "c = editor().cache_source(SRC, seed=1, num_inference_steps=2)\n"
        "RESULT = editor().edit(EDIT, [SRC], cache=c)")
    add("load-manifest-missing", "from prompt2prompt.batch import load_manifest\nRESULT = load_manifest(IN + '/x.jsonl')")

    def setup(root, ctx):
        for kind in ("png", "truncated-png", "bomb-30000", "text", "empty", "gif-animated", "float-nan-tiff",
                     "wide-100000x1", "exif-corrupt", "zero-width-png"):
            write_image(root / "in" / f"{kind}.img", kind)
        make_fifo(root / "in" / "fifo.png")
        (root / "out").mkdir()

    return [Case("api", name, code=code, expect=expect, setup=setup) for name, code, expect in specs]


# --- web app ----------------------------------------------------------------------------------------------------

def web_cases() -> list[Case]:
    """`webapp._run` (what the Run button calls) with what a forged request or an odd upload can send."""
    specs: list[tuple[str, str, str]] = [
        ("baseline", "RESULT = run()", "ok"),
        ("inline-markup-only", "RESULT = run('a big [red->green]' + " + repr(TAIL) + ", count=0)", "ok"),
        ("model-etc", "RESULT = run(model='/etc')", "error"),
        ("model-empty", "RESULT = run(model='')", "error"),
        ("model-none", "RESULT = run(model=None)", "error"),
        ("model-trailing-space", "RESULT = run(model='demo ')", "error"),
        ("model-int", "RESULT = run(model=5)", "error"),
        ("source-none", "RESULT = run(None)", "error"),
        ("source-int", "RESULT = run(5)", "error"),
        ("source-list", "RESULT = run(['a'])", "error"),
        ("source-whitespace", "RESULT = run(' \\n\\t')", "error"),
        ("source-triple-arrow", "RESULT = run('a [a->b->c] d', count=0)", "error"),
        ("source-weight-nan", "RESULT = run('a big (red:nan) circle')", "error"),
        ("source-zwsp", "RESULT = run('\\u200b')", "any"),
        ("source-over-77", "RESULT = run('red ' * 90)", "error"),
        ("source-lone-surrogate", "RESULT = run('a big \\udcff red' + " + repr(TAIL) + ")", "any"),
        ("source-nul", "RESULT = run('a big\\x00 red' + " + repr(TAIL) + ")", "any"),
        ("seed-nan", "RESULT = run(seed=NAN)", "error"),
        ("seed-inf", "RESULT = run(seed=INF)", "error"),
        ("seed-1e30", "RESULT = run(seed=1e30)", "error"),
        ("seed-2-pow-63", "RESULT = run(seed=2**63)", "error"),
        ("seed-string", "RESULT = run(seed='5')", "error"),
        ("seed-bool", "RESULT = run(seed=True)", "any"),
        ("seed-fraction", "RESULT = run(seed=0.5)", "any"),
        ("steps-nan", "RESULT = run(steps=NAN)", "error"),
        ("steps-inf", "RESULT = run(steps=INF)", "error"),
        ("steps-zero", "RESULT = run(steps=0)", "error"),
        ("steps-1e30", "RESULT = run(steps=1e30)", "error"),
        ("steps-string", "RESULT = run(steps='abc')", "error"),
        ("steps-none", "RESULT = run(steps=None)", "error"),
        ("steps-2.9", "RESULT = run(steps=2.9)", "any"),
        ("guidance-nan", "RESULT = run(guidance=NAN)", "error"),
        ("guidance-none", "RESULT = run(guidance=None)", "error"),
        ("guidance-1e400", "RESULT = run(guidance=1e400)", "error"),
        ("guidance-string", "RESULT = run(guidance='7.5')", "any"),
        ("count-negative", "RESULT = run(count=-1)", "error"),
        ("count-5", "RESULT = run(count=5)", "error"),
        ("count-1e30", "RESULT = run(count=10**30)", "error"),
        ("count-nan", "RESULT = run(count=NAN)", "error"),
        ("count-none", "RESULT = run(count=None)", "error"),
        ("count-string", "RESULT = run(count='2')", "any"),
        ("row-mode-bogus", "RESULT = run(edit_rows=rows(row(mode='bogus')))", "error"),
        ("row-cross-nan", "RESULT = run(edit_rows=rows(row(cross=NAN)))", "error"),
        ("row-cross-string", "RESULT = run(edit_rows=rows(row(cross='abc')))", "error"),
        ("row-cross-none", "RESULT = run(edit_rows=rows(row(cross=None)))", "error"),
        ("row-cross-1.5", "RESULT = run(edit_rows=rows(row(cross=1.5)))", "error"),
        ("row-self-inf", "RESULT = run(edit_rows=rows(row(self_steps=INF)))", "error"),
        ("row-weight-word-missing", "RESULT = run(edit_rows=rows(row(weight_words=['zebra'])))", "error"),
        ("row-weight-nan", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight=NAN)))", "error"),
        ("row-weight-1e400", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight=1e400)))", "error"),
        ("row-weight-string", "RESULT = run(edit_rows=rows(row(weight_words=['green'], weight='x')))", "error"),
        ("row-weight-words-int", "RESULT = run(edit_rows=rows(row(weight_words=5)))", "error"),
        ("row-blend-one-side", "RESULT = run(edit_rows=rows(row(blend_source=['red'])))", "error"),
        ("row-blend-word-missing", "RESULT = run(edit_rows=rows(row(blend_source=['zebra'], blend_edit=['green'])))",
         "error"),
        ("row-exclude-only", "RESULT = run(edit_rows=rows(row(exclude_source=['red'])))", "error"),
        ("row-prompt-int", "RESULT = run(edit_rows=rows(row(prompt=5)))", "error"),
        ("row-prompt-markup", "RESULT = run(edit_rows=rows(row(prompt='a [red->green]')))", "error"),
        ("row-prompt-weight-1e39", "RESULT = run(edit_rows=rows(row(prompt='a big (green:1e39)' + " + repr(TAIL) + ")))",
         "error"),
        ("row-short-list", "RESULT = run(edit_rows=[EDIT, 'auto'])", "error"),
        ("rows-empty", "RESULT = run(edit_rows=[])", "error"),
        ("image-missing", "RESULT = run(image=IN + '/nowhere.png')", "error"),
        ("image-directory", "RESULT = run(image=IN)", "error"),
        ("image-text", "RESULT = run(image=IN + '/text.png')", "error"),
        ("image-truncated", "RESULT = run(image=IN + '/truncated.png')", "error"),
        ("image-bomb", "RESULT = run(image=IN + '/bomb.png')", "error"),
        ("image-fifo", "RESULT = run(image=IN + '/fifo.png')", "error"),
        ("image-valid-ddim", "RESULT = run(image=IN + '/photo.png', method='ddim')", "ok"),
        ("image-method-bogus", "RESULT = run(image=IN + '/photo.png', method='bogus')", "error"),
        ("image-method-euler", "RESULT = run(image=IN + '/photo.png', method='euler')", "error"),
        ("image-method-none", "RESULT = run(image=IN + '/photo.png', method=None)", "any"),
        ("image-over-limit", "RESULT = run(image=IN + '/photo.png', method='ddim', max_bytes=10)", "error"),
        ("image-odd-extension", "RESULT = run(image=IN + '/photo.PNG;rm -rf', method='ddim')", "any"),
        ("image-server-path", "RESULT = run(image='/etc/hostname', method='ddim')", "error"),
    ]

    def setup(root, ctx):
        (root / "out").mkdir()
        write_image(root / "in" / "photo.png", "png")
        write_image(root / "in" / "photo.PNG;rm -rf", "png")
        write_image(root / "in" / "text.png", "text")
        write_image(root / "in" / "truncated.png", "truncated-png")
        write_image(root / "in" / "bomb.png", "bomb-30000")
        make_fifo(root / "in" / "fifo.png")

    return [Case("web", name, code=code, expect=expect, setup=setup) for name, code, expect in specs]


def all_cases() -> dict[str, list[Case]]:
    makers = {"syntax": syntax_cases, "cli": cli_cases, "image": image_cases, "replay": replay_cases,
              "batch": batch_cases, "api": api_cases, "web": web_cases}
    cases = {category: makers[category]() for category in CATEGORIES}
    for category, items in cases.items():
        names = [case.name for case in items]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SystemExit(f"harness bug: duplicate case names in {category}: {duplicates}")
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Assets for replay: real recipes from the demo model
# ----------------------------------------------------------------------------------------------------------------

def prepare_assets(ctx: Context) -> None:
    """Run the CLI three times (an edit, an attention grid, a real-image edit) to get genuine recipes."""
    folder = ctx.base / "assets"
    for name in ("home", "tmp", "cwd"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    photo = write_image(folder / "photo.png", "png")
    # Each run goes into a new numbered folder under --out; `latest` links to the newest.
    runs = {
        "edit": (["edit", INLINE, *FAST, "--out", str(folder / "edit")], folder / "edit" / "latest" / "edit-1.png"),
        "attn": (["attention", SRC, *FAST, "--res", "4", "--out", str(folder / "attn")],
                 folder / "attn" / "latest" / "image.png"),
        "img": (["edit", "--image", str(photo), "--prompt", SRC, "--to", EDIT, "--steps", "2", "--inversion", "ddim",
                 "--out", str(folder / "img")], folder / "img" / "latest" / "edit-1.png"),
    }
    from PIL import Image

    env = child_env(folder, {}, ctx.threads)
    for name, (args, png) in runs.items():
        if not png.is_file():
            done = subprocess.run([ctx.python, "-c", CLI_CODE, *args], cwd=folder / "cwd", env=env,
                                  capture_output=True, text=True, timeout=max(ctx.timeout, 120))
            if done.returncode != 0 or not png.is_file():
                raise SystemExit(f"cannot make the replay asset {name}: exit {done.returncode}\n{done.stderr[-2000:]}")
        with Image.open(png) as image:
            ctx.assets[name] = (png, json.loads(image.text["prompt2prompt"]))
    ctx.assets["photo"] = (photo, {})
    _RECIPE_PLACEHOLDER.clear()
    _RECIPE_PLACEHOLDER.update(copy.deepcopy(ctx.assets["edit"][1]))
    _RECIPE_PLACEHOLDER["num_inference_steps"] = "@STEPS@"
    _RECIPE_PLACEHOLDER["guidance_scale"] = 7.5


# ----------------------------------------------------------------------------------------------------------------
# Running and classifying
# ----------------------------------------------------------------------------------------------------------------

def child_env(root: Path, extra: dict[str, str | None], threads: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SCRUB_ENV}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (not following links): its kind, size and modification time."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            kind = "dir" if os.path.isdir(path) and not os.path.islink(path) else "link" if os.path.islink(path) else "file"
            found[rel] = (kind, info.st_size if kind == "file" else 0, info.st_mtime_ns if kind == "file" else 0)
    return found


def _allowed(rel: str, allowed: tuple[str, ...]) -> bool:
    return any(rel == prefix or rel.startswith(prefix.rstrip("/") + "/") for prefix in allowed)


BENIGN = re.compile(r"^(seed \d+$|saved to |skipped |\d+ done, \d+ failed|some jobs failed|identical to |differs from |"
                    r"p2p batch:|.*\d+%\|.*\||Loading pipeline components|starting the web app)")
SYNTAX_ERROR = re.compile(r"^error: column \d+:")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
LEAKED_TYPES = re.compile(r"^(?:error: )?(AttributeError|KeyError|IndexError|ZeroDivisionError|OverflowError|AssertionError|"
                          r"UnboundLocalError|NameError|RecursionError|MemoryError|NotImplementedError|"
                          r"StopIteration|UnicodeEncodeError|UnicodeDecodeError|TypeError|struct\.error|"
                          r"SafetensorError|HeaderTooLarge|UnpicklingError|JSONDecodeError):")


def check_pngs(root: Path, folders: tuple[str, ...]) -> list[str]:
    import numpy as np
    from PIL import Image

    problems = []
    for prefix in folders:
        base = root / prefix
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.png")):
            if ".gradio" in path.parts or not path.is_file() or path.is_symlink():
                continue
            rel = path.relative_to(root)
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"))
            except Exception as error:  # noqa: BLE001
                problems.append(f"unreadable PNG {rel} ({type(error).__name__}: {_short(error, 80)})")
                continue
            if array.size == 0:
                problems.append(f"empty PNG {rel}")
            elif array.max() == 0:
                problems.append(f"all-black PNG {rel}")
            elif path.name not in ("grid.png", "attention.png") and array.min() == array.max():
                problems.append(f"uniform PNG {rel} (every pixel {int(array.max())})")
    return problems


def _lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def classify_cli(case: Case, rc: int, stdout: str, stderr: str, violations: list[str], notes: list[str]) -> None:
    glued = re.search(r"\](error: )", stderr)
    if glued:  # e.g. after a progress bar that ended with \r, not a newline: the user sees them on one line
        notes.append(f"the error message does not start a line: {_short(stderr[max(0, glued.start() - 40):glued.end() + 40], 120)}")
        stderr = re.sub(r"(?<=\])(error: )", r"\n\1", stderr)
    lines = _lines(stderr) + _lines(stdout)
    if CONTROL.search(stdout + stderr):
        notes.append("raw control characters in the output")
    if rc == 0:
        extra = [line for line in _lines(stderr) if not BENIGN.match(line)]
        if extra and not case.args[-1:] == ["--help"]:
            notes.append(f"exit 0 with other output: {_short(extra[0], 120)}")
        return
    if rc not in (1, 2):
        return
    help_box = any("Usage:" in line or "\u256d" in line or "Try '" in line for line in lines)
    if help_box:
        notes.append("help/usage text printed for an error")
        return
    rest = [line for line in lines if not BENIGN.match(line)]
    stdout_paths = [line for line in _lines(stdout) if line.endswith((".png", ".jsonl"))]
    rest = [line for line in rest if line not in stdout_paths]
    errors = [i for i, line in enumerate(rest) if line.startswith("error:")]
    if not errors:
        if rc == 1 and any(line.startswith(("some jobs failed", "differs from")) for line in lines):
            return
        violations.append("exit %d with no 'error:' line%s" % (rc, f" (output: {_short(rest[0], 120)})" if rest else ""))
        return
    first = errors[0]
    allowed = {first}
    if SYNTAX_ERROR.match(rest[first]):
        allowed |= {first + 1, first + 2}
        if len(rest) > first + 2 and not rest[first + 2].strip() == "^":
            violations.append("syntax error's caret block is not two lines (prompt, caret)")
    extra = [line for i, line in enumerate(rest) if i not in allowed]
    if len(errors) > 1 or extra:
        violations.append(f"multi-line error ({len(rest)} lines; extra: {_short(' | '.join(extra[:3]), 200)})")
    match = LEAKED_TYPES.match(rest[first])
    if match:
        violations.append(f"internal exception type leaked in the message: {match.group(1)}")


def classify_snippet(case: Case, payload: dict | None, violations: list[str], notes: list[str]) -> str | None:
    """Return 'ok' or 'error' for the snippet's outcome; add violations and notes."""
    if payload is None:
        violations.append("the snippet produced no result (the interpreter died or exited early)")
        return None
    if payload["status"] == "returned":
        if payload.get("nonfinite"):
            violations.append("returned images with NaN/inf values")
        return "ok"
    kind, mro, message = payload["type"], payload["mro"], payload["message"]
    origin, where = payload["origin"], payload["where"]
    multi_line = "\n" in message.strip() and not ("PromptSyntaxError" in mro or re.search(r"column \d+:", message))
    described = f"{kind}: {_short(message, 160)} [raised at {where}]"
    if origin == "snippet" or origin == "<prelude>":
        notes.append(f"raised in the harness's own snippet (harness bug?): {described}")
    if case.category == "web":
        if payload.get("gradio_error"):
            pass
        elif any(name in mro for name in ("ValueError", "OSError", "RuntimeError")):
            notes.append(f"not a gradio.Error (run_edit shows its message): {kind}")
            if "RuntimeError" in mro and "ValueError" not in mro and origin.startswith("library:"):
                violations.append(f"library RuntimeError leaked: {described}")
        else:
            violations.append(f"unexpected exception type (the app would show '{kind}: ...'): {described}")
    else:
        if any(name in mro for name in ("ValueError", "TypeError")):
            if origin.startswith("library:"):
                notes.append(f"{kind} raised inside {origin[8:]}, not checked by prompt2prompt")
        elif "OSError" in mro:
            notes.append(f"{kind} (an OSError) rather than ValueError/TypeError")
        elif "RuntimeError" in mro and origin == "prompt2prompt":
            notes.append(f"RuntimeError from prompt2prompt: {_short(message, 100)}")
        else:
            violations.append(f"unexpected exception type: {described}")
    if multi_line:
        violations.append(f"multi-line error message: {_short(message, 200)}")
    if not message.strip():
        notes.append(f"{kind} with an empty message")
    return "error"


def run_case(case: Case, ctx: Context, keep: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"{case.category}-", dir=ctx.base / "cases"))
    for name in ("home", "tmp", "cwd", "in"):
        (root / name).mkdir()
    record: dict[str, Any] = {"id": case.id, "category": case.category, "name": case.name, "expect": case.expect,
                              "folder": str(root), "why": case.why}
    try:
        if case.setup is not None:
            case.setup(root, ctx)
    except Exception as error:  # noqa: BLE001
        record.update(outcome="harness-error", violations=[], notes=[f"setup failed: {type(error).__name__}: {error}"])
        return record
    before = snapshot(root)
    env = child_env(root, case.env, ctx.threads)

    def fill(arg):
        if isinstance(arg, bytes):
            return arg.replace(b"@IN@", bytes(root / "in")).replace(b"@OUT@", bytes(root / "out")).replace(
                b"@ROOT@", bytes(root))
        return arg.replace("@IN@", str(root / "in")).replace("@OUT@", str(root / "out")).replace("@ROOT@", str(root))

    if case.args is not None:
        argv = [ctx.python, "-c", CLI_CODE, *map(fill, case.args)]
        shown_args = " ".join(_q(a) for a in case.args)
    else:
        prelude = WEB_PRELUDE if case.category == "web" else API_PRELUDE
        argv = [ctx.python, "-c", snippet_program(prelude, case.code), str(root), str(root / "in"), str(root / "out")]
        shown_args = case.code
    record["args"] = shown_args
    record["command"] = (f"cd {_q(str(root / 'cwd'))} && env HOME={_q(str(root / 'home'))} "
                         f"TMPDIR={_q(str(root / 'tmp'))} OMP_NUM_THREADS={ctx.threads} "
                         + "".join(f"{k}={_q(v)} " for k, v in case.env.items() if v is not None)
                         + " ".join(_q(a) for a in argv))
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    started = time.monotonic()
    timed_out = False
    try:
        process = subprocess.Popen(argv, cwd=root / "cwd", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except (OSError, ValueError) as error:
        record.update(outcome="harness-error", violations=[], notes=[f"cannot start: {error}"])
        return record
    try:
        out_bytes, err_bytes = process.communicate(timeout=ctx.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the case's own process group: its workers too
        except ProcessLookupError:
            pass
        out_bytes, err_bytes = process.communicate()
    seconds = time.monotonic() - started
    rc = process.returncode
    stdout = out_bytes.decode("utf-8", "replace")
    stderr = err_bytes.decode("utf-8", "replace")
    violations: list[str] = []
    notes: list[str] = []

    # payload of API/web snippets
    payload = None
    if case.code is not None:
        for line in stdout.splitlines():
            if line.startswith("@@P2P@@"):
                try:
                    payload = json.loads(line[len("@@P2P@@"):])
                except ValueError:
                    pass
        stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith("@@P2P@@"))

    if timed_out:
        violations.append(f"hang: no exit after {ctx.timeout:g} s")
    elif rc < 0:
        violations.append(f"killed by signal {-rc} ({signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else '?'})")
    elif case.args is not None and rc not in (0, 1, 2):
        violations.append(f"exit code {rc}")
    if "Traceback (most recent call last)" in stdout + stderr:
        violations.append("traceback in the output")

    # files
    after = snapshot(root)
    allowed = case.allowed
    stray = sorted(rel for rel, info in after.items() if (rel not in before or before[rel] != info)
                   and not _allowed(rel, allowed) and not any(rel == a.rsplit("/", 1)[0] for a in allowed))
    canaries = sorted(rel for rel in after if os.path.basename(rel).startswith(CANARY))
    if canaries:
        violations.append(f"CODE EXECUTED: canary file(s) {canaries}")
    if stray:
        shown = ", ".join(_short(s, 80) for s in stray[:5]) + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
        (notes if case.category == "api" else violations).append(f"wrote outside --out: {shown}")
    removed = sorted(rel for rel in before if rel not in after and not _allowed(rel, allowed))
    if removed:
        notes.append(f"removed input paths: {', '.join(_short(r, 60) for r in removed[:3])}")
    new_tmp = sorted(set(os.listdir(tempfile.gettempdir())) - tmp_before - {ctx.base.name})
    if new_tmp and ctx.jobs == 1:
        notes.append(f"new entries in the system temp folder during the case (maybe another process): {new_tmp[:3]}")

    # outcome
    outcome = None
    if case.args is not None:
        if not timed_out and rc in (0, 1, 2):
            classify_cli(case, rc, stdout, stderr, violations, notes)
            outcome = "ok" if rc == 0 else "error"
        code_seen = rc
    else:
        if not timed_out:
            if rc != 0:
                violations.append(f"the interpreter exited with {rc}")
            outcome = classify_snippet(case, payload, violations, notes)
        code_seen = {"ok": 0, "error": 2}.get(outcome or "", None)
    if outcome == "ok":
        pngs = check_pngs(root, allowed)
        if pngs:
            violations += [f"{problem} with exit 0" for problem in pngs]
    elif outcome == "error" and case.args is not None and case.category != "batch":
        leftovers = [rel for rel in after if _allowed(rel, allowed) and after[rel][0] == "file"]
        if leftovers:
            notes.append(f"a failed run left files in --out: {', '.join(_short(r, 60) for r in leftovers[:3])}")
    if outcome == "error" and case.category == "web":
        left = [p.name for p in (root / "out").iterdir() if p.name != ".gradio"] if (root / "out").is_dir() else []
        if left:
            notes.append(f"a failed run left folders in the output folder: {left[:3]}")
    if case.check is not None and not timed_out:
        try:
            violations += case.check(root, {"rc": rc, "stdout": stdout, "stderr": stderr})
        except Exception as error:  # noqa: BLE001
            notes.append(f"check failed: {type(error).__name__}: {error}")
    if case.category == "batch" and (root / "out" / "results.jsonl").is_file():
        for text in (root / "out" / "results.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                continue
            error = str(row.get("error") or "") if isinstance(row, dict) else ""
            if "Traceback" in error or "\n" in error.strip():
                violations.append(f"results.jsonl error is not one line: {_short(error, 160)}")
            if LEAKED_TYPES.match(error):
                notes.append(f"a job failed with {_short(error, 140)}")

    # expectation
    if outcome is not None and code_seen is not None and not violations:
        expected = EXPECT_CODES[case.expect]
        if case.args is None:
            expected = {"ok": {0}, "any": {0, 2}}.get(case.expect, {2})
        if code_seen not in expected:
            what = {0: "success", 1: "exit 1 (runtime)", 2: "exit 2 (usage)"}.get(code_seen, str(code_seen))
            if case.args is None:
                what = "a returned value" if code_seen == 0 else "an exception"
            notes.append(f"expected {case.expect}, got {what}")
    record.update(outcome="violation" if violations else (outcome or "violation"), rc=rc, seconds=round(seconds, 2),
                  timed_out=timed_out, violations=violations, notes=notes, payload=payload,
                  stderr_tail=stderr[-1500:], stdout_tail=stdout[-600:])
    if keep == "all" or (keep == "violations" and violations):
        record["kept"] = True
    else:
        shutil.rmtree(root, ignore_errors=True)
        record["kept"] = False
    return record


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def _default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated categories: {', '.join(CATEGORIES)}")
    parser.add_argument("--limit", type=int, help="the first N cases of each category")
    parser.add_argument("--match", help="only cases whose category/name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1: the machine has 2 cores)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang (60)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each case (1)")
    parser.add_argument("--python", default=_default_python(), help="interpreter with prompt2prompt installed")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--base", help="folder for the case folders (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder")
    parser.add_argument("--no-keep", action="store_true", help="keep no case folder, not even a violation's")
    parser.add_argument("--list", action="store_true", help="list the cases and their counts, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress line per case")
    parser.add_argument("--setup-only", action="store_true", help="build every selected case's inputs, run nothing "
                                                                  "(checks the harness itself)")
    args = parser.parse_args(argv)

    categories = CATEGORIES if not args.only else tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        parser.error(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    generated = all_cases()
    selected: list[Case] = []
    for category in categories:
        items = [c for c in generated[category] if not args.match or args.match in c.id]
        selected += items[: args.limit] if args.limit is not None else items
    if args.list:
        for category in categories:
            items = [c for c in selected if c.category == category]
            print(f"{category}: {len(items)} cases (of {len(generated[category])})")
            for case in items:
                print(f"  {case.name}  [{case.expect}]")
        print(f"total: {len(selected)} cases (of {sum(len(v) for v in generated.values())})")
        return 0
    if not selected:
        print("no case selected", file=sys.stderr)
        return 2

    base = Path(args.base) if args.base else Path(tempfile.mkdtemp(prefix="p2p-adversarial-"))
    (base / "cases").mkdir(parents=True, exist_ok=True)
    ctx = Context(base=base.resolve(), python=args.python, timeout=args.timeout, threads=args.threads, jobs=args.jobs)
    keep = "all" if args.keep else "none" if args.no_keep else "violations"
    print(f"{len(selected)} cases, {args.jobs} at a time, timeout {args.timeout:g} s, folders under {base}",
          file=sys.stderr)
    if any(case.needs_assets for case in selected):
        print("making replay assets (3 demo runs) ...", file=sys.stderr)
        prepare_assets(ctx)

    if args.setup_only:
        failures = 0
        for case in selected:
            root = Path(tempfile.mkdtemp(prefix="setup-", dir=ctx.base / "cases"))
            for name in ("home", "tmp", "cwd", "in"):
                (root / name).mkdir()
            try:
                if case.setup is not None:
                    case.setup(root, ctx)
                if case.code is not None:
                    compile(snippet_program(WEB_PRELUDE if case.category == "web" else API_PRELUDE, case.code),
                            case.id, "exec")
                    compile(case.code, case.id, "exec")
            except Exception as error:  # noqa: BLE001
                failures += 1
                print(f"SETUP FAILED {case.id}: {type(error).__name__}: {error}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
        print(f"{len(selected) - failures} of {len(selected)} cases set up")
        return 1 if failures else 0

    records: list[dict] = []
    lock = threading.Lock()
    started = time.time()

    def one(case: Case) -> dict:
        record = run_case(case, ctx, keep)
        with lock:
            records.append(record)
            if not args.quiet:
                mark = {"ok": "ok", "error": "clean-error", "violation": "VIOLATION"}.get(record["outcome"],
                                                                                       record["outcome"])
                print(f"[{len(records)}/{len(selected)}] {case.id}: {mark} ({record.get('seconds', 0)} s)"
                      + (f"  notes: {'; '.join(record['notes'])}" if record.get("notes") else ""),
                      file=sys.stderr, flush=True)
            if record["violations"]:
                tail = " | ".join(_lines(record.get("stderr_tail", ""))[-2:])
                print(f"VIOLATION [{case.category}] {case.name}: {'; '.join(record['violations'])} | args: "
                      f"{_short(record.get('args', ''), 200)} | stderr: {_short(tail, 300)} | rerun: "
                      f"{_q(sys.executable)} {_q(__file__)} --only {case.category} --match {_q(case.name)}",
                      flush=True)
        return record

    try:
        if args.jobs <= 1:
            for case in selected:
                one(case)
        else:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, selected))
    except KeyboardInterrupt:
        print("interrupted: reporting the cases run so far", file=sys.stderr)

    order = {case.id: i for i, case in enumerate(selected)}
    records.sort(key=lambda r: order.get(r["id"], 0))
    summary: dict[str, dict[str, int]] = {}
    for category in categories:
        mine = [r for r in records if r["category"] == category]
        summary[category] = {
            "cases": len(mine), "ok": sum(r["outcome"] == "ok" for r in mine),
            "clean_errors": sum(r["outcome"] == "error" for r in mine),
            "violations": sum(r["outcome"] == "violation" for r in mine),
            "harness_errors": sum(r["outcome"] == "harness-error" for r in mine),
            "notes": sum(bool(r.get("notes")) for r in mine),
            "unexpected": sum(any(n.startswith("expected ") for n in r.get("notes", [])) for r in mine),
        }
    total = {key: sum(s[key] for s in summary.values()) for key in next(iter(summary.values()))}
    header = f"{'category':<10}{'cases':>7}{'ok':>6}{'clean-error':>13}{'VIOLATION':>11}{'harness':>9}{'notes':>7}" \
             f"{'unexpected':>12}"
    print("\n" + header)
    print("-" * len(header))
    for name, row in [*summary.items(), ("total", total)]:
        print(f"{name:<10}{row['cases']:>7}{row['ok']:>6}{row['clean_errors']:>13}{row['violations']:>11}"
              f"{row['harness_errors']:>9}{row['notes']:>7}{row['unexpected']:>12}")
    print(f"\n{time.time() - started:.0f} s; 'unexpected': exit code or outcome other than the case expects "
          "(a note, not a violation)")
    if args.report:
        report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  "seconds": round(time.time() - started, 1), "python": args.python, "timeout": args.timeout,
                  "base": str(base), "summary": summary, "total": total, "cases": records}
        Path(args.report).write_text(json.dumps(report, indent=1, ensure_ascii=False, default=repr))
        print(f"report: {args.report}", file=sys.stderr)
    if keep != "all" and not any(r.get("kept") for r in records) and not args.base:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if total["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
