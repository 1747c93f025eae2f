"""The web app, driven through Debian's chromium with Playwright (never a downloaded browser)."""

import base64
import doctest
import io
import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

import prompt2prompt as p2p
from prompt2prompt import webapp
from prompt2prompt.families import UNetFamily
from prompt2prompt.loading import load_pipeline
from prompt2prompt.recipe import read_recipe, run_recipe

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts"
UPLOAD_MB = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _handler(app, name: str):
    """The built app's function `name` (a handler a user's action triggers), as Gradio calls it."""
    return next(fn for fn in app.fns.values() if fn.name == name)


def _start(app) -> webapp.Form:
    """The Run button's values as the form starts, by name."""
    return webapp.Form.of([component.value for component in _handler(app, "run_edit").inputs])


def _click_run(app, form: webapp.Form):
    """What the Run button shows for the values `form`: (gallery, downloads, heatmap galleries, seed, status line)."""
    gallery, files, *heatmaps, seed, status = _handler(app, "run_edit").fn(*form.inputs())
    return gallery, files, heatmaps, seed, status


def _fill(form: webapp.Form, key: str, value) -> webapp.Form:
    """`form` with the input `key` ("seed", "edit-1.mode": `Form.named`'s keys) set to `value`."""
    row, _, name = key.rpartition(".")
    setattr(form.rows[int(row.removeprefix("edit-")) - 1] if row else form, name, value)
    return form


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the app on a model (once per model in this module): its Blocks, writing under a temporary folder."""
    apps = {}

    def build(model: str):
        if model not in apps:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))  # build_app sets it
                apps[model] = webapp.build_app([model], out_dir=tmp_path_factory.mktemp("built") / "out",
                                               max_upload_mb=UPLOAD_MB)
        return apps[model]

    return build


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


def run_form(page, source: str, edit: str, *, seed: str) -> None:
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
    run_form(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="-1")
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
    page.fill("#edit-2 textarea", "a fox riding a bicycle")
    run_form(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="3")  # the page sends its row count
    assert page.locator("#gallery img").count() == 3
    page.click("text=Remove edit")
    page.wait_for_selector("#edit-2 textarea", state="hidden")


def test_engine_errors_replace_the_status_line_and_keep_the_last_result(page):
    run_form(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="3")
    page.fill("#source textarea", "a cat")
    page.fill("#edit-1 textarea", "a dog")
    page.get_by_label("Reweight words").first.fill("unicorn")
    page.keyboard.press("Enter")
    page.click("#run")
    page.wait_for_selector("#status .error:has-text(\"the word 'unicorn' is not in the prompt 'a dog'\")",
                           timeout=60_000)
    assert "Saved to" not in page.inner_text("#status")
    _assert_the_last_result_stays(page)


def _assert_the_last_result_stays(page) -> None:
    """The last run's images and downloads are still shown, with no "Error" over them and no toast."""
    assert page.locator("#gallery img").count() == 2 and page.locator("#downloads a[download]").count() == 3
    assert page.locator(".toast-body").count() == 0
    assert "Error" not in page.inner_text("#gallery") + page.inner_text("#downloads")


def test_real_image_upload_is_inverted_and_recorded(page, server, tmp_path):
    _, out = server
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    page.click("text=Real image")
    page.set_input_files("input[type=file]", str(photo))
    before = set(out.iterdir())
    run_form(page, "a cat", "a dog", seed="-1")
    (run_folder,) = set(out.iterdir()) - before
    recipe = read_recipe(run_folder / "edit-1.png")
    default_method = UNetFamily.inversion_methods[0]  # the form starts at the model's default inversion
    assert recipe.image["path"] == "input.png" and recipe.inversion == {"method": default_method}
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
    run_form(page, "a photo of a cat", "a photo of a dog", seed="-1")
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
    forged = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}

    def submit(image, session: str) -> bool:
        data = _fill(webapp.Form.of(_form(app)), "image", image).inputs()
        joined = httpx.post(f"{app.local_url}gradio_api/queue/join",
                            json={"data": data, "fn_index": run["id"], "session_hash": session})
        if joined.status_code != 200:  # refused before it joins the queue
            return False
        with httpx.stream("GET", f"{app.local_url}gradio_api/queue/data?session_hash={session}", timeout=120) as events:
            return next(json.loads(line[5:]) for line in events.iter_lines() if "process_completed" in line)["success"]

    before = set(out.iterdir())
    assert submit(forged, "forged") is False
    assert set(out.iterdir()) == before
    assert submit(None, "control") is True  # the same request without the forged path runs


