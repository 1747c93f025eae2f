"""Real images on flow-matching MM-DiT pipelines (Stable Diffusion 3/3.5, Flux.1): inverse Euler and direct inversion.

- Inverse Euler runs the pipeline's own flow-matching Euler step backwards, with the source prompt and no guidance,
  from the image's latent (sigma 0) up to the noise end of the schedule: the pivot trajectory x_0 .. x_T.
- Direct inversion (Ju et al., 2024, on a flow) records, per step, the gap between the pipeline's guided step and
  the next pivot; the edit adds it to the source row only, so the source reconstructs the image to float precision
  and the edit rows run free.

The schedule is the pipeline's own: `FlowMatchEulerDiscreteScheduler` with the sigmas its `__call__` sets at this
size (SD3: shifted, `mu` only with dynamic shifting; Flux: `linspace(1, 1/N, N)` shifted by the image's `mu`).
The corrections come from the pipeline's own denoising loop, so they hold for exactly the call the edit makes.
The family gives the schedule and the model (`family.inversion_schedule`, `family.denoiser`): no loop here asks
which model it has.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ..families import compat
from ..families.base import Conditioning, Denoiser
from ..families.protocols import InvertingFamily
from ..images import ImageInput, fit_image, image_size, load_image
from ..limits import check_finite_number, check_steps
from .common import encode_image, refuse_options
from .files import Inversion


def invert_flow(family: InvertingFamily, image: ImageInput, prompt: str, *, method: str, num_inference_steps: int | None,
                guidance_scale: float | None, height: int | None, width: int | None, fit: str,
                max_sequence_length: int | None, inversion_guidance: float, progress: bool, **ddim_options) -> Inversion:
    """Invert `image` under `prompt` on a flow-matching pipeline (see `prompt2prompt.inversion.invert`).

    Args:
        method: "direct" (the source row reconstructs the image to float precision) or "euler" (plain inverse
            Euler, the baseline).
        num_inference_steps, guidance_scale, max_sequence_length: those of the edits to come (None: the model's
            defaults: 28 steps, guidance 7.0 for SD3 and 3.5 for Flux, T5 length 256 for SD3 and 512 for Flux).
        inversion_guidance: the embedded guidance of the inversion's velocity on a guidance-distilled Flux (dev);
            1.0, the flow's unguided velocity. Other models invert with the conditional velocity alone.
    """
    # 1. Check inputs, before any model call
    pipe = family.pipe
    refuse_options(family, ddim_options, {"num_inner_steps": 10, "early_stop_epsilon": 1e-5})
    defaults = family.defaults()  # the model's own, else its family's
    num_inference_steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    check_steps(num_inference_steps, pipe.scheduler)
    check_finite_number(guidance_scale, "guidance_scale")
    check_finite_number(inversion_guidance, "inversion_guidance")
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    length = family.max_sequence_length(kwargs)  # at most 512, T5's limit in these pipelines
    family.tokenize(prompt, {"max_sequence_length": length})  # a prompt a text encoder would cut is refused here
    check_flow_scheduler(pipe.scheduler)
    height, width = image_size(pipe, height=height, width=width)

    # 2. The image's latent, the schedule and the source prompt
    fitted = fit_image(load_image(image), height, width, fit=fit)
    device = family.execution_device()
    scheduler = family.inversion_schedule(num_inference_steps, height, width, device=device)
    denoiser = family.denoiser(scheduler, height=height, width=width, max_sequence_length=length, device=device)
    cond = denoiser.encode(prompt)
    with torch.no_grad():
        latents = encode_image(pipe, fitted)  # (1, C, h, w)

        # 3. The pivots, then what keeps the source row on them
        trajectory = inverse_euler_trajectory(denoiser, scheduler, latents, cond, inversion_guidance=inversion_guidance,
                                              progress=progress)
    inversion = Inversion(
        latents=trajectory[-1], trajectory=trajectory, num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale), prompt=prompt, method=method, height=height, width=width,
        max_sequence_length=length,
    )
    if method == "direct":
        inversion.corrections = direct_corrections(family, scheduler, inversion, progress=progress)
    return inversion


def check_flow_scheduler(scheduler: FlowMatchEulerDiscreteScheduler) -> None:
    """Refuse a flow-matching Euler scheduler whose step is not the deterministic one this inversion reverses."""
    config = scheduler.config
    if config.get("stochastic_sampling") or config.get("invert_sigmas"):
        raise ValueError("flow inversion needs the deterministic Euler step from sigma 1 down to 0; this scheduler has "
                         "stochastic_sampling or invert_sigmas set: load it without them")


def inverse_euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The latent at `sigma_next` (noisier) from `latents` at `sigma`, with the velocity evaluated at `latents`.

    The forward step is `x_sigma = x_next + (sigma - sigma_next) * v(x_next)`; inverting it exactly would need v at
    the unknown x_next, so it is taken at the known latent: the usual approximation of ODE inversion.

    >>> inverse_euler_step(torch.zeros(2), torch.ones(2), 0.0, 0.25)
    tensor([0.2500, 0.2500])
    """
    return latents + (sigma_next - sigma) * velocity


def inverse_euler_trajectory(denoiser: Denoiser, scheduler: FlowMatchEulerDiscreteScheduler, latents: torch.Tensor,
                             cond: Conditioning, *, inversion_guidance: float = 1.0,
                             progress: bool = True) -> torch.Tensor:
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
        v = denoiser(x, times[i + 1], cond, guidance=inversion_guidance)
        x = inverse_euler_step(x, v.float(), sigmas[i + 1], sigmas[i])
        pivots.append(x.to(latents.dtype))
    return torch.stack(pivots)


def direct_corrections(family: InvertingFamily, scheduler: FlowMatchEulerDiscreteScheduler, inversion: Inversion, *,
                       progress: bool = True) -> torch.Tensor:
    """Direct inversion: per step, what the source row's guided step needs to land on the next pivot (N, 1, C, h, w).

    The pipeline runs its own loop on the source prompt from x_T, at the edit's guidance and T5 length; after step
    i a step-end callback records `pivot - latents` and continues from what the edit will compute, `latents +
    correction`, so the corrections hold for the edit's call to the last bit.
    """
    pipe = family.pipe
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
        with compat.progress_bar_off(pipe), family.plain_attention():
            pipe(**family.pipeline_call(dict(
                prompt=[inversion.prompt], latents=family.call_latents(inversion.latents), height=inversion.height,
                width=inversion.width, num_inference_steps=n, guidance_scale=inversion.guidance_scale,
                max_sequence_length=inversion.max_sequence_length, output_type="latent",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])))
    finally:
        bar.close()
    return torch.stack(corrections)
