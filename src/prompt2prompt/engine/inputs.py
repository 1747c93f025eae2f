"""`Editor.prepare`'s arguments: their checks and the settings they resolve to, before any model call.

Functions of the model's family and defaults, not of the editor: each refuses one kind of bad input with a one-line
message, or resolves what the caller left unset (the cache's, the inversion's, then the model's own settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..alignment import Tokenized, word_token_positions
from ..attention.blend import BlendSpec
from ..edits import Edit
from ..families import Family
from ..families.defaults import ModelDefaults
from ..limits import MAX_LATENT, allow_large, check_guidance, check_seed, check_steps, is_int, lift_hint
from .cache import SourceCache

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Arguments the editor sets itself; passing them through would silently fight the edit.
RESERVED = {  # and the family's text inputs (`Family.text_inputs`)
    "num_images_per_prompt", "callback_on_step_end_tensor_inputs", "return_dict", "latents", "height", "width",
    "num_inference_steps", "guidance_scale", "output_type",
}
# Schedulers that draw noise at every step: removing the source's row from the batch would change the noise
# the edits get, so a cached source cannot stand in for it.
STOCHASTIC = ("Ancestral", "SDE", "DDPM", "LCM", "TCD")


def check_inputs(family: Family, prompt, edits, seed, generator, latents, negative_prompt, inversion, cache,
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
    check_reserved(pipeline_kwargs, family)
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
        family.check_inversion(inversion)
    family.check_call_kwargs(pipeline_kwargs, inversion)
    return edits


def check_negative_prompt(family: Family, negative_prompt: str | None, pipeline_kwargs: Mapping[str, Any]) -> None:
    """A negative prompt only where the family's pipeline takes one, and within the run's text length."""
    if negative_prompt is None:
        return
    if not family.takes_negative_prompt:
        raise ValueError(f"{family.title} pipelines take no negative prompt (their negative pass is their "
                         "own); leave negative_prompt unset")
    family.check_text_length(negative_prompt, "the negative prompt", pipeline_kwargs)


def resolve_settings(family: Family, defaults: ModelDefaults, scheduler, steps, guidance, height, width,
                     negative_prompt, latents, seed, generator, inversion, cache) -> tuple[int, float, int, int]:
    """(steps, guidance, height, width): the caller's, else the cache's, the inversion's or the model's."""
    if cache is not None:
        settings = cache.settings
        steps = settings["num_inference_steps"] if steps is None else steps
        guidance = settings["guidance_scale"] if guidance is None else guidance
        height = settings["height"] if height is None else height
        width = settings["width"] if width is None else width
    if inversion is not None:
        steps, guidance, height, width = inversion_settings(inversion, steps, guidance, height, width,
                                                            negative_prompt, latents, seed, generator, cache)
    steps = check_steps(defaults.num_inference_steps if steps is None else steps, scheduler)
    guidance = check_guidance(defaults.guidance_scale if guidance is None else guidance)
    default = family.default_size()
    height = default if height is None else height
    width = default if width is None else width
    if not all(is_int(v) and v > 0 for v in (height, width)):
        raise ValueError(f"height and width must be positive integers, but are {height!r} and {width!r}")
    multiple = family.size_multiple()
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, but are {height} and {width}")
    family.check_pixels(height, width)
    return steps, guidance, height, width


def inversion_settings(inversion, steps, guidance, height, width, negative_prompt, latents, seed, generator,
                       cache=None) -> tuple[int, float, int, int]:
    """(steps, guidance, height, width) of a run that edits `inversion`: its own, and the caller's that it allows."""
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


def initial_latents(latents, seed, generator, shape, num_prompts: int, device, dtype) -> torch.Tensor:
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


def blend_specs(source: Tokenized, edits: Sequence[Edit], targets: Sequence[Tokenized]) -> dict[int, BlendSpec]:
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


def check_reserved(pipeline_kwargs: Mapping[str, Any], family: Family) -> None:
    """Refuse pipeline keywords the editor sets itself (and the family's text inputs)."""
    reserved = sorted((RESERVED | set(family.text_inputs)) & set(pipeline_kwargs))
    if reserved:
        raise ValueError(f"{reserved} are set by the editor and cannot be passed through")


def check_output_type(output_type: Any) -> None:
    """One of the pipeline's output types."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")


def check_cacheable(scheduler, pipeline_kwargs: Mapping[str, Any]) -> None:
    """Refuse a scheduler that draws noise at every step: a cached source cannot stand in for its row there."""
    stochastic = (any(word in type(scheduler).__name__ for word in STOCHASTIC) or bool(pipeline_kwargs.get("eta"))
                  or bool(getattr(scheduler, "config", {}).get("stochastic_sampling")))
    if stochastic:
        raise ValueError(f"{type(scheduler).__name__} (or eta > 0) draws noise at every step, so a "
                         "source cannot be cached for it; use a deterministic scheduler such as DDIM or Euler")
