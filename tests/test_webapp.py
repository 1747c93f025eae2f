"""The web app, driven through Debian's chromium with Playwright (never a downloaded browser)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from saved_models import tiny_sd_dir  # noqa: F401 (fixture)

import prompt2prompt as p2p
from prompt2prompt import webapp
from prompt2prompt.loading import load_pipeline
from prompt2prompt.recipe import read_recipe, run_recipe

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts"
UPLOAD_MB = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_sd_dir, tmp_path_factory):
    """The app on a free localhost port, serving the tiny model; its URL and output folder."""
    out = tmp_path_factory.mktemp("web") / "out"
    app = webapp.launch([str(tiny_sd_dir)], port=_free_port(), out_dir=out, max_upload_mb=UPLOAD_MB,
                        prevent_thread_lock=True)
    yield app, out
    app.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = (f"no browser at {CHROMIUM}: these tests drive Debian's chromium (`apt-get install chromium`; "
                   ".ci/run installs it)")
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI=true they are required")
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-default-apps", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; any request that would leave 127.0.0.1 is refused and recorded."""
    app, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(app.local_url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_local)
    page.goto(app.local_url)
    page.wait_for_selector("#source textarea")
    yield page
    page.close()
    assert outside == [], f"the page tried to reach {outside}"


def _set_number(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.press(selector, "Enter")


def _run(page, source: str, edit: str, *, seed: str) -> None:
    page.fill("#source textarea", source)
    page.fill("#edit-1 textarea", edit)
    _set_number(page, "#steps input[type=number]", "2")
    _set_number(page, "#seed input", seed)
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Saved to')", timeout=120_000)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_edit_in_the_browser_downloads_a_png_that_replays(page, server, tiny_sd_dir, tmp_path):
    app, out = server
    before = set(out.iterdir())
    _run(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="-1")
    assert page.locator("#gallery img").count() == 2  # P = 1 source + 1 edit
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webapp.png"), full_page=True)

    seed = int(page.inner_text("#status").split("Seed ")[1].split(".")[0])
    page.click("text=Reuse seed")
    page.wait_for_function(f"document.querySelector('#seed input').value === '{seed}'")

    with page.expect_download() as download:
        page.click("#downloads a[download='edit-1.png']")
    png = tmp_path / "edit-1.png"
    download.value.save_as(png)
    recipe = read_recipe(png)
    assert (recipe.source, recipe.seed, recipe.num_inference_steps) == ("a cat riding a bicycle", seed, 2)
    assert [edit["prompt"] for edit in recipe.edits] == ["a dog riding a bicycle"]
    (run_folder,) = set(out.iterdir()) - before - {out / ".gradio"}
    assert np.array_equal(_pixels(png), _pixels(run_folder / "edit-1.png"))

    editor = p2p.Editor(load_pipeline(recipe.model))
    replayed = run_recipe(recipe, editor).images[recipe.image_index]
    assert np.array_equal(_pixels(png), np.asarray(replayed))


def test_edit_rows_are_added_and_removed(page):
    assert not page.locator("#edit-2 textarea").is_visible()
    page.click("text=Add edit")
    page.wait_for_selector("#edit-2 textarea", state="visible")
    page.click("text=Remove edit")
    page.wait_for_selector("#edit-2 textarea", state="hidden")


def test_engine_errors_are_shown_not_raised(page):
    page.fill("#source textarea", "a cat")
    page.fill("#edit-1 textarea", "a dog")
    page.get_by_label("Reweight words").first.fill("unicorn")
    page.keyboard.press("Enter")
    page.click("#run")
    page.wait_for_selector(".toast-body:has-text(\"the word 'unicorn' is not in the prompt 'a dog'\")", timeout=60_000)
    assert "Saved to" not in page.inner_text("#status")


def test_real_image_upload_is_inverted_and_recorded(page, server, tmp_path):
    _, out = server
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    page.click("text=Real image")
    page.set_input_files("input[type=file]", str(photo))
    before = set(out.iterdir())
    _run(page, "a cat", "a dog", seed="-1")
    (run_folder,) = set(out.iterdir()) - before
    recipe = read_recipe(run_folder / "edit-1.png")
    assert recipe.image["path"] == "input.png" and recipe.inversion == {"method": "null-text"}
    assert recipe.seed is None and (run_folder / "input.png").is_file()


def test_a_second_edit_of_the_same_upload_reuses_its_inversion_and_source(page, server, tmp_path, monkeypatch):
    import prompt2prompt.inversion

    calls = []
    real_invert = prompt2prompt.inversion.invert

    def counting_invert(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("prompt"))
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(prompt2prompt.inversion, "invert", counting_invert)  # the server runs in this process
    _, out = server
    photo = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    page.click("text=Real image")
    page.set_input_files("input[type=file]", str(photo))
    _run(page, "a photo of a cat", "a photo of a dog", seed="-1")
    assert "source reused" not in page.inner_text("#status")
    before = set(out.iterdir())
    page.fill("#edit-1 textarea", "a photo of a (fluffy:2) fox")  # only the edit changes; inline weights work
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.includes('source reused')", timeout=120_000)
    assert calls == ["a photo of a cat"]  # inverted once, for both edits
    (second,) = set(out.iterdir()) - before
    recipe = read_recipe(second / "edit-1.png")
    assert recipe.edits[0]["prompt"] == "a photo of a fluffy fox" and recipe.edits[0]["weights"] == [[4, 2.0]]
    assert recipe.cached_source and page.locator("#gallery img").count() == 2


def test_serves_nothing_outside_its_output_folder(server):
    app, out = server
    assert app.server_name == "127.0.0.1"
    repo_file = Path(__file__).resolve().parent.parent / "pyproject.toml"
    for path in ["/etc/passwd", str(repo_file), f"{out}/../../etc/passwd"]:
        response = httpx.get(f"{app.local_url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path
    big = httpx.post(f"{app.local_url}gradio_api/upload",
                     files={"files": ("big.png", b"\0" * int(1.5 * UPLOAD_MB * 2**20), "image/png")})
    assert big.status_code == 413


def test_a_forged_request_cannot_make_the_app_read_a_server_path(server):
    """The image input only takes files uploaded into the app's own cache; a path outside it is refused."""
    app, out = server
    config = httpx.get(f"{app.local_url}config").json()
    (run,) = [d for d in config["dependencies"] if d.get("api_name") == "run_edit"]
    row = ["a dog", "auto", 0.8, 0.4, [], 1.0, [], [], [], []]
    forged = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}

    def submit(image, session: str) -> bool:
        data = [app.fns[run["id"]].inputs[0].value, "a cat", 7, 2, 7.5, image, "null-text", 1, *row,
                *([""] + row[1:]) * (webapp.MAX_EDITS - 1)]
        joined = httpx.post(f"{app.local_url}gradio_api/queue/join",
                            json={"data": data, "fn_index": run["id"], "session_hash": session})
        assert joined.status_code == 200
        with httpx.stream("GET", f"{app.local_url}gradio_api/queue/data?session_hash={session}", timeout=120) as events:
            return next(json.loads(line[5:]) for line in events.iter_lines() if "process_completed" in line)["success"]

    before = set(out.iterdir())
    assert submit(forged, "forged") is False
    assert set(out.iterdir()) == before
    assert submit(None, "control") is True  # the same request without the forged path runs


def test_uploads_must_be_small_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        webapp._check_upload(str(text), 2**20)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (256, 256)).save(photo)
    with pytest.raises(gr.Error, match="the limit is 0.0 MB"):
        webapp._check_upload(str(photo), 10)
    webapp._check_upload(str(photo), 2**20)


