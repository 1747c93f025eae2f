"""Batch jobs: many edits from a JSON Lines manifest, resumable, on one machine or a Ray cluster.

A manifest holds one job per line: a source prompt (or a real image and its caption), its edits with the
fields of `prompt2prompt.Edit`, and the run's settings. `load_manifest` checks every line before any model
is loaded; `run_batch` runs the jobs and writes, under its output folder,

- `jobs/<id>/`: `source.png`, `edit-1.png`, ... (each carrying its recipe) and `job.json` (the job's row);
- `results.jsonl`: one row per job with its status, timings, output paths, or error.

A job's folder is assembled in `.staging/` and renamed into `jobs/` in one step, so `jobs/<id>/` exists only
once all of it is written; the folder, not the index, says that a job is done. A run killed at any moment
(`kill -9` included) and started again on the same folder skips the finished jobs, redoes the others, and
repairs the index. Workers only compute: they send their images back, and this process alone writes.

Workers are a process pool (`workers=N`), this process (`workers=0`), or Ray actors (`ray_address=`), each
holding one model replica. Jobs that share a model and settings go through the UNet together, up to
`batch_size` jobs in one forward batch.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import dataclasses
import fcntl
import gc
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .editor import Editor, _initial_latents, build_plan
from .processor import P2PAttnProcessor
from .recipe import Recipe, build_edits, file_digest, recipe_for, run_recipe, save_png

__all__ = ["INDEX", "Job", "Manifest", "ManifestError", "Outcome", "Summary", "Worker", "WorkerConfig", "edit_together",
           "load_manifest", "load_score_hook", "parse_job", "plan_groups", "read_index", "run_batch"]

INDEX = "results.jsonl"
JOBS = "jobs"
STAGING = ".staging"
LOCK = ".lock"

_EDIT_FIELDS = ("prompt", "mode", "cross_steps", "self_steps", "weights", "blend")
_EDIT_DEFAULTS = {"mode": "auto", "cross_steps": 0.8, "self_steps": 0.4, "weights": None, "blend": None}
_JOB_FIELDS = ("id", "model", "source", "image", "edits", "seed", "num_inference_steps", "guidance_scale",
               "negative_prompt", "height", "width", "inversion")
# Names people type from the CLI or other tools, and the manifest's name for each.
_ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "prompt": "source", "negative": "negative_prompt",
            "cfg": "guidance_scale", "job_id": "id", "to": "edits"}
_INVERSION_OPTIONS = ("method", "fit", "num_inner_steps", "early_stop_epsilon")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

ScoreHook = Callable[[Any, Any, str, str], float]


class ManifestError(ValueError):
    """A manifest with malformed lines; the message lists every one with its line number."""


@dataclass(frozen=True)
class Job:
    """One validated manifest line. `spec` is its content, the input of the default id."""

    id: str
    line: int
    model: str
    source: str
    edits: list[dict[str, Any]]
    seed: int | None
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    image: dict[str, str] | None = None  # {"path": absolute path, "sha256": ...}
    inversion: dict[str, Any] | None = None  # keyword arguments of `invert()`

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one forward batch; a real image is inverted alone."""
        if self.image is not None:
            return (self.model, "image", self.id)
        return (self.model, self.num_inference_steps, self.guidance_scale, self.height, self.width)


@dataclass
class Manifest:
    """The valid jobs of a manifest, and the errors of the lines that were skipped."""

    path: Path
    jobs: list[Job]
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unknown(fields: Iterable[str], known: Sequence[str], what: str) -> str | None:
    unknown = sorted(set(fields) - set(known))
    if not unknown:
        return None
    hints = [f"{name!r} (did you mean {_ALIASES[name]!r}?)" if name in _ALIASES else repr(name) for name in unknown]
    return f"unknown {what} field {', '.join(hints)}; the fields are {', '.join(known)}"


