"""Load-test the web app on this machine: `p2p serve` on the demo model, hit through Gradio's queue over HTTP.

    .venv/bin/python scripts/load_test.py [--clients 4] [--edits 5] [--memory-edits 200] [--kill] [--steps 4]
        [--cache-mb 10] [--image-every 8] [--repeat-seeds] [--max-growth-mib 30]

It starts `p2p serve` in a subprocess on 127.0.0.1 (nothing else is ever contacted), then:
1. latency alone: --alone edits, one at a time;
2. a burst: --clients clients start together and each sends --edits edits, every --malformed-every-th request
   of each a malformed one (a wrong type, missing fields, a file that was never uploaded), which must get the
   app's one-line message, never a bare error;
3. with --kill, a second burst during which the server is killed with SIGKILL, then restarted: no partial run
   folder may remain under --out (the app stages runs and cleans leftovers at start), and it serves again;
4. memory: --memory-edits edits sent by --clients clients at once, in bursts of --clients x --edits, each burst
   with new seeds (unless --repeat-seeds) and every --image-every-th edit of a client a real-image edit (a fresh
   random photo, uploaded and inverted), the server's resident memory (psutil, else /proc/PID/status) read after
   every burst; a summary line gives it after the first burst and at the end, and with --max-growth-mib the growth
   between them is a check.
It prints a table and exits 1 if a check failed. Every loop is bounded in count and in time (--max-seconds).
Not part of the test suite: the suite's tests run in seconds, this takes minutes at its defaults.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only, by design: there is no option to point this anywhere else
SOURCE = "a big red circle in the center on a white background"
EDITS = ["a big green circle in the center on a white background", "a big red star in the center on a white background",
         "a big blue circle in the center on a white background", "a big red square in the center on a white background"]
RUN_NAME = re.compile(r"\d{8}-\d{6}-(\d+|image)-[0-9a-f]{6}")  # the app's run folders (webapp.runs._run_name)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError("the load test ran past --max-seconds")


class Server:
    """`p2p serve` in a subprocess, its output in a log file."""

    def __init__(self, args: argparse.Namespace, out: Path, log: Path):
        self.args, self.out, self.log = args, out, log
        self.port = args.port or _free_port()
        self.url = f"http://{HOST}:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self, deadline: Deadline) -> None:
        p2p = Path(sys.executable).with_name("p2p")
        command = [str(p2p)] if p2p.exists() else [sys.executable, "-c", "from prompt2prompt.cli import main; main()"]
        command += ["serve", "--model", self.args.model, "--host", HOST, "--port", str(self.port), "--out",
                    str(self.out), "--queue", str(self.args.queue), "--cache-mb", str(self.args.cache_mb)]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while True:  # bounded by the deadline and by the process dying
            deadline.check()
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "config", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def rss_mib(self) -> float:
        try:
            import psutil

            return psutil.Process(self.process.pid).memory_info().rss / 2**20
        except ImportError:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
            raise RuntimeError("no VmRSS in /proc: install psutil") from None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Form:
    """The Run button's request, built from the served form's own components and defaults."""

    def __init__(self, url: str):
        config = httpx.get(url + "config", timeout=30).json()
        (run,) = [d for d in config["dependencies"] if d.get("api_name") == "run_edit"]
        self.fn_index = run["id"]
        components = {c["id"]: c for c in config["components"]}
        self.inputs = [components[i] for i in run["inputs"]]
        self.defaults = [c.get("props", {}).get("value") for c in self.inputs]
        self.at = {c["props"].get("elem_id"): i for i, c in enumerate(self.inputs) if c.get("props", {}).get("elem_id")}

    def edit(self, seed: int, steps: int, edit: str, upload: dict | None = None) -> list:
        """An edit of the source prompt drawn from `seed`, or of the uploaded photo `upload` (its caption: SOURCE)."""
        data = list(self.defaults)
        data[self.at["source"]], data[self.at["edit-1"]] = SOURCE, edit
        data[self.at["seed"]], data[self.at["steps"]] = seed, steps
        data[self.at["upload"]] = upload
        return data

    def malformed(self, kind: int, steps: int) -> list:
        data = self.edit(1, steps, EDITS[0])
        if kind == 0:
            data[self.at["seed"]] = "not a number"
        elif kind == 1:
            data[self.at["steps"]] = None
        elif kind == 2:
            data[self.at["upload"]] = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
        else:
            data = data[:5]  # missing fields
        return data


def upload_photo(url: str, seed: int, timeout: float) -> dict:
    """A fresh random 64 x 64 photo, uploaded to the server: the request's value for the upload box."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    sent = httpx.post(url + "gradio_api/upload", files={"files": ("photo.png", buffer.getvalue(), "image/png")},
                      timeout=timeout)
    sent.raise_for_status()
    return {"path": sent.json()[0], "orig_name": "photo.png", "meta": {"_type": "gradio.FileData"}}


