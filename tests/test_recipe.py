"""Recipes as untrusted input: every field checked before any model loads, the scheduler only from the pipeline's
compatible ones, bounded threads, NaN results refused, PNGs written with the umask's mode."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import prompt2prompt as p2p
from prompt2prompt import recipe as recipes
from prompt2prompt.engine import EditResult
from prompt2prompt.images import check_finite_images
from prompt2prompt.edits import edit_to_dict
from prompt2prompt.recipe import (Recipe, RecipeError, edit_label, file_digest, prepare_recipe,
                                  read_recipe, replaying, run_recipe, save_png)

SHA = "0" * 64


def recipe_data(**changes) -> dict:
    """A valid recipe as JSON data, with `changes`."""
    recipe = Recipe(source="a cat riding a bike", edits=[edit_to_dict(p2p.Edit("a dog riding a bike"))], seed=1,
                    num_inference_steps=2, guidance_scale=7.5, model="demo", threads=1)
    return {**json.loads(recipe.to_json()), **changes}


def parse(data) -> Recipe:
    return Recipe.from_json(data if isinstance(data, str) else json.dumps(data))


def test_a_valid_recipe_round_trips():
    data = recipe_data()
    assert json.loads(parse(data).to_json()) == data
    image = recipe_data(seed=None, image={"path": "in.png", "sha256": SHA}, inversion={"method": "direct", "fit": "pad"})
    assert parse(image).inversion == {"method": "direct", "fit": "pad"}
    attention = recipe_data(edits=[], kind="attention", record_attention=16, image_index=0)
    assert parse(attention).record_attention == 16


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"source": ""}, "source must be a non-empty string"),
        ({"source": 3}, "source must be a non-empty string"),
        ({"edits": "a dog"}, "edits must be a list of edits"),
        ({"edits": [3]}, "edit 1 must be an object"),
        ({"edits": [{}]}, "edit 1 has no 'prompt'"),
        ({"edits": [{"prompt": "a dog", "colour": "red"}]}, "edit 1 has unknown fields ['colour']"),
        ({"edits": [{"prompt": "a dog", "weights": "ab"}]}, "edit 1: weights must be a list of [word or position, weight]"),
        ({"edits": [{"prompt": "a dog", "weights": [[["dog"], 2]]}]}, "edit 1: weights must be a list"),
        ({"edits": [{"prompt": "a dog", "self_steps": 1.5}]}, "edit 1: self_steps 1.5 has values outside [0, 1]"),
        ({"edits": [{"prompt": "a dog", "blend": {"source_words": ["cat"]}}]}, "source_words and edit_words"),
        ({"edits": [{"prompt": "a dog", "mode": "swap"}]}, "edit 1: Edit mode must be one of"),
        ({"edits": [{"prompt": "a dog"}] * 65}, "edits must be a list of edits of at most 64"),
        ({"seed": -1}, "seed must be an integer from 0 to 2**63 - 1, not -1"),
        ({"seed": 2**63}, "seed must be"),
        ({"seed": 1.5}, "seed must be"),
        ({"seed": True}, "seed must be"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer from 1 to 1000"),
        ({"num_inference_steps": 10**9}, "(set P2P_ALLOW_LARGE=1 for more), not 1000000000"),
        ({"num_inference_steps": "50"}, "num_inference_steps must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, not nan"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
        ({"guidance_scale": 10**400}, "guidance_scale must be a finite number"),
        ({"guidance_scale": 1e6}, ("guidance_scale must be a finite number from -100 to 100 (set P2P_ALLOW_LARGE=1 "
                                   "for more), not 1000000.0")),
        ({"guidance_scale": "7.5"}, "guidance_scale must be"),
        ({"height": 33}, "height must be a positive multiple of 8 px up to 4096"),
        ({"width": 8 * 10**6}, "width must be a positive multiple of 8 px up to 4096"),
        ({"width": -8}, "width must be"),
        ({"threads": 0}, "threads must be an integer from 1 to 256"),
        ({"threads": 1000}, "threads must be an integer from 1 to 256"),
        ({"image_index": 2}, "image_index must be null (the grid) or an index from 0 to 1 of the 2 image(s)"),
        ({"image_index": -1}, "image_index must be"),
        ({"image_index": "0"}, "image_index must be"),
        ({"inversion": {"method": "ddim"}}, "the recipe's inversion needs an image"),
        ({"seed": None}, "a recipe without an image needs a seed"),  # a random seed would replay as another picture
        ({"seed": None, "image": {"path": "in.png"}}, "image must be an object with path and sha256"),
        ({"seed": None, "image": {"path": "in.png", "sha256": "x"}}, "image sha256 must be 64 lowercase hex digits"),
        ({"image": {"path": "in.png", "sha256": SHA}}, "a recipe with an image takes no seed"),
        ({"seed": None, "image": {"path": "in.png", "sha256": SHA}, "inversion": {"method": "magic"}},
         "inversion method 'magic' is not one of direct, null-text"),
        ({"seed": None, "image": {"path": "in.png", "sha256": SHA}, "inversion": {"num_inner_steps": 10**6}},
         "inversion num_inner_steps must be an integer from 0 to 100"),
        ({"seed": None, "image": {"path": "in.png", "sha256": SHA}, "inversion": {"early_stop_epsilon": -1}},
         "early_stop_epsilon must be a finite number >= 0"),
        ({"seed": None, "image": {"path": "in.png", "sha256": SHA}, "inversion": {"fit": "stretch"}},
         "inversion fit must be 'crop' or 'pad'"),
        ({"seed": None, "image": {"path": "in.png", "sha256": SHA}, "inversion": {"lr": 1}}, "inversion has unknown fields"),
        ({"record_attention": "yes"}, "record_attention (a layer side, or true/false) must be an integer"),
        ({"record_attention": 0}, "record_attention"),
        ({"dtype": "float8"}, "dtype must name a torch floating-point dtype"),
        ({"dtype": 3}, "dtype must name"),
        ({"device": None}, "device must be a non-empty string"),
        ({"kind": "video"}, "kind must be one of edit, attention"),
        ({"kind": "attention"}, "an attention recipe records attention"),
        ({"cached_source": "yes"}, "cached_source must be true or false"),
        ({"scheduler": {"_class_name": "DDIMScheduler", "steps\nOK": 10**9}}, "scheduler 'steps\\nOK' (in absolute"),
        ({"scheduler": "DDIMScheduler"}, "scheduler must be an object"),
        ({"scheduler": {"_class_name": 3}}, "scheduler _class_name must be a non-empty string"),
        ({"scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 10**9}},
         "scheduler 'num_train_timesteps' (in absolute value) must be an integer from 0 to 10000"),
        ({"scheduler": {"_class_name": "DDIMScheduler", "trained_betas": [0.1] * 20000}},
         "the length of scheduler 'trained_betas'"),
        ({"scheduler": {"_class_name": "DDIMScheduler", "beta_end": float("nan")}}, "scheduler 'beta_end' must be a finite"),
        ({"edits": []}, "edits is empty: an edit recipe holds at least one edit"),  # not a wrong image_index
        ({"edits": [], "image_index": 1}, "edits is empty: an edit recipe holds at least one edit"),
        ({"edits": [{"prompt": "a dog", "blend": {"source_words": ["cat"], "edit_words": ["dog"], "evil": 1}}]},
         "edit 1: blend has unknown fields 'evil'; the fields are source_words, edit_words, threshold, start"),
        ({"format": True}, "recipe format True is not 1"),
        ({"format": 2, "package_version": "9.0"}, "recipe format 2 is not 1; replay it with the prompt2prompt version that wrote it ('9.0')"),
        ({"extra": 1}, "the recipe has unknown fields ['extra']"),
    ],
)
def test_every_bad_field_is_one_clear_recipe_error(changes, message):
    with pytest.raises(RecipeError) as caught:
        parse(recipe_data(**changes))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


@pytest.mark.parametrize("text, message", [
    ("{not json", "the recipe is not valid JSON"),
    ("[1, 2]", "the recipe is a JSON list, not an object"),
    ("[" * 100_000, "the recipe is not valid JSON"),
    ('{"seed": ' + "1" * 5000 + "}", "the recipe holds an integer of more than 4300 digits"),
])
def test_text_that_is_no_recipe_is_one_clear_recipe_error(text, message):
    with pytest.raises(RecipeError, match="^" + message):
        parse(text)


def test_missing_fields_are_named():
    data = recipe_data()
    del data["model"], data["seed"]
    with pytest.raises(RecipeError, match=r"lacks the fields \['model', 'seed'\]"):
        parse(data)


def test_a_recipe_without_a_format_says_it_lacks_one():
    data = recipe_data()
    del data["format"]
    with pytest.raises(RecipeError, match=r"^the recipe lacks the field 'format' \(1 in every recipe p2p writes\)"):
        parse(data)


def test_the_bounds_lift_with_p2p_allow_large(monkeypatch):
    large = recipe_data(num_inference_steps=2000, height=8192, threads=512, guidance_scale=500.0)
    with pytest.raises(RecipeError):
        parse(large)
    monkeypatch.setenv("P2P_ALLOW_LARGE", "1")
    assert parse(large).num_inference_steps == 2000
    with pytest.raises(RecipeError, match="guidance_scale must be a finite number, not nan"):
        parse(recipe_data(guidance_scale=float("nan")))  # what is not finite stays refused
    with pytest.raises(RecipeError, match="num_inference_steps must be an integer of at least 1, not 0"):
        parse(recipe_data(num_inference_steps=0))


# ------------------------------------------------------------------------------------------------ replay


@pytest.fixture
def editor(sd_pipe):
    return p2p.Editor(sd_pipe)


def no_compute(*args, **kwargs):
    raise AssertionError("the run started before the recipe was checked")


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "AutoencoderKL", "os", "DDPMWuerstchenScheduler"])
def test_only_a_scheduler_compatible_with_the_pipeline_is_built(editor, monkeypatch, name):
    monkeypatch.setattr(editor, "prepare", no_compute)
    monkeypatch.setattr(editor, "run", no_compute)
    recipe = parse(recipe_data(scheduler={"_class_name": name}))
    with pytest.raises(RecipeError, match=f"the recipe's scheduler '{name}' is not one that this pipeline takes; "
                                          "the compatible ones are .*DDIMScheduler"):
        run_recipe(recipe, editor)
    assert editor.pipe.scheduler.__class__.__name__ == "DDIMScheduler"


def test_a_compatible_scheduler_replays_and_a_broken_configuration_fails_first(editor, monkeypatch):
    seen = []
    monkeypatch.setattr(editor, "run", lambda *args, **kwargs: seen.append(type(editor.pipe.scheduler).__name__)
                        or EditResult(np.full((2, 8, 8, 3), 0.5), [], []))
    run_recipe(parse(recipe_data(scheduler={"_class_name": "EulerDiscreteScheduler"})), editor)
    assert seen == ["EulerDiscreteScheduler"]
    broken = {"_class_name": "DDIMScheduler", "beta_schedule": "wobbly"}
    with pytest.raises(RecipeError, match="the recipe's DDIMScheduler configuration does not work: NotImplementedError"):
        run_recipe(parse(recipe_data(scheduler=broken)), editor)
    too_many = {"_class_name": "DDIMScheduler", "num_train_timesteps": 10}
    with pytest.raises(RecipeError, match="configuration does not work"):
        run_recipe(parse(recipe_data(scheduler=too_many, num_inference_steps=50)), editor)
    assert seen == ["EulerDiscreteScheduler"]


@pytest.mark.parametrize("allow, expected", [(None, "cpus"), ("1", 200)])
def test_replay_threads_are_capped_to_the_cpus(editor, monkeypatch, allow, expected):
    if editor.pipe.device.type != "cpu":
        pytest.skip("threads apply to CPU runs")
    if allow:
        monkeypatch.setenv("P2P_ALLOW_LARGE", allow)
    seen = []
    monkeypatch.setattr(editor, "run", lambda *args, **kwargs: seen.append(torch.get_num_threads())
                        or EditResult(np.full((2, 8, 8, 3), 0.5), [], []))
    before = torch.get_num_threads()
    run_recipe(Recipe(**{**recipe_data(), "threads": 200}), editor)
    assert seen == [len(os.sched_getaffinity(0)) if expected == "cpus" else expected]
    assert torch.get_num_threads() == before


def test_words_are_checked_before_an_inversion_runs(editor, monkeypatch, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    monkeypatch.setattr(editor, "invert", no_compute)
    monkeypatch.setattr(editor, "cache_source", no_compute)
    edit = {"prompt": "a dog", "blend": {"source_words": ["zebra"], "edit_words": ["dog"]}}
    recipe = parse(recipe_data(seed=None, edits=[edit], image={"path": "in.png", "sha256": file_digest(tmp_path / "in.png")},
                               inversion={"method": "ddim"}, source="a cat"))
    with pytest.raises(ValueError, match="'zebra' is not in the prompt"):
        run_recipe(recipe, editor, base_dir=tmp_path)
    with pytest.raises(ValueError, match="'zebra' is not in the prompt"):
        run_recipe(parse(recipe_data(edits=[edit], source="a cat", cached_source=True)), editor)


def test_a_nan_result_is_a_runtime_error(editor, monkeypatch):
    from prompt2prompt.engine import send

    monkeypatch.setattr(send, "pipeline_images", lambda *args, **kwargs: np.full((2, 8, 8, 3), np.nan))
    with pytest.raises(RuntimeError, match="^the result has NaN/inf values"):
        run_recipe(parse(recipe_data()), editor)


def test_pil_images_are_those_of_the_editor(editor):
    """run_recipe checks float images, then converts them as diffusers' own "pil" output does."""
    recipe = parse(recipe_data(threads=None))
    replayed = run_recipe(recipe, editor).images
    direct = editor.edit(recipe.source, [p2p.Edit("a dog riding a bike")], num_inference_steps=2, seed=1).images
    assert all(isinstance(image, Image.Image) for image in replayed)
    assert [np.asarray(a).tolist() for a in replayed] == [np.asarray(b).tolist() for b in direct]
    assert isinstance(run_recipe(recipe, editor, output_type="np").images, np.ndarray)


