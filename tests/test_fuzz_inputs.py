"""Property tests: crafted recipes and manifest lines give a valid Recipe or Job, or one clean ValueError, fast.

Recipes come from PNGs anyone can make, and manifests from anyone's scripts: whatever their JSON holds (wrong
types, missing or extra keys, huge numbers, NaN, negative numbers, strings), validation must answer with a
`RecipeError` or a `ManifestError` (both ValueErrors) of one line, never another exception, within a time bound.
Validation only: no model loads here.
"""

import dataclasses
import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prompt2prompt.batch import Job, Manifest, ManifestError, load_manifest, parse_job
from prompt2prompt.edits import LocalBlend, edit_from_dict
from prompt2prompt.recipe import EDIT_FIELDS, INVERSION_OPTIONS, Recipe, RecipeError, build_edits, check_edits, check_inversion

BLEND_FIELDS = [option.name for option in dataclasses.fields(LocalBlend)]
FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], database=None)

# Values at the edges that random generation rarely hits.
EDGES = st.sampled_from([
    0, -1, 1, 7, 8, 33, 2**31, 2**63, -(2**63), 10**400, 1e39, -1e39, 1e-300, 0.5, 1.5, float("nan"), float("inf"),
    float("-inf"), "", " ", "\n", "a\n", "null-text", "crop", "DDIMScheduler", "float16", "../x", "~nobody/x", "a\0b",
    "/", True, False, None, [], {}, [0.1, 0.9], [0.9, 0.1], [["cat", 2]], [[1, 1e39]], {"default": 0.8},
])
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12)
           | EDGES)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
WORDS = st.sampled_from(["cat", "dog", "bike", 1, 2, -1, 10**30]) | SCALARS
WINDOWS = st.floats() | st.lists(st.floats(min_value=-0.5, max_value=1.5), min_size=2, max_size=2) | JSON


@st.composite
def edit_specs(draw):
    """Edits in the forms' shape, with random values: they reach Edit's and LocalBlend's own checks."""
    spec = {}
    for name in draw(st.lists(st.sampled_from([*EDIT_FIELDS, "colour"]), unique=True, max_size=7)):
        spec[name] = draw({
            "prompt": st.sampled_from(["a dog riding a bike", "", " "]) | SCALARS,
            "mode": st.sampled_from(["auto", "replace", "refine", "swap"]) | SCALARS,
            "cross_steps": WINDOWS | st.dictionaries(st.sampled_from(["default", "dog", "1"]), WINDOWS, max_size=3),
            "self_steps": WINDOWS,
            "weights": st.lists(st.lists(WORDS, min_size=2, max_size=2) | JSON, max_size=3)
                       | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3) | JSON,
            "blend": st.fixed_dictionaries({"source_words": WORDS | st.lists(WORDS, max_size=3),
                                            "edit_words": WORDS | st.lists(WORDS, max_size=3)},
                                           optional={"threshold": SCALARS, "start": SCALARS, "exclude_source_words": JSON,
                                                     "bogus": JSON}) | JSON,
        }.get(name, JSON))
    return spec if draw(st.booleans()) else draw(st.sampled_from([spec, "a dog riding a bike", None, 3]))


def inversions():
    return st.sampled_from(["null-text", "direct", "magic"]) | st.dictionaries(
        st.sampled_from([*INVERSION_OPTIONS, "lr"]), SCALARS, max_size=4) | JSON


@FUZZ
@given(st.lists(edit_specs(), max_size=3) | JSON)
def test_crafted_edits_give_edits_or_one_recipe_error(edits):
    try:
        check_edits(edits)
    except RecipeError as error:
        assert "\n" not in str(error)
        return
    assert [edit_from_dict(spec).prompt for spec in edits]


@FUZZ
@given(st.dictionaries(st.text(max_size=8).filter(lambda name: name not in BLEND_FIELDS), JSON, min_size=1, max_size=3))
def test_a_blend_s_unknown_fields_are_named_as_every_object_s_are(extra):
    """Not Python's "LocalBlend.__init__() got an unexpected keyword argument"."""
    blend = {"source_words": ["cat"], "edit_words": ["dog"], **extra}
    with pytest.raises(RecipeError, match="^edit 1: blend has unknown fields .*; the fields are source_words, "):
        check_edits([{"prompt": "a dog", "blend": blend}])


@FUZZ
@given(inversions())
def test_crafted_inversions_give_options_or_one_recipe_error(spec):
    try:
        check_inversion(spec)
    except RecipeError as error:
        assert "\n" not in str(error)


