"""What an API case's snippet can use: the demo prompts, numpy, torch, prompt2prompt and `editor()`, one demo
editor shared by the snippet's calls. child.py runs this file, then the snippet, in one namespace."""

import numpy as np  # noqa: F401 (for the snippets)
import torch  # noqa: F401 (for the snippets)

import prompt2prompt as p2p
from scripts.adversarial.case import EDIT, SRC  # noqa: F401 (for the snippets)
from scripts.adversarial.child import case_folders

ROOT, IN, OUT = case_folders()

_EDITOR = []


def editor():
    """The demo editor, loaded on the first call."""
    if not _EDITOR:
        _EDITOR.append(p2p.Editor.from_pretrained("demo"))
    return _EDITOR[0]
