"""replay: `p2p replay FILE.png` with recipes crafted into PNG text chunks, starting from real recipes of the demo
(the assets `run.prepare_assets` makes: an edit, an attention grid and a real-image edit)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .case import EDIT, SRC, Case, Context
from .inputs import (
    canary_module,
    demo_index,
    make_fifo,
    make_sparse,
    model_folder,
    png_chunk,
    raw_png,
    sha256,
    system_file,
    write_image,
    write_recipe_png,
)


def _set(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data.update(values)
    return mutate


def _drop(*keys) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        for key in keys:
            data.pop(key, None)
    return mutate


def _edit0(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data["edits"][0].update(values)
    return mutate


def _sched(**values) -> Callable[[dict, Path], None]:
    def mutate(data, root):
        data["scheduler"].update(values)
    return mutate


def _replace(value) -> Callable[[dict, Path], Any]:
    return lambda data, root: copy.deepcopy(value)


def _recipe_text(ctx: Context, steps: str = "2") -> str:
    """The edit asset's recipe as JSON text with guidance 7.5 and `steps` written as is (raw-text cases edit it)."""
    recipe = {**ctx.assets["edit"][1], "num_inference_steps": "@STEPS@", "guidance_scale": 7.5}
    return json.dumps(recipe).replace('"@STEPS@"', steps)