def test_uploads_must_be_small_images(built, tmp_path):
    show = _handler(built("demo"), "show_upload")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "the upload is not an image that can be read" in show.fn(str(text), "")[1]
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)
    preview, said = show.fn(str(big), "")
    assert preview is None and said.startswith('<div class="error">the upload is 1.8 MB; the limit is 1.0 MB')
    photo = tmp_path / "photo.png"
    Image.new("RGB", (256, 256)).save(photo)
    assert show.fn(str(photo), "")[0] == str(photo)


def test_only_offered_models_load(built, monkeypatch):
    app = built("demo")
    loads = []
    monkeypatch.setattr(webapp.runs, "load_editor", lambda *args, **kwargs: loads.append(args))
    picked = _handler(app, "model_defaults")
    *_, status = picked.fn("/etc")  # the model picker offers only "demo"; a forged request names another
    assert status.startswith('<div class="error">unknown model \'/etc\'; this server offers demo')
    assert picked.fn("demo")[-1] == gr.skip() and loads == []  # the offered model loaded once, when the app was built


def test_runs_queue_one_at_a_time(server):
    app, _ = server
    assert _handler(app, "run_edit").concurrency_limit == 1


def test_each_run_gives_its_free_memory_back_and_few_sessions_are_kept(server, monkeypatch):
    """Gradio runs requests on several threads, each with a heap of its own, and keeps a copy of the form's config per
    session: a run trims the C heaps, and the server keeps the last SESSIONS sessions, not Gradio's 10000."""
    app, _ = server
    trims = []
    monkeypatch.setattr(webapp.app, "release_memory", lambda: trims.append(1))  # the server runs in this process
    assert _queue_call(app, _form(app), "trimmed")["success"] and trims == [1]
    assert app.state_session_capacity == webapp.SESSIONS < 10000
    assert webapp.malloc_trim() is not None or platform.libc_ver()[0] != "glibc"


def test_a_file_that_is_no_image_gets_the_apps_message_not_a_bare_error(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.click("text=Real image")
    page.set_input_files("input[type=file]", str(notes))
    page.wait_for_selector("#status .error:has-text('the upload is not an image that can be read')", timeout=60_000)
    assert page.locator(".toast-body").count() == 0


def test_a_diverged_run_is_an_error_and_leaves_no_folder(page, server, monkeypatch):
    _, out = server

    def diverged(*args, **kwargs):  # what run_recipe raises for NaN images (a float16 overflow, a huge weight)
        raise RuntimeError("the result has NaN/inf values")

    monkeypatch.setattr(webapp.runs, "run_recipe", diverged)  # the server runs in this process
    before = set(out.iterdir())
    page.fill("#source textarea", "a cat")
    page.fill("#edit-1 textarea", "a dog")
    page.click("#run")
    page.wait_for_selector("#status .error:has-text('the result has NaN/inf values')", timeout=60_000)
    assert set(out.iterdir()) == before


def test_an_upload_error_stays_in_the_status_line_until_a_good_upload(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))
    app = webapp.build_app(["demo"], out_dir=tmp_path / "out")
    show = next(fn for fn in app.fns.values() if fn.name == "show_upload")
    notes, photo = tmp_path / "notes.png", tmp_path / "photo.png"
    notes.write_text("not an image")
    Image.new("RGB", (64, 64)).save(photo)
    preview, said = show.fn(str(notes), "Seed 1. Saved to `run`.")
    assert preview is None and said.startswith('<div class="error">the upload is not an image that can be read')
    assert show.fn(str(photo), said) == (str(photo), "")  # the error goes
    assert show.fn(str(photo), "Seed 1. Saved to `run`.") == (str(photo), gr.skip())  # the last run's line stays


def test_a_decompression_bomb_upload_is_refused_before_decoding(built, tmp_path):
    from test_images import bomb_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20_000, 20_000))
    assert "the upload is too large to decode safely" in _handler(built("demo"), "show_upload").fn(str(bomb), "")[1]


def test_errors_reach_the_user_as_their_message():
    assert webapp.shown_error(ValueError("the word 'x' is not in the prompt")).message == "the word 'x' is not in the prompt"
    assert webapp.shown_error(KeyError("x")).message == "KeyError: 'x'"


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
def test_a_forged_seed_gets_a_message(built, tiny_sd_dir, seed):
    form = _start(built(str(tiny_sd_dir)))
    form.source, form.seed, form.steps, form.rows[0].prompt = "a [cat->dog]", seed, 2, ""
    *_, status = _click_run(built(str(tiny_sd_dir)), form)
    assert status.startswith('<div class="error">the seed must be a whole number')


