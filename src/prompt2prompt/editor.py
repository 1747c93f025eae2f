"""The Editor: runs Prompt-to-Prompt edits through a diffusers Stable Diffusion pipeline.

It does not fork the pipeline's denoising loop. One way in, in two stages:
- `prepare()` checks everything and builds what one run needs (tokens, plan, layers, latents) before any
  model call, touching no pipeline state;
- `run()` installs `P2PAttnProcessor`s that point at a fresh `RunState`, calls the pipeline with a
  `StepCallback` (steps, blending, inversion), and restores the processors and the scheduler in `finally`.
  Several prepared runs can share one forward batch, each with its own state.
`edit()` is `run(prepare(...))`. A `SourceCache` from `cache_source()` lets later edits of one source skip
the source's rows.
"""

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any

import torch

from .alignment import MAX_TOKENS, Tokenized, WordRef, replacement_mapper, text_mappers, word_token_positions
from .blend import apply_blend, blend_mask
from .cache import CacheRecorder, SourceCache
from .families import check_text_length, family_of
from .images import check_pixels
from .processor import EditPlan, GroupAttnProcessor, LayerPlan, P2PAttnProcessor, RunState, fused_schedule
from .schedules import CrossSteps, Window, as_window, cross_mask, step_index, step_mask

Words = WordRef | Sequence[WordRef]

MODES = ("auto", "replace", "refine")
# Bounds that keep a run from lasting for days or rendering black, as recipes have them (P2P_ALLOW_LARGE lifts them).
MAX_STEPS = 1000  # SD's schedulers are trained on 1000 timesteps: more steps repeat them
MAX_GUIDANCE = 100.0  # |guidance_scale|; SD uses 5-15, Flux 3.5
MAX_LATENT = 1e4  # |initial latent|: a unit Gaussian's draw stays below 10
# |weight| of a reweighted word: far beyond single digits a word swamps every other token's attention and the
# activations overflow (float16 first), so larger values are refused rather than rendered black.
MAX_WEIGHT = 100.0
ATTENTION = ("fused", "explicit")
# Arguments the editor sets itself; passing them through would silently fight the edit.
_RESERVED = {
    "prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
    "num_images_per_prompt", "callback_on_step_end_tensor_inputs", "return_dict", "latents", "height", "width",
    "num_inference_steps", "guidance_scale", "output_type",
}
# Schedulers that draw noise at every step: removing the source's row from the batch would change the noise
# the edits get, so a cached source cannot stand in for it.
_STOCHASTIC = ("Ancestral", "SDE", "DDPM", "LCM", "TCD")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool; numpy's count) that is finite, even as a float: 10**400 is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def allow_large() -> bool:
    """Whether `P2P_ALLOW_LARGE` is set (to anything but "" or "0"): the `MAX_*` bounds are then lifted."""
    return os.environ.get("P2P_ALLOW_LARGE", "") not in ("", "0")


