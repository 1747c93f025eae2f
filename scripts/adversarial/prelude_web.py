"""What a web case's snippet can use: `run(...)`, which calls `webapp._run` as the Run button does, and `row`,
`rows` to build its edit rows. child.py runs this file, then the snippet, in one namespace."""

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
EDITORS = webapp._Editors(["demo"], "cpu", "auto")


def row(prompt=EDIT, mode="auto", cross=0.8, self_steps=0.4, weight_words=None, weight=1.0, blend_source=None,
        blend_edit=None, exclude_source=None, exclude_edit=None, threshold=0.3):
    """One edit row of the form, in the order of its fields."""
    return [prompt, mode, cross, self_steps, weight_words or [], weight, blend_source or [], blend_edit or [],
            exclude_source or [], exclude_edit or [], threshold]


def rows(*given):
    """The form's flat list of every row's fields, `given` first and empty rows after."""
    values = [None] * (webapp.ROW_FIELDS * webapp.MAX_EDITS)
    for i, r in enumerate(given):
        values[i * webapp.ROW_FIELDS:(i + 1) * webapp.ROW_FIELDS] = r
    return values


def run(source=SRC, *, model="demo", seed=1, steps=2, guidance=7.5, image=None, method="null-text", count=1,
        edit_rows=None, max_bytes=10 * 2**20):
    """`webapp._run` with the demo defaults, one edit row (EDIT) unless `edit_rows` is given."""
    values = rows(row()) if edit_rows is None else edit_rows
    return webapp._run(EDITORS, Path(OUT), max_bytes, model, source, seed, steps, guidance, image, method, count,
                       *values)
