"""Sending prepared runs through the pipeline: one run, or several as one forward batch.

Each call installs the family's processors, pointing at fresh `RunState`s, calls the pipeline with a `StepCallback`
(steps, blending, inversion), and restores the processors and the scheduler in `finally`. What it sends is the
`PreparedRun` as `Editor.prepare` built it; nothing here changes a setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..attention.plan import build_plan
from ..attention.state import RunState, pad_text
from ..families import Family
from ..images import check_finite_images
from .callback import StepCallback
from .run import CallRows, EditResult, PreparedRun


def run_one(pipe, family: Family, run: PreparedRun, output_type: str, user_callback: Callable | None) -> EditResult:
    """One run: its own pipeline call, or, with a source cache, the edits' rows beside the cached source."""
    cache = run.cache
    state = new_state(family, run, cached=cache is not None)
    callback = StepCallback(run, state, family, user_callback=user_callback)
    if cache is None:
        images = call(pipe, family, run, [state], callback, output_type)
    else:
        if output_type == "latent":  # in the pipeline's own form (Flux: packed)
            source = family.output_latents(cache.step_latents[-1].to(run.latents))
        else:
            source = _source_image(cache.image, output_type, pipe)
        if len(run.prompts) == 1:  # nothing to run: the source alone
            images = source
        else:
            state.source = cache.evaluation(0, run.latents.device)
            images = _concat(source, call(pipe, family, run, [state], callback, output_type))
    return result(family, run, state, callback, images)


