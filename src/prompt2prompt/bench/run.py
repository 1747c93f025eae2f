"""The benchmark harness: every entry of a PIE-format folder, inverted and edited by each inversion method
through the batch runner, scored with the seven metrics, and tabled beside the published rows.

Layout of `out/`:
- `settings.json`: the run's protocol, model, methods and metrics;
- `<method>/`: a batch-runner folder (`jobs/<entry id>/edit-1.png`, a PNG with its recipe, and `results.jsonl`);
  a killed run resumes where it stopped, and the jobs can run on Ray;
- `<method>/metrics/<entry id>.json`: one entry's metrics, written atomically once, never recomputed;
- `table.md`, `table.csv`, `table.json`: the means, overall and per editing type, and the published rows.

An image whose size is not the model's (PIE-Bench is 512 px; the demo models 64 px) is fitted to the model's size
for the edit (`fit="crop"`: resized, centre-cropped), and the edit is resized back (Lanczos) for the metrics.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..batch import parse_job, read_index, run_batch
from ..edits import edit_to_dict
from ..files import write_text_atomic
from .metrics import METRICS, SCALE, Metrics
from .pie import EDITING_TYPES, Entry, Protocol, protocol_edit

__all__ = ["LABELS", "PUBLISHED", "BenchResult", "run_bench", "table"]

# The inversion methods as the rows name them (Direct Inversion's Table 1 names NTI and NPI so).
LABELS = {"ddim": "DDIM + P2P", "null-text": "NTI + P2P", "negative-prompt": "NPI + P2P", "direct": "Direct + P2P",
          "euler": "Euler + P2P"}
# Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code" (ICLR 2024), Table 1, SD 1.4,
# over PIE-Bench's 700 images, in the tables' units.
PUBLISHED = {
    "ddim": dict(structure_distance=69.43, psnr=17.87, lpips=208.80, mse=219.88, ssim=71.14, clip_whole=25.01, clip_edited=22.44),
    "null-text": dict(structure_distance=13.44, psnr=27.03, lpips=60.67, mse=35.86, ssim=84.11, clip_whole=24.75, clip_edited=21.86),
    "negative-prompt": dict(structure_distance=16.17, psnr=26.21, lpips=69.01, mse=39.73, ssim=83.40, clip_whole=24.61, clip_edited=21.87),
    "direct": dict(structure_distance=11.65, psnr=27.22, lpips=54.55, mse=32.86, ssim=84.76, clip_whole=25.02, clip_edited=22.10),
}
HEADERS = {"structure_distance": "Structure x10^3 (lower)", "psnr": "PSNR (higher)", "lpips": "LPIPS x10^3 (lower)",
           "mse": "MSE x10^4 (lower)", "ssim": "SSIM x10^2 (higher)", "clip_whole": "CLIP whole (higher)",
           "clip_edited": "CLIP edited (higher)", "success": "attribute success % (higher)",
           "seconds": "seconds per image"}
# What each column measures, under the table: a reader of table.md should not need the docs to read it.
MEANINGS = {
    "structure_distance": "DINO self-similarity distance between the source image and the edit, whole images",
    "psnr": "on the unedited region: both images outside the edit mask (the mask's pixels blacked out)",
    "lpips": "on the unedited region, as PSNR", "mse": "on the unedited region, as PSNR",
    "ssim": "on the unedited region, as PSNR",
    "clip_whole": "CLIP score of the whole edited image against the editing prompt",
    "clip_edited": "CLIP score of the edit mask's region against the editing prompt",
    "success": ("share of edits whose image, read by the shapes world's scene parser, shows what the caption "
                "changed: the new colour, shape or background; a removed object gone; an added object separate, "
                "of the asked colour and shape, with the first object kept"),
    "seconds": "wall time of one entry's job: its inversion and its edit",
}


@dataclass
class BenchResult:
    """Per method, per entry id, the metrics (and the job's seconds); `table` makes the table of them."""

    rows: dict[str, dict[str, dict[str, float]]]
    types: dict[str, str]  # entry id -> editing type
    failed: dict[str, dict[str, str]]  # method -> entry id -> the job's error
    settings: dict[str, Any] = field(default_factory=dict)  # the run's protocol, methods, metrics, resizing


def _job(entry: Entry, method: str, protocol: Protocol) -> dict[str, Any]:
    return {"id": entry.id, "source": entry.original_prompt, "image": str(entry.image),
            "edits": [edit_to_dict(protocol_edit(entry, protocol))], "inversion": {"method": method},
            "num_inference_steps": protocol.num_inference_steps, "guidance_scale": protocol.guidance_scale}


def _resized(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image)


def run_bench(entries: Sequence[Entry], out: str | Path, *, methods: Sequence[str], protocol: Protocol | None = None,
              metrics: Metrics | None = None, extra: Callable[[Entry, np.ndarray], dict[str, float]] | None = None,
              device: str | None = None, dtype: str = "auto", workers: int = 0, ray_address: str | None = None,
              progress: bool = True) -> BenchResult:
    """Invert and edit every entry with every method (resumable), then score each edit once.

    Args:
        entries: from `load_pie` (or the shapes benchmark's folder).
        out: the run's folder (see the module's docstring); an existing one is resumed.
        methods: inversion methods of the model (UNet: ddim, null-text, negative-prompt, direct).
        protocol: the model and the edit settings (the published rows' by default).
        metrics: the metrics to compute (None: none; the table then holds the extra values and times only).
        extra: more values per edit from the entry and the edited image at the model's size (the shapes
            benchmark's attribute success).
        device, dtype, workers, ray_address: as `run_batch`'s.
    """
    protocol = Protocol() if protocol is None else protocol
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"protocol": asdict(protocol), "methods": list(methods), "metrics": [] if metrics is None else metrics.names,
                "entries": len(entries), "resize": None}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    failed: dict[str, dict[str, str]] = {}
    for number, method in enumerate(methods, 1):
        folder = out / method
        jobs = [parse_job(_job(entry, method, protocol), line=i, base=out, model=protocol.model)
                for i, entry in enumerate(entries, 1)]
        run_batch(jobs, folder, workers=workers, ray_address=ray_address, device=device, dtype=dtype, progress=progress,
                  description=f"{LABELS.get(method, method)} ({number}/{len(methods)})")
        index = read_index(folder)
        rows[method], failed[method] = {}, {}
        for entry in entries:
            row = index.get(entry.id)
            if row is None or row["status"] != "done":
                failed[method][entry.id] = "not run" if row is None else row["error"]
                continue
            rows[method][entry.id] = _scored(entry, folder, metrics, extra) | {"seconds": row["seconds"]}
            if settings["resize"] is None:
                settings["resize"] = _resizing(entry.image, folder / "jobs" / entry.id / "edit-1.png")
    write_text_atomic(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    return BenchResult(rows, {e.id: e.editing_type for e in entries}, failed, settings)


def _resizing(image: Path, edit: Path) -> str:
    """How the benchmark's images met the model's size, for the table."""
    with Image.open(image) as a, Image.open(edit) as b:
        (w, h), (mw, mh) = a.size, b.size
    if (w, h) == (mw, mh):
        return f"images at the model's size, {w}x{h}: no resizing"
    return (f"images {w}x{h} fitted to the model's {mw}x{mh} (resized, centre-cropped); edits resized back to "
            f"{w}x{h} (Lanczos) for the metrics")


def _scored(entry: Entry, folder: Path, metrics: Metrics | None, extra) -> dict[str, float]:
    """The entry's metrics: read back if this run already scored it, else computed and written once."""
    path = folder / "metrics" / f"{entry.id}.json"
    if path.is_file():
        return json.loads(path.read_text())
    edited_path = folder / "jobs" / entry.id / "edit-1.png"
    with Image.open(entry.image) as image:
        source = np.asarray(image.convert("RGB"))
    values: dict[str, float] = {}
    if metrics is not None:
        edited = _resized(edited_path, (source.shape[1], source.shape[0]))
        values.update(metrics(source, edited, entry.mask[: source.shape[0], : source.shape[1]], entry.editing_prompt))
    if extra is not None:
        with Image.open(edited_path) as image:
            values.update(extra(entry, np.asarray(image.convert("RGB"))))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(values) + "\n")
    return values


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]  # the reference's "nan" (a mask over the whole image) is skipped
    return statistics.fmean(kept) if kept else math.nan


