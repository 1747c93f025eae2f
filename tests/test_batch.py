"""Batch jobs: manifest validation, a 20-job run, kill -9 and resume, failures, out-of-memory retries, Ray."""

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DTYPE_NAME, TORCH_DEVICE, tolerance
from PIL import Image
from typer.testing import CliRunner

from prompt2prompt import batch
from prompt2prompt.batch import INDEX, ManifestError, Worker, load_manifest, run_batch
from prompt2prompt.cli import app
from prompt2prompt.recipe import read_recipe

ON_DEVICE = dict(device=str(TORCH_DEVICE), dtype=DTYPE_NAME)  # P2P_TEST_DEVICE / P2P_TEST_DTYPE

STEPS = 2  # 32 px images on the tiny model: a job takes a fraction of a second
# An edit that only the model can refuse (its prompt is over CLIP's 77 tokens): a failure at run time, not at load.
LONG_EDIT = {"prompt": "a dog riding a bike " + "very " * 80}


def job_lines(count: int, **extra) -> list[dict]:
    """Varied jobs: word swaps, refinements, reweighting, local blends and two-edit jobs."""
    animals = ["cat", "dog", "fox", "owl", "bear"]
    lines = []
    for i in range(count):
        a, b = animals[i % 5], animals[(i + 1) % 5]
        edits: list = [f"a {b} riding a bike"]
        if i % 3 == 1:
            edits.append({"prompt": f"a {a} riding a red bike", "cross_steps": {"default": 0.8, "red": [0, 0.5]}})
        if i % 4 == 2:
            edits = [{"prompt": f"a {b} riding a bike", "blend": {"source_words": [a], "edit_words": [b]},
                      "weights": {"bike": 1.5}}]
        lines.append({"source": f"a {a} riding a bike", "edits": edits, "seed": 100 + i,
                      "num_inference_steps": STEPS, **extra})
    return lines


def write_manifest(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def index_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / INDEX).read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # a truncated PNG fails here
        return np.asarray(image.convert("RGB"))


def assert_complete(out: Path, jobs) -> None:
    """Every job done exactly once in the index, and every PNG of it whole and carrying its job's recipe."""
    rows = index_rows(out)
    assert sorted(row["id"] for row in rows) == sorted(job.id for job in jobs)
    assert {row["status"] for row in rows} == {"done"}
    for job in jobs:
        folder = out / "jobs" / job.id
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(["job.json", "source.png", "grid.png"]
                               + [f"edit-{i}.png" for i in range(1, len(job.edits) + 1)])
        for index, name in enumerate(["source.png"] + [f"edit-{i}.png" for i in range(1, len(job.edits) + 1)]):
            assert pixels(folder / name).shape == (32, 32, 3)
            recipe = read_recipe(folder / name)
            # the tiny model has no defaults file: windows a job leaves out are the paper's, written into the recipe
            edits = [{"cross_steps": 0.8, "self_steps": 0.4, **edit} for edit in job.edits]
            for edit in edits:  # and so is a blend's threshold
                edit["blend"] = edit["blend"] and {"threshold": 0.3, **edit["blend"]}
            assert (recipe.source, recipe.edits, recipe.seed, recipe.image_index) == (job.source, edits, job.seed, index)
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())


