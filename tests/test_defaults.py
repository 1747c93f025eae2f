"""A model's own defaults (its prompt2prompt.json), its family's, and the paper's: what a run takes when not told,
and where the front ends say so. Also: direct inversion as the default, and a manifest's words checked at load."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import prompt2prompt as p2p
from prompt2prompt.batch import load_manifest
from prompt2prompt.batch.manifest import ManifestError
from prompt2prompt.cli import app
from prompt2prompt.engine import load_editor
from prompt2prompt.demo import world
from prompt2prompt.families.defaults import (DEFAULTS_FILE, folder_vocabulary, model_defaults, read_defaults_file,
                                             vocabulary_notice)
from prompt2prompt.loading import DEMO_MODELS
from prompt2prompt.families.unet import UNetFamily
from prompt2prompt.recipe import read_recipe, recipe_for

CIRCLE = "a big red circle in the center on a white background"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def own_defaults_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD model with a prompt2prompt.json of its own, as the demo model ships one."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd-own"
    shutil.copytree(tiny_sd_dir, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({
        "num_inference_steps": 3, "guidance_scale": 4.5, "self_steps": 0.2, "blend_threshold": 0.7,
        "word_windows": [{"name": "shape swap", "words": ["square"], "cross_steps": 0.5, "self_steps": 0.0}]}))
    return folder


def test_the_demo_model_ships_its_measured_defaults():
    editor, _ = load_editor("demo", device="cpu")
    d = editor.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.cross_steps, d.self_steps, d.blend_threshold) == (30, 5.0, 0.8, 0.2, 0.6)
    assert d.windows_for(CIRCLE, CIRCLE.replace("circle", "star")) == (0.5, 0.0, "the model's shape swap windows")
    assert d.windows_for(CIRCLE, CIRCLE.replace("red", "purple")) == (0.8, 0.2, None)
    assert d.origin["guidance_scale"] == f"the model's {DEFAULTS_FILE}"
    assert d.example == (CIRCLE, CIRCLE.replace("red", "purple"))  # the web app's placeholders


def test_a_model_without_a_file_has_its_family_s_and_the_paper_s_defaults(tiny_sd_dir):
    editor, _ = load_editor(str(tiny_sd_dir), device="cpu")
    d = editor.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.cross_steps, d.self_steps, d.blend_threshold) == (50, 7.5, 0.8, 0.4, 0.3)
    assert d.origin["num_inference_steps"] == "the Stable Diffusion 1.x, 2.x and XL default"
    assert d.origin["blend_threshold"] == "the paper's default"


def test_an_sd3_model_has_its_family_s_steps_and_guidance(tiny_sd3_dir):
    d = load_editor(str(tiny_sd3_dir), device="cpu")[0].defaults
    assert (d.num_inference_steps, d.guidance_scale) == (28, 7.0)


def test_the_editor_runs_at_the_model_s_steps_and_guidance(own_defaults_dir):
    editor, _ = load_editor(str(own_defaults_dir), device="cpu")
    prepared = editor.prepare("a cat", ["a dog"], seed=0)
    assert (prepared.num_inference_steps, prepared.guidance_scale) == (3, 4.5)
    # The Python Edit keeps the contract's windows: only the front ends take the model's.
    assert p2p.Edit("a dog").self_steps == 0.4


def test_recipes_take_the_model_s_defaults_and_say_so(own_defaults_dir):
    editor, source = load_editor(str(own_defaults_dir), device="cpu")
    used: list[str] = []
    recipe = recipe_for(editor, source, used=used, source="a red square", seed=1, edits=[
        {"prompt": "a red circle"},                                        # no windows: the model's
        {"prompt": "a blue square", "cross_steps": 0.3, "blend": {"source_words": ["red"], "edit_words": ["blue"]}},
        {"prompt": "a green square", "cross_steps": {"green": 0.2}, "self_steps": 0.1,
         "blend": {"source_words": ["red"], "edit_words": ["green"], "threshold": 0.5}},
    ])
    assert (recipe.num_inference_steps, recipe.guidance_scale) == (3, 4.5)
    first, second, third = recipe.edits
    assert (first["cross_steps"], first["self_steps"]) == (0.5, 0.0)  # "square" removed: the shape-swap windows
    assert (second["cross_steps"], second["self_steps"], second["blend"]["threshold"]) == (0.3, 0.2, 0.7)
    assert third["cross_steps"] == {"default": 0.8, "green": 0.2} and third["self_steps"] == 0.1
    assert third["blend"]["threshold"] == 0.5  # given: kept
    assert used[0] == f"3 steps, guidance 4.5 (the model's {DEFAULTS_FILE})"
    assert used[1] == "edit 1: cross 0.5, self 0 (the model's shape swap windows)"
    assert used[2] == f"edit 2: self 0.2, blend threshold 0.7 (the model's {DEFAULTS_FILE})"
    assert used[3] == "edit 3: cross 0.8 for the other words (the paper's default)" and len(used) == 4


def test_p2p_edit_on_the_demo_model_runs_at_its_defaults_and_prints_them(tmp_path):
    result = run("edit", CIRCLE.replace("red", "[red->purple]"), "--seed", "1", "--steps", "4", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "defaults: guidance 5 (the model's prompt2prompt.json); edit 1: cross 0.8, self 0.2" in result.stderr
    recipe = read_recipe(next(tmp_path.rglob("edit-1.png")))
    assert (recipe.guidance_scale, recipe.edits[0]["cross_steps"], recipe.edits[0]["self_steps"]) == (5.0, 0.8, 0.2)


def test_explicit_options_win_over_the_model_s_defaults(tmp_path):
    result = run("edit", CIRCLE.replace("circle", "[circle->star]"), "--seed", "1", "--steps", "3", "--guidance", "6",
                 "--cross", "0.7", "--self", "0.3", "--blend", "circle:star", "--blend-threshold", "0.6", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "defaults:" not in result.stderr
    recipe = read_recipe(next(tmp_path.rglob("edit-1.png")))
    edit = recipe.edits[0]
    assert (recipe.guidance_scale, edit["cross_steps"], edit["self_steps"], edit["blend"]["threshold"]) == (6.0, 0.7, 0.3, 0.6)


def test_a_shape_swap_on_the_demo_model_takes_its_shape_windows(tmp_path):
    result = run("edit", CIRCLE.replace("circle", "[circle->star]"), "--seed", "1", "--steps", "3", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "cross 0.5, self 0 (the model's shape swap windows)" in result.stderr
    edit = read_recipe(next(tmp_path.rglob("edit-1.png"))).edits[0]
    assert (edit["cross_steps"], edit["self_steps"]) == (0.5, 0.0)


@pytest.mark.parametrize(("content", "message"), [
    ("{", "cannot read the model's defaults"),
    ('{"guidance": 5}', "unknown fields ['guidance']"),
    ('{"self_steps": 1.5}', "self_steps must be a number in [0, 1]"),
    ('{"num_inference_steps": 0}', "num_inference_steps"),
    ('{"word_windows": [{"words": []}]}', "word_windows[1]"),
    ('{"example": ["a cat"]}', "example must be [source prompt, edit prompt]"),
    ('{"layers": [8]}', "layers must be an object of Editor layer keywords"),
    ('{"layers": {"blend_size": 8}}', "layers has unknown keywords ['blend_size']"),
    ('{"layers": {"self_blocks": "all"}}', "layers.self_blocks must be a number or a list of block numbers"),
    ('{"vocabulary": ["a red"]}', "vocabulary must be a non-empty list of words"),
    ('{"vocabulary": []}', "vocabulary must be a non-empty list of words"),
])
def test_a_bad_defaults_file_is_refused_in_one_line(tmp_path, content, message):
    (tmp_path / DEFAULTS_FILE).write_text(content)
    with pytest.raises(ValueError, match="prompt2prompt.json") as error:
        model_defaults(UNetFamily, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError):
        read_defaults_file(tmp_path / DEFAULTS_FILE)


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_the_demo_models_know_the_words_of_the_world_s_captions(model):
    """Their prompt2prompt.json lists the vocabulary of the captions they were trained on, as world.py makes them."""
    assert folder_vocabulary(DEMO_MODELS[model]) == frozenset(world.vocabulary())
    assert model_defaults(UNetFamily, DEMO_MODELS[model]).vocabulary == frozenset(world.vocabulary())


def test_words_outside_a_model_s_vocabulary_are_named_once_each():
    vocabulary = frozenset(world.vocabulary())
    assert vocabulary_notice(vocabulary, ["a big red circle", "a big green circle"]) is None
    assert vocabulary_notice(frozenset(), ["a light green circle"]) is None  # a model that lists none: no notice
    notice = vocabulary_notice(vocabulary, ["a big red circle", "a big Light green circle", "a light pink circle"])
    assert notice.startswith("the model was never trained on the words 'light', 'pink', so it may ignore them or "
                             "draw something else; its words are a, and, at, background, big, black, ")
    assert notice.endswith(f"white, yellow (the vocabulary in its {DEFAULTS_FILE})")
    assert "\n" not in notice


def test_p2p_edit_names_the_words_the_demo_model_never_saw_and_runs(tmp_path):
    result = run("edit", CIRCLE.replace("red", "[red->light green]"), "--seed", "1", "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning: the model was never trained on the word 'light', so it may ignore it" in result.stderr
    known = run("edit", CIRCLE.replace("red", "[red->green]"), "--seed", "1", "--steps", "2", "--out", tmp_path)
    assert known.exit_code == 0 and "warning:" not in known.stderr


def test_p2p_batch_names_the_words_its_jobs_models_never_saw_before_it_runs(tmp_path, monkeypatch):
    import prompt2prompt.batch

    def no_run(*args, **kwargs):
        raise RuntimeError("not run in this test")

    monkeypatch.setattr(prompt2prompt.batch, "run_batch", no_run)
    lines = [{"prompt": "a big [red->light green] circle", "seed": 1}, {"prompt": "a big [red->green] circle", "seed": 1},
             {"prompt": "a [big->huge] red circle", "seed": 1},
             {"prompt": "a [cat->dog]", "model": "demo-flow", "seed": 1}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run("batch", manifest, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "not run in this test" in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[0].startswith("warning: demo, manifest lines 1, 3: the model was never trained on the words "
                                  "'light', 'huge', so it may ignore them")
    assert warnings[1].startswith("warning: demo-flow, manifest line 4: the model was never trained on the words "
                                  "'cat', 'dog'") and len(warnings) == 2


def test_the_demo_grid_edit_red_to_purple_is_clean_at_the_model_s_defaults(tmp_path):
    """The issue's first edit: at the demo model's defaults (guidance 5) the edit is a purple circle on white, where
    SD's 7.5 gave a dark, noisy one."""
    result = run("edit", CIRCLE.replace("red", "[red->purple]"), "--seed", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    with Image.open(next(tmp_path.rglob("edit-1.png"))) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=float) / 255
    corners = np.concatenate([rgb[:8, :8], rgb[:8, -8:], rgb[-8:, :8], rgb[-8:, -8:]]).reshape(-1, 3)
    centre = rgb[24:40, 24:40].reshape(-1, 3)
    assert corners.mean() > 0.9  # a white background
    red, green, blue = centre.mean(0)
    assert blue > green + 0.2 and red > green + 0.2  # purple: red and blue, little green