def _normal_edit(edit: Any, index: int) -> dict[str, Any]:
    """An edit as the recipe stores it: every field present, weights as [word, weight] pairs."""
    where = f"edit {index}"
    if isinstance(edit, str):
        edit = {"prompt": edit}
    if not isinstance(edit, dict):
        raise ValueError(f"{where} must be a prompt string or an object with {', '.join(_EDIT_FIELDS)}, not {edit!r}")
    if message := _unknown(edit, _EDIT_FIELDS, "edit"):
        raise ValueError(f"{where}: {message}")
    if "prompt" not in edit:
        raise ValueError(f"{where} has no 'prompt'")
    spec = {**_EDIT_DEFAULTS, **edit}
    weights = spec["weights"]
    if isinstance(weights, dict):  # JSON object keys are text; pairs keep word positions as integers
        spec["weights"] = [[word, weight] for word, weight in weights.items()]
    elif weights is not None and not (isinstance(weights, list) and all(isinstance(p, list) and len(p) == 2 for p in weights)):
        raise ValueError(f"{where}: weights must be an object {{word: weight}} or a list of [word, weight] pairs, "
                         f"not {weights!r}")
    if spec["blend"] is not None and (not isinstance(spec["blend"], dict)
                                      or not {"source_words", "edit_words"} <= set(spec["blend"])):
        raise ValueError(f"{where}: blend must be an object with source_words and edit_words (and the other "
                         f"LocalBlend options), not {spec['blend']!r}")
    return {name: spec[name] for name in _EDIT_FIELDS}


def _check_edits(source: str, edits: list[dict[str, Any]]) -> None:
    """Build the Edit objects once, so that a bad window or weight fails here and not on a GPU."""
    for index, spec in enumerate(edits, 1):
        try:
            build_edits(Recipe(source=source, edits=[spec], seed=0, num_inference_steps=1, guidance_scale=1.0, model=""))
        except (ValueError, TypeError) as error:
            raise ValueError(f"edit {index}: {error}") from None


def _model_id(model: str, base: Path, where: str) -> str:
    """Local models by absolute path (as the recipe records them); "demo" and hub ids as given."""
    path = Path(model).expanduser()
    path = path if path.is_absolute() else base / path
    if model != "demo" and path.exists():
        return str(path.resolve())
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".safetensors") or model.count("/") > 1
    if looks_local:
        raise ValueError(f"model {model!r} does not exist (relative paths count from {where} {str(base)!r})")
    return model


def _image(value: Any, base: Path) -> dict[str, str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"image must be a file path, not {value!r}")
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        raise ValueError(f"image {value!r} is not a file (relative paths count from the manifest's folder {str(base)!r})")
    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"image {value!r} cannot be read as an image: {error}") from None
    return {"path": str(path), "sha256": file_digest(path)}


