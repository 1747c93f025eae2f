"""The step-end callback of an edit run: steps, local blending, inversion, and a cached source's evaluations."""

from __future__ import annotations

import math
from collections.abc import Callable
import torch

from ..attention.blend import apply_blend
from ..attention.state import RunState, pad_text
from ..families.protocols import EditingFamily
from ..schedules import step_index
from .cache import CacheRecorder
from .run import PreparedRun


class StepCallback:
    """The step-end callback of one run, in the shape of diffusers' `PipelineCallback`.

    After each loop iteration it advances the run's step (the loop index // the scheduler's order, clamped),
    and after the last evaluation of a step it adds direct inversion's correction to the source row and
    blends the edits that have a local blend. It swaps in null-text inversion's unconditional embedding of the
    next step, serves a cached source's next evaluation, and feeds a cache recorder. A user callback runs last.
    """

    def __init__(self, run: PreparedRun, state: RunState, family: EditingFamily, *, recorder: CacheRecorder | None = None,
                 user_callback: Callable | None = None):
        self.run, self.state, self.recorder, self.user_callback = run, state, recorder, user_callback
        self.family = family  # packs and unpacks the pipeline's latents (Flux's are 2x2 patches in tokens)
        tensor_inputs = family.callback_tensor_inputs(run.inversion)
        self.tensor_inputs = list(tensor_inputs)
        self.masks: dict[int, torch.Tensor] = {}  # edit index -> its last blend mask, on the device

    def __call__(self, pipe, k: int, t, kwargs: dict) -> dict:
        run, state, cache = self.run, self.state, self.run.cache
        n = run.num_inference_steps
        order = getattr(pipe.scheduler, "order", 1)
        total = len(pipe.scheduler.timesteps)
        i = step_index(k, order, n)
        outputs: dict[str, torch.Tensor] = {}
        if cache is not None and cache.blend_maps is not None and state.blend_sum is not None:
            # the source's maps summed up to this evaluation, at this run's text length
            source = pad_text(cache.blend_maps[k].to(state.blend_sum), state.blend_sum.shape[-1])
            state.blend_sum = torch.cat([source[None], state.blend_sum[1:]])
        if self.recorder is not None:
            self.recorder.end_evaluation(state.blend_sum)
        if k == total - 1 or step_index(k + 1, order, n) != i:  # the step's last evaluation
            unpacked = self._end_step(self.family.unpack(kwargs["latents"], run.latent_size), i)
            outputs["latents"] = self.family.pack(unpacked)
        if k + 1 < total:
            state.step = step_index(k + 1, order, n)
            if cache is not None:
                state.source = cache.evaluation(k + 1, run.latents.device)
            rows = len(run.prompts) - (cache is not None)
            outputs |= self.family.step_text_inputs(kwargs, run.inversion, state.step, rows)
        if self.user_callback is not None:
            outputs.update(self.user_callback(pipe, k, t, {**kwargs, **outputs}) or {})
        return outputs

    def _end_step(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        run, state, cache = self.run, self.state, self.run.cache
        if cache is None:
            if run.inversion is not None and run.inversion.corrections is not None:
                latents = torch.cat([latents[:1] + run.inversion.corrections[i].to(latents), latents[1:]])
            source, first = latents[0], 1
        else:
            source, first = cache.step_latents[i, 0].to(latents), 0
        for e, blend in run.blends.items():
            if i < math.floor(blend.start * run.num_inference_steps + 1e-6) or state.blend_sum is None:
                continue
            maps = state.blend_sum / max(state.blend_layers, 1)
            self.masks[e] = blend.mask(maps[0], maps[1 + e], run.latent_size)
            latents = apply_blend(latents, first + e, self.masks[e], source=source)
        if self.recorder is not None:
            self.recorder.end_step(latents[:1])
        return latents
