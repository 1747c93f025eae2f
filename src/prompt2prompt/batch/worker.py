"""Workers: each holds one model replica, runs groups of jobs on it, and sends the images back.

The same `Worker` runs in this process, in the pool's processes and as a Ray actor; it only computes, and
never writes a file. A job's failure (a bad word, out of memory, NaN images, a failing score hook) becomes
that job's `Outcome`, never an exception of the worker, and never another job's: when a forward batch of
several jobs fails other than for memory, each of its jobs runs again alone and gets its own outcome.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine import load_editor
from ..images import check_finite_images
from ..recipe import Recipe, recipe_for, run_recipe
from .manifest import Job, ScoreHook
from .together import edit_together

__all__ = ["Outcome", "Worker", "WorkerConfig", "describe_error"]


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
    allow_pickle: bool = False  # also load pickle weights (with torch.load(weights_only=True)); off: safetensors only


def _is_oom(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def describe_error(error: BaseException) -> str:
    """An error as the index records it: "TypeName: message"."""
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
            self._model = None  # free the previous replica before loading the next
            editor, source = load_editor(model, device=self.config.device, dtype=self.config.dtype,
                                         allow_pickle=self.config.allow_pickle)
            self._model = (model, editor, source)
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
        return Outcome(job.id, "failed", started, time.time(), batch, self.name, error=describe_error(error))

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
            if len(chunk) > 1 and not _is_oom(error):  # one job's error (an overflow, say): each gets its own
                return [outcome for job in chunk for outcome in self._run_chunk(editor, source, [job], retry=retry)]
            return [self._failed(job, error, started, len(chunk)) for job in chunk]
        finished = time.time()
        outcomes = []
        for job, recipe, result in zip(chunk, recipes, results):
            try:
                outcomes.append(self._outcome(job, recipe, result, started, finished, len(chunk)))
            except Exception as error:  # turning one job's images into its outcome
                outcomes.append(self._failed(job, error, started, len(chunk)))
        return outcomes

    def _recipe(self, editor, source, job: Job) -> Recipe:
        return recipe_for(
            editor, source, source=job.source, edits=job.edits, seed=job.seed,
            num_inference_steps=job.num_inference_steps, guidance_scale=job.guidance_scale,
            negative_prompt=job.negative_prompt, height=job.height, width=job.width, image=job.image,
            inversion=job.inversion, max_sequence_length=job.max_sequence_length,
        )

    def _forward(self, editor, recipes: list) -> list[Any]:
        """Per recipe, its images as an (P, H, W, 3) array in [0, 1], or the exception that its job raised."""
        if len(recipes) == 1:
            # The batch's bar counts jobs; a bar of each job's inversion under it would garble it (and logs).
            return [run_recipe(recipes[0], editor, output_type="np", progress=False).images]
        return edit_together(editor, recipes)

    def _outcome(self, job: Job, recipe, result, started: float, finished: float, batch: int) -> Outcome:
        if isinstance(result, Exception):
            return Outcome(job.id, "failed", started, finished, batch, self.name, error=describe_error(result))
        try:
            check_finite_images(result)  # before the PNGs, which would show NaN as black
        except RuntimeError as error:
            return Outcome(job.id, "failed", started, finished, batch, self.name, error=describe_error(error))
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


def _to_pil(images) -> list:
    """(P, H, W, 3) floats in [0, 1] to PIL images, rounded as diffusers' own "pil" output is."""

    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
