"""Atomic writes: the whole new file or the old one, never a temporary file left over, modes by the umask."""

import os
import stat

import pytest

from prompt2prompt import files
from prompt2prompt.files import write_atomic, write_text_atomic


@pytest.fixture
def umask():
    """The process's umask, restored after the test."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield previous
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_the_file_through_a_temporary_one_in_its_folder(tmp_path):
    seen = []

    def write(temporary: str) -> None:
        seen.append(temporary)
        with open(temporary, "w") as file:
            file.write("new")

    (tmp_path / "notes.txt").write_text("old")
    assert write_atomic(tmp_path / "notes.txt", write) == tmp_path / "notes.txt"
    assert (tmp_path / "notes.txt").read_text() == "new"
    # Beside the target (one file system, so the rename is atomic), keeping its suffix for format-sniffing writers.
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0].endswith(".txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "notes.txt").write_text("old")

    def half_written(temporary: str) -> None:
        with open(temporary, "w") as file:
            file.write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "notes.txt", half_written)
    assert (tmp_path / "notes.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_files_honour_the_umask(tmp_path, umask, mask, expected):
    os.umask(mask)
    write_text_atomic(tmp_path / "results.jsonl", "{}\n")
    assert mode(tmp_path / "results.jsonl") == expected
    write_atomic(tmp_path / "image.png", lambda temporary: open(temporary, "wb").close())
    assert mode(tmp_path / "image.png") == expected
    assert os.umask(mask) == mask  # reading the umask did not change it


def test_the_umask_is_read_without_proc_too(tmp_path, umask, monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)  # macOS, or Linux without /proc

    monkeypatch.setattr(files, "open", no_proc, raising=False)
    os.umask(0o027)
    write_text_atomic(tmp_path / "notes.txt", "text")
    assert mode(tmp_path / "notes.txt") == 0o640 and os.umask(0o027) == 0o027


def test_write_text_atomic_writes_utf8(tmp_path):
    write_text_atomic(tmp_path / "row.json", '{"prompt": "un café"}')
    assert (tmp_path / "row.json").read_bytes() == '{"prompt": "un café"}'.encode()
