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

Usage, from the repository root (use the project's virtual environment: the harness needs Pillow and numpy to
build its inputs; `.venv/bin/python scripts/adversarial ...` works too):

    .venv/bin/python -m scripts.adversarial --list                      # the cases, per category
    .venv/bin/python -m scripts.adversarial --limit 2 --report /tmp/adv.json
    .venv/bin/python -m scripts.adversarial --only replay,batch --report adv.json
    .venv/bin/python -m scripts.adversarial --only cli --match steps --keep

Categories: syntax (inline prompt markup), cli (options), image (--image files), replay (crafted recipes in PNGs),
batch (manifests and output folders), api (the Python API, as snippets), web (webapp.run_form).
The folders of cases with a violation are kept (see the report) unless --no-keep; --keep keeps every folder.

Layout: `case.py` (the Case and Context types, the demo prompts), `inputs.py` (the hostile files), one
`cases_<category>.py` per category, `run.py` (one case in a subprocess: setup, run, snapshot, classify),
`classify.py` (what counts as ok, clean-error or violation), `child.py` with `prelude_api.py` and
`prelude_web.py` (the program an API or web case runs), `__main__.py` (the command line and the summary).
`tests/test_adversarial.py` runs a slice of the cases through `run.run_case` in the test suite.
"""
