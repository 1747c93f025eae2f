"""How `p2p` reports: one `error:` line (a syntax error adds its prompt and a caret) and an exit code, never a
traceback; warnings and notes in the same shape.

Exit codes: 0 ok, 2 usage error (bad arguments, prompts or words), 1 runtime error (model, files, device).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.text import Text

from ..syntax import PromptSyntaxError

__all__ = ["Commands", "UsageError", "console", "print_error", "say", "user_errors", "warn"]

console = Console(stderr=True, soft_wrap=True)

# click's exceptions, wherever this typer takes click from (recent typers carry their own copy)
_CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]


class UsageError(ValueError):
    """Bad arguments: exit code 2."""


class Commands(typer.core.TyperGroup):
    """The `p2p` group: click's own usage errors (a bad option value, an unknown option) are one line too."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(_CLICK_ERRORS, "NoArgsIsHelpError", ()) as error:
            error.show()  # the help text, as `p2p` alone asks for
            sys.exit(error.exit_code)
        except _CLICK_ERRORS.ClickException as error:
            context = getattr(error, "ctx", None)
            print_error(error.format_message() + (f" (see '{context.command_path} --help')" if context else ""))
            sys.exit(error.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # an Exit's code; a command that returns gives None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print any error as one message, never a traceback, and exit 2 (bad input) or 1 (runtime).

    Anything else than a ValueError, OSError or RuntimeError (a bug, most likely) is printed as `TypeName: message`.
    """
    try:
        yield
    except (typer.Exit, typer.Abort):  # click's own exits subclass RuntimeError: let them through untouched
        raise
    except ValueError as error:  # includes PromptSyntaxError, RecipeError and the engine's input checks
        print_error(error)
        raise typer.Exit(2) from None
    except (OSError, RuntimeError) as error:  # includes ModelLoadError and NaN results
        print_error(error)
        raise typer.Exit(1) from None
    except Exception as error:
        print_error(f"{type(error).__name__}: {error}")
        raise typer.Exit(1) from None


def say(label: str, style: str, text: str) -> None:
    """`label text` on stderr, the label in `style`, the text exactly as given: never read as rich markup, whose
    escapes would eat a backslash before '[' (prompts and paths hold both) and shift a caret under its column."""
    console.print(Text.assemble((label, style), " ", text), highlight=False)


def warn(note: str | None) -> None:
    """`warning: note` (nothing when `note` is None): the run goes ahead."""
    if note:
        say("warning:", "yellow", note)


def print_error(error: Exception | str) -> None:
    """`error: message` on one line; a prompt syntax error keeps its caret under the column, below."""
    say("error:", "red", str(error) if isinstance(error, PromptSyntaxError) else " ".join(str(error).split()))