def check_steps(num_inference_steps: Any) -> int:
    """A step count: a positive integer, at most `MAX_STEPS` unless P2P_ALLOW_LARGE is set (else a ValueError)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, not {num_inference_steps!r}")
    if num_inference_steps > MAX_STEPS and not allow_large():
        raise ValueError(f"num_inference_steps must be at most {MAX_STEPS}, not {num_inference_steps} "
                         f"(set P2P_ALLOW_LARGE=1 to go beyond)")
    return num_inference_steps


def _check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], not {value!r}")
    return float(value)


def _check_words(words: Words, what: str) -> Words:
    items = [words] if isinstance(words, (str, int)) else words
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not all(
        isinstance(w, (str, int)) and not isinstance(w, bool) for w in items
    ):
        raise TypeError(f"{what} must be a word (text or position) or a sequence of words, not {words!r}")
    return words


@dataclass
class LocalBlend:
    """Confine an edit to where its words attend: outside the mask, the edit keeps the source's latents.

    Args:
        source_words: words of the source prompt whose region may change.
        edit_words: words of the edit prompt whose region may change.
        threshold: mask threshold on the max-normalised attention (0.3: the paper's notebooks).
        start: fraction of the run after which blending starts (0.2).
        exclude_source_words, exclude_edit_words: words whose region must not change.
        exclude_threshold: threshold of the exclusion masks.
    """

    source_words: Words
    edit_words: Words
    _: KW_ONLY
    threshold: float = 0.3
    start: float = 0.2
    exclude_source_words: Words = ()
    exclude_edit_words: Words = ()
    exclude_threshold: float = 0.3

    def __post_init__(self):
        _check_words(self.source_words, "LocalBlend source_words")
        _check_words(self.edit_words, "LocalBlend edit_words")
        _check_words(self.exclude_source_words, "LocalBlend exclude_source_words")
        _check_words(self.exclude_edit_words, "LocalBlend exclude_edit_words")
        _check_fraction(self.threshold, "LocalBlend threshold")
        _check_fraction(self.start, "LocalBlend start")
        _check_fraction(self.exclude_threshold, "LocalBlend exclude_threshold")

    def to_dict(self) -> dict[str, Any]:
        """Its keyword arguments as plain data (the recipe and manifest form); `LocalBlend.from_dict` reads it back."""
        from .forms import blend_to_dict

        return blend_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LocalBlend":
        """The LocalBlend that `data` (its keyword arguments) describes."""
        from .forms import blend_from_dict

        return blend_from_dict(data)


@dataclass
class Edit:
    """One edit of the source prompt.

    Args:
        prompt: the edited prompt.
        mode: "replace" (word swap, same number of words), "refine" (added or removed words), or "auto".
        cross_steps: cross-attention window: a fraction, a (start, end) pair, or a dict with "default" and
            per-word windows (0.8: the paper's demos).
        self_steps: self-attention window (0.4: the paper's demos).
        weights: reweighting of edit-prompt words, e.g. {"fluffy": 2.0}; negative values allowed.
        blend: an optional LocalBlend.
    """

    prompt: str
    _: KW_ONLY
    mode: str = "auto"
    cross_steps: CrossSteps = 0.8
    self_steps: Window = 0.4
    weights: Mapping[WordRef, float] | None = None
    blend: LocalBlend | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"an Edit needs a non-empty prompt, not {self.prompt!r}")
        if self.mode not in MODES:
            raise ValueError(f"Edit mode must be one of {MODES}, not {self.mode!r}")
        if isinstance(self.cross_steps, Mapping):
            for word, window in self.cross_steps.items():
                as_window(window, f"cross_steps[{word!r}]")
        else:
            as_window(self.cross_steps, "cross_steps")
        as_window(self.self_steps, "self_steps")
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise TypeError(f"weights must be a dict of word -> weight, not {self.weights!r}")
            for word, weight in self.weights.items():
                if not is_finite_number(weight):
                    raise ValueError(f"the weight of {word!r} must be a finite number, not {weight!r}")
                if abs(weight) > MAX_WEIGHT:
                    raise ValueError(f"the weight of {word!r} is {weight!r}, outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        if self.blend is not None and not isinstance(self.blend, LocalBlend):
            raise TypeError(f"blend must be a LocalBlend, not {self.blend!r}")

    def to_dict(self) -> dict[str, Any]:
        """This edit as plain data (the recipe and manifest form, see `prompt2prompt.forms`).

        >>> Edit.from_dict(Edit("a dog", weights={"dog": 2.0}).to_dict()) == Edit("a dog", weights={"dog": 2.0})
        True
        """
        from .forms import edit_to_dict

        return edit_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Edit":
        """The Edit that `data` describes (the form `to_dict` writes); a clear error for a malformed one."""
        from .forms import edit_from_dict

        return edit_from_dict(data)


@dataclass
class EditResult:
    """The outcome of `Editor.edit`: the source first, then one image per edit."""

    images: Any  # list of PIL images, an array, or a (P, C, h, w) latent tensor, by output_type
    prompts: list[str]
    tokens: list[list[str]]  # per prompt, the token texts from BOS to EOS (MM-DiT: one per joint-text position)
    attention: dict[int, torch.Tensor] | None = None  # resolution -> (P, h, w, L) maps (L: 77, or the joint text's)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # edit index -> last local-blend mask (h, w)
    family: str = "unet"  # the model family: unet, sd3 or flux
    words: list[list[tuple[str, list[int]]]] = field(default_factory=list)  # per prompt, each word and its positions


def build_plan(source: Tokenized, edits: Sequence[Edit], tokenized: Sequence[Tokenized], num_inference_steps: int) -> EditPlan:
    """Turn the edits into the per-run tensors the attention processor reads (on the CPU; see `EditPlan.to`).

    Every tensor over tokens spans the text's length L (77 for CLIP; a joint text's whole length).
    """
    n, e, length = num_inference_steps, len(edits), source.length
    replace = [False] * e
    mapper = torch.zeros(e, length, length)
    refine_index = torch.arange(length).repeat(e, 1)
    alpha = torch.ones(e, length)
    weights = torch.ones(e, length)
    cross = torch.zeros(n, e, length)
    self_active = torch.zeros(n, e, dtype=torch.bool)
    for i, (edit, target) in enumerate(zip(edits, tokenized)):
        mode = edit.mode
        if mode == "auto":
            mode = "replace" if len(source.words) == len(target.words) else "refine"
        if mode == "replace" and len(source.words) != len(target.words):
            replacement_mapper(source, target)  # its clear error about the word counts
        replace[i] = mode == "replace"
        mapper[i], refine_index[i], alpha[i] = text_mappers(source, target, mode)
        for word, weight in (edit.weights or {}).items():
            weights[i, word_token_positions(target, word)] = float(weight)
        cross[:, i] = cross_mask(edit.cross_steps, n, target)
        self_active[:, i] = step_mask(edit.self_steps, n, "self_steps")
    a, b, swap, mix_index, flags = fused_schedule(cross, weights, alpha, self_active)
    return EditPlan(
        num_prompts=e + 1, num_inference_steps=n, replace=tuple(replace), mapper=mapper, refine_index=refine_index,
        alpha=alpha, weights=weights, cross=cross, self_active=self_active, a=a, b=b, swap=swap, mix_index=mix_index,
        flags=flags, ra=cross * alpha, rb=cross * (1 - alpha) + (1 - cross),
    )


def _swap_uncond(embeds: torch.Tensor, uncond: torch.Tensor, rows: int) -> torch.Tensor:
    """Replace the unconditional half of [uncond..., cond...] embeddings (`rows` each) with the inversion's."""
    if embeds.shape[0] != 2 * rows:  # no classifier-free guidance: there is no unconditional half
        return embeds
    return torch.cat([uncond.to(embeds).expand(rows, *embeds.shape[1:]), embeds[rows:]])


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
                         f"{MAX_LATENT:g} here; set P2P_ALLOW_LARGE=1 to go beyond)")
    return latents.to(device=device, dtype=dtype).expand(num_prompts, -1, -1, -1).clone()


def _level_sizes(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    sizes = [latent_size]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))  # stride-2 convs with padding 1 round up
    return sizes