def test_only_offered_models_load(tiny_sd_dir):
    editors = webapp._Editors([str(tiny_sd_dir)], "cpu", "auto")
    with pytest.raises(gr.Error, match="unknown model '/etc'"):
        editors.get("/etc")
    editor, source = editors.get(str(tiny_sd_dir))
    assert source.id == str(tiny_sd_dir) and editors.get(str(tiny_sd_dir))[0] is editor


def test_runs_queue_one_at_a_time(server):
    app, _ = server
    (run,) = [fn for fn in app.fns.values() if fn.name == "run_edit"]
    assert run.concurrency_limit == 1


def test_a_file_that_is_no_image_gets_the_apps_message_not_a_bare_error(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.click("text=Real image")
    page.set_input_files("input[type=file]", str(notes))
    page.wait_for_selector(".toast-body:has-text('the upload is not an image that can be read')", timeout=60_000)


def test_a_diverged_run_is_an_error_and_leaves_no_folder(page, server, monkeypatch):
    _, out = server

    def diverged(*args, **kwargs):  # what run_recipe raises for NaN images (a float16 overflow, a huge weight)
        raise RuntimeError("the result has NaN/inf values")

    monkeypatch.setattr(webapp, "run_recipe", diverged)  # the server runs in this process
    before = set(out.iterdir())
    page.fill("#source textarea", "a cat")
    page.fill("#edit-1 textarea", "a dog")
    page.click("#run")
    page.wait_for_selector(".toast-body:has-text('the result has NaN/inf values')", timeout=60_000)
    assert set(out.iterdir()) == before


def test_a_decompression_bomb_upload_is_refused_before_decoding(tmp_path):
    from test_images import bomb_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20_000, 20_000))
    with pytest.raises(gr.Error, match="the upload is too large to decode safely"):
        webapp._check_upload(str(bomb), 2**20)


