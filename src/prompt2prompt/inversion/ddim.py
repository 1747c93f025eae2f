"""DDIM-family inversion (UNet pipelines: SD 1.x/2.x, SDXL): DDIM, null-text, negative-prompt and direct.

- DDIM inversion runs the DDIM sampler backwards with guidance 1 and gives the pivot trajectory x_0 .. x_T.
- Null-text inversion (Mokady et al., 2022) then optimises, per step, the unconditional embedding so that the
  guided DDIM step from the pivot lands on the next pivot.
- Negative-prompt inversion (Miyake et al., 2023) uses the source prompt's embedding as the unconditional one.
- Direct inversion (Ju et al., 2024) records, per step, the gap between the guided step and the pivot, and the
  edit adds it to the source row only.

Every step here is the diffusers `DDIMScheduler` step the edit uses (`DDIMScheduler.from_config` of the
pipeline's scheduler), so epsilon-, v- and sample-prediction models, zero-terminal-SNR betas, every timestep
spacing and `set_alpha_to_one`/`steps_offset` follow from the scheduler's own configuration. The family gives the
scheduler and the model (`family.inversion_schedule`, `family.denoiser`): no loop here asks which model it has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from ..families.base import Conditioning, Denoiser
from ..families.protocols import InvertingFamily
from ..images import ImageInput, prepare_image
from ..limits import MAX_INNER_STEPS, allow_large, check_finite_number, check_steps, is_finite_number, lift_hint
from .common import encode_image, refuse_options
from .files import Inversion


def invert_ddim(family: InvertingFamily, image: ImageInput, prompt: str, *, method: str, num_inference_steps: int | None,
                guidance_scale: float | None, height: int | None, width: int | None, fit: str, num_inner_steps: int,
                early_stop_epsilon: float, progress: bool, **flow_options) -> Inversion:
    """Invert `image` under `prompt` with a DDIM-family `method` (see `prompt2prompt.inversion.invert`)."""
    pipe = family.pipe
    refuse_options(family, flow_options, {"max_sequence_length": None, "inversion_guidance": 1.0})
    defaults = family.defaults()  # the model's own, else its family's
    num_inference_steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    family.tokenize(prompt, {})  # a caption over 77 tokens is refused here, not after the inversion
    check_steps(num_inference_steps, pipe.scheduler)
    check_finite_number(guidance_scale, "guidance_scale")
    if method == "null-text" and guidance_scale <= 1:
        raise ValueError(f"null-text inversion optimises the unconditional branch of classifier-free guidance, "
                         f"which guidance_scale={guidance_scale} turns off; use a guidance_scale above 1")
    if isinstance(num_inner_steps, bool) or not isinstance(num_inner_steps, int) or num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be an integer >= 0, got {num_inner_steps!r}")
    if num_inner_steps > MAX_INNER_STEPS and not allow_large():
        raise ValueError(f"num_inner_steps must be at most {MAX_INNER_STEPS}, got {num_inner_steps} ({lift_hint()})")
    if not is_finite_number(early_stop_epsilon) or early_stop_epsilon < 0:
        raise ValueError(f"early_stop_epsilon must be a finite number >= 0, got {early_stop_epsilon!r}")

    image = prepare_image(pipe, image, height=height, width=width, fit=fit)
    width, height = image.size
    device = family.execution_device()
    scheduler = family.inversion_schedule(num_inference_steps, height, width, device=device)
    length = family.max_sequence_length({})  # a UNet's 77 CLIP positions
    denoiser = family.denoiser(scheduler, height=height, width=width, max_sequence_length=length, device=device)
    cond, uncond = denoiser.encode(prompt), denoiser.negative()
    with torch.no_grad():
        trajectory = _ddim_trajectory(denoiser, scheduler, encode_image(pipe, image), cond, progress=progress)
    inversion = Inversion(
        latents=trajectory[-1], trajectory=trajectory, num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale), prompt=prompt, method=method, height=height, width=width,
    )
    if method == "null-text":
        inversion.uncond_embeddings = _null_text_embeddings(
            family.model, denoiser, scheduler, trajectory, cond, uncond, guidance_scale,
            num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon, progress=progress,
        )
    elif method == "negative-prompt":
        inversion.uncond_embeddings = cond.embeds.expand(num_inference_steps, *cond.embeds.shape)
        if cond.pooled is not None:
            inversion.uncond_pooled = cond.pooled.expand(num_inference_steps, *cond.pooled.shape)
    elif method == "direct":
        with torch.no_grad():
            inversion.corrections = _direct_corrections(denoiser, scheduler, trajectory, cond, uncond, guidance_scale,
                                                       progress=progress)
    return inversion


def step_coefficients(scheduler: DDIMScheduler, timestep: int) -> tuple[float, float]:
    """(a, b) with `scheduler.step(out, t, x).prev_sample == a * x + b * out` (deterministic DDIM, no clipping).

    >>> s = DDIMScheduler(prediction_type="v_prediction", clip_sample=False); s.set_timesteps(10)
    >>> x, v = torch.randn(4), torch.randn(4); a, b = step_coefficients(s, 901)
    >>> torch.allclose(s.step(v, 901, x).prev_sample, a * x + b * v, atol=1e-6)
    True
    """
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    s, sp = math.sqrt(alpha), math.sqrt(alpha_prev)  # signal scales
    n, np_ = math.sqrt(1 - alpha), math.sqrt(1 - alpha_prev)  # noise scales
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":  # x0 = (x - n out) / s, eps = out
        return sp / s, np_ - sp * n / s
    if prediction == "v_prediction":  # x0 = s x - n v, eps = s v + n x
        return sp * s + np_ * n, np_ * s - sp * n
    if prediction == "sample":  # x0 = out, eps = (x - s out) / n
        return np_ / n, sp - np_ * s / n
    raise ValueError(f"cannot invert a scheduler with prediction_type={prediction!r}")


def inverse_step(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int,
                 sample: torch.Tensor) -> torch.Tensor:
    """The latent x_t that the DDIM step at `timestep`, given `model_output`, takes exactly to `sample`."""
    a, b = step_coefficients(scheduler, timestep)
    if a == 0:
        raise ValueError(f"the DDIM step at timestep {int(timestep)} ignores its input latent (a sample-predicting "
                         "model stepping to alpha 1), so it cannot be inverted; use set_alpha_to_one=False")
    return (sample - b * model_output) / a


def _ddim_trajectory(denoiser: Denoiser, scheduler: DDIMScheduler, latents: torch.Tensor, cond: Conditioning, *,
                     progress: bool = True) -> torch.Tensor:
    """DDIM inversion with guidance 1: the pivots x_0 (= `latents`) .. x_T, shape (N + 1, 1, C, h, w)."""
    pivots = [latents]
    for t in tqdm(scheduler.timesteps.flip(0), desc="DDIM inversion", disable=not progress):
        # the model is evaluated at the latent below t, the usual DDIM-inversion approximation
        out = denoiser(pivots[-1], t, cond)
        pivots.append(inverse_step(scheduler, out, t, pivots[-1]))
    return torch.stack(pivots)


def _null_text_embeddings(
    model: torch.nn.Module, denoiser: Denoiser, scheduler: DDIMScheduler, trajectory: torch.Tensor, cond: Conditioning,
    uncond: Conditioning, guidance_scale: float, *, num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5,
    progress: bool = True,
) -> torch.Tensor:
    """Null-text inversion: per step, the unconditional embedding whose guided step lands on the next pivot.

    Adam on an fp32 copy of the embedding, lr `1e-2 * (1 - i/100)` (held at its step-99 value beyond), at most
    `num_inner_steps` updates, stopping as soon as the loss is below `early_stop_epsilon + i * 2e-5`; the
    embedding carries over from step to step; `model`'s weights are frozen meanwhile. Returns (N, 1, T, D) in the
    text's dtype.
    """
    n = len(scheduler.timesteps)
    latent = trajectory[n]
    embedding = uncond.embeds.detach().float()
    embeddings = []
    bar = tqdm(total=n * num_inner_steps, desc="null-text inversion", disable=not progress)
    with _frozen(model):
        for i, t in enumerate(scheduler.timesteps):
            target = trajectory[n - 1 - i].float()
            with torch.no_grad():
                out_cond = denoiser(latent, t, cond)  # independent of the embedding: once per step
            embedding = embedding.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([embedding], lr=1e-2 * (1 - min(i, 99) / 100))
            for j in range(num_inner_steps + 1):
                last = j == num_inner_steps
                with torch.set_grad_enabled(not last):
                    null = uncond.with_embeds(embedding.to(cond.embeds.dtype))
                    out_uncond = denoiser(latent, t, null)
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                    landed = scheduler.step(out, t, latent).prev_sample
                    loss = F.mse_loss(landed.float(), target)
                if last or loss.item() < early_stop_epsilon + i * 2e-5:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
            bar.update(num_inner_steps - j)
            embedding = embedding.detach()
            embeddings.append(embedding.to(cond.embeds.dtype))
            latent = landed.detach()  # the step the edit will take, with the embedding it will use
    bar.close()
    return torch.stack(embeddings)


def _direct_corrections(denoiser: Denoiser, scheduler: DDIMScheduler, trajectory: torch.Tensor, cond: Conditioning,
                        uncond: Conditioning, guidance_scale: float, *, progress: bool = True) -> torch.Tensor:
    """Direct inversion: per step, what to add to the source row's guided step to land on the next pivot."""
    n = len(scheduler.timesteps)
    latent = trajectory[n]
    corrections = []
    both = denoiser.batch(uncond, cond)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="direct inversion", disable=not progress)):
        if guidance_scale > 1:
            out_uncond, out_cond = denoiser(latent.expand(2, -1, -1, -1), t, both).chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = denoiser(latent, t, cond)
        landed = scheduler.step(out, t, latent).prev_sample
        corrections.append(trajectory[n - 1 - i] - landed)
        latent = landed + corrections[-1]  # what the edit computes, to the last bit
    return torch.stack(corrections)


@contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No weight gradients while the embedding is optimised: backward then costs about one forward, not two."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