@pytest.fixture(autouse=True)
def one_thread():
    """Jobs run in this process on one thread, as in each worker process: the outputs then match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest20(tiny_sd_dir, tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("manifest") / "jobs.jsonl", job_lines(20, model=str(tiny_sd_dir)))


@pytest.fixture(scope="module")
def plain_run(manifest20, tmp_path_factory):
    """The 20 jobs, in this process, 4 jobs per group."""
    out = tmp_path_factory.mktemp("plain")
    jobs = load_manifest(manifest20)
    threads = torch.get_num_threads()
    summary = run_batch(jobs, out, workers=0, threads=1, batch_size=4, progress=False, **ON_DEVICE)
    torch.set_num_threads(threads)  # a module fixture runs outside one_thread
    return jobs, out, summary


# ------------------------------------------------------------------------------------------------ the manifest


def test_every_malformed_line_is_reported_with_its_number(tmp_path, tiny_sd_dir):
    (tmp_path / "photo.png").write_bytes(b"not a png")
    good = {"source": "a cat riding a bike", "edits": ["a dog riding a bike"], "model": str(tiny_sd_dir)}
    path = write_manifest(tmp_path / "m.jsonl", [
        good,                                                           # 1
        "{not json",                                                    # 2
        {**good, "steps": 20},                                          # 3
        {**good, "edits": []},                                          # 4
        {**good, "edits": [{"prompt": "a dog", "self_steps": 1.5}]},    # 5
        "",                                                             # 6: blank lines are allowed
        {**good, "seed": -1},                                           # 7
        {**good, "image": "photo.png"},                                 # 8
        {**good, "image": "missing.png"},                               # 9
        {**good, "inversion": "ddim"},                                  # 10
        {**good, "id": "../escape"},                                    # 11
        {**good, "edits": [{"prompt": "a dog", "blend": {"source_words": ["cat"]}}]},  # 12
        {**good, "seed": 3},                                            # 13
        {**good, "seed": 3, "edits": ["a dog riding a bike"]},          # 14: the same job as 13
        [1, 2],                                                         # 15
    ])
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    expected = {
        2: "not valid JSON", 3: "'steps' (did you mean 'num_inference_steps'?)", 4: "the job has no edits: give",
        5: "self_steps", 7: "seed must be an integer from 0 to 2**63 - 1", 8: "cannot be read as an image",
        9: "'missing.png' is not a file", 10: "'inversion' needs an 'image'", 11: "id must be",
        12: "source_words and edit_words", 14: "already line 13's", 15: "a job is a JSON object, not list",
    }
    lines = message.splitlines()
    assert lines[0].startswith("12 invalid line(s)") and "--skip-invalid" in lines[0]
    assert len(lines) == 1 + len(expected)
    for (number, fragment), line in zip(expected.items(), lines[1:]):
        assert line.startswith(f"{path}:{number}: ") and fragment in line, line

    manifest = load_manifest(path, skip_invalid=True)
    assert [job.line for job in manifest.jobs] == [1, 13]
    assert len(manifest.errors) == len(expected)


def test_job_ids_are_stable_hashes_of_the_content(tmp_path, tiny_sd_dir):
    model = str(tiny_sd_dir)
    base = {"source": "a cat riding a bike", "model": model, "seed": 1}
    path = write_manifest(tmp_path / "m.jsonl", [
        {**base, "edits": ["a dog riding a bike"]},
        {**base, "seed": 2, "edits": ["a dog riding a bike"]},
        {**base, "edits": ["a dog riding a bike"], "num_inference_steps": 10},
        {**base, "id": "mine", "edits": ["a dog riding a bike"]},
    ])
    first = load_manifest(path).jobs
    ids = [job.id for job in first]
    assert len(set(ids)) == 4 and ids[3] == "mine" and all(len(i) == 16 for i in ids[:3])
    # Key order, a plain-string edit vs. its full form, and defaults spelled out do not change the content.
    same = {"edits": [{"prompt": "a dog riding a bike", "mode": "auto", "cross_steps": 0.8, "self_steps": 0.4}],
            "num_inference_steps": 50, "guidance_scale": 7.5, "seed": 1, "model": model, "source": "a cat riding a bike"}
    again = load_manifest(write_manifest(tmp_path / "again.jsonl", [same])).jobs
    assert again[0].id == ids[0]
    # Without a seed, one is derived from the content: stable, and different per job.
    unseeded = [{"source": "a cat riding a bike", "edits": [f"a {a} riding a bike"], "model": model} for a in ("dog", "fox")]
    seeds = [job.seed for job in load_manifest(write_manifest(tmp_path / "u.jsonl", unseeded)).jobs]
    assert seeds == [job.seed for job in load_manifest(tmp_path / "u.jsonl").jobs] and seeds[0] != seeds[1]


def test_model_paths_count_from_the_manifest_or_the_current_folder(tmp_path, tiny_sd_dir, monkeypatch):
    import shutil

    shutil.copytree(tiny_sd_dir, tmp_path / "models" / "tiny")
    (tmp_path / "work").mkdir()
    line = {"source": "a cat", "edits": ["a dog"]}
    path = write_manifest(tmp_path / "models" / "m.jsonl", [{**line, "model": "tiny"}, {**line, "seed": 1}])
    monkeypatch.chdir(tmp_path)
    jobs = load_manifest(path, model="models/tiny").jobs  # --model: from the current folder
    assert [job.model for job in jobs] == [str((tmp_path / "models" / "tiny").resolve())] * 2
    with pytest.raises(ManifestError, match="--model: model './work/tiny' does not exist"):
        load_manifest(path, model="./work/tiny")  # ("work/tiny" would be a hub id)


def test_cli_reports_bad_lines_and_exits_2(tmp_path, tiny_sd_dir):
    path = write_manifest(tmp_path / "m.jsonl", [{"source": "a cat", "edits": ["a dog"], "guidance": 3}])
    result = CliRunner().invoke(app, ["batch", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{path}:1: unknown job field 'guidance' (did you mean 'guidance_scale'?)" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ running


def test_twenty_jobs_run_to_folders_with_recipes_and_an_index(plain_run):
    jobs, out, summary = plain_run
    assert (summary.done, summary.failed, summary.skipped) == (20, 0, 0)
    assert_complete(out, jobs.jobs)
    rows = {row["id"]: row for row in index_rows(out)}
    for job in jobs.jobs:
        row = rows[job.id]
        assert row["line"] == job.line and row["batch"] == 4 and row["seconds"] > 0
        assert row["paths"] == [f"jobs/{job.id}/source.png"] + [f"jobs/{job.id}/edit-{i}.png" for i in range(1, len(job.edits) + 1)]
        assert json.loads((out / "jobs" / job.id / "job.json").read_text()) == row
    # Edits differ from their source: the images are real generations, not copies.
    first = jobs.jobs[0]
    assert not np.array_equal(pixels(out / "jobs" / first.id / "source.png"), pixels(out / "jobs" / first.id / "edit-1.png"))


def test_a_run_can_be_browsed_each_job_with_its_prompt_edits_and_labelled_grid(plain_run):
    jobs, out, _ = plain_run
    page = (out / "index.html").read_text()
    rows = [tuple(map(html.unescape, row)) for row in
            re.findall(r'<tr><td>(\d+)</td><td><code>(\w+)</code></td><td class="prompt">(.*?)</td><td><ul>(.*?)</ul></td>',
                       page)]
    assert [(int(line), job_id) for line, job_id, _, _ in rows] == [(job.line, job.id) for job in jobs.jobs]
    for (_, job_id, source, _edits), job in zip(rows, jobs.jobs):
        assert source == job.source and f'<img src="jobs/{job_id}/grid.png"' in page
        grid = Image.open(out / "jobs" / job_id / "grid.png")
        assert grid.width >= 32 * (1 + len(job.edits)) and grid.height > 32  # every image, with a label under it
        assert read_recipe(out / "jobs" / job_id / "grid.png").source == job.source
    # Each edit is named by what it changes, as p2p edit's grid names it.
    assert rows[0][3] == "<li>cat -> dog</li>" and "<li>+ red</li>" in rows[1][3]
    assert "<li>fox -> owl, reweight bike x1.5, local blend</li>" in rows[2][3]


def test_a_finished_run_restarted_does_nothing(plain_run, monkeypatch):
    jobs, out, _ = plain_run
    monkeypatch.setattr(Worker, "run", lambda self, group: pytest.fail("a finished job ran again"))
    summary = run_batch(jobs, out, workers=0, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed, summary.skipped) == (0, 0, 20)
    assert len(index_rows(out)) == 20


def test_resume_repairs_every_state_a_kill_can_leave(plain_run, tmp_path, monkeypatch):
    """Stopped after a folder's rename but before its index line, mid-line, and mid-staging."""
    import shutil

    jobs, plain_out, _ = plain_run
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    lines = (out / INDEX).read_text().splitlines()
    (out / INDEX).write_text("\n".join(lines[:12]) + "\n" + lines[12][:40])  # 7 rows lost, one torn
    (out / ".staging" / "half-built").mkdir(parents=True)
    (out / ".staging" / "half-built" / "source.png").write_bytes(b"\x89PNG\r\n")
    monkeypatch.setattr(Worker, "run", lambda self, group: pytest.fail("a finished job ran again"))
    summary = run_batch(jobs, out, workers=0, progress=False, **ON_DEVICE)
    assert (summary.done, summary.skipped) == (0, 20)
    assert_complete(out, jobs.jobs)
    assert not (out / ".staging").exists()


