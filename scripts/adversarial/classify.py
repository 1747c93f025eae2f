"""What counts as ok, clean-error or violation: the classifiers of a CLI run's output, of a snippet's outcome,
of the PNGs a run wrote, and of the exit code a case expects."""

from __future__ import annotations

import re
from pathlib import Path

from .case import Case, short

# The exit codes each `Case.expect` allows (for snippets: 0 a returned value, 2 an exception).
EXPECT_CODES = {"ok": {0}, "usage": {2}, "runtime": {1}, "error": {1, 2}, "any": {0, 1, 2}}
SNIPPET_EXPECT_CODES = {"ok": {0}, "any": {0, 2}}  # any other expectation: {2}

BENIGN = re.compile(r"^(seed \d+$|saved to |skipped |\d+ done, \d+ failed|some jobs failed|identical to |differs from |"
                    r"p2p batch:|.*\d+%\|.*\||Loading pipeline components|starting the web app)")
SYNTAX_ERROR = re.compile(r"^error: column \d+:")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
LEAKED_TYPES = re.compile(r"^(?:error: )?(AttributeError|KeyError|IndexError|ZeroDivisionError|OverflowError|AssertionError|"
                          r"UnboundLocalError|NameError|RecursionError|MemoryError|NotImplementedError|"
                          r"StopIteration|UnicodeEncodeError|UnicodeDecodeError|TypeError|struct\.error|"
                          r"SafetensorError|HeaderTooLarge|UnpicklingError|JSONDecodeError):")


def check_pngs(root: Path, folders: tuple[str, ...]) -> list[str]:
    """The problems of the PNGs under `folders` of `root`: unreadable, empty, all black, or uniform."""
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
                problems.append(f"unreadable PNG {rel} ({type(error).__name__}: {short(error, 80)})")
                continue
            if array.size == 0:
                problems.append(f"empty PNG {rel}")
            elif array.max() == 0:
                problems.append(f"all-black PNG {rel}")
            elif path.name not in ("grid.png", "attention.png") and array.min() == array.max():
                problems.append(f"uniform PNG {rel} (every pixel {int(array.max())})")
    return problems


def output_lines(text: str) -> list[str]:
    """The non-blank lines of `text`, split at \\r too (progress bars)."""
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def classify_cli(case: Case, rc: int, stdout: str, stderr: str, violations: list[str], notes: list[str]) -> None:
    """Add the violations and notes of a CLI run that exited 0, 1 or 2: one `error:` line, no leaked type."""
    glued = re.search(r"\](error: )", stderr)
    if glued:  # e.g. after a progress bar that ended with \r, not a newline: the user sees them on one line
        around = stderr[max(0, glued.start() - 40):glued.end() + 40]
        notes.append(f"the error message does not start a line: {short(around, 120)}")
        stderr = re.sub(r"(?<=\])(error: )", r"\n\1", stderr)
    lines = output_lines(stderr) + output_lines(stdout)
    if CONTROL.search(stdout + stderr):
        notes.append("raw control characters in the output")
    if rc == 0:
        extra = [line for line in output_lines(stderr) if not BENIGN.match(line)]
        if extra and not case.args[-1:] == ["--help"]:
            notes.append(f"exit 0 with other output: {short(extra[0], 120)}")
        return
    if rc not in (1, 2):
        return
    help_box = any("Usage:" in line or "\u256d" in line or "Try '" in line for line in lines)
    if help_box:
        notes.append("help/usage text printed for an error")
        return
    rest = [line for line in lines if not BENIGN.match(line)]
    stdout_paths = [line for line in output_lines(stdout) if line.endswith((".png", ".jsonl"))]
    rest = [line for line in rest if line not in stdout_paths]
    errors = [i for i, line in enumerate(rest) if line.startswith("error:")]
    if not errors:
        if rc == 1 and any(line.startswith(("some jobs failed", "differs from")) for line in lines):
            return
        output = f" (output: {short(rest[0], 120)})" if rest else ""
        violations.append(f"exit {rc} with no 'error:' line{output}")
        return
    first = errors[0]
    allowed = {first}
    if SYNTAX_ERROR.match(rest[first]):
        allowed |= {first + 1, first + 2}
        if len(rest) > first + 2 and not rest[first + 2].strip() == "^":
            violations.append("syntax error's caret block is not two lines (prompt, caret)")
    extra = [line for i, line in enumerate(rest) if i not in allowed]
    if len(errors) > 1 or extra:
        violations.append(f"multi-line error ({len(rest)} lines; extra: {short(' | '.join(extra[:3]), 200)})")
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
    described = f"{kind}: {short(message, 160)} [raised at {where}]"
    if origin == "snippet":
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
            notes.append(f"RuntimeError from prompt2prompt: {short(message, 100)}")
        else:
            violations.append(f"unexpected exception type: {described}")
    if multi_line:
        violations.append(f"multi-line error message: {short(message, 200)}")
    if not message.strip():
        notes.append(f"{kind} with an empty message")
    return "error"


def unexpected(case: Case, code_seen: int) -> str | None:
    """'expected X, got Y' when the exit code (for a snippet, 0 for a returned value, 2 for an exception) is not
    one `case.expect` allows; None when it is. A note in the report, not a violation."""
    expected = EXPECT_CODES[case.expect] if case.args is not None else SNIPPET_EXPECT_CODES.get(case.expect, {2})
    if code_seen in expected:
        return None
    what = {0: "success", 1: "exit 1 (runtime)", 2: "exit 2 (usage)"}.get(code_seen, str(code_seen))
    if case.args is None:
        what = "a returned value" if code_seen == 0 else "an exception"
    return f"expected {case.expect}, got {what}"
