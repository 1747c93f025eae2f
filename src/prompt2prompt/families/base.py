"""The family protocol: what the engine, the inversions, the recipes and the front ends ask of a model.

A family wraps one kind of pipeline, as k-diffusion's `CompVisDenoiser` wraps a model: callers ask it a
capability ("which inversion methods?", "how is a word tokenized?", "which processor in this layer?") and never
which model it is. Each family is one file in this package; `family_of` picks one for a pipeline.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..alignment import MAX_TOKENS, Tokenized
from ..attention.state import RunState
from ..limits import check_pixels, check_positive_int, quoted
from . import compat
from .defaults import ModelDefaults, model_defaults


def t5_length(pipeline_kwargs: Mapping[str, Any], default: int, bound: int) -> int:
    """A run's T5 length: its `max_sequence_length`, else the family's default; at most the family's `bound`."""
    length = check_positive_int(pipeline_kwargs.get("max_sequence_length", default), "max_sequence_length")
    if length > bound:
        raise ValueError(f"max_sequence_length must be at most {bound}, not {length}")
    return length


def check_blocks(blocks: Any, count: int, what: str) -> frozenset[int]:
    """Block numbers of a model with `count` blocks (numbered as they run), as a set; else a clear error."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence | set | frozenset):
        raise TypeError(f"{what} must be a list of block numbers, not {blocks!r}")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < count:
            raise ValueError(f"{what}: {b!r} is not a block of this model, whose blocks are 0..{count - 1}")
    return frozenset(blocks)


class Conditioning:
    """A prompt's conditioning as a `Denoiser` encodes it, whatever the model's text is (a dataclass per family).

    The inversion loops only hand it back to the denoiser, but for its text tokens' embeddings: null-text inversion
    optimises the unconditional one (`with_embeds`), negative-prompt inversion records the prompt's.
    """

    embeds: torch.Tensor  # (B, T, D): the text tokens' embeddings
    pooled: torch.Tensor | None  # (B, D2): a pooled embedding beside them, where the model takes one

    def with_embeds(self, embeds: torch.Tensor) -> Conditioning:
        """The same conditioning with other token embeddings."""
        raise NotImplementedError


class Denoiser:
    """A family's model as the inversion loops evaluate it: one signature for every family, as k-diffusion's
    `CompVisDenoiser` gives every model one. `Family.denoiser(scheduler, ...)` makes one for the scheduler the loops
    step with (`Family.inversion_schedule`); the loops never ask which model it is.

        cond, uncond = d.encode(prompt), d.negative()
        out = d(x, t, d.batch(uncond, cond))  # a guided step's two rows in one call
    """

    def encode(self, prompt: str) -> Conditioning:
        """The conditioning of one prompt (one row), as the pipeline encodes it."""
        raise NotImplementedError

    def negative(self) -> Conditioning:
        """The unconditional conditioning of classifier-free guidance, as the pipeline makes it without a negative
        prompt (the empty prompt's; SDXL's zeros where its pipeline zeroes it)."""
        raise NotImplementedError

    def batch(self, *conds: Conditioning) -> Conditioning:
        """Several conditionings as one batch, in the order given (a guided step's [uncond, cond])."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *, guidance: float = 1.0) -> torch.Tensor:
        """The model's output at latents `x` (B, C, h, w) and timestep `t` of the scheduler, with one row of `cond`
        per row of `x`: what the scheduler's step takes (a UNet's prediction of its `prediction_type`, its input
        scaled by the scheduler; a flow's velocity), in the model's dtype. `guidance` is the embedded guidance of a
        guidance-distilled model (Flux-dev's); other models have none to take it by."""
        raise NotImplementedError


class Family:
    """The base of every family; the defaults here are those of a plain text-to-image pipeline.

    Class attributes say what a family is and takes; methods answer per pipeline (`self.pipe`).
    """

    name: ClassVar[str]  # as recipes and manifests record it
    title: ClassVar[str]  # the models, as a message names them
    pipeline_classes: ClassVar[tuple[str, ...]]  # the diffusers pipeline classes it drives
    components: ClassVar[tuple[str, ...]]  # the model_index.json entries a folder of it must have
    loads_single_file: ClassVar[bool] = False  # whether diffusers loads its pipeline from one original checkpoint

    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 7.5
    inversion_methods: ClassVar[tuple[str, ...]] = ()  # the first is the default
    takes_uncond_embeddings: ClassVar[bool] = False  # null-text and negative-prompt inversions' embeddings
    takes_max_sequence_length: ClassVar[bool] = False  # whether its text has a T5 length to choose
    max_text_length: ClassVar[int | None] = None  # the longest `max_sequence_length` its pipeline takes
    # Whether a guided batch holds its conditional rows first ([cond..., uncond...]); diffusers' pipelines mostly put
    # them last. A family whose guidance is a separate pass (`split_passes`) holds them alone.
    conditional_first: ClassVar[bool] = False
    takes_negative_prompt: ClassVar[bool] = True  # whether its pipeline takes a negative prompt (FLUX.2 klein: none)
    map_unit: ClassVar[str] = "token"  # recorded maps are drawn per "token", or per "word" (a word spans text parts)
    layer_options: ClassVar[tuple[str, ...]] = ()  # the Editor keywords that choose its layers
    layer_hint: ClassVar[str] = ""  # how it chooses layers, for a message

    def __init__(self, pipe):
        self.pipe = pipe

    # -- What it is --------------------------------------------------------------------------------------------

    @classmethod
    def detect(cls, pipe) -> bool:
        """Whether this family drives `pipe`."""
        raise NotImplementedError

    @classmethod
    def pipeline_class_for(cls, index: Mapping[str, Any]) -> str | None:
        """The pipeline class to load a diffusers folder with, from its model_index.json, or None if not ours."""
        name = index.get("_class_name")
        return name if name in cls.pipeline_classes else None

    @classmethod
    def single_file_class(cls, names: Sequence[str]) -> str | None:
        """The pipeline class of an original single-file checkpoint, from its weight names, or None if not ours."""
        return None

    @property
    def model(self) -> torch.nn.Module:
        """The denoiser: the module whose attention layers the edits steer."""
        raise NotImplementedError

    @property
    def default_inversion(self) -> str:
        if not self.inversion_methods:
            raise ValueError(self.no_inversion_message())
        return self.inversion_methods[0]

    no_inversion: ClassVar[str] = ""  # why a family has no inversion, for its message

    def no_inversion_message(self) -> str:
        return (f"real images cannot be edited on {self.title} models: {self.no_inversion}; edit generated images, "
                "or invert the image with another model")

    def defaults(self) -> ModelDefaults:
        """This model's defaults: its own `prompt2prompt.json` where its folder has one, else the family's."""
        # `name_or_path` is the folder a pipeline was loaded from (a hub snapshot's too); None when built in memory.
        where = getattr(self.pipe, "name_or_path", None)
        folder = where if isinstance(where, str) and Path(where).is_dir() else None
        return model_defaults(self, folder)

    # -- Text ----------------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str, pipeline_kwargs: Mapping[str, Any]) -> Tokenized:
        """The prompt's words and their positions in the text the model attends to."""
        raise NotImplementedError

    def tokenize_run(self, prompts: Sequence[str], pipeline_kwargs: Mapping[str, Any],
                     length: int | None = None) -> list[Tokenized]:
        """Every prompt of one run (the source first) at the run's one text length: the attention's text length is
        one per pipeline call, so every prompt's tokens, the plan's mappers and its key mask span it.

        `length` asks for a longer text than the prompts need (a group of runs in one call). Here every prompt is
        tokenized at the family's fixed length; a family that pads each call to its longest prompt (its padding
        masked) pads them all to the longest, or to `length`.
        """
        tokens = [self.tokenize(prompt, pipeline_kwargs) for prompt in prompts]
        if length is not None and length != tokens[0].length:
            raise ValueError(f"{type(self.pipe).__name__}'s text is {tokens[0].length} positions long at these "
                             f"settings, not {length}")
        return tokens

    def tokenizers(self) -> list:
        """Every tokenizer the pipeline runs a prompt through (a negative prompt must fit each)."""
        raise NotImplementedError

    def max_sequence_length(self, pipeline_kwargs: Mapping[str, Any]) -> int:
        """The T5 length of a run (77 CLIP positions where there is no T5)."""
        return MAX_TOKENS

    def token_texts(self, tokenized: Tokenized) -> list[str]:
        """One readable text per position of the tokenized prompt."""
        raise NotImplementedError

    def check_text_length(self, prompt: str, what: str, pipeline_kwargs: Mapping[str, Any]) -> None:
        """Refuse a text (a negative prompt) that a text encoder would cut, as a prompt is refused."""
        for tokenizer in self.tokenizers():
            clip = "CLIP" in type(tokenizer).__name__
            limit = MAX_TOKENS if clip else self.max_sequence_length(pipeline_kwargs)
            length = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if length > limit:
                raise ValueError(
                    f"{what} {quoted(prompt)} is {length} tokens long, more than the text encoder's {limit} "
                    f"({'BOS and EOS' if clip else 'EOS'} included); shorten it"
                )

    # -- Sizes and latents ---------------------------------------------------------------------------------------

    def native_size(self) -> int:
        """The side in pixels the model was trained at."""
        raise NotImplementedError

    def default_size(self) -> int:
        return self.native_size()

    def size_multiple(self) -> int:
        """What both sides of an image must be multiples of, in pixels."""
        raise NotImplementedError

    def inversion_multiple(self) -> int:
        """What both sides of an image to invert must be multiples of, in pixels."""
        return self.size_multiple()

    def size_unit(self) -> str:
        """Why an image's sides are multiples of `inversion_multiple()`, for a message."""
        raise NotImplementedError

    def check_pixels(self, height: int, width: int) -> None:
        """Refuse more than `limits.MAX_PIXELS_FACTOR` times the model's native pixels."""
        check_pixels(height, width, self.native_size())

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latent of a `height` x `width` image."""
        raise NotImplementedError

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's form of (B, C, h, w) latents (identity, or Flux's 2x2 tokens)."""
        return latents

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return latents

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's `latents=` of (B, C, h, w) initial latents: its step form (`pack`), unless it packs them
        itself (FLUX.2's take them unpacked)."""
        return self.pack(latents)

    def output_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) final latents in the form the pipeline returns for `output_type="latent"` (its step form,
        unless it returns them otherwise: FLUX.2 klein's VAE latents), for a cached source's row."""
        return self.pack(latents)

    @property
    def latents_dtype(self) -> torch.dtype:
        """The dtype of the initial latents a run draws (the denoiser's; a pipeline that draws float32 says so)."""
        return self.model.dtype

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The denoiser's latent (1, C, h, w) of an image (1, 3, H, W) in [-1, 1], as its pipeline decodes it.

        The VAE's posterior mean (an `AutoencoderTiny`'s latent itself), normalised by `vae_latents`, in the
        denoiser's dtype. A VAE that overflows in float16 (`force_upcast`, SDXL's) encodes in float32, as the
        pipeline decodes.
        """
        vae = self.pipe.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            with torch.no_grad():
                encoded = vae.encode(pixels.to(device=self.execution_device(), dtype=vae.dtype))
                mean = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        finally:
            if upcast:
                vae.to(dtype)
        return self.vae_latents(mean).to(self.model.dtype)

    def vae_latents(self, mean: torch.Tensor) -> torch.Tensor:
        """The denoiser's latent of a VAE posterior mean, normalised as the pipeline decodes it."""
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0  # SD's VAEs have none
        return (mean - shift) * config.scaling_factor

    # -- Layers --------------------------------------------------------------------------------------------------

    def check_layer_options(self, options: Mapping[str, Any]) -> None:
        """Refuse Editor layer keywords that this family does not take, or values it cannot use."""
        given = sorted(name for name, value in options.items() if value is not None and name not in self.layer_options)
        if given:
            raise ValueError(f"{given} do not apply to {type(self.pipe).__name__}; {self.layer_hint}: use "
                             f"{sorted(self.layer_options)}")

    def layer_plan(self, latent_size: tuple[int, int], text_length: int, *, blend: bool, record_attention,
                   explicit: bool, options: Mapping[str, Any]):
        """Which layers self-replace, drive local blending and are recorded in a run at this latent size."""
        raise NotImplementedError

    def processors(self, states: Sequence[RunState], counts: Sequence[int]) -> dict[str, Any]:
        """The processor of every attention layer for these runs' states (several: one forward batch)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def installed(self, processors: dict[str, Any], states: Sequence[RunState], counts: Sequence[int]) -> Iterator[None]:
        """The model with `processors` (those of `processors(states, counts)`) in place for one pipeline call, and its
        own back after it, however the call ends. A model that sets them another way, or must change something else
        for the call (Z-Image: its image positions), says so here."""
        model = self.model
        saved = model.attn_processors
        model.set_attn_processor(processors)
        try:
            yield
        finally:
            model.set_attn_processor(saved)

    @contextlib.contextmanager
    def plain_attention(self) -> Iterator[None]:
        """The model's attention as the edits compute it when nothing is edited, for the calls outside an edit run
        (an inversion's); the pipeline's own processors, unless a family's differ from them (Chroma's mask)."""
        yield

    # -- The pipeline call ---------------------------------------------------------------------------------------

    def execution_device(self) -> torch.device:
        return compat.execution_device(self.pipe)

    def callback_tensor_inputs(self, inversion) -> list[str]:
        """The step callback's tensor inputs a run needs."""
        return ["latents"]

    # The pipeline's text inputs: the editor builds every call's text itself, so a caller may not pass them.
    text_inputs: ClassVar[tuple[str, ...]] = ("prompt", "prompt_embeds", "negative_prompt_embeds",
                                              "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

    def step_text_inputs(self, inputs: dict[str, Any], inversion, step: int, rows: int) -> dict[str, Any]:
        """The step callback's text inputs for `step`, where an inversion replaces the unconditional text at every
        step (null-text's embeddings); `inputs` are the callback's, `rows` the prompts of each half. None here."""
        return {}

    def check_call_kwargs(self, pipeline_kwargs: dict[str, Any], inversion) -> None:
        """Refuse pipeline keywords an edit cannot honour, or that the pipeline does not take (diffusers' pipelines
        swallow unknown keywords silently); subclasses may set those an inversion fixes."""
        # Named parameters only: SD's `**kwargs` takes (and drops) anything, which is what this check is for.
        parameters = {name: p for name, p in inspect.signature(type(self.pipe).__call__).parameters.items()
                      if p.kind is not inspect.Parameter.VAR_KEYWORD}
        accepted = sorted(set(parameters) - {"self"})
        for name in sorted(pipeline_kwargs):
            if name not in parameters:
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{type(self.pipe).__name__} takes no keyword {name!r}{hint}")

    def pipeline_call(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keywords of the pipeline call for an edit run's `call_kwargs` (the same, unless a pipeline takes its
        step callback under another name)."""
        return call_kwargs

    def split_passes(self, call_kwargs: Mapping[str, Any]) -> bool:
        """Whether this call evaluates the model twice a step, the conditional pass first, then the negative."""
        return False

    def call_text(self, prompts: list[str], negative: list[str] | None, length: int, inversion, device) -> dict[str, Any]:
        """The text keywords of one pipeline call whose rows are `prompts`, at the run's one text `length`.

        Here the prompts themselves (the pipeline encodes them at the family's fixed length), or, for an inversion
        that replaces the unconditional text at every step, the family's `inversion_call_kwargs`.
        """
        if inversion is not None and inversion.uncond_embeddings is not None:
            return self.inversion_call_kwargs(prompts, inversion, device)
        return {"prompt": prompts} if negative is None else {"prompt": prompts, "negative_prompt": negative}

    def check_inversion(self, inversion) -> None:
        """Refuse an inversion made for another family."""
        foreign_embeddings = inversion.uncond_embeddings is not None and not self.takes_uncond_embeddings
        if inversion.method not in self.inversion_methods or foreign_embeddings:
            raise ValueError(f"this {inversion.method!r} inversion was made with another kind of model; invert the "
                             f"image with this {type(self.pipe).__name__} (methods {', '.join(self.inversion_methods)})")

    def inversion_scheduler(self):
        """The scheduler an edit of an inversion runs on (None: the pipeline's own)."""
        return None

    def inversion_call_kwargs(self, prompts: list[str], inversion, device) -> dict[str, torch.Tensor]:
        """Explicit embeddings for an inversion that replaces the unconditional one at every step."""
        raise ValueError(f"{type(self.pipe).__name__} takes no inverted unconditional embeddings")

    # -- Inversion: the steps its loops reverse, and the model they evaluate -------------------------------------

    def inversion_schedule(self, num_inference_steps: int, height: int, width: int, *, device=None):
        """A copy of the scheduler an edit of an inversion runs on (`inversion_scheduler()`, else the pipeline's own),
        its timesteps set as the pipeline's `__call__` sets them for `num_inference_steps` at this size: the steps an
        inversion's loops reverse (its class picks the loops: `prompt2prompt.inversion`). `pipe.scheduler` is left
        as it is. Here the plain `set_timesteps(num_inference_steps)` of SD's pipelines."""
        edit = self.inversion_scheduler()
        edit = self.pipe.scheduler if edit is None else edit
        scheduler = type(edit).from_config(edit.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler

    def denoiser(self, scheduler, *, height: int, width: int, max_sequence_length: int, device) -> Denoiser:
        """The model as an inversion's loops evaluate it while stepping with `scheduler` (`inversion_schedule`), for
        an image of `height` x `width` and a text of `max_sequence_length` positions (`max_sequence_length(...)`)."""
        raise NotImplementedError