@pytest.mark.parametrize("key, value, message", [
    ("source", ["a"], "the source prompt must be a str, not list"), ("image", 5, "the image must be a str, not int"),
    ("method", 5, "the inversion method must be a str, not int"),
    ("count", 10**9, "the edit count must be a whole number up to 4"),
    ("edit-1.weight_words", "fluffy", "the edit 1 field 5 must be a list, not str"),
])
def test_a_forged_form_field_gets_a_message(built, tiny_sd_dir, key, value, message):
    app = built(str(tiny_sd_dir))
    form = _fill(_start(app), key, value)
    *_, status = _click_run(app, form)
    assert status.startswith(f'<div class="error">{message}')
    checks = _handler(app, "run_edit").validator(*form.inputs())  # the input at fault says so before the queue
    assert [item.key for item, check in zip(form.named(), checks) if not check["is_valid"]] == [key]


# The whole image, as drawn: its object-fit box inside every clipping ancestor, its aspect ratio kept, and nothing
# drawn over its corners or its centre (Gradio lays captions and the gallery's label over thumbnails).
WHOLE_IMAGE = """(img) => {
    img.scrollIntoView({block: "center"});
    const r = img.getBoundingClientRect(), style = getComputedStyle(img);
    const nw = img.naturalWidth, nh = img.naturalHeight;
    const scale = {contain: Math.min(r.width / nw, r.height / nh), cover: Math.max(r.width / nw, r.height / nh),
                   "scale-down": Math.min(1, r.width / nw, r.height / nh), none: 1}[style.objectFit];
    const w = scale === undefined ? r.width : nw * scale, h = scale === undefined ? r.height : nh * scale;
    const [px, py] = style.objectPosition.split(" ").map(parseFloat);  // percentages
    const left = r.left + (r.width - w) * px / 100, top = r.top + (r.height - h) * py / 100;
    const box = {left, top, right: left + w, bottom: top + h};
    const clip = {left: 0, top: 0, right: innerWidth, bottom: innerHeight};
    for (let e = img.parentElement; e; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.overflowX === "visible" && s.overflowY === "visible") continue;
        const b = e.getBoundingClientRect(), x = b.left + e.clientLeft, y = b.top + e.clientTop;
        clip.left = Math.max(clip.left, x); clip.top = Math.max(clip.top, y);
        clip.right = Math.min(clip.right, x + e.clientWidth); clip.bottom = Math.min(clip.bottom, y + e.clientHeight);
    }
    const points = [[box.left + 2, box.top + 2], [box.right - 2, box.top + 2], [box.left + 2, box.bottom - 2],
                    [box.right - 2, box.bottom - 2], [(box.left + box.right) / 2, (box.top + box.bottom) / 2]];
    return {box, clip, ratio: (w / h) / (nw / nh), rendering: style.imageRendering,
            covered: points.filter(([x, y]) => document.elementFromPoint(x, y) !== img).length};
}"""


def _assert_whole(page, selector: str) -> None:
    images = page.locator(selector)
    page.wait_for_function(f"[...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth)")
    for i in range(images.count()):
        seen = images.nth(i).evaluate(WHOLE_IMAGE)
        box, clip = seen["box"], seen["clip"]
        assert clip["left"] - 1 <= box["left"] and box["right"] <= clip["right"] + 1, (selector, i, seen)
        assert clip["top"] - 1 <= box["top"] and box["bottom"] <= clip["bottom"] + 1, (selector, i, seen)
        assert seen["ratio"] == pytest.approx(1, abs=0.02) and seen["covered"] == 0, (selector, i, seen)
        assert seen["rendering"] == "pixelated", (selector, i, seen)  # 32 px images, drawn larger


def test_the_gallery_shows_whole_images_and_the_heatmaps_their_tokens(page):
    run_form(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="3")
    _assert_whole(page, "#gallery img")
    page.get_by_role("tab", name="Attention").click()
    page.wait_for_selector("#heatmaps-1 img")
    assert "least" in page.inner_text("#heat-scale") and page.locator("#heat-scale img").is_visible()
    for i, (label, words) in enumerate([("source: a cat riding a bicycle", "a cat riding a bicycle"),
                                        ("edit 1: cat -> dog", "a dog riding a bicycle")]):
        assert page.get_by_test_id("block-label").get_by_text(label, exact=True).count() == 1
        assert page.locator(f"#heatmaps-{i} .caption-label").all_inner_texts() == words.split()
        _assert_whole(page, f"#heatmaps-{i} img")
    assert not page.locator("#heatmaps-2").is_visible()


