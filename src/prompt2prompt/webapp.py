"""The Gradio web app: a source prompt and edit rows in, a gallery, heatmaps and recipe-carrying PNGs out.

It is a thin layer over the Python API and the only module that imports gradio. It binds to 127.0.0.1
unless told otherwise, runs one edit at a time, and writes only under its output folder (Gradio's upload
cache and temporary files included); no input names a path.

Gradio fixes some of its folders from GRADIO_TEMP_DIR when it is imported, so this module imports it only in
`build_app`, after pointing GRADIO_TEMP_DIR into the output folder. A program that imported gradio before keeps
the uploads under the output folder, but gradio's other temporary folders where its import put them.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .edits import MODES
from .engine import SourceStore, load_editor
from .images import open_image
from .limits import CROSS_STEPS, SELF_STEPS
from .loading import ModelSource, check_device, parse_dtype
from .recipe import (MAX_STEPS, check_guidance, check_int, file_digest, inversion_available, recipe_for, run_recipe,
                     save_result)
from .syntax import PromptSyntaxError, parse_prompt

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch"]

MAX_EDITS = 4
# Per edit row, in this order: prompt, mode, cross, self, weight words, weight, blend source words, blend edit
# words, exclude source words, exclude edit words.
ROW_FIELDS = 10


def _error(message: str) -> Exception:
    """The error a user sees in the app, as a toast: a `gradio.Error`."""
    import gradio as gr  # imported by build_app already, with its folders set

    return gr.Error(message)


def _shown(error: Exception) -> Exception:
    """`error` as a `gradio.Error`, whose message the user sees (Gradio shows others as a bare "Error")."""
    import gradio as gr

    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (ValueError, OSError, RuntimeError)):  # the engine's checks, files, models, NaN results
        return _error(str(error))
    return _error(f"{type(error).__name__}: {error}")


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


def _parse(text: str, what: str):
    try:
        return parse_prompt(text)
    except PromptSyntaxError as error:
        raise _error(f"{what}: {error}") from None


def _edit_spec(index: int, values: Sequence[Any]) -> dict[str, Any] | None:
    """One row's recipe edit spec; None for an empty row. The prompt may weight words inline: "a (fluffy:2) cat"."""
    prompt, mode, cross, self_steps, weight_words, weight, blend_source, blend_edit, excl_source, excl_edit = values
    if not (prompt or "").strip():
        return None
    if cross is None or self_steps is None or (weight_words and weight is None):  # only a forged request
        raise _error(f"edit {index}: the cross and self windows and the weight must be numbers")
    parsed = _parse(prompt, f"edit {index}")
    if parsed.edit is not None and parsed.edit != parsed.source:
        raise _error(f"edit {index} takes an edit prompt, optionally with (word:weight) groups, not [old->new] "
                     "markup; put that in the source prompt")
    blend = None
    if blend_source or blend_edit or excl_source or excl_edit:
        if not blend_source or not blend_edit:
            raise _error(f"edit {index}: local blend needs words on both sides, e.g. source 'cat' and edit 'dog'")
        blend = {"source_words": list(blend_source), "edit_words": list(blend_edit),
                 "exclude_source_words": list(excl_source or []), "exclude_edit_words": list(excl_edit or [])}
    weights = [[position, w] for position, w in parsed.weights.items()]
    weights += [[word, float(weight)] for word in weight_words or []]
    return {"prompt": parsed.source, "mode": mode, "cross_steps": float(cross),
            "self_steps": float(self_steps), "weights": weights or None, "blend": blend}


