"""SD3, Flux, Chroma, PixArt-Σ, Qwen-Image, FLUX.2 klein, FLUX.2 dev and Z-Image through the batch runner and the web app (the browser tests cover its page)."""

import json

import numpy as np
import pytest
from conftest import DTYPE_NAME, TORCH_DEVICE
from PIL import Image

from prompt2prompt.batch import INDEX, load_manifest, run_batch
from prompt2prompt.recipe import read_recipe, run_recipe
from prompt2prompt.engine import load_editor

ON_DEVICE = dict(device=str(TORCH_DEVICE), dtype=DTYPE_NAME)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_flux_batch_runs_each_job_and_records_its_family(tmp_path, tiny_flux_dir):
    base = {"model": str(tiny_flux_dir), "num_inference_steps": 2, "height": 32, "width": 32,
            "max_sequence_length": 16, "seed": 3}
    lines = [
        {**base, "source": "a cat riding a bicycle", "edits": ["a dog riding a bicycle"]},
        # over the 16 T5 tokens of these jobs: only the model can refuse it, at run time
        {**base, "source": "a cat riding a bicycle", "edits": ["a dog riding a bicycle" + " very" * 20]},
        {**base, "source": "a red car", "edits": [{"prompt": "a red car", "weights": {"red": -1.0}}]},
    ]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = load_manifest(manifest_path)
    summary = run_batch(manifest, tmp_path / "out", workers=0, batch_size=3, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 1)
    rows = {row["line"]: row for row in map(json.loads, (tmp_path / "out" / INDEX).read_text().splitlines())}
    assert "tokens long" in rows[2]["error"]
    png = tmp_path / "out" / "jobs" / manifest.jobs[0].id / "edit-1.png"
    recipe = read_recipe(png)
    assert (recipe.family, recipe.max_sequence_length, recipe.guidance_scale) == ("flux", 16, 3.5)
    editor, _ = load_editor(str(tiny_flux_dir), **ON_DEVICE)
    assert np.array_equal(pixels(png), np.asarray(run_recipe(recipe, editor).images[1]))


def test_the_web_apps_run_edits_an_sd3_model(tmp_path, tiny_sd3_dir):
    from prompt2prompt import webapp

    editors = webapp.Editors([str(tiny_sd3_dir)], str(TORCH_DEVICE), DTYPE_NAME)
    form = webapp.Form(model=str(tiny_sd3_dir), source="a [cat->dog] riding a bicycle", seed=5, steps=2, guidance=7.0,
                       image=None, method="direct", count=0)
    gallery, paths, heatmaps, seed, status = webapp.run_form(editors, tmp_path, 10 * 2**20, form)
    assert seed == 5 and len(gallery) == 2 and [len(maps) for _, maps in heatmaps] == [5, 5]  # one map per word
    recipe = read_recipe(paths[1])
    assert (recipe.family, recipe.cached_source) == ("sd3", True)


def test_the_web_app_reuses_an_sd3_source_and_a_flux_inversion(tmp_path, tiny_sd3_dir, tiny_flux_dir):
    from prompt2prompt import webapp

    def run(model, source: str, **values):
        form = webapp.Form(model=str(model), source=source, steps=2, method="direct", count=0, **values)
        return webapp.run_form(editors, tmp_path, 10 * 2**20, form)

    editors = webapp.Editors([str(tiny_sd3_dir), str(tiny_flux_dir)], str(TORCH_DEVICE), DTYPE_NAME)
    first = run(tiny_sd3_dir, "a [cat->dog] riding a bicycle", seed=5, guidance=7.0, image=None)
    second = run(tiny_sd3_dir, "a [cat->fox] riding a bicycle", seed=5, guidance=7.0, image=None)
    assert "source reused" not in first[4] and "source reused" in second[4]
    assert np.array_equal(pixels(first[1][0]), pixels(second[1][0]))  # the same source image, not recomputed

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    hits = editors.sources.hits
    run(tiny_flux_dir, "a [cat->dog] riding a bicycle", seed=None, guidance=3.5, image=str(photo))
    again = run(tiny_flux_dir, "a [cat->fox] riding a bicycle", seed=None, guidance=3.5, image=str(photo))
    assert editors.sources.hits == hits + 2 and "source reused" in again[4]  # the inversion, then the source