def test_heatmaps_are_one_gallery_per_prompt_each_word_once(built, tiny_sd_dir):
    app = built(str(tiny_sd_dir))
    form = _start(app)
    form.source, form.seed, form.steps, form.rows[0].prompt = "a cat", 1, 2, "a (fluffy:2) dog"
    gallery, _, heatmaps, _, _ = _click_run(app, form)
    shown = [(heat["label"], heat["value"]) for heat in heatmaps if heat["visible"]]
    assert [(label, [word for _, word in maps]) for label, maps in shown] == [
        ("source: a cat", ["a", "cat"]), ("edit 1: cat -> fluffy dog, reweight fluffy x2", ["a", "fluffy", "dog"])]
    with Image.open(gallery["value"][0][0]) as source:
        # The word is the tile's caption only: the map is its image's size, with no word written beneath it.
        assert all(heat.size == source.size for _, maps in shown for heat, _ in maps)


def test_the_heat_scale_is_drawn_in_the_heatmaps_own_colours():
    html = webapp.heat_scale()
    assert "least" in html and "most" in html
    data = html.split("base64,")[1].split('"')[0]
    with Image.open(io.BytesIO(base64.b64decode(data))) as ramp:
        ramp = np.asarray(ramp.convert("RGB"))
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[0, -1].tolist() == [255, 255, 0]  # black to yellow
    assert ramp[0, ramp.shape[1] // 2].tolist()[1:] == [0, 0] and ramp[0, ramp.shape[1] // 2, 0] > 200  # red between


def test_a_prompt_syntax_error_shows_its_caret_under_the_column(page, caplog, capfd):
    run_form(page, "a cat riding a bicycle", "a dog riding a bicycle", seed="3")
    source = "a big red circle in the center on a white background"
    page.fill("#source textarea", source)
    page.fill("#edit-1 textarea", "a big [red->green circle in the center on a white background")
    page.click("#run")
    pre = page.wait_for_selector("#status pre", timeout=60_000)
    message = "edit 1: column 7: '[' is never closed: add ']' after the edited words"
    assert page.inner_text("#status .error") == message and "Saved to" not in page.inner_text("#status")
    # The field at fault says so too (the validator's reply, which may come a moment after the status line's), and
    # the last run's result stays as it was.
    page.locator(f"text={message}").nth(1).wait_for(timeout=10_000)
    assert page.locator(f"text={message}").count() == 2
    _assert_the_last_result_stays(page)
    # The prompt is cut into lines that fit the status column, the caret beneath the piece that holds the '['.
    prompt_line, caret_line, rest = pre.inner_text().splitlines()
    assert prompt_line == "a big [red->green circle in the center on a" and rest == "white background"
    assert caret_line.strip() == "^"
    assert pre.evaluate("pre => pre.scrollWidth <= pre.clientWidth")  # nothing cut off at its right edge
    x_of = """(pre, [line, column]) => {
        const node = pre.firstChild, lines = node.textContent.split("\\n"), range = document.createRange();
        const at = lines.slice(0, line).reduce((n, text) => n + text.length + 1, 0) + column;
        range.setStart(node, at); range.setEnd(node, at + 1);
        return range.getBoundingClientRect().left;
    }"""
    bracket = pre.evaluate(x_of, [0, prompt_line.index("[")])
    caret = pre.evaluate(x_of, [1, caret_line.index("^")])
    assert caret == pytest.approx(bracket, abs=0.5)  # the caret stands under the '[' (a monospace font)
    assert "mono" in pre.evaluate("pre => getComputedStyle(pre).fontFamily")
    page.wait_for_timeout(6_000)  # longer than a toast stays: the message does not go away
    assert page.inner_text("#status .error") == message and page.locator(".toast-body").count() == 0
    (record,) = [r for r in caplog.records if r.name == "prompt2prompt.webapp" and "refused" in r.getMessage()]
    assert "column 7" in record.getMessage() and "\n" not in record.getMessage() and record.exc_info is None
    assert "Traceback" not in capfd.readouterr().err


def test_a_failed_run_replaces_the_status_line_and_leaves_the_other_outputs(built):
    app = built("demo")
    form = _start(app)
    form.rows[0].prompt = "a big [red->green circle in the center on a white background"
    *others, status = _handler(app, "run_edit").fn(*form.inputs())
    assert others == [gr.skip()] * (len(_handler(app, "run_edit").outputs) - 1)  # the last result stays, no "Error"
    assert status.startswith("<div class=\"error\">edit 1: column 7: '[' is never closed")
    assert "<pre>a big [red->green circle in the center on a\n      ^\nwhite background</pre>" in status


def test_a_run_that_cannot_succeed_is_refused_before_it_joins_the_queue(built):
    app = built("demo")
    run = _handler(app, "run_edit")
    form = _start(app)
    assert all(check["is_valid"] for check in run.validator(*form.inputs()))
    form.source = "a [red circle"
    checks = run.validator(*form.inputs())
    (refused,) = [(item.key, check) for item, check in zip(form.named(), checks) if not check["is_valid"]]
    assert refused == ("source", {**refused[1], "message": "the source prompt: column 3: '[' is never closed: add "
                                                           "']' after the edited words"})
    shown = _handler(app, "show_check")  # the status line says it at once
    assert shown.fn(*form.inputs()).startswith('<div class="error">the source prompt: column 3')
    assert shown.queue is False


def test_error_prompts_are_cut_to_the_status_column_with_the_caret_under_its_column():
    from prompt2prompt.syntax import PromptSyntaxError

    prompt = "a photo of a " * 6 + "[cat->dog sitting on a mat in a sunlit room by the window"
    lines = str(PromptSyntaxError(prompt, prompt.index("[") + 1, "'[' is never closed")).splitlines()[1:]
    shown = webapp.wrapped(textwrap.dedent("\n".join(lines)), width=30).splitlines()
    assert all(len(line) <= 30 for line in shown)
    (caret,) = [i for i, line in enumerate(shown) if line.strip() == "^"]
    assert shown[caret - 1][shown[caret].index("^")] == "["
    assert " ".join(line for line in shown if line.strip() != "^").split() == lines[0].split()


def test_the_apps_docstring_examples_run():
    results = [doctest.testmod(module) for module in (webapp.app, webapp.errors, webapp.form, webapp.runs)]
    assert sum(attempted for _, attempted in results) > 0 and sum(failures for failures, _ in results) == 0


def test_user_errors_are_logged_in_one_line_and_bugs_with_their_traceback(caplog):
    shown = webapp.shown_error(ValueError("the word 'x' is not in the prompt\n  a cat\n  ^"))
    assert (shown.message, shown.detail) == ("the word 'x' is not in the prompt", "  a cat\n  ^")
    webapp.shown_error(KeyError("x"))
    user, bug = caplog.records
    assert user.getMessage() == "refused: the word 'x' is not in the prompt" and user.exc_info is None
    assert bug.getMessage() == "failed: KeyError: 'x'" and bug.exc_info is not None


def test_messages_are_escaped_for_the_toasts_html():
    assert webapp.user_error("the word '<img src=x>' & more").message == "the word '&lt;img src=x>' &amp; more"


def _queue_call(app, data: list, session: str) -> dict:
    """One request to the Run button's function through Gradio's queue, as a browser or a script sends it."""
    config = httpx.get(f"{app.local_url}config").json()
    (run,) = [d for d in config["dependencies"] if d.get("api_name") == "run_edit"]
    joined = httpx.post(f"{app.local_url}gradio_api/queue/join",
                        json={"data": data, "fn_index": run["id"], "session_hash": session})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{app.local_url}gradio_api/queue/data?session_hash={session}", timeout=120) as events:
        return next(json.loads(line[5:]) for line in events.iter_lines() if "process_completed" in line)


def _form(app, source: str = "a cat", seed: int = 7) -> list:
    """A Run request's values, as a browser sends them: the form as it starts, with `source`, `seed`, 2 steps and
    the edit "a dog"."""
    form = _start(app)
    form.source, form.seed, form.steps, form.guidance, form.rows[0].prompt = source, seed, 2, 7.5, "a dog"
    return form.inputs()


def _join(app, data: list, session: str) -> httpx.Response:
    """A Run request joining Gradio's queue: 200 if it joined, else the reply that refused it."""
    config = httpx.get(f"{app.local_url}config").json()
    (run,) = [d for d in config["dependencies"] if d.get("api_name") == "run_edit"]
    return httpx.post(f"{app.local_url}gradio_api/queue/join",
                      json={"data": data, "fn_index": run["id"], "session_hash": session})


@pytest.mark.parametrize("key, value, message", [
    ("seed", "abc", "the request's 'Seed (-1: random)' is not what the form sends"),
    ("steps", "abc", "the request's 'Steps' is not what the form sends"),
    ("steps", None, "the request's 'Steps' is not what the form sends"),
    ("image", "/etc/passwd", "the request holds a file that was not uploaded to this app"),
    ("edit-1.mode", "fine", "Value: 'fine' (type: &lt;class 'str'>) is not in the list of choices"),
    (None, 5, "the request holds 5 values; the form sends"),
])
def test_a_forged_api_request_gets_the_apps_one_line_message(server, key, value, message):
    app, out = server
    form = webapp.Form.of(_form(app))
    data = form.inputs()[:value] if key is None else _fill(form, key, value).inputs()  # None: the first values only
    refused = _join(app, data, f"forged-{key}-{value}")
    error = refused.json()["detail"]
    assert refused.status_code == 400 and error.startswith(message)
    assert "\n" not in error and str(out) not in error and "gradio" not in error.lower()


def test_a_request_refused_without_the_model_does_not_wait_for_the_queue(server, monkeypatch):
    """While an edit runs, a malformed request and one with a syntax error are refused at once, with the message."""
    app, _ = server
    started, release = threading.Event(), threading.Event()
    real_run_recipe = webapp.runs.run_recipe

    def slow_run_recipe(*args, **kwargs):  # the server runs in this process
        started.set()
        release.wait(60)
        return real_run_recipe(*args, **kwargs)

    monkeypatch.setattr(webapp.runs, "run_recipe", slow_run_recipe)
    editing = threading.Thread(target=_queue_call, args=(app, _form(app), "editing"))
    editing.start()
    try:
        assert started.wait(60)
        malformed, syntax = _fill(webapp.Form.of(_form(app)), "steps", "abc").inputs(), _form(app, source="a [cat")
        for data, status, message in ((malformed, 400, "the request's 'Steps' is not what the form sends"),
                                      (syntax, 422, "the source prompt: column 3: '[' is never closed")):
            begun = time.perf_counter()
            refused = _join(app, data, f"refused-{status}")
            assert refused.status_code == status and message in refused.text
            assert time.perf_counter() - begun < 5 and not release.is_set()  # the edit is still running
    finally:
        release.set()
        editing.join(120)


def test_a_text_file_named_png_gets_a_message_without_a_server_path(built, tmp_path):
    show = _handler(built("demo"), "show_upload")
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    _, said = show.fn(str(notes), "")
    assert said.startswith('<div class="error">the upload is not an image that can be read (cannot identify image '
                           "file): it is corrupt")
    assert str(tmp_path) not in said and "notes" not in said
    _, said = show.fn(str(tmp_path / "gone.png"), "")
    assert said == '<div class="error">the upload is no longer on the server; upload the image again</div>'


def test_a_run_is_written_aside_and_moved_into_the_output_folder_whole(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))  # build_app sets it; restored
    out = tmp_path / "out"
    app = webapp.build_app([str(tiny_sd_dir)], out_dir=out)
    real_save, seen = webapp.runs.save_result, []

    def watched_save(images, recipe, folder):  # what --out holds while the PNGs are being written
        seen.append((folder, sorted(path.name for path in out.iterdir())))
        return real_save(images, recipe, folder)

    monkeypatch.setattr(webapp.runs, "save_result", watched_save)
    form = _start(app)
    form.source, form.seed, form.steps, form.rows[0].prompt = "a cat", 1, 2, "a dog"
    _, files, _, _, status = _click_run(app, form)
    ((staging, during),) = seen
    assert staging.parent == out / webapp.STAGING and during == [webapp.STAGING]
    (run_folder,) = out.iterdir()  # the staging folder is gone
    assert staging.name.startswith(f".{run_folder.name}.") and f"`{run_folder.name}`" in status
    assert [Path(path) for path in files] == [run_folder / name for name in ("source.png", "edit-1.png", "grid.png")]
    assert all(Path(path).is_file() for path in files)


