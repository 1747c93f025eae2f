"""Real images: DDIM, null-text, negative-prompt and direct inversion of an image into an edit's starting point.

`invert` serves every pipeline the editor drives: UNet pipelines (SD 1.x/2.x, SDXL) invert here, flow-matching
MM-DiT pipelines (SD3/3.5, Flux.1) in `prompt2prompt.flow_inversion` (inverse Euler and direct inversion).

- DDIM inversion runs the DDIM sampler backwards with guidance 1 and gives the pivot trajectory x_0 .. x_T.
- Null-text inversion (Mokady et al., 2022) then optimises, per step, the unconditional embedding so that the
  guided DDIM step from the pivot lands on the next pivot.
- Negative-prompt inversion (Miyake et al., 2023) uses the source prompt's embedding as the unconditional one.
- Direct inversion (Ju et al., 2024) records, per step, the gap between the guided step and the pivot, and the
  edit adds it to the source row only.

Every UNet step here is the diffusers `DDIMScheduler` step the edit uses (`DDIMScheduler.from_config` of the
pipeline's scheduler), so epsilon-, v- and sample-prediction models, zero-terminal-SNR betas, every timestep
spacing and `set_alpha_to_one`/`steps_offset` follow from the scheduler's own configuration.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .alignment import tokenize
from .editor import allow_large, check_steps, is_finite_number
from .families import family_of
from .files import write_atomic, write_text_atomic
from .images import ImageInput, prepare_image, to_tensor

MAX_INNER_STEPS = 100  # null-text's Adam iterations per step (10: the paper's)
METHODS = ("null-text", "negative-prompt", "direct", "ddim")  # UNet pipelines
FLOW_METHODS = ("direct", "euler")  # flow-matching pipelines (SD3/3.5, Flux.1), see `flow_inversion`
_SCALARS = ("num_inference_steps", "guidance_scale", "prompt", "method", "height", "width", "max_sequence_length")
_TENSORS = ("latents", "trajectory", "uncond_embeddings", "uncond_pooled", "corrections")
_FORMAT = "prompt2prompt.inversion"
_VERSION = 1


@dataclass(eq=False)  # tensors have no truth value: compare fields yourself
class Inversion:
    """A real image inverted for editing: pass it to `Editor.edit(..., inversion=inv)`.

    N is `num_inference_steps`; step i is the i-th (descending) timestep of the edit's scheduler (DDIM on UNet
    pipelines, the pipeline's flow-matching Euler on SD3 and Flux). Latents are unpacked (Flux's too).
    """

    latents: torch.Tensor  # x_T, the initial latent of every prompt: (1, C, h, w)
    trajectory: torch.Tensor  # pivot latents x_0 (the VAE encoding) .. x_T: (N + 1, 1, C, h, w)
    num_inference_steps: int
    guidance_scale: float
    prompt: str
    method: str
    height: int  # pixels
    width: int
    uncond_embeddings: torch.Tensor | None = None  # every prompt's unconditional embedding at step i: (N, 1, T, D)
    uncond_pooled: torch.Tensor | None = None  # SDXL's pooled counterpart: (N, 1, D2)
    corrections: torch.Tensor | None = None  # added to the source row after step i: (N, 1, C, h, w)
    max_sequence_length: int | None = None  # the T5 length of an SD3 or Flux inversion: its edits use the same

    def __post_init__(self) -> None:
        methods = dict.fromkeys(METHODS + FLOW_METHODS)
        if self.method not in methods:
            raise ValueError(f"unknown inversion method {self.method!r}; use one of {', '.join(methods)}")
        length = self.max_sequence_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"Inversion.max_sequence_length must be a positive integer or None, got {length!r}")
        n = self.num_inference_steps
        expected = {
            "latents": (1, *self.latents.shape[1:]),
            "trajectory": (n + 1, 1, *self.latents.shape[1:]),
            "corrections": (n, 1, *self.latents.shape[1:]),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"Inversion.{name} must have shape {shape} for {n} steps, got {tuple(tensor.shape)}")
        for name, dims in (("uncond_embeddings", 4), ("uncond_pooled", 3)):
            tensor = getattr(self, name)
            if tensor is not None and (tensor.dim() != dims or tensor.shape[:2] != (n, 1)):
                raise ValueError(f"Inversion.{name} must be ({n}, 1, ...) with {dims} dims, got {tuple(tensor.shape)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Inversion:
        """A copy with every tensor moved to `device` and/or cast to `dtype`."""
        moved = {name: None if (t := getattr(self, name)) is None else t.to(device=device, dtype=dtype)
                 for name in _TENSORS}
        return Inversion(**{**self._fields(), **moved})

    def save(self, path: str | PathLike) -> Path:
        """Write `<path>.safetensors` (tensors) and `<path>.json` (settings), atomically; returns the first.

        >>> # inv.save("photo")  ->  photo.safetensors + photo.json; Inversion.load("photo") reads them back
        """
        from safetensors.torch import save_file

        tensors_path, sidecar_path = _paths(path)
        tensors = {name: t.detach().to("cpu").clone() for name in _TENSORS if (t := getattr(self, name)) is not None}
        sidecar = {"format": _FORMAT, "version": _VERSION, **self._fields(), "tensors": sorted(tensors)}
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tensors_path, lambda tmp: save_file(tensors, tmp))
        write_text_atomic(sidecar_path, json.dumps(sidecar, indent=2) + "\n")
        return tensors_path

    @classmethod
    def load(cls, path: str | PathLike, *, device: torch.device | str = "cpu") -> Inversion:
        """Read an inversion written by `Inversion.save` (give either file, or the common stem)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensors_path, sidecar_path = _paths(path)
        for file in (tensors_path, sidecar_path):
            if not file.is_file():
                raise FileNotFoundError(
                    f"no saved inversion at '{path}': '{file}' is missing (an inversion is a .safetensors file "
                    "plus a .json sidecar of the same name)"
                )
        try:
            sidecar = json.loads(sidecar_path.read_text())
            tensors = load_file(tensors_path, device=str(device))
        except (json.JSONDecodeError, SafetensorError, OSError) as error:
            raise ValueError(f"cannot read the inversion at '{path}' ({error}); the files are corrupt") from error
        if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT:
            raise ValueError(f"'{sidecar_path}' is not a prompt2prompt inversion sidecar")
        if sidecar.get("version") != _VERSION:
            raise ValueError(f"'{sidecar_path}' has inversion format version {sidecar.get('version')}; "
                             f"this prompt2prompt reads version {_VERSION}")
        if sorted(tensors) != sorted(sidecar["tensors"]):
            raise ValueError(f"'{tensors_path}' holds {sorted(tensors)} but its sidecar lists {sidecar['tensors']}")
        fields = {key: sidecar.get(key) for key in _SCALARS}  # files from before max_sequence_length lack it: None
        return cls(**fields, **tensors)

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in _SCALARS}