def test_a_run_killed_with_sigkill_resumes_every_job_exactly_once(manifest20, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from prompt2prompt.cli import main; main()", "batch", str(manifest20),
               "--out", str(out), "--workers", "1", "--device", ON_DEVICE["device"], "--dtype", ON_DEVICE["dtype"]]
    stderr = open(tmp_path / "stderr.txt", "wb")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            index = out / INDEX
            if index.exists() and index.read_text().count('"done"') >= 3:
                break
            time.sleep(0.02)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        process.send_signal(signal.SIGKILL)  # the run's own process only: its workers must die with it
        process.wait()
        for _ in range(200):  # the pool worker notices its parent's death
            if not any(Path(f"/proc/{pid}").exists() for pid in children):
                break
            time.sleep(0.05)
        assert children and not any(Path(f"/proc/{pid}").exists() for pid in children), "orphaned workers"
        for _ in range(100):  # multiprocessing's resource tracker ends by itself once it has cleaned up
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    stderr.close()
    # The tracker cleans up the pool's semaphores, as it should, without a warning that reads like damage.
    assert "leaked semaphore" not in (tmp_path / "stderr.txt").read_text()
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "jobs").glob("*/*.png")}
    jobs = load_manifest(manifest20).jobs
    done_before = len({p.parent.name for p in finished})
    assert 3 <= done_before < 20, "the run was not killed mid-way"

    summary = run_batch(jobs, out, workers=0, progress=False, **ON_DEVICE)
    assert (summary.done, summary.skipped) == (20 - done_before, done_before)
    assert_complete(out, jobs)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == finished  # not redone