def run_group(pipe, family: Family, runs: list[PreparedRun], output_type: str) -> list[EditResult]:
    """Several runs in one forward batch, each with its own attention control; one result per run."""
    first = runs[0]
    for r in runs:
        if r.inversion is not None or r.cache is not None:
            raise ValueError("runs with an inversion or a source cache cannot share a forward batch; run them one by one")
        shared = (r.num_inference_steps, r.guidance_scale, r.height, r.width, r.pipeline_kwargs)
        if shared != (first.num_inference_steps, first.guidance_scale, first.height, first.width, first.pipeline_kwargs):
            raise ValueError("runs in one forward batch must share steps, guidance, size and pipeline keywords")
    # One call has one text length: a run whose prompts are shorter is planned again at the longest run's.
    length = max(r.text_length for r in runs)
    runs = [at_text_length(family, r, length) for r in runs]
    states = [new_state(family, r) for r in runs]
    callbacks = [StepCallback(r, s, family) for r, s in zip(runs, states)]
    counts = [len(r.prompts) for r in runs]
    bounds = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(runs))]

    def on_step_end(pipe, k: int, t, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        outputs = [cb(pipe, k, t, {**kwargs, "latents": latents[a:b]}) for cb, (a, b) in zip(callbacks, bounds)]
        if not any("latents" in o for o in outputs):
            return {}
        return {"latents": torch.cat([o.get("latents", latents[a:b]) for o, (a, b) in zip(outputs, bounds)])}

    negative = None
    if any(r.negative_prompt is not None for r in runs):
        negative = [r.negative_prompt or "" for r in runs for _ in r.prompts]  # "" is diffusers' own default
    rows = CallRows(torch.cat([r.latents for r in runs]), [p for r in runs for p in r.prompts], negative, counts,
                    ["latents"])
    images = call(pipe, family, runs[0], states, on_step_end, output_type, rows)
    return [result(family, r, s, cb, images[a:b]) for r, s, cb, (a, b) in zip(runs, states, callbacks, bounds)]


def call(pipe, family: Family, run: PreparedRun, states: list[RunState], callback, output_type: str,
         rows: CallRows | None = None):
    """The pipeline call of one run, or of the runs whose `rows` are led by `run`, with their processors installed;
    the pipeline's scheduler and processors are restored in `finally`."""
    if rows is None:
        skip = run.cache is not None  # a cached source's rows are not computed
        prompts = list(run.prompts[skip:])
        negative = None if run.negative_prompt is None else [run.negative_prompt] * len(prompts)
        rows = CallRows(run.latents[skip:], prompts, negative, [len(prompts)], callback.tensor_inputs)
    call_kwargs: dict[str, Any] = dict(
        height=run.height, width=run.width, num_inference_steps=run.num_inference_steps,
        guidance_scale=run.guidance_scale, latents=family.call_latents(rows.latents), output_type=output_type,
        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=rows.tensor_inputs,
        **run.pipeline_kwargs,
    )
    inversion = run.inversion
    call_kwargs.update(family.call_text(rows.prompts, rows.negative, run.text_length, inversion,
                                        family.execution_device()))
    scheduler = family.inversion_scheduler() if inversion is not None else None
    saved_scheduler = pipe.scheduler
    hook = None
    if family.split_passes(call_kwargs):
        # The model runs twice a step, the conditional pass first: every row of the second is plain generation.
        def count_pass(module, args):
            for state in states:
                state.unconditional_pass = not state.unconditional_pass

        for state in states:
            state.unconditional_pass = True  # the first call flips it to the conditional pass
        hook = family.model.register_forward_pre_hook(count_pass)
    try:
        if scheduler is not None:
            pipe.scheduler = scheduler
        with family.installed(family.processors(states, rows.counts), states, rows.counts):
            images = pipeline_images(pipe, family, call_kwargs)
        check_finite_images(images)
        return pipe.image_processor.numpy_to_pil(images) if output_type == "pil" else images
    finally:
        if hook is not None:
            hook.remove()
        pipe.scheduler = saved_scheduler


def pipeline_images(pipe, family: Family, call_kwargs: dict):
    """The pipeline's images for `call_kwargs`; floats where PIL images are wanted: PIL cannot hold NaN (diffusers
    casts it to black), so the caller checks the floats, then converts them as diffusers does."""
    wanted = call_kwargs["output_type"]
    try:
        return pipe(**family.pipeline_call({**call_kwargs, "output_type": "np" if wanted == "pil" else wanted})).images
    except (ValueError, TypeError, RuntimeError, OSError):  # the pipeline's own checks, out of memory, ...
        raise
    except Exception as error:  # diffusers failing on a pass-through keyword (clip_skip, LoRA scale, ...)
        message = " ".join(str(error).split())[:300]
        raise RuntimeError(f"the {type(pipe).__name__} call failed: {type(error).__name__}: {message}; "
                           "check the keywords passed through to it") from error


def new_state(family: Family, run: PreparedRun, **values) -> RunState:
    """A fresh running state of `run`, with where the family's guided batches hold their conditional rows."""
    return RunState(plan=run.plan, layers=run.layers, conditional_first=family.conditional_first, **values)


def at_text_length(family: Family, run: PreparedRun, length: int) -> PreparedRun:
    """`run` with its text padded to `length` (masked padding): its tokens, plan and layers at that length."""
    if run.text_length == length:
        return run
    tokens = family.tokenize_run(run.prompts, run.pipeline_kwargs, length)
    plan = build_plan(tokens[0], run.edits, tokens[1:], run.num_inference_steps)
    return replace(run, tokens=tuple(tokens), plan=plan.to(family.execution_device(), family.model.dtype),
                   layers=run.layers.with_text_length(length))


def result(family: Family, run: PreparedRun, state: RunState, callback: StepCallback, images) -> EditResult:
    """The run's EditResult: its images, token texts and words, and its recorded maps and blend masks on the CPU."""
    attention = None
    if run.layers.record_sizes:
        attention = {}
        for size in run.layers.record_sizes:
            if size not in state.records and run.cache is None:
                continue
            maps = state.records.get(size)
            if run.cache is not None:
                source = (run.cache.records[size] / run.cache.record_counts[size]).cpu()  # (1, h, w, L_source)
                source = pad_text(source, run.text_length)
                edits = maps[1:] / state.record_counts[size] if maps is not None else source[:0]
                attention[max(size)] = torch.cat([source, edits.cpu()])
            else:
                attention[max(size)] = (maps / state.record_counts[size]).cpu()
    tokens = [family.token_texts(tok) for tok in run.tokens]
    words = [list(zip(tok.words, tok.word_tokens)) for tok in run.tokens]
    return EditResult(images=images, prompts=list(run.prompts), tokens=tokens, attention=attention,
                      masks={e: mask.cpu() for e, mask in callback.masks.items()}, family=family.name,
                      map_unit=family.map_unit, words=words)


def _source_image(image: torch.Tensor, output_type: str, pipe):
    """The cached source image (1, 3, H, W) in [0, 1] in the form the pipeline returns for `output_type`."""
    if output_type == "pt":
        return image
    array = pipe.image_processor.pt_to_numpy(image)
    return array if output_type == "np" else pipe.image_processor.numpy_to_pil(array)


def _concat(first, rest):
    """Join the source's output and the edits' outputs, whatever their form (tensors, arrays, PIL lists)."""
    if isinstance(first, list):
        return first + list(rest)
    if isinstance(first, torch.Tensor):
        return torch.cat([first, rest.to(first)])
    return np.concatenate([first, rest])

