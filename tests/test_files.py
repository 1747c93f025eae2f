"""Atomic writes: the whole new file or the old one, never a temporary file left over, modes by the umask."""

import os
import stat

import pytest

from prompt2prompt import files
from prompt2prompt.files import clear_staging, run_slug, write_atomic, write_folder_atomic, write_text_atomic


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


def test_a_named_folder_is_staged_apart_and_published_once(tmp_path, umask):
    os.umask(0o027)
    (tmp_path / "jobs").mkdir()
    staging = tmp_path / ".staging"
    folder = write_folder_atomic(tmp_path / "jobs", "job-1", _fill("grid.png"), numbered=False, staging=staging)
    assert folder == tmp_path / "jobs" / "job-1" and (folder / "grid.png").read_text() == "grid.png"
    assert mode(folder) == 0o750 and not staging.exists()  # the staging folder goes once empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs"]  # no `latest`: only numbered runs have one
    with pytest.raises(FileExistsError, match="job-1"):
        write_folder_atomic(tmp_path / "jobs", "job-1", _fill("other.png"), numbered=False, staging=staging)
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png"] and not staging.exists()
    (tmp_path / "jobs" / "job-2").mkdir()  # even an empty folder, which a directory rename would replace
    with pytest.raises(FileExistsError):
        write_folder_atomic(tmp_path / "jobs", "job-2", _fill("grid.png"), numbered=False)
    with pytest.raises(ValueError, match="one plain name"):
        write_folder_atomic(tmp_path, "../job-3", _fill("grid.png"), numbered=False)


def test_a_replaced_folder_is_the_new_one_whole_and_a_failed_write_keeps_the_old(tmp_path):
    model = write_folder_atomic(tmp_path, "model", _fill("unet.safetensors", "old.json"), numbered=False, replace=True)
    write_folder_atomic(tmp_path, "model", _fill("unet.safetensors"), numbered=False, replace=True)
    assert sorted(p.name for p in model.iterdir()) == ["unet.safetensors"]  # nothing of the old one mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # neither the old folder nor a staging one left

    def failing(folder):
        (folder / "unet.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path, "model", failing, numbered=False, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (model / "unet.safetensors").read_text() == "unet.safetensors"
    with pytest.raises(ValueError, match="numbered or replace"):
        write_folder_atomic(tmp_path, "model", failing, replace=True)


def test_clearing_a_staging_folder_removes_what_a_stopped_write_left(tmp_path):
    staging = tmp_path / ".staging"
    (staging / ".job-1.abcd1234.tmp").mkdir(parents=True)
    (staging / ".job-1.abcd1234.tmp" / "grid.png").write_text("half")
    (staging / "stray.txt").write_text("")
    (tmp_path / "kept").mkdir()
    (staging / "link").symlink_to(tmp_path / "kept")
    assert [path.name for path in clear_staging(staging)] == [".job-1.abcd1234.tmp", "link", "stray.txt"]
    assert not staging.exists() and (tmp_path / "kept").is_dir()  # a link is removed, never followed
    staging.write_text("a file in its place")
    assert clear_staging(staging) == [staging] and not staging.exists()
    assert clear_staging(staging) == []


@pytest.mark.parametrize("text, slug", [("a big [red->green] circle", "a-big-red-green-circle"),
                                        ("Un café, s'il vous plaît", "un-cafe-s-il-vous-plait"),
                                        ("a " + "verylongword" * 5, "a"), ("!!!", "run")])
def test_run_slugs_are_short_ascii_words(text, slug):
    assert run_slug(text) == slug