def test_jobs_sharing_settings_run_as_one_forward_batch(tmp_path, tiny_sd_dir):
    lines = job_lines(5, model=str(tiny_sd_dir))
    lines[3]["edits"] = [LONG_EDIT]  # too long for the text encoder: found by the model, at run time
    lines[4]["negative_prompt"] = "blurry"
    jobs = load_manifest(write_manifest(tmp_path / "m.jsonl", lines)).jobs
    worker = Worker(batch.WorkerConfig(**ON_DEVICE))
    editor, source = worker._editor(jobs[0].model)
    recipes = [worker._recipe(editor, source, job) for job in jobs]
    batches = []
    hook = editor.pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        together = batch.edit_together(editor, recipes)
    finally:
        hook.remove()
    prompts = [1 + len(job.edits) for job in jobs if job.line != 4]
    assert batches == [2 * sum(prompts)] * STEPS  # every UNet call holds all the good jobs, guided
    assert isinstance(together[3], ValueError) and "tokens long" in str(together[3])
    for recipe, images in zip(recipes, together):
        if recipe is not recipes[3]:
            alone = batch.run_recipe(recipe, editor, output_type="np").images
            np.testing.assert_allclose(images, alone, atol=tolerance())


def test_an_image_job_inverts_its_image_and_records_it(tmp_path, tiny_sd_dir):
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" / "cat.png")
    line = {"source": "a photo of a cat", "image": "photos/cat.png", "inversion": {"method": "direct"},
            "edits": ["a photo of a dog"], "num_inference_steps": STEPS, "model": str(tiny_sd_dir)}
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", [line, {**line, "inversion": "ddim"}]))
    summary = run_batch(manifest, tmp_path / "out", workers=0, batch_size=2, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 0)
    assert [row["batch"] for row in index_rows(tmp_path / "out")] == [1, 1]  # each image is inverted alone
    recipe = read_recipe(tmp_path / "out" / "jobs" / manifest.jobs[0].id / "edit-1.png")
    assert recipe.image["path"] == str((tmp_path / "photos" / "cat.png").resolve()) and recipe.seed is None
    assert recipe.inversion == {"method": "direct"}


def test_a_failing_job_is_recorded_and_the_run_goes_on(tmp_path, tiny_sd_dir):
    lines = job_lines(3, model=str(tiny_sd_dir))
    lines[1]["edits"] = [LONG_EDIT]
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", lines))
    out = tmp_path / "out"
    summary = run_batch(manifest, out, workers=0, batch_size=3, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 1)
    rows = {row["line"]: row for row in index_rows(out)}
    assert [rows[n]["status"] for n in (1, 2, 3)] == ["done", "failed", "done"]
    assert "tokens long" in rows[2]["error"] and rows[2]["paths"] == []
    assert not (out / "jobs" / manifest.jobs[1].id).exists()
    # A restart retries the failed job only.
    again = run_batch(manifest, out, workers=0, progress=False, **ON_DEVICE)
    assert (again.done, again.failed, again.skipped) == (0, 1, 2)
    index = batch.read_index(out)
    assert [index[job.id]["status"] for job in manifest.jobs] == ["done", "failed", "done"]
    assert len(index_rows(out)) == 3  # one row per job: the last attempt


