"""Running the cases: every category's cases, the replay assets, and `run_case`, which runs one case in a fresh
subprocess, in a fresh folder, and classifies what it did."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .case import CANARY, CATEGORIES, EDIT, FAST, INLINE, SRC, Case, Context, quote, short, with_changes
from .cases_api import api_cases
from .cases_batch import batch_cases
from .cases_cli import cli_cases
from .cases_image import image_cases
from .cases_replay import replay_cases
from .cases_syntax import syntax_cases
from .cases_web import web_cases
from .classify import LEAKED_TYPES, check_pngs, classify_cli, classify_snippet, unexpected
from .inputs import write_image

CLI_CODE = "from prompt2prompt.cli import main; main()"  # what the `p2p` entry point runs
HERE = Path(__file__).resolve().parent
# What an API or web case runs: child.py, started with `-c` so that the case's cwd stays first on sys.path.
CHILD_CODE = f"import runpy; runpy.run_path({str(HERE / 'child.py')!r}, run_name='__main__')"
PRELUDES = {"api": HERE / "prelude_api.py", "web": HERE / "prelude_web.py"}

# Environment variables that would send files elsewhere than the case's HOME/TMPDIR, or change the model.
SCRUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE",
             "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "GRADIO_TEMP_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "TRITON_CACHE_DIR", "MPLCONFIGDIR", "P2P_MODEL", "P2P_ALLOW_LARGE", "PYTHONSTARTUP", "TMP", "TEMP",
             "TEMPDIR", "PYTHONHOME", "RAY_ADDRESS")


def all_cases() -> dict[str, list[Case]]:
    """Every category's cases, in the order they run."""
    makers = {"syntax": syntax_cases, "cli": cli_cases, "image": image_cases, "replay": replay_cases,
              "batch": batch_cases, "api": api_cases, "web": web_cases}
    cases = {category: makers[category]() for category in CATEGORIES}
    for category, items in cases.items():
        names = [case.name for case in items]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SystemExit(f"harness bug: duplicate case names in {category}: {duplicates}")
    return cases


