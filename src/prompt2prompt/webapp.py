"""The Gradio web app: a source prompt and edit rows in, a gallery, heatmaps and recipe-carrying PNGs out.

It is a thin layer over the Python API and the only module that imports gradio. It binds to 127.0.0.1
unless told otherwise, runs one edit at a time, and writes only under its output folder (Gradio's upload
cache and temporary files included); no input names a path.

Gradio fixes some of its folders from GRADIO_TEMP_DIR when it is imported, so this module imports it only in
`build_app`, after pointing GRADIO_TEMP_DIR into the output folder. A program that imported gradio before keeps
the uploads under the output folder, but gradio's other temporary folders where its import put them.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import dataclasses
import functools
import io
import logging
import math
import os
import re
import secrets
import shutil
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from PIL import Image

from .edits import MODES
from .engine import SourceStore, load_editor
from .families.defaults import vocabulary_notice
from .files import temporary_target
from .images import fit_note, image_size, load_image, open_image
from .limits import MAX_STEPS, check_guidance, check_int
from .loading import ModelSource, check_device, parse_dtype
from .recipe import edit_label, file_digest, recipe_for, run_recipe, save_result
from .syntax import PromptSyntaxError, parse_prompt
from .visualize import CAPTION_HEIGHT, heatmap

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch"]

MAX_EDITS = 4
MAX_PROMPTS = MAX_EDITS + 2  # the source, an edit from its inline markup and the rows': a heatmap gallery each
QUEUE_SIZE = 64  # requests waiting at most (Gradio's queue max_size); one more is told the queue is full
CACHE_RUNS = 32  # Gradio's cache keeps the files of this many recent runs (see _CacheBound)
# Gradio keeps a copy of the form's config for each session (a page load, an API client), about 0.4 MiB here, for
# 10000 sessions by default: gigabytes. The form's state lives in the page (hidden fields), so a session forgotten
# loses nothing the app needs; only the last SESSIONS are kept.
SESSIONS = 64
STAGING = ".staging"  # under the output folder: runs being written, renamed into place when whole
# A run folder's name, as _run_folder makes it: only such folders are ever cleaned up (never the user's own).
_RUN_NAME = re.compile(r"\d{8}-\d{6}-(\d+|image)-[0-9a-f]{6}")
_RESULT_PNG = re.compile(r"(source|grid|edit-[1-9][0-9]*)[.]png")  # the PNGs save_result writes
ERROR_COLUMNS = 48  # an error's prompt is cut into lines this long at most: the status column's width, in monospace
# Small images (the demo model's 64 px) are drawn larger than they are: pixelated, so their pixels stay sharp.
SMALL_IMAGE = 256
# Gradio lays a thumbnail's caption over the bottom of its image, and the gallery's label over the first one's
# top: here the caption sits beneath the image, which takes the rest of the square cell, whole, and the cells
# start below the label. The gallery is as tall as its one row (Gradio's "auto" height is 450 to 550 px).
# The status line shows an error in the error colour, its prompt and caret in monospace (cut to fit, `_wrapped`).
CSS = """
.pixelated img { image-rendering: pixelated; }
:is(#gallery, .heatmaps) .grid-container { padding-top: var(--size-6); }
#gallery .grid-wrap { min-height: 0; max-height: none; }
.heatmaps .grid-wrap { min-height: 0; }
:is(#gallery, .heatmaps) .thumbnail-item { display: flex; flex-direction: column; }
:is(#gallery, .heatmaps) .thumbnail-item img { flex: 1 1 0; min-height: 0; }
:is(#gallery, .heatmaps) .thumbnail-item .caption-label {
    position: static; flex: none; max-width: none; border: none; border-radius: 0; }
#heat-scale img { display: inline-block; width: 160px; height: 0.9em; vertical-align: middle; }
#status .error { color: var(--error-text-color); font-weight: var(--weight-semibold); }
#status pre { overflow-x: auto; }
"""

_STATUS_ERROR = '<div class="error">'  # how the status line starts when it shows an error

log = logging.getLogger(__name__)


def _error(message: str, detail: str | None = None, *, field: str | None = None) -> Exception:
    """A user's error: `message` in one line, `detail` (a prompt with a caret under a column) beneath it, and the
    request's `field` at fault (its key in `Form.named`: "source", "edit-1.prompt"), if one is.

    The app shows it in the status line (`_status_error`) and leaves the other outputs as they were. Raised to
    Gradio (a request refused before any function runs), it is a `gradio.Error` whose message is `message`,
    escaped: Gradio renders a toast's text as HTML, so the user's words are escaped (only & and <, which are all
    that text needs: an API client reads the message nearly as written).
    """
    return _error_class()(message, detail, field)


@functools.cache
def _error_class() -> type[Exception]:
    import gradio as gr  # imported by build_app already, with its folders set

    class UserError(gr.Error):
        def __init__(self, message: str, detail: str | None, field: str | None):
            super().__init__(_html_text(message), print_exception=False)  # Gradio prints no traceback for it
            self.line, self.detail, self.field = message, detail, field

        def __str__(self) -> str:  # gradio.Error's is its message's repr; a refused request's reply carries str()
            return self.message

    return UserError


def _shown(error: Exception, *, quiet: bool = False) -> Exception:
    """`error` as the app's `_error`, and logged unless `quiet` (where another function logs the same error): a
    user's error in one line, anything else (a bug) with its traceback."""
    if isinstance(error, _error_class()):
        shown = error
    elif isinstance(error, (ValueError, OSError, RuntimeError)):  # the engine's checks, files, models, NaN results
        lines = str(error).splitlines() or [type(error).__name__]
        shown = _error(lines[0], "\n".join(lines[1:]) or None)
    else:
        shown = _error(f"{type(error).__name__}: {_one_line(str(error))}")
        if not quiet:
            log.error("failed: %s", shown.line, exc_info=error)
        return shown
    if not quiet:
        log.warning("refused: %s", shown.line)
    return shown


def _status_error(error: Exception, *, quiet: bool = False) -> str:
    """The status line that shows `error` (`_shown(error, quiet=quiet)`): its message, and its detail in monospace
    with each prompt cut into lines that fit the status column, the caret kept under its column (`_wrapped`)."""
    shown = _shown(error, quiet=quiet)
    text = f"{_STATUS_ERROR}{_html_text(shown.line)}</div>"
    if shown.detail:
        text += f"<pre>{_html_text(_wrapped(textwrap.dedent(shown.detail)))}</pre>"
    return text


def _wrapped(detail: str, width: int = ERROR_COLUMNS) -> str:
    r"""`detail` with each line longer than `width` cut at spaces, and each caret line ("  ^") beneath the piece of
    the line above it that holds the caret's column.

    >>> print(_wrapped("  a big [red circle\n        ^", width=8))
      a big
    [red
    ^
    circle
    """
    lines, shown = detail.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == "^":  # placed with the line above
            continue
        below = lines[i + 1] if i + 1 < len(lines) else ""
        column = below.index("^") if below.strip() == "^" else -1
        starts = [0]
        while len(line) - starts[-1] > width:
            space = line.rfind(" ", starts[-1] + 1, starts[-1] + width + 1)
            starts.append(space + 1 if space > starts[-1] else starts[-1] + width)
        ends = [*starts[1:], len(line)]
        for start, end in zip(starts, ends):
            shown.append(line[start:end].rstrip(" "))
            if column >= 0 and (start <= column < end or end == len(line) and column >= end):
                shown.append(" " * (column - start) + "^")
    return "\n".join(shown)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


class _Editors:
    """Editors for the offered models, loaded on first use, and the sources and inversions of recent runs."""

    def __init__(self, models: Sequence[str], device: str | None, dtype: str, cache_mb: float = 2048,
                 allow_pickle: bool = False):
        self.models = list(models)
        self.device = check_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.allow_pickle = allow_pickle
        self.loaded: dict[str, tuple[Any, ModelSource]] = {}
        self.lock = threading.Lock()
        # Changing only the edit rows re-runs only the edits: the source and its inversion are kept here.
        self.sources = SourceStore(int(cache_mb * 2**20))

    def get(self, model: str):
        if model not in self.models:  # the picker offers only these; a forged request gets no other path
            raise _error(f"unknown model {model!r}; this server offers {', '.join(self.models)}")
        with self.lock:
            if model not in self.loaded:
                # With progress bars: Gradio's track_tqdm follows the pipeline's denoising bar.
                self.loaded[model] = load_editor(model, device=self.device, dtype=self.dtype, progress=True,
                                                 allow_pickle=self.allow_pickle)
        return self.loaded[model]


def _words(prompt: str | None) -> list[str]:
    """The prompt's distinct words, in order: the choices of the word pickers."""
    return list(dict.fromkeys((prompt or "").split()))


def _default_method(family) -> str | None:
    """The inversion the form offers first: the family's default, or none for a family without inversion."""
    return family.default_inversion if family.inversion_methods else None


def _heatmap_labels(result, prompt_index: int) -> list[str]:
    """The caption of each of `attention_heatmaps(result, prompt_index)`: its token (its word on SD3 and Flux)."""
    if getattr(result, "map_unit", "token") == "word":
        return [word for word, positions in result.words[prompt_index] if positions]
    return list(result.tokens[prompt_index][1:-1])  # without the start and end tokens, as the heatmaps


def _heat_scale() -> str:
    """The Attention tab's colour scale, drawn by `heatmap` itself from the least attention to the most."""
    import torch

    buffer = io.BytesIO()
    heatmap(torch.linspace(0, 1, 256)[None]).save(buffer, format="PNG")  # a (1, 256) map: a 256 x 1 px ramp
    ramp = f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="">'
    return (f"<p>Where each word's cross-attention falls: least {ramp} most, in that map's own range (every map "
            "spans the whole scale), laid at half strength over its image.</p>")


def _image_classes(path: str | Path) -> list[str]:
    """The gallery's CSS classes for images like the one at `path`: "pixelated" for small ones."""
    with Image.open(path) as image:
        return ["pixelated"] if max(image.size) < SMALL_IMAGE else []


T = TypeVar("T")


def _field(label: str | None = None, *types: type) -> Any:
    """A form input: its name in messages, and the types its component sends (None aside); only a forged request
    sends others. An input without types has its own check in `_check_request`."""
    return dataclasses.field(metadata={"label": label, "types": types})


class _Input(NamedTuple):
    key: str  # as `_error`'s field: "source", "edit-1.prompt"
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
        """The form whose `inputs()` are `values`: a request's, named. Raises `_error` if they cannot be.

        >>> row = ["a dog", "auto", 0.8, 0.4, [], 1.0, [], [], [], [], 0.3]
        >>> form = Form.of(["demo", "a cat", 7, 30, 7.5, None, "direct", 1, *row])
        >>> form.source, form.rows[0].prompt, form.rows[0].threshold
        ('a cat', 'a dog', 0.3)
        """
        top = len(dataclasses.fields(cls)) - 1  # all but the rows
        if len(values) < top or (len(values) - top) % ROW_FIELDS:
            raise _error(f"the request holds {len(values)} values; the form sends {top} and {ROW_FIELDS} per edit row")
        rows = [EditRow(*values[start:start + ROW_FIELDS]) for start in range(top, len(values), ROW_FIELDS)]
        return cls(*values[:top], rows=rows)


def _parse(text: str, what: str, field: str):
    try:
        return parse_prompt(text)
    except PromptSyntaxError as error:  # its message's last lines: the prompt and a caret under the column
        first, *rest = str(error).splitlines()
        raise _error(f"{what}: {first}", "\n".join(rest), field=field) from None


def _edit_spec(index: int, row: EditRow[Any]) -> dict[str, Any] | None:
    """Row `index`'s recipe edit spec; None for an empty row. The prompt may weight words inline: "a (fluffy:2) cat"."""
    if not (row.prompt or "").strip():
        return None
    field = _row_key(index, "prompt")
    if row.cross is None or row.self_steps is None or (row.weight_words and row.weight is None):  # a forged request
        raise _error(f"edit {index}: the cross and self windows and the weight must be numbers", field=field)
    parsed = _parse(row.prompt, f"edit {index}", field)
    if parsed.edit is not None and parsed.edit != parsed.source:
        raise _error(f"edit {index} takes an edit prompt, optionally with (word:weight) groups, not [old->new] "
                     "markup; put that in the source prompt", field=field)
    blend = None
    if row.blend_source or row.blend_edit or row.exclude_source or row.exclude_edit:
        if not row.blend_source or not row.blend_edit:
            raise _error(f"edit {index}: local blend needs words on both sides, e.g. source 'cat' and edit 'dog'",
                         field=_row_key(index, "blend_source"))
        blend = {"source_words": list(row.blend_source), "edit_words": list(row.blend_edit),
                 "exclude_source_words": list(row.exclude_source or []),
                 "exclude_edit_words": list(row.exclude_edit or []),
                 "threshold": None if row.threshold is None else float(row.threshold)}
    weights = [[position, w] for position, w in parsed.weights.items()]
    weights += [[word, float(row.weight)] for word in row.weight_words or []]
    return {"prompt": parsed.source, "mode": row.mode, "cross_steps": float(row.cross),
            "self_steps": float(row.self_steps), "weights": weights or None, "blend": blend}


def _leave_defaults(spec: dict[str, Any], defaults) -> dict[str, Any]:
    """`spec` without the windows and blend threshold whose sliders stand at the model's defaults (`defaults`, a
    `ModelDefaults`): the run then takes the model's own, its per-word windows included (the demo model's shape
    swaps take a shorter cross-attention window), and the status line says which it took."""
    spec = dict(spec)
    for name in ("cross_steps", "self_steps"):
        if spec[name] == getattr(defaults, name):
            spec[name] = None
    if spec["blend"] is not None and spec["blend"]["threshold"] == defaults.blend_threshold:
        spec["blend"] = {**spec["blend"], "threshold": None}
    return spec


def _check_upload(path: str, max_bytes: int) -> str:
    """`path` if it holds an image within the limits; the upload component takes any file, so that a wrong one
    gets this message and not Gradio's bare "Error". The messages name "the upload", never its path on the server.
    """
    try:
        size = os.path.getsize(path)
    except OSError:  # gone from Gradio's cache (see _CacheBound), or never there
        raise _error("the upload is no longer on the server; upload the image again", field="image") from None
    if size > max_bytes:
        raise _error(f"the upload is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB", field="image")
    try:
        open_image(path).close()
    except OSError:
        raise _error("the upload is no longer on the server; upload the image again", field="image") from None
    except ValueError as error:  # its message starts with the quoted path, and Pillow's reason may name it too
        message = str(error).replace(f"'{path}'", "the upload", 1)
        # Pillow's reason ("cannot identify image file '/path'") reads as well without the path.
        message = message.replace(f" '{path}'", "").replace(path, "the upload")
        raise _error(message, field="image") from None
    return path


def _check_form(form: Form[Any]) -> None:
    """Refuse a forged request whose inputs are not what the form's components send, with a message."""
    for key, value, label, types in form.named():
        if not types:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise _error(f"the {label} must be a {' or '.join(t.__name__ for t in types)}, not {type(value).__name__}",
                         field=key)
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise _error(f"the {label} must be a list of words", field=key)
    count = form.count
    if count is None:
        raise _error("the request holds no edit count", field="count")
    if isinstance(count, float) and not (math.isfinite(count) and count.is_integer()) or count > MAX_EDITS:
        raise _error(f"the edit count must be a whole number up to {MAX_EDITS}, not {count!r}", field="count")
    if len(form.rows) < int(count):
        raise _error("the request holds fewer edit rows than its count", field="count")


@dataclasses.dataclass(frozen=True)
class _Request:
    """A Run request, checked as far as it can be without the model (`_check_request`)."""

    model: str
    source: str  # without its inline markup
    specs: list[dict[str, Any]]  # the recipe's edits: inline markup's first, then the rows'
    steps: int
    guidance: float
    seed: int | float | None  # as sent: None or below 0 for a random one
    image: str | None
    method: str


def _check_request(max_bytes: int, form: Form[Any]) -> _Request:
    """The Run button's inputs, checked without the model: the types, the prompts' syntax, the numbers and the
    upload. Raises `_error` naming the input at fault."""
    _check_form(form)
    if not (form.source or "").strip():
        raise _error("type a source prompt first", field="source")
    parsed = _parse(form.source, "the source prompt", "source")  # inline markup ("a [cat->dog]") makes an edit
    specs = []
    if parsed.edit is not None:
        specs.append({"prompt": parsed.edit, "mode": "auto", "cross_steps": None, "self_steps": None,  # the model's
                      "weights": [[position, w] for position, w in parsed.weights.items()] or None, "blend": None})
    specs += [spec for i, row in enumerate(form.rows[:max(int(form.count), 0)], 1)
              if (spec := _edit_spec(i, row)) is not None]
    if not specs:
        raise _error("type at least one edit prompt, or inline markup in the source: 'a [cat->dog]'",
                     field=_row_key(1, "prompt"))
    try:
        steps, guidance = int(form.steps), float(form.guidance)
    except (TypeError, ValueError, OverflowError):  # only a forged request sends these: the sliders give numbers
        raise _error(f"steps and guidance must be numbers, not {form.steps!r} and {form.guidance!r}",
                     field="steps") from None
    try:
        check_int(steps, "steps", 1, MAX_STEPS)
    except ValueError as error:
        raise _error(str(error), field="steps") from None
    try:
        check_guidance(guidance)
    except ValueError as error:
        raise _error(str(error), field="guidance") from None
    seed = form.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed)
                             or seed >= 2**63):  # only a forged request: the seed box gives numbers
        raise _error(f"the seed must be a whole number from 0 to 2**63 - 1 (-1: random), not {seed!r}", field="seed")
    if form.image:
        _check_upload(form.image, max_bytes)
    return _Request(form.model, parsed.source, specs, steps, guidance, seed, form.image or None, form.method)


def _run_folder(out_dir: Path, seed: int | None) -> Path:
    """A fresh folder for one run, named by the server only, in the staging folder: `_publish` moves it into
    `out_dir` when it is whole, so that a crash (a kill, a power cut) never leaves half a run there."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out_dir / STAGING / f"{stamp}-{seed if seed is not None else 'image'}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    return folder


def _publish(staging: Path, out_dir: Path) -> Path:
    """Move a whole run from the staging folder into `out_dir`, in one rename (the same file system)."""
    folder = out_dir / staging.name
    os.rename(staging, folder)  # the name is fresh (a random part), so nothing is overwritten
    return folder


def _is_leftover(name: str) -> bool:
    """Whether `name` is the temporary file of one of save_result's PNGs (".edit-1.png.k2j4x8f2.tmp.png"), left by
    a write that never finished."""
    return bool(_RESULT_PNG.fullmatch(temporary_target(name) or ""))


def _clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove what a crash left in `out_dir`: the staging folder, run folders that are empty or lack their grid.png
    (save_result writes it last; runs made before staging existed were written in place), and the temporary files
    of save_result's PNGs in the others.

    Only the names the app makes are touched, never the user's other files. Returns what was removed.
    """
    staging = out_dir / STAGING
    removed = sorted(staging.iterdir()) if staging.is_dir() and not staging.is_symlink() else []
    for entry in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if _RUN_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            if not (entry / "grid.png").is_file():
                removed.append(entry)
            else:
                removed += [file for file in entry.iterdir() if _is_leftover(file.name)]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        staging.rmdir()
    if removed:
        log.warning("removed %d leftovers of unfinished runs from %s", len(removed), out_dir)
    return removed


class _CacheBound:
    """Keeps Gradio's cache (GRADIO_TEMP_DIR) to the files of the last `runs` runs.

    Gradio copies every image it shows or offers for download into its cache and deletes none while the server
    runs, so each run adds a few dozen files for good. Here, each run's start removes the cache entries (Gradio's
    hash-named folders) that no file was written to or used since the start of the run `runs` runs back: old
    results and old uploads. The upload of the run starting is marked as used first, so that a user editing one
    photo again and again keeps it. Gradio's stray temporary files go by the same rule: its upload component makes
    an empty one each time it hands a request's upload to a function, and never removes it.
    """

    _ENTRY = re.compile(r"[0-9a-f]{32,}")  # Gradio's cache entries: a folder named by a hash of the content
    _STRAY = re.compile(r"tmp[a-z0-9_]{8}")  # tempfile.NamedTemporaryFile's names (its "tmp" and 8 random characters)

    def __init__(self, folder: Path, runs: int = CACHE_RUNS):
        self.folder = folder
        self.starts: collections.deque[float] = collections.deque(maxlen=runs)
        self.lock = threading.Lock()

    def run_started(self, upload: str | None = None) -> None:
        with self.lock:
            if upload and Path(upload).is_file() and Path(upload).parent.parent == self.folder:
                os.utime(upload)
            if len(self.starts) == self.starts.maxlen:
                # Less a little: file times come from the kernel's coarse clock, a few ms behind time.time().
                self.prune(older_than=self.starts[0] - 0.05)
            self.starts.append(time.time())

    def prune(self, *, older_than: float) -> None:
        for entry in self.folder.iterdir() if self.folder.is_dir() else []:
            if self._ENTRY.fullmatch(entry.name) and entry.is_dir() and _newest(entry) < older_than:
                shutil.rmtree(entry, ignore_errors=True)
            elif self._STRAY.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                with contextlib.suppress(OSError):  # an upload being written has a newer time: it stays
                    if entry.stat().st_mtime < older_than:
                        entry.unlink()


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _release_memory() -> None:
    """Give the C heap's free pages back to the system, where the C library can (glibc).

    Gradio runs each request on one of its worker threads, and glibc gives threads heaps of their own (arenas): what
    a run frees in one arena stays there, free but resident, while the next run fills another. Under concurrent load
    every arena keeps a run's worth of free pages, some hundreds of MiB in all; trimming after each run returns them.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _newest(folder: Path) -> float:
    """The latest modification time of `folder` and the files in it."""
    times = [folder.stat().st_mtime]
    times += [path.stat().st_mtime for path in folder.rglob("*") if path.is_file()]
    return max(times)


def _run(editors: _Editors, out_dir: Path, max_bytes: int, *values: Any):
    """The Run button, given its inputs' values (in `Form.inputs()` order, checked by `_check_request`): edit, save
    the PNGs, and fill the gallery, the downloads, the heatmaps (per prompt: its caption and its words' maps) and
    the status line."""
    import prompt2prompt as p2p

    request = _check_request(max_bytes, Form.of(values))
    image, specs, steps, guidance = request.image, request.specs, request.steps, request.guidance
    real: dict[str, Any] = {}
    seed = request.seed
    if image:
        seed = None
    elif seed is None or seed < 0:
        seed = secrets.randbelow(2**31)
    editor, model_source = editors.get(request.model)
    seed = None if seed is None else int(seed)
    # Sliders left at the model's defaults take the defaults, as options left out do on the command line.
    defaults, used = editor.defaults, []
    specs = [_leave_defaults(spec, defaults) for spec in specs]
    steps = None if steps == defaults.num_inference_steps else steps
    guidance = None if guidance == defaults.guidance_scale else guidance
    folder = _run_folder(out_dir, seed)
    try:
        if image:
            suffix = Path(image).suffix.lower()  # the user's file name: only a plain extension is kept
            copy = folder / f"input{suffix if re.fullmatch(r'[.][a-z0-9]{1,5}', suffix) else '.img'}"
            shutil.copyfile(image, copy)
            real = dict(image={"path": copy.name, "sha256": file_digest(copy)}, inversion={"method": request.method})
        recipe = recipe_for(
            editor, model_source, used=used, source=request.source, edits=specs, seed=seed, num_inference_steps=steps,
            guidance_scale=guidance, record_attention=True, cached_source=True, **real,
        )
        hits, started = editors.sources.hits, time.perf_counter()
        result = run_recipe(recipe, editor, base_dir=folder, sources=editors.sources)
        timing = f"{time.perf_counter() - started:.1f} s" + (", source reused" if editors.sources.hits > hits else "")
        paths = save_result(result.images, recipe, folder)
        staging, folder = folder, _publish(folder, out_dir)
    except BaseException:  # the engine's checks, NaN results, ...: a failed run leaves no folder behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # empty now, unless another process is writing a run there
            (out_dir / STAGING).rmdir()
    paths = [folder / path.relative_to(staging) for path in paths]
    # What each edit changes ("red -> green"), so that a caption cut short never hides the edited word.
    first = "reconstruction: " if recipe.image is not None else "source: "  # an inverted picture, through the VAE
    captions = [first + recipe.source] + [f"edit {i}: {edit_label(recipe.source, spec) or spec['prompt']}"
                                          for i, spec in enumerate(specs, 1)]
    gallery = [(str(path), text) for path, text in zip(paths, captions)]  # the grid (last path) is download-only
    # attention_heatmaps writes each word on a strip beneath its map; the gallery's caption says it instead, once.
    heatmaps = [(text, [(heat.crop((0, 0, heat.width, heat.height - CAPTION_HEIGHT)), label)
                        for heat, label in zip(p2p.attention_heatmaps(result, prompt_index=i),
                                               _heatmap_labels(result, i), strict=True)])
                for i, text in enumerate(captions)]
    status = (f"Seed {recipe.seed}. " if recipe.seed is not None else "") + f"Saved to `{folder.name}`. {timing}."
    if used:  # e.g. "30 steps, guidance 5 (the model's prompt2prompt.json); edit 1: cross 0.5, self 0 (...)"
        status += f" Defaults: {'; '.join(used)}."
    if image:
        fitted = fit_note(load_image(image).size, *image_size(editor.pipe))
        status += f" Note: {fitted}." if fitted else ""
    unknown = vocabulary_notice(defaults.vocabulary, [recipe.source, *(spec["prompt"] for spec in recipe.edits)])
    status += f" Warning: {unknown}." if unknown else ""
    return gallery, [str(path) for path in paths], heatmaps, recipe.seed, status


def build_app(models: Sequence[str], *, out_dir: str | Path, device: str | None = None, dtype: str = "auto",
              max_upload_mb: float = 10.0, cache_mb: float = 2048, allow_pickle: bool = False,
              queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The web app's Blocks, offering `models` (the first is the default) and writing under `out_dir`.

    Gradio's own upload cache and temporary files are moved into `out_dir` too (GRADIO_TEMP_DIR, set before
    gradio is first imported; see the module's docstring), and kept to the files of the last `CACHE_RUNS` runs.
    Each run is written into `out_dir/.staging` and moved into `out_dir` whole; what a crash left there is removed
    first (`_clean_leftovers`). Sources and inversions of recent runs are kept within `cache_mb` MiB, so that
    changing only the edits re-runs only the edits. At most `queue_size` requests wait in the queue.
    `allow_pickle` is `load_pipeline`'s.
    """
    if not models:
        raise ValueError("the web app needs at least one model, e.g. models=['demo']")
    editors = _Editors(models, device, dtype, cache_mb, allow_pickle)  # a bad device fails before any folder
    first_editor = editors.get(models[0])[0]  # the default model loads now: the form starts at its own settings
    first, defaults = first_editor.family, first_editor.defaults
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out_dir)
    os.environ["GRADIO_TEMP_DIR"] = str(out_dir / ".gradio")
    import gradio as gr

    max_bytes = int(max_upload_mb * 2**20)
    cache = _CacheBound(out_dir / ".gradio", CACHE_RUNS)

    example_source, example_edit = defaults.example  # the default model's own example: the first Run works

    with _blocks_class()(title="prompt2prompt", analytics_enabled=False) as app:
        gr.Markdown("## Prompt-to-Prompt\nEdit an image by editing its prompt.")
        with gr.Row():
            with gr.Column(scale=3):
                source = gr.Textbox(example_source, label="Source prompt", elem_id="source")
                rows, groups = [], []
                for index in range(1, MAX_EDITS + 1):
                    with gr.Group(visible=index == 1) as group:
                        row = _edit_row(index, example_edit if index == 1 else "", example_source, defaults)
                    row.prompt.change(lambda text: [gr.update(choices=_words(text))] * 3, row.prompt,
                                      [row.weight_words, row.blend_edit, row.exclude_edit], queue=False)
                    rows.append(row)
                    groups.append(group)
                with gr.Row():
                    add = gr.Button("Add edit", size="sm")
                    remove = gr.Button("Remove edit", size="sm")
            with gr.Column(scale=2):
                model = gr.Dropdown(list(models), value=models[0], label="Model", elem_id="model")
                with gr.Row():
                    seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    reuse = gr.Button("Reuse seed", size="sm")
                steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, value=defaults.guidance_scale, step=0.5, label="Guidance",
                                     elem_id="guidance")
                with gr.Accordion("Real image", open=False):
                    # Any file: the app checks it (_check_upload), so that a wrong one gets a clear message.
                    image = gr.File(file_count="single", type="filepath", elem_id="upload",
                                    label=f"Image to edit (PNG, JPEG, WebP, ...; up to {max_upload_mb:g} MB; its "
                                          "caption is the source prompt)")
                    preview = gr.Image(label="Preview", interactive=False, height=160, elem_id="preview")
                    method = gr.Dropdown(list(first.inversion_methods), value=_default_method(first), label="Inversion",
                                         elem_id="method")
                run = gr.Button("Run", variant="primary", elem_id="run")
                # The last run's outcome, or the last error: it stays until the next one replaces it.
                status = gr.Markdown(elem_id="status")
        with gr.Tabs():
            with gr.Tab("Images"):
                # Whole images: one row of MAX_EDITS + 1 square cells whatever the count, as tall as they need.
                gallery = gr.Gallery(label="Source and edits", columns=MAX_EDITS + 1, fit_columns=False, height="auto",
                                     object_fit="contain", elem_id="gallery")
                files = gr.File(label="Download: PNGs carrying their recipe (p2p replay FILE)", file_count="multiple",
                                interactive=False, elem_id="downloads")
            with gr.Tab("Attention"):
                gr.HTML(_heat_scale(), elem_id="heat-scale")
                # One gallery per prompt, shown as a run fills it: the source's words, then each edit's.
                heatmaps = [gr.Gallery(columns=8, fit_columns=False, height="auto", object_fit="contain", visible=False,
                                       elem_id=f"heatmaps-{i}", elem_classes=["heatmaps"]) for i in range(MAX_PROMPTS)]

        # In the page, not in Gradio's session state, which keeps only the last SESSIONS sessions.
        count = gr.Number(1, precision=0, visible="hidden", label="Edit count", elem_id="count")
        last_seed = gr.Number(None, precision=0, visible="hidden", label="Last seed", elem_id="last-seed")
        form = Form(model=model, source=source, seed=seed, steps=steps, guidance=guidance, image=image, method=method,
                    count=count, rows=rows)
        keys = [item.key for item in form.named()]
        source.change(lambda text: [gr.update(choices=_words(text))] * (2 * MAX_EDITS), source,
                      [c for row in rows for c in (row.blend_source, row.exclude_source)], queue=False)

        def resize(n: int):
            return [n] + [gr.update(visible=i < n) for i in range(MAX_EDITS)]

        add.click(lambda n: resize(min(n + 1, MAX_EDITS)), count, [count, *groups], queue=False)
        remove.click(lambda n: resize(max(n - 1, 1)), count, [count, *groups], queue=False)
        reuse.click(lambda s: -1 if s is None else s, last_seed, seed, queue=False)

        def show_upload(path: str | None, said: str | None):
            """The preview of a good upload, which clears a status line that shows an error (`said`), or the status
            line that says what is wrong with it."""
            if path is None:
                return None, gr.skip()
            try:
                return _check_upload(path, max_bytes), "" if (said or "").startswith(_STATUS_ERROR) else gr.skip()
            except Exception as error:
                return None, _status_error(error)

        image.change(show_upload, [image, status], [preview, status], concurrency_limit=None)

        def model_defaults(name: str):
            """The picked model's own defaults (`editor.defaults`: its prompt2prompt.json, else its family's) for
            steps, guidance, every row's windows and blend threshold, and its inversion methods; or, if it fails
            to load, the status line that says why (and the form as it was)."""
            try:
                editor = editors.get(name)[0]
            except Exception as error:
                return *[gr.skip()] * (3 + 3 * MAX_EDITS), _status_error(error)
            picked, family = editor.defaults, editor.family
            per_row = [picked.cross_steps, picked.self_steps, picked.blend_threshold] * MAX_EDITS
            return (picked.num_inference_steps, picked.guidance_scale,
                    gr.update(choices=list(family.inversion_methods), value=_default_method(family)), *per_row,
                    gr.skip())

        row_defaults = [c for row in rows for c in (row.cross, row.self_steps, row.threshold)]
        model.change(model_defaults, model, [steps, guidance, method, *row_defaults, status], concurrency_limit=1,
                     concurrency_id="edit")

        def check_form(*values):
            """Refuse a Run that cannot succeed before it joins the queue (Gradio's validator): the input at fault
            gets the message. A request whose values no form sends is refused before this runs (`_blocks_class`)."""
            try:
                _check_request(max_bytes, Form.of(values))
            except Exception as error:
                shown = _shown(error)
                field = shown.field or "source"
                return [gr.validate(key != field, shown.line if key == field else "") for key in keys]
            return [gr.validate(True, "")] * len(keys)

        def show_check(*values):
            """The status line at once, beside the queued run: what is wrong with the form (which check_form logs),
            or nothing yet."""
            try:
                _check_request(max_bytes, Form.of(values))
            except Exception as error:
                return _status_error(error, quiet=True)
            return ""

        # Gradio streams the pipeline's tqdm steps to the outputs when the function asks for a tracker.
        def run_edit(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            """The run's images, downloads, heatmaps, seed and status line; or, if it fails, the status line that
            says why, and the rest as it was."""
            try:
                upload = Form.of(values).image
                cache.run_started(upload if isinstance(upload, str) else None)
                shown, files, heat, used_seed, said = _run(editors, out_dir, max_bytes, *values)
            except Exception as error:
                return *[gr.skip()] * (3 + MAX_PROMPTS), _status_error(error)
            finally:
                _release_memory()
            classes = _image_classes(shown[0][0])
            heat_galleries = [gr.update(value=maps, label=label, visible=True, elem_classes=["heatmaps", *classes])
                              for label, maps in heat]
            heat_galleries += [gr.update(value=None, visible=False)] * (MAX_PROMPTS - len(heat))
            return (gr.update(value=shown, elem_classes=classes), files, *heat_galleries, used_seed, said)

        run.click(show_check, form.inputs(), status, queue=False)
        run.click(run_edit, form.inputs(), [gallery, files, *heatmaps, last_seed, status], validator=check_form,
                  concurrency_limit=1, concurrency_id="edit")
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    return app


def _edit_row(index: int, text: str, source: str, defaults) -> EditRow[gr.components.Component]:
    """Edit row `index`'s components (1-based), laid out in the current Gradio block: its prompt `text`, its word
    pickers offering the words of `text` and of the source prompt `source`, its sliders at the model's `defaults`."""
    import gradio as gr

    def words(label: str, prompt: str, name: str) -> gr.Dropdown:
        return gr.Dropdown(_words(prompt), multiselect=True, allow_custom_value=True, label=label,
                           elem_id=f"{name}-{index}")

    prompt = gr.Textbox(text, label=f"Edit {index}", elem_id=f"edit-{index}")
    with gr.Row():
        mode = gr.Radio(list(MODES), value="auto", label="Mode", elem_id=f"mode-{index}")
        cross = gr.Slider(0, 1, value=defaults.cross_steps, step=0.05, label="Cross-attention steps",
                          elem_id=f"cross-{index}")
        self_steps = gr.Slider(0, 1, value=defaults.self_steps, step=0.05, label="Self-attention steps",
                               elem_id=f"self-{index}")
    with gr.Row():
        weight_words = words("Reweight words", text, "weight-words")
        weight = gr.Slider(-2, 5, value=1.0, step=0.1, label="Weight", elem_id=f"weight-{index}")
    with gr.Row():
        blend_source = words("Local blend: source words", source, "blend-source")
        blend_edit = words("Local blend: edit words", text, "blend-edit")
        threshold = gr.Slider(0, 1, value=defaults.blend_threshold, step=0.05, label="Blend threshold",
                              elem_id=f"threshold-{index}")
    with gr.Row():
        exclude_source = words("Exclude: source words", source, "exclude-source")
        exclude_edit = words("Exclude: edit words", text, "exclude-edit")
    return EditRow(prompt=prompt, mode=mode, cross=cross, self_steps=self_steps, weight_words=weight_words,
                   weight=weight, blend_source=blend_source, blend_edit=blend_edit, exclude_source=exclude_source,
                   exclude_edit=exclude_edit, threshold=threshold)


@functools.cache
def _blocks_class() -> type[gr.Blocks]:
    """`gradio.Blocks` with the app's own messages for requests that Gradio refuses before any function runs
    (fields missing, or of the wrong type: only a forged request), and at launch the app's CSS and `SESSIONS`."""
    import gradio as gr

    class Blocks(gr.Blocks):
        async def process_api(self, block_fn, inputs, *args, **kwargs):
            try:
                return await super().process_api(block_fn, inputs, *args, **kwargs)
            except gr.Error as error:
                if hasattr(error, "line"):  # the app's own
                    raise
                # Gradio's own (a value not among a dropdown's choices): its text, escaped, logged in one line
                raise _shown(ValueError(_one_line(str(error.message)))) from None
            except Exception as error:  # Gradio's own checks; its messages name its internals and server paths
                fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
                reason = _refusal(fn.inputs, inputs, error)
                if reason is None:  # not the request's fault (the app's functions raise gradio.Error): a bug
                    log.error("failed: %s", _one_line(str(error)), exc_info=error)
                    raise _error(f"the server failed on this request ({type(error).__name__}); its log says "
                                 "why") from None
                raise _shown(ValueError(reason)) from None

        def launch(self, **kwargs):
            return super().launch(**{"css": CSS, "state_session_capacity": SESSIONS, **kwargs})

    return Blocks


def _refusal(components: Sequence[Any], inputs: Any, error: Exception) -> str | None:
    """Why Gradio refused a request before the app's function ran, in the app's words; None if it did not."""
    from gradio.exceptions import ComponentProcessingError, InvalidPathError
    from pydantic import ValidationError

    if isinstance(inputs, list) and len(inputs) < len(components):
        return f"the request holds {len(inputs)} values; the form sends {len(components)}"
    if isinstance(error, ComponentProcessingError):  # its message names the input's index, or it is an output's
        found = re.search(r"preprocess input component at index (\d+)", str(error))
        if found is None:
            return None
        name = getattr(components[int(found[1])], "label", None) or f"field {int(found[1]) + 1}"
        return f"the request's {name!r} is not what the form sends"
    if isinstance(error, (InvalidPathError, ValidationError)):
        return "the request holds a file that was not uploaded to this app, or a value that is not a file"
    return None


def launch(models: Sequence[str], *, host: str = "127.0.0.1", port: int = 7860, out_dir: str | Path = "outputs/web",
           max_upload_mb: float = 10.0, device: str | None = None, dtype: str = "auto",
           prevent_thread_lock: bool = False, cache_mb: float = 2048, allow_pickle: bool = False,
           queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """Serve the web app on `host`:`port` (127.0.0.1 by default: only this machine can reach it), with at most
    `queue_size` requests waiting."""
    app = build_app(models, out_dir=out_dir, device=device, dtype=dtype, max_upload_mb=max_upload_mb,
                    cache_mb=cache_mb, allow_pickle=allow_pickle, queue_size=queue_size)
    app.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20),
               allowed_paths=[str(Path(out_dir).resolve())], prevent_thread_lock=prevent_thread_lock, quiet=True)
    return app