def test_out_of_memory_halves_the_batch_once(tmp_path, tiny_sd_dir, monkeypatch):
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", job_lines(4, model=str(tiny_sd_dir))))
    real_forward = Worker._forward
    calls = []

    def forward(self, editor, recipes):
        calls.append(len(recipes))
        if len(recipes) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, editor, recipes)

    monkeypatch.setattr(Worker, "_forward", forward)
    summary = run_batch(manifest, tmp_path / "out", workers=0, batch_size=4, progress=False, **ON_DEVICE)
    assert summary.done == 4 and calls == [4, 2, 2]
    assert [row["batch"] for row in index_rows(tmp_path / "out")] == [2, 2, 2, 2]

    def always(self, editor, recipes):
        calls.append(len(recipes))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    calls.clear()
    monkeypatch.setattr(Worker, "_forward", always)
    summary = run_batch(manifest, tmp_path / "out2", workers=0, batch_size=4, progress=False, **ON_DEVICE)
    assert summary.failed == 4 and calls == [4, 2, 2]  # one retry, then recorded
    assert all(row["error"].startswith("OutOfMemoryError: CUDA out of memory") for row in index_rows(tmp_path / "out2"))


def test_images_with_nan_fail_their_job_only(tmp_path, tiny_sd_dir, monkeypatch):
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", job_lines(3, model=str(tiny_sd_dir))))
    real_forward = Worker._forward

    def forward(self, editor, recipes):
        results = real_forward(self, editor, recipes)
        results[1] = np.full_like(results[1], np.nan)  # what an fp16 VAE overflow gives
        return results

    monkeypatch.setattr(Worker, "_forward", forward)
    summary = run_batch(manifest, tmp_path / "out", workers=0, batch_size=3, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 1)
    rows = index_rows(tmp_path / "out")
    assert rows[1]["status"] == "failed" and rows[1]["error"].startswith("RuntimeError: the result has NaN/inf values")


def difference(source, edited, source_prompt, edit_prompt) -> float:
    """A stand-in for a CLIP score: how much the edit changed the image."""
    return float(np.abs(np.asarray(source, dtype=float) - np.asarray(edited, dtype=float)).mean())


def test_score_hook_is_recorded_and_filters_edits(tmp_path, tiny_sd_dir):
    lines = job_lines(2, model=str(tiny_sd_dir))
    lines[1]["edits"] = [lines[1]["source"], "a cat riding a bike"]  # the same prompt: an unchanged image
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", lines))
    out = tmp_path / "out"
    summary = run_batch(manifest, out, workers=0, score=difference, min_score=0.5, progress=False, **ON_DEVICE)
    assert summary.done == 2
    rows = index_rows(out)
    assert rows[0]["scores"][0] > 0.5 and rows[0]["paths"][1].endswith("edit-1.png")
    assert rows[1]["scores"][0] == 0.0 and rows[1]["scores"][1] > 0.5
    assert rows[1]["paths"] == [f"jobs/{manifest.jobs[1].id}/source.png", f"jobs/{manifest.jobs[1].id}/edit-2.png"]
    assert sorted(p.name for p in (out / "jobs" / manifest.jobs[1].id).glob("*.png")) == ["edit-2.png", "grid.png", "source.png"]
    assert read_recipe(out / rows[1]["paths"][1]).image_index == 2


@pytest.mark.ray
def test_a_local_ray_run_gives_the_plain_run_s_outputs(plain_run, tmp_path):
    import ray

    jobs, plain_out, _ = plain_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch(jobs, tmp_path / "ray", ray_address="auto", workers=2, threads=1, batch_size=4,
                            progress=False, **ON_DEVICE)
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (20, 0)
    assert_complete(tmp_path / "ray", jobs.jobs)
    workers = {row["worker"] for row in index_rows(tmp_path / "ray")}
    assert len(workers) == 2 and not workers & {row["worker"] for row in index_rows(plain_out)}
    for png in sorted(plain_out.glob("jobs/*/*.png")):
        twin = tmp_path / "ray" / png.relative_to(plain_out)
        assert np.array_equal(pixels(png), pixels(twin)), png.relative_to(plain_out)
        assert read_recipe(png) == read_recipe(twin)


# ------------------------------------------------------------------------------------------------ untrusted input