def _cross_levels(unet) -> tuple[set[int], set[int]]:
    """Levels with cross-attention in the down/up blocks, and in the mid block."""
    config = unet.config
    n = len(config.block_out_channels)
    down_up = {i for i, t in enumerate(config.down_block_types) if "CrossAttn" in t}
    down_up |= {n - 1 - i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    mid = {n - 1} if config.mid_block_type and "CrossAttn" in config.mid_block_type else set()
    return down_up, mid


@dataclass(frozen=True)
class BlendSpec:
    """One edit's local blend, its words resolved to token positions."""

    source_positions: list[int]
    edit_positions: list[int]
    exclude_source_positions: list[int]
    exclude_edit_positions: list[int]
    threshold: float
    exclude_threshold: float
    start: float

    def mask(self, source_maps: torch.Tensor, edit_maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return blend_mask(
            source_maps, edit_maps, latent_size, source_positions=self.source_positions,
            edit_positions=self.edit_positions, threshold=self.threshold,
            exclude_source_positions=self.exclude_source_positions,
            exclude_edit_positions=self.exclude_edit_positions, exclude_threshold=self.exclude_threshold,
        )


@dataclass(frozen=True)
class PreparedRun:
    """Everything one edit run needs, checked and built by `Editor.prepare`; run it with `Editor.run`.

    Its running values (the step, recorded maps, blend masks) are not here: every run makes them afresh.
    """

    prompts: tuple[str, ...]  # the source first, then the edits
    tokens: tuple[Tokenized, ...]
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


class StepCallback:
    """The step-end callback of one run, in the shape of diffusers' `PipelineCallback`.

    After each loop iteration it advances the run's step (the loop index // the scheduler's order, clamped),
    and after the last evaluation of a step it adds direct inversion's correction to the source row and
    blends the edits that have a local blend. It swaps in null-text inversion's unconditional embedding of the
    next step, serves a cached source's next evaluation, and feeds a cache recorder. A user callback runs last.
    """

    def __init__(self, run: PreparedRun, state: RunState, *, recorder: CacheRecorder | None = None,
                 user_callback: Callable | None = None, tensor_inputs: Sequence[str] = ("latents",), family=None):
        self.run, self.state, self.recorder, self.user_callback = run, state, recorder, user_callback
        self.family = family  # packs and unpacks the pipeline's latents (Flux's are 2x2 patches in tokens)
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
            source = cache.blend_maps[k].to(state.blend_sum)  # the source's maps summed up to this evaluation
            state.blend_sum = torch.cat([source[None], state.blend_sum[1:]])
        if self.recorder is not None:
            self.recorder.end_evaluation(state.blend_sum)
        if k == total - 1 or step_index(k + 1, order, n) != i:  # the step's last evaluation
            latents = kwargs["latents"]
            if self.family is None:
                outputs["latents"] = self._end_step(latents, i)
            else:
                unpacked = self._end_step(self.family.unpack(latents, run.latent_size), i)
                outputs["latents"] = self.family.pack(unpacked)
        if k + 1 < total:
            state.step = step_index(k + 1, order, n)
            if cache is not None:
                state.source = cache.evaluation(k + 1, run.latents.device)
            inversion = run.inversion
            if inversion is not None and inversion.uncond_embeddings is not None:
                rows = len(run.prompts) - (cache is not None)
                outputs["prompt_embeds"] = _swap_uncond(kwargs["prompt_embeds"], inversion.uncond_embeddings[state.step], rows)
                if inversion.uncond_pooled is not None and "add_text_embeds" in kwargs:
                    outputs["add_text_embeds"] = _swap_uncond(kwargs["add_text_embeds"], inversion.uncond_pooled[state.step], rows)
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


def _check_finite_output(images) -> None:
    """A run that diverged (NaN or inf: a float16 overflow, or a guidance or weight far too large) is an error."""
    import numpy as np

    finite = bool(torch.isfinite(images).all()) if isinstance(images, torch.Tensor) else bool(np.isfinite(images).all())
    if not finite:
        raise RuntimeError("the result has NaN/inf values (a float16 overflow, usually): run in float32, or try "
                           "another guidance scale, weight or seed")


def _stochastic(scheduler, pipeline_kwargs: Mapping[str, Any]) -> bool:
    return any(word in type(scheduler).__name__ for word in _STOCHASTIC) or bool(pipeline_kwargs.get("eta"))


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


class Editor:
    """Prompt-to-Prompt on a loaded Stable Diffusion (1.x, 2.x, XL, 3, 3.5) or Flux.1 pipeline.

    Args:
        pipe: the diffusers pipeline; its own attention processors are restored after every call.
        self_replace_max_res: UNet models: self-attention is replaced in layers whose side is at most this
            (None: latent side / 4, i.e. 16 for SD at 512 px).
        blend_res: UNet models: the layer side whose cross-attention drives local blending (None: latent side / 4,
            or the nearest side with cross-attention in the down and up blocks when the model has none there).
        attention: "fused" (scaled-dot-product attention everywhere) or "explicit" (materialised
            probabilities, the reference).
        cross_blocks, self_blocks, record_blocks: SD3 and Flux models: the blocks (numbered as they run) whose
            text attention is edited (None: every block), whose image attention is the source's while the self
            window is open (None: Flux's Stable Flow "vital layers", every block on SD3), and whose text attention
            drives local blending and recorded maps (None: every block); see `families`.

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
        for name, value in (("self_replace_max_res", self_replace_max_res), ("blend_res", blend_res)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (a layer's side in latent pixels) or None, not {value!r}")
        unet_only = {"self_replace_max_res": self_replace_max_res, "blend_res": blend_res}
        mmdit_only = {"cross_blocks": cross_blocks, "self_blocks": self_blocks, "record_blocks": record_blocks}
        wrong = unet_only if family.name == "mmdit" else mmdit_only
        given = sorted(name for name, value in wrong.items() if value is not None)
        if given:
            raise ValueError(f"{given} do not apply to {type(pipe).__name__}; "
                             f"{'UNet models choose layers by side' if family.name == 'unet' else 'MM-DiT models choose blocks'}: "
                             f"use {sorted(mmdit_only if family.name == 'mmdit' else unet_only)}")
        if family.name == "mmdit":
            for name, value in mmdit_only.items():
                if value is not None:
                    family._blocks(value, name)
        self.pipe = pipe
        self.family = family
        self.self_replace_max_res = self_replace_max_res
        self.blend_res = blend_res
        self.cross_blocks, self.self_blocks, self.record_blocks = cross_blocks, self_blocks, record_blocks
        self.attention = attention

    @classmethod
    def from_pretrained(cls, model: str, *, device: str | None = None, torch_dtype: torch.dtype | None = None,
                        allow_pickle: bool = False, **kwargs) -> "Editor":
        """Load a pipeline (hub id, local folder, single .safetensors file, or "demo") and wrap it.

        Weights load from safetensors only; `allow_pickle=True` also accepts pickle (.bin) weights, read with
        `torch.load(weights_only=True)` (see `loading.load_pipeline`).
        """
        from .loading import load_pipeline

        return cls(load_pipeline(model, device=device, torch_dtype=torch_dtype, allow_pickle=allow_pickle), **kwargs)

    def invert(self, image, prompt: str, **kwargs):
        """Invert a real image so that `edit(..., inversion=...)` can edit it; see `prompt2prompt.inversion.invert`."""
        from .inversion import invert

        return invert(self.pipe, image, prompt, **kwargs)

    def tokenize(self, prompt: str, max_sequence_length: int | None = None) -> Tokenized:
        """The prompt's words and token positions under this pipeline's tokenizers (its joint text on MM-DiT).

        `max_sequence_length` is the T5 length of SD3 and Flux runs (their pipelines' defaults: 256 and 512).
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
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
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
            num_inference_steps: denoising steps (50, or the inversion's or cache's).
            guidance_scale: classifier-free guidance (7.5, or the inversion's or cache's); <= 1 turns it off.
            seed / generator / latents: the initial latent, one draw shared by all prompts, or (P, C, h, w).
            record_attention: True, a layer side, or a list of sides: keep per-token cross-attention maps.
            inversion: an Inversion from `invert()`, to edit a real image.
            cache: a SourceCache from `cache_source()`: the source is not computed again.
            **pipeline_kwargs: passed to the diffusers pipeline (eta, guidance_rescale, cross_attention_kwargs, ...).
        """
        pipe = self.pipe
        # 1. Check inputs
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the source prompt must be a non-empty string, not {prompt!r}")
        if isinstance(edits, (Edit, str)):
            edits = [edits]
        edits = [Edit(e) if isinstance(e, str) else e for e in edits]
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"edits must be Edit objects or prompt strings, not {e!r}")
        reserved = sorted(_RESERVED & set(pipeline_kwargs))
        if reserved:
            raise ValueError(f"{reserved} are set by the editor and cannot be passed through")
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, not {type(generator).__name__}")
        if self.family.name == "mmdit":
            self._check_mmdit(inversion, cache, pipeline_kwargs)
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
            num_inference_steps = cache.settings["num_inference_steps"] if num_inference_steps is None else num_inference_steps
            guidance_scale = cache.settings["guidance_scale"] if guidance_scale is None else guidance_scale
            height = cache.settings["height"] if height is None else height
            width = cache.settings["width"] if width is None else width
        if inversion is not None:
            num_inference_steps, guidance_scale, height, width = self._inversion_settings(
                inversion, num_inference_steps, guidance_scale, height, width, negative_prompt,
                latents, seed, generator, cache,
            )
        family = self.family
        num_inference_steps = family.default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
        check_steps(num_inference_steps)
        if not is_finite_number(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, not {guidance_scale!r}")
        if abs(guidance_scale) > MAX_GUIDANCE and not allow_large():
            raise ValueError(f"guidance_scale must be within ±{MAX_GUIDANCE:g}, not {guidance_scale!r} "
                             f"(set P2P_ALLOW_LARGE=1 to go beyond)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {seed!r}")
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str):
                raise TypeError(f"negative_prompt must be a string or None, not {type(negative_prompt).__name__}")
            check_text_length(family, negative_prompt, "the negative prompt", pipeline_kwargs)

        # 2. Tokens, mappers and windows
        source = family.tokenize(prompt, pipeline_kwargs)
        targets = [family.tokenize(e.prompt, pipeline_kwargs) for e in edits]
        plan = build_plan(source, edits, targets, num_inference_steps)
        prompts = (prompt, *(e.prompt for e in edits))

        # 3. Sizes, layers and what to record
        default = family.default_size()
        height = default if height is None else height
        width = default if width is None else width
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(f"height and width must be positive integers, but are {height!r} and {width!r}")
        multiple = family.multiple()
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, but are {height} and {width}")
        check_pixels(pipe, height, width)
        channels, *latent_size = family.latent_shape(height, width)
        latent_size = tuple(latent_size)
        blend = cache is not None or any(e.blend is not None for e in edits)  # a cache always records blend maps
        layers = self._layer_plan(latent_size, blend, record_attention, source.length)
        blends = self._blend_specs(source, edits, targets)
        if cache is not None:
            missing = sorted(max(s) for s in layers.record_sizes if s not in cache.records)
            if missing:
                raise ValueError(f"record_attention asks for sides {missing}, which the source cache did not record; "
                                 "pass the same record_attention to cache_source()")
            cache.check(self._cache_settings(num_inference_steps, guidance_scale, height, width, negative_prompt,
                                             pipeline_kwargs, layers), id(pipe))

        # 4. Initial latents: one draw shared by every prompt
        device, dtype = pipe._execution_device, family.model.dtype
        shape = (1, channels, *latent_size)
        if cache is not None:
            latents = cache.latents
        elif inversion is not None:
            latents = inversion.latents
        latents = _initial_latents(latents, seed, generator, shape, len(prompts), device, dtype)
        if inversion is not None:
            inversion = inversion.to(device, dtype)  # once, not at every step

        run = PreparedRun(
            prompts=prompts, tokens=(source, *targets), num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt,
            plan=plan.to(device, dtype), layers=layers, blends=blends, latents=latents, inversion=inversion,
            cache=cache, pipeline_kwargs=dict(pipeline_kwargs),
        )
        return run

    def run(self, run_or_runs: PreparedRun | Sequence[PreparedRun], *, output_type: str = "pil",
            callback_on_step_end: Callable | None = None, **pipeline_kwargs) -> EditResult | list[EditResult]:
        """Run one prepared run, or several as one forward batch (each keeps its own attention control).

        Runs in one batch must share steps, guidance and size, and have no inversion and no cache.
        Returns an EditResult, or one per run.
        """
        reserved = sorted(_RESERVED & set(pipeline_kwargs))
        if reserved:
            raise ValueError(f"{reserved} are set by the editor and cannot be passed through")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        if isinstance(run_or_runs, PreparedRun):
            return self._run_one(run_or_runs, output_type, callback_on_step_end, pipeline_kwargs)
        runs = list(run_or_runs)
        if not runs or not all(isinstance(r, PreparedRun) for r in runs):
            raise TypeError("run() takes a PreparedRun from prepare(), or a non-empty list of them")
        if len(runs) == 1:
            return [self._run_one(runs[0], output_type, callback_on_step_end, pipeline_kwargs)]
        return self._run_group(runs, output_type, pipeline_kwargs)

    def cache_source(self, prompt: str, *, device: torch.device | str | None = None, **kwargs) -> SourceCache:
        """Run the source alone and record what its edits need, so that later edits skip the source's rows.

        Takes `prepare`'s settings (steps, guidance, seed or latents, negative prompt, size, inversion,
        record_attention, pipeline keywords); every later run with the cache must share them. `device` is where
        the cache lives (default: the pipeline's; "cpu" keeps a GPU's memory free, and each step is moved over
        as the run reaches it). The cache's size is `cache.nbytes`.
        """
        if self.family.name != "unet":
            raise ValueError(f"source caches are not supported on {type(self.pipe).__name__} yet; edit without a cache")
        run = self.prepare(prompt, [], **kwargs)
        run = replace(run, layers=self._layer_plan(run.latent_size, True, kwargs.get("record_attention", False)))
        if _stochastic(self.pipe.scheduler, run.pipeline_kwargs):
            raise ValueError(f"{type(self.pipe.scheduler).__name__} (or eta > 0) draws noise at every step, so a "
                             "source cannot be cached for it; use a deterministic scheduler such as DDIM or Euler")
        recorder = CacheRecorder(device)
        state = RunState(plan=run.plan, layers=run.layers, recorder=recorder)
        callback = StepCallback(run, state, recorder=recorder, tensor_inputs=self._tensor_inputs(run))
        image = self._call(run, state, callback, "pt", {})
        return recorder.finish(
            prompt=prompt, pipeline_id=id(self.pipe),
            settings=self._cache_settings(run.num_inference_steps, run.guidance_scale, run.height, run.width,
                                          run.negative_prompt, run.pipeline_kwargs, run.layers),
            latents=run.latents[:1], image=image, records=state.records, record_counts=dict(state.record_counts),
            inversion=run.inversion,
        )

    # ---------------------------------------------------------------------------------------------------------

    def _run_one(self, run: PreparedRun, output_type: str, user_callback, pipeline_kwargs) -> EditResult:
        cache = run.cache
        state = RunState(plan=run.plan, layers=run.layers, cached=cache is not None)
        callback = StepCallback(run, state, user_callback=user_callback, tensor_inputs=self._tensor_inputs(run),
                                family=self.family)
        if cache is None:
            images = self._call(run, state, callback, output_type, pipeline_kwargs)
        else:
            source = cache.step_latents[-1].to(run.latents) if output_type == "latent" else _source_image(cache.image, output_type, self.pipe)
            if len(run.prompts) == 1:  # nothing to run: the source alone
                images = source
            else:
                state.source = cache.evaluation(0, run.latents.device)
                images = _concat(source, self._call(run, state, callback, output_type, pipeline_kwargs))
        return self._result(run, state, callback, images)

    def _call(self, run: PreparedRun, state: RunState, callback: StepCallback, output_type: str, pipeline_kwargs):
        """The pipeline call of one run, with its processors installed; restores the pipeline in `finally`."""
        pipe = self.pipe
        skip = run.cache is not None  # a cached source's rows are not computed
        prompts = list(run.prompts[skip:])
        call_kwargs: dict[str, Any] = dict(
            height=run.height, width=run.width, num_inference_steps=run.num_inference_steps,
            guidance_scale=run.guidance_scale, latents=run.latents[skip:], output_type=output_type,
            callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs,
            **{**run.pipeline_kwargs, **pipeline_kwargs},
        )
        call_kwargs["latents"] = self.family.pack(call_kwargs["latents"])
        inversion = run.inversion
        if inversion is not None and inversion.uncond_embeddings is not None:
            call_kwargs.update(self._inversion_embeddings(prompts, inversion, pipe._execution_device))
        else:
            call_kwargs["prompt"] = prompts
            if run.negative_prompt is not None:
                call_kwargs["negative_prompt"] = [run.negative_prompt] * len(prompts)
        ddim = inversion is not None and self.family.name == "unet"
        return self._with_processors(self.family.processors(state), ddim, call_kwargs, [state])

    def _with_processors(self, processors: dict, ddim: bool, call_kwargs: dict, states: Sequence[RunState] = ()):
        pipe, model = self.pipe, self.family.model
        saved = model.attn_processors
        saved_scheduler = pipe.scheduler
        hook = None
        if self.family.name == "mmdit" and call_kwargs.get("true_cfg_scale", 1.0) > 1 and call_kwargs.get("negative_prompt"):
            # Flux's true CFG calls the transformer twice a step, the conditional pass first, then the negative.
            def count_pass(module, args):
                for state in states:
                    state.unconditional_pass = not state.unconditional_pass

            for state in states:
                state.unconditional_pass = True  # the first call flips it to the conditional pass
            hook = model.register_forward_pre_hook(count_pass)
        try:
            if ddim:  # an inversion is exact for the DDIM step it was made with
                from diffusers import DDIMScheduler

                pipe.scheduler = DDIMScheduler.from_config(saved_scheduler.config)
            model.set_attn_processor(processors)
            wanted = call_kwargs["output_type"]
            # PIL images cannot hold NaN (diffusers casts it to black): take floats, check, then convert as it does.
            try:
                images = pipe(**{**call_kwargs, "output_type": "np" if wanted == "pil" else wanted}).images
            except (ValueError, TypeError, RuntimeError, OSError):  # the pipeline's own checks, out of memory, ...
                raise
            except Exception as error:  # diffusers failing on a pass-through keyword (clip_skip, LoRA scale, ...)
                message = " ".join(str(error).split())[:300]
                raise RuntimeError(f"the {type(pipe).__name__} call failed: {type(error).__name__}: {message}; "
                                   "check the keywords passed through to it") from error
            _check_finite_output(images)
            return pipe.image_processor.numpy_to_pil(images) if wanted == "pil" else images
        finally:
            if hook is not None:
                hook.remove()
            model.set_attn_processor(saved)
            pipe.scheduler = saved_scheduler

    def _run_group(self, runs: list[PreparedRun], output_type: str, pipeline_kwargs) -> list[EditResult]:
        first = runs[0]
        if self.family.name != "unet":
            raise ValueError(f"several runs in one forward batch work on UNet models only; on {type(self.pipe).__name__} "
                             "run them one by one (each run already batches its own edits)")
        for r in runs:
            if r.inversion is not None or r.cache is not None:
                raise ValueError("runs with an inversion or a source cache cannot share a forward batch; run them one by one")
            shared = (r.num_inference_steps, r.guidance_scale, r.height, r.width, r.pipeline_kwargs)
            if shared != (first.num_inference_steps, first.guidance_scale, first.height, first.width, first.pipeline_kwargs):
                raise ValueError("runs in one forward batch must share steps, guidance, size and pipeline keywords")
        states = [RunState(plan=r.plan, layers=r.layers) for r in runs]
        callbacks = [StepCallback(r, s) for r, s in zip(runs, states)]
        counts = [len(r.prompts) for r in runs]
        bounds = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(runs))]

        def on_step_end(pipe, k: int, t, kwargs: dict) -> dict:
            latents = kwargs["latents"]
            outputs = [cb(pipe, k, t, {**kwargs, "latents": latents[a:b]}) for cb, (a, b) in zip(callbacks, bounds)]
            if not any("latents" in o for o in outputs):
                return {}
            return {"latents": torch.cat([o.get("latents", latents[a:b]) for o, (a, b) in zip(outputs, bounds)])}

        prompts = [p for r in runs for p in r.prompts]
        negative = None
        if any(r.negative_prompt is not None for r in runs):
            negative = [r.negative_prompt or "" for r in runs for _ in r.prompts]  # "" is diffusers' own default
        call_kwargs = dict(
            prompt=prompts, negative_prompt=negative, height=first.height, width=first.width,
            num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
            latents=torch.cat([r.latents for r in runs]), output_type=output_type, callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"], **{**first.pipeline_kwargs, **pipeline_kwargs},
        )
        processors = {name: GroupAttnProcessor([P2PAttnProcessor(s, name) for s in states], counts)
                      for name in self.pipe.unet.attn_processors}
        images = self._with_processors(processors, False, call_kwargs)
        return [self._result(r, s, cb, images[a:b]) for r, s, cb, (a, b) in zip(runs, states, callbacks, bounds)]

    def _result(self, run: PreparedRun, state: RunState, callback: StepCallback, images) -> EditResult:
        attention = None
        if run.layers.record_sizes:
            attention = {}
            for size in run.layers.record_sizes:
                if size not in state.records and run.cache is None:
                    continue
                maps = state.records.get(size)
                if run.cache is not None:
                    source = (run.cache.records[size] / run.cache.record_counts[size]).cpu()  # (1, h, w, 77)
                    edits = maps[1:] / state.record_counts[size] if maps is not None else source[:0]
                    attention[max(size)] = torch.cat([source, edits.cpu()])
                else:
                    attention[max(size)] = (maps / state.record_counts[size]).cpu()
        tokens = [self.family.token_texts(tok) for tok in run.tokens]
        words = [list(zip(tok.words, tok.word_tokens)) for tok in run.tokens]
        return EditResult(images=images, prompts=list(run.prompts), tokens=tokens, attention=attention,
                          masks={e: mask.cpu() for e, mask in callback.masks.items()}, family=self.family.kind,
                          words=words)

    def _layer_plan(self, latent_size: tuple[int, int], blend: bool, record_attention, text_length: int = MAX_TOKENS):
        """Which layers self-replace, drive local blending and are recorded, by their sizes at this latent size."""
        if self.family.name == "mmdit":
            return self.family.layer_plan(
                latent_size, text_length, blend=blend, record_attention=record_attention, cross_blocks=self.cross_blocks,
                self_blocks=self.self_blocks, record_blocks=self.record_blocks, explicit=self.attention == "explicit",
            )
        unet = self.pipe.unet
        sizes = _level_sizes(latent_size, len(unet.config.block_out_channels))
        down_up, mid = _cross_levels(unet)
        default_size = sizes[min(2, len(sizes) - 1)]  # latent side / 4
        blend_size = self._size_for(self.blend_res, "blend_res", sizes, down_up, default_size) if blend else None
        if record_attention is False or record_attention is None:
            requested = []
        elif record_attention is True:
            requested = [None]
        elif isinstance(record_attention, int):
            requested = [record_attention]
        else:
            requested = list(record_attention)
        record_sizes = frozenset(self._size_for(r, "record_attention", sizes, down_up | mid, default_size) for r in requested)
        self_max = self.self_replace_max_res if self.self_replace_max_res is not None else max(default_size)
        return LayerPlan(sizes={h * w: (h, w) for h, w in sizes}, self_max_side=self_max, blend_size=blend_size,
                         record_sizes=record_sizes, explicit=self.attention == "explicit")

    def _cache_settings(self, num_inference_steps, guidance_scale, height, width, negative_prompt, pipeline_kwargs,
                        layers: LayerPlan) -> dict[str, Any]:
        """What a run shares with its cached source: everything that shapes the source's rows."""
        scheduler = self.pipe.scheduler
        return dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            negative_prompt=negative_prompt, scheduler=f"{type(scheduler).__name__} {sorted(dict(scheduler.config).items())}",
            pipeline_kwargs=repr(sorted(pipeline_kwargs.items())), self_max_side=layers.self_max_side,
            blend_size=layers.blend_size, attention=self.attention, dtype=str(self.family.model.dtype),
        )

    def _tensor_inputs(self, run: PreparedRun) -> list[str]:
        names = list(self.family.tensor_inputs)
        inversion = run.inversion
        if inversion is not None and inversion.uncond_pooled is not None and "add_text_embeds" in self.pipe._callback_tensor_inputs:
            names.append("add_text_embeds")
        return names

    @staticmethod
    def _size_for(res, what: str, sizes, allowed: set[int], default) -> tuple[int, int]:
        if res is None:
            size = default
            if sizes.index(size) not in allowed and allowed:
                # A small model may lack cross-attention at latent side / 4: take the nearest level that has it.
                size = sizes[min(allowed, key=lambda level: (abs(level - sizes.index(default)), -level))]
        else:
            if isinstance(res, bool) or not isinstance(res, int):
                raise ValueError(f"{what} must be a layer side (an integer), not {res!r}")
            matches = [s for s in sizes if max(s) == res]
            if not matches:
                raise ValueError(f"{what} {res} is not a layer side of this model at this size; the sides are {[max(s) for s in sizes]}")
            size = matches[0]
        if sizes.index(size) not in allowed:
            with_cross = [max(sizes[i]) for i in sorted(allowed)]
            raise ValueError(f"{what}: the model has no cross-attention at side {max(size)}; it has it at {with_cross}")
        return size

    def _check_mmdit(self, inversion, cache, pipeline_kwargs) -> None:
        """What MM-DiT runs do not take yet, refused before any compute."""
        name = type(self.pipe).__name__
        if inversion is not None and getattr(inversion, "uncond_embeddings", None) is not None:
            raise ValueError(f"this {inversion.method!r} inversion optimises a UNet's unconditional embeddings; invert the "
                             f"image with this {name} (method 'direct' or 'euler')")
        length = getattr(inversion, "max_sequence_length", None)
        if length is not None and pipeline_kwargs.setdefault("max_sequence_length", length) != length:
            raise ValueError(f"this inversion was made with max_sequence_length={length}; edit it with the same, "
                             f"not {pipeline_kwargs['max_sequence_length']}")
        if cache is not None:
            raise ValueError(f"source caches are not supported on {name} yet; edit without cache=")
        if "true_cfg_scale" in pipeline_kwargs and not is_finite_number(pipeline_kwargs["true_cfg_scale"]):
            raise ValueError(f"true_cfg_scale must be a finite number, not {pipeline_kwargs['true_cfg_scale']!r}")
        if pipeline_kwargs.get("skip_guidance_layers"):
            raise ValueError("skip_guidance_layers adds a forward pass the edits do not know; leave it unset")
        for key in ("negative_prompt_2", "negative_prompt_3", "prompt_2", "prompt_3"):
            if key in pipeline_kwargs:
                raise ValueError(f"{key} would give a text encoder another prompt than the one the edits align; "
                                 "leave it unset")

    @staticmethod
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

    def _inversion_embeddings(self, prompts: list[str], inversion, device) -> dict[str, torch.Tensor]:
        """Explicit embeddings for an inversion that replaces the unconditional one at every step."""
        pipe = self.pipe
        num_prompts = len(prompts)
        if hasattr(pipe, "text_encoder_2"):
            # No negative_prompt: like the plain pipeline, so that force_zeros_for_empty_prompt still applies.
            cond, _, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=True)
            out = dict(prompt_embeds=cond, pooled_prompt_embeds=pooled)
            uncond_pooled = neg_pooled if inversion.uncond_pooled is None else inversion.uncond_pooled[0].to(neg_pooled).expand(num_prompts, -1)
            out["negative_pooled_prompt_embeds"] = uncond_pooled
        else:
            cond, _ = pipe.encode_prompt(prompts, device, 1, False)
            out = dict(prompt_embeds=cond)
        out["negative_prompt_embeds"] = inversion.uncond_embeddings[0].to(cond).expand(num_prompts, -1, -1)
        return out

    @staticmethod
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