def test_leftovers_of_a_crash_are_removed_at_start_and_whole_runs_kept(tiny_sd_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    whole, empty, partial = (out / f"20260101-12000{i}-{i}-abcdef" for i in range(3))
    users = ["notes.txt", ".hidden", ".my.config.tmp", ".my.settings.tmp", ".notes.txt.k2j4x8f2.tmp.txt"]
    for folder, names in ((whole, ["source.png", "edit-1.png", "grid.png", ".grid.png.k2j4x8f2.tmp.png"]),
                          (empty, []), (partial, ["input.png", "source.png"]),
                          (out / ".staging" / "20260101-120003-3-abcdef", ["source.png"]), (out / "my-own-folder", []),
                          (out, users)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_bytes(b"png")
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))  # build_app sets it; restored
    webapp.build_app([str(tiny_sd_dir)], out_dir=out)
    assert sorted(path.name for path in out.iterdir()) == sorted([whole.name, "my-own-folder", *users])
    assert sorted(path.name for path in whole.iterdir()) == ["edit-1.png", "grid.png", "source.png"]


def test_the_cleanup_matches_the_temporary_names_save_result_makes(tmp_path):
    from prompt2prompt.files import write_atomic

    made = []
    for name in ("source.png", "edit-12.png", "grid.png"):
        write_atomic(tmp_path / name, lambda temporary: made.append(Path(temporary).name))
    assert len(made) == 3 and all(webapp.is_leftover(name) for name in made)
    for user in (".my.config.tmp", ".grid.png.tmp.png", ".grid.png.k2j4x8f2.tmp", ".notes.png.k2j4x8f2.tmp.png"):
        assert not webapp.is_leftover(user)