def test_manifest_settings_have_the_recipe_s_bounds(tmp_path, tiny_sd_dir):
    good = {"source": "a cat riding a bike", "edits": ["a dog riding a bike"], "model": str(tiny_sd_dir)}
    (tmp_path / "photo.png").write_bytes(b"")
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    path = write_manifest(tmp_path / "m.jsonl", [
        {**good, "num_inference_steps": 10**6},                                          # 1
        {**good, "height": 8192},                                                        # 2
        '{"source": "a cat", "edits": ["a dog"], "guidance_scale": NaN}',                # 3
        {**good, "guidance_scale": 1e308},                                               # 4
        {**good, "edits": ["a dog riding a bike"] * 65},                                 # 5
        {**good, "image": "photo.png", "inversion": {"num_inner_steps": 10**6}},         # 6
        {**good, "image": "photo.png", "inversion": {"early_stop_epsilon": -1}},         # 7
        {**good, "id": "job-1\n"},                                                       # 8
        {**good, "seed": 2**63},                                                         # 9
        '{"source": "a cat", "edits": ["a dog"], "seed": ' + "9" * 5000 + "}",           # 10
        "[" * 100_000,                                                                   # 11
        {**good, "model": "~nobody-here/model"},                                         # 12
    ])
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    expected = {
        1: "num_inference_steps must be an integer from 1 to 1000 (set P2P_ALLOW_LARGE=1 for more)",
        2: "height must be a positive multiple of 8 px up to 4096", 3: "guidance_scale must be a finite number",
        4: "guidance_scale must be a finite number from -100 to 100", 5: "edits must be a non-empty list of edits of at most 64",
        6: "inversion num_inner_steps must be an integer from 0 to 100", 7: "early_stop_epsilon must be a finite number >= 0",
        8: "id must be 1-100 letters", 9: "seed must be an integer from 0 to 2**63 - 1", 10: "an integer of more than 4300 digits, which no field takes",
        11: "not valid JSON (nested too deeply)", 12: "model '~nobody-here/model' is neither a usable path nor a hub id",
    }
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == len(expected)
    for (number, fragment), line in zip(expected.items(), lines):
        assert line.startswith(f"{path}:{number}: ") and fragment in line, line


def test_an_id_ending_in_a_newline_is_refused(tmp_path):
    line = {"source": "a cat", "edits": ["a dog"]}
    assert batch.parse_job({**line, "id": "job-1"}, line=1, base=tmp_path, model="demo").id == "job-1"
    for job_id in ("job-1\n", "job-1\n\n", "\njob-1", "x" * 101):
        with pytest.raises(ValueError, match="id must be 1-100 letters"):
            batch.parse_job({**line, "id": job_id}, line=1, base=tmp_path, model="demo")


def _four_jobs(tiny_sd_dir, monkeypatch) -> list[dict]:
    """Two valid jobs, one that overflows when prepared (as a weight beyond float16 would) and one with a word
    not in its prompt."""
    from prompt2prompt import Editor

    real_prepare = Editor.prepare

    def prepare(self, prompt, *args, **kwargs):
        if "overflowing" in prompt:
            raise OverflowError("the overflowing job's weight does not fit in float16")
        return real_prepare(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Editor, "prepare", prepare)
    lines = [{"source": f"a {a} riding a bike", "edits": [f"a {b} riding a bike"], "seed": i, "num_inference_steps": STEPS,
              "model": str(tiny_sd_dir)} for i, (a, b) in enumerate([("cat", "dog"), ("overflowing", "fox"),
                                                                     ("fox", "owl"), ("owl", "bear")])]
    lines[2]["edits"] = [LONG_EDIT]
    return lines


def _assert_own_outcomes(rows: dict, jobs, *, extra: dict | None = None) -> None:
    assert [rows[job.id]["status"] for job in jobs[:4]] == ["done", "failed", "failed", "done"]
    assert rows[jobs[1].id]["error"] == "OverflowError: the overflowing job's weight does not fit in float16"
    assert "tokens long" in rows[jobs[2].id]["error"]
    assert rows[jobs[0].id]["error"] is None and rows[jobs[3].id]["error"] is None
    for job_id, fragment in (extra or {}).items():
        assert rows[job_id]["status"] == "failed" and fragment in rows[job_id]["error"]


def test_a_job_that_overflows_fails_alone_in_its_forward_batch(tmp_path, tiny_sd_dir, monkeypatch):
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", _four_jobs(tiny_sd_dir, monkeypatch)))
    out = tmp_path / "out"
    summary = run_batch(manifest, out, workers=0, batch_size=4, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 2)
    rows = {row["id"]: row for row in index_rows(out)}
    _assert_own_outcomes(rows, manifest.jobs)
    assert [rows[job.id]["batch"] for job in manifest.jobs] == [4, 4, 4, 4]  # the valid two ran together
    again = run_batch(manifest, out, workers=0, batch_size=4, progress=False, **ON_DEVICE)  # every retry alike
    assert (again.done, again.failed, again.skipped) == (0, 2, 2)
    _assert_own_outcomes(batch.read_index(out), manifest.jobs)


