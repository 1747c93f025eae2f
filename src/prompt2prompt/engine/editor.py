"""The Editor: runs Prompt-to-Prompt edits through a diffusers pipeline of any family.

It does not fork the pipeline's denoising loop. One way in, in two stages:
- `prepare()` checks everything and builds what one run needs (tokens, plan, layers, latents) before any
  model call, touching no pipeline state;
- `run()` installs the family's processors, pointing at a fresh `RunState`, calls the pipeline with a
  `StepCallback` (steps, blending, inversion), and restores the processors and the scheduler in `finally`.
  Several prepared runs can share one forward batch, each with its own state.
`edit()` is `run(prepare(...))`. A `SourceCache` from `cache_source()` lets later edits of one source skip
the source's rows. Whatever the model, the editor asks its family (`prompt2prompt.families`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..alignment import Tokenized, word_token_positions
from ..attention.blend import BlendSpec
from ..attention.plan import EditPlan, build_plan
from ..attention.state import LayerPlan, RunState, pad_text
from ..edits import Edit
from ..families import Family, family_of
from ..families.defaults import DEFAULTS_FILE
from ..limits import MAX_LATENT, allow_large, check_guidance, check_seed, check_steps, is_int, lift_hint
from ..loading import ModelSource, check_device, load_pipeline, parse_dtype, quiet_loading, resolve_model
from .cache import CacheRecorder, SourceCache
from .callback import StepCallback

ATTENTION = ("fused", "explicit")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Arguments the editor sets itself; passing them through would silently fight the edit.
_RESERVED = {  # and the family's text inputs (`Family.text_inputs`)
    "num_images_per_prompt", "callback_on_step_end_tensor_inputs", "return_dict", "latents", "height", "width",
    "num_inference_steps", "guidance_scale", "output_type",
}
# Schedulers that draw noise at every step: removing the source's row from the batch would change the noise
# the edits get, so a cached source cannot stand in for it.
_STOCHASTIC = ("Ancestral", "SDE", "DDPM", "LCM", "TCD")


@dataclass(frozen=True)
class PreparedRun:
    """Everything one edit run needs, checked and built by `Editor.prepare`; run it with `Editor.run`.

    Its running values (the step, recorded maps, blend masks) are not here: every run makes them afresh.
    """

    prompts: tuple[str, ...]  # the source first, then the edits
    tokens: tuple[Tokenized, ...]  # every prompt's, at the run's one text length
    edits: tuple[Edit, ...]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    plan: EditPlan  # on the pipeline's device
    layers: LayerPlan
    blends: dict[int, BlendSpec]  # edit index -> its local blend
    latents: torch.Tensor  # (P, C, h, w) initial latents, on the pipeline's device
    inversion: Any = None  # an Inversion on the pipeline's device
    cache: SourceCache | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])

    @property
    def text_length(self) -> int:
        """The length of the text every row of the run attends to (its pipeline call's)."""
        return self.tokens[0].length


@dataclass
class EditResult:
    """The outcome of `Editor.edit`: the source first, then one image per edit."""

    images: Any  # list of PIL images, an array, or a (P, C, h, w) latent tensor, by output_type
    prompts: list[str]
    tokens: list[list[str]]  # per prompt, the token texts from BOS to EOS (MM-DiT: one per joint-text position)
    attention: dict[int, torch.Tensor] | None = None  # resolution -> (P, h, w, L) maps (L: 77, or the joint text's)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # edit index -> last local-blend mask (h, w)
    family: str = "unet"  # the model family's name: unet, sd3 or flux
    map_unit: str = "token"  # how the maps are best drawn: per "token", or per "word" (a word spans text parts)
    words: list[list[tuple[str, list[int]]]] = field(default_factory=list)  # per prompt, each word and its positions


class Editor:
    """Prompt-to-Prompt on a loaded pipeline of any family in `prompt2prompt.families` (Stable Diffusion 1.x to 3.5,
    Flux.1, Chroma, PixArt-Σ, Qwen-Image, FLUX.2, Z-Image).

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
            window is open (None: Flux's Stable Flow "vital layers", every block on SD3), and whose text attention
            drives local blending and recorded maps (None: every block); see `prompt2prompt.families`.

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

    @property
    def layer_options(self) -> dict[str, Any]:
        """The layer keywords this editor was made with that its family takes."""
        return {name: getattr(self, name) for name in self.family.layer_options}

    @classmethod
    def from_pretrained(cls, model: str, *, device: str | None = None, torch_dtype: torch.dtype | None = None,
                        allow_pickle: bool = False, **kwargs) -> Editor:
        """Load a pipeline (hub id, local folder, single .safetensors file, or "demo") and wrap it.

        Weights load from safetensors only; `allow_pickle=True` also accepts pickle (.bin) weights, read with
        `torch.load(weights_only=True)` (see `loading.load_pipeline`).
        """
        return cls(load_pipeline(model, device=device, torch_dtype=torch_dtype, allow_pickle=allow_pickle), **kwargs)

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
        _check_output_type(output_type)
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
        edits = self._check_inputs(prompt, edits, seed, generator, latents, negative_prompt, inversion, cache,
                                   pipeline_kwargs)
        inversion = cache.inversion if cache is not None else inversion
        # 2. Resolve the settings: the cache's, the inversion's, or the model's defaults
        num_inference_steps, guidance_scale, height, width = self._resolve_settings(
            num_inference_steps, guidance_scale, height, width, negative_prompt, latents, seed, generator, inversion, cache)
        if negative_prompt is not None:
            if not family.takes_negative_prompt:
                raise ValueError(f"{family.title} pipelines take no negative prompt (their negative pass is their "
                                 "own); leave negative_prompt unset")
            family.check_text_length(negative_prompt, "the negative prompt", pipeline_kwargs)
        # 3. Tokens at the run's one text length, mappers and windows
        source, *targets = family.tokenize_run([prompt, *(e.prompt for e in edits)], pipeline_kwargs)
        plan = build_plan(source, edits, targets, num_inference_steps)
        # 4. Layers: which edit, self-replace, blend and record
        channels, *latent_size = family.latent_shape(height, width)
        latent_size = tuple(latent_size)
        layers = self._layer_plan(latent_size, any(e.blend is not None for e in edits), record_attention, source.length)
        blends = _blend_specs(source, edits, targets)
        if cache is not None:  # a cache records the blend maps of every source: its layers are those of a blending run
            blending = self._layer_plan(latent_size, True, record_attention, source.length)
            self._check_cache(cache, blending, num_inference_steps, guidance_scale, height, width, negative_prompt,
                              pipeline_kwargs)
        # 5. Initial latents: one draw shared by every prompt, on the model's device
        device, dtype = family.execution_device(), family.model.dtype
        if cache is not None:
            latents = cache.latents
        elif inversion is not None:
            latents = inversion.latents
        latents = _initial_latents(latents, seed, generator, (1, channels, *latent_size), 1 + len(edits), device,
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
        """Run one prepared run, or several as one forward batch (each keeps its own attention control).

        A run is sent as `prepare` built and checked it: its settings and pipeline keywords are `prepare`'s, and a
        changed one needs a new `prepare` (`run` only chooses the output's form and a step callback). Runs in one
        batch must share steps, guidance, size and pipeline keywords, and have no inversion and no cache. Returns an
        EditResult, or one per run.
        """
        if pipeline_kwargs:
            names = ", ".join(sorted(pipeline_kwargs))
            raise ValueError(f"run() sends a run as prepare() built and checked it; pass {names} to prepare() (or "
                             "edit()) instead")
        _check_output_type(output_type)
        if isinstance(run_or_runs, PreparedRun):
            return self._run_one(run_or_runs, output_type, callback_on_step_end)
        runs = list(run_or_runs)
        if not runs or not all(isinstance(r, PreparedRun) for r in runs):
            raise TypeError("run() takes a PreparedRun from prepare(), or a non-empty list of them")
        if len(runs) == 1:
            return [self._run_one(runs[0], output_type, callback_on_step_end)]
        return self._run_group(runs, output_type)

    def cache_source(self, prompt: str, *, device: torch.device | str | None = None, **kwargs) -> SourceCache:
        """Run the source alone and record what its edits need, so that later edits skip the source's rows.

        Takes `prepare`'s settings (steps, guidance, seed or latents, negative prompt, size, inversion,
        record_attention, pipeline keywords); every later run with the cache must share them. `device` is where
        the cache lives (default: the pipeline's; "cpu" keeps a GPU's memory free, and each step is moved over
        as the run reaches it). The cache's size is `cache.nbytes`.
        """
        run = self.prepare(prompt, [], **kwargs)
        text_length = run.tokens[0].length
        run = replace(run, layers=self._layer_plan(run.latent_size, True, kwargs.get("record_attention", False), text_length))
        if _stochastic(self.pipe.scheduler, run.pipeline_kwargs):
            raise ValueError(f"{type(self.pipe.scheduler).__name__} (or eta > 0) draws noise at every step, so a "
                             "source cannot be cached for it; use a deterministic scheduler such as DDIM or Euler")
        recorder = CacheRecorder(device)
        state = self._state(run, recorder=recorder)
        callback = StepCallback(run, state, self.family, recorder=recorder)
        image = self._call(run, [state], callback, "pt")
        return recorder.finish(
            prompt=prompt, pipeline_id=id(self.pipe),
            settings=self._cache_settings(run.num_inference_steps, run.guidance_scale, run.height, run.width,
                                          run.negative_prompt, run.pipeline_kwargs, run.layers),
            latents=run.latents[:1], image=image, records=state.records, record_counts=dict(state.record_counts),
            inversion=run.inversion,
        )

    # -- prepare's stages -----------------------------------------------------------------------------------------

    def _check_inputs(self, prompt, edits, seed, generator, latents, negative_prompt, inversion, cache,
                      pipeline_kwargs: dict[str, Any]) -> list[Edit]:
        """Every argument's type and the combinations that cannot run; the edits as a list of Edit."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the source prompt must be a non-empty string, not {prompt!r}")
        if isinstance(edits, (Edit, str)):
            edits = [edits]
        edits = [Edit(e) if isinstance(e, str) else e for e in edits]
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"edits must be Edit objects or prompt strings, not {e!r}")
        _check_reserved(pipeline_kwargs, self.family)
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, not {type(generator).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or None, not {type(negative_prompt).__name__}")
        if cache is not None:
            if not isinstance(cache, SourceCache):
                raise TypeError(f"cache must be a SourceCache from Editor.cache_source(), not {type(cache).__name__}")
            if prompt != cache.prompt:
                raise ValueError(f"this source cache is of the prompt {cache.prompt!r}, not {prompt!r}")
            if latents is not None or seed is not None or generator is not None:
                raise ValueError("a source cache supplies the initial latent; do not pass latents, seed or generator with it")
            if inversion is not None and inversion is not cache.inversion:
                raise ValueError("a source cache made from an inversion brings it: do not pass another inversion")
            inversion = cache.inversion
        if inversion is not None:
            self.family.check_inversion(inversion)
        self.family.check_call_kwargs(pipeline_kwargs, inversion)
        return edits

    def _resolve_settings(self, steps, guidance, height, width, negative_prompt, latents, seed, generator, inversion,
                          cache) -> tuple[int, float, int, int]:
        """(steps, guidance, height, width): the caller's, else the cache's, the inversion's or the model's."""
        if cache is not None:
            settings = cache.settings
            steps = settings["num_inference_steps"] if steps is None else steps
            guidance = settings["guidance_scale"] if guidance is None else guidance
            height = settings["height"] if height is None else height
            width = settings["width"] if width is None else width
        if inversion is not None:
            steps, guidance, height, width = _inversion_settings(inversion, steps, guidance, height, width,
                                                                 negative_prompt, latents, seed, generator, cache)
        family, defaults = self.family, self.defaults
        steps = check_steps(defaults.num_inference_steps if steps is None else steps, self.pipe.scheduler)
        guidance = check_guidance(defaults.guidance_scale if guidance is None else guidance)
        default = family.default_size()
        height = default if height is None else height
        width = default if width is None else width
        if not all(is_int(v) and v > 0 for v in (height, width)):
            raise ValueError(f"height and width must be positive integers, but are {height!r} and {width!r}")
        multiple = family.multiple()
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, but are {height} and {width}")
        family.check_pixels(height, width)
        return steps, guidance, height, width

    def _layer_plan(self, latent_size: tuple[int, int], blend: bool, record_attention, text_length: int):
        """Which layers self-replace, drive local blending and are recorded (the family decides by its layers)."""
        return self.family.layer_plan(latent_size, text_length, blend=blend, record_attention=record_attention,
                                      explicit=self.attention == "explicit", options=self.layer_options)

    def _check_cache(self, cache: SourceCache, layers, steps, guidance, height, width, negative_prompt,
                     pipeline_kwargs) -> None:
        missing = sorted(max(s) for s in layers.record_sizes if s not in cache.records)
        if missing:
            raise ValueError(f"record_attention asks for sides {missing}, which the source cache did not record; "
                             "pass the same record_attention to cache_source()")
        cache.check(self._cache_settings(steps, guidance, height, width, negative_prompt, pipeline_kwargs, layers),
                    id(self.pipe))

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

    # -- run's stages ---------------------------------------------------------------------------------------------

    def _run_one(self, run: PreparedRun, output_type: str, user_callback) -> EditResult:
        cache = run.cache
        state = self._state(run, cached=cache is not None)
        callback = StepCallback(run, state, self.family, user_callback=user_callback)
        if cache is None:
            images = self._call(run, [state], callback, output_type)
        else:
            if output_type == "latent":  # in the pipeline's own form (Flux: packed)
                source = self.family.output_latents(cache.step_latents[-1].to(run.latents))
            else:
                source = _source_image(cache.image, output_type, self.pipe)
            if len(run.prompts) == 1:  # nothing to run: the source alone
                images = source
            else:
                state.source = cache.evaluation(0, run.latents.device)
                images = _concat(source, self._call(run, [state], callback, output_type))
        return self._result(run, state, callback, images)

    def _call(self, run: PreparedRun, states: list[RunState], callback, output_type: str, group: _Group | None = None):
        """The pipeline call of one run, or of a group of runs led by `run`, with their processors installed."""
        family = self.family
        if group is None:
            skip = run.cache is not None  # a cached source's rows are not computed
            prompts = list(run.prompts[skip:])
            negative = None if run.negative_prompt is None else [run.negative_prompt] * len(prompts)
            group = _Group(run.latents[skip:], prompts, negative, [len(prompts)], callback.tensor_inputs)
        prompts = group.prompts
        call_kwargs: dict[str, Any] = dict(
            height=run.height, width=run.width, num_inference_steps=run.num_inference_steps,
            guidance_scale=run.guidance_scale, latents=family.call_latents(group.latents), output_type=output_type,
            callback_on_step_end=callback, callback_on_step_end_tensor_inputs=group.tensor_inputs,
            **run.pipeline_kwargs,
        )
        inversion = run.inversion
        call_kwargs.update(family.call_text(prompts, group.negative, run.text_length, inversion,
                                            family.execution_device()))
        scheduler = family.inversion_scheduler() if inversion is not None else None
        return self._with_processors(family.processors(states, group.counts), scheduler, call_kwargs, states,
                                     group.counts)

    def _with_processors(self, processors: dict, scheduler, call_kwargs: dict, states: Sequence[RunState],
                         counts: Sequence[int]):
        """Call the pipeline with `processors` (and `scheduler`, if given) installed; restore both in `finally`."""
        pipe, model = self.pipe, self.family.model
        saved_scheduler = pipe.scheduler
        hook = None
        if self.family.split_passes(call_kwargs):
            # The model runs twice a step, the conditional pass first: every row of the second is plain generation.
            def count_pass(module, args):
                for state in states:
                    state.unconditional_pass = not state.unconditional_pass

            for state in states:
                state.unconditional_pass = True  # the first call flips it to the conditional pass
            hook = model.register_forward_pre_hook(count_pass)
        try:
            if scheduler is not None:
                pipe.scheduler = scheduler
            with self.family.installed(processors, states, counts):
                images = self._pipeline_call(call_kwargs)
            wanted = call_kwargs["output_type"]
            _check_finite_output(images)
            return pipe.image_processor.numpy_to_pil(images) if wanted == "pil" else images
        finally:
            if hook is not None:
                hook.remove()
            pipe.scheduler = saved_scheduler

    def _pipeline_call(self, call_kwargs: dict):
        """The pipeline's images for `call_kwargs`; floats where PIL images are wanted: PIL cannot hold NaN (diffusers
        casts it to black), so the caller checks the floats, then converts them as diffusers does."""
        pipe, wanted = self.pipe, call_kwargs["output_type"]
        try:
            return pipe(**self.family.pipeline_call({**call_kwargs, "output_type": "np" if wanted == "pil" else wanted})).images
        except (ValueError, TypeError, RuntimeError, OSError):  # the pipeline's own checks, out of memory, ...
            raise
        except Exception as error:  # diffusers failing on a pass-through keyword (clip_skip, LoRA scale, ...)
            message = " ".join(str(error).split())[:300]
            raise RuntimeError(f"the {type(pipe).__name__} call failed: {type(error).__name__}: {message}; "
                               "check the keywords passed through to it") from error

    def _run_group(self, runs: list[PreparedRun], output_type: str) -> list[EditResult]:
        first = runs[0]
        for r in runs:
            if r.inversion is not None or r.cache is not None:
                raise ValueError("runs with an inversion or a source cache cannot share a forward batch; run them one by one")
            shared = (r.num_inference_steps, r.guidance_scale, r.height, r.width, r.pipeline_kwargs)
            if shared != (first.num_inference_steps, first.guidance_scale, first.height, first.width, first.pipeline_kwargs):
                raise ValueError("runs in one forward batch must share steps, guidance, size and pipeline keywords")
        # One call has one text length: a run whose prompts are shorter is planned again at the longest run's.
        length = max(r.text_length for r in runs)
        runs = [self._at_text_length(r, length) for r in runs]
        first = runs[0]
        states = [self._state(r) for r in runs]
        callbacks = [StepCallback(r, s, self.family) for r, s in zip(runs, states)]
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
        group = _Group(torch.cat([r.latents for r in runs]), [p for r in runs for p in r.prompts], negative, counts,
                       ["latents"])
        images = self._call(first, states, on_step_end, output_type, group)
        return [self._result(r, s, cb, images[a:b]) for r, s, cb, (a, b) in zip(runs, states, callbacks, bounds)]

    def _state(self, run: PreparedRun, **values) -> RunState:
        """A fresh running state of `run`, with where the family's guided batches hold their conditional rows."""
        return RunState(plan=run.plan, layers=run.layers, conditional_first=self.family.conditional_first, **values)

    def _at_text_length(self, run: PreparedRun, length: int) -> PreparedRun:
        """`run` with its text padded to `length` (masked padding): its tokens, plan and layers at that length."""
        if run.text_length == length:
            return run
        tokens = self.family.tokenize_run(run.prompts, run.pipeline_kwargs, length)
        plan = build_plan(tokens[0], run.edits, tokens[1:], run.num_inference_steps)
        return replace(run, tokens=tuple(tokens), plan=plan.to(self.family.execution_device(), self.family.model.dtype),
                       layers=run.layers.with_text_length(length))

    def _result(self, run: PreparedRun, state: RunState, callback: StepCallback, images) -> EditResult:
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
        tokens = [self.family.token_texts(tok) for tok in run.tokens]
        words = [list(zip(tok.words, tok.word_tokens)) for tok in run.tokens]
        return EditResult(images=images, prompts=list(run.prompts), tokens=tokens, attention=attention,
                          masks={e: mask.cpu() for e, mask in callback.masks.items()}, family=self.family.name,
                          map_unit=self.family.map_unit, words=words)


def load_editor(
    model: str | ModelSource,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
) -> tuple[Editor, ModelSource]:
    """Load a pipeline as `load_pipeline` does and wrap it in an `Editor`; returns the editor and the model's source.

    Args:
        model: "demo", a diffusers folder, a single `.safetensors` file, a hub id, or a `ModelSource`.
        device, dtype, revision, allow_pickle: as `load_pipeline`'s `device`, `torch_dtype`, `revision` and
            `allow_pickle`.
        progress: show progress bars: the components' loading bars and the pipeline's denoising bar (which
            Gradio's `track_tqdm` follows). Without it both are hidden; downloads keep their own bars either way.

    Example: `editor, source = load_editor("demo")`.
    """
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)  # before resolving: a bad device or dtype fails before any download
    source = model if isinstance(model, ModelSource) else resolve_model(model, revision=revision)
    with contextlib.nullcontext() if progress else quiet_loading():
        pipe = load_pipeline(source, device=device, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=not progress)
    return Editor(pipe), source


