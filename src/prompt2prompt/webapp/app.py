"""The web app's Blocks: the form, the gallery and heatmaps, the handlers of its buttons, and `launch`.

Gradio fixes some of its folders from GRADIO_TEMP_DIR when it is imported, so this module imports it only in
`build_app`, after pointing GRADIO_TEMP_DIR into the output folder. A program that imported gradio before keeps
the uploads under the output folder, but gradio's other temporary folders where its import put them.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..edits import MODES
from ..visualize import heatmap
from .errors import STATUS_ERROR, user_error, one_line, shown_error, status_error, log
from .form import MAX_EDITS, EditRow, Form, check_request, check_upload, prompt_words
from .runs import CACHE_RUNS, CacheBound, clean_leftovers, Editors, release_memory, run_form

if TYPE_CHECKING:
    import gradio as gr

MAX_PROMPTS = MAX_EDITS + 2  # the source, an edit from its inline markup and the rows': a heatmap gallery each
QUEUE_SIZE = 64  # requests waiting at most (Gradio's queue max_size); one more is told the queue is full
# Gradio keeps a copy of the form's config for each session (a page load, an API client), about 0.4 MiB here, for
# 10000 sessions by default: gigabytes. The form's state lives in the page (hidden fields), so a session forgotten
# loses nothing the app needs; only the last SESSIONS are kept.
SESSIONS = 64
# Small images (the demo model's 64 px) are drawn larger than they are: pixelated, so their pixels stay sharp.
SMALL_IMAGE = 256
# Gradio lays a thumbnail's caption over the bottom of its image, and the gallery's label over the first one's
# top: here the caption sits beneath the image, which takes the rest of the square cell, whole, and the cells
# start below the label. The gallery is as tall as its one row (Gradio's "auto" height is 450 to 550 px).
# The status line shows an error in the error colour, its prompt and caret in monospace (cut to fit, `wrapped`).
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


def _default_method(family) -> str | None:
    """The inversion the form offers first: the family's default, or none for a family without inversion."""
    return family.default_inversion if family.inversion_methods else None



def heat_scale() -> str:
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



def build_app(models: Sequence[str], *, out_dir: str | Path, device: str | None = None, dtype: str = "auto",
              max_upload_mb: float = 10.0, cache_mb: float = 2048, allow_pickle: bool = False,
              queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The web app's Blocks, offering `models` (the first is the default) and writing under `out_dir`.

    Gradio's own upload cache and temporary files are moved into `out_dir` too (GRADIO_TEMP_DIR, set before
    gradio is first imported; see the module's docstring), and kept to the files of the last `CACHE_RUNS` runs.
    Each run is written into `out_dir/.staging` and moved into `out_dir` whole; what a crash left there is removed
    first (`clean_leftovers`). Sources and inversions of recent runs are kept within `cache_mb` MiB, so that
    changing only the edits re-runs only the edits. At most `queue_size` requests wait in the queue.
    `allow_pickle` is `load_pipeline`'s.
    """
    if not models:
        raise ValueError("the web app needs at least one model, e.g. models=['demo']")
    editors = Editors(models, device, dtype, cache_mb, allow_pickle)  # a bad device fails before any folder
    first_editor = editors.get(models[0])[0]  # the default model loads now: the form starts at its own settings
    first, defaults = first_editor.family, first_editor.defaults
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    os.environ["GRADIO_TEMP_DIR"] = str(out_dir / ".gradio")
    import gradio as gr

    max_bytes = int(max_upload_mb * 2**20)
    cache = CacheBound(out_dir / ".gradio", CACHE_RUNS)

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
                    row.prompt.change(lambda text: [gr.update(choices=prompt_words(text))] * 3, row.prompt,
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
                    # Any file: the app checks it (check_upload), so that a wrong one gets a clear message.
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
                gr.HTML(heat_scale(), elem_id="heat-scale")
                # One gallery per prompt, shown as a run fills it: the source's words, then each edit's.
                heatmaps = [gr.Gallery(columns=8, fit_columns=False, height="auto", object_fit="contain", visible=False,
                                       elem_id=f"heatmaps-{i}", elem_classes=["heatmaps"]) for i in range(MAX_PROMPTS)]

        # In the page, not in Gradio's session state, which keeps only the last SESSIONS sessions.
        count = gr.Number(1, precision=0, visible="hidden", label="Edit count", elem_id="count")
        last_seed = gr.Number(None, precision=0, visible="hidden", label="Last seed", elem_id="last-seed")
        form = Form(model=model, source=source, seed=seed, steps=steps, guidance=guidance, image=image, method=method,
                    count=count, rows=rows)
        keys = [item.key for item in form.named()]
        source.change(lambda text: [gr.update(choices=prompt_words(text))] * (2 * MAX_EDITS), source,
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
                return check_upload(path, max_bytes), "" if (said or "").startswith(STATUS_ERROR) else gr.skip()
            except Exception as error:
                return None, status_error(error)

        image.change(show_upload, [image, status], [preview, status], concurrency_limit=None)

        def model_defaults(name: str):
            """The picked model's own defaults (`editor.defaults`: its prompt2prompt.json, else its family's) for
            steps, guidance, every row's windows and blend threshold, and its inversion methods; or, if it fails
            to load, the status line that says why (and the form as it was)."""
            try:
                editor = editors.get(name)[0]
            except Exception as error:
                return *[gr.skip()] * (3 + 3 * MAX_EDITS), status_error(error)
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
                check_request(max_bytes, Form.of(values))
            except Exception as error:
                shown = shown_error(error)
                field = shown.field or "source"
                return [gr.validate(key != field, shown.line if key == field else "") for key in keys]
            return [gr.validate(True, "")] * len(keys)

        def show_check(*values):
            """The status line at once, beside the queued run: what is wrong with the form (which check_form logs),
            or nothing yet."""
            try:
                check_request(max_bytes, Form.of(values))
            except Exception as error:
                return status_error(error, quiet=True)
            return ""

        # Gradio streams the pipeline's tqdm steps to the outputs when the function asks for a tracker.
        def run_edit(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            """The run's images, downloads, heatmaps, seed and status line; or, if it fails, the status line that
            says why, and the rest as it was."""
            try:
                form = Form.of(values)
                cache.run_started(form.image if isinstance(form.image, str) else None)
                shown, files, heat, used_seed, said = run_form(editors, out_dir, max_bytes, form)
            except Exception as error:
                return *[gr.skip()] * (3 + MAX_PROMPTS), status_error(error)
            finally:
                release_memory()
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
        return gr.Dropdown(prompt_words(prompt), multiselect=True, allow_custom_value=True, label=label,
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
                raise shown_error(ValueError(one_line(str(error.message)))) from None
            except Exception as error:  # Gradio's own checks; its messages name its internals and server paths
                fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
                reason = _refusal(fn.inputs, inputs, error)
                if reason is None:  # not the request's fault (the app's functions raise gradio.Error): a bug
                    log.error("failed: %s", one_line(str(error)), exc_info=error)
                    raise user_error(f"the server failed on this request ({type(error).__name__}); its log says "
                                 "why") from None
                raise shown_error(ValueError(reason)) from None

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