def test_a_recipe_is_prepared_once_and_sent_as_built(editor, monkeypatch, tmp_path):
    """run_recipe is prepare_recipe, then Editor.run of that very run; an inverted image's recipe too."""
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    image = {"path": "in.png", "sha256": file_digest(tmp_path / "in.png")}
    cases = [parse(recipe_data(threads=None)),
             parse(recipe_data(threads=None, seed=None, image=image, inversion={"method": "direct"}))]
    prepare, run = editor.prepare, editor.run
    prepared, sent = [], []

    def counted_prepare(*args, **kwargs):
        prepared.append(prepare(*args, **kwargs))
        return prepared[-1]

    def counted_run(built, **kwargs):
        sent.append(built)
        return run(built, **kwargs)

    monkeypatch.setattr(editor, "prepare", counted_prepare)
    monkeypatch.setattr(editor, "run", counted_run)
    for recipe in cases:
        prepared.clear()
        sent.clear()
        replayed = run_recipe(recipe, editor, base_dir=tmp_path, output_type="np").images
        assert len(prepared) == len(sent) == 1 and sent[0] is prepared[0]
        with replaying(recipe, editor):
            again = run(prepare_recipe(recipe, editor, base_dir=tmp_path), output_type="np").images
        assert np.array_equal(replayed, again)