def test_a_forward_batch_that_raises_runs_each_job_alone(tmp_path, tiny_sd_dir, monkeypatch):
    """An error of the whole forward batch (an overflow inside the UNet, say) is one job's: the others still finish."""
    from prompt2prompt import Editor

    lines = _four_jobs(tiny_sd_dir, monkeypatch) + [{"source": "a poisoned cat", "edits": ["a poisoned dog"], "seed": 9,
                                        "num_inference_steps": STEPS, "model": str(tiny_sd_dir)}]
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", lines))
    real_run = Editor.run

    def run(self, runs, **kwargs):
        if any("poisoned" in r.prompts[0] for r in (runs if isinstance(runs, list) else [runs])):
            raise OverflowError("the poisoned job overflows")
        return real_run(self, runs, **kwargs)

    monkeypatch.setattr(Editor, "run", run)
    out = tmp_path / "out"
    summary = run_batch(manifest, out, workers=0, batch_size=5, progress=False, **ON_DEVICE)
    assert (summary.done, summary.failed) == (2, 3)
    rows = {row["id"]: row for row in index_rows(out)}
    _assert_own_outcomes(rows, manifest.jobs, extra={manifest.jobs[4].id: "OverflowError: the poisoned job overflows"})
    assert {rows[job.id]["batch"] for job in manifest.jobs} == {1}  # each alone after the batch failed
    assert sorted(p.name for p in (out / "jobs").iterdir()) == sorted([manifest.jobs[0].id, manifest.jobs[3].id])


@pytest.mark.parametrize("obstacle, message", [
    ("jobs-file", "is not a folder (the job folders go there)"),
    ("job-file", "is not a job folder"),
    ("index-folder", "is not a file (the results index goes there)"),
    ("stray-folder", "has no readable job.json (FileNotFoundError), so it is no finished job's folder"),
    ("bad-job-json", "has no readable job.json (JSONDecodeError)"),
])
def test_a_file_in_the_way_fails_before_compute(tmp_path, tiny_sd_dir, monkeypatch, obstacle, message):
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", job_lines(2, model=str(tiny_sd_dir))))
    out = tmp_path / "out"
    (out / ".staging" / "half").mkdir(parents=True)
    if obstacle == "jobs-file":
        (out / "jobs").write_text("")
    elif obstacle == "job-file":
        (out / "jobs").mkdir()
        (out / "jobs" / manifest.jobs[1].id).write_text("")
    elif obstacle == "index-folder":
        (out / INDEX).mkdir()
    else:
        (out / "jobs" / "stray").mkdir(parents=True)
        if obstacle == "bad-job-json":
            (out / "jobs" / "stray" / "job.json").write_text("{torn")
    monkeypatch.setattr(Worker, "run", lambda self, group: pytest.fail("compute started"))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        run_batch(manifest, out, workers=0, progress=False, **ON_DEVICE)
    assert not (out / ".staging").exists()
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "m.jsonl"), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in " ".join(result.output.split())  # rich wraps long lines at the console's width


def test_a_staging_file_and_an_empty_staging_are_cleaned(plain_run, tmp_path, monkeypatch):
    import shutil

    jobs, plain_out, _ = plain_run
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    (out / ".staging").write_text("not a folder")
    monkeypatch.setattr(Worker, "run", lambda self, group: pytest.fail("a finished job ran again"))
    run_batch(jobs, out, workers=0, progress=False, **ON_DEVICE)
    assert not (out / ".staging").exists()
    assert not (plain_out / ".staging").exists()  # a run leaves no .staging behind


def test_a_hand_corrupted_index_is_repaired_from_the_job_folders(plain_run, tmp_path, monkeypatch):
    import shutil

    jobs, plain_out, _ = plain_run
    out = tmp_path / "out"
    shutil.copytree(plain_out, out)
    lines = (out / INDEX).read_text().splitlines()
    garbage = ['[1, 2]', '"text"', '{"id": 5, "status": "done"}', '{"status": "done"}', '{"id": "x"}', "{}", "null",
               '{"id": "not-run", "status": "done", "line": 99}', "[" * 50_000, '{"id": "y", "status": "done"} trailing']
    (out / INDEX).write_bytes(("\n".join(garbage + lines[:5] + ["\x00\x01 torn"]) + "\n").encode() + b"\xff\xfe\n")
    monkeypatch.setattr(Worker, "run", lambda self, group: pytest.fail("a finished job ran again"))
    summary = run_batch(jobs, out, workers=0, progress=False, **ON_DEVICE)
    assert (summary.done, summary.skipped) == (0, 20)
    assert_complete(out, jobs.jobs)  # the folders indexed again; the "done" row of a job without a folder dropped