@dataclass(frozen=True)
class _Group:
    """The rows of one pipeline call: one run's (its source left out when cached), or several runs' end to end."""

    latents: torch.Tensor  # (rows, C, h, w), unpacked
    prompts: list[str]
    negative: list[str] | None
    counts: list[int]  # rows of each run
    tensor_inputs: list[str]


def _check_reserved(pipeline_kwargs: Mapping[str, Any], family: Family) -> None:
    reserved = sorted((_RESERVED | set(family.text_inputs)) & set(pipeline_kwargs))
    if reserved:
        raise ValueError(f"{reserved} are set by the editor and cannot be passed through")


def _check_output_type(output_type: Any) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")


def _blend_specs(source: Tokenized, edits: Sequence[Edit], targets: Sequence[Tokenized]) -> dict[int, BlendSpec]:
    """Per edit with a LocalBlend, the token positions of its words (checked before any compute)."""
    blends = {}
    for e, (edit, target) in enumerate(zip(edits, targets)):
        b = edit.blend
        if b is None:
            continue
        blends[e] = BlendSpec(
            source_positions=word_token_positions(source, b.source_words),
            edit_positions=word_token_positions(target, b.edit_words),
            exclude_source_positions=word_token_positions(source, b.exclude_source_words),
            exclude_edit_positions=word_token_positions(target, b.exclude_edit_words),
            threshold=b.threshold, exclude_threshold=b.exclude_threshold, start=b.start,
        )
    return blends


