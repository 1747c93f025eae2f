"""The CLI on saved tiny SD3 and Flux pipelines: edit, replay, attention; the family and T5 length recorded."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import prompt2prompt as p2p
from prompt2prompt.cli import app
from prompt2prompt.loading import load_pipeline
from prompt2prompt.recipe import read_recipe

FAST = ["--steps", "2", "--seed", "7", "--height", "32", "--width", "32", "--max-sequence-length", "16"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_folder(result):
    """The one run folder a command wrote, from the files it printed."""
    (folder,) = {Path(line).parent for line in result.stdout.splitlines() if line.strip()}
    return folder


@pytest.mark.parametrize("model, family, guidance", [("tiny_sd3_dir", "sd3", 7.0), ("tiny_flux_dir", "flux", 3.5),
                                                     ("tiny_chroma_dir", "chroma", 3.0), ("tiny_pixart_dir", "pixart", 4.5)])
def test_edit_records_the_family_and_replays_bit_for_bit(request, tmp_path, model, family, guidance):
    folder = request.getfixturevalue(model)
    result = run("edit", "a [cat->dog] riding a (red:1.5) bicycle", "--model", folder, *FAST, "--blend", "cat:dog",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    out = run_folder(result)
    recipe = read_recipe(out / "edit-1.png")
    assert (recipe.family, recipe.max_sequence_length, recipe.guidance_scale) == (family, 16, guidance)
    # The CLI adds no logic: its images are the API's.
    editor = p2p.Editor(load_pipeline(str(folder)))
    edit = p2p.Edit("a dog riding a red bicycle", weights={4: 1.5}, blend=p2p.LocalBlend(["cat"], ["dog"]))
    api = editor.edit("a cat riding a red bicycle", [edit], num_inference_steps=2, seed=7, height=32, width=32,
                      max_sequence_length=16)
    assert np.array_equal(pixels(out / "edit-1.png"), np.asarray(api.images[1]))
    replay = run("replay", out / "edit-1.png", "--out", tmp_path / "replay", "--check")
    assert replay.exit_code == 0, replay.output


def test_defaults_are_the_models(tiny_flux_dir, tmp_path):
    result = run("edit", "a [cat->dog]", "--model", tiny_flux_dir, "--seed", "1", "--height", "32", "--width", "32",
                 "--steps", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    recipe = read_recipe(run_folder(result) / "edit-1.png")
    assert (recipe.guidance_scale, recipe.max_sequence_length) == (3.5, 512)


def test_attention_draws_one_heatmap_per_word(tiny_sd3_dir, tmp_path):
    result = run("attention", "a squirrel eating a burger", "--model", tiny_sd3_dir, "--steps", "2", "--seed", "7",
                 "--max-sequence-length", "16", "--out", tmp_path)  # the tiny SD3's own size: 32 px
    assert result.exit_code == 0, result.output
    with Image.open(run_folder(result) / "attention.png") as grid:
        assert grid.width == 5 * 128  # five words, each summed over its CLIP and T5 tokens
    assert run("replay", run_folder(result) / "attention.png", "--out", tmp_path / "replay", "--check").exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["attention", "a cat", "--res", "4"], "record_attention"),
        (["edit", "a [cat->dog]", "--max-sequence-length", "600"], "max-sequence-length"),
    ],
)
def test_mmdit_usage_errors(tiny_sd3_dir, tmp_path, args, message):
    result = run(*args, "--model", tiny_sd3_dir, "--steps", "1", "--out", tmp_path)
    assert result.exit_code in (1, 2) and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_t5_length_is_refused_on_a_unet_model(tiny_sd_dir, tmp_path):
    result = run("edit", "a [cat->dog]", "--model", tiny_sd_dir, "--steps", "1", "--max-sequence-length", "16",
                 "--out", tmp_path)
    assert result.exit_code == 2 and "T5 length" in result.output


def test_a_recipe_of_another_family_is_refused(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    made = run("edit", "a [cat->dog]", "--model", tiny_sd3_dir, *FAST, "--out", tmp_path)
    assert made.exit_code == 0, made.output
    result = run("replay", run_folder(made) / "edit-1.png", "--model", tiny_flux_dir, "--out", tmp_path / "replay")
    assert result.exit_code in (1, 2) and "made on a sd3 model" in result.output