def test_outputs_get_the_mode_the_umask_gives(tmp_path, tiny_sd_dir):
    import stat

    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", job_lines(1, model=str(tiny_sd_dir))))
    previous = os.umask(0o022)
    try:
        run_batch(manifest, tmp_path / "out", workers=0, progress=False, **ON_DEVICE)
    finally:
        os.umask(previous)
    files = [tmp_path / "out" / INDEX, tmp_path / "out" / "index.html", *(tmp_path / "out" / "jobs").glob("*/*")]
    assert len(files) == 6  # the index, the browse page, source.png, edit-1.png, grid.png, job.json
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == {path.name: 0o644 for path in files}


def test_pickle_weights_load_only_with_allow_pickle(tmp_path, tiny_sd_pickle_dir):
    lines = job_lines(1, model=str(tiny_sd_pickle_dir))
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    refused = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), "--workers", "0"])
    assert refused.exit_code == 1
    assert "--allow-pickle" in index_rows(tmp_path / "out")[0]["error"]
    allowed = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), "--workers", "0",
                                       "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output
    assert [row["status"] for row in index_rows(tmp_path / "out")] == ["done"]


@pytest.mark.parametrize("option", [["--workers", str(10**30)], ["--batch-size", str(10**30)], ["--workers", "-1"]])
def test_out_of_range_workers_and_batch_sizes_are_usage_errors(tmp_path, tiny_sd_dir, option):
    manifest = write_manifest(tmp_path / "m.jsonl", job_lines(1, model=str(tiny_sd_dir)))
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "out"), *option])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_a_pipe_is_refused_without_reading_it(tmp_path):
    os.mkfifo(tmp_path / "m.jsonl")
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(tmp_path / "m.jsonl")


def test_a_manifest_takes_inline_markup_and_says_what_an_empty_edit_list_lacks(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", [
        {"source": "a [cat->dog] riding a (bike:1.5)", "seed": 1},
        {"source": "a cat riding a bike", "edits": ["a fox riding a bike"], "seed": 2},
    ])
    jobs = load_manifest(path).jobs
    assert jobs[0].source == "a cat riding a bike"
    assert [(e["prompt"], e["weights"]) for e in jobs[0].edits] == [("a dog riding a bike", [[4, 1.5]])]
    assert jobs[1].edits[0]["prompt"] == "a fox riding a bike"
    unclosed = write_manifest(tmp_path / "unclosed.jsonl", [{"source": "a [cat riding a bike", "seed": 1}])
    with pytest.raises(ManifestError) as caught:
        load_manifest(unclosed)
    assert str(caught.value).splitlines()[-1].endswith(
        ":1: the source's inline markup, column 3: '[' is never closed: add ']' after the edited words")
    bad = write_manifest(tmp_path / "bad.jsonl", [{"source": "a cat riding a bike", "edits": [], "seed": 1}])
    with pytest.raises(ManifestError, match="the job has no edits: give \"edits\": \\[\"a dog riding a bicycle\"\\]"):
        load_manifest(bad)


def test_the_cli_prints_each_failed_jobs_error(tmp_path, tiny_sd_dir, monkeypatch):
    from prompt2prompt.recipe import RecipeError

    lines = job_lines(3, model=str(tiny_sd_dir))
    path = write_manifest(tmp_path / "m.jsonl", lines)
    jobs = load_manifest(path).jobs
    real = batch.worker.run_recipe

    def failing(recipe, editor, **kwargs):  # the second job fails as a run-time error would
        if recipe.source == jobs[1].source:
            raise RecipeError("the second job's own error")
        return real(recipe, editor, **kwargs)

    monkeypatch.setattr(batch.worker, "run_recipe", failing)
    monkeypatch.setattr(batch.worker, "edit_together", lambda editor, recipes: [failing(r, editor, output_type="np").images
                                                                                 for r in recipes])
    result = CliRunner().invoke(app, ["batch", str(path), "--out", str(tmp_path / "out"), "--workers", "0",
                                      "--device", ON_DEVICE["device"], "--dtype", ON_DEVICE["dtype"]])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"failed {jobs[1].id} (line 2): RecipeError: the second job's own error" in text
    assert f"failed {jobs[0].id}" not in text and "run again to retry them" in text
