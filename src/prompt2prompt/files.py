"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The new content goes to a temporary file in the target's folder (so that the rename stays on one file
system) and is renamed over the target with `os.replace`. The temporary file keeps the target's suffix,
for writers that choose a format by it (`PIL.Image.save`, `numpy.savez`), and it gets the mode a plain
`open()` would give (0o666 less the umask), not `mkstemp`'s 0o600.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic", "write_text_atomic"]

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


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `write_atomic`).

    >>> import tempfile; folder = tempfile.mkdtemp()
    >>> write_text_atomic(f"{folder}/notes.txt", "done\\n").read_text()
    'done\\n'
    """
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding=encoding))
