"""Inversion of real images: the four methods on tiny random SD, SD-v and SDXL pipelines, and save/load; the
denoiser every family gives both kinds of loop."""

import json

import numpy as np
import pytest
from PIL import Image
import torch
from diffusers import DDIMScheduler
from conftest import TORCH_DEVICE, TORCH_DTYPE, on_device, tolerance
from mmdit_pipelines import tiny_chroma_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline
from pipelines import tiny_sd_pipeline

from prompt2prompt import Edit, Editor, LocalBlend
from prompt2prompt.families import family_of
from prompt2prompt.images import prepare_image, to_tensor
from prompt2prompt.inversion import Inversion, invert
from prompt2prompt.inversion.ddim import inverse_step, step_coefficients

PROMPT = "a photo of a red cat"
STEPS = 3


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return (np.kron(rng.random((4, 5, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8)  # 32x40, blocky


@pytest.fixture(scope="module")
def sd(sd_pipe):
    return sd_pipe


@pytest.fixture(scope="module")
def sd_v():
    # SD 2.x / the demo model: v-prediction, zero terminal SNR, trailing timesteps
    return on_device(tiny_sd_pipeline(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"))


@pytest.fixture(scope="module")
def sdxl(sdxl_pipe):
    return sdxl_pipe


def _texts(pipe, prompt, height, width):
    """(cond, uncond, extra UNet kwargs for a [uncond, cond] batch) exactly as the diffusers pipelines build them."""
    with torch.no_grad():
        if not hasattr(pipe, "text_encoder_2"):
            cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
            return cond, uncond, None, None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, device=pipe.device, do_classifier_free_guidance=True)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=pipe.device)
    return cond, uncond, (pooled, uncond_pooled), time_ids


def replay_source(pipe, inv: Inversion) -> list[torch.Tensor]:
    """The source row of an edit on `inv`, written from the contract: the latent after every step."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(inv.num_inference_steps)
    cond, uncond, pooled, time_ids = _texts(pipe, inv.prompt, inv.height, inv.width)
    x, out = inv.latents, []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            null = uncond if inv.uncond_embeddings is None else inv.uncond_embeddings[i]
            extra = {}
            if pooled is not None:
                null_pooled = pooled[1] if inv.uncond_pooled is None else inv.uncond_pooled[i]
                extra["added_cond_kwargs"] = {"text_embeds": torch.cat([null_pooled, pooled[0]]),
                                              "time_ids": time_ids.repeat(2, 1)}
            e_uncond, e_cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null, cond]),
                                         **extra).sample.chunk(2)
            x = scheduler.step(e_uncond + inv.guidance_scale * (e_cond - e_uncond), t, x).prev_sample
            if inv.corrections is not None:
                x = x + inv.corrections[i]
            out.append(x)
    return out


def _final_error(pipe, inv):
    return (replay_source(pipe, inv)[-1] - inv.trajectory[0]).pow(2).mean().item()


@pytest.mark.parametrize(
    "config",
    [
        dict(),  # SD 1.x: epsilon, leading spacing, steps_offset 1, final alpha = alphas_cumprod[0]
        dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
        dict(prediction_type="epsilon", set_alpha_to_one=True, timestep_spacing="linspace", steps_offset=0),
        dict(prediction_type="sample", timestep_spacing="linspace", steps_offset=0),
    ],
)
@pytest.mark.parametrize("steps", [3, 7])
def test_inverse_step_undoes_the_schedulers_own_step(config, steps):
    scheduler = DDIMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                 "clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False, **config})
    scheduler.set_timesteps(steps)  # 1000 / 7 leaves trailing steps whose "previous" is not the next timestep
    x, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for t in scheduler.timesteps:
        a, b = step_coefficients(scheduler, t)
        stepped = scheduler.step(out, t, x).prev_sample
        torch.testing.assert_close(stepped, a * x + b * out)
        torch.testing.assert_close(inverse_step(scheduler, out, t, stepped), x)


@pytest.mark.parametrize("method", ["ddim", "negative-prompt", "direct", "null-text"])
def test_shapes_and_contents(sd, image, method):
    inv = invert(sd, image, PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2, progress=False)
    assert (inv.method, inv.prompt, inv.num_inference_steps, inv.guidance_scale) == (method, PROMPT, STEPS, 7.5)
    assert (inv.height, inv.width) == (32, 32)  # the tiny model's default size
    assert inv.latents.shape == (1, 4, 16, 16) and inv.latents.dtype == TORCH_DTYPE and inv.latents.device == sd.device
    assert inv.trajectory.shape == (STEPS + 1, 1, 4, 16, 16)
    assert torch.equal(inv.trajectory[-1], inv.latents)
    pixels = to_tensor(prepare_image(sd, image)).to(sd.device, sd.dtype)
    with torch.no_grad():
        encoded = sd.vae.encode(pixels).latent_dist.mean * sd.vae.config.scaling_factor
    # in half precision the VAE encodes upcast to float32 (force_upcast), the plain call here does not
    torch.testing.assert_close(inv.trajectory[0], encoded, rtol=tolerance(1.3e-6), atol=tolerance(1e-5))
    assert (inv.uncond_embeddings is not None) == (method in ("null-text", "negative-prompt"))
    assert (inv.corrections is not None) == (method == "direct")
    assert inv.uncond_pooled is None
    if inv.uncond_embeddings is not None:
        assert inv.uncond_embeddings.shape == (STEPS, 1, 77, 32)
    if method == "negative-prompt":
        cond, _, _, _ = _texts(sd, PROMPT, 32, 32)
        for i in range(STEPS):
            assert torch.equal(inv.uncond_embeddings[i], cond)


def test_ddim_inversion_is_deterministic_guidance_1(sd, image):
    a = invert(sd, image, PROMPT, method="ddim", num_inference_steps=STEPS, guidance_scale=3.0, progress=False)
    b = invert(sd, image, PROMPT, method="ddim", num_inference_steps=STEPS, guidance_scale=7.5, progress=False)
    assert torch.equal(a.trajectory, b.trajectory)  # the pivots never depend on the edit's guidance
    other = invert(sd, image, "a photo of a blue dog", method="ddim", num_inference_steps=STEPS, progress=False)
    assert not torch.allclose(other.latents, a.latents)


@pytest.mark.parametrize("pipe_name", ["sd", "sd_v", "sdxl"])
def test_direct_source_row_stays_on_the_trajectory(request, image, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    inv = invert(pipe, image, PROMPT, method="direct", num_inference_steps=4, progress=False)
    for i, latent in enumerate(replay_source(pipe, inv)):
        torch.testing.assert_close(latent, inv.trajectory[3 - i], rtol=0, atol=tolerance(1e-5))
    # while uncorrected DDIM inversion at guidance 7.5 drifts far away
    ddim = Inversion(**{**vars(inv), "method": "ddim", "corrections": None})
    assert _final_error(pipe, ddim) > 1e-2


@pytest.mark.parametrize("pipe_name", ["sd", "sd_v", "sdxl"])
def test_null_text_lands_closer_than_ddim(request, image, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    nti = invert(pipe, image, PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=5,
                 progress=False)
    ddim = Inversion(**{**vars(nti), "method": "ddim", "uncond_embeddings": None})
    # a random tiny UNet barely listens to its text, so the gain is small here; the README has a trained model's
    assert _final_error(pipe, nti) < 0.95 * _final_error(pipe, ddim)
    if pipe_name == "sdxl":
        assert nti.uncond_embeddings.shape == (STEPS, 1, 77, 64) and nti.uncond_pooled is None


def test_null_text_early_stop_and_no_inner_steps(sd, image):
    _, uncond, _, _ = _texts(sd, PROMPT, 32, 32)
    lazy = invert(sd, image, PROMPT, method="null-text", num_inference_steps=STEPS, early_stop_epsilon=1e9,
                  progress=False)
    none = invert(sd, image, PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=0,
                  progress=False)
    for inv in (lazy, none):  # the loss is under the threshold at once / no update allowed: nothing changes
        for i in range(STEPS):
            assert torch.equal(inv.uncond_embeddings[i], uncond)
    busy = invert(sd, image, PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=2,
                  early_stop_epsilon=0.0, progress=False)
    assert not torch.equal(busy.uncond_embeddings[0], uncond)


def test_sdxl_negative_prompt_uses_the_source_pooled_embedding(sdxl, image):
    inv = invert(sdxl, image, PROMPT, method="negative-prompt", num_inference_steps=STEPS, progress=False)
    cond, _, (pooled, _), _ = _texts(sdxl, PROMPT, 32, 32)
    assert inv.uncond_embeddings.shape == (STEPS, 1, 77, 64) and inv.uncond_pooled.shape == (STEPS, 1, 32)
    assert torch.equal(inv.uncond_embeddings[1], cond) and torch.equal(inv.uncond_pooled[2], pooled)
    # its source row is guidance-free DDIM from x_T: much closer to the image than DDIM inversion at 7.5
    ddim = Inversion(**{**vars(inv), "method": "ddim", "uncond_embeddings": None, "uncond_pooled": None})
    assert _final_error(sdxl, inv) < _final_error(sdxl, ddim)


def test_non_square_and_padded_input(sd, image):
    inv = invert(sd, image, PROMPT, method="direct", num_inference_steps=2, height=32, width=48, fit="pad",
                 progress=False)
    assert (inv.height, inv.width) == (32, 48) and inv.latents.shape == (1, 4, 16, 24)
    torch.testing.assert_close(replay_source(sd, inv)[-1], inv.trajectory[0], rtol=0, atol=tolerance(1e-5))


@pytest.mark.parametrize("method", ["null-text", "negative-prompt", "direct"])
def test_save_load_round_trip(sd, image, tmp_path, method):
    inv = invert(sd, image, PROMPT, method=method, num_inference_steps=2, num_inner_steps=1, progress=False)
    written = inv.save(tmp_path / "photo")
    assert written == tmp_path / "photo.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.json", "photo.safetensors"]  # no temp files left
    sidecar = json.loads((tmp_path / "photo.json").read_text())
    assert sidecar["method"] == method and sidecar["num_inference_steps"] == 2 and sidecar["prompt"] == PROMPT
    for name in ("photo", "photo.safetensors", "photo.json"):
        loaded = Inversion.load(tmp_path / name)
        for field, value in vars(inv).items():
            other = getattr(loaded, field)
            if isinstance(value, torch.Tensor):
                assert torch.equal(other, value), field
            else:
                assert other == value, field
    moved = inv.to(dtype=torch.float64)
    assert moved.latents.dtype == torch.float64 and moved.method == method
    assert (moved.corrections is None) == (inv.corrections is None)


def test_load_errors(sd, image, tmp_path):
    inv = invert(sd, image, PROMPT, method="ddim", num_inference_steps=2, progress=False)
    inv.save(tmp_path / "a")
    (tmp_path / "a.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.json' is missing"):
        Inversion.load(tmp_path / "a")
    inv.save(tmp_path / "b")
    (tmp_path / "b.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Inversion.load(tmp_path / "b")
    inv.save(tmp_path / "c")
    (tmp_path / "c.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a prompt2prompt inversion"):
        Inversion.load(tmp_path / "c")


def test_bad_arguments_get_clear_errors(sd, image):
    with pytest.raises(ValueError, match="'pnp'.*direct, null-text, negative-prompt, ddim"):
        invert(sd, image, PROMPT, method="pnp")
    with pytest.raises(ValueError, match="guidance_scale=1.0"):
        invert(sd, image, PROMPT, method="null-text", guidance_scale=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        invert(sd, image, PROMPT, num_inference_steps=0)
    with pytest.raises(TypeError, match="one string"):
        invert(sd, image, [PROMPT])
    with pytest.raises(ValueError, match="height=30"):
        invert(sd, image, PROMPT, height=30)
    with pytest.raises(ValueError, match="num_inner_steps must be at most 100"):  # not 10**9 iterations a step
        invert(sd, image, PROMPT, num_inner_steps=10**9)
    with pytest.raises(ValueError, match="num_inference_steps must be at most 1000"):
        invert(sd, image, PROMPT, num_inference_steps=10**7)
    with pytest.raises(ValueError, match="0x0 pixels"):
        invert(sd, Image.new("RGB", (0, 0)), PROMPT)
    inv = invert(sd, image, PROMPT, method="ddim", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"trajectory must have shape \(3, 1, 4, 16, 16\)"):
        Inversion(**{**vars(inv), "num_inference_steps": 2, "trajectory": inv.trajectory[:2]})
    with pytest.raises(ValueError, match="unknown inversion method 'fast'"):
        Inversion(**{**vars(inv), "method": "fast"})


# End to end: edits on an inversion, through Editor.edit(..., inversion=inv)


@pytest.mark.parametrize("method", ["ddim", "negative-prompt", "null-text"])
def test_identity_edit_on_an_inversion_returns_the_source_reconstruction(sd, image, method):
    editor = Editor(sd)
    inv = editor.invert(image, PROMPT, method=method, num_inference_steps=STEPS, num_inner_steps=2, progress=False)
    result = editor.edit(PROMPT, [Edit(PROMPT)], inversion=inv, output_type="latent")
    source, identity = result.images
    torch.testing.assert_close(source, replay_source(sd, inv)[-1][0], rtol=0, atol=tolerance(1e-3, scale=source.abs().max().item()))
    torch.testing.assert_close(identity, source, rtol=0, atol=tolerance(1e-5))


def test_direct_edit_source_row_is_the_vae_reconstruction(image):
    pipe = tiny_sd_pipeline().to(TORCH_DEVICE, torch.float64)  # float64: "to float precision" becomes a tight bound
    editor = Editor(pipe)
    inv = editor.invert(image, PROMPT, method="direct", num_inference_steps=STEPS, progress=False)
    assert inv.corrections.dtype == torch.float64
    latents = editor.edit(PROMPT, [Edit("a photo of a red dog")], inversion=inv, output_type="latent").images
    torch.testing.assert_close(latents[0], inv.trajectory[0, 0], rtol=0, atol=1e-9)
    pixels = editor.edit(PROMPT, [Edit("a photo of a red dog")], inversion=inv, output_type="pt").images
    with torch.no_grad():
        decoded = pipe.vae.decode(inv.trajectory[0] / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(pixels[0], (decoded[0] / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-9)
    assert (latents[1] - latents[0]).abs().max() > 1e-2  # the edit row is free


def test_direct_edit_source_row_in_float32(sd, image):
    inv = invert(sd, image, PROMPT, method="direct", num_inference_steps=STEPS, progress=False)
    latents = Editor(sd).edit(PROMPT, [Edit("a photo of a red dog")], inversion=inv, output_type="latent").images
    torch.testing.assert_close(latents[0], inv.trajectory[0, 0], rtol=0, atol=tolerance(1e-3, scale=latents[0].abs().max().item()))


def test_reweight_and_local_blend_on_an_inversion(sd, image, tmp_path):
    editor = Editor(sd)
    inv = Inversion.load(invert(sd, image, PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=1,
                                progress=False).save(tmp_path / "nti"))  # through a file, as a user would
    blend = LocalBlend("cat", "dog", threshold=0.9, start=0.0)  # a random model attends almost evenly
    result = editor.edit(PROMPT, [Edit(PROMPT, weights={"cat": 4.0}), Edit("a photo of a red dog", blend=blend)],
                         inversion=inv, output_type="latent")
    source, reweighted, blended = result.images
    torch.testing.assert_close(source, replay_source(sd, inv)[-1][0], rtol=0, atol=tolerance(1e-3, scale=source.abs().max().item()))
    assert (reweighted - source).abs().max() > 1e-3
    mask = result.masks[1].to(sd.device, torch.bool)
    assert mask.any() and not mask.all()
    torch.testing.assert_close(blended[:, ~mask], source[:, ~mask], rtol=0, atol=tolerance(1e-6))
    assert (blended[:, mask] - source[:, mask]).abs().max() > 1e-3


def test_sdxl_null_text_edit_follows_its_optimisation(sdxl, image):
    editor = Editor(sdxl)
    inv = editor.invert(image, PROMPT, method="null-text", num_inference_steps=STEPS, num_inner_steps=1, progress=False)
    source = editor.edit(PROMPT, [Edit(PROMPT)], inversion=inv, output_type="latent").images[0]
    torch.testing.assert_close(source, replay_source(sdxl, inv)[-1][0], rtol=0, atol=tolerance(1e-3, scale=source.abs().max().item()))


def test_null_text_optimises_in_float32_for_a_float16_pipeline(image, monkeypatch):
    pipe = tiny_sd_pipeline().to(TORCH_DEVICE, torch.float16)
    seen = []
    adam = torch.optim.Adam

    def recording_adam(params, **kwargs):
        seen.extend(p.dtype for p in params)
        return adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", recording_adam)
    inv = invert(pipe, image, PROMPT, method="null-text", num_inference_steps=2, num_inner_steps=2,
                 early_stop_epsilon=0.0, progress=False)
    assert seen == [torch.float32, torch.float32]  # one fp32 embedding per step
    assert inv.uncond_embeddings.dtype == torch.float16 and inv.latents.dtype == torch.float16
    assert torch.isfinite(inv.uncond_embeddings).all() and torch.isfinite(inv.trajectory).all()


@pytest.fixture(scope="module")
def flow_pipes():
    return {"sd3": on_device(tiny_sd3_pipeline()), "flux": on_device(tiny_flux_pipeline()),
            "flux-dev": on_device(tiny_flux_pipeline(guidance_embeds=True)),
            "chroma": on_device(tiny_chroma_pipeline())}


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "flux-dev", "chroma"])
def test_every_family_gives_both_loops_one_denoiser(request, flow_pipes, name):
    pipe = flow_pipes[name] if name in flow_pipes else request.getfixturevalue(name)
    family = family_of(pipe)
    scheduler = family.inversion_schedule(STEPS, 32, 32, device=pipe.device)
    length = family.max_sequence_length({"max_sequence_length": 16} if family.takes_max_sequence_length else {})
    denoiser = family.denoiser(scheduler, height=32, width=32, max_sequence_length=length, device=pipe.device)
    cond, uncond = denoiser.encode(PROMPT), denoiser.negative()
    shape = (1, *family.latent_shape(32, 32))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.device, family.model.dtype)
    t = scheduler.timesteps[1]
    with torch.no_grad():
        rows = torch.cat([denoiser(x, t, uncond), denoiser(x, t, cond)])
        guided = denoiser(x.expand(2, -1, -1, -1), t, denoiser.batch(uncond, cond))  # a guided step's one call
        same = denoiser(x, t, cond.with_embeds(cond.embeds))
    assert rows.shape == (2, *shape[1:]) and rows.dtype == family.model.dtype
    torch.testing.assert_close(guided, rows, rtol=tolerance(1e-4), atol=tolerance(1e-5))
    assert torch.equal(same, rows[1:])
    assert (rows[1] - rows[0]).abs().max() > 1e-4  # the text conditions the output