RECIPE_FIELDS = {
    "source": SCALARS, "edits": st.lists(edit_specs(), max_size=3) | JSON, "seed": SCALARS,
    "num_inference_steps": SCALARS, "guidance_scale": SCALARS, "model": SCALARS, "revision": SCALARS,
    "scheduler": st.builds(lambda name, rest: {"_class_name": name, **rest}, st.sampled_from(["DDIMScheduler"]) | SCALARS,
                           st.dictionaries(st.sampled_from(["num_train_timesteps", "trained_betas", "beta_end"])
                                           | st.text(max_size=8), JSON, max_size=3)) | JSON,
    "negative_prompt": SCALARS, "height": SCALARS, "width": SCALARS, "dtype": SCALARS, "device": SCALARS,
    "threads": SCALARS, "kind": st.sampled_from(["edit", "attention"]) | SCALARS, "record_attention": SCALARS,
    "image": st.fixed_dictionaries({"path": SCALARS, "sha256": st.sampled_from(["0" * 64]) | SCALARS}) | JSON,
    "inversion": inversions(), "image_index": SCALARS, "cached_source": SCALARS, "package_version": SCALARS,
    "format": st.sampled_from([1]) | SCALARS, "bogus": JSON,
}
VALID_RECIPE = {
    "source": "a cat riding a bike", "edits": [{"prompt": "a dog riding a bike"}], "seed": 1, "num_inference_steps": 2,
    "guidance_scale": 7.5, "model": "demo", "format": 1,
}


@st.composite
def mutated(draw, valid: dict, fields: dict) -> dict:
    """`valid` with a few fields replaced by random values (from `fields`), removed, or added."""
    data = dict(valid)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4)):
        if draw(st.integers(0, 4)) == 0:
            data.pop(name, None)
        else:
            data[name] = draw(fields[name])
    return data


def recipe_texts():
    return mutated(VALID_RECIPE, RECIPE_FIELDS).map(json.dumps)


def assert_clean(error: ValueError) -> None:
    assert str(error) and "Traceback" not in str(error)


@FUZZ
@given(recipe_texts())
def test_crafted_recipes_give_a_recipe_or_one_recipe_error(text):
    try:
        recipe = Recipe.from_json(text)
    except RecipeError as error:
        assert "\n" not in str(error)
        assert_clean(error)
        return
    assert Recipe.from_json(recipe.to_json()) == recipe
    build_edits(recipe)  # what replay builds first: valid recipes build


@FUZZ
@given(st.text(max_size=200) | JSON.map(json.dumps))
def test_any_text_gives_a_recipe_or_one_recipe_error(text):
    try:
        Recipe.from_json(text)
    except RecipeError as error:
        assert "\n" not in str(error)


JOB_FIELDS = {
    "id": st.sampled_from(["job-1", "a\n", "../x", "x" * 101]) | SCALARS, "model": SCALARS,
    "source": SCALARS, "image": st.sampled_from(["photo.png", "missing.png", "/", "not-an-image.txt"]) | SCALARS,
    "edits": st.lists(edit_specs(), max_size=3) | JSON, "seed": SCALARS, "num_inference_steps": SCALARS,
    "guidance_scale": SCALARS, "negative_prompt": SCALARS, "height": SCALARS, "width": SCALARS,
    "inversion": inversions(), "steps": SCALARS,
}
VALID_JOB = {"source": "a cat riding a bike", "edits": ["a dog riding a bike"], "seed": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    base = tmp_path_factory.mktemp("manifest")
    Image.new("RGB", (16, 16), "white").save(base / "photo.png")
    (base / "not-an-image.txt").write_text("text")
    return base


def job_lines():
    """Mostly mutated job lines, sometimes any JSON at all."""
    return st.one_of(mutated(VALID_JOB, JOB_FIELDS), JSON)


@FUZZ
@given(job_lines())
def test_crafted_manifest_lines_give_a_job_or_one_value_error(folder, line):
    try:
        job = parse_job(line, line=1, base=folder, model="demo")
    except ValueError as error:
        assert "\n" not in str(error)
        assert_clean(error)
        return
    assert isinstance(job, Job) and "\n" not in job.id
    for spec in job.edits:  # every field, but windows it does not give: those are the model's, filled later
        assert set(EDIT_FIELDS) - {"cross_steps", "self_steps"} <= set(spec) <= set(EDIT_FIELDS)


@FUZZ
@given(st.lists(job_lines().map(json.dumps) | st.text(max_size=40), min_size=1, max_size=4))
def test_crafted_manifests_give_jobs_or_one_manifest_error(folder, lines):
    path = folder / "fuzz.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8")
    try:
        manifest = load_manifest(path)
    except ManifestError as error:
        message = str(error).splitlines()
        assert message[0].endswith("to run the rest):") or len(message) == 1
        return
    assert isinstance(manifest, Manifest) and manifest.jobs
