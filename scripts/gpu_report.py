"""Write report.md and report.json for scripts/gpu_check.sh from what its steps left in one folder.

    python scripts/gpu_report.py outputs/gpu

The folder holds env.json (machine and versions), steps.tsv (one line per step: name, status, seconds, exit
code, time limit, note), junit-*.xml (pytest) and bench-*.json (the benchmarks' --json output). Anything
missing is reported as missing. Standard library only: it runs on the GPU machine's bare Python.
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

# The acceptance targets (README "GPU check"): SD 1.5 at 512 px, 50 steps, fp16, on an H100.
EDIT_TIME_MAX = 1.10  # fused edit / plain generation of the same two prompts, wall time
EDIT_MEMORY_MAX = 1.10  # the same, peak memory
NULL_TEXT_MAX_S = 15.0  # seconds per 512 px image
DIRECT_MAX_S = 3.0
TARGET = dict(size=512, steps=50, dtype="float16", device="cuda")

BENCHES = {"sd15": "SD 1.5 architecture", "sdxl": "SDXL architecture",
           "sd3": "SD3-medium architecture (1024 px, 28 steps, bf16)", "flux": "Flux.1-dev architecture (1024 px, 28 steps, bf16)",
           "chroma": "Chroma1-HD architecture (1024 px, 28 steps, bf16)",
           "pixart": "PixArt-Σ architecture (1024 px, 20 steps, bf16)",
           "qwenimage": "Qwen-Image architecture (60 blocks, 1024 px, 4 steps, bf16)",
           "flux2-klein": "FLUX.2 klein 4B architecture (5 + 20 blocks, 1024 px, 4 steps, bf16)",
           "zimage": "Z-Image architecture (30 blocks + 2 + 2 refiner blocks, 1024 px, 4 steps, bf16)",
           "flux2-dev": "FLUX.2 dev architecture (8 + 48 blocks, 1024 px, 4 steps, bf16)"}
RUNS = {"plain": "plain generation of the 2 prompts", "fused": "fused P2P edit (1 source + 1 edit)",
        "explicit": "explicit P2P edit"}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def read_steps(folder: Path) -> list[dict]:
    steps = []
    path = folder / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            name, status, seconds, rc, limit, note = (line.split("\t") + [""] * 6)[:6]
            steps.append(dict(name=name, status=status, seconds=float(seconds or 0), rc=rc, limit=limit, note=note))
    return steps


def read_junit(path: Path) -> dict:
    """Counts and the failing tests of one pytest junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        return {"file": path.name, "error": f"unreadable: {error}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    seconds = 0.0
    failing = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                node = case.find(kind)
                if node is not None:
                    message = (node.get("message") or node.text or "").strip().splitlines()
                    failing.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "kind": kind,
                                    "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    per_file: dict[str, dict] = {}
    for suite in suites:
        for case in suite.iter("testcase"):
            if not case.get("name"):  # the test running when pytest was interrupted
                continue
            row = per_file.setdefault(case.get("classname", "").split("::")[0], dict(tests=0, failed=0, skipped=0))
            row["tests"] += 1
            row["failed"] += case.find("failure") is not None or case.find("error") is not None
            row["skipped"] += case.find("skipped") is not None
    return {"file": path.name, **counts, "seconds": seconds, "per_file": per_file, "failing": failing}


def _is_target_config(bench: dict | None, size_key: str = "size") -> bool:
    if not bench:
        return False
    size = bench.get(size_key, bench.get("height"))
    return (size == TARGET["size"] and bench.get("steps") == TARGET["steps"]
            and bench.get("dtype") == TARGET["dtype"] and bench.get("device") == TARGET["device"]
            and not bench.get("tiny") and bench.get("model", "random") in ("random", "SD 1.5 architecture, random weights"))


def _verdict(value, limit, applies: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NOT MEASURED"
    verdict = "PASS" if value <= limit else "FAIL"
    return verdict if applies else f"{verdict} (not the target configuration)"


def targets(benches: dict, env: dict) -> list[dict]:
    sd15, inversion = benches.get("sd15"), benches.get("inversion")
    card = env.get("gpu_name") or "a CPU"
    h100 = "H100" in card
    rows = []
    fused = ((sd15 or {}).get("runs") or {}).get("fused") or {}
    applies = _is_target_config(sd15)
    rows.append(dict(target="fused edit wall time <= 1.10x plain (SD 1.5, 512 px, 50 steps, fp16)",
                     value=fused.get("time_vs_plain"), unit="x", limit=EDIT_TIME_MAX,
                     verdict=_verdict(fused.get("time_vs_plain"), EDIT_TIME_MAX, applies)))
    rows.append(dict(target="fused edit peak memory <= 1.10x plain (same run)",
                     value=fused.get("memory_vs_plain"), unit="x", limit=EDIT_MEMORY_MAX,
                     verdict=_verdict(fused.get("memory_vs_plain"), EDIT_MEMORY_MAX, applies)))
    methods = (inversion or {}).get("methods") or {}
    applies_inv = _is_target_config(inversion) and h100
    for key, limit, note in (("null-text", NULL_TEXT_MAX_S, "; random weights never stop early: the worst case"),
                             ("direct", DIRECT_MAX_S, "")):
        value = (methods.get(key) or {}).get("seconds")
        rows.append(dict(target=f"{key} inversion <= {limit:g} s per 512 px image, 50 steps, on an H100{note}",
                         value=value, unit="s", limit=limit,
                         verdict=_verdict(value, limit, applies_inv)
                         + ("" if h100 or value is None else f" [measured on {card}, not an H100]")))
    return rows


def bench_table(bench: dict) -> list[str]:
    lines = [f"_{bench.get('title', '')}; median of {max(bench.get('rounds', 1) - bench.get('warmup_rounds', 0), 1)} "
             f"alternating round(s) after {bench.get('warmup_rounds', 0)} warm-up; peak memory: "
             f"{bench.get('memory_measure', '')}; model built in {_number(bench.get('build_seconds'), 1)} s._", "",
             "| run | wall time (s) | x plain | peak memory (MiB) | x plain |", "|---|---|---|---|---|"]
    for key, run in (bench.get("runs") or {}).items():
        if run.get("status") != "ok":
            lines.append(f"| {RUNS.get(key, key)} | {run.get('status')} | | {run.get('status')} | |")
            continue
        peak = run.get("peak_bytes")
        lines.append(f"| {RUNS.get(key, key)} | {_number(run.get('seconds'))} | {_number(run.get('time_vs_plain'))} "
                     f"| {_number(None if peak is None else peak / 2**20, 0)} | {_number(run.get('memory_vs_plain'))} |")
    return lines


def inversion_table(bench: dict) -> list[str]:
    lines = [f"_{bench.get('model')}; {bench.get('height')}x{bench.get('width')} px, {bench.get('steps')} steps, "
             f"guidance {bench.get('guidance')}, {bench.get('device')} {bench.get('dtype')}, null-text inner steps "
             f"{bench.get('inner_steps')}; {bench.get('images')} image(s), {bench.get('rounds')} round(s) after a "
             f"warm-up. A random model's PSNR means nothing._", "",
             "| method | seconds per image | x plain generation | x one edit | UNet passes | reconstruction PSNR (dB) |",
             "|---|---|---|---|---|---|"]
    for key, row in (bench.get("methods") or {}).items():
        lines.append(f"| {row.get('name', key)} | {_number(row.get('seconds'))} | {_number(row.get('vs_generate'))} "
                     f"| {_number(row.get('vs_edit'))} | {_number(row.get('unet_passes'), 0)} "
                     f"| {'' if row.get('psnr_db') is None else _number(row.get('psnr_db'))} |")
    lines.append(f"| (VAE round trip, the ceiling) | | | | | {_number(bench.get('vae_psnr_db'))} |")
    return lines


def reedit_table(bench: dict) -> list[str]:
    seconds, peak = bench.get("seconds") or {}, bench.get("peak_bytes") or {}
    lines = [f"_{bench.get('title', '')}; cache {_number((bench.get('cache_bytes') or 0) / 2**20, 0)} MiB, made in "
             f"{_number(bench.get('cache_seconds'))} s; re-edit vs fresh: max abs difference "
             f"{bench.get('max_abs_difference', float('nan')):.1e}._", "",
             "| run | wall time (s) | x fresh | peak memory (MiB) |", "|---|---|---|---|"]
    for key in ("fresh", "re-edit"):
        ratio = 1.0 if key == "fresh" else bench.get("ratio_seconds")
        lines.append(f"| {key} | {_number(seconds.get(key))} | {_number(ratio)} "
                     f"| {_number(None if peak.get(key) is None else peak[key] / 2**20, 0)} |")
    return lines


def main(folder: Path) -> int:
    env = _load_json(folder / "env.json") or {}
    steps = read_steps(folder)
    junits = [read_junit(path) for path in sorted(folder.glob("junit-*.xml"))]
    benches = {}
    for name in ("sd15", "sdxl", "sd3", "flux", "chroma", "pixart", "qwenimage", "flux2-klein", "zimage",
                 "flux2-dev", "inversion", "reedit"):
        data = _load_json(folder / f"bench-{name}.json")
        if data is not None:
            benches[name] = data
    target_rows = targets(benches, env)
    failed_steps = [s["name"] for s in steps if s["status"] not in ("ok", "skipped")]
    report = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ok": not failed_steps, "failed_steps": failed_steps, "env": env, "steps": steps, "tests": junits,
        "benchmarks": benches, "targets": target_rows,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    md = ["# GPU check", ""]
    md.append(f"- card: **{env.get('gpu_name') or ('none (CPU run)' if env.get('test_device') == 'cpu' else 'none')}**"
              + (f", {env['gpu_memory_gib']:.0f} GiB" if env.get("gpu_memory_gib") else "")
              + (f", driver {env['driver']}" if env.get("driver") else ""))
    md.append(f"- Python {env.get('python', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda') or 'none'}, "
              f"cuDNN {env.get('cudnn') or 'none'}, diffusers {env.get('diffusers', '?')} "
              f"({env.get('diffusers_from', '?')}), transformers {env.get('transformers', '?')}, "
              f"huggingface_hub {env.get('huggingface_hub', '?')}")
    md.append(f"- mode: {env.get('mode', '?')}, test device {env.get('test_device', '?')}, commit "
              f"{env.get('commit', '?')}, written {report['written']}")
    md.append(f"- result: **{'all steps passed' if not failed_steps else 'FAILED: ' + ', '.join(failed_steps)}**")
    md += ["", "## Steps", "", "| step | status | seconds | limit (s) | note |", "|---|---|---|---|---|"]
    for s in steps:
        md.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['limit']} | {s['note']} |")

    md += ["", "## Tests", ""]
    if not junits:
        md.append("No junit file: the tests did not run or were killed before pytest wrote it (see the log).")
    else:
        md += ["| run | tests | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|---|"]
        for j in junits:
            if "error" in j:
                md.append(f"| {j['file']} | {j['error']} | | | | | |")
            else:
                md.append(f"| {j['file']} | {j['tests']} | {j['passed']} | {j['failures']} | {j['errors']} "
                          f"| {j['skipped']} | {j['seconds']:.0f} |")
        md += ["", "| run | test module | tests | failed | skipped |", "|---|---|---|---|---|"]
        for j in junits:
            for module, row in sorted(j.get("per_file", {}).items()):
                md.append(f"| {j['file']} | {module} | {row['tests']} | {row['failed']} | {row['skipped']} |")
        for s in steps:
            if s["name"].startswith("tests-") and s["status"] == "timeout":
                md += ["", f"{s['name']} was stopped after {s['seconds']:.0f} s: its counts cover the tests that "
                           "had finished."]
        failing = [(j["file"], f) for j in junits for f in j.get("failing", [])[:25]]
        if failing:
            md += ["", "Failing tests:", ""]
        for file, f in failing:
            md.append(f"- {file}: {f['kind']} `{f['test']}`: {f['message']}")

    md += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for row in target_rows:
        md.append(f"| {row['target']} | {_number(row['value'])} {row['unit'] if row['value'] is not None else ''} "
                  f"| {row['verdict']} |")

    for name, title in BENCHES.items():
        md += ["", f"## Edit vs plain generation: {title}", ""]
        md += bench_table(benches[name]) if name in benches else ["Not measured (see the steps above)."]
        if name == "sdxl" and name in benches and benches[name].get("steps") != 50:
            md += ["", f"SDXL runs {benches[name].get('steps')} steps, not 50, to fit the check's time budget; the "
                       "edit's windows are fractions of the run, so the ratios hardly depend on the step count."]
    md += ["", "## Inversion", ""]
    md += inversion_table(benches["inversion"]) if "inversion" in benches else ["Not measured (see the steps above)."]
    md += ["", "## Re-edit on a cached source vs a fresh edit", ""]
    md += reedit_table(benches["reedit"]) if "reedit" in benches else ["Not measured (see the steps above)."]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/gpu")))
