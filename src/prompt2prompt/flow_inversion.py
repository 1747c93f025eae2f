"""Real images on flow-matching MM-DiT pipelines (Stable Diffusion 3/3.5, Flux.1): inverse Euler and direct inversion.

- Inverse Euler runs the pipeline's own flow-matching Euler step backwards, with the source prompt and no guidance,
  from the image's latent (sigma 0) up to the noise end of the schedule: the pivot trajectory x_0 .. x_T.
- Direct inversion (Ju et al., 2024, on a flow) records, per step, the gap between the pipeline's guided step and
  the next pivot; the edit adds it to the source row only, so the source reconstructs the image to float precision
  and the edit rows run free.

The schedule is the pipeline's own: `FlowMatchEulerDiscreteScheduler` with the sigmas its `__call__` sets at this
size (SD3: shifted, `mu` only with dynamic shifting; Flux: `linspace(1, 1/N, N)` shifted by the image's `mu`).
The corrections come from the pipeline's own denoising loop, so they hold for exactly the call the edit makes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from .editor import check_steps, is_finite_number
from .families import FluxFamily, family_of
from .images import ImageInput, fit_image, image_size, load_image
from .inversion import FLOW_METHODS, Inversion, encode_image



@dataclass
class FlowText:
    """The source prompt's conditioning, as the pipeline's `encode_prompt` makes it (one row, no guidance)."""

    embeds: torch.Tensor  # (1, T, D): SD3's joint CLIP + T5 text, or Flux's T5 text
    pooled: torch.Tensor  # (1, D2)
    text_ids: torch.Tensor | None = None  # Flux's text positions for RoPE: (T, 3)


def invert_flow(
    pipe,
    image: ImageInput,
    prompt: str,
    *,
    method: Literal["direct", "euler"] = "direct",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    fit: Literal["crop", "pad"] = "crop",
    max_sequence_length: int | None = None,
    inversion_guidance: float = 1.0,
    progress: bool = True,
) -> Inversion:
    """Invert a real image under `prompt` for editing with an SD3/SD3.5 or Flux.1 pipeline (see `invert`).

    Args:
        method: "direct" (the source row reconstructs the image to float precision) or "euler" (plain inverse
            Euler, the baseline).
        num_inference_steps, guidance_scale, max_sequence_length: those of the edits to come (None: the model's
            defaults: 28 steps, guidance 7.0 for SD3 and 3.5 for Flux, T5 length 256 for SD3 and 512 for Flux).
        inversion_guidance: the embedded guidance of the inversion's velocity on a guidance-distilled Flux (dev);
            1.0, the flow's unguided velocity. Other models invert with the conditional velocity alone.
    """
    # 1. Check inputs, before any model call
    family = family_of(pipe)
    name = type(pipe).__name__
    if method not in FLOW_METHODS:
        if method in ("null-text", "negative-prompt", "ddim"):
            raise ValueError(f"{method!r} inversion is for UNet pipelines (Stable Diffusion 1.x, 2.x, XL); {name} "
                             f"inverts its flow-matching Euler step: use method 'direct' or 'euler'")
        raise ValueError(f"unknown inversion method {method!r} for {name}; use one of {', '.join(FLOW_METHODS)}")
    num_inference_steps = family.default_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
    check_steps(num_inference_steps)
    for what, value in (("guidance_scale", guidance_scale), ("inversion_guidance", inversion_guidance)):
        if not is_finite_number(value):
            raise ValueError(f"{what} must be a finite number, got {value!r}")
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    length = family.max_sequence_length(kwargs)  # at most 512, T5's limit in these pipelines
    family.tokenize(prompt, {"max_sequence_length": length})  # a prompt a text encoder would cut is refused here
    check_flow_scheduler(pipe.scheduler)
    height, width = image_size(pipe, height=height, width=width)

    # 2. The image's latent, the schedule and the source prompt
    fitted = fit_image(load_image(image), height, width, fit=fit)
    device = pipe._execution_device
    scheduler = flow_scheduler(pipe, num_inference_steps, height, width, device=device)
    text = encode_source(pipe, prompt, length, device=device)
    with torch.no_grad():
        latents = encode_image(pipe, fitted)  # (1, C, h, w)

        # 3. The pivots, then what keeps the source row on them
        trajectory = inverse_euler_trajectory(pipe, scheduler, latents, text, inversion_guidance=inversion_guidance,
                                              progress=progress)
    inversion = Inversion(
        latents=trajectory[-1], trajectory=trajectory, num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale), prompt=prompt, method=method, height=height, width=width,
        max_sequence_length=length,
    )
    if method == "direct":
        inversion.corrections = direct_corrections(pipe, scheduler, inversion, progress=progress)
    return inversion


def check_flow_scheduler(scheduler) -> None:
    """Refuse a scheduler whose step is not the deterministic flow-matching Euler step this inversion reverses."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"flow inversion reverses FlowMatchEulerDiscreteScheduler's Euler step; this pipeline's "
                         f"scheduler is {type(scheduler).__name__}: load the model's own flow-matching Euler scheduler")
    config = scheduler.config
    if config.get("stochastic_sampling") or config.get("invert_sigmas"):
        raise ValueError("flow inversion needs the deterministic Euler step from sigma 1 down to 0; this scheduler has "
                         "stochastic_sampling or invert_sigmas set: load it without them")