def table(result: BenchResult, out: str | Path | None = None, *, published: bool = True) -> dict[str, Any]:
    """The means per method, overall and per editing type, in the published units; written as table.md, .csv
    and .json under `out` when given. Returns the JSON form."""
    columns = [name for name in (*METRICS, "success", "seconds")
               if any(name in values for rows in result.rows.values() for values in rows.values())]
    scale = {**SCALE, "success": 100.0, "seconds": 1.0}
    sections: dict[str, dict[str, dict[str, float]]] = {}
    for editing_type in ["all", *sorted({t for t in result.types.values()}, key=int)]:
        section = {}
        for method, rows in result.rows.items():
            chosen = [v for entry_id, v in rows.items() if editing_type == "all" or result.types[entry_id] == editing_type]
            section[method] = {c: _mean([v[c] * scale[c] for v in chosen if c in v]) for c in columns}
            section[method]["images"] = len(chosen)
        sections[editing_type] = section
    data = {"columns": columns, "sections": sections, "failed": result.failed, "settings": result.settings,
            "published": {m: PUBLISHED[m] for m in result.rows if m in PUBLISHED} if published else {}}
    if out is not None:
        out = Path(out)
        write_text_atomic(out / "table.json", json.dumps(data, indent=2) + "\n")
        write_text_atomic(out / "table.md", _markdown(data))
        write_text_atomic(out / "table.csv", _csv(data))
    return data


