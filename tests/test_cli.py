import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import prompt2prompt as p2p
from prompt2prompt import engine, loading
from prompt2prompt.cli import app
from prompt2prompt.loading import load_pipeline
from prompt2prompt.recipe import RECIPE_KEY, read_recipe, save_png

# 32 px images on the tiny model (16x16 latents); 2 steps keep every run well under a second.
FAST = ["--steps", "2", "--seed", "7"]


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_folders(output: str) -> list[Path]:
    """The run folders a command wrote into, in order, from the files it printed (one a line)."""
    return list(dict.fromkeys(Path(line).parent for line in output.splitlines() if line.strip()))


def run_folder(output: str) -> Path:
    (folder,) = run_folders(output)
    return folder


@pytest.fixture(scope="module")
def inline_edit(tiny_sd_dir, tmp_path_factory):
    """`p2p edit` with inline replace markup, a weight, a blend and a per-word window; its output folder."""
    out = tmp_path_factory.mktemp("edit")
    result = run("edit", "a [cat->dog] riding a (red:1.5) bicycle", "--model", tiny_sd_dir, *FAST,
                 "--blend", "cat:dog", "--cross-word", "dog=0.5", "--out", out)
    assert result.exit_code == 0, result.output
    return run_folder(result.stdout), result


def test_edit_writes_source_edits_and_grid_with_recipes(inline_edit, tiny_sd_dir):
    out, result = inline_edit
    assert out.name == "0001-a-cat-riding-a-red-bicycle-seed7"  # a new folder under --out, named by the run
    names = ["source.png", "edit-1.png", "grid.png"]
    assert result.stdout.split() == [str(out / name) for name in names]
    for index, name in zip([0, 1, None], names):
        with Image.open(out / name) as image:
            recipe = json.loads(image.text[RECIPE_KEY])
        assert recipe["image_index"] == index
    assert Image.open(out / "source.png").size == (32, 32)
    recipe = read_recipe(out / "edit-1.png")
    assert recipe.source == "a cat riding a red bicycle"
    assert recipe.edits == [{
        "prompt": "a dog riding a red bicycle", "mode": "auto", "cross_steps": {"default": 0.8, "dog": 0.5},
        "self_steps": 0.4, "weights": [[4, 1.5]], "blend": {"source_words": ["cat"], "edit_words": ["dog"], "threshold": 0.3},
    }]  # the tiny model has no defaults of its own: the paper's windows and threshold, written into the recipe
    assert (recipe.seed, recipe.num_inference_steps, recipe.guidance_scale) == (7, 2, 7.5)
    assert (recipe.model, recipe.revision, recipe.dtype) == (str(tiny_sd_dir), None, "float32")
    assert recipe.scheduler["_class_name"] == "DDIMScheduler"


def test_edit_images_are_the_apis(inline_edit, tiny_sd_dir):
    """The CLI adds no logic: its images are those of Editor.edit with the same arguments."""
    out, _ = inline_edit
    editor = p2p.Editor(load_pipeline(str(tiny_sd_dir)))
    edit = p2p.Edit("a dog riding a red bicycle", cross_steps={"default": 0.8, "dog": 0.5}, weights={4: 1.5},
                    blend=p2p.LocalBlend(["cat"], ["dog"]))
    result = editor.edit("a cat riding a red bicycle", [edit], num_inference_steps=2, seed=7)
    assert np.array_equal(pixels(out / "source.png"), np.asarray(result.images[0]))
    assert np.array_equal(pixels(out / "edit-1.png"), np.asarray(result.images[1]))


@pytest.mark.parametrize("name", ["edit-1.png", "grid.png"])
def test_replay_is_bit_for_bit(inline_edit, tmp_path, name):
    out, _ = inline_edit
    result = run("replay", out / name, "--out", tmp_path, "--check")
    assert result.exit_code == 0, result.output
    assert "identical" in result.stderr
    replayed = run_folder(result.stdout)
    assert replayed.parent == tmp_path
    assert np.array_equal(pixels(replayed / name), pixels(out / name))
    assert read_recipe(replayed / name) == read_recipe(out / name)


def test_replay_reports_a_difference(inline_edit, tmp_path):
    out, _ = inline_edit
    changed = pixels(out / "edit-1.png").copy()
    changed[0, 0] ^= 1
    save_png(Image.fromarray(changed), tmp_path / "changed.png", read_recipe(out / "edit-1.png"))
    result = run("replay", tmp_path / "changed.png", "--out", tmp_path / "replay")
    assert result.exit_code == 0 and "1 of 1024 pixels differ, by at most 1/255" in result.stderr
    assert run("replay", tmp_path / "changed.png", "--out", tmp_path / "replay", "--check").exit_code == 1


