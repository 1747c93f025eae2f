"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The new content goes to a temporary file in the target's folder (so that the rename stays on one file
system) and is renamed over the target with `os.replace`. The temporary file keeps the target's suffix,
for writers that choose a format by it (`PIL.Image.save`, `numpy.savez`), and it gets the mode a plain
`open()` would give (0o666 less the umask), not `mkstemp`'s 0o600.

A run's folder of files is published the same way: `write_folder_atomic` fills a hidden staging folder and
renames it, whole, to the next free numbered name (`0001-a-big-red-circle-seed7`); a run never overwrites or
mixes with an earlier one, and a reader never sees half a run.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path

__all__ = ["LATEST", "run_slug", "temporary_target", "write_atomic", "write_folder_atomic", "write_text_atomic"]

LATEST = "latest"  # the link, beside the numbered run folders, to the newest of them
_NUMBERED = re.compile(r"(\d{4,})-")  # a run folder's number, at the start of its name
_SLUG_CHARS = 32  # a slug's length at most: enough for the prompt's first words, short enough to type
_TRIES = 1000  # names tried before giving up (only a folder filling up concurrently takes more than one)
# write_atomic's temporary files: mkstemp's name for ".<target>.", 8 random characters, ".tmp<target's suffix>"
_TEMPORARY = re.compile(r"[.](.+)[.][a-z0-9_]{8}[.]tmp(.*)")

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        # os.umask can only be read by setting it; 0o022 keeps any file another thread creates meanwhile private
        # to its owner's writes.
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` to fill a temporary file, then rename it over `path` in one step.

    The folder must exist. On any error, the temporary file is removed and `path` is left as it was.

    Example: `write_atomic("model.pt", lambda tmp: torch.save(state, tmp))`.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def temporary_target(name: str) -> str | None:
    """The file that a `write_atomic` temporary file named `name` was to become; None for any other name (a
    cleanup that matches only these names never touches a user's own files).

    >>> temporary_target(".grid.png.k2j4x8f2.tmp.png")
    'grid.png'
    >>> temporary_target(".my.config.tmp") is None
    True
    """
    found = _TEMPORARY.fullmatch(name)
    return found[1] if found and found[2] == Path(found[1]).suffix else None


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `write_atomic`).

    >>> import tempfile; folder = tempfile.mkdtemp()
    >>> write_text_atomic(f"{folder}/notes.txt", "done\\n").read_text()
    'done\\n'
    """
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding=encoding))


def run_slug(text: str, *, max_chars: int = _SLUG_CHARS) -> str:
    """`text` as a short file-name part: lowercase ASCII words joined by "-", cut at a word.

    >>> run_slug("A big [red] circle, in the centre on a white background")
    'a-big-red-circle-in-the-centre'
    >>> run_slug("一只猫")
    'run'
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text.lower()):
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > max_chars:
            break
        slug = longer
    return slug or "run"  # a prompt in another script, or of symbols only


def _next_number(parent: Path) -> int:
    numbers = [int(match.group(1)) for entry in os.listdir(parent) if (match := _NUMBERED.match(entry))]
    return max(numbers, default=0) + 1


def write_folder_atomic(parent: str | os.PathLike, label: str, write: Callable[[Path], object]) -> Path:
    """Call `write(staging)` to fill a new folder, then rename it into `parent`, whole, as `NNNN-label`.

    NNNN is the next number after the highest among `parent`'s numbered entries, so runs sort in their order;
    a name taken meanwhile (by a run in another process) moves on to the next. The folder gets the mode a plain
    `mkdir` gives. `parent` must exist. On any error the staging folder is removed and `parent` is left as it
    was. Returns the published folder; `latest` in `parent` then links to it, where links can be made.
    """
    parent = Path(parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{label}.", suffix=".tmp"))
    try:
        write(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0o700 would keep the run from the user's group
        folder = _rename_numbered(staging, parent, label)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _link_latest(parent, folder)
    return folder


def _rename_numbered(staging: Path, parent: Path, label: str) -> Path:
    number = _next_number(parent)
    for _ in range(_TRIES):
        folder = parent / f"{number:04d}-{label}"
        if not (folder.exists() or folder.is_symlink()):
            try:
                # A directory rename fails on a non-empty folder of that name (made since the check above): the
                # run then takes the next number. It never overwrites a run.
                os.rename(staging, folder)
                return folder
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
        number += 1
    raise FileExistsError(f"no free run folder name in {str(parent)!r} after {_TRIES} tries")


def _link_latest(parent: Path, folder: Path) -> None:
    """Point `parent/latest` at `folder` (relatively, so the tree can move), replacing the old link at once.

    A `latest` that is not a link (the user's own file or folder) is left alone, and where links cannot be made
    (Windows without the privilege, some file systems) there is none: it is a convenience.
    """
    link = parent / LATEST
    if link.exists() and not link.is_symlink():
        return
    temporary = parent / f".{LATEST}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(folder.name, temporary, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