def test_flux_jobs_share_one_forward_batch(tmp_path, tiny_flux_dir, monkeypatch):
    from prompt2prompt.engine import send

    groups = []
    run_group = send.run_group

    def recording(pipe, family, runs, *args):
        groups.append(len(runs))
        return run_group(pipe, family, runs, *args)

    monkeypatch.setattr(send, "run_group", recording)
    base = {"model": str(tiny_flux_dir), "num_inference_steps": 2, "height": 32, "width": 32,
            "max_sequence_length": 16, "seed": 3}
    lines = [{**base, "source": "a cat riding a bicycle", "edits": [edit]}
             for edit in ("a dog riding a bicycle", "a fox riding a bicycle", "a black cat riding a bicycle")]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = load_manifest(manifest_path)
    summary = run_batch(manifest, tmp_path / "out", workers=0, batch_size=3, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (3, 0) and groups == [3]
    editor, _ = load_editor(str(tiny_flux_dir), **ON_DEVICE)
    for job in manifest.jobs:  # each job's images, made in the shared batch, are its own replayed alone
        png = tmp_path / "out" / "jobs" / job.id / "edit-1.png"
        assert np.array_equal(pixels(png), np.asarray(run_recipe(read_recipe(png), editor).images[1]))


@pytest.mark.parametrize("model, family, guidance, maps", [("tiny_chroma_dir", "chroma", 3.0, 5), ("tiny_pixart_dir", "pixart", 4.5, 5),
                                                         ("tiny_qwenimage_dir", "qwenimage", 4.0, 5),
                                                         ("tiny_flux2_klein_dir", "flux2-klein", 4.0, 5),
                                                         ("tiny_flux2_dev_dir", "flux2-dev", 4.0, 5),
                                                         ("tiny_zimage_dir", "zimage", 5.0, 5)])
def test_the_web_app_and_the_batch_runner_edit_the_newer_families(request, tmp_path, monkeypatch, model, family,
                                                                   guidance, maps):
    from prompt2prompt import webapp

    folder = str(request.getfixturevalue(model))
    if family == "zimage":
        from prompt2prompt.families.zimage import ZImageFamily

        # the web app runs at the model's size, and ZImagePipeline's is 1024 px whatever its VAE: 65536 tokens and
        # ten minutes on the tiny model's factor-2 VAE
        monkeypatch.setattr(ZImageFamily, "native_size", lambda self: 32)
    app = webapp.build_app([folder], out_dir=tmp_path / "web", device=str(TORCH_DEVICE), dtype=DTYPE_NAME)
    assert app is not None  # the form starts at the model's defaults, whatever inversions it has (PixArt: none)
    editors = webapp.Editors([folder], str(TORCH_DEVICE), DTYPE_NAME)
    form = webapp.Form(model=folder, source="a [cat->dog] riding a bicycle", seed=5, steps=2, guidance=guidance,
                       image=None, method=None, count=0)
    gallery, paths, heatmaps, seed, _ = webapp.run_form(editors, tmp_path / "web", 10 * 2**20, form)
    assert seed == 5 and len(gallery) == 2 and read_recipe(paths[1]).family == family
    assert [len(shown) for _, shown in heatmaps] == [maps, maps]  # a gallery per prompt, a map per word
    # Qwen-Image pads to the longest prompt; FLUX.2 klein's chat template takes 16 tokens of its own, dev's (with its
    # system message) 32; Z-Image's bounds its encoder's input (template included), its captions padded to 32 inside
    text = {"qwenimage": {}, "flux2-klein": {"max_sequence_length": 32},
            "flux2-dev": {"max_sequence_length": 48},
            "zimage": {"max_sequence_length": 64}}.get(family, {"max_sequence_length": 16})
    lines = [{"model": folder, "source": "a cat riding a bicycle", "edits": ["a dog riding a bicycle"], "seed": i,
              "num_inference_steps": 2, "height": 32, "width": 32, **text} for i in range(2)]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(load_manifest(manifest_path), tmp_path / "out", workers=0, batch_size=2, progress=False,
                        **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 0)
    rows = list(map(json.loads, (tmp_path / "out" / INDEX).read_text().splitlines()))
    assert [row["batch"] for row in rows] == [2, 2]  # both jobs in one forward batch