def test_replay_runs_on_the_recorded_number_of_cpu_threads(tiny_sd_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run("edit", "a [cat->dog]", "--model", tiny_sd_dir, *FAST, "--out", tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    assert read_recipe(folder / "edit-1.png").threads == 1
    assert run("replay", folder / "edit-1.png", "--check").exit_code == 0
    assert torch.get_num_threads() == threads


def test_several_edits_share_the_options(tiny_sd_dir, tmp_path):
    result = run("edit", "a cat on a mat", "--to", "a dog on a mat", "--to", "a (fluffy:2) cat on a mat",
                 "--weight", "mat=0.5", "--cross", "0.1:0.9", "--self", "0.2", "--mode", "auto", "--model", tiny_sd_dir,
                 *FAST, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    assert sorted(p.name for p in folder.glob("*.png")) == ["edit-1.png", "edit-2.png", "grid.png", "source.png"]
    edits = read_recipe(folder / "grid.png").edits
    assert [e["prompt"] for e in edits] == ["a dog on a mat", "a fluffy cat on a mat"]
    assert [e["weights"] for e in edits] == [[["mat", 0.5]], [[1, 2.0], ["mat", 0.5]]]
    assert all(e["cross_steps"] == [0.1, 0.9] and e["self_steps"] == 0.2 for e in edits)
    replay = run("replay", folder / "edit-2.png", "--out", tmp_path / "replay", "--check")
    assert replay.exit_code == 0, replay.output


def test_the_model_can_come_from_the_environment(tiny_sd_dir, tmp_path):
    result = run("edit", "a [cat->dog]", *FAST, "--out", tmp_path, env={"P2P_MODEL": str(tiny_sd_dir)})
    assert result.exit_code == 0, result.output
    assert read_recipe(run_folder(result.stdout) / "source.png").model == str(tiny_sd_dir)


def test_a_random_seed_is_recorded_and_replays(tiny_sd_dir, tmp_path):
    result = run("edit", "a [cat->dog]", "--model", tiny_sd_dir, "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    seed = read_recipe(folder / "edit-1.png").seed
    assert f"seed {seed}" in result.stderr and folder.name == f"0001-a-cat-seed{seed}"
    replay = run("replay", folder / "edit-1.png", "--check")
    assert replay.exit_code == 0, replay.output
    assert run_folder(replay.stdout) == folder / "replay" / folder.name  # by default beside the PNG, in replay/


def test_attention_writes_a_heatmap_grid(tiny_sd_dir, tmp_path):
    result = run("attention", "a squirrel eating a burger", "--res", "4", "--model", tiny_sd_dir, *FAST,
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    assert result.stdout.split() == [str(folder / "image.png"), str(folder / "attention.png")]
    recipe = read_recipe(folder / "attention.png")
    assert (recipe.kind, recipe.record_attention, recipe.edits) == ("attention", 4, [])
    tokens = p2p.Editor(load_pipeline(str(tiny_sd_dir))).tokenize("a squirrel eating a burger")
    words = len(tokens.ids) - 2  # without BOS and EOS
    with Image.open(folder / "attention.png") as grid:
        assert grid.width == min(words, 8) * 128
    replay = run("replay", folder / "attention.png", "--out", tmp_path / "replay", "--check")
    assert replay.exit_code == 0, replay.output


def test_real_image_edit_replays_bit_for_bit(tiny_sd_dir, tmp_path):
    photo = tmp_path / "photo.png"
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    Image.fromarray(np.stack([np.outer(ramp, ramp) // 255, ramp[None].repeat(32, 0), ramp[:, None].repeat(32, 1)],
                             -1).astype(np.uint8)).save(photo)
    result = run("edit", "--image", photo, "--prompt", "a cat sitting next to a mirror", "--to",
                 "a tiger sitting next to a mirror", "--model", tiny_sd_dir, "--steps", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    assert folder.name == "0001-a-cat-sitting-next-to-a-mirror"  # no seed: the inversion gives the latent
    recipe = read_recipe(folder / "edit-1.png")
    assert recipe.image == {"path": str(photo), "sha256": hashlib.sha256(photo.read_bytes()).hexdigest()}
    assert (recipe.inversion, recipe.seed) == ({"method": "direct"}, None)  # the default: exact, and the fastest
    # Not on a terminal, the edit's steps show as tqdm's lines, as the inversion's do; an image at the model's size
    # gets no resize note.
    assert "direct inversion: 100%" in result.stderr and "editing: 100%|" in result.stderr
    assert "note:" not in result.stderr
    wide = tmp_path / "wide.png"
    Image.open(photo).resize((64, 32)).save(wide)
    fitted = run("edit", "--image", wide, "--prompt", "a cat", "--to", "a dog", "--model", tiny_sd_dir, "--steps", "2",
                 "--out", tmp_path / "out")
    assert fitted.exit_code == 0, fitted.output
    assert (f"note: {wide}: the image is 64x32 px: it was resized and centre-cropped to the model's 32x32 px, the "
            "size of the results") in " ".join(fitted.stderr.split())
    replay = run("replay", folder / "edit-1.png", "--check")
    assert replay.exit_code == 0, replay.output
    seeded = run("edit", "--image", photo, "--prompt", "a cat", "--to", "a dog", "--seed", "3", "--model", tiny_sd_dir)
    assert seeded.exit_code == 2 and "--seed does not apply to --image" in seeded.stderr
    photo.write_bytes(photo.read_bytes() + b"\0")
    changed = run("replay", folder / "edit-1.png")
    assert changed.exit_code == 2 and "has changed since the recipe was written" in changed.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", "a [cat->dog riding"], "column 3: '[' is never closed"),
        (["edit", "a cat riding"], "nothing to edit"),
        (["edit", "--to", "a dog"], "exactly once"),
        (["edit", "a [cat->dog]", "--blend", "cat"], "--blend takes source_words:edit_words"),
        (["edit", "a [cat->dog]", "--cross", "most"], "--cross takes a fraction"),
        (["edit", "a [cat->dog]", "--weight", "dog"], "--weight takes word=value"),
        (["edit", "a [cat->dog]", "--mode", "swap"], "--mode must be one of"),
        (["edit", "a cat", "--to", "a [cat->dog]"], "--to takes an edit prompt"),
        (["edit", "a [cat->dog]", "--blend", "cow:dog"], "cow"),
        (["edit", "a [cat->dog]", "--cross", "1.5"], "1.5"),
        (["edit", "a [cat->dog]", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["edit", "--image", "photo.jpg", "--prompt", "a cat", "--to", "a dog"], "'photo.jpg' does not exist"),
        (["attention", "a [cat->dog]"], "without edit markup"),
    ],
)
def test_usage_errors_exit_2_with_a_message(tiny_sd_dir, tmp_path, args, message):
    result = run(*args, "--model", tiny_sd_dir, *FAST, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


def _forbid_model_loads(monkeypatch, fail) -> None:
    """Make `fail` stand in for the library functions that every command loads its model through."""
    monkeypatch.setattr(loading, "resolve_model", fail)
    monkeypatch.setattr(engine, "load_editor", fail)


@pytest.mark.parametrize(
    "args, message",
    [
        (["a [cat->dog]", "--blend", "lion:dog"], "the word 'lion' is not in the prompt 'a cat'"),
        (["a [cat->dog]", "--blend", "cat:lion"], "the word 'lion' is not in the prompt 'a dog'"),
        (["a [cat->dog]", "--weight", "lion=2"], "the word 'lion' is not in the prompt 'a dog'"),
        (["a [cat->dog]", "--cross-word", "lion=0.4"], "the word 'lion' is not in the prompt 'a dog'"),
        (["a cat", "--to", "a fluffy cat", "--mode", "replace"], "replace needs prompts with the same number of words"),
        (["a [cat->dog]", "--self", "0.9:0.1"], "starts after it ends"),
        (["a big red circle", "--to", ""], "--to takes an edit prompt, and this one is empty"),
        (["a [cat->dog]", "--blend", "cat:dog", "--blend-threshold", "1.5"], "--blend-threshold"),
    ],
)
def test_bad_edits_fail_before_a_model_loads(tmp_path, monkeypatch, args, message):
    _forbid_model_loads(monkeypatch, _no_model)
    result = run("edit", *args, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_syntax_errors_point_at_the_column(tiny_sd_dir, tmp_path):
    result = run("edit", "a (fluffy:lots) [teddy->toy] bear", "--model", tiny_sd_dir, "--out", tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[1:] == ["  a (fluffy:lots) [teddy->toy] bear", "            ^"]


def test_messages_show_backslashes_and_keep_the_caret_under_its_column(tmp_path, monkeypatch):
    """Printed as rich markup, '\\[' lost its backslash: the advice said to write '[' and the caret moved left."""
    _forbid_model_loads(monkeypatch, _no_model)
    result = run("edit", r"a \[ [[red->green]] circle", "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        r"error: column 7: '[' inside '[...]': edits cannot nest; write '\[' for a literal one",
        r"  a \[ [[red->green]] circle",
        "        ^",  # under the second '[', after the escaped one
    ]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text(json.dumps({"prompt": "a big [[red->green]] circle", "seed": 1}) + "\n")
    result = run("batch", manifest, "--out", tmp_path / "batch")
    assert result.exit_code == 2
    assert r"column 8: '[' inside '[...]': edits cannot nest; write '\[' for a literal one" in _one_message(result)


def test_option_errors_are_usage_errors(tmp_path):
    assert run("edit", "a [cat->dog]", "--steps", "0").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_runtime_errors_exit_1(tmp_path):
    result = run("edit", "a [cat->dog]", "--model", tmp_path / "nowhere", "--out", tmp_path)
    assert result.exit_code == 1
    assert "no such file or folder" in result.stderr


def test_serve_on_a_busy_port_is_a_runtime_error(tiny_sd_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--model", tiny_sd_dir, "--port", port, "--out", tmp_path)
    assert result.exit_code == 1
    assert f"error: Cannot find empty port in range: {port}" in result.stderr


def test_demo_reports_a_bad_output_folder(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = run("demo", "--out", tmp_path / "taken")
    assert result.exit_code == 1
    assert "is a file; pass another --out" in result.stderr


def test_replay_rejects_pngs_without_a_recipe(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run("replay", tmp_path / "plain.png")
    assert result.exit_code == 2 and "carries no prompt2prompt recipe" in result.stderr
    (tmp_path / "text.png").write_text("not a png")
    result = run("replay", tmp_path / "text.png")
    assert result.exit_code == 2 and "cannot read" in result.stderr


@pytest.mark.parametrize("kind", ["text", "ztxt"])
def test_replay_of_a_png_with_oversized_metadata_is_one_line_in_our_words(tmp_path, kind):
    from test_images import METADATA_BOMBS, metadata_bomb_png

    (tmp_path / "meta.png").write_bytes(metadata_bomb_png(kind))
    result = run("replay", tmp_path / "meta.png")
    assert result.exit_code == 2
    _one_error(result, f"it has metadata too large to read safely ({METADATA_BOMBS[kind]})")
    assert "MAX_TEXT" not in result.stderr


def _entry_point(args, env):
    """The installed `p2p` command's code path, in a fresh interpreter (no test-process state)."""
    code = "from prompt2prompt.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_offline_hub_model_from_the_cache_and_missing_from_it(tiny_sd_dir, tmp_path):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--p2p-tests--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    done = _entry_point(["edit", "a [cat->dog]", "--model", "p2p-tests/tiny-sd", *FAST, "--out", tmp_path / "out"], env)
    assert done.returncode == 0, done.stderr
    recipe = read_recipe(run_folder(done.stdout) / "edit-1.png")
    assert (recipe.model, recipe.revision) == ("p2p-tests/tiny-sd", commit)
    missing = _entry_point(["edit", "a [cat->dog]", "--model", "p2p-tests/elsewhere", "--out", tmp_path / "x"], env)
    assert missing.returncode == 1
    assert "'p2p-tests/elsewhere' is not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr



def _crafted(inline_edit, path, **changes):
    """edit-1.png of `inline_edit` with its recipe changed as a crafted PNG would change it (unchecked)."""
    import dataclasses

    out, _ = inline_edit
    recipe = dataclasses.replace(read_recipe(out / "edit-1.png"), **changes)
    with Image.open(out / "edit-1.png") as image:
        save_png(image.convert("RGB"), path, recipe)
    return path


def _one_message(result) -> str:
    assert "Traceback" not in result.output
    return " ".join(result.stderr.split())  # rich wraps long lines at the console's width


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_index": 5}, "image_index must be null (the grid) or an index from 0 to 1 of the 2 image(s)"),
        ({"num_inference_steps": 10**7}, "num_inference_steps must be an integer from 1 to 1000"),
        ({"threads": 500}, "threads must be an integer from 1 to 256"),
        ({"height": 10**6}, "height must be a positive multiple of 8 px up to 4096"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"edits": [{"prompt": 3}]}, "edit 1: an Edit needs a non-empty prompt"),
        ({"scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 10**12}}, "scheduler 'num_train_timesteps'"),
        ({"inversion": {"method": "ddim", "num_inner_steps": 10**9}}, "the recipe's inversion needs an image"),
        ({"edits": []}, "edits is empty: an edit recipe holds at least one edit"),
        ({"edits": [{"prompt": "a dog riding a red bicycle", "blend": {"source_words": "cat", "edit_words": "dog",
                                                                       "evil": 1}}]},
         "edit 1: blend has unknown fields 'evil'; the fields are source_words, edit_words"),
    ],
)
def test_replay_refuses_crafted_recipes_before_a_model_loads(inline_edit, tmp_path, monkeypatch, changes, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was checked")

    _forbid_model_loads(monkeypatch, no_model)
    result = run("replay", _crafted(inline_edit, tmp_path / "crafted.png", **changes), "--out", tmp_path / "replay")
    assert result.exit_code == 2, result.output
    assert message in _one_message(result)
    assert not (tmp_path / "replay").exists()


def test_replay_takes_only_a_scheduler_the_pipeline_lists(inline_edit, tmp_path, monkeypatch):
    monkeypatch.setattr(p2p.Editor, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    crafted = _crafted(inline_edit, tmp_path / "crafted.png", scheduler={"_class_name": "StableDiffusionPipeline"})
    result = run("replay", crafted, "--out", tmp_path / "replay")
    assert result.exit_code == 2, result.output
    assert "the recipe's scheduler 'StableDiffusionPipeline' is not one that this pipeline takes" in _one_message(result)


def test_replay_of_a_result_with_nan_is_a_runtime_error(inline_edit, tmp_path, monkeypatch):
    from prompt2prompt.engine import send

    real_images = send.pipeline_images

    def diverging(*args, **kwargs):  # what a float16 overflow gives
        images = real_images(*args, **kwargs)
        images[:] = float("nan")
        return images

    monkeypatch.setattr(send, "pipeline_images", diverging)
    result = run("replay", inline_edit[0] / "edit-1.png", "--out", tmp_path / "replay")
    assert result.exit_code == 1, result.output
    assert "error: the result has NaN/inf values" in _one_message(result)
    assert not (tmp_path / "replay").exists()


def _one_error(result, message: str) -> None:
    """One `error:` line naming the problem (a syntax error adds the prompt and a caret under its column)."""
    assert "Traceback" not in result.output
    # Off a terminal, a run's steps show as tqdm lines ("editing:  50%|..."); the error comes after them.
    lines = [line for line in result.stderr.splitlines() if line and not re.match(r"[\w ]+: +\d+%\|", line)]
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert len(lines) == (3 if lines[0].startswith("error: column") else 1), result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", ""], "column 1: the source prompt is empty"),
        (["edit", "--prompt", " ", "--to", "a dog"], "column 1: the source prompt is empty"),
        (["edit", "a (red:1e39) cat"], "column 8: the weight '1e39' is outside [-100, 100]"),
        (["edit", "a [a->b->c] d"], "column 8: '->' stands once in an edit"),
        (["edit", "a [->] d"], "column 3: '[->]' changes nothing"),
        (["edit", "a [+] d"], "column 3: '[+...]' adds nothing"),
        (["edit", "a [-] d"], "column 3: '[-...]' removes nothing"),
        (["edit", "a big [red->] circle"], "column 7: '[red->]' names no new words: to remove words, write [-red]"),
        (["edit", "a [cat->dog]", "--guidance", "nan"], "guidance_scale must be a finite number"),
        (["edit", "a [cat->dog]", "--guidance", "-inf"], "guidance_scale must be a finite number"),
        (["edit", "a [cat->dog]", "--weight", "dog=1e30"], "the weight of 'dog' is 1e+30, outside [-100, 100]"),
        (["edit", "a [cat->dog]", "--cross", "nan"], "has values outside [0, 1]"),
        (["edit", "a [cat->dog]", "--steps", "5000"], "--steps must be an integer from 1 to 1000"),
        (["edit", "a [cat->dog]", "--height", "100000"], "--height must be a positive multiple of 8 px"),
        (["edit", "a [cat->dog]", "--device", "foo"], "unknown device 'foo'"),
        (["edit", "a [cat->dog]", "--seed", str(2**64)], "Invalid value for '--seed'"),
        (["edit", "a [cat->dog]", "--steps", "0"], "Invalid value for '--steps'"),
        (["edit", "a [cat->dog]", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["attention", "a cat", "--guidance", "inf"], "guidance_scale must be a finite number"),
        (["serve", "--max-upload-mb", "nan"], "--max-upload-mb"),
        (["serve", "--device", "meta"], "runs on cpu, cuda, mps or xpu"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2_before_any_model_loads(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _forbid_model_loads(monkeypatch, _no_model)
    result = run(*args)
    assert result.exit_code == 2, result.output
    _one_error(result, message)
    assert not list(tmp_path.iterdir())


def test_runtime_errors_are_one_line_and_exit_1_before_any_model_loads(tmp_path, monkeypatch):
    _forbid_model_loads(monkeypatch, _no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("edit", "a [cat->dog]", "--device", "cuda", "--out", tmp_path)
    assert result.exit_code == 1
    _one_error(result, "device 'cuda' is not available")
    (tmp_path / "taken").write_text("a file, not a folder")
    for command in (["edit", "a [cat->dog]"], ["attention", "a cat"], ["serve"]):
        result = run(*command, "--out", tmp_path / "taken" / "inside")
        assert result.exit_code == 1, result.output
        _one_error(result, f"cannot write into --out '{tmp_path / 'taken' / 'inside'}': '{tmp_path / 'taken'}' is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = run("edit", "a [cat->dog]", "--out", locked / "new")
        assert result.exit_code == 1
        _one_error(result, f"cannot write into --out '{locked / 'new'}': Permission denied; pass another --out")


@pytest.mark.parametrize(
    "args, message",
    [
        (["a [cat->dog]", "--height", "256", "--width", "256"], "more than 4 times this model's native 32x32"),
        (["a [cat->dog]", "--negative", "blurry " * 80], "the negative prompt 'blurry blurry"),
    ],
)
def test_settings_the_model_cannot_render_are_usage_errors(tiny_sd_dir, tmp_path, args, message):
    result = run("edit", *args, "--model", tiny_sd_dir, *FAST, "--out", tmp_path / "new" / "out")
    assert result.exit_code == 2, result.output
    _one_error(result, message)
    assert not list(tmp_path.iterdir())  # the folders made for --out before the model loaded are gone again


def test_a_decompression_bomb_image_is_a_usage_error(tiny_sd_dir, tmp_path):
    from test_images import bomb_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20_000, 20_000))
    result = run("edit", "--image", bomb, "--prompt", "a cat", "--to", "a dog", "--model", tiny_sd_dir, "--steps", "2",
                 "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    _one_error(result, "is too large to decode safely")
    assert not (tmp_path / "out").exists()


def test_nan_images_fail_and_write_no_png(tiny_sd_dir, tmp_path, monkeypatch):
    from prompt2prompt.engine import send

    real_images = send.pipeline_images

    def diverging(*args, **kwargs):  # what a huge guidance or a float16 overflow gives
        images = real_images(*args, **kwargs)
        images[1:] = float("nan")
        return images

    monkeypatch.setattr(send, "pipeline_images", diverging)
    result = run("edit", "a [cat->dog]", "--model", tiny_sd_dir, *FAST, "--out", tmp_path)
    assert result.exit_code == 1, result.output
    _one_error(result, "NaN")
    assert not list(tmp_path.iterdir())  # no run folder, no staging folder left behind


def test_pickle_weights_need_allow_pickle(tiny_sd_pickle_dir, tmp_path):
    result = run("edit", "a [cat->dog]", "--model", tiny_sd_pickle_dir, *FAST, "--out", tmp_path)
    assert result.exit_code == 1
    _one_error(result, "has pickle weights (unet/diffusion_pytorch_model.bin) and no safetensors ones")
    assert "--allow-pickle" in result.stderr
    result = run("edit", "a [cat->dog]", "--model", tiny_sd_pickle_dir, *FAST, "--allow-pickle", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (run_folder(result.stdout) / "edit-1.png").is_file()


def test_a_command_writes_nothing_outside_its_output_folder(tiny_sd_dir, tmp_path):
    """Run as the `p2p` entry point runs, in a fresh interpreter: no folder in $TMPDIR, $HOME or the cwd."""
    home, temp, cwd, out = (tmp_path / name for name in ("home", "tmp", "cwd", "out"))
    for folder in (home, temp, cwd):
        folder.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", "from prompt2prompt.cli import main; main()", "edit", "a [cat->dog]",
                           "--model", str(tiny_sd_dir), *FAST, "--out", str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert list(home.iterdir()) == list(temp.iterdir()) == list(cwd.iterdir()) == []
    assert sorted(path.name for path in out.iterdir()) == ["0001-a-cat-seed7", "latest"]
    assert sorted(path.name for path in (out / "latest").iterdir()) == ["edit-1.png", "grid.png", "source.png"]


def test_an_error_about_a_very_long_prompt_quotes_a_short_part_of_it(tiny_sd_dir, tmp_path):
    long = "a cat " * 20_000  # 120,000 characters, 40,000 words: far over the text encoder's 77 tokens
    result = run("edit", long, "--to", "a dog", "--model", tiny_sd_dir, *FAST, "--out", tmp_path)
    assert result.exit_code == 2, result.output[-500:]
    assert "characters) is 40002 tokens long" in result.stderr and len(result.stderr) < 400


def test_blend_threshold_is_recorded_and_a_blend_over_the_whole_image_is_said(tiny_sd_dir, tmp_path):
    wide = run("edit", "a [cat->dog] riding a bike", "--blend", "cat:dog", "--blend-threshold", "0",
               "--model", tiny_sd_dir, *FAST, "--out", tmp_path / "wide")
    assert wide.exit_code == 0, wide.output
    assert "the local blend of edit 1 covers 100% of the image" in " ".join(wide.stderr.split() + wide.stdout.split())
    assert read_recipe(run_folder(wide.stdout) / "edit-1.png").edits[0]["blend"]["threshold"] == 0
    narrow = run("edit", "a [cat->dog] riding a bike", "--blend", "cat:dog", "--blend-threshold", "0.97",
                 "--model", tiny_sd_dir, *FAST, "--out", tmp_path / "narrow")
    assert narrow.exit_code == 0 and "covers" not in narrow.output


def test_edit_help_shows_brackets_defaults_and_the_inline_syntax():
    result = run("edit", "--help")
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    for shown in ("'a [cat->dog]'", "[default: the model's: 30 for the demo model, 50", "[default: random, recorded]",
                  "a house on a mountain[+ at winter] refinement: words added", "a (fluffy:2.5) teddy bear",
                  "--dtype <str> float32, float16", "[default: the model's; 0.8 (the paper's)"):
        assert shown in text, shown


# The demo model (64 px), at 2 steps: a run takes a second or two.
DEMO = ["--model", "demo", "--steps", "2"]


def test_runs_never_overwrite_or_mix(tmp_path):
    """Each run goes into a new numbered folder under --out, renamed into place whole; `latest` links the newest."""
    first = run("edit", "a big [red->purple] circle", "--to", "a big red star", *DEMO, "--seed", "1", "--out", tmp_path)
    assert first.exit_code == 0, first.output
    one = run_folder(first.stdout)
    before = {path.name: path.read_bytes() for path in one.iterdir()}
    second = run("edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--out", tmp_path)
    assert second.exit_code == 0, second.output
    two = run_folder(second.stdout)
    assert (one.parent, one.name, two.parent, two.name) == (
        tmp_path, "0001-a-big-red-circle-seed1", tmp_path, "0002-a-big-red-circle-seed1")
    assert sorted(path.name for path in tmp_path.iterdir()) == [one.name, two.name, "latest"]  # no staging left
    assert {path.name: path.read_bytes() for path in one.iterdir()} == before  # the first run is untouched
    assert sorted(path.name for path in two.iterdir()) == ["edit-1.png", "grid.png", "source.png"]  # no stale edit-2
    assert (tmp_path / "latest").resolve() == two.resolve()
    assert f"saved to {two} (also {tmp_path / 'latest'})" in " ".join(second.stderr.split())
    replays = [run("replay", one / "edit-2.png", "--check") for _ in range(2)]
    assert all(replay.exit_code == 0 for replay in replays), replays[0].output
    assert [run_folder(replay.stdout) for replay in replays] == [one / "replay" / "0001-a-big-red-circle-seed1",
                                                                 one / "replay" / "0002-a-big-red-circle-seed1"]


def test_the_grid_labels_the_edited_words_on_tiles_of_at_least_256_px(tmp_path):
    result = run("edit", "a big [red->purple] circle in the center on a white background",
                 "--to", "a big red circle in the center on a white gradient background",
                 "--to", "a big (red:2) circle in the center on a white background", *DEMO, "--seed", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    images = []
    for name in ["source.png", "edit-1.png", "edit-2.png", "edit-3.png"]:
        with Image.open(folder / name) as image:
            images.append(image.convert("RGB"))
    assert images[0].size == (64, 64)
    # The grid is these images, enlarged 4x pixel for pixel, under labels that name what each edit changes.
    expected = p2p.image_grid(images, ["source (seed 1)", "red -> purple", "+ gradient", "reweight red x2"], width=256)
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == expected.size and grid.width == 4 * 256 and grid.height > 256
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(expected))


def test_seeds_make_one_run_folder_and_grid_each(tmp_path):
    result = run("edit", "a big [red->green] circle", *DEMO, "--seeds", "3,1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folders = run_folders(result.stdout)
    assert [folder.name for folder in folders] == ["0001-a-big-red-circle-seed3", "0002-a-big-red-circle-seed1"]
    assert [read_recipe(folder / "grid.png").seed for folder in folders] == [3, 1]
    assert not np.array_equal(pixels(folders[0] / "source.png"), pixels(folders[1] / "source.png"))
    single = run("edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--out", tmp_path)
    assert np.array_equal(pixels(run_folder(single.stdout) / "edit-1.png"), pixels(folders[1] / "edit-1.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "1", "--seeds", "2,3"], "--seed and --seeds exclude each other"),
        (["--seeds", "1,,2"], "--seeds takes seeds from 0 to 2**63 - 1, comma-separated"),
        (["--seeds", "1,-2"], "--seeds takes seeds from 0 to 2**63 - 1, comma-separated"),
        (["--seeds", "4,4"], "--seeds names the seed 4 twice"),
        (["--image", "photo.png", "--seeds", "1,2"], "--seeds does not apply to --image"),
        (["--image", "photo.png", "--scheduler", "euler"], "--scheduler does not apply to --image"),
    ],
)
def test_seeds_and_scheduler_misuse_is_refused_before_a_model_loads(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _forbid_model_loads(monkeypatch, _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    prompt = ["--prompt", "a cat", "--to", "a dog"] if "--image" in args else ["a [cat->dog]"]
    result = run("edit", *prompt, *args)
    assert result.exit_code == 2, result.output
    _one_error(result, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png"]


def test_a_scheduler_by_name_is_recorded_and_replays_bit_for_bit(tmp_path):
    result = run("edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--scheduler", "EulerDiscreteScheduler",
                 "--out", tmp_path / "euler")
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    recipe = read_recipe(folder / "edit-1.png")
    assert recipe.scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert recipe.scheduler["prediction_type"] == "v_prediction"  # configured as the model's own scheduler
    with Image.open(folder / "edit-1.png") as image:
        assert "Sampler: Euler," in image.text["parameters"]
    replay = run("replay", folder / "edit-1.png", "--check")
    assert replay.exit_code == 0 and "identical" in replay.stderr, replay.output
    ddim = run("edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--out", tmp_path / "ddim")
    assert not np.array_equal(pixels(run_folder(ddim.stdout) / "edit-1.png"), pixels(folder / "edit-1.png"))
    short = run("attention", "a big red circle", *DEMO, "--seed", "1", "--scheduler", "euler-a", "--out", tmp_path / "a")
    assert short.exit_code == 0, short.output
    assert read_recipe(run_folder(short.stdout) / "image.png").scheduler["_class_name"] == "EulerAncestralDiscreteScheduler"


def test_an_unknown_scheduler_is_a_one_line_usage_error_listing_the_choices(tmp_path):
    result = run("edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--scheduler", "bogus", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    _one_error(result, "--scheduler 'bogus' is not one this model takes; choose one of ddim, ddpm, pndm, lms, euler")
    assert "EulerDiscreteScheduler" in result.stderr and "UniPCMultistepScheduler" in result.stderr
    assert not list(tmp_path.iterdir())


def test_pngs_carry_automatic1111_parameters_beside_the_recipe(tmp_path):
    result = run("edit", "a big [red->green] circle", *DEMO, "--seed", "5", "--guidance", "4.5",
                 "--negative", "blurry, dark", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = run_folder(result.stdout)
    with Image.open(folder / "edit-1.png") as image:
        assert image.text["parameters"] == ("a big green circle\nNegative prompt: blurry, dark\n"
                                            "Steps: 2, Sampler: DDIM, CFG scale: 4.5, Seed: 5, Size: 64x64, Model: demo")
        assert json.loads(image.text[RECIPE_KEY])["edits"][0]["prompt"] == "a big green circle"  # still the recipe
    with Image.open(folder / "grid.png") as grid:  # the source's prompt, and the generated size, not the grid's
        assert grid.text["parameters"] == ("a big red circle\nNegative prompt: blurry, dark\n"
                                           "Steps: 2, Sampler: DDIM, CFG scale: 4.5, Seed: 5, Size: 64x64, Model: demo")


def test_float16_on_the_cpu_is_one_warning_of_ours_and_then_runs(tmp_path):
    done = _entry_point(["edit", "a big [red->green] circle", *DEMO, "--seed", "1", "--device", "cpu", "--dtype",
                         "float16", "--out", tmp_path], {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "running them will fail" not in done.stderr  # diffusers' warning, printed once per component before
    assert [line for line in done.stderr.splitlines() if "warning" in line.lower()] == [
        "warning: float16 on the CPU runs slowly (most CPUs compute it in software) and a few operations may lack it "
        "there; float32 is the CPU's dtype (--dtype float32)"]
    assert read_recipe(run_folder(done.stdout) / "edit-1.png").dtype == "float16"


def test_importing_the_cli_imports_no_torch_and_help_answers():
    code = "import sys, prompt2prompt.cli; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    helped = _entry_point(["--help"], {})
    assert helped.returncode == 0 and all(command in helped.stdout for command in ("edit", "attention", "replay"))
