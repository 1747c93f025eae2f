"""Inversion of real images on tiny random SD3, SD3.5, Flux, Chroma and Qwen-Image pipelines: inverse Euler, direct
inversion, save/load."""

import doctest
import json

import numpy as np
import pytest
import torch
from conftest import on_device, rel_err, tolerance
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from mmdit_pipelines import tiny_chroma_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd35_pipeline
from qwen_pipelines import tiny_qwenimage_pipeline

import prompt2prompt as p2p
from prompt2prompt.families import family_of
from prompt2prompt.inversion import flow as flow_inversion
from prompt2prompt.images import fit_image, load_image, to_tensor
from prompt2prompt.inversion import Inversion, invert

SOURCE = "a cat riding a bicycle"
EDIT = "a dog riding a bicycle"
STEPS = 4
T5_LENGTH = 16
OPTIONS = dict(num_inference_steps=STEPS, max_sequence_length=T5_LENGTH, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return (np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8)  # 32x32, blocky


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": on_device(tiny_sd3_pipeline()), "sd35": on_device(tiny_sd35_pipeline()),
            "flux": on_device(tiny_flux_pipeline()), "flux-dev": on_device(tiny_flux_pipeline(guidance_embeds=True)),
            "chroma": on_device(tiny_chroma_pipeline()), "qwenimage": on_device(tiny_qwenimage_pipeline())}


@pytest.fixture(params=["sd3", "sd35", "flux", "flux-dev", "chroma", "qwenimage"])
def pipe(request, pipes):
    return pipes[request.param]


def edit_latents(pipe, inv, **kwargs):
    """(2, C, h, w) unpacked latents of the source row and one edit on `inv`."""
    images = p2p.Editor(pipe).edit(inv.prompt, [p2p.Edit(EDIT)], inversion=inv, output_type="latent", **kwargs).images
    return p2p.Editor(pipe).family.unpack(images, tuple(inv.latents.shape[-2:])) if images.ndim == 3 else images


def source_error(pipe, inv):
    """How far the edit's source row ends from the image's latent (relative, max norm)."""
    return rel_err(edit_latents(pipe, inv)[0], inv.trajectory[0, 0])


def test_direct_source_row_is_the_image_latent_and_the_edit_runs_free(pipe, image):
    inv = invert(pipe, image, SOURCE, **OPTIONS)
    assert (inv.method, inv.num_inference_steps, inv.max_sequence_length) == ("direct", STEPS, T5_LENGTH)
    latents = edit_latents(pipe, inv)
    assert rel_err(latents[0], inv.trajectory[0, 0]) <= tolerance(1e-5)
    assert rel_err(latents[1], latents[0]) > 1e-2


def test_direct_reconstructs_closer_than_plain_euler(pipe, image):
    direct = invert(pipe, image, SOURCE, **OPTIONS)
    euler = invert(pipe, image, SOURCE, method="euler", **OPTIONS)
    assert torch.equal(direct.trajectory, euler.trajectory)  # the same pivots; only the corrections differ
    assert euler.corrections is None
    error = source_error(pipe, euler)  # a 4-step inverse ODE on a random model, edited at the default guidance
    assert error > 1e-2 and source_error(pipe, direct) < error / 100


def test_trajectory_starts_at_the_vae_latent_and_ends_at_x_T(pipes, image):
    pipe = pipes["flux"]
    inv = invert(pipe, image, SOURCE, **OPTIONS)
    channels, h, w = p2p.Editor(pipe).family.latent_shape(32, 32)
    assert inv.latents.shape == (1, channels, h, w) and inv.trajectory.shape == (STEPS + 1, 1, channels, h, w)
    assert inv.corrections.shape == (STEPS, 1, channels, h, w)
    assert torch.equal(inv.trajectory[-1], inv.latents)
    assert inv.latents.dtype == pipe.transformer.dtype and inv.latents.device == pipe.device
    vae = pipe.vae
    pixels = to_tensor(fit_image(load_image(image), 32, 32)).to(pipe.device, vae.dtype)
    with torch.no_grad():
        encoded = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(inv.trajectory[0], encoded.to(inv.latents.dtype), rtol=tolerance(1.3e-6),
                               atol=tolerance(1e-5))
    assert (inv.height, inv.width, inv.guidance_scale) == (32, 32, 3.5)  # Flux's default guidance