def call(url: str, form: Form, data: list, timeout: float) -> tuple[bool, str | None, float]:
    """One request through Gradio's queue: (success, error message, seconds)."""
    session = secrets.token_hex(8)
    started = time.perf_counter()
    try:
        joined = httpx.post(url + "gradio_api/queue/join", timeout=timeout,
                            json={"data": data, "fn_index": form.fn_index, "session_hash": session})
        if joined.status_code != 200:
            return False, f"HTTP {joined.status_code}: {joined.text[:100]}", time.perf_counter() - started
        with httpx.stream("GET", f"{url}gradio_api/queue/data?session_hash={session}", timeout=timeout) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and (message := json.loads(line[5:])).get("msg") == "process_completed":
                    error = (message.get("output") or {}).get("error")
                    return bool(message.get("success")), error, time.perf_counter() - started
    except httpx.HTTPError as error:
        return False, f"{type(error).__name__}: {error}", time.perf_counter() - started
    return False, "the event stream ended early", time.perf_counter() - started


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    if len(seconds) == 1:
        return f"{seconds[0]:.2f} s / {seconds[0]:.2f} s"
    cuts = statistics.quantiles(seconds, n=20, method="inclusive")
    return f"{statistics.median(seconds):.2f} s / {cuts[18]:.2f} s"


def burst(server: Server, form: Form, args: argparse.Namespace, deadline: Deadline, kill_after: float | None = None,
          number: int = 0):
    """--clients clients at once, --edits requests each; returns (good latencies, failures, bare errors, count).

    Burst `number` draws its own seeds (the same for every burst with --repeat-seeds), and every --image-every-th
    edit of a client edits a fresh uploaded photo.
    """
    good, failures, bare, lock = [], [], [], threading.Lock()
    start = threading.Barrier(args.clients + (kill_after is not None))

    def client(index: int) -> None:
        start.wait()
        for i in range(args.edits):
            if time.monotonic() > deadline.end:
                return
            bad = args.malformed_every and (i + 1) % args.malformed_every == 0
            seed = 1000 * index + i + (0 if args.repeat_seeds else 100_000 * number)
            try:
                photo = (upload_photo(server.url, seed, args.timeout)
                         if args.image_every and (i + 1) % args.image_every == 0 and not bad else None)
            except httpx.HTTPError as error:
                with lock:
                    failures.append(f"the upload failed: {error}")
                continue
            data = (form.malformed((index + i) % 4, args.steps) if bad
                    else form.edit(seed, args.steps, EDITS[(index + i) % len(EDITS)], photo))
            ok, error, seconds = call(server.url, form, data, args.timeout)
            with lock:
                if bad and (ok or error is None or "\n" in error):
                    bare.append(error)
                elif not bad and ok:
                    good.append(seconds)
                elif not bad:
                    failures.append(error)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    if kill_after is not None:
        start.wait()
        time.sleep(kill_after)
        server.kill()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline.end - time.monotonic()))
    return good, failures, bare, args.clients * args.edits