def _inversion_settings(inversion, steps, guidance, height, width, negative_prompt, latents, seed, generator, cache=None):
    if steps is not None and steps != inversion.num_inference_steps:
        raise ValueError(
            f"this inversion was made with {inversion.num_inference_steps} steps; edit it with the same "
            f"num_inference_steps, not {steps}"
        )
    if (height is not None and height != inversion.height) or (width is not None and width != inversion.width):
        raise ValueError(f"this inversion is {inversion.width}x{inversion.height} px; leave height and width unset")
    if cache is None and (latents is not None or seed is not None or generator is not None):
        raise ValueError("an inversion supplies the initial latent; do not pass latents, seed or generator with it")
    if negative_prompt is not None and (inversion.uncond_embeddings is not None or inversion.corrections is not None):
        raise ValueError(
            f"the {inversion.method!r} inversion fixes the unconditional branch it reconstructs with; "
            f"negative_prompt cannot be used with it"
        )
    # Null-text embeddings and direct corrections reconstruct the image only at the guidance they were made with.
    if guidance is not None and guidance != inversion.guidance_scale and inversion.method in ("null-text", "direct"):
        raise ValueError(
            f"this {inversion.method!r} inversion was made at guidance_scale={inversion.guidance_scale}; edit it at "
            f"that guidance (leave guidance_scale unset), or invert again at {guidance}"
        )
    guidance = inversion.guidance_scale if guidance is None else guidance
    return inversion.num_inference_steps, guidance, inversion.height, inversion.width