def _number(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _markdown(data: dict[str, Any]) -> str:
    columns = data["columns"]
    lines = []
    protocol = data["settings"].get("protocol")
    if protocol:
        lines += [f"Model {protocol['model']}, {protocol['num_inference_steps']} steps, guidance "
                  f"{protocol['guidance_scale']}, refinement with cross-attention {protocol['cross_steps']} and "
                  f"self-attention {protocol['self_steps']}; {data['settings'].get('resize') or 'no edit finished'}.", ""]
    for editing_type, section in data["sections"].items():
        title = "All editing types" if editing_type == "all" else f"Editing type {editing_type}: {EDITING_TYPES[editing_type]}"
        lines += [f"### {title}", "", "| method | images | " + " | ".join(HEADERS[c] for c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for method, values in section.items():
            lines.append(f"| {LABELS.get(method, method)} | {values['images']} | "
                         + " | ".join(_number(values[c]) for c in columns) + " |")
        if editing_type == "all":
            for method, values in data["published"].items():
                lines.append(f"| {LABELS[method]}, published (SD 1.4, 700 images) | 700 | "
                             + " | ".join(_number(values.get(c, math.nan)) for c in columns) + " |")
        lines.append("")
    failures = {m: f for m, f in data["failed"].items() if f}
    if failures:
        lines.append("Failed: " + "; ".join(f"{LABELS.get(m, m)}: {len(f)}" for m, f in failures.items()))
        lines.append("")
    lines += [f"- {HEADERS[c]}: {MEANINGS[c]}." for c in columns] + [""]
    return "\n".join(lines)


def _csv(data: dict[str, Any]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["editing_type", "method", "images", *data["columns"]])
    for editing_type, section in data["sections"].items():
        for method, values in section.items():
            writer.writerow([editing_type, method, values["images"], *(_number(values[c]) for c in data["columns"])])
    for method, values in data["published"].items():
        writer.writerow(["all", f"{method} (published)", 700, *(_number(values.get(c, math.nan)) for c in data["columns"])])
    return buffer.getvalue()
