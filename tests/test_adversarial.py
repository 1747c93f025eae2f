"""A slice of the adversarial harness (`scripts/adversarial/`) in the suite.

One or two cases per category, picked by name, run through the harness's own `run_case` (a fresh subprocess on
the demo model, in a fresh folder) and classifiers; each must end as its case expects: a one-line error, or a
result whose images are not black, with no violation. The controls run the same runner and the same check on
outcomes that must fail it: a traceback, a silent no-op, a black image, an unexpected exception type.

The whole harness (1,102 cases, about 45 minutes): `python -m scripts.adversarial`, see docs/development.md.
"""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root, where `scripts/` lives
from scripts.adversarial import run as harness  # noqa: E402
from scripts.adversarial.case import Case, Context  # noqa: E402

# Seconds before a case counts as a hang; above the harness's 60 s, since the suite may share a busy core.
TIMEOUT = 180

SLICE = [
    "syntax/nested-swap-in-old",  # a prompt syntax error: `error: column N: ...`, the prompt, a caret line
    "cli/steps='-1'",  # an option out of range: exit 2 before anything loads
    "cli/model-index-unet-from-canary",  # a model_index naming a module in the cwd: exit 1, the module never runs
    "image/missing-file",  # --image naming no file: exit 2
    "replay/baseline-edit",  # a genuine recipe (made by the demo) replays into an image that is not black
    "batch/id-traversal",  # a job id "../../x": refused, nothing written outside --out
    "api/edit-cross-steps-nan",  # Edit(cross_steps=nan): a one-line ValueError
    "web/model-etc",  # the Run button with model='/etc': a gradio.Error
]


def failures(case: Case, record: dict) -> list[str]:
    """Why `record` is not the outcome `case` expects: its violations, its outcome, an unexpected exit code."""
    expected = {"ok": {"ok"}, "any": {"ok", "error"}}.get(case.expect, {"error"})
    found = list(record["violations"])
    if record["outcome"] not in expected:
        found.append(f"outcome {record['outcome']!r}, expected one of {sorted(expected)}")
    if record.get("unexpected"):
        found.append(record["unexpected"])
    return found


def describe(record: dict) -> str:
    return f"notes: {record['notes']}\nstderr: {record.get('stderr_tail', '')[-800:]}"


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {case.id: case for items in harness.all_cases().values() for case in items}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    base = tmp_path_factory.mktemp("adversarial")
    (base / "cases").mkdir()
    return Context(base=base, python=sys.executable, timeout=TIMEOUT, threads=1)


def fake_python(folder: Path, body: str) -> str:
    """An executable standing in for the interpreter the runner starts: it runs `body` with the runner's argv."""
    path = folder / "fake-python"
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_slice_covers_every_category(cases):
    assert {case_id.split("/")[0] for case_id in SLICE} == set(harness.CATEGORIES)
    assert all(case_id in cases for case_id in SLICE)


@pytest.mark.parametrize("case_id", SLICE)
def test_case_ends_as_expected(case_id, cases, ctx):
    case = cases[case_id]
    harness.prepare_assets(ctx, case.assets)
    record = harness.run_case(case, ctx, keep="none")
    assert failures(case, record) == [], describe(record)


def test_control_traceback_fails(cases, ctx, tmp_path):
    case = cases["cli/steps='-1'"]
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'steps'\n"
    ctx = Context(base=ctx.base, python=fake_python(tmp_path, f"sys.stderr.write({traceback!r}); sys.exit(1)"),
                  timeout=TIMEOUT, threads=1)
    record = harness.run_case(case, ctx, keep="none")
    assert record["outcome"] == "violation"
    assert "traceback in the output" in failures(case, record)


def test_control_silent_no_op_fails(cases, ctx, tmp_path):
    case = cases["cli/steps='-1'"]  # accepted without a word, exit 0
    ctx = Context(base=ctx.base, python=fake_python(tmp_path, "sys.exit(0)"), timeout=TIMEOUT, threads=1)
    record = harness.run_case(case, ctx, keep="none")
    assert failures(case, record) == ["outcome 'ok', expected one of ['error']", "expected usage, got success"]


def test_control_black_image_fails(cases, ctx, tmp_path):
    case = cases["syntax/two-swaps"]  # expects a result: here an all-black PNG in --out, exit 0
    body = ("from pathlib import Path\nfrom PIL import Image\nout = Path(sys.argv[sys.argv.index('--out') + 1])\n"
            "out.mkdir(parents=True)\nImage.new('RGB', (8, 8)).save(out / 'edit-1.png')")
    ctx = Context(base=ctx.base, python=fake_python(tmp_path, body), timeout=TIMEOUT, threads=1)
    record = harness.run_case(case, ctx, keep="none")
    assert failures(case, record)[:1] == ["all-black PNG out/edit-1.png with exit 0"]


def test_control_unexpected_exception_fails(ctx):
    case = Case("api", "control-key-error", code="RESULT = {}['missing']", expect="error")
    record = harness.run_case(case, ctx, keep="none")
    assert [v.split(" [raised at")[0] for v in failures(case, record)] == [
        "unexpected exception type: KeyError: 'missing'", "outcome 'violation', expected one of ['error']"]
