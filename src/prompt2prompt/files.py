"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The new content goes to a temporary file in the target's folder (so that the rename stays on one file
system) and is renamed over the target with `os.replace`. The temporary file keeps the target's suffix,
for writers that choose a format by it (`PIL.Image.save`, `numpy.savez`), and it gets the mode a plain
`open()` would give (0o666 less the umask), not `mkstemp`'s 0o600.

A folder of files is published the same way, by `write_folder_atomic`, the one place that does it: it fills a
hidden staging folder and renames it, whole, into place. A run of `p2p edit` takes the next free numbered name
(`0001-a-big-red-circle-seed7`) and `latest` links to it; a batch job takes a name of its own; an exported
model replaces its folder. Nothing is overwritten by accident, nothing is mixed with an earlier folder,
and a reader never sees half of one. `clear_staging` removes what a stopped write left in a staging folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path

__all__ = ["LATEST", "clear_staging", "run_slug", "temporary_target", "write_atomic", "write_folder_atomic",
           "write_text_atomic"]

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


def write_folder_atomic(parent: str | os.PathLike, name: str, write: Callable[[Path], object], *,
                        numbered: bool = True, replace: bool = False,
                        staging: str | os.PathLike | None = None) -> Path:
    """Call `write(folder)` to fill a new hidden folder, then rename it, whole, into `parent` as `name`.

    `parent` must exist. The folder gets the mode a plain `mkdir` gives. On any error the staging folder is removed
    and `parent` is left as it was. Returns the published folder.

    Args:
        numbered: publish as `NNNN-name`, NNNN the next number after the highest among `parent`'s numbered
            entries, so that runs sort in their order (a name taken meanwhile, by a run in another process, moves on
            to the next), and point `parent/latest` at it where links can be made. Otherwise publish as `name`,
            which must not exist yet, unless `replace`.
        replace: an existing `parent/name` is replaced (for a folder with a fixed name, such as an exported
            model). The old folder is moved aside, the new one renamed in, then the old one removed: a reader sees
            the old folder or the new one, each whole, but for the instant between the two renames none.
        staging: the folder to fill the new one in (made if missing, and removed again once empty); on the same file
            system as `parent`. Default: `parent` itself, where the new folder is hidden as `.name.XXXXXXXX.tmp`.

    Example: `write_folder_atomic("outputs", "a-cat-seed7", lambda folder: image.save(folder / "source.png"))`.
    """
    parent = Path(parent)
    if numbered and replace:
        raise ValueError("a numbered folder takes a new number, so it replaces nothing: pass numbered or replace")
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"a folder name must be one plain name, not {name!r}")
    folder = _staging_folder(parent if staging is None else Path(staging), name)
    try:
        write(folder)
        os.chmod(folder, 0o777 & ~_umask())  # mkdtemp's 0o700 would keep the folder from the user's group
        if numbered:
            published = _rename_numbered(folder, parent, name)
        elif replace:
            published = _rename_replacing(folder, parent / name)
        else:
            published = _rename_new(folder, parent / name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):  # not empty: another write is being staged there
                Path(staging).rmdir()
    if numbered:
        _link_latest(parent, published)
    return published


def clear_staging(staging: str | os.PathLike) -> list[Path]:
    """Remove a staging folder of `write_folder_atomic` and whatever a stopped write left there: half-filled
    folders, or a file in its place (a link in its place is removed, never followed). Returns what was removed.

    >>> import tempfile; parent = Path(tempfile.mkdtemp())
    >>> (parent / ".staging" / "half").mkdir(parents=True)
    >>> [path.name for path in clear_staging(parent / ".staging")], (parent / ".staging").exists()
    (['half'], False)
    """
    staging = Path(staging)
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
        return [staging]
    removed = sorted(staging.iterdir()) if staging.is_dir() else []
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # missing, or filled meanwhile by a write being staged
        staging.rmdir()
    return removed


def _staging_folder(staging: Path, name: str) -> Path:
    """A new hidden folder in `staging` (made if missing) to fill before its rename."""
    for _ in range(_TRIES):
        staging.mkdir(parents=True, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(dir=staging, prefix=f".{name}.", suffix=".tmp"))
        except FileNotFoundError:  # another write removed `staging`, empty, after its own rename: make it again
            continue
    raise FileNotFoundError(f"cannot make a staging folder in {str(staging)!r}")


def _rename_new(folder: Path, target: Path) -> Path:
    # A directory rename would replace an empty folder of that name: one that exists is refused first.
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{str(target)!r} exists already; a folder is published once")
    os.rename(folder, target)  # fails on a non-empty folder of that name made since the check
    return target


def _rename_replacing(folder: Path, target: Path) -> Path:
    if not (target.exists() or target.is_symlink()):
        os.rename(folder, target)
        return target
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    try:
        os.rename(target, aside / target.name)
        try:
            os.rename(folder, target)
        except BaseException:
            os.rename(aside / target.name, target)  # the old folder back in its place
            raise
    except BaseException:
        with contextlib.suppress(OSError):  # empty unless the old folder could not go back: then it is kept there
            aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


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