def flow_scheduler(pipe, num_inference_steps: int, height: int, width: int, *,
                   device: torch.device | str | None = None) -> FlowMatchEulerDiscreteScheduler:
    """A copy of the pipeline's scheduler with the sigmas its `__call__` sets for `num_inference_steps` at this size.

    `pipe.scheduler` itself is left as it is.
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    family = family_of(pipe)
    _, h, w = family.latent_shape(height, width)
    patch = family.patch_size()
    image_seq_len = (h // patch) * (w // patch)  # image tokens, as each pipeline counts them
    sigmas, mu = None, None
    if isinstance(family, FluxFamily):
        if not config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = shift_mu(image_seq_len, config, max_shift=1.15)  # Flux always shifts by the image's size
    elif config.get("use_dynamic_shifting"):
        mu = shift_mu(image_seq_len, config, max_shift=1.16)  # SD3 only when its scheduler asks for it
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return scheduler


def shift_mu(image_seq_len: int, config, *, max_shift: float) -> float:
    """The resolution-dependent shift `mu` of diffusers' `calculate_shift`, with the scheduler's settings.

    `max_shift` is the pipeline's own fallback when the configuration has none (Flux: 1.15, SD3: 1.16).

    >>> shift_mu(256, {}, max_shift=1.15), round(shift_mu(4096, {}, max_shift=1.15), 6)
    (0.5, 1.15)
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def inverse_euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The latent at `sigma_next` (noisier) from `latents` at `sigma`, with the velocity evaluated at `latents`.

    The forward step is `x_sigma = x_next + (sigma - sigma_next) * v(x_next)`; inverting it exactly would need v at
    the unknown x_next, so it is taken at the known latent: the usual approximation of ODE inversion.

    >>> inverse_euler_step(torch.zeros(2), torch.ones(2), 0.0, 0.25)
    tensor([0.2500, 0.2500])
    """
    return latents + (sigma_next - sigma) * velocity


def encode_source(pipe, prompt: str, max_sequence_length: int, *, device: torch.device) -> FlowText:
    """The prompt's conditional embeddings from the pipeline's own `encode_prompt` (no negative branch)."""
    with torch.no_grad():
        if isinstance(family_of(pipe), FluxFamily):
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                          max_sequence_length=max_sequence_length)
            return FlowText(embeds, pooled, text_ids)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return FlowText(embeds, pooled)


def velocity(pipe, latents: torch.Tensor, timestep: torch.Tensor, text: FlowText, *,
             guidance: float = 1.0) -> torch.Tensor:
    """The transformer's velocity at unpacked `latents` (1, C, h, w) and `timestep` (0..1000), called as the pipeline
    calls it; returned unpacked, in the model's dtype. `guidance` is Flux-dev's embedded guidance (others ignore it)."""
    family = family_of(pipe)
    model = family.model
    dtype, device = model.dtype, latents.device
    x = family.pack(latents.to(dtype))
    t = timestep.to(device).expand(x.shape[0])
    if not isinstance(family, FluxFamily):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
                     return_dict=False)[0]
    h, w = latents.shape[-2:]
    image_ids = pipe._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, device, dtype)
    embedded = None
    if model.config.guidance_embeds:
        embedded = torch.full([x.shape[0]], guidance, device=device, dtype=torch.float32)
    out = model(hidden_states=x, timestep=t.to(dtype) / 1000, guidance=embedded, pooled_projections=text.pooled,
                encoder_hidden_states=text.embeds, txt_ids=text.text_ids, img_ids=image_ids, return_dict=False)[0]
    return family.unpack(out, (h, w))


def inverse_euler_trajectory(pipe, scheduler: FlowMatchEulerDiscreteScheduler, latents: torch.Tensor, text: FlowText,
                             *, inversion_guidance: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Inverse Euler with the source prompt and no guidance: the pivots x_0 (= `latents`) .. x_T, (N + 1, 1, C, h, w).

    Pivot k sits at sigma `scheduler.sigmas[N - k]` (the forward loop's latent before step N - k); the latents are
    accumulated in float32 and stored in `latents`' dtype.
    """
    sigmas = scheduler.sigmas.tolist()  # N + 1 values, 1 .. 0
    # the model's time at each sigma, as the scheduler makes it; sigma 0 has none in `timesteps`
    times = scheduler.sigmas * scheduler.config.num_train_timesteps
    n = len(sigmas) - 1
    x = latents.float()
    pivots = [latents]
    for i in tqdm(range(n - 1, -1, -1), desc="inverse Euler", disable=not progress):
        v = velocity(pipe, x, times[i + 1], text, guidance=inversion_guidance)
        x = inverse_euler_step(x, v.float(), sigmas[i + 1], sigmas[i])
        pivots.append(x.to(latents.dtype))
    return torch.stack(pivots)