def test_replaying_gives_the_scheduler_and_threads_back(editor):
    before = editor.pipe.scheduler, torch.get_num_threads()
    recipe = parse(recipe_data(scheduler={"_class_name": "EulerDiscreteScheduler"}, threads=1))
    with pytest.raises(KeyError), replaying(recipe, editor):
        assert type(editor.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert editor.pipe.device.type != "cpu" or torch.get_num_threads() == 1
        raise KeyError("a failing block")
    assert (editor.pipe.scheduler, torch.get_num_threads()) == before


def test_a_recipe_of_another_model_family_is_refused_first(editor):
    recipe = parse(recipe_data(family="flux", max_sequence_length=512,
                               scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(RecipeError, match="^this recipe was made on a flux model; 'demo' loaded as a unet one"):
        run_recipe(recipe, editor)


@pytest.mark.parametrize("images, bad", [
    (np.full((2, 8, 8, 3), 0.5, dtype=np.float32), False),
    (np.array([[[0.5, np.inf, 0.0]]]), True),
    (torch.full((1, 3, 8, 8), float("nan")), True),
    (torch.zeros(1, 4, 8, 8), False),
    ([Image.new("RGB", (8, 8), (0, 0, 1))], False),
    ([Image.new("RGB", (8, 8), (9, 9, 9)), Image.new("RGB", (8, 8))], True),  # black: what NaN becomes in a PNG
    (np.zeros((2, 8, 8, 3), dtype=np.uint8), False),
])
def test_check_finite_images(images, bad):
    if bad:
        with pytest.raises(RuntimeError, match="NaN/inf"):
            check_finite_images(images)
    else:
        check_finite_images(images)


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_pngs_get_the_mode_the_umask_gives(tmp_path, umask_022):
    recipe = parse(recipe_data())
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", recipe)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_recipe(path) == recipe


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "big.bin").write_bytes(data)
    assert file_digest(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()


def test_a_decompression_bomb_png_is_a_recipe_error(tmp_path, monkeypatch):
    from PIL import Image

    from prompt2prompt.recipe import RecipeError, read_recipe

    path = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64x64 is then far past twice the limit: a "bomb"
    with pytest.raises(RecipeError, match="cannot read"):
        read_recipe(path)


@pytest.mark.parametrize("kind", ["text", "ztxt"])
def test_a_png_with_oversized_metadata_is_a_recipe_error_in_our_words(tmp_path, kind):
    from test_images import METADATA_BOMBS, metadata_bomb_png

    path = tmp_path / "meta.png"
    path.write_bytes(metadata_bomb_png(kind))
    with pytest.raises(RecipeError) as caught:
        read_recipe(path)
    assert str(caught.value) == (f"cannot read '{path}' as a PNG: it has metadata too large to read safely "
                                 f"({METADATA_BOMBS[kind]}), and p2p's recipes take a few KiB")


def test_input_files_that_never_end_or_are_huge_are_refused_before_reading(tmp_path, monkeypatch):
    import os

    from prompt2prompt.limits import MAX_INPUT_BYTES
    from prompt2prompt.recipe import file_digest

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(MAX_INPUT_BYTES + 1)  # sparse: no disk used
    for path, message in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (huge, "MiB")):
        with pytest.raises(ValueError, match=message):
            file_digest(path)
    monkeypatch.setenv("P2P_ALLOW_LARGE", "1")
    small = tmp_path / "small.png"
    small.write_bytes(b"x")
    assert len(file_digest(small)) == 64


def test_a_png_just_over_pillows_pixel_limit_is_a_one_line_recipe_error(tmp_path, recwarn):
    from PIL import Image

    from prompt2prompt.recipe import RecipeError, read_recipe

    path = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(path)  # 100 M pixels: Pillow only warns below twice its 89 M limit
    with pytest.raises(RecipeError, match="cannot read") as caught:
        read_recipe(path)
    assert "\n" not in str(caught.value)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_replaying_a_pipe_is_refused_without_reading_it(tmp_path):
    import os

    from prompt2prompt.recipe import RecipeError, read_recipe

    os.mkfifo(tmp_path / "fifo.png")
    for path in (tmp_path / "fifo.png", "/dev/zero", tmp_path):
        with pytest.raises(RecipeError, match="not a regular file"):
            read_recipe(path)


def test_an_input_image_that_is_a_folder_is_named_as_such(editor, tmp_path):
    (tmp_path / "in.png").mkdir()  # a folder where the recipe's picture should be
    recipe = parse(recipe_data(seed=None, image={"path": "in.png", "sha256": SHA}, inversion={"method": "ddim"}))
    with pytest.raises(recipes.RecipeError, match="'.*in.png' is not a regular file"):
        run_recipe(recipe, editor, base_dir=tmp_path)
    (tmp_path / "in.png").rmdir()
    with pytest.raises(recipes.RecipeError, match="is missing"):
        run_recipe(recipe, editor, base_dir=tmp_path)


def test_an_integer_of_thousands_of_digits_gives_our_message_not_pythons():
    with pytest.raises(recipes.RecipeError) as caught:
        parse('{"format": 1, "seed": ' + "9" * 5000 + "}")
    assert "4300 digits" in str(caught.value) and "set_int_max_str_digits" not in str(caught.value)


@pytest.mark.parametrize(
    "source, spec, label",
    [
        ("a big red circle", {"prompt": "a big purple circle"}, "red -> purple"),
        ("a cat riding a bicycle", {"prompt": "a big dog riding a bicycle"}, "cat -> big dog"),
        ("a house on a mountain", {"prompt": "a house on a mountain at winter"}, "+ at winter"),
        ("a fluffy teddy bear", {"prompt": "a teddy bear"}, "- fluffy"),
        ("a red circle", {"prompt": "a red circle", "weights": [["red", 2.0], ["circle", 2.0]]}, "reweight red, circle x2"),
        ("a cat riding a red bicycle", {"prompt": "a dog riding a red bicycle", "weights": [[4, 1.5]],
                                        "blend": {"source_words": ["cat"], "edit_words": ["dog"]}},
         "cat -> dog, reweight red x1.5, local blend"),
        ("a red circle", {"prompt": "a red circle", "weights": [[-1, -2.0], [9, 3.0]]}, "reweight circle x -2, word 9 x3"),
        ("a red circle", {"prompt": "a red circle"}, ""),
    ],
)
def test_edit_labels_name_the_edited_words(source, spec, label):
    assert edit_label(source, spec) == label


def test_pngs_carry_automatic1111_parameters_that_pil_reads_back(tmp_path):
    recipe = Recipe("a cat", [{"prompt": "a dog"}], None, 30, 7.5, "/models/My Model.safetensors",
                    scheduler={"_class_name": "EulerAncestralDiscreteScheduler"}, image_index=1,
                    image={"path": "in.png", "sha256": SHA})
    save_png(Image.new("RGB", (8, 8)), tmp_path / "edit-1.png", recipe)
    with Image.open(tmp_path / "edit-1.png") as image:
        # No seed (an inverted image has none), the checkpoint's name without its folder, no negative prompt.
        assert image.text["parameters"] == "a dog\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Size: 8x8, Model: My Model"
        assert Recipe.from_json(image.text["prompt2prompt"]) == recipe
