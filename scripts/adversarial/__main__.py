"""The command line of the adversarial harness (see the package's docstring): pick cases, run them, print a
summary per category, write the JSON report. Exit 1 when a case has a violation."""

import sys
from pathlib import Path

if not __package__:  # `python scripts/adversarial`: import the package by name, from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "scripts.adversarial"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from . import __doc__ as HARNESS_DOC  # noqa: E402
from .case import CATEGORIES, REPO, Case, Context, quote, short  # noqa: E402
from .classify import output_lines  # noqa: E402
from .run import all_cases, prepare_assets, run_case  # noqa: E402

HERE = Path(__file__).resolve().parent


def _default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.adversarial", description=HARNESS_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated categories: {', '.join(CATEGORIES)}")
    parser.add_argument("--limit", type=int, help="the first N cases of each category")
    parser.add_argument("--match", help="only cases whose category/name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1: the machine has 2 cores)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang (60)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each case (1)")
    parser.add_argument("--python", default=_default_python(), help="interpreter with prompt2prompt installed")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--base", help="folder for the case folders (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder")
    parser.add_argument("--no-keep", action="store_true", help="keep no case folder, not even a violation's")
    parser.add_argument("--list", action="store_true", help="list the cases and their counts, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress line per case")
    parser.add_argument("--setup-only", action="store_true", help="build every selected case's inputs, run nothing "
                                                                  "(checks the harness itself)")
    return parser


def _list(selected: list[Case], generated: dict[str, list[Case]], categories: tuple[str, ...]) -> None:
    for category in categories:
        items = [c for c in selected if c.category == category]
        print(f"{category}: {len(items)} cases (of {len(generated[category])})")
        for case in items:
            print(f"  {case.name}  [{case.expect}]")
    print(f"total: {len(selected)} cases (of {sum(len(v) for v in generated.values())})")


def _setup_only(selected: list[Case], ctx: Context) -> int:
    """Build every case's inputs and compile every snippet, running nothing; 1 when one of them fails."""
    failures = 0
    for case in selected:
        root = Path(tempfile.mkdtemp(prefix="setup-", dir=ctx.base / "cases"))
        for name in ("home", "tmp", "cwd", "in"):
            (root / name).mkdir()
        try:
            if case.setup is not None:
                case.setup(root, ctx)
            if case.code is not None:
                compile(case.code, case.id, "exec")
        except Exception as error:  # noqa: BLE001
            failures += 1
            print(f"SETUP FAILED {case.id}: {type(error).__name__}: {error}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{len(selected) - failures} of {len(selected)} cases set up")
    return 1 if failures else 0


def _summary(records: list[dict], categories: tuple[str, ...]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per category and in total: cases, ok, clean errors, violations, harness errors, notes, unexpected."""
    summary: dict[str, dict[str, int]] = {}
    for category in categories:
        mine = [r for r in records if r["category"] == category]
        summary[category] = {
            "cases": len(mine), "ok": sum(r["outcome"] == "ok" for r in mine),
            "clean_errors": sum(r["outcome"] == "error" for r in mine),
            "violations": sum(r["outcome"] == "violation" for r in mine),
            "harness_errors": sum(r["outcome"] == "harness-error" for r in mine),
            "notes": sum(bool(r.get("notes")) for r in mine),
            "unexpected": sum(bool(r.get("unexpected")) for r in mine),
        }
    total = {key: sum(s[key] for s in summary.values()) for key in next(iter(summary.values()))}
    return summary, total


def _print_summary(summary: dict[str, dict[str, int]], total: dict[str, int]) -> None:
    header = f"{'category':<10}{'cases':>7}{'ok':>6}{'clean-error':>13}{'VIOLATION':>11}{'harness':>9}{'notes':>7}" \
             f"{'unexpected':>12}"
    print("\n" + header)
    print("-" * len(header))
    for name, row in [*summary.items(), ("total", total)]:
        print(f"{name:<10}{row['cases']:>7}{row['ok']:>6}{row['clean_errors']:>13}{row['violations']:>11}"
              f"{row['harness_errors']:>9}{row['notes']:>7}{row['unexpected']:>12}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    # 1. Select the cases
    categories = CATEGORIES if not args.only else tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        parser.error(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    generated = all_cases()
    selected: list[Case] = []
    for category in categories:
        items = [c for c in generated[category] if not args.match or args.match in c.id]
        selected += items[: args.limit] if args.limit is not None else items
    if args.list:
        _list(selected, generated, categories)
        return 0
    if not selected:
        print("no case selected", file=sys.stderr)
        return 2

    # 2. Prepare the folders and the replay assets
    base = Path(args.base) if args.base else Path(tempfile.mkdtemp(prefix="p2p-adversarial-"))
    (base / "cases").mkdir(parents=True, exist_ok=True)
    ctx = Context(base=base.resolve(), python=args.python, timeout=args.timeout, threads=args.threads, jobs=args.jobs)
    keep = "all" if args.keep else "none" if args.no_keep else "violations"
    print(f"{len(selected)} cases, {args.jobs} at a time, timeout {args.timeout:g} s, folders under {base}",
          file=sys.stderr)
    assets = sorted({asset for case in selected for asset in case.assets})
    if assets:
        print(f"making replay assets ({', '.join(assets)}: one demo run each) ...", file=sys.stderr)
        prepare_assets(ctx, assets)
    if args.setup_only:
        return _setup_only(selected, ctx)

    # 3. Run the cases
    records: list[dict] = []
    lock = threading.Lock()
    started = time.time()

    def one(case: Case) -> dict:
        record = run_case(case, ctx, keep)
        with lock:
            records.append(record)
            if not args.quiet:
                mark = {"ok": "ok", "error": "clean-error", "violation": "VIOLATION"}.get(record["outcome"],
                                                                                       record["outcome"])
                print(f"[{len(records)}/{len(selected)}] {case.id}: {mark} ({record.get('seconds', 0)} s)"
                      + (f"  notes: {'; '.join(record['notes'])}" if record.get("notes") else ""),
                      file=sys.stderr, flush=True)
            if record["violations"]:
                tail = " | ".join(output_lines(record.get("stderr_tail", ""))[-2:])
                print(f"VIOLATION [{case.category}] {case.name}: {'; '.join(record['violations'])} | args: "
                      f"{short(record.get('args', ''), 200)} | stderr: {short(tail, 300)} | rerun: "
                      f"{quote(sys.executable)} {quote(str(HERE))} --only {case.category} --match {quote(case.name)}",
                      flush=True)
        return record

    try:
        if args.jobs <= 1:
            for case in selected:
                one(case)
        else:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, selected))
    except KeyboardInterrupt:
        print("interrupted: reporting the cases run so far", file=sys.stderr)

    # 4. Report
    order = {case.id: i for i, case in enumerate(selected)}
    records.sort(key=lambda r: order.get(r["id"], 0))
    summary, total = _summary(records, categories)
    _print_summary(summary, total)
    print(f"\n{time.time() - started:.0f} s; 'unexpected': exit code or outcome other than the case expects "
          "(a note, not a violation)")
    if args.report:
        report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  "seconds": round(time.time() - started, 1), "python": args.python, "timeout": args.timeout,
                  "base": str(base), "summary": summary, "total": total, "cases": records}
        Path(args.report).write_text(json.dumps(report, indent=1, ensure_ascii=False, default=repr))
        print(f"report: {args.report}", file=sys.stderr)
    if keep != "all" and not any(r.get("kept") for r in records) and not args.base:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if total["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