def direct_corrections(pipe, scheduler: FlowMatchEulerDiscreteScheduler, inversion: Inversion, *,
                       progress: bool = True) -> torch.Tensor:
    """Direct inversion: per step, what the source row's guided step needs to land on the next pivot (N, 1, C, h, w).

    The pipeline runs its own loop on the source prompt from x_T, at the edit's guidance and T5 length; after step
    i a step-end callback records `pivot - latents` and continues from what the edit will compute, `latents +
    correction`, so the corrections hold for the edit's call to the last bit.
    """
    family = family_of(pipe)
    trajectory, n = inversion.trajectory, inversion.num_inference_steps
    size = tuple(trajectory.shape[-2:])
    corrections: list[torch.Tensor] = []
    bar = tqdm(total=n, desc="direct inversion", disable=not progress)

    def on_step_end(pipe, i: int, t, kwargs: dict) -> dict:
        if i == 0 and not torch.equal(pipe.scheduler.sigmas.cpu(), scheduler.sigmas.cpu()):
            raise RuntimeError(f"{type(pipe).__name__} ran other sigmas than the inversion's; the inverse Euler "
                               "trajectory would not be the one its edits follow")
        landed = family.unpack(kwargs["latents"], size)
        corrections.append(trajectory[n - 1 - i].to(landed) - landed)
        bar.update()
        return {"latents": family.pack(landed + corrections[-1])}

    try:
        with _pipeline_bar_off(pipe):
            pipe(prompt=[inversion.prompt], latents=family.pack(inversion.latents), height=inversion.height,
                 width=inversion.width, num_inference_steps=n, guidance_scale=inversion.guidance_scale,
                 max_sequence_length=inversion.max_sequence_length, output_type="latent",
                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        bar.close()
    return torch.stack(corrections)


@contextmanager
def _pipeline_bar_off(pipe) -> Iterator[None]:
    """The pipeline's own progress bar off for one call (this module shows its own), its settings restored after."""
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(**{**(saved or {}), "disable": True})
    try:
        yield
    finally:
        if saved is None:
            del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = saved