def _inversion(value: Any) -> dict[str, Any]:
    from .inversion import METHODS

    spec = {"method": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise ValueError(f"inversion must be a method name or an object with {', '.join(_INVERSION_OPTIONS)}, not {value!r}")
    if message := _unknown(spec, _INVERSION_OPTIONS, "inversion"):
        raise ValueError(message)
    spec = {"method": "null-text", **spec}
    if spec["method"] not in METHODS:
        raise ValueError(f"inversion method {spec['method']!r} is not one of {', '.join(METHODS)}")
    return spec


def _seed_from(digest: str) -> int:
    return int(digest[:8], 16) % 2**31


def parse_job(data: Any, *, line: int, base: Path, model: str) -> Job:
    """Validate one manifest entry (already JSON-decoded) into a Job; raises ValueError saying what is wrong.

    Relative paths in it count from `base`; `model` is the model of a job that names none, as given.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a job is a JSON object, not {type(data).__name__}")
    if message := _unknown(data, _JOB_FIELDS, "job"):
        raise ValueError(message)
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"'source' must be the source prompt (the image's caption for an image job), not {source!r}")
    edits = data.get("edits")
    if not isinstance(edits, list) or not edits:
        raise ValueError(f"'edits' must be a non-empty list of edits, not {edits!r}")
    edits = [_normal_edit(edit, i) for i, edit in enumerate(edits, 1)]
    _check_edits(source, edits)
    steps = data.get("num_inference_steps", 50)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, not {steps!r}")
    guidance = data.get("guidance_scale", 7.5)
    if not _is_number(guidance):
        raise ValueError(f"guidance_scale must be a finite number, not {guidance!r}")
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, not {negative!r}")
    for name in ("height", "width"):
        value = data.get(name)
        if value is not None and (not _is_int(value) or value <= 0 or value % 8):
            raise ValueError(f"{name} must be a positive multiple of 8 px, not {value!r}")
    model_name = data.get("model")
    if model_name is not None and (not isinstance(model_name, str) or not model_name):
        raise ValueError(f"model must be a hub id, a local path or 'demo', not {model_name!r}")
    content: dict[str, Any] = {
        "model": model if model_name is None else _model_id(model_name, base, "the manifest's folder"),
        "source": source, "edits": edits,
        "num_inference_steps": steps, "guidance_scale": float(guidance), "negative_prompt": negative,
        "height": data.get("height"), "width": data.get("width"),
    }
    image = inversion = None
    seed = data.get("seed")
    if "image" in data:
        if seed is not None:
            raise ValueError("seed does not apply to an image job: the inversion supplies the initial latent")
        image = _image(data["image"], base)
        inversion = _inversion(data.get("inversion", "null-text"))
        content.update(image=image["sha256"], inversion=inversion)  # the content, wherever the file lives
    elif "inversion" in data:
        raise ValueError("'inversion' needs an 'image' to invert")
    elif seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    content["seed"] = seed
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    job_id = data.get("id", digest[:16])
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise ValueError(f"id must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                         f"not {job_id!r}")
    if image is None and seed is None:
        seed = _seed_from(digest)  # stable across restarts, different across jobs
    return Job(id=job_id, line=line, model=content["model"], source=source, edits=edits, seed=seed,
               num_inference_steps=steps, guidance_scale=float(guidance), negative_prompt=negative,
               height=content["height"], width=content["width"], image=image, inversion=inversion)


def load_manifest(path: str | os.PathLike, *, model: str = "demo", skip_invalid: bool = False) -> Manifest:
    """Read and validate a JSON Lines manifest; every malformed line is reported with its number.

    Args:
        path: the manifest; relative image and model paths in it count from its folder.
        model: the model of jobs that name none (a relative path counts from the current folder).
        skip_invalid: keep the valid jobs and list the errors in `Manifest.errors` instead of raising.

    Example: `jobs = load_manifest("edits.jsonl").jobs`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read the manifest {str(path)!r}: {error}") from None
    base = path.resolve().parent
    try:
        model = _model_id(model, Path.cwd(), "the current folder")
    except ValueError as error:
        raise ManifestError(f"--model: {error}") from None
    jobs: list[Job] = []
    errors: list[str] = []
    lines_of: dict[str, int] = {}
    for number, text_line in enumerate(text.splitlines(), 1):
        if not text_line.strip():
            continue
        try:
            job = parse_job(json.loads(text_line), line=number, base=base, model=model)
        except json.JSONDecodeError as error:
            errors.append(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        except ValueError as error:
            errors.append(f"{path}:{number}: {error}")
            continue
        if job.id in lines_of:
            errors.append(f"{path}:{number}: job id {job.id!r} is already line {lines_of[job.id]}'s; "
                          "give one of them another explicit 'id' (or drop the duplicate)")
            continue
        lines_of[job.id] = number
        jobs.append(job)
    if not jobs and not errors:
        errors.append(f"{path}: the manifest has no jobs; write one JSON object per line")
    if errors and not skip_invalid:
        raise ManifestError(f"{len(errors)} invalid line(s) in the manifest (fix them, or pass --skip-invalid "
                            "to run the rest):\n" + "\n".join(errors))
    return Manifest(path=path, jobs=jobs, errors=errors)


def plan_groups(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Jobs that share a model and settings, in manifest order, cut into groups of at most `batch_size`.

    >>> [len(g) for g in plan_groups([], 4)]
    []
    """
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.group_key(), []).append(job)
    groups: list[list[Job]] = []
    for members in by_key.values():
        groups += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    # Grouped by model first, so that a worker switches model as rarely as the manifest allows.
    return sorted(groups, key=lambda g: (g[0].model, g[0].line))


def load_score_hook(spec: str) -> ScoreHook:
    """Import a scoring function given as "package.module:function"."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"a score hook is given as 'package.module:function', not {spec!r}")
    try:
        hook = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the score hook {spec!r}: {error}") from None
    if not callable(hook):
        raise ValueError(f"the score hook {spec!r} is not callable")
    return hook


# ---------------------------------------------------------------------------------------------------------------
# Workers: load a model, run groups of jobs, send the images back


@dataclass
class Outcome:
    """What a worker sends back for one job."""

    job_id: str
    status: str  # "done" or "failed"
    started: float
    finished: float
    batch: int  # jobs in the forward batch that made it
    worker: str
    error: str | None = None
    images: list[Any] = field(default_factory=list)  # PIL images: the source, then the kept edits
    indices: list[int] = field(default_factory=list)  # each image's index in the result (0 the source)
    recipe: Any = None
    scores: list[float] | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker loads its model and what it does with the images."""

    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    batch_size: int = 1
    score: ScoreHook | None = None
    min_score: float | None = None


def _is_oom(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Worker:
    """Holds one model replica and runs groups of jobs on it; used in-process, in pool processes and as a Ray actor."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.limit = config.batch_size  # lowered for good after an out-of-memory error
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._model: tuple[str, Any, Any] | None = None
        if config.threads:
            torch.set_num_threads(config.threads)

    def _editor(self, model: str):
        if self._model is None or self._model[0] != model:
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as transformers_logging

            from .loading import load_pipeline, resolve_model

            self._model = None  # free the previous replica before loading the next
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
            source = resolve_model(model)
            pipe = load_pipeline(source, device=self.config.device, torch_dtype=self.config.dtype)
            pipe.set_progress_bar_config(disable=True)
            self._model = (model, Editor(pipe), source)
        return self._model[1], self._model[2]

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run jobs that share a model and settings, `self.limit` at a time; never raises for a job's error."""
        started = time.time()
        try:
            editor, source = self._editor(jobs[0].model)
        except Exception as error:  # every job of the group needs this model
            return [self._failed(job, error, started, len(jobs)) for job in jobs]
        outcomes: list[Outcome] = []
        position = 0
        while position < len(jobs):
            chunk = list(jobs[position : position + self.limit])
            outcomes += self._run_chunk(editor, source, chunk, retry=True)
            position += len(chunk)
        return outcomes

    def _failed(self, job: Job, error: BaseException, started: float, batch: int) -> Outcome:
        return Outcome(job.id, "failed", started, time.time(), batch, self.name, error=_describe(error))

    def _run_chunk(self, editor, source, chunk: list[Job], *, retry: bool) -> list[Outcome]:
        started = time.time()
        try:
            recipes = [self._recipe(editor, source, job) for job in chunk]
            results = self._forward(editor, recipes)
        except Exception as error:
            if retry and _is_oom(error):
                _free_memory()
                self.limit = max(1, len(chunk) // 2)
                return [outcome for i in range(0, len(chunk), self.limit)
                        for outcome in self._run_chunk(editor, source, chunk[i : i + self.limit], retry=False)]
            return [self._failed(job, error, started, len(chunk)) for job in chunk]
        finished = time.time()
        return [self._outcome(job, recipe, result, started, finished, len(chunk))
                for job, recipe, result in zip(chunk, recipes, results)]

    def _recipe(self, editor, source, job: Job) -> Recipe:
        return recipe_for(
            editor, source, source=job.source, edits=job.edits, seed=job.seed,
            num_inference_steps=job.num_inference_steps, guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt, height=job.height, width=job.width, image=job.image,
            inversion=job.inversion,
        )

    def _forward(self, editor, recipes: list) -> list[Any]:
        """Per recipe, its images as an (P, H, W, 3) array in [0, 1], or the exception that its job raised."""
        if len(recipes) == 1:
            return [run_recipe(recipes[0], editor, output_type="np").images]
        return edit_together(editor, recipes)

    def _outcome(self, job: Job, recipe, result, started: float, finished: float, batch: int) -> Outcome:
        if isinstance(result, Exception):
            return Outcome(job.id, "failed", started, finished, batch, self.name, error=_describe(result))
        if not np.isfinite(result).all():
            return Outcome(job.id, "failed", started, finished, batch, self.name,
                           error="FloatingPointError: the images hold NaN or infinite values (try float32, or another "
                                 "guidance_scale or seed)")
        images = _to_pil(result)
        indices = list(range(len(images)))
        scores = None
        if self.config.score is not None:
            try:
                scores = [float(self.config.score(images[0], image, job.source, spec["prompt"]))
                          for image, spec in zip(images[1:], job.edits)]
            except Exception as error:  # a user's hook: its failure is the job's
                return self._failed(job, error, started, batch)
            if self.config.min_score is not None:
                indices = [0] + [i for i, s in enumerate(scores, 1) if s >= self.config.min_score]
                images = [images[i] for i in indices]
        return Outcome(job.id, "done", started, finished, batch, self.name, images=images, indices=indices,
                       recipe=recipe, scores=scores)


def _image_name(index: int) -> str:
    """The file name of a result's image: source.png, then edit-1.png, edit-2.png, ... as `p2p edit` writes them."""
    return "source.png" if index == 0 else f"edit-{index}.png"


def _to_pil(images) -> list:
    """(P, H, W, 3) floats in [0, 1] to PIL images, rounded as diffusers' own "pil" output is."""

    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def edit_together(editor, recipes: list) -> list[Any]:
    """Jobs of one model and settings, none with a real image, through the pipeline as one forward batch.

    Each job keeps its own run state, as in `Editor.edit`: a `_GroupAttnProcessor` hands every layer each
    job's rows to that job's `P2PAttnProcessor`, and the step-end callbacks run per job on its latents.
    Returns, per recipe, its (P, H, W, 3) images in [0, 1], or the error its preparation raised.
    """
    pipe = editor.pipe
    first = recipes[0]
    steps = first.num_inference_steps
    scale = pipe.vae_scale_factor
    height = first.height or pipe.unet.config.sample_size * scale
    width = first.width or pipe.unet.config.sample_size * scale
    latent_size = (height // scale, width // scale)
    shape = (1, pipe.unet.config.in_channels, *latent_size)
    results: list[Any] = [None] * len(recipes)
    runs = []
    for position, recipe in enumerate(recipes):
        try:  # what Editor.edit checks before it runs, per job: one job's bad words fail only that job
            edits = build_edits(recipe)
            source = editor.tokenize(recipe.source)
            targets = [editor.tokenize(edit.prompt) for edit in edits]
            plan = build_plan(source, edits, targets, steps)
            state = editor._run_state(plan, latent_size, any(edit.blend is not None for edit in edits), False)
            callback = editor._callback(state, editor._blend_positions(source, edits, targets), steps, latent_size,
                                        None, None)
        except (ValueError, TypeError) as error:
            results[position] = error
            continue
        latents = _initial_latents(None, recipe.seed, None, shape, plan.num_prompts, pipe._execution_device,
                                   pipe.unet.dtype)
        runs.append((position, recipe, state, callback, latents, [recipe.source] + [edit.prompt for edit in edits]))
    if not runs:
        return results
    counts = [len(run[5]) for run in runs]
    bounds = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(runs))]

    def on_step_end(pipe, k: int, t, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        outputs = [run[3](pipe, k, t, {**kwargs, "latents": latents[a:b]}) for run, (a, b) in zip(runs, bounds)]
        if not any("latents" in output for output in outputs):
            return {}
        return {"latents": torch.cat([o.get("latents", latents[a:b]) for o, (a, b) in zip(outputs, bounds)])}

    negative = None
    if any(run[1].negative_prompt for run in runs):
        negative = [run[1].negative_prompt or "" for run in runs for _ in run[5]]  # "" is diffusers' own default
    saved = pipe.unet.attn_processors
    try:
        pipe.unet.set_attn_processor({
            name: _GroupAttnProcessor([P2PAttnProcessor(run[2], name) for run in runs], counts) for name in saved
        })
        images = pipe(
            prompt=[prompt for run in runs for prompt in run[5]], negative_prompt=negative, height=height, width=width,
            num_inference_steps=steps, guidance_scale=first.guidance_scale, latents=torch.cat([run[4] for run in runs]),
            output_type="np", callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
        ).images
    finally:
        pipe.unet.set_attn_processor(saved)
    for run, (a, b) in zip(runs, bounds):
        results[run[0]] = images[a:b]
    return results


class _GroupAttnProcessor(P2PAttnProcessor):
    """One layer's processor for several jobs in one batch: each job's rows go to that job's own processor.

    The batch is [uncond of every prompt..., cond of every prompt...] (or only the cond half without
    guidance); a job's rows are its prompts in each half, which is the batch its processor expects.
    """

    def __init__(self, processors: list, counts: list[int]):  # only `attend` differs from P2PAttnProcessor
        self.processors = processors
        self.counts = counts

    def attend(self, q, k, v, mask):
        total = sum(self.counts)
        halves = q.shape[0] // total
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        # Each job's rows are one slice per half: slicing needs no index tensor on the device.
        outs = [[] for _ in range(halves)]
        for processor, start, count in zip(self.processors, starts, self.counts):
            spans = [slice(h * total + start, h * total + start + count) for h in range(halves)]

            def rows(x):
                return None if x is None else torch.cat([x[span] for span in spans])

            out = processor.attend(rows(q), rows(k), rows(v), rows(mask))
            for h, part in enumerate(out.split(count)):
                outs[h].append(part)
        return torch.cat([part for half in outs for part in half])


# ---------------------------------------------------------------------------------------------------------------
# Executors: the same Worker in this process, in a process pool, or as Ray actors


class _Inline:
    def __init__(self, config: WorkerConfig):
        self.worker = Worker(config)
        self.queue: list[list[Job]] = []
        self.capacity = 1

    def submit(self, group: list[Job]) -> None:
        self.queue.append(group)

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        group = self.queue.pop(0)
        return [(group, self.worker.run(group))]

    def close(self) -> None:
        self.queue.clear()


_POOL_WORKER: Worker | None = None


def _kill_with_parent() -> None:
    """Make this process die with the process that started it, so that `kill -9` of a run leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pool_init(config: WorkerConfig, counter) -> None:
    global _POOL_WORKER
    _kill_with_parent()
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    device = config.device
    if device in (None, "cuda"):
        if torch.cuda.is_available():
            device = f"cuda:{index % torch.cuda.device_count()}"  # one replica per GPU, round robin
    _POOL_WORKER = Worker(dataclasses.replace(config, device=device))


def _pool_run(group: list[Job]) -> list[Outcome]:
    return _POOL_WORKER.run(group)


class _Pool:
    def __init__(self, config: WorkerConfig, workers: int):
        self.config, self.workers = config, workers
        self.capacity = 2 * workers  # one group running and one waiting per process
        self.pending: dict[futures.Future, list[Job]] = {}
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
        self.pool = futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pool_init,
                                                initargs=(self.config, context.Value("i", 0)))

    def submit(self, group: list[Job]) -> None:
        self.pending[self.pool.submit(_pool_run, group)] = group

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        done, _ = futures.wait(self.pending, return_when=futures.FIRST_COMPLETED)
        results = []
        broken = False
        for future in done:
            group = self.pending.pop(future)
            error = future.exception()
            broken |= isinstance(error, futures.process.BrokenProcessPool)
            results.append((group, error if error is not None else future.result()))
        if broken:  # a worker died (killed, segfault): its pool is unusable, the run goes on with a new one
            for future, group in self.pending.items():
                results.append((group, futures.process.BrokenProcessPool("a worker process of the pool died")))
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start()
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """One actor per GPU of the cluster (or `workers` CPU actors without GPUs), each holding a model replica."""

    def __init__(self, config: WorkerConfig, workers: int | None, address: str):
        try:
            import ray
        except ImportError as error:
            raise RuntimeError(f"--ray needs the 'batch' extra ({error}): pip install 'prompt2prompt[batch]'") from None
        self.owned = not ray.is_initialized()
        if self.owned:
            ray.init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(**resources, max_restarts=-1)(Worker)
        self.ray = ray
        self.actors = [actor.remote(dataclasses.replace(config, device=None if gpus else config.device))
                       for _ in range(count)]
        self.idle = list(self.actors)
        self.capacity = len(self.actors)
        self.pending: dict[Any, tuple[Any, list[Job]]] = {}

    def submit(self, group: list[Job]) -> None:
        actor = self.idle.pop()
        self.pending[actor.run.remote(group)] = (actor, group)

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        results = []
        for ref in ready:
            actor, group = self.pending.pop(ref)
            self.idle.append(actor)
            try:
                results.append((group, self.ray.get(ref)))
            except Exception as error:  # the actor died; Ray restarts it for the next group
                results.append((group, error))
        return results

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.owned:
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# The output folder: lock, index, publication of a job's folder


def _now(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def read_index(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The results index of an output folder: per job id, its last row ("done" rows are final)."""
    rows: dict[str, dict[str, Any]] = {}
    path = Path(out) / INDEX
    if not path.is_file():
        return rows
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:  # the torn last line of a killed run
            continue
        if rows.get(row["id"], {}).get("status") != "done":
            rows[row["id"]] = row
    return rows


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another p2p batch is writing to {str(out)!r}; wait for it to end, or use another --out") from None
        yield  # the lock goes with the process, kill -9 included


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _recover(out: Path) -> dict[str, dict[str, Any]]:
    """Make the folder consistent after any stop: drop half-built jobs, index every finished one, once."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    index = read_index(out)
    folders = os.scandir(out / JOBS) if (out / JOBS).is_dir() else []
    for folder in folders:
        if index.get(folder.name, {}).get("status") != "done":
            # The folder is the proof: the run stopped after its rename, before its index line.
            row = json.loads((Path(folder.path) / "job.json").read_text(encoding="utf-8"))
            index[row["id"]] = row
    _write_index(out, index)  # also cuts a torn last line
    return index


def _write_index(out: Path, index: dict[str, dict[str, Any]]) -> None:
    """Rewrite the index with one row per job, atomically."""
    _write_atomic(out / INDEX, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in index.values()))


def _row(job: Job, outcome: Outcome | None, error: BaseException | None = None) -> dict[str, Any]:
    if outcome is None:
        now = time.time()
        return {"id": job.id, "line": job.line, "status": "failed", "error": _describe(error), "started": _now(now),
                "finished": _now(now), "seconds": 0.0, "batch": 0, "worker": None, "paths": []}
    row = {"id": job.id, "line": job.line, "status": outcome.status, "error": outcome.error,
           "started": _now(outcome.started), "finished": _now(outcome.finished),
           "seconds": round(outcome.finished - outcome.started, 4), "batch": outcome.batch, "worker": outcome.worker,
           "paths": [f"{JOBS}/{job.id}/{_image_name(i)}" for i in outcome.indices]}
    if outcome.scores is not None:
        row["scores"] = outcome.scores
    return row


def _publish(out: Path, job: Job, outcome: Outcome, row: dict[str, Any]) -> None:
    """Write a job's images into .staging/ and rename the finished folder into jobs/ in one step."""
    final = out / JOBS / job.id
    staging = out / STAGING / job.id
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for index, image in zip(outcome.indices, outcome.images):
        save_png(image, staging / _image_name(index), outcome.recipe.with_index(index))
    (staging / "job.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    final.parent.mkdir(exist_ok=True)
    os.rename(staging, final)  # a job is published once: done jobs are never run again


class _Index:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    """What a run did: jobs done and failed in this run, those already done before it, and its speed."""

    done: int
    failed: int
    skipped: int
    seconds: float
    out: Path

    @property
    def jobs_per_minute(self) -> float:
        """Jobs finished (done or failed) per minute of this run, its start-up included."""
        return 60.0 * (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def run_batch(
    jobs: Manifest | Sequence[Job],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    score: ScoreHook | None = None,
    min_score: float | None = None,
    progress: bool = True,
) -> Summary:
    """Run every job not yet done in `out`; safe to stop at any moment and to start again.

    Args:
        jobs: a `Manifest` from `load_manifest`, or its jobs.
        out: the output folder (jobs/<id>/ and results.jsonl).
        workers: processes, each with one model replica (default 1); 0 runs in this process. With Ray, the
            number of actors (default: one per GPU of the cluster, else 1).
        ray_address: run on Ray: "auto" (a running cluster), "ray://host:10001", or "local" (a new local
            instance); an already initialised Ray is used as it is.
        batch_size: jobs of one model and settings per forward batch; halved once on out-of-memory.
        threads: torch CPU threads per worker (default: OMP_NUM_THREADS, else the CPUs shared among pool
            workers; as they are in this process and in Ray actors).
        score: `score(source_image, edited_image, source_prompt, edit_prompt) -> float`, e.g. a CLIP
            directional similarity; recorded per edit in the job's row.
        min_score: edits scoring below it are not written (the job stays done).

    Example: `run_batch(load_manifest("edits.jsonl"), "runs/edits", batch_size=8)`.
    """
    job_list = list(jobs.jobs if isinstance(jobs, Manifest) else jobs)
    if batch_size < 1 or (workers is not None and workers < 0):
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, not {batch_size} and {workers}")
    if ray_address is None and workers is None:
        workers = 1
    if min_score is not None and score is None:
        raise ValueError("min_score filters by the score hook's values; give score= too")
    out = Path(out)
    started = time.time()
    with _locked(out):
        index = _recover(out)
        finished = {job_id for job_id, row in index.items() if row["status"] == "done"}
        todo = [job for job in job_list if job.id not in finished]
        skipped = len(job_list) - len(todo)
        if threads is None and ray_address is None and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // workers)  # more would oversubscribe the CPUs
        config = WorkerConfig(device=device, dtype=dtype, threads=threads, batch_size=batch_size, score=score,
                              min_score=min_score)
        counts = {"done": 0, "failed": 0}
        if not todo:
            return Summary(0, 0, skipped, time.time() - started, out)
        bar = tqdm(total=len(job_list), initial=skipped, unit="job", desc="p2p batch", disable=not progress,
                   dynamic_ncols=True)
        executor = (_Ray(config, workers, ray_address) if ray_address is not None
                    else _Inline(config) if workers == 0 else _Pool(config, workers))
        results = _Index(out / INDEX)
        try:
            groups = iter(plan_groups(todo, batch_size))
            in_flight = 0
            for group in _take(groups, executor.capacity):
                executor.submit(group)
                in_flight += 1
            while in_flight:
                for group, outcomes in executor.wait():
                    in_flight -= 1
                    for job, outcome, row in _rows(group, outcomes):
                        if row["status"] == "done":
                            _publish(out, job, outcome, row)
                        results.append(row)
                        counts[row["status"]] += 1
                        bar.update(1)
                        bar.set_postfix(failed=counts["failed"], refresh=False)
                    for next_group in _take(groups, 1):
                        executor.submit(next_group)
                        in_flight += 1
        finally:
            executor.close()
            results.close()
            bar.close()
        _write_index(out, read_index(out))  # a retried job's earlier rows go
    return Summary(counts["done"], counts["failed"], skipped, time.time() - started, out)


def _take(items: Iterator, n: int) -> list:
    return [item for _, item in zip(range(n), items)]


def _rows(group: list[Job], outcomes: list[Outcome] | BaseException) -> Iterator[tuple[Job, Outcome | None, dict]]:
    if isinstance(outcomes, BaseException):  # the worker itself died
        for job in group:
            yield job, None, _row(job, None, outcomes)
        return
    by_id = {outcome.job_id: outcome for outcome in outcomes}
    for job in group:
        yield job, by_id[job.id], _row(job, by_id[job.id])