def partial_runs(out: Path) -> list[str]:
    """Run folders under `out` that are not whole (no grid.png), and the staging folder's content."""
    partial = [p.name for p in out.iterdir() if RUN_NAME.fullmatch(p.name) and not (p / "grid.png").is_file()]
    staging = out / ".staging"
    return partial + ([f".staging/{p.name}" for p in staging.iterdir()] if staging.is_dir() else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="the model to serve (default: the built-in demo)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per edit (few: load, not quality)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in a burst")
    parser.add_argument("--edits", type=int, default=5, help="requests per client in a burst")
    parser.add_argument("--alone", type=int, default=10, help="edits timed one at a time, with no other load")
    parser.add_argument("--malformed-every", type=int, default=3, help="every Nth request of a client is malformed "
                                                                      "(0: none)")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the server during a second burst, restart it, "
                                                           "and check --out holds no partial run")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds into that burst")
    parser.add_argument("--memory-edits", type=int, default=200, help="edits over which the server's memory is read")
    parser.add_argument("--cache-mb", type=float, default=2048,
                        help="p2p serve --cache-mb: the sources kept for reuse, which memory grows by until it is full")
    parser.add_argument("--repeat-seeds", action="store_true",
                        help="every memory burst sends the same seeds (default: new seeds, so new sources, each burst)")
    parser.add_argument("--image-every", type=int, default=0,
                        help="every Nth edit of a client in the memory bursts edits a fresh uploaded photo (0: none)")
    parser.add_argument("--max-growth-mib", type=float,
                        help="fail if the server's RSS at the end exceeds its RSS after the first memory burst by more")
    parser.add_argument("--queue", type=int, default=64, help="p2p serve --queue")
    parser.add_argument("--port", type=int, default=0, help="the server's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--out", type=Path, help="the server's --out (default: a temporary folder, removed after)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--max-seconds", type=float, default=3600, help="the whole test's limit")
    args = parser.parse_args()
    for name in ("steps", "clients", "edits", "alone", "memory_edits", "queue", "image_every"):
        if getattr(args, name) < (0 if name in ("alone", "memory_edits", "image_every") else 1):
            parser.error(f"--{name.replace('_', '-')} is too small")

    deadline = Deadline(args.max_seconds)
    scratch = Path(tempfile.mkdtemp(prefix="p2p-load-"))
    out = args.out or scratch / "out"
    log = scratch / "server.log"
    server = Server(args, out, log)
    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    try:
        server.start(deadline)
        form = Form(server.url)
        call(server.url, form, form.edit(0, args.steps, EDITS[0]), args.timeout)  # loads what the first run loads

        alone = []
        for i in range(args.alone):
            deadline.check()
            ok, error, seconds = call(server.url, form, form.edit(i + 1, args.steps, EDITS[i % len(EDITS)]), args.timeout)
            if ok:
                alone.append(seconds)
            else:
                problems.append(f"an edit alone failed: {error}")
        rows.append((f"latency alone, p50 / p95 ({len(alone)} edits)", percentiles(alone)))

        good, failures, bare, sent = burst(server, form, args, deadline)
        rows.append((f"latency under load, p50 / p95 ({len(good)} edits, {args.clients} clients)", percentiles(good)))
        rows.append(("burst: failed good edits / malformed without a one-line message",
                     f"{len(failures)} / {len(bare)} (of {sent} requests)"))
        problems += [f"a good edit failed under load: {e}" for e in failures[:3]]
        problems += [f"a malformed request got no one-line message: {e!r}" for e in bare[:3]]

        if args.kill:
            burst(server, form, args, deadline, kill_after=args.kill_after)
            visible = [p for p in partial_runs(out) if not p.startswith(".staging/")]
            staged = len(partial_runs(out)) - len(visible)
            server.start(deadline)  # the app removes leftovers at start
            left = partial_runs(out)
            ok, error, _ = call(server.url, Form(server.url), form.edit(7, args.steps, EDITS[1]), args.timeout)
            rows.append(("kill -9: partial runs visible after the kill / staged / left after the restart",
                         f"{len(visible)} / {staged} / {len(left)}"))
            rows.append(("kill -9: an edit after the restart", "ok" if ok else f"failed: {error}"))
            problems += [f"partial run after the kill: {p}" for p in visible + left] + ([] if ok else [str(error)])
            form = Form(server.url)

        # Memory over --memory-edits edits sent by --clients clients at once (bursts of clients x edits, no
        # malformed ones), read after every burst: flat after the first, or growing.
        per_burst = args.clients * args.edits
        memory_args = argparse.Namespace(**{**vars(args), "malformed_every": 0})
        readings, done = [], 0
        while done < args.memory_edits:
            deadline.check()
            good, failures, _, _ = burst(server, form, memory_args, deadline, number=len(readings) + 1)
            done += per_burst
            problems += [f"a memory edit failed: {e}" for e in failures[:3]]
            readings.append((done, server.rss_mib()))
            print(f"memory burst {len(readings)}: {done} edits, RSS {readings[-1][1]:.0f} MiB", flush=True)
        if readings:
            (first_n, first), (last_n, last) = readings[0], readings[-1]
            rows.append((f"server RSS after the first burst ({first_n} concurrent edits)", f"{first:.0f} MiB"))
            rows.append((f"server RSS after all {last_n} concurrent edits",
                         f"{last:.0f} MiB ({last - first:+.0f} MiB)"))
            print("RSS per burst (edits, MiB): " + ", ".join(f"{n}: {rss:.0f}" for n, rss in readings), flush=True)
            print(f"memory: first burst {first:.0f} MiB, after {last_n} edits {last:.0f} MiB, growth "
                  f"{last - first:+.0f} MiB (--cache-mb {args.cache_mb:g}, "
                  f"{'repeated' if args.repeat_seeds else 'new'} seeds per burst, image every {args.image_every})",
                  flush=True)
            if args.max_growth_mib is not None and last - first > args.max_growth_mib:
                problems.append(f"the server's RSS grew by {last - first:.0f} MiB after the first burst; the bound is "
                                f"{args.max_growth_mib:g} MiB")
        cache = out / ".gradio"
        rows.append(("files in Gradio's cache at the end",
                     str(sum(1 for p in cache.rglob("*") if p.is_file())) if cache.is_dir() else "0"))
    except Exception as error:
        problems.append(f"{type(error).__name__}: {error}")
    finally:
        server.stop()

    width = max(len(name) for name, _ in rows) if rows else 0
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"the server's log: {log}", file=sys.stderr)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
