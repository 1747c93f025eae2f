"""What a web case's snippet can use: `run(...)`, which calls `webapp.run_form` as the Run button does, with a `Form`
built by name; `row` and `rows` to build its edit rows; and `request(values)` for a request's raw values. child.py
runs this file, then the snippet, in one namespace."""

import dataclasses
import os
from pathlib import Path

import prompt2prompt.cli  # noqa: F401 (as `p2p serve` does, before the web app)
from scripts.adversarial.case import EDIT, SRC
from scripts.adversarial.child import case_folders

ROOT, IN, OUT = case_folders()
os.environ["GRADIO_TEMP_DIR"] = os.path.join(OUT, ".gradio")  # as build_app does, before gradio is imported
import gradio  # noqa: E402, F401

from prompt2prompt import webapp  # noqa: E402

NAN, INF = float("nan"), float("inf")
EDITORS = webapp.Editors(["demo"], "cpu", "auto")


def row(prompt=EDIT, mode="auto", cross=0.8, self_steps=0.4, weight_words=None, weight=1.0, blend_source=None,
        blend_edit=None, exclude_source=None, exclude_edit=None, threshold=0.3):
    """One edit row of the form, by name."""
    return webapp.EditRow(prompt=prompt, mode=mode, cross=cross, self_steps=self_steps, weight_words=weight_words or [],
                          weight=weight, blend_source=blend_source or [], blend_edit=blend_edit or [],
                          exclude_source=exclude_source or [], exclude_edit=exclude_edit or [], threshold=threshold)


def rows(*given):
    """The form's edit rows: `given` first, and empty rows (every field None) after."""
    empty = dict.fromkeys(field.name for field in dataclasses.fields(webapp.EditRow))
    return [*given, *(webapp.EditRow(**empty) for _ in range(webapp.MAX_EDITS - len(given)))]


def run(source=SRC, *, model="demo", seed=1, steps=2, guidance=7.5, image=None, method="null-text", count=1,
        edit_rows=None, max_bytes=10 * 2**20):
    """`webapp.run_form` with the demo defaults, one edit row (EDIT) unless `edit_rows` is given."""
    form = webapp.Form(model=model, source=source, seed=seed, steps=steps, guidance=guidance, image=image,
                       method=method, count=count, rows=rows(row()) if edit_rows is None else edit_rows)
    return webapp.run_form(EDITORS, Path(OUT), max_bytes, form)


def request(values, *, max_bytes=10 * 2**20):
    """`webapp.run_form` on a request's raw values, as Gradio hands them (a forged one's): `Form.of` names them first."""
    return webapp.run_form(EDITORS, Path(OUT), max_bytes, webapp.Form.of(values))