def test_the_queue_size_comes_from_p2p_serve(tiny_sd_dir, tmp_path, server, monkeypatch):
    from typer.testing import CliRunner

    from prompt2prompt import cli

    app, _ = server
    assert app._queue.max_size == webapp.QUEUE_SIZE == 64  # the default
    given = {}
    monkeypatch.setattr(webapp, "launch", lambda models, **options: given.update(options))
    result = CliRunner().invoke(cli.app, ["serve", "--model", str(tiny_sd_dir), "--out", str(tmp_path), "--queue", "5"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))
    assert webapp.build_app([str(tiny_sd_dir)], out_dir=tmp_path, queue_size=given["queue_size"])._queue.max_size == 5


def test_gradios_cache_keeps_the_files_of_recent_runs_only(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(webapp.app, "CACHE_RUNS", 2)
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))
    out = tmp_path / "out"
    app = webapp.launch([str(tiny_sd_dir)], port=_free_port(), out_dir=out, prevent_thread_lock=True)
    try:
        entries = []
        for seed in range(1, 7):
            assert _queue_call(app, _form(app, seed=seed), f"run-{seed}")["success"]
            entries.append(len(list((out / ".gradio").iterdir())))
    finally:
        app.close()
    assert entries[-1] <= 3 * entries[0] < 6 * entries[0]  # this run's and the last two runs' files; not all six
    assert len([path for path in out.iterdir() if path.name != ".gradio"]) == 6  # the runs themselves are kept