def invert(
    pipe,
    image: ImageInput,
    prompt: str,
    *,
    method: Literal["null-text", "negative-prompt", "direct", "ddim", "euler"] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    fit: Literal["crop", "pad"] = "crop",
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    max_sequence_length: int | None = None,
    inversion_guidance: float = 1.0,
    progress: bool = True,
) -> Inversion:
    """Invert a real image under `prompt` for editing with `pipe` (Stable Diffusion 1.x/2.x/XL/3/3.5 or Flux.1).

    Args:
        image: a path, PIL image or array; fitted to `height` x `width` (default: the model's size) by `fit`.
        prompt: a caption of the image: the source prompt of the edits to come.
        method: on UNet pipelines "null-text" (the default: best fidelity, optimises), "negative-prompt" (no
            optimisation), "direct" (exact source reconstruction, no optimisation) or "ddim" (plain DDIM inversion,
            the baseline); on SD3 and Flux "direct" (the default) or "euler" (plain inverse Euler, the baseline).
        num_inference_steps, guidance_scale: those of the edits to come; an inversion serves only them
            (None: the model's defaults, 50 and 7.5 on UNets, 28 and 7.0 / 3.5 on SD3 / Flux).
        num_inner_steps, early_stop_epsilon: null-text's Adam iterations per step and its early-stop loss
            (`early_stop_epsilon + i * 2e-5` at step i).
        max_sequence_length: SD3's and Flux's T5 length, which the edits then use too (None: the pipeline's 256 / 512).
        inversion_guidance: Flux-dev's embedded guidance for the inversion's velocity (1.0: unguided).

    Example:
        >>> inv = invert(pipe, "cat.jpg", "a photo of a cat", method="direct")  # doctest: +SKIP
        >>> editor.edit(inv.prompt, [Edit("a photo of a dog")], inversion=inv)  # doctest: +SKIP
    """
    family = family_of(pipe)
    if family.name == "mmdit":
        from .flow_inversion import invert_flow

        _check_prompt(prompt)
        return invert_flow(
            pipe, image, prompt, method="direct" if method is None else method, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, fit=fit, max_sequence_length=max_sequence_length,
            inversion_guidance=inversion_guidance, progress=progress,
        )
    method = "null-text" if method is None else method
    num_inference_steps = family.default_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
    if method not in METHODS:
        hint = " ('euler' inverts flow-matching models: SD3 and Flux)" if method in FLOW_METHODS else ""
        raise ValueError(f"unknown inversion method {method!r}{hint}; use one of {', '.join(METHODS)}")
    _check_prompt(prompt)
    for name, value, default in (("max_sequence_length", max_sequence_length, None),
                                 ("inversion_guidance", inversion_guidance, 1.0)):
        if value != default:
            raise ValueError(f"{name} applies to SD3 and Flux pipelines, not to {type(pipe).__name__}; leave it unset")
    tokenize(pipe.tokenizer, prompt)  # a caption over 77 tokens is refused here, not after the inversion
    check_steps(num_inference_steps)
    if not is_finite_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if method == "null-text" and guidance_scale <= 1:
        raise ValueError(f"null-text inversion optimises the unconditional branch of classifier-free guidance, "
                         f"which guidance_scale={guidance_scale} turns off; use a guidance_scale above 1")
    if isinstance(num_inner_steps, bool) or not isinstance(num_inner_steps, int) or num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be an integer >= 0, got {num_inner_steps!r}")
    if num_inner_steps > MAX_INNER_STEPS and not allow_large():
        raise ValueError(f"num_inner_steps must be at most {MAX_INNER_STEPS}, got {num_inner_steps} "
                         "(set P2P_ALLOW_LARGE=1 to go beyond)")
    if not is_finite_number(early_stop_epsilon) or early_stop_epsilon < 0:
        raise ValueError(f"early_stop_epsilon must be a finite number >= 0, got {early_stop_epsilon!r}")

    image = prepare_image(pipe, image, height=height, width=width, fit=fit)
    width, height = image.size
    device = pipe._execution_device
    scheduler = ddim_scheduler(pipe, num_inference_steps, device=device)
    cond, uncond = _encode(pipe, prompt, height, width, device)
    with torch.no_grad():
        trajectory = _ddim_trajectory(pipe, scheduler, encode_image(pipe, image), cond, progress=progress)
    inversion = Inversion(
        latents=trajectory[-1], trajectory=trajectory, num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale), prompt=prompt, method=method, height=height, width=width,
    )
    if method == "null-text":
        inversion.uncond_embeddings = _null_text_embeddings(
            pipe, scheduler, trajectory, cond, uncond, guidance_scale,
            num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon, progress=progress,
        )
    elif method == "negative-prompt":
        inversion.uncond_embeddings = cond.embeds.expand(num_inference_steps, *cond.embeds.shape)
        if cond.pooled is not None:
            inversion.uncond_pooled = cond.pooled.expand(num_inference_steps, *cond.pooled.shape)
    elif method == "direct":
        with torch.no_grad():
            inversion.corrections = _direct_corrections(pipe, scheduler, trajectory, cond, uncond, guidance_scale,
                                                       progress=progress)
    return inversion


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (the image's caption), not {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt must be the image's caption, not empty")


def ddim_scheduler(pipe, num_inference_steps: int, *, device: torch.device | str | None = None) -> DDIMScheduler:
    """The DDIM scheduler an edit with an inversion runs on: the pipeline's configuration, `num_inference_steps` set."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


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
    kind = scheduler.config.prediction_type
    if kind == "epsilon":  # x0 = (x - n out) / s, eps = out
        return sp / s, np_ - sp * n / s
    if kind == "v_prediction":  # x0 = s x - n v, eps = s v + n x
        return sp * s + np_ * n, np_ * s - sp * n
    if kind == "sample":  # x0 = out, eps = (x - s out) / n
        return np_ / n, sp - np_ * s / n
    raise ValueError(f"cannot invert a scheduler with prediction_type={kind!r}")


def inverse_step(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int,
                 sample: torch.Tensor) -> torch.Tensor:
    """The latent x_t that the DDIM step at `timestep`, given `model_output`, takes exactly to `sample`."""
    a, b = step_coefficients(scheduler, timestep)
    if a == 0:
        raise ValueError(f"the DDIM step at timestep {int(timestep)} ignores its input latent (a sample-predicting "
                         "model stepping to alpha 1), so it cannot be inverted; use set_alpha_to_one=False")
    return (sample - b * model_output) / a


def encode_image(pipe, image) -> torch.Tensor:
    """The VAE latent (1, C, h, w) of an RGB PIL image, normalised as the pipeline decodes it, in its denoiser's dtype.

    SD and SDXL decode `latents / scaling_factor` (SDXL first undoes `latents_mean`/`latents_std` where its VAE
    has them); SD3 and Flux decode `latents / scaling_factor + shift_factor`.
    """
    vae = pipe.vae
    dtype = vae.dtype
    # SDXL's VAE overflows in fp16: encode in fp32 as the pipeline decodes
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            pixels = to_tensor(image).to(device=pipe._execution_device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.mean
    finally:
        if upcast:
            vae.to(dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if _is_sdxl(pipe) and mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
        latents = (latents - mean) / std
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD's VAEs have none
    return ((latents - shift) * vae.config.scaling_factor).to(family_of(pipe).model.dtype)


def _ddim_trajectory(pipe, scheduler: DDIMScheduler, latents: torch.Tensor, cond: _Text, *,
                    progress: bool = True) -> torch.Tensor:
    """DDIM inversion with guidance 1: the pivots x_0 (= `latents`) .. x_T, shape (N + 1, 1, C, h, w)."""
    pivots = [latents]
    for t in tqdm(scheduler.timesteps.flip(0), desc="DDIM inversion", disable=not progress):
        # the model is evaluated at the latent below t, the usual DDIM-inversion approximation
        out = _unet(pipe, scheduler, pivots[-1], t, cond)
        pivots.append(inverse_step(scheduler, out, t, pivots[-1]))
    return torch.stack(pivots)


def _null_text_embeddings(
    pipe, scheduler: DDIMScheduler, trajectory: torch.Tensor, cond: _Text, uncond: _Text, guidance_scale: float, *,
    num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5, progress: bool = True,
) -> torch.Tensor:
    """Null-text inversion: per step, the unconditional embedding whose guided step lands on the next pivot.

    Adam on an fp32 copy of the embedding, lr `1e-2 * (1 - i/100)` (held at its step-99 value beyond), at most
    `num_inner_steps` updates, stopping as soon as the loss is below `early_stop_epsilon + i * 2e-5`; the
    embedding carries over from step to step. Returns (N, 1, T, D) in the UNet's dtype.
    """
    n = len(scheduler.timesteps)
    latent = trajectory[n]
    embedding = uncond.embeds.detach().float()
    embeddings = []
    bar = tqdm(total=n * num_inner_steps, desc="null-text inversion", disable=not progress)
    with _frozen(pipe.unet):
        for i, t in enumerate(scheduler.timesteps):
            target = trajectory[n - 1 - i].float()
            with torch.no_grad():
                out_cond = _unet(pipe, scheduler, latent, t, cond)  # independent of the embedding: once per step
            embedding = embedding.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([embedding], lr=1e-2 * (1 - min(i, 99) / 100))
            for j in range(num_inner_steps + 1):
                last = j == num_inner_steps
                with torch.set_grad_enabled(not last):
                    null = _Text(embedding.to(cond.embeds.dtype), uncond.pooled, uncond.time_ids)
                    out_uncond = _unet(pipe, scheduler, latent, t, null)
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


def _direct_corrections(pipe, scheduler: DDIMScheduler, trajectory: torch.Tensor, cond: _Text, uncond: _Text,
                       guidance_scale: float, *, progress: bool = True) -> torch.Tensor:
    """Direct inversion: per step, what to add to the source row's guided step to land on the next pivot."""
    n = len(scheduler.timesteps)
    latent = trajectory[n]
    corrections = []
    both = _Text.cat(uncond, cond)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="direct inversion", disable=not progress)):
        if guidance_scale > 1:
            out_uncond, out_cond = _unet(pipe, scheduler, latent.expand(2, -1, -1, -1), t, both).chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = _unet(pipe, scheduler, latent, t, cond)
        landed = scheduler.step(out, t, latent).prev_sample
        corrections.append(trajectory[n - 1 - i] - landed)
        latent = landed + corrections[-1]  # what the edit computes, to the last bit
    return torch.stack(corrections)


