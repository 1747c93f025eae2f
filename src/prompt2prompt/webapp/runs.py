"""A run of the web app: the editors and source cache it runs on, the run folder it publishes whole, and the
cleanup of what a crash left in the output folder or Gradio's cache."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine import SourceStore, load_editor
from ..families.defaults import vocabulary_notice
from ..files import clear_staging, temporary_target, write_folder_atomic
from ..images import fit_note, image_size, load_image
from ..loading import Checkpoint, check_device, parse_dtype
from ..recipe import edit_label, file_digest, recipe_for, run_recipe, save_result
from ..visualize import CAPTION_HEIGHT
from .errors import user_error, log
from .form import Form, check_request

CACHE_RUNS = 32  # Gradio's cache keeps the files of this many recent runs (see CacheBound)
STAGING = ".staging"  # under the output folder: runs being written, renamed into place when whole
# A run folder's name, as _run_name makes it: only such folders are ever cleaned up (never the user's own).
_RUN_NAME = re.compile(r"\d{8}-\d{6}-(\d+|image)-[0-9a-f]{6}")
_RESULT_PNG = re.compile(r"(source|grid|edit-[1-9][0-9]*)[.]png")  # the PNGs save_result writes


class Editors:
    """Editors for the offered models, loaded on first use, and the sources and inversions of recent runs."""

    def __init__(self, models: Sequence[str], device: str | None, dtype: str, cache_mb: float = 2048,
                 allow_pickle: bool = False):
        self.models = list(models)
        self.device = check_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.allow_pickle = allow_pickle
        self.loaded: dict[str, tuple[Any, Checkpoint]] = {}
        self.lock = threading.Lock()
        # Changing only the edit rows re-runs only the edits: the source and its inversion are kept here.
        self.sources = SourceStore(int(cache_mb * 2**20))

    def get(self, model: str):
        if model not in self.models:  # the picker offers only these; a forged request gets no other path
            raise user_error(f"unknown model {model!r}; this server offers {', '.join(self.models)}")
        with self.lock:
            if model not in self.loaded:
                # With progress bars: Gradio's track_tqdm follows the pipeline's denoising bar.
                self.loaded[model] = load_editor(model, device=self.device, dtype=self.dtype, progress=True,
                                                 allow_pickle=self.allow_pickle)
        return self.loaded[model]



def _heatmap_labels(result, prompt_index: int) -> list[str]:
    """The caption of each of `attention_heatmaps(result, prompt_index)`: its token (its word on SD3 and Flux)."""
    if getattr(result, "map_unit", "token") == "word":
        return [word for word, positions in result.words[prompt_index] if positions]
    return list(result.tokens[prompt_index][1:-1])  # without the start and end tokens, as the heatmaps



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



def _run_name(seed: int | None) -> str:
    """A fresh name for one run's folder, made by the server only (no input names a path): its time, its seed (or
    "image" for an upload) and a random part, so that nothing is ever overwritten."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{seed if seed is not None else 'image'}-{secrets.token_hex(3)}"


def is_leftover(name: str) -> bool:
    """Whether `name` is the temporary file of one of save_result's PNGs (".edit-1.png.k2j4x8f2.tmp.png"), left by
    a write that never finished."""
    return bool(_RESULT_PNG.fullmatch(temporary_target(name) or ""))


def clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove what a crash left in `out_dir`: the staging folder, run folders that are empty or lack their grid.png
    (save_result writes it last; runs made before staging existed were written in place), and the temporary files
    of save_result's PNGs in the others.

    Only the names the app makes are touched, never the user's other files. Returns what was removed.
    """
    found = []
    for entry in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if _RUN_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            if not (entry / "grid.png").is_file():
                found.append(entry)
            else:
                found += [file for file in entry.iterdir() if is_leftover(file.name)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    removed = clear_staging(out_dir / STAGING) + found
    if removed:
        log.warning("removed %d leftovers of unfinished runs from %s", len(removed), out_dir)
    return removed


class CacheBound:
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
def malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_memory() -> None:
    """Give the C heap's free pages back to the system, where the C library can (glibc).

    Gradio runs each request on one of its worker threads, and glibc gives threads heaps of their own (arenas): what
    a run frees in one arena stays there, free but resident, while the next run fills another. Under concurrent load
    every arena keeps a run's worth of free pages, some hundreds of MiB in all; trimming after each run returns them.
    """
    trim = malloc_trim()
    if trim is not None:
        trim(0)


def _newest(folder: Path) -> float:
    """The latest modification time of `folder` and the files in it."""
    times = [folder.stat().st_mtime]
    times += [path.stat().st_mtime for path in folder.rglob("*") if path.is_file()]
    return max(times)


def run_form(editors: Editors, out_dir: Path, max_bytes: int, form: Form[Any]):
    """The Run button, given its inputs' values by name (`form`, checked by `check_request`): edit, save the PNGs
    in a run folder published whole into `out_dir`, and fill the gallery, the downloads, the heatmaps (per prompt:
    its caption and its words' maps) and the status line."""
    import prompt2prompt as p2p

    request = check_request(max_bytes, form)
    image, specs, steps, guidance = request.image, request.specs, request.steps, request.guidance
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
    done: dict[str, Any] = {}

    def write(folder: Path) -> None:
        real: dict[str, Any] = {}
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
        paths = [path.relative_to(folder) for path in save_result(result.images, recipe, folder)]
        done.update(recipe=recipe, result=result, timing=timing, paths=paths)

    # Written in the staging folder and moved into out_dir whole: a failed run (the engine's checks, NaN results)
    # leaves no folder behind, and a crash leaves half a run only in the staging folder (clean_leftovers).
    folder = write_folder_atomic(out_dir, _run_name(seed), write, numbered=False, staging=out_dir / STAGING)
    recipe, result, timing = done["recipe"], done["result"], done["timing"]
    paths = [folder / path for path in done["paths"]]
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