def test_the_cache_bound_keeps_an_upload_in_use_and_gradios_other_files(tmp_path):
    old, upload, other = tmp_path / ("a" * 64), tmp_path / ("b" * 64), tmp_path / "vibe_edit_history"
    for path in (old / "image.webp", upload / "photo.png", other):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    for path in (old / "image.webp", old, upload / "photo.png", upload, other):
        os.utime(path, (0, 0))
    cache = webapp.CacheBound(tmp_path, runs=1)
    cache.run_started()
    cache.run_started(str(upload / "photo.png"))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([upload.name, other.name])


def test_the_cache_bound_prunes_the_empty_files_gradios_upload_component_leaves(tmp_path, monkeypatch):
    """gr.File hands an upload to a function after making an empty temporary file in its cache, which it never
    removes: one a request. The cache bound removes them with the old runs' files."""
    from gradio.data_classes import FileData

    upload = tmp_path / ("c" * 64) / "photo.png"
    upload.parent.mkdir()
    upload.write_bytes(b"png")
    component = gr.File(file_count="single", type="filepath")
    monkeypatch.setattr(component, "GRADIO_CACHE", str(tmp_path))
    assert component.preprocess(FileData(path=str(upload))) == str(upload)
    (stray,) = [path for path in tmp_path.iterdir() if path.is_file()]
    assert stray.stat().st_size == 0
    (tmp_path / "tmp_user.txt").write_bytes(b"")  # not a name tempfile makes
    os.utime(stray, (0, 0))
    os.utime(tmp_path / "tmp_user.txt", (0, 0))
    cache = webapp.CacheBound(tmp_path, runs=1)
    cache.run_started(str(upload))
    fresh = tmp_path / "tmpfresh123"  # an upload being written: newer than the runs the cache keeps
    fresh.write_bytes(b"")
    cache.run_started(str(upload))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([upload.parent.name, "tmp_user.txt",
                                                                       fresh.name])