def prepare_assets(ctx: Context, names: Iterable[str] = ("edit", "attn", "img")) -> None:
    """Run the CLI once per asset in `names` (an edit, an attention grid, a real-image edit) to get genuine recipes
    for the replay cases."""
    folder = ctx.base / "assets"
    for name in ("home", "tmp", "cwd"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    photo = write_image(folder / "photo.png", "png")
    # Each run goes into a new numbered folder under --out; `latest` links to the newest.
    runs = {
        "edit": (["edit", INLINE, *FAST, "--out", str(folder / "edit")], folder / "edit" / "latest" / "edit-1.png"),
        "attn": (["attention", SRC, *FAST, "--res", "4", "--out", str(folder / "attn")],
                 folder / "attn" / "latest" / "image.png"),
        "img": (["edit", "--image", str(photo), "--prompt", SRC, "--to", EDIT, "--steps", "2", "--inversion", "ddim",
                 "--out", str(folder / "img")], folder / "img" / "latest" / "edit-1.png"),
    }
    from PIL import Image

    env = child_env(folder, {}, ctx.threads)
    for name in names:
        args, png = runs[name]
        if not png.is_file():
            done = subprocess.run([ctx.python, "-c", CLI_CODE, *args], cwd=folder / "cwd", env=env,
                                  capture_output=True, text=True, timeout=max(ctx.timeout, 120))
            if done.returncode != 0 or not png.is_file():
                raise SystemExit(f"cannot make the replay asset {name}: exit {done.returncode}\n{done.stderr[-2000:]}")
        with Image.open(png) as image:
            ctx.assets[name] = (png, json.loads(image.text["prompt2prompt"]))
    ctx.assets["photo"] = (photo, {})


def child_env(root: Path, extra: dict[str, str | None], threads: int) -> dict[str, str]:
    """The environment of a case's process: HOME and TMPDIR in its folder, none of SCRUB_ENV, then `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in SCRUB_ENV}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return with_changes(env, extra)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (not following links): its kind, size and modification time."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            kind = "dir" if os.path.isdir(path) and not os.path.islink(path) else "link" if os.path.islink(path) else "file"
            found[rel] = (kind, info.st_size if kind == "file" else 0, info.st_mtime_ns if kind == "file" else 0)
    return found


def _allowed(rel: str, allowed: tuple[str, ...]) -> bool:
    return any(rel == prefix or rel.startswith(prefix.rstrip("/") + "/") for prefix in allowed)


def run_case(case: Case, ctx: Context, keep: str) -> dict:
    """Set up, run and classify `case` in a new folder under `ctx.base / "cases"`; return its report record.

    The record's `outcome` is "ok", "error" (a clean error), "violation" or "harness-error"; `violations` and
    `notes` say why, and `unexpected` says when the exit code is not one `case.expect` allows. `keep` is "all",
    "violations" or "none": which case folders stay on disk.
    """
    root = Path(tempfile.mkdtemp(prefix=f"{case.category}-", dir=ctx.base / "cases"))
    for name in ("home", "tmp", "cwd", "in"):
        (root / name).mkdir()
    record: dict[str, Any] = {"id": case.id, "category": case.category, "name": case.name, "expect": case.expect,
                              "folder": str(root), "why": case.why}
    try:
        if case.setup is not None:
            case.setup(root, ctx)
    except Exception as error:  # noqa: BLE001
        record.update(outcome="harness-error", violations=[], notes=[f"setup failed: {type(error).__name__}: {error}"])
        return record
    before = snapshot(root)
    env = child_env(root, case.env, ctx.threads)

    def fill(arg):
        if isinstance(arg, bytes):
            return arg.replace(b"@IN@", bytes(root / "in")).replace(b"@OUT@", bytes(root / "out")).replace(
                b"@ROOT@", bytes(root))
        return arg.replace("@IN@", str(root / "in")).replace("@OUT@", str(root / "out")).replace("@ROOT@", str(root))

    if case.args is not None:
        argv = [ctx.python, "-c", CLI_CODE, *map(fill, case.args)]
        shown_args = " ".join(quote(a) for a in case.args)
    else:
        argv = [ctx.python, "-c", CHILD_CODE, str(PRELUDES[case.category]), str(root), str(root / "in"),
                str(root / "out"), case.code]
        shown_args = case.code
    record["args"] = shown_args
    record["command"] = (f"cd {quote(str(root / 'cwd'))} && env HOME={quote(str(root / 'home'))} "
                         f"TMPDIR={quote(str(root / 'tmp'))} OMP_NUM_THREADS={ctx.threads} "
                         + "".join(f"{k}={quote(v)} " for k, v in case.env.items() if v is not None)
                         + " ".join(quote(a) for a in argv))
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    started = time.monotonic()
    timed_out = False
    try:
        process = subprocess.Popen(argv, cwd=root / "cwd", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except (OSError, ValueError) as error:
        record.update(outcome="harness-error", violations=[], notes=[f"cannot start: {error}"])
        return record
    try:
        out_bytes, err_bytes = process.communicate(timeout=ctx.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the case's own process group: its workers too
        except ProcessLookupError:
            pass
        out_bytes, err_bytes = process.communicate()
    seconds = time.monotonic() - started
    rc = process.returncode
    stdout = out_bytes.decode("utf-8", "replace")
    stderr = err_bytes.decode("utf-8", "replace")
    violations: list[str] = []
    notes: list[str] = []

    # payload of API/web snippets
    payload = None
    if case.code is not None:
        for line in stdout.splitlines():
            if line.startswith("@@P2P@@"):
                try:
                    payload = json.loads(line[len("@@P2P@@"):])
                except ValueError:
                    pass
        stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith("@@P2P@@"))

    if timed_out:
        violations.append(f"hang: no exit after {ctx.timeout:g} s")
    elif rc < 0:
        violations.append(f"killed by signal {-rc} ({signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else '?'})")
    elif case.args is not None and rc not in (0, 1, 2):
        violations.append(f"exit code {rc}")
    if "Traceback (most recent call last)" in stdout + stderr:
        violations.append("traceback in the output")

    # files
    after = snapshot(root)
    allowed = case.allowed
    stray = sorted(rel for rel, info in after.items() if (rel not in before or before[rel] != info)
                   and not _allowed(rel, allowed) and not any(rel == a.rsplit("/", 1)[0] for a in allowed))
    canaries = sorted(rel for rel in after if os.path.basename(rel).startswith(CANARY))
    if canaries:
        violations.append(f"CODE EXECUTED: canary file(s) {canaries}")
    if stray:
        shown = ", ".join(short(s, 80) for s in stray[:5]) + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
        (notes if case.category == "api" else violations).append(f"wrote outside --out: {shown}")
    removed = sorted(rel for rel in before if rel not in after and not _allowed(rel, allowed))
    if removed:
        notes.append(f"removed input paths: {', '.join(short(r, 60) for r in removed[:3])}")
    new_tmp = sorted(set(os.listdir(tempfile.gettempdir())) - tmp_before - {ctx.base.name})
    if new_tmp and ctx.jobs == 1:
        notes.append(f"new entries in the system temp folder during the case (maybe another process): {new_tmp[:3]}")

    # outcome
    outcome = None
    if case.args is not None:
        if not timed_out and rc in (0, 1, 2):
            classify_cli(case, rc, stdout, stderr, violations, notes)
            outcome = "ok" if rc == 0 else "error"
        code_seen = rc
    else:
        if not timed_out:
            if rc != 0:
                violations.append(f"the interpreter exited with {rc}")
            outcome = classify_snippet(case, payload, violations, notes)
        code_seen = {"ok": 0, "error": 2}.get(outcome or "", None)
    if outcome == "ok":
        pngs = check_pngs(root, allowed)
        if pngs:
            violations += [f"{problem} with exit 0" for problem in pngs]
    elif outcome == "error" and case.args is not None and case.category != "batch":
        leftovers = [rel for rel in after if _allowed(rel, allowed) and after[rel][0] == "file"]
        if leftovers:
            notes.append(f"a failed run left files in --out: {', '.join(short(r, 60) for r in leftovers[:3])}")
    if outcome == "error" and case.category == "web":
        left = [p.name for p in (root / "out").iterdir() if p.name != ".gradio"] if (root / "out").is_dir() else []
        if left:
            notes.append(f"a failed run left folders in the output folder: {left[:3]}")
    if case.check is not None and not timed_out:
        try:
            violations += case.check(root, {"rc": rc, "stdout": stdout, "stderr": stderr})
        except Exception as error:  # noqa: BLE001
            notes.append(f"check failed: {type(error).__name__}: {error}")
    if case.category == "batch" and (root / "out" / "results.jsonl").is_file():
        for text in (root / "out" / "results.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                continue
            error = str(row.get("error") or "") if isinstance(row, dict) else ""
            if "Traceback" in error or "\n" in error.strip():
                violations.append(f"results.jsonl error is not one line: {short(error, 160)}")
            if LEAKED_TYPES.match(error):
                notes.append(f"a job failed with {short(error, 140)}")

    # expectation
    mismatch = None
    if outcome is not None and code_seen is not None and not violations:
        mismatch = unexpected(case, code_seen)
        if mismatch:
            notes.append(mismatch)
    record.update(outcome="violation" if violations else (outcome or "violation"), rc=rc, seconds=round(seconds, 2),
                  timed_out=timed_out, violations=violations, notes=notes, unexpected=mismatch, payload=payload,
                  stderr_tail=stderr[-1500:], stdout_tail=stdout[-600:])
    if keep == "all" or (keep == "violations" and violations):
        record["kept"] = True
    else:
        shutil.rmtree(root, ignore_errors=True)
        record["kept"] = False
    return record
