"""Atomic writes: the whole new file or the old one, never a temporary file left over, modes by the umask."""

import os
import stat

import pytest

from prompt2prompt import files
from prompt2prompt.files import run_slug, write_atomic, write_folder_atomic, write_text_atomic


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


def _fill(*names: str):
    """A `write` for write_folder_atomic that puts a file of each name into the staging folder."""
    return lambda staging: [(staging / name).write_text(name) for name in names]


def test_run_folders_are_numbered_and_never_overwrite_one_another(tmp_path, umask):
    os.umask(0o022)
    (tmp_path / "0007-mine").mkdir()  # numbered entries of any label count, whoever made them
    (tmp_path / "notes.txt").write_text("not a run")
    first = write_folder_atomic(tmp_path, "a-cat-seed1", _fill("source.png", "edit-1.png", "edit-2.png"))
    second = write_folder_atomic(tmp_path, "a-cat-seed1", _fill("source.png", "edit-1.png"))
    assert (first.name, second.name) == ("0008-a-cat-seed1", "0009-a-cat-seed1")
    assert sorted(p.name for p in first.iterdir()) == ["edit-1.png", "edit-2.png", "source.png"]
    assert sorted(p.name for p in second.iterdir()) == ["edit-1.png", "source.png"]  # nothing mixed in
    assert mode(second) == 0o755  # a plain mkdir's, not mkdtemp's 0o700
    assert os.readlink(tmp_path / "latest") == "0009-a-cat-seed1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0007-mine", first.name, second.name, "latest", "notes.txt"]


def test_a_name_taken_meanwhile_moves_the_run_to_the_next_number(tmp_path, monkeypatch):
    real_rename = os.rename

    def racing_rename(source, target):
        if os.path.basename(target) == "0001-a-dog":  # another process publishes 0001 after this one counted
            os.mkdir(target)
            with open(os.path.join(target, "source.png"), "w") as file:
                file.write("theirs")
        return real_rename(source, target)

    monkeypatch.setattr(files.os, "rename", racing_rename)
    folder = write_folder_atomic(tmp_path, "a-dog", _fill("source.png"))
    assert folder.name == "0002-a-dog" and (tmp_path / "0001-a-dog" / "source.png").read_text() == "theirs"
    assert (folder / "source.png").read_text() == "source.png"


def test_a_failed_run_leaves_no_folder_and_a_users_latest_is_kept(tmp_path):
    def half_written(staging):
        (staging / "source.png").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path, "a-cat", half_written)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "latest").mkdir()  # the user's own folder of that name: not a link to replace
    folder = write_folder_atomic(tmp_path, "a-cat", _fill("source.png"))
    assert folder.name == "0001-a-cat" and not (tmp_path / "latest").is_symlink()


@pytest.mark.parametrize("text, slug", [("a big [red->green] circle", "a-big-red-green-circle"),
                                        ("Un café, s'il vous plaît", "un-cafe-s-il-vous-plait"),
                                        ("a " + "verylongword" * 5, "a"), ("!!!", "run")])
def test_run_slugs_are_short_ascii_words(text, slug):
    assert run_slug(text) == slug
