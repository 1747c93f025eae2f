"""The Gradio web app: a source prompt and edit rows in, a gallery, heatmaps and recipe-carrying PNGs out.

It is a thin layer over the Python API and the only package that imports gradio. It binds to 127.0.0.1
unless told otherwise, runs one edit at a time, and writes only under its output folder (Gradio's upload
cache and temporary files included); no input names a path.

Its modules: `errors` (the user's errors, as the status line shows them), `form` (the form by name and the
checks of a request), `runs` (a run: the editors, the run folder published whole, the cleanups) and `app` (the
Blocks, their handlers and `launch`). Gradio is imported only inside functions, after `build_app` has pointed
GRADIO_TEMP_DIR into the output folder.
"""

# Beside the public two, the names that tests and scripts reach as prompt2prompt.webapp.<name>, as before the split.
from .app import QUEUE_SIZE, SESSIONS, heat_scale, build_app, launch  # noqa: F401
from .errors import user_error, shown_error, wrapped  # noqa: F401
from .form import MAX_EDITS, ROW_FIELDS, EditRow, Form  # noqa: F401
from .runs import CACHE_RUNS, STAGING, CacheBound, Editors, is_leftover, malloc_trim, run_form  # noqa: F401

__all__ = ["build_app", "launch"]
