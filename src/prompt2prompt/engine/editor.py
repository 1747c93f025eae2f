"""The Editor: runs Prompt-to-Prompt edits through a diffusers pipeline of any family.

It does not fork the pipeline's denoising loop. One way in, in two stages (httpx's build, then send):
- `prepare()` checks everything and builds what one run needs (tokens, plan, layers, latents) before any
  model call, touching no pipeline state (its checks: `engine.inputs`);
- `run()` sends a prepared run as it is (`engine.send`): it installs the family's processors, calls the
  pipeline with a `StepCallback`, and restores the processors and the scheduler. Several prepared runs can
  share one forward batch, each with its own state.
`edit()` is `run(prepare(...))`. A `SourceCache` from `cache_source()` lets later edits of one source skip
the source's rows. Whatever the model, the editor asks its family (`prompt2prompt.families`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..alignment import Tokenized
from ..attention.plan import build_plan
from ..attention.state import LayerPlan
from ..edits import Edit
from ..families import Family, family_of
from ..families.defaults import DEFAULTS_FILE
from ..loading import Checkpoint, check_device, load_pipeline, parse_dtype, quiet_loading, resolve_model
from . import send
from .cache import CacheRecorder, SourceCache
from .callback import StepCallback
from .inputs import (blend_specs, check_cacheable, check_inputs, check_negative_prompt, check_output_type,
                     initial_latents, resolve_settings)
from .run import EditResult, PreparedRun

ATTENTION = ("fused", "explicit")


class Editor:
    """Prompt-to-Prompt on a loaded pipeline of any family in `prompt2prompt.families`.

    Args:
        pipe: the diffusers pipeline; its own attention processors are restored after every call.
        self_replace_max_res: UNet models: self-attention is replaced in layers whose side is at most this
            (None: latent side / 4, i.e. 16 for SD at 512 px).
        blend_res: UNet models: the layer side whose cross-attention drives local blending (None: latent side / 4,
            or the nearest side with cross-attention in the down and up blocks when the model has none there).
        attention: "fused" (scaled-dot-product attention everywhere) or "explicit" (materialised
            probabilities, the reference).
        cross_blocks, self_blocks, record_blocks: transformer models: the blocks (numbered as they run) whose
            text attention is edited (None: every block), whose image attention is the source's while the self
            window is open (None: the family's rule), and whose text attention drives local blending and
            recorded maps (None: every block); see `prompt2prompt.families`.

    Example:
        >>> editor = Editor(pipe)  # doctest: +SKIP
        >>> result = editor.edit("a cat riding a bicycle", [Edit("a dog riding a bicycle")], seed=0)  # doctest: +SKIP
    """

    def __init__(self, pipe, *, self_replace_max_res: int | None = None, blend_res: int | None = None, attention: str = "fused",
                 cross_blocks: Sequence[int] | None = None, self_blocks: Sequence[int] | None = None,
                 record_blocks: Sequence[int] | None = None):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        family = family_of(pipe)
        for name in ("tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise TypeError(f"Editor needs a pipeline with a {name}; {type(pipe).__name__} has none")
        given = dict(self_replace_max_res=self_replace_max_res, blend_res=blend_res, cross_blocks=cross_blocks,
                     self_blocks=self_blocks, record_blocks=record_blocks)
        family.check_layer_options(given)
        defaults = family.defaults()  # the model's own (its prompt2prompt.json), else its family's
        # Layers not given are the model's (its file's "layers"), else the family's rule (None).
        options = {name: defaults.layers.get(name) if value is None else value for name, value in given.items()}
        try:
            family.check_layer_options(options)
        except ValueError as error:
            raise ValueError(f"the model's {DEFAULTS_FILE} \"layers\": {error}") from None
        self.pipe = pipe
        self.family: Family = family
        self.self_replace_max_res, self.blend_res = options["self_replace_max_res"], options["blend_res"]
        self.cross_blocks, self.self_blocks = options["cross_blocks"], options["self_blocks"]
        self.record_blocks = options["record_blocks"]
        self.attention = attention
        self.defaults = defaults
        self.checkpoint: Checkpoint | None = None  # where `from_pretrained` loaded the model from

    @property
    def layer_options(self) -> dict[str, Any]:
        """The layer keywords this editor was made with that its family takes."""
        return {name: getattr(self, name) for name in self.family.layer_options}

    @classmethod
    def from_pretrained(cls, model: str | Checkpoint, *, device: str | torch.device | None = None,
                        torch_dtype: str | torch.dtype | None = None, revision: str | None = None,
                        allow_pickle: bool = False, progress: bool = True, **kwargs) -> Editor:
        """Load a pipeline ("demo", "demo-flow", a diffusers folder, a single .safetensors file, a hub id, or a
        `Checkpoint`) and wrap it; `editor.checkpoint` says where it came from. `kwargs` go to `Editor`.

        `device`, `torch_dtype` (a dtype or its name; None or "auto": float16 on CUDA, float32 elsewhere), `revision`
        and `allow_pickle` are `loading.load_pipeline`'s: weights load from safetensors only, and `allow_pickle=True`
        also accepts pickle (.bin) weights, read with `torch.load(weights_only=True)`. `progress=False` hides the
        components' loading bars and the pipeline's denoising bar (downloads keep their own).
        """
        device = check_device(device)
        torch_dtype = parse_dtype(torch_dtype, device)  # before resolving: a bad device or dtype fails before any download
        checkpoint = model if isinstance(model, Checkpoint) else resolve_model(model, revision=revision)
        with contextlib.nullcontext() if progress else quiet_loading():
            pipe = load_pipeline(checkpoint, device=device, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
        pipe.set_progress_bar_config(disable=not progress)
        editor = cls(pipe, **kwargs)
        editor.checkpoint = checkpoint
        return editor

    def invert(self, image, prompt: str, **kwargs):
        """Invert a real image so that `edit(..., inversion=...)` can edit it; see `prompt2prompt.inversion.invert`."""
        from ..inversion import invert

        return invert(self.pipe, image, prompt, **kwargs)

    def tokenize(self, prompt: str, max_sequence_length: int | None = None) -> Tokenized:
        """The prompt's words and token positions under this pipeline's tokenizers (its joint text on MM-DiT).

        `max_sequence_length` is the text length of transformer runs (SD3's T5 default 256; most others' 512).
        """
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        return self.family.tokenize(prompt, kwargs)

    def edit(self, prompt: str, edits: Sequence[Edit | str] | Edit | str = (), *, output_type: str = "pil",
             **kwargs) -> EditResult:
        """Generate the source prompt and its edits in one batch, edits steered by the source's attention.

        `edit(prompt, edits, **kwargs)` is `run(prepare(prompt, edits, **kwargs), output_type=output_type)`;
        see `prepare` for the arguments.
        """
        callback = kwargs.pop("callback_on_step_end", None)
        check_output_type(output_type)
        return self.run(self.prepare(prompt, edits, **kwargs), output_type=output_type, callback_on_step_end=callback)

    def prepare(
        self,
        prompt: str,
        edits: Sequence[Edit | str] | Edit | str = (),
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        record_attention: bool | int | Sequence[int] = False,
        inversion=None,
        cache: SourceCache | None = None,
        **pipeline_kwargs,
    ) -> PreparedRun:
        """Check an edit run and build everything it needs, before any model call.

        Args:
            prompt: the source prompt.
            edits: Edit objects (a plain string is an Edit with the defaults).
            num_inference_steps: denoising steps (the model's default, or the inversion's or cache's).
            guidance_scale: classifier-free guidance (the model's default, or the inversion's or cache's); <= 1
                turns it off (Z-Image's pipeline guides at any value > 0; Flux-dev and FLUX.2 dev embed it).
            seed / generator / latents: the initial latent, one draw shared by all prompts, or (P, C, h, w).
            record_attention: True, a layer side, or a list of sides: keep per-token cross-attention maps.
            inversion: an Inversion from `invert()`, to edit a real image.
            cache: a SourceCache from `cache_source()`: the source is not computed again.
            **pipeline_kwargs: passed to the diffusers pipeline (eta, guidance_rescale, cross_attention_kwargs, ...).
        """
        family = self.family
        # 1. Check inputs
        edits = check_inputs(family, prompt, edits, seed, generator, latents, negative_prompt, inversion, cache,
                             pipeline_kwargs)
        inversion = cache.inversion if cache is not None else inversion
        # 2. Resolve the settings: the cache's, the inversion's, or the model's defaults
        num_inference_steps, guidance_scale, height, width = resolve_settings(
            family, self.defaults, self.pipe.scheduler, num_inference_steps, guidance_scale, height, width,
            negative_prompt, latents, seed, generator, inversion, cache)
        check_negative_prompt(family, negative_prompt, pipeline_kwargs)
        # 3. Tokens at the run's one text length, mappers and windows
        source, *targets = family.tokenize_run([prompt, *(e.prompt for e in edits)], pipeline_kwargs)
        plan = build_plan(source, edits, targets, num_inference_steps)
        # 4. Layers: which edit, self-replace, blend and record
        channels, *latent_size = family.latent_shape(height, width)
        latent_size = tuple(latent_size)
        layers = self._layer_plan(latent_size, any(e.blend is not None for e in edits), record_attention, source.length)
        blends = blend_specs(source, edits, targets)
        if cache is not None:  # a cache records the blend maps of every source: its layers are those of a blending run
            blending = self._layer_plan(latent_size, True, record_attention, source.length)
            missing = sorted(max(s) for s in blending.record_sizes if s not in cache.records)
            if missing:
                raise ValueError(f"record_attention asks for sides {missing}, which the source cache did not record; "
                                 "pass the same record_attention to cache_source()")
            cache.check(self._cache_settings(num_inference_steps, guidance_scale, height, width, negative_prompt,
                                             pipeline_kwargs, blending), id(self.pipe))
        # 5. Initial latents: one draw shared by every prompt, on the model's device
        device, dtype = family.execution_device(), family.model.dtype
        if cache is not None:
            latents = cache.latents
        elif inversion is not None:
            latents = inversion.latents
        latents = initial_latents(latents, seed, generator, (1, channels, *latent_size), 1 + len(edits), device,
                                  family.latents_dtype)
        if inversion is not None:
            inversion = inversion.to(device, dtype)  # once, not at every step
        return PreparedRun(
            prompts=(prompt, *(e.prompt for e in edits)), tokens=(source, *targets), edits=tuple(edits),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            negative_prompt=negative_prompt, plan=plan.to(device, dtype), layers=layers, blends=blends, latents=latents,
            inversion=inversion, cache=cache, pipeline_kwargs=dict(pipeline_kwargs),
        )

    def run(self, run_or_runs: PreparedRun | Sequence[PreparedRun], *, output_type: str = "pil",
            callback_on_step_end: Callable | None = None, **pipeline_kwargs) -> EditResult | list[EditResult]:
        """Send one prepared run, or several as one forward batch (each keeps its own attention control).

        A run is sent as `prepare` built and checked it: its settings and pipeline keywords are `prepare`'s, and a
        changed one needs a new `prepare` (`run` only chooses the output's form and a step callback). Runs in one
        batch must share steps, guidance, size and pipeline keywords, and have no inversion and no cache. Returns an
        EditResult, or one per run.
        """
        if pipeline_kwargs:
            names = ", ".join(sorted(pipeline_kwargs))
            raise ValueError(f"run() sends a run as prepare() built and checked it; pass {names} to prepare() (or "
                             "edit()) instead")
        check_output_type(output_type)
        if isinstance(run_or_runs, PreparedRun):
            return send.run_one(self.pipe, self.family, run_or_runs, output_type, callback_on_step_end)
        runs = list(run_or_runs)
        if not runs or not all(isinstance(r, PreparedRun) for r in runs):
            raise TypeError("run() takes a PreparedRun from prepare(), or a non-empty list of them")
        if len(runs) == 1:
            return [send.run_one(self.pipe, self.family, runs[0], output_type, callback_on_step_end)]
        return send.run_group(self.pipe, self.family, runs, output_type)

    def cache_source(self, prompt: str, *, device: torch.device | str | None = None, **kwargs) -> SourceCache:
        """Run the source alone and record what its edits need, so that later edits skip the source's rows.

        Takes `prepare`'s settings (steps, guidance, seed or latents, negative prompt, size, inversion,
        record_attention, pipeline keywords); every later run with the cache must share them. `device` is where
        the cache lives (default: the pipeline's; "cpu" keeps a GPU's memory free, and each step is moved over
        as the run reaches it). The cache's size is `cache.nbytes`.
        """
        run = self.prepare(prompt, [], **kwargs)
        run = replace(run, layers=self._layer_plan(run.latent_size, True, kwargs.get("record_attention", False),
                                                   run.text_length))
        check_cacheable(self.pipe.scheduler, run.pipeline_kwargs)
        recorder = CacheRecorder(device)
        state = send.new_state(self.family, run, recorder=recorder)
        callback = StepCallback(run, state, self.family, recorder=recorder)
        image = send.call(self.pipe, self.family, run, [state], callback, "pt")
        return recorder.finish(
            prompt=prompt, pipeline_id=id(self.pipe),
            settings=self._cache_settings(run.num_inference_steps, run.guidance_scale, run.height, run.width,
                                          run.negative_prompt, run.pipeline_kwargs, run.layers),
            latents=run.latents[:1], image=image, records=state.records, record_counts=dict(state.record_counts),
            inversion=run.inversion,
        )

    def _layer_plan(self, latent_size: tuple[int, int], blend: bool, record_attention, text_length: int) -> LayerPlan:
        """Which layers self-replace, drive local blending and are recorded (the family decides by its layers)."""
        return self.family.layer_plan(latent_size, text_length, blend=blend, record_attention=record_attention,
                                      explicit=self.attention == "explicit", options=self.layer_options)

    def _cache_settings(self, num_inference_steps, guidance_scale, height, width, negative_prompt, pipeline_kwargs,
                        layers: LayerPlan) -> dict[str, Any]:
        """What a run shares with its cached source: everything that shapes the source's rows."""
        scheduler = self.pipe.scheduler
        return dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            negative_prompt=negative_prompt, scheduler=f"{type(scheduler).__name__} {sorted(dict(scheduler.config).items())}",
            pipeline_kwargs=repr(sorted(pipeline_kwargs.items())), attention=self.attention,
            dtype=str(self.family.model.dtype), **layers.cache_settings(),
        )


def load_editor(
    model: str | Checkpoint,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
) -> tuple[Editor, Checkpoint]:
    """`Editor.from_pretrained` for the front ends, quiet by default: the editor and where its model came from.

    Example: `editor, checkpoint = load_editor("demo")`.
    """
    editor = Editor.from_pretrained(model, device=device, torch_dtype=dtype, revision=revision,
                                    allow_pickle=allow_pickle, progress=progress)
    return editor, editor.checkpoint