def test_the_form_starts_at_the_models_defaults_and_follows_the_picked_model(tiny_sd_dir, tmp_path, monkeypatch):
    from prompt2prompt.engine import load_editor

    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))
    app = webapp.build_app([str(tiny_sd_dir), "demo"], out_dir=tmp_path)
    tiny, demo = load_editor(str(tiny_sd_dir))[0].defaults, load_editor("demo")[0].defaults
    assert (tiny.num_inference_steps, tiny.self_steps) != (demo.num_inference_steps, demo.self_steps)
    form = webapp.Form.of(_handler(app, "run_edit").inputs)  # the components, by name
    row = form.rows[0]
    assert (form.steps.value, form.guidance.value) == (tiny.num_inference_steps, tiny.guidance_scale)
    assert (row.cross.value, row.self_steps.value, row.threshold.value) == (tiny.cross_steps, tiny.self_steps,
                                                                            tiny.blend_threshold)
    assert row.threshold.label == "Blend threshold" and form.image.elem_id == "upload"
    follow = _handler(app, "model_defaults")
    assert follow.outputs[:3] == [form.steps, form.guidance, form.method]
    assert follow.outputs[3:-1] == [c for row in form.rows for c in (row.cross, row.self_steps, row.threshold)]
    picked_steps, picked_guidance, _, *per_row, status = follow.fn("demo")
    assert (picked_steps, picked_guidance) == (demo.num_inference_steps, demo.guidance_scale)
    assert per_row == [demo.cross_steps, demo.self_steps, demo.blend_threshold] * webapp.MAX_EDITS
    assert follow.outputs[-1].elem_id == "status" and status == gr.skip()


def test_the_form_starts_filled_with_an_edit_the_default_model_draws(built):
    app = built("demo")
    form = webapp.Form.of(_handler(app, "run_edit").inputs)
    assert form.source.value == "a big red circle in the center on a white background"
    assert form.rows[0].prompt.value == "a big purple circle in the center on a white background"
    assert form.source.placeholder is None and form.rows[0].prompt.placeholder is None  # no grey text that looks filled
    assert "big" in [choice for choice, _ in form.rows[0].blend_source.choices]  # the word pickers offer its words
    # The first Run, with the form as it starts, draws the edit.
    gallery, _, _, _, status = _click_run(app, _start(app))
    assert "Saved to" in status and len(gallery["value"]) == 2


def test_a_run_takes_the_models_defaults_for_sliders_left_at_them_and_says_so(built):
    app = built("demo")
    form = _start(app)  # the sliders at the model's defaults
    defaults = webapp.runs.load_editor("demo")[0].defaults
    source = "a big red circle in the center on a white background"
    edit = source.replace("circle", "star")
    form.source, form.steps, form.rows[0].prompt = source, 2, edit
    form.rows[0].blend_source, form.rows[0].blend_edit = ["circle"], ["star"]
    _, files, _, _, status = _click_run(app, form)
    (spec,) = read_recipe(files[1]).edits
    cross, self_steps, why = defaults.windows_for(source, edit)
    assert (spec["cross_steps"], spec["self_steps"]) == (cross, self_steps)
    assert (cross, self_steps) != (defaults.cross_steps, defaults.self_steps)
    assert spec["blend"]["threshold"] == defaults.blend_threshold
    assert "Defaults: " in status and why in status and f"guidance {defaults.guidance_scale:g}" in status
    assert "2 steps" not in status  # the steps slider was moved: not a default


def test_gallery_captions_name_the_edited_words(built):
    app = built("demo")
    form = _start(app)
    source = "a big red circle in the center on a white background"
    form.source, form.seed, form.steps, form.rows[0].prompt = source, 1, 2, source.replace("red", "green")
    gallery, *_ = _click_run(app, form)
    assert [caption for _, caption in gallery["value"]] == [f"source: {source}", "edit 1: red -> green"]


def test_an_upload_is_edited_as_a_reconstruction_and_the_status_says_how_it_was_fitted_and_which_words_are_unknown(
        built, tmp_path):
    app = built("demo")
    photo = tmp_path / "wide.png"
    Image.fromarray(np.full((64, 128, 3), 240, np.uint8)).save(photo)  # 128x64: the demo model edits 64x64
    source = "a big red circle in the center on a white background"
    form = _start(app)
    form.source, form.steps, form.image, form.method = source, 2, str(photo), "direct"
    form.rows[0].prompt = source.replace("red", "light green")
    gallery, *_, status = _click_run(app, form)
    assert [caption for _, caption in gallery["value"]] == [f"reconstruction: {source}", "edit 1: red -> light green"]
    assert ("Note: the image is 128x64 px: it was resized and centre-cropped to the model's 64x64 px, the size of "
            "the results.") in status
    assert "Warning: the model was never trained on the word 'light'" in status