@pytest.mark.parametrize("config", [dict(), dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True)],
                         ids=["plain", "shift", "dynamic"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_scheduler_sigmas_are_the_pipelines_own(pipes, config, name, monkeypatch):
    pipe = pipes[name]
    monkeypatch.setattr(pipe, "scheduler", FlowMatchEulerDiscreteScheduler(**config))
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(pipe.scheduler.sigmas.clone())
        return {}

    pipe(SOURCE, num_inference_steps=3, height=32, width=48, max_sequence_length=T5_LENGTH, output_type="latent",
         callback_on_step_end=record)
    ours = family_of(pipe).inversion_schedule(3, 32, 48, device=pipe.device)
    assert torch.equal(ours.sigmas, seen[0])
    assert pipe.scheduler is not ours


def test_flux_dev_inverts_at_its_inversion_guidance(pipes, image):
    one = invert(pipes["flux-dev"], image, SOURCE, method="euler", **OPTIONS)
    guided = invert(pipes["flux-dev"], image, SOURCE, method="euler", inversion_guidance=3.5, **OPTIONS)
    assert not torch.allclose(one.latents, guided.latents)
    # without embedded guidance the model has nothing to take it by
    plain = invert(pipes["flux"], image, SOURCE, method="euler", **OPTIONS)
    assert torch.equal(plain.latents, invert(pipes["flux"], image, SOURCE, method="euler", inversion_guidance=3.5,
                                             **OPTIONS).latents)


def test_save_load_round_trip_and_the_t5_length(pipes, image, tmp_path):
    pipe = pipes["sd3"]
    inv = p2p.Editor(pipe).invert(image, SOURCE, **OPTIONS)
    inv.save(tmp_path / "photo")
    sidecar = json.loads((tmp_path / "photo.json").read_text())
    assert sidecar["max_sequence_length"] == T5_LENGTH and sidecar["method"] == "direct"
    loaded = Inversion.load(tmp_path / "photo", device=pipe.device)
    for field, value in vars(inv).items():
        other = getattr(loaded, field)
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, field
    assert rel_err(edit_latents(pipe, loaded)[0], inv.trajectory[0, 0]) <= tolerance(1e-5)
    with pytest.raises(ValueError, match=f"max_sequence_length={T5_LENGTH}; edit it with the same, not 32"):
        edit_latents(pipe, loaded, max_sequence_length=32)
    # files written before the field existed still load, without a T5 length
    del sidecar["max_sequence_length"]
    (tmp_path / "photo.json").write_text(json.dumps(sidecar))
    assert Inversion.load(tmp_path / "photo").max_sequence_length is None


def test_bad_arguments_get_clear_errors(pipes, sd_pipe, image, monkeypatch):
    sd3 = pipes["sd3"]
    for method in ("null-text", "negative-prompt", "ddim"):
        with pytest.raises(ValueError, match=f"'{method}' inversion is for Stable Diffusion 1.x, 2.x and XL pipelines, not StableDiffusion3Pipeline; use one of direct, euler"):
            invert(sd3, image, SOURCE, method=method, **OPTIONS)
    with pytest.raises(ValueError, match="unknown inversion method 'pnp' for StableDiffusion3Pipeline"):
        invert(sd3, image, SOURCE, method="pnp", **OPTIONS)
    with pytest.raises(ValueError, match=r"'euler' inversion is for Stable Diffusion 3 and 3.5, Flux.1, .*Qwen-Image, FLUX.2 klein, FLUX.2 dev and Z-Image pipelines, not StableDiffusionPipeline"):
        invert(sd_pipe, image, SOURCE, method="euler")
    with pytest.raises(ValueError, match="max_sequence_length applies to Stable Diffusion 3 and 3.5, Flux.1, .*Qwen-Image, FLUX.2 klein, FLUX.2 dev and Z-Image pipelines"):
        invert(sd_pipe, image, SOURCE, method="ddim", max_sequence_length=16)
    with pytest.raises(ValueError, match="height=42 is not a size this model accepts.*multiple of 4 px"):
        invert(sd3, image, SOURCE, **{**OPTIONS, "height": 42})
    with pytest.raises(ValueError, match="max_sequence_length must be at most 512"):
        invert(sd3, image, SOURCE, **{**OPTIONS, "max_sequence_length": 513})
    with pytest.raises(ValueError, match="num_inference_steps"):
        invert(sd3, image, SOURCE, **{**OPTIONS, "num_inference_steps": 0})
    with pytest.raises(TypeError, match="one string"):
        invert(sd3, image, [SOURCE], **OPTIONS)
    monkeypatch.setattr(sd3, "scheduler", EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler's Euler step; .* is EulerDiscreteScheduler"):
        invert(sd3, image, SOURCE, **OPTIONS)
    monkeypatch.setattr(sd3, "scheduler", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    with pytest.raises(ValueError, match="stochastic_sampling"):
        invert(sd3, image, SOURCE, **OPTIONS)


def test_an_sd3_inversion_cannot_be_edited_at_another_guidance(pipes, image):
    inv = invert(pipes["sd3"], image, SOURCE, **OPTIONS)
    with pytest.raises(ValueError, match="guidance_scale=7.0"):
        edit_latents(pipes["sd3"], inv, guidance_scale=5.0)


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(flow_inversion, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