def _initial_latents(latents, seed, generator, shape, num_prompts: int, device, dtype) -> torch.Tensor:
    """(P, C, h, w) initial latents: the given ones, or one draw from the seed or generator shared by all prompts."""
    if latents is None:
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        # Drawn like diffusers' prepare_latents, so that plain generation with the same generator matches.
        latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu", dtype=dtype)
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, not {type(latents).__name__}")
    if latents.device.type == "meta":
        raise ValueError("latents must hold values: a tensor on the meta device has none")
    if latents.ndim != 4 or latents.shape[0] not in (1, num_prompts) or tuple(latents.shape[1:]) != shape[1:]:
        raise ValueError(
            f"latents must have shape (1, {shape[1]}, {shape[2]}, {shape[3]}) or ({num_prompts}, ...), "
            f"not {tuple(latents.shape)}"
        )
    if not bool(torch.isfinite(latents).all()):  # once, before the run: NaN or inf would render black images
        raise ValueError("latents hold NaN or infinite values; pass finite latents (e.g. a torch.randn draw)")
    if not bool(latents.abs().max() <= MAX_LATENT) and not allow_large():
        raise ValueError(f"latents reach {float(latents.abs().max()):.3g}, far beyond a Gaussian draw's range (at most "
                         f"{MAX_LATENT:g} here; {lift_hint()})")
    return latents.to(device=device, dtype=dtype).expand(num_prompts, -1, -1, -1).clone()


def _check_finite_output(images) -> None:
    """A run that diverged (NaN or inf: a float16 overflow, or a guidance or weight far too large) is an error."""
    import numpy as np

    finite = bool(torch.isfinite(images).all()) if isinstance(images, torch.Tensor) else bool(np.isfinite(images).all())
    if not finite:
        raise RuntimeError("the result has NaN/inf values (a float16 overflow, usually): run in float32, or try "
                           "another guidance scale, weight or seed")


def _stochastic(scheduler, pipeline_kwargs: Mapping[str, Any]) -> bool:
    """Whether a scheduler draws noise at every step (a cached source cannot stand in for its row there)."""
    return (any(word in type(scheduler).__name__ for word in _STOCHASTIC) or bool(pipeline_kwargs.get("eta"))
            or bool(getattr(scheduler, "config", {}).get("stochastic_sampling")))


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
    import numpy as np

    return np.concatenate([first, rest])