def _check_upload(path: str, max_bytes: int) -> str:
    """`path` if it holds an image within the limits; the upload component takes any file, so that a wrong one
    gets this message and not Gradio's bare "Error"."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise _error(f"the upload is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB")
    try:
        open_image(path).close()
    except ValueError as error:  # its message starts with the quoted path: name the upload instead
        raise _error(str(error).replace(f"'{path}'", "the upload", 1)) from None
    return path


# Each row field: the types its component sends (None where it may be empty). Only a forged request sends others.
_ROW_TYPES = ((str,), (str,), (int, float), (int, float), (list,), (int, float), (list,), (list,), (list,), (list,))


def _check_form(model, source, image, method, count, rows) -> None:
    """Refuse a forged request whose fields are not what the form's components send, with a message."""
    fields = [("model", model, (str,)), ("source prompt", source, (str,)), ("image", image, (str,)),
              ("inversion method", method, (str,)), ("edit count", count, (int, float))]
    fields += [(f"edit {i // ROW_FIELDS + 1} field {i % ROW_FIELDS + 1}", value, _ROW_TYPES[i % ROW_FIELDS])
               for i, value in enumerate(rows)]
    for name, value, types in fields:
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise _error(f"the {name} must be a {' or '.join(t.__name__ for t in types)}, not {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise _error(f"the {name} must be a list of words")
    if count is None:
        raise _error("the request holds no edit count")
    if isinstance(count, float) and not (math.isfinite(count) and count.is_integer()) or count > MAX_EDITS:
        raise _error(f"the edit count must be a whole number up to {MAX_EDITS}, not {count!r}")
    if len(rows) < ROW_FIELDS * int(count):
        raise _error("the request holds fewer edit rows than its count")


def _run_folder(out_dir: Path, seed: int | None) -> Path:
    """A fresh folder for one run, named by the server only."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out_dir / f"{stamp}-{seed if seed is not None else 'image'}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    return folder


def _run(editors: _Editors, out_dir: Path, max_bytes: int, model: str, source: str, seed: float | None,
         steps: float, guidance: float, image: str | None, method: str, count: int, *rows: Any):
    """The Run button: edit, save the PNGs, and fill the gallery, the heatmaps and the downloads."""
    import prompt2prompt as p2p

    _check_form(model, source, image, method, count, rows)

    if not (source or "").strip():
        raise _error("type a source prompt first")
    parsed = _parse(source, "the source prompt")  # inline markup ("a [cat->dog]") makes the first edit
    specs = []
    if parsed.edit is not None:
        specs.append({"prompt": parsed.edit, "mode": "auto", "cross_steps": CROSS_STEPS, "self_steps": SELF_STEPS,
                      "weights": [[position, w] for position, w in parsed.weights.items()] or None, "blend": None})
    specs += [spec for i in range(int(count))
              if (spec := _edit_spec(i + 1, rows[i * ROW_FIELDS:(i + 1) * ROW_FIELDS])) is not None]
    if not specs:
        raise _error("type at least one edit prompt, or inline markup in the source: 'a [cat->dog]'")
    try:
        steps, guidance = int(steps), float(guidance)
    except (TypeError, ValueError, OverflowError):  # only a forged request sends these: the sliders give numbers
        raise _error(f"steps and guidance must be numbers, not {steps!r} and {guidance!r}") from None
    check_int(steps, "steps", 1, MAX_STEPS)
    check_guidance(guidance)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed)
                             or seed >= 2**63):  # only a forged request: the seed box gives numbers
        raise _error(f"the seed must be a whole number from 0 to 2**63 - 1 (-1: random), not {seed!r}")
    real: dict[str, Any] = {}
    if image:
        if not inversion_available():
            raise _error("real-image editing needs inversion, which this install lacks")
        _check_upload(image, max_bytes)
        seed = None
    elif seed is None or seed < 0:
        seed = secrets.randbelow(2**31)
    editor, model_source = editors.get(model)
    seed = None if seed is None else int(seed)
    folder = _run_folder(out_dir, seed)
    try:
        if image:
            suffix = Path(image).suffix.lower()  # the user's file name: only a plain extension is kept
            copy = folder / f"input{suffix if re.fullmatch(r'[.][a-z0-9]{1,5}', suffix) else '.img'}"
            shutil.copyfile(image, copy)
            real = dict(image={"path": copy.name, "sha256": file_digest(copy)}, inversion={"method": method})
        recipe = recipe_for(
            editor, model_source, source=parsed.source, edits=specs, seed=seed, num_inference_steps=steps,
            guidance_scale=guidance, record_attention=True, cached_source=True, **real,
        )
        hits, started = editors.sources.hits, time.perf_counter()
        result = run_recipe(recipe, editor, base_dir=folder, sources=editors.sources)
        timing = f"{time.perf_counter() - started:.1f} s" + (", source reused" if editors.sources.hits > hits else "")
        paths = save_result(result.images, recipe, folder)
    except BaseException:  # the engine's checks, NaN results, ...: a failed run leaves no folder behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    captions = ["source: " + recipe.source] + [f"edit {i}: {spec['prompt']}" for i, spec in enumerate(specs, 1)]
    gallery = [(str(path), text) for path, text in zip(paths, captions)]  # the grid (last path) is download-only
    heatmaps = [(heat, f"{i}: {text}") for i, text in enumerate(result.prompts)
                for heat in p2p.attention_heatmaps(result, prompt_index=i)]
    status = (f"Seed {recipe.seed}. " if recipe.seed is not None else "") + f"Saved to `{folder.name}`. {timing}."
    return gallery, [str(path) for path in paths], heatmaps, recipe.seed, status


def build_app(models: Sequence[str], *, out_dir: str | Path, device: str | None = None, dtype: str = "auto",
              max_upload_mb: float = 10.0, cache_mb: float = 2048, allow_pickle: bool = False) -> gr.Blocks:
    """The web app's Blocks, offering `models` (the first is the default) and writing under `out_dir`.

    Gradio's own upload cache and temporary files are moved into `out_dir` too (GRADIO_TEMP_DIR, set before
    gradio is first imported; see the module's docstring). Sources and inversions of recent runs are kept within
    `cache_mb` MiB, so that changing only the edits re-runs only the edits. `allow_pickle` is
    `load_pipeline`'s.
    """
    if not models:
        raise ValueError("the web app needs at least one model, e.g. models=['demo']")
    editors = _Editors(models, device, dtype, cache_mb, allow_pickle)  # a bad device fails before any folder
    first = editors.get(models[0])[0].family  # the default model loads now: the form starts at its own settings
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(out_dir / ".gradio")
    import gradio as gr

    max_bytes = int(max_upload_mb * 2**20)
    can_invert = inversion_available()

    with gr.Blocks(title="prompt2prompt", analytics_enabled=False) as app:
        gr.Markdown("## Prompt-to-Prompt\nEdit an image by editing its prompt.")
        with gr.Row():
            with gr.Column(scale=3):
                source = gr.Textbox(label="Source prompt", placeholder="a cat riding a bicycle", elem_id="source")
                rows: list[gr.components.Component] = []
                groups = []
                for i in range(MAX_EDITS):
                    with gr.Group(visible=i == 0) as group:
                        prompt = gr.Textbox(label=f"Edit {i + 1}", placeholder="a dog riding a bicycle",
                                            elem_id=f"edit-{i + 1}")
                        with gr.Row():
                            mode = gr.Radio(list(MODES), value="auto", label="Mode")
                            cross = gr.Slider(0, 1, value=CROSS_STEPS, step=0.05, label="Cross-attention steps")
                            self_steps = gr.Slider(0, 1, value=SELF_STEPS, step=0.05, label="Self-attention steps")
                        with gr.Row():
                            weight_words = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                                       label="Reweight words")
                            weight = gr.Slider(-2, 5, value=1.0, step=0.1, label="Weight")
                        with gr.Row():
                            blend_source = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                                       label="Local blend: source words")
                            blend_edit = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                                     label="Local blend: edit words")
                        with gr.Row():
                            exclude_source = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                                         label="Exclude: source words")
                            exclude_edit = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                                       label="Exclude: edit words")
                    prompt.change(lambda text: [gr.update(choices=_words(text))] * 3, prompt,
                                  [weight_words, blend_edit, exclude_edit], queue=False)
                    groups.append(group)
                    rows += [prompt, mode, cross, self_steps, weight_words, weight, blend_source, blend_edit,
                             exclude_source, exclude_edit]
                with gr.Row():
                    add = gr.Button("Add edit", size="sm")
                    remove = gr.Button("Remove edit", size="sm")
            with gr.Column(scale=2):
                model = gr.Dropdown(list(models), value=models[0], label="Model")
                with gr.Row():
                    seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    reuse = gr.Button("Reuse seed", size="sm")
                steps = gr.Slider(1, 100, value=first.default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, value=first.default_guidance, step=0.5, label="Guidance", elem_id="guidance")
                with gr.Accordion("Real image", open=False):
                    if not can_invert:
                        gr.Markdown("Disabled: real-image editing needs inversion, which this install lacks.")
                    # Any file: the app checks it (_check_upload), so that a wrong one gets a clear message.
                    image = gr.File(file_count="single", type="filepath", interactive=can_invert, elem_id="upload",
                                    label=f"Image to edit (PNG, JPEG, WebP, ...; up to {max_upload_mb:g} MB; its "
                                          "caption is the source prompt)")
                    preview = gr.Image(label="Preview", interactive=False, height=160, elem_id="preview")
                    method = gr.Dropdown(list(first.inversion_methods),
                                         value=first.default_inversion, label="Inversion", interactive=can_invert)
                run = gr.Button("Run", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
        with gr.Tabs():
            with gr.Tab("Images"):
                gallery = gr.Gallery(label="Source and edits", columns=MAX_EDITS + 1, height=360, elem_id="gallery")
                files = gr.File(label="Download: PNGs carrying their recipe (p2p replay FILE)", file_count="multiple",
                                interactive=False, elem_id="downloads")
            with gr.Tab("Attention"):
                heatmaps = gr.Gallery(label="Per-token cross-attention", columns=8, elem_id="heatmaps")

        count = gr.State(1)
        last_seed = gr.State(None)
        source.change(lambda text: [gr.update(choices=_words(text))] * (2 * MAX_EDITS), source,
                      [c for i in range(MAX_EDITS) for c in rows[i * ROW_FIELDS + 6:i * ROW_FIELDS + 10:2]],
                      queue=False)

        def resize(n: int):
            return [n] + [gr.update(visible=i < n) for i in range(MAX_EDITS)]

        add.click(lambda n: resize(min(n + 1, MAX_EDITS)), count, [count, *groups], queue=False)
        remove.click(lambda n: resize(max(n - 1, 1)), count, [count, *groups], queue=False)
        reuse.click(lambda s: -1 if s is None else s, last_seed, seed, queue=False)

        def show_upload(path: str | None):
            try:
                return None if path is None else _check_upload(path, max_bytes)
            except Exception as error:
                raise _shown(error) from None

        image.change(show_upload, image, preview, concurrency_limit=None)  # queued: its errors show as toasts

        def model_defaults(name: str):
            """The picked model's own steps, guidance and inversion methods (SD3 and Flux differ from SD's)."""
            try:
                family = editors.get(name)[0].family
            except Exception as error:
                raise _shown(error) from None
            methods = list(family.inversion_methods)
            return (gr.update(value=family.default_steps), gr.update(value=family.default_guidance),
                    gr.update(choices=methods, value=family.default_inversion))

        model.change(model_defaults, model, [steps, guidance, method], concurrency_limit=1, concurrency_id="edit")

        # Gradio streams the pipeline's tqdm steps to the outputs when the function asks for a tracker.
        def run_edit(*args, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            try:
                return _run(editors, out_dir, max_bytes, *args)
            except Exception as error:
                raise _shown(error) from None

        run.click(run_edit, [model, source, seed, steps, guidance, image, method, count, *rows],
                  [gallery, files, heatmaps, last_seed, status], concurrency_limit=1, concurrency_id="edit")
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def launch(models: Sequence[str], *, host: str = "127.0.0.1", port: int = 7860, out_dir: str | Path = "outputs/web",
           max_upload_mb: float = 10.0, device: str | None = None, dtype: str = "auto",
           prevent_thread_lock: bool = False, cache_mb: float = 2048, allow_pickle: bool = False) -> gr.Blocks:
    """Serve the web app on `host`:`port` (127.0.0.1 by default: only this machine can reach it)."""
    app = build_app(models, out_dir=out_dir, device=device, dtype=dtype, max_upload_mb=max_upload_mb,
                    cache_mb=cache_mb, allow_pickle=allow_pickle)
    app.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20),
               allowed_paths=[str(Path(out_dir).resolve())], prevent_thread_lock=prevent_thread_lock, quiet=True)
    return app