def test_errors_reach_the_user_as_their_message():
    assert webapp._shown(ValueError("the word 'x' is not in the prompt")).message == "the word 'x' is not in the prompt"
    assert webapp._shown(KeyError("x")).message == "KeyError: 'x'"


def test_gradio_writes_nothing_outside_the_output_folder(tiny_sd_dir, tmp_path):
    """Launched as `p2p serve` does, in a fresh interpreter: gradio's folders are made under --out only."""
    home, temp, cwd, out = (tmp_path / name for name in ("home", "tmp", "cwd", "out"))
    for folder in (home, temp, cwd):
        folder.mkdir()
    code = ("import sys, httpx, prompt2prompt.cli; from prompt2prompt.webapp import launch; "
            f"app = launch([sys.argv[1]], port={_free_port()}, out_dir=sys.argv[2], prevent_thread_lock=True); "
            "httpx.post(app.local_url + 'gradio_api/upload', files={'files': ('a.txt', b'x')}).raise_for_status(); "
            "app.close()")
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code, str(tiny_sd_dir), str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert list(temp.iterdir()) == []  # nor torch's compiler cache folder, which `p2p` points at the temp folder
    assert list((out / ".gradio").rglob("a.txt"))


@pytest.mark.parametrize("seed", ["5", float("nan"), 2**70, True])
def test_a_forged_seed_gets_a_message(tiny_sd_dir, tmp_path, seed):
    editors = webapp._Editors([str(tiny_sd_dir)], "cpu", "auto")
    rows = [None] * (webapp.ROW_FIELDS * webapp.MAX_EDITS)
    with pytest.raises(gr.Error, match="seed must be a whole number"):
        webapp._run(editors, tmp_path, 2**20, str(tiny_sd_dir), "a [cat->dog]", seed, 2, 7.5, None, "null-text", 0,
                    *rows)


@pytest.mark.parametrize("field, value", [(4, ["a"]), (8, 5), (9, 5), (10, 10**9)])
def test_a_forged_form_field_gets_a_message(tiny_sd_dir, tmp_path, field, value):
    editors = webapp._Editors([str(tiny_sd_dir)], "cpu", "auto")
    args = [editors, tmp_path, 2**20, str(tiny_sd_dir), "a [cat->dog]", 1, 2, 7.5, None, "null-text", 0]
    args[field] = value
    with pytest.raises(gr.Error):
        webapp._run(*args, *[None] * (webapp.ROW_FIELDS * webapp.MAX_EDITS))
