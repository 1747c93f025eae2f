"""batch: `p2p batch MANIFEST` with malformed manifests, odd files, bad options, and damaged output folders."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .case import EDIT, SRC, Case, short, with_changes
from .inputs import afile, canary_module, demo_index, image_at, make_fifo, make_sparse, model_folder, setup_all

_DROP = object()  # a `line(key=_DROP)` leaves the key out
_DIR = object()  # an `out_state(name=_DIR)` makes a folder


def batch_cases() -> list[Case]:
    """`p2p batch MANIFEST`: malformed manifests, odd files, bad options, and damaged output folders."""
    good = {"source": SRC, "edits": [EDIT], "num_inference_steps": 2, "seed": 1}
    cases: list[Case] = []

    def line(**changes) -> dict:
        return with_changes(copy.deepcopy(good), changes, drop=_DROP)

    def add(name, lines=None, expect="usage", *, raw: bytes | Callable[[Path], bytes] | None = None,
            extra=("--workers", "0"), manifest="@IN@/m.jsonl", setup_extra=None, check=None, env=None):
        def setup(root, ctx):
            if raw is not None:
                data = raw(root) if callable(raw) else raw
            else:
                data = "\n".join(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
                                 for item in lines).encode("utf-8", "surrogatepass") + b"\n"
            (root / "in" / "m.jsonl").write_bytes(data)
            if setup_extra is not None:
                setup_extra(root, ctx)
        cases.append(Case("batch", name, args=["batch", manifest, "--out", "@OUT@", *extra], expect=expect,
                          setup=setup, check=check, env=env or {}))

    add("baseline", [good], "ok")
    add("empty-file", raw=b"")
    add("blank-lines-only", raw=b"\n\n   \n")
    add("whitespace-lines", raw=b"\t\n\r\n \x0b\n")
    add("bom-then-good", raw=b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n", expect="any")
    add("crlf-endings", raw=(json.dumps(good) + "\r\n" + json.dumps(line(seed=2)) + "\r\n").encode(), expect="ok")
    add("cr-only-endings", raw=(json.dumps(good) + "\r" + json.dumps(line(seed=2)) + "\r").encode(), expect="ok")
    add("u2028-inside-string", [line(source="a big red circle\u2028in the center on a white background")], "ok")
    add("nel-x85-inside-string", [line(source="a big red circle\x85in the center on a white background")], "ok")
    add("non-utf8-byte", raw=json.dumps(good).encode().replace(b"big", b"b\xe9g") + b"\n")
    add("utf16-manifest", raw=(json.dumps(good) + "\n").encode("utf-16"))
    add("line-5MB-garbage", raw=b"x" * (5 << 20) + b"\n")
    add("line-5MB-source", [line(source="red " * (5 << 18))], "error")
    for name, value in [("list", []), ("number", 5), ("string", "job"), ("null", None)]:
        add(f"line-json-{name}", [json.dumps(value)])
    add("line-deep-nesting", ["[" * 100_000 + "]" * 100_000])
    add("line-seed-5000-digits", [json.dumps(good).replace('"seed": 1', '"seed": ' + "7" * 5000)])
    for name, changes in [("seed-string", dict(seed="1")), ("seed-float", dict(seed=1.5)), ("seed-negative", dict(seed=-1)),
                          ("seed-2-pow-63", dict(seed=2**63)), ("steps-bool", dict(num_inference_steps=True)),
                          ("steps-string", dict(num_inference_steps="2")),
                          ("steps-million", dict(num_inference_steps=10**6)),
                          ("guidance-string", dict(guidance_scale="7.5")), ("height-string", dict(height="64")),
                          ("edits-string", dict(edits=EDIT)), ("edits-empty", dict(edits=[])),
                          ("edits-int-item", dict(edits=[5])), ("edit-prompt-null", dict(edits=[{"prompt": None}])),
                          ("negative-prompt-int", dict(negative_prompt=5)), ("model-empty", dict(model="")),
                          ("model-int", dict(model=5)), ("edits-65", dict(edits=[EDIT] * 65)),
                          ("max-sequence-length-string", dict(max_sequence_length="77"))]:
        add(name, [line(**changes)])
    add("guidance-NaN-literal", [json.dumps(good).replace('"seed": 1', '"seed": 1, "guidance_scale": NaN')])
    add("height-24", [line(height=24)], "error")
    add("weights-empty-word", [line(edits=[{"prompt": EDIT, "weights": {"": 2}}])], "error")
    add("weights-position-0", [line(edits=[{"prompt": EDIT, "weights": [[0, 2]]}])], "ok")
    add("weights-position-99", [line(edits=[{"prompt": EDIT, "weights": [[99, 2]]}])], "error")
    add("weights-digit-key", [line(edits=[{"prompt": EDIT, "weights": {"1": 2}}])], "any")
    add("blend-word-absent", [line(edits=[{"prompt": EDIT, "blend": {"source_words": ["zebra"],
                                                                      "edit_words": ["green"]}}])], "error")
    add("negative-prompt-over-77", [line(negative_prompt="dark " * 90)], "error")
    add("max-sequence-length-on-demo", [line(max_sequence_length=77)], "error")
    for name, key in [("alias-steps", "steps"), ("capitalised-Source", "Source"), ("proto", "__proto__")]:
        add(f"unknown-field-{name}", [{**good, key: 2}])
    for name, job_id in [("newline-at-end", "a\n"), ("slash", "a/b"), ("dotdot", ".."), ("dot", "."),
                         ("traversal", "../../x"), ("leading-dash", "-a"), ("101-chars", "a" * 101), ("empty", ""),
                         ("int", 5), ("fullwidth-letter", "\uff41"), ("nul", "a\u0000"), ("space", "a b"),
                         ("trailing-dot-ok", "a."), ("unicode-digit", "\u0661")]:
        add(f"id-{name}", [line(id=job_id)], "ok" if name == "trailing-dot-ok" else "usage")
    add("duplicate-explicit-ids", [line(id="j1"), line(id="j1", seed=2)])
    add("duplicate-identical-lines", [good, good])
    add("duplicate-ids-skip-invalid", [line(id="j1"), line(id="j1", seed=2)], "ok",
        extra=("--workers", "0", "--skip-invalid"))
    # images and inversions
    photo = image_at("photo.png", "png")
    for name, value, setup_extra in [("missing", "nowhere.png", None), ("empty-string", "", None), ("dir", ".", None),
                                     ("etc-passwd", "/etc/passwd", None),
                                     ("traversal", "../../../../../../etc/hostname", None),
                                     ("tilde-nobody", "~nobody/x.png", None),
                                     ("fifo", "fifo.png", lambda root, ctx: make_fifo(root / "in" / "fifo.png")),
                                     ("truncated", "t.png", image_at("t.png", "truncated-png")),
                                     ("bomb", "b.png", image_at("b.png", "bomb-30000")),
                                     ("sparse-200GB", "huge.png",
                                      lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30)),
                                     ("int", 5, None)]:
        add(f"image-{name}", [line(image=value, seed=_DROP)], "usage", setup_extra=setup_extra)
    add("image-valid-ddim", [line(image="photo.png", inversion="ddim", seed=_DROP)], "ok", setup_extra=photo)
    add("image-with-seed", [line(image="photo.png", inversion="ddim")], setup_extra=photo)
    add("inversion-without-image", [line(inversion="ddim")])
    add("inversion-euler-on-demo", [line(image="photo.png", inversion="euler", seed=_DROP)], "error",
        setup_extra=photo)
    add("inversion-bogus", [line(image="photo.png", inversion="bogus", seed=_DROP)], setup_extra=photo)
    add("inversion-inner-steps-huge", [line(image="photo.png", inversion={"method": "null-text",
                                                                          "num_inner_steps": 10**9}, seed=_DROP)],
        setup_extra=photo)
    # models named by lines
    for name, model, expect in [("relative-missing", "./nope", "usage"), ("absolute-missing", "/nonexistent/model", "usage"),
                                ("safetensors-missing", "x.safetensors", "usage"), ("three-slashes", "a/b/c", "usage"),
                                ("hub-bogus", "bogus-org/bogus-model", "error"), ("nul", "demo\u0000", "usage")]:
        add(f"model-{name}", [line(model=model)], expect, env={"HF_HUB_OFFLINE": "1"})
    add("model-malformed-index", [line(model="model")], "error",
        setup_extra=lambda root, ctx: model_folder(root, index_text="{"))
    add("model-canary-library", [line(model="model")], "error",
        setup_extra=lambda root, ctx: (canary_module(root),
                                       model_folder(root, index={**demo_index(), "unet": ["canary_mod", "Canary"]})))

    # good and bad jobs together
    mixed = [line(id="good-1"), line(id="bad-2", edits=[{"prompt": EDIT, "blend": {"source_words": ["zebra"],
                                                                                   "edit_words": ["green"]}}]),
             line(id="good-3", seed=3)]
    expected = _rows_check({1: "done", 2: "failed", 3: "done"}, {2: "zebra"})
    add("mixed-good-bad-inline", mixed, "runtime", check=expected)
    add("mixed-good-bad-batch-size-4", mixed, "runtime", extra=("--workers", "0", "--batch-size", "4"), check=expected)
    add("mixed-good-bad-process-pool", mixed, "runtime", extra=(), check=expected)
    add("mixed-valid-and-invalid-skip", [line(id="good-1"), line(id="bad", seed="x")], "ok",
        extra=("--workers", "0", "--skip-invalid"), check=_rows_check({1: "done"}, {}))
    add("skip-invalid-all-invalid", [line(seed="x"), "not json", line(edits=[])], "error",
        extra=("--workers", "0", "--skip-invalid"))
    # options
    for name, extra, expect in [("batch-size-0", ("--batch-size", "0"), "usage"),
                                ("batch-size-negative", ("--batch-size", "-1"), "usage"),
                                ("batch-size-huge", ("--workers", "0", "--batch-size", str(10**30)), "ok"),
                                ("workers-negative", ("--workers", "-1"), "usage"),
                                ("workers-huge", ("--workers", str(10**30)), "any"),
                                ("workers-string", ("--workers", "two"), "usage"),
                                ("ray-bogus-scheme", ("--ray", "bogus://x"), "error"),
                                ("ray-auto-no-cluster", ("--ray", "auto"), "error"),
                                ("ray-client-closed-port", ("--ray", "ray://127.0.0.1:1"), "error"),
                                ("score-missing-module", ("--workers", "0", "--score", "no_such_module:f"), "usage"),
                                ("score-not-callable", ("--workers", "0", "--score", "os:sep"), "usage"),
                                ("score-wrong-signature", ("--workers", "0", "--score", "builtins:len"), "error"),
                                ("score-no-colon", ("--workers", "0", "--score", "os.path"), "usage"),
                                ("score-canary-module", ("--workers", "0", "--score", "canary_mod:Canary"), "any"),
                                ("min-score-without-score", ("--workers", "0", "--min-score", "0.2"), "usage"),
                                ("min-score-minus-inf", ("--workers", "0", "--min-score", "-inf"), "usage"),
                                ("min-score-1e309", ("--workers", "0", "--min-score", "1e309"), "usage"),
                                ("model-option-missing", ("--workers", "0", "--model", "/nonexistent/model"), "usage"),
                                ("model-option-empty", ("--workers", "0", "--model", ""), "usage"),
                                ("device-cuda", ("--workers", "0", "--device", "cuda"), "runtime"),
                                ("dtype-int8", ("--workers", "0", "--dtype", "int8"), "usage"),
                                ("out-is-a-file", ("--workers", "0"), "runtime")]:
        setup_extra = (lambda root, ctx: canary_module(root)) if "canary" in name else None
        add(name, [good], expect, extra=extra, setup_extra=setup_extra)
    cases[-1].args = ["batch", "@IN@/m.jsonl", "--out", "@IN@/afile", "--workers", "0"]
    cases[-1].setup = setup_all(cases[-1].setup, afile)
    for name, manifest, expect, setup_extra in [
        ("manifest-directory", "@IN@", "usage", None),
        ("manifest-fifo", "@IN@/fifo.jsonl", "error", lambda root, ctx: make_fifo(root / "in" / "fifo.jsonl")),
        ("manifest-dev-null", "/dev/null", "usage", None),
        ("manifest-proc-status", "/proc/self/status", "usage", None),
        ("manifest-missing", "@IN@/nowhere.jsonl", "usage", None),
    ]:
        add(name, [good], expect, manifest=manifest, setup_extra=setup_extra)
    # damaged output folders (files a user can leave there)
    def out_state(**files):
        def setup(root, ctx):
            out = root / "out"
            for rel, content in files.items():
                path = out / rel.replace("__", "/")
                path.parent.mkdir(parents=True, exist_ok=True)
                if content is _DIR:
                    path.mkdir()
                elif isinstance(content, tuple) and content[0] == "symlink":
                    path.symlink_to(content[1])
                else:
                    path.write_bytes(content)
        return setup
    for name, files, expect in [
        ("results-is-a-directory", {"results.jsonl": _DIR}, "runtime"),
        ("jobs-is-a-file", {"jobs": b"x"}, "runtime"),
        ("results-garbage-bytes", {"results.jsonl": b"\xff\xfe\x00garbage\n{\n"}, "ok"),
        ("results-odd-rows", {"results.jsonl": b'{"id": 5, "status": "done"}\n{"status": "done"}\n[]\n'
                                               b'{"id": "j1", "status": ["done"]}\n'}, "ok"),
        ("staging-is-a-file", {".staging": b"x"}, "ok"),
        ("job-folder-without-job-json", {"jobs__j1": _DIR}, "runtime"),
        ("job-json-is-a-list", {"jobs__j1__job.json": b"[]"}, "runtime"),
        ("job-json-is-garbage", {"jobs__j1__job.json": b"\xff{"}, "runtime"),
        ("job-json-deep", {"jobs__j1__job.json": b"[" * 100_000 + b"]" * 100_000}, "runtime"),
        ("job-json-done-with-odd-paths", {"jobs__j1__job.json": json.dumps(
            {"id": "j1", "status": "done", "paths": ["../../../../etc/passwd"], "line": "x"}).encode()}, "any"),
        ("job-folder-symlink-to-etc", {"jobs__j1": ("symlink", "/etc")}, "runtime"),
        ("stale-lock-file", {".lock": b"12345\n"}, "ok"),
        ("lock-is-a-directory", {".lock": _DIR}, "runtime"),
    ]:
        add(f"out-{name}", [line(id="j1")], expect, setup_extra=out_state(**files))
    return cases


def _rows_check(statuses: dict[int, str], error_mentions: dict[int, str]) -> Callable[[Path, dict], list[str]]:
    """Check results.jsonl: each manifest line's status, and that failed rows name their own problem."""
    def check(root: Path, result: dict) -> list[str]:
        index = root / "out" / "results.jsonl"
        if not index.is_file():
            return ["results.jsonl is missing"]
        rows: dict[Any, dict] = {}
        problems = []
        for text in index.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                problems.append(f"results.jsonl has a line that is not JSON: {text[:80]!r}")
                continue
            rows[row.get("line")] = row
        for number, status in statuses.items():
            row = rows.get(number)
            if row is None:
                problems.append(f"manifest line {number} has no row in results.jsonl")
            elif row.get("status") != status:
                problems.append(f"manifest line {number} is {row.get('status')!r}, expected {status!r} "
                                f"(error: {short(row.get('error'))})")
        for number, text in error_mentions.items():
            error = str((rows.get(number) or {}).get("error"))
            if text not in error:
                problems.append(f"manifest line {number}'s error does not name its problem {text!r}: {short(error)}")
        return problems
    return check