@dataclass
class _Text:
    """One or more prompts' UNet conditioning: embeddings, and SDXL's pooled embeddings and time ids."""

    embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor | None = None  # (B, D2)
    time_ids: torch.Tensor | None = None  # (B, 6)

    @staticmethod
    def cat(*texts: _Text) -> _Text:
        def cat(name):
            parts = [getattr(text, name) for text in texts]
            return None if parts[0] is None else torch.cat(parts)
        return _Text(cat("embeds"), cat("pooled"), cat("time_ids"))


def _is_sdxl(pipe) -> bool:
    unet = getattr(pipe, "unet", None)  # SD3 and Flux have a transformer instead
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def _encode(pipe, prompt: str, height: int, width: int, device: torch.device) -> tuple[_Text, _Text]:
    """The prompt's conditioning and the pipeline's ordinary unconditional one (an empty negative prompt)."""
    with torch.no_grad():
        if not _is_sdxl(pipe):
            embeds, negative = pipe.encode_prompt(prompt, device, 1, True)
            return _Text(embeds), _Text(negative)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                  else int(pooled.shape[-1]))
    # the pipeline's defaults: original and target size = the image size, no crop
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                      text_encoder_projection_dim=projection).to(device)
    return _Text(embeds, pooled, time_ids), _Text(negative, negative_pooled, time_ids)


def _unet(pipe, scheduler: DDIMScheduler, latents: torch.Tensor, t: torch.Tensor, text: _Text) -> torch.Tensor:
    """The UNet's prediction, called as the pipeline calls it."""
    added = None if text.pooled is None else {"text_embeds": text.pooled, "time_ids": text.time_ids}
    return pipe.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=text.embeds,
                     added_cond_kwargs=added, return_dict=False)[0]


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


def _paths(path: str | PathLike) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"