def replay_cases() -> list[Case]:
    """`p2p replay FILE.png`: recipes crafted into PNG text chunks (starting from real recipes of the demo)."""
    cases: list[Case] = []

    def add(name, mutate=None, expect="usage", *, asset="edit", raw=None, how="itxt", extra=(), png="@IN@/crafted.png",
            setup_extra=None, allowed=("out",), out=True, why=""):
        def setup(root, ctx):
            source_png, recipe = ctx.assets[asset]
            data = copy.deepcopy(recipe)
            if data.get("image"):
                shutil.copyfile(ctx.assets["photo"][0], root / "in" / "photo.png")
                data["image"]["path"] = "photo.png"
            if mutate is not None:
                changed = mutate(data, root)
                data = data if changed is None else changed
            text = raw(ctx) if callable(raw) else raw
            if text is None:
                text = json.dumps(data, ensure_ascii=False)
            write_recipe_png(source_png, root / "in" / "crafted.png", text, how)
            if setup_extra is not None:
                setup_extra(root, ctx)
        args = ["replay", png, *(["--out", "@OUT@"] if out else []), *extra]
        cases.append(Case("replay", name, args=args, expect=expect, setup=setup, allowed=allowed, why=why,
                          assets=tuple(dict.fromkeys(("edit", asset)))))

    add("baseline-edit", expect="ok")
    add("baseline-real-image", asset="img", expect="ok")
    add("baseline-attention", asset="attn", expect="ok")
    # source and edits
    add("source-int", _set(source=5))
    add("source-list", _set(source=["a"]))
    add("source-whitespace", _set(source="\t\n"))
    add("source-zwsp", _set(source="\u200b"), "any")
    add("source-over-77-tokens", _set(source=SRC * 10))
    add("source-with-markup", _set(source="a big [red->green] circle"), "any")
    add("source-control-chars", _set(source="a big\x1b[2J red\x00 circle"), "any")
    add("edits-object", _set(edits={"prompt": EDIT}))
    add("edits-string", _set(edits=EDIT))
    add("edits-null-item", _set(edits=[None]))
    add("edits-empty-source-only", _set(edits=[], image_index=0), "any")
    add("edits-65", lambda d, r: d.update(edits=[d["edits"][0]] * 65))
    add("edits-64", lambda d, r: d.update(edits=[d["edits"][0]] * 64), "ok")
    add("edit-weights-object", _edit0(weights={"green": 2}))
    add("edit-weights-string-weight", _edit0(weights=[["green", "2"]]))
    add("edit-weights-bool-weight", _edit0(weights=[["green", True]]))
    add("edit-weights-bool-word", _edit0(weights=[[True, 2]]))
    add("edit-weights-float-position", _edit0(weights=[[1.5, 2]]))
    add("edit-weights-position-99", _edit0(weights=[[99, 2]]))
    add("edit-weights-position-negative", _edit0(weights=[[-1, 2]]), "any")
    add("edit-weights-nan", _edit0(weights=[["green", float("nan")]]))
    add("edit-weights-triple", _edit0(weights=[["green", 2, 3]]))
    add("edit-weights-huge-list", _edit0(weights=[["green", 1.0]] * 100_000), "any")
    add("edit-cross-one-element", _edit0(cross_steps=[0.2]))
    add("edit-cross-three-elements", _edit0(cross_steps=[0.1, 0.5, 0.9]))
    add("edit-cross-string", _edit0(cross_steps="0.8"))
    add("edit-cross-word-absent", _edit0(cross_steps={"default": 0.8, "zebra": 0.3}))
    add("edit-cross-no-default", _edit0(cross_steps={"green": 0.3}), "any")
    add("edit-cross-bool", _edit0(cross_steps=True))
    add("edit-self-null", _edit0(self_steps=None), "any")
    add("edit-mode-uppercase", _edit0(mode="REPLACE"))
    add("edit-mode-null", _edit0(mode=None))
    add("edit-blend-threshold-2", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "threshold": 2}))
    add("edit-blend-extra-key", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "bogus": 1}))
    add("edit-blend-empty-words", _edit0(blend={"source_words": [], "edit_words": []}), "any")
    add("edit-blend-word-absent", _edit0(blend={"source_words": ["zebra"], "edit_words": ["green"]}))
    add("edit-blend-nested-words", _edit0(blend={"source_words": [["red"]], "edit_words": ["green"]}))
    add("edit-blend-start-nan", _edit0(blend={"source_words": ["red"], "edit_words": ["green"], "start": float("nan")}))
    add("edit-unknown-field", _edit0(strength=1))
    add("edit-empty-object", _set(edits=[{}]))
    add("edit-prompt-over-77", _edit0(prompt=EDIT * 10))
    # numbers
    for name, value in [("negative", -5), ("2-pow-63", 2**63), ("float", 1.0), ("string", "1"), ("bool", True)]:
        add(f"seed-{name}", _set(seed=value))
    add("seed-null", _set(seed=None), "ok")
    for name, value in [("zero", 0), ("1001", 1001), ("float", 2.0), ("bool", True), ("string", "2")]:
        add(f"steps-{name}", _set(num_inference_steps=value))
    add("steps-5000-digits", raw=lambda ctx: _recipe_text(ctx, steps="9" * 5000))
    for name, value in [("string", "7.5"), ("bool", True), ("1e308", 1e308), ("minus-101", -101.0)]:
        add(f"guidance-{name}", _set(guidance_scale=value))
    add("guidance-NaN-literal", raw=lambda ctx: _recipe_text(ctx).replace('7.5', 'NaN'))
    add("guidance-Infinity-literal", raw=lambda ctx: _recipe_text(ctx).replace('7.5', '-Infinity'))
    add("guidance-100", _set(guidance_scale=100.0), "any")
    for name, values in [("height-63", dict(height=63)), ("height-8", dict(height=8)), ("height-negative", dict(height=-64)),
                         ("height-bool", dict(height=True)), ("width-4104", dict(width=4104)),
                         ("size-4096", dict(height=4096, width=4096)), ("width-float", dict(width=64.0))]:
        add(name, _set(**values))
    add("size-128", _set(height=128, width=128), "ok")
    # model, revision, dtype, device, threads
    add("model-empty", _set(model=""))
    add("model-traversal", _set(model="../../../../etc"), "runtime")
    add("model-etc-passwd", _set(model="/etc/passwd"), "runtime")
    add("model-bogus-hub", _set(model="bogus-org/bogus-model"), "runtime")
    add("model-int", _set(model=5))
    add("model-url", _set(model="https://example.com/model"), "error")
    add("model-canary-folder", lambda d, r: d.update(model=str(r / "in" / "model")), "runtime",
        setup_extra=lambda root, ctx: (canary_module(root),
                                       model_folder(root, index={**demo_index(), "unet": ["canary_mod", "Canary"]})))
    add("model-relative-folder", _set(model="model"), "any",
        setup_extra=lambda root, ctx: model_folder(root))
    add("revision-traversal", _set(revision="../../../../etc/passwd"), "any")
    add("revision-int", _set(revision=5))
    add("revision-huge", _set(revision="r" * 100_000), "any")
    add("dtype-int8", _set(dtype="int8"))
    add("dtype-float16", _set(dtype="float16"), "any")
    add("dtype-int", _set(dtype=5))
    add("device-meta", _set(device="meta"), "any")
    add("device-int", _set(device=5))
    add("threads-zero", _set(threads=0))
    add("threads-257", _set(threads=257))
    add("threads-256", _set(threads=256), "ok")
    add("threads-float", _set(threads=1.5))
    # kind, attention, image index, cached source
    add("kind-attention-with-edits", _set(kind="attention"))
    add("kind-bogus", _set(kind="edit2"))
    add("record-attention-zero", _set(record_attention=0))
    add("record-attention-3", _set(record_attention=3))
    add("record-attention-4097", _set(record_attention=4097))
    add("record-attention-string", _set(record_attention="yes"))
    add("attention-record-false", _set(record_attention=False), asset="attn")
    add("attention-image-index-1", _set(image_index=1), asset="attn")
    add("image-index-negative", _set(image_index=-1))
    add("image-index-bool", _set(image_index=True))
    add("cached-source-string", _set(cached_source="yes"))
    add("cached-source-true", _set(cached_source=True), "ok")
    add("negative-prompt-int", _set(negative_prompt=5))
    add("negative-prompt-over-77", _set(negative_prompt="dark " * 90))
    # real images
    add("image-traversal", lambda d, r: d.update(image={"path": "../../../../etc/passwd", "sha256": "0" * 64}),
        asset="img")
    add("image-absolute-system-file", lambda d, r: d.update(image={"path": str(system_file()),
                                                                  "sha256": sha256(system_file())}),
        asset="img")
    add("image-dev-zero", lambda d, r: d["image"].update(path="/dev/zero"), asset="img")
    add("image-sha-mismatch", lambda d, r: d["image"].update(sha256="ab" * 32), asset="img")
    add("image-sha-uppercase", lambda d, r: d["image"].update(sha256=d["image"]["sha256"].upper()), asset="img")
    add("image-extra-key", lambda d, r: d["image"].update(size=5), asset="img")
    add("image-dir-path", lambda d, r: d["image"].update(path="."), asset="img")
    add("image-fifo", lambda d, r: d["image"].update(path="fifo"), asset="img",
        setup_extra=lambda root, ctx: make_fifo(root / "in" / "fifo"))
    add("image-not-an-image", lambda d, r: d["image"].update(path="text.png", sha256=sha256(
        write_image(r / "in" / "text.png", "text"))), asset="img")
    add("image-bomb", lambda d, r: d["image"].update(path="bomb.png", sha256=sha256(
        write_image(r / "in" / "bomb.png", "bomb-30000"))), asset="img")
    add("image-with-seed", _set(seed=1), asset="img")
    add("image-sparse-200GB", lambda d, r: d["image"].update(path="huge.png", sha256="0" * 64), asset="img",
        expect="error", setup_extra=lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30),
        why="replay hashes the recipe's input image before anything else reads it")
    add("inversion-euler-on-unet", lambda d, r: d["inversion"].update(method="euler"), asset="img")
    add("inversion-fit-stretch", lambda d, r: d["inversion"].update(fit="stretch"), asset="img")
    add("inversion-epsilon-negative", lambda d, r: d["inversion"].update(early_stop_epsilon=-1), asset="img")
    add("inversion-inner-steps-100", lambda d, r: d["inversion"].update(method="null-text", num_inner_steps=100),
        asset="img", expect="ok")
    add("inversion-without-image", _set(inversion={"method": "ddim"}))
    # schedulers
    for name, values, expect in [
        ("flowmatch-incompatible", dict(_class_name="FlowMatchEulerDiscreteScheduler"), "usage"),
        ("nonexistent-class", dict(_class_name="NoSuchScheduler"), "usage"),
        ("dotted-os-system", dict(_class_name="os.system"), "usage"),
        ("dunder-import", dict(_class_name="__import__"), "usage"),
        ("class-int", dict(_class_name=5), "usage"),
        ("zero-train-timesteps", dict(num_train_timesteps=0), "usage"),
        ("one-train-timestep", dict(num_train_timesteps=1), "any"),
        ("bad-beta-schedule", dict(beta_schedule="bogus"), "usage"),
        ("bad-prediction-type", dict(prediction_type="bogus"), "error"),
        ("bad-timestep-spacing", dict(timestep_spacing="bogus"), "usage"),
        ("dpm-bad-algorithm", dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="bogus"), "usage"),
        ("euler-ancestral", dict(_class_name="EulerAncestralDiscreteScheduler"), "ok"),
        ("trained-betas-zeros", dict(trained_betas=[0.0] * 1000), "any"),
        ("trained-betas-nan", dict(trained_betas=[float("nan")] * 1000), "any"),
        ("trained-betas-ones", dict(trained_betas=[1.0] * 1000), "any"),
        ("trained-betas-strings", dict(trained_betas=["x"] * 1000), "usage"),
        ("clip-sample-range-1e308", dict(clip_sample=True, clip_sample_range=1e308), "any"),
        ("steps-offset-5000", dict(steps_offset=5000), "any"),
        ("beta-end-negative", dict(beta_schedule="linear", beta_end=-1.0), "any"),
        ("betas-above-one", dict(beta_schedule="linear", beta_start=2.0, beta_end=3.0), "any"),
        ("thresholding-negative-max", dict(thresholding=True, sample_max_value=-1.0), "any"),
        ("set-alpha-to-one-string", dict(set_alpha_to_one="no"), "any"),
        ("deeply-nested-value", dict(steps_offset=[[[[[[[[[[1]]]]]]]]]]), "any"),
    ]:
        add(f"scheduler-{name}", _sched(**values), expect)
    add("scheduler-empty-object", _set(scheduler={}), "ok")
    add("scheduler-list", _set(scheduler=[]))
    add("scheduler-string", _set(scheduler="DDIMScheduler"))
    # family and format
    add("family-sd3-on-demo", _set(family="sd3", max_sequence_length=77))
    add("family-flux-without-length", _set(family="flux"))
    add("family-unet-with-length", _set(max_sequence_length=77))
    add("family-bogus", _set(family="bogus"))
    add("family-int", _set(family=5))
    for name, value in [("2", 2), ("string", "1"), ("float", 1.0), ("bool", True), ("null", None)]:
        add(f"format-{name}", _set(format=value))
    add("format-missing", _drop("format"))
    add("package-version-empty", _set(package_version=""))
    add("package-version-list", _set(package_version=[1]))
    # the recipe as a whole
    for name, value in [("list", []), ("number", 5), ("string", "recipe"), ("null", None), ("bool", True)]:
        add(f"recipe-json-{name}", _replace(value))
    add("recipe-empty-text", raw="")
    add("recipe-deep-list", raw="[" * 100_000 + "]" * 100_000)
    add("recipe-deep-source-950", raw=lambda ctx: _recipe_text(ctx)
        .replace(json.dumps(SRC), "[" * 950 + "]" * 950, 1))
    add("recipe-deep-edits-5000", raw=lambda ctx: _recipe_text(ctx)
        .replace('"edits": [', '"edits": [' + "[" * 5000 + "]" * 5000 + ",", 1))
    add("recipe-deep-scheduler-value", raw=lambda ctx: _recipe_text(ctx)
        .replace('"scheduler": {', '"scheduler": {"_class_name": "DDIMScheduler", "x": ' + "[" * 900 + "]" * 900 + ",",
                 1), expect="any")
    add("recipe-10MB-source", _set(source="a " * 5_000_000), "usage")
    add("recipe-10MB-garbage", raw="x" * 10_000_000)
    add("recipe-duplicate-keys", raw=lambda ctx: "{" + _recipe_text(ctx)[1:].replace('"source": ', '"source": 5, "source": ', 1),
        expect="any")
    add("recipe-unknown-dunder-key", _set(__class__="os.system"))
    add("recipe-missing-source", _drop("source"))
    add("recipe-bom-prefix", raw=lambda ctx: "\ufeff" + _recipe_text(ctx), expect="any")
    add("recipe-trailing-garbage", raw=lambda ctx: _recipe_text(ctx) + " x")
    add("recipe-latin1-text-chunk", how="text", expect="ok")
    add("recipe-compressed-itxt", how="itxt-zip", expect="ok")
    add("recipe-compressed-text-bomb", raw=lambda ctx: " " * (64 << 20) + "{}", how="itxt-zip", expect="usage")
    add("recipe-two-chunks", how="twice", expect="any")
    add("recipe-key-other-case", how="other-key")
    add("recipe-no-chunk", how="none")
    # the PNG file itself
    def truncated(root, ctx):
        path = root / "in" / "crafted.png"
        data = path.read_bytes()
        path.write_bytes(data[:-40])
    add("png-truncated-after-recipe", expect="any", setup_extra=truncated)

    def jpeg_named_png(root, ctx):
        from PIL import Image
        Image.open(ctx.assets["edit"][0]).convert("RGB").save(root / "in" / "crafted.png", format="JPEG",
                                                              comment=json.dumps(ctx.assets["edit"][1]).encode())
    add("png-is-a-jpeg-with-comment", setup_extra=jpeg_named_png)

    def bomb_with_recipe(root, ctx):
        text = json.dumps(ctx.assets["edit"][1]).encode()
        itxt = png_chunk(b"iTXt", b"prompt2prompt\0\0\0\0\0" + text)
        (root / "in" / "crafted.png").write_bytes(raw_png(30000, 30000, 8, 2, b"\0" * 64, itxt))
    add("png-bomb-header-with-recipe", setup_extra=bomb_with_recipe)

    def bomb_10000_with_recipe(root, ctx):
        text = json.dumps(ctx.assets["edit"][1]).encode()
        itxt = png_chunk(b"iTXt", b"prompt2prompt\0\0\0\0\0" + text)
        (root / "in" / "crafted.png").write_bytes(raw_png(10000, 10000, 8, 2, b"\0" * 64, itxt))
    add("png-10000-side-with-recipe", setup_extra=bomb_10000_with_recipe, expect="any")
    add("png-fifo", png="@IN@/fifo.png", setup_extra=lambda root, ctx: make_fifo(root / "in" / "fifo.png"),
        expect="error")
    add("png-directory", png="@IN@")
    add("png-missing", png="@IN@/nowhere.png")
    add("png-dev-null", png="/dev/null")
    add("png-dev-zero", png="/dev/zero", expect="error")
    add("default-out-beside-png", expect="ok", out=False, allowed=("in/replay",))
    add("override-model-bogus", extra=("--model", "/nonexistent/model"), expect="runtime")
    add("override-dtype-bogus", extra=("--dtype", "bogus"))
    add("override-device-meta", extra=("--device", "meta"))
    add("out-is-the-png", extra=(), png="@IN@/crafted.png", out=False, expect="runtime",
        setup_extra=lambda root, ctx: None)
    cases[-1].args = ["replay", "@IN@/crafted.png", "--out", "@IN@/crafted.png"]
    return cases