def test_direct_inversion_is_the_default_on_every_family(tiny_sd_dir, tiny_sd3_dir, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    for folder in (tiny_sd_dir, tiny_sd3_dir):
        editor, source = load_editor(str(folder), device="cpu")
        assert editor.family.default_inversion == "direct"
        recipe = recipe_for(editor, source, source="a cat", edits=[{"prompt": "a dog"}], seed=None,
                            image={"path": str(tmp_path / "grey.png"), "sha256": "0" * 64})
        assert recipe.inversion["method"] == "direct"


def test_a_manifest_s_missing_words_fail_at_load_before_any_model(tmp_path):
    lines = [{"source": "a cat riding a bike", "edits": ["a dog riding a bike"]},
             {"source": "a cat riding a bike", "edits": [{"prompt": "a dog riding a bike",
                                                          "blend": {"source_words": ["zebra"], "edit_words": ["dog"]}}]},
             {"source": "a cat riding a bike", "edits": [{"prompt": "a dog riding a bike", "weights": {"owl": 2}}]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest, model="no/such-model")  # never loaded: the words fail first
    text = str(error.value)
    assert "m.jsonl:2: the word 'zebra' is not in the prompt" in text
    assert "m.jsonl:3: the word 'owl' is not in the prompt" in text
    assert "m.jsonl:1:" not in text


def test_a_manifest_takes_prompt_with_inline_markup(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a [cat->dog] riding a bicycle", "seed": 1}) + "\n")
    (job,) = load_manifest(manifest).jobs
    assert job.source == "a cat riding a bicycle"
    assert [edit["prompt"] for edit in job.edits] == ["a dog riding a bicycle"]
    assert "cross_steps" not in job.edits[0]  # the model's windows, filled when its recipe is made


def test_the_editor_takes_the_model_s_layers_unless_told(own_defaults_dir, tiny_sd3_dir, tmp_path):
    folder = tmp_path / "tiny-sd-layers"
    shutil.copytree(own_defaults_dir, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"layers": {"blend_res": 8, "self_replace_max_res": 16}}))
    editor, _ = load_editor(str(folder), device="cpu")
    assert (editor.blend_res, editor.self_replace_max_res) == (8, 16)
    assert p2p.Editor(editor.pipe, blend_res=16).layer_options == {"blend_res": 16, "self_replace_max_res": 16}
    # Without a file: the family's rule (None), as before.
    assert load_editor(str(own_defaults_dir), device="cpu")[0].layer_options == {"blend_res": None,
                                                                                 "self_replace_max_res": None}
    # A file that names another family's layers is refused when the Editor is made, naming the file.
    sd3 = tmp_path / "tiny-sd3-layers"
    shutil.copytree(tiny_sd3_dir, sd3)
    (sd3 / DEFAULTS_FILE).write_text(json.dumps({"layers": {"blend_res": 8}}))
    with pytest.raises(ValueError, match=r"prompt2prompt.json \"layers\": \['blend_res'\] do not apply"):
        load_editor(str(sd3), device="cpu")
    (sd3 / DEFAULTS_FILE).write_text(json.dumps({"layers": {"self_blocks": [0]}}))
    assert load_editor(str(sd3), device="cpu")[0].self_blocks == [0]
