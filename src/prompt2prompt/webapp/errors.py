"""The web app's user errors: one line and a detail (a prompt with a caret), shown in the status line or a toast,
and logged in one line (a bug with its traceback)."""

from __future__ import annotations

import functools
import logging
import textwrap

ERROR_COLUMNS = 48  # an error's prompt is cut into lines this long at most: the status column's width, in monospace
STATUS_ERROR = '<div class="error">'  # how the status line starts when it shows an error

log = logging.getLogger("prompt2prompt.webapp")  # one logger for the app's modules


def user_error(message: str, detail: str | None = None, *, field: str | None = None) -> Exception:
    """A user's error: `message` in one line, `detail` (a prompt with a caret under a column) beneath it, and the
    request's `field` at fault (its key in `Form.named`: "source", "edit-1.prompt"), if one is.

    The app shows it in the status line (`status_error`) and leaves the other outputs as they were. Raised to
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


def shown_error(error: Exception, *, quiet: bool = False) -> Exception:
    """`error` as the app's `user_error`, and logged unless `quiet` (where another function logs the same error): a
    user's error in one line, anything else (a bug) with its traceback."""
    if isinstance(error, _error_class()):
        shown = error
    elif isinstance(error, (ValueError, OSError, RuntimeError)):  # the engine's checks, files, models, NaN results
        lines = str(error).splitlines() or [type(error).__name__]
        shown = user_error(lines[0], "\n".join(lines[1:]) or None)
    else:
        shown = user_error(f"{type(error).__name__}: {one_line(str(error))}")
        if not quiet:
            log.error("failed: %s", shown.line, exc_info=error)
        return shown
    if not quiet:
        log.warning("refused: %s", shown.line)
    return shown


def status_error(error: Exception, *, quiet: bool = False) -> str:
    """The status line that shows `error` (`shown_error(error, quiet=quiet)`): its message, and its detail in monospace
    with each prompt cut into lines that fit the status column, the caret kept under its column (`wrapped`)."""
    shown = shown_error(error, quiet=quiet)
    text = f"{STATUS_ERROR}{_html_text(shown.line)}</div>"
    if shown.detail:
        text += f"<pre>{_html_text(wrapped(textwrap.dedent(shown.detail)))}</pre>"
    return text


def wrapped(detail: str, width: int = ERROR_COLUMNS) -> str:
    r"""`detail` with each line longer than `width` cut at spaces, and each caret line ("  ^") beneath the piece of
    the line above it that holds the caret's column.

    >>> print(wrapped("  a big [red circle\n        ^", width=8))
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


def one_line(text: str) -> str:
    return " ".join(text.split())


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")

