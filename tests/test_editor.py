"""The Editor on tiny random SD 1.x and SDXL pipelines: what the conformance suite does not cover (schedulers, sizes,
recorded maps, latents, errors).

fused == explicit, the source and no-op rows == plain generation, batches and local blending for every edit case
and family are in test_conformance.py.
"""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

import prompt2prompt as p2p
from conftest import on_device, rel_err, tolerance
from test_conformance import CASES, SIZE, SOURCE, plain, run


def test_fused_equals_explicit_non_square(sd_pipe):
    fused = run(sd_pipe, CASES["mixed"], height=32, width=48)
    explicit = run(sd_pipe, CASES["mixed"], attention="explicit", height=32, width=48)
    assert fused.images.shape == (4, 4, 16, 24)
    assert rel_err(fused.images, explicit.images) <= tolerance()


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler, PNDMScheduler])
def test_schedulers(scheduler, sd_pipe):
    from pipelines import tiny_sd_pipeline

    pipe = on_device(tiny_sd_pipeline())
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    edits = CASES["blend"]
    fused, explicit = run(pipe, edits), run(pipe, edits, attention="explicit")
    assert rel_err(fused.images, explicit.images) <= tolerance()
    assert rel_err(fused.images[0], plain(pipe, SOURCE)) <= tolerance()


def test_edit_changes_the_output(sd_pipe):
    edited = run(sd_pipe, [p2p.Edit("a dog riding a bicycle")]).images[1]
    assert rel_err(edited, plain(sd_pipe, "a dog riding a bicycle")) > 1e-3


def test_processors_are_restored_even_after_an_error(sd_pipe):
    sentinel = dict(sd_pipe.unet.attn_processors)
    run(sd_pipe, CASES["replace"])
    assert dict(sd_pipe.unet.attn_processors) == sentinel

    def boom(pipe, i, t, kwargs):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        run(sd_pipe, CASES["replace"], callback_on_step_end=boom)
    assert dict(sd_pipe.unet.attn_processors) == sentinel


def test_latents_argument_and_per_prompt_latents(sd_pipe):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    shared = run(sd_pipe, CASES["replace"], seed=None, latents=x).images
    assert rel_err(shared, run(sd_pipe, CASES["replace"]).images) <= tolerance(1e-5)
    per_prompt = run(sd_pipe, CASES["replace"], seed=None, latents=torch.cat([x, torch.randn_like(x)]))
    assert per_prompt.images.shape == (2, 4, 16, 16)


def test_record_attention_and_heatmaps(sd_pipe):
    result = run(sd_pipe, CASES["refine"], record_attention=[16, 4], output_type="pil")
    assert set(result.attention) == {16, 4}
    maps = result.attention[4]
    assert maps.shape == (2, 4, 4, 77)
    # averaged softmax rows: the source's maps still sum to one over the 77 tokens
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, 4), rtol=tolerance(), atol=tolerance())
    images = p2p.attention_heatmaps(result, prompt_index=1)
    assert len(images) == len(result.tokens[1]) - 2
    assert result.tokens[1][1:3] == ["a", "black"]


def test_pil_output_and_negative_prompt(sd_pipe):
    result = run(sd_pipe, CASES["replace"], output_type="pil", negative_prompt="blurry")
    assert len(result.images) == 2 and result.images[0].size == (32, 32)


@pytest.mark.parametrize(
    "edits, kwargs, message",
    [
        ([p2p.Edit("a dog riding a bike today", mode="replace")], {}, "same number of words"),
        ([p2p.Edit("a dog riding a bicycle", weights={"lion": 2.0})], {}, "'lion'"),
        ([p2p.Edit("a dog riding a bicycle", cross_steps={"default": 0.8, "lion": 0.4})], {}, "'lion'"),
        ([p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("squirrel", "dog"))], {}, "'squirrel'"),
        ([p2p.Edit(" ".join(["dog"] * 80))], {}, "77"),
        (CASES["replace"], {"seed": 1, "generator": torch.Generator()}, "seed or generator"),
        (CASES["replace"], {"latents": torch.randn(3, 4, 16, 16)}, "latents must have shape"),
        (CASES["replace"], {"height": 30}, "multiples of"),
        (CASES["replace"], {"prompt_embeds": torch.zeros(1)}, "set by the editor"),
        (CASES["replace"], {"record_attention": 5}, "not a layer side"),
        (CASES["replace"], {"num_inference_steps": 0}, "positive integer"),
        (CASES["replace"], {"seed": None, "latents": torch.full((1, 4, 16, 16), float("nan"))}, "NaN or infinite"),
        (CASES["replace"], {"seed": None, "latents": torch.full((1, 4, 16, 16), 1e30)}, "beyond a Gaussian"),
        (CASES["replace"], {"seed": None, "latents": torch.zeros((1, 4, 16, 16), device="meta")}, "meta device"),
        (CASES["replace"], {"num_inference_steps": 10**30}, "at most 1000"),
        (CASES["replace"], {"guidance_scale": 1e30}, "guidance_scale must be a finite number from -100 to 100"),
        (CASES["replace"], {"seed": None, "latents": torch.zeros((1, 4, 16, 16), dtype=torch.long)}, "floating-point"),
    ],
)
def test_bad_input_gets_a_clear_error(sd_pipe, edits, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        run(sd_pipe, edits, **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: p2p.Edit("a dog", mode="swap"), "mode"),
        (lambda: p2p.Edit("a dog", cross_steps=(0.9, 0.1)), "starts after it ends"),
        (lambda: p2p.Edit("a dog", self_steps=1.2), "outside"),
        (lambda: p2p.Edit("a dog", weights={"dog": "big"}), "finite number"),
        (lambda: p2p.Edit("a dog", weights={"dog": 10**400}), "finite number"),  # no OverflowError
        (lambda: p2p.Edit("a dog", weights={"dog": 1e39}), r"outside \[-100, 100\]"),
        (lambda: p2p.Edit(""), "non-empty"),
        (lambda: p2p.LocalBlend("cat", "dog", threshold=2), "threshold"),
        (lambda: p2p.LocalBlend("cat", 3.5), "edit_words"),
        (lambda: p2p.Editor(object()), "Editor needs a Stable Diffusion 1.x, 2.x and XL, .*, Chroma, PixArt-Σ, Qwen-Image, FLUX.2 klein, FLUX.2 dev or Z-Image pipeline"),
    ],
)
def test_bad_arguments_are_refused_at_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_blend_resolution_without_cross_attention_is_refused(sdxl_pipe):
    editor = p2p.Editor(sdxl_pipe, blend_res=16)  # the tiny SDXL UNet has no cross-attention at its first level
    with pytest.raises(ValueError, match="no cross-attention at side 16"):
        editor.edit(SOURCE, CASES["blend"], num_inference_steps=2, seed=0, output_type="latent", **SIZE)


def test_attention_is_recorded_without_edits(sd_pipe):
    result = run(sd_pipe, [], record_attention=True)
    assert result.images.shape[0] == 1
    assert result.attention[4].shape == (1, 4, 4, 77)
    assert rel_err(result.images[0], plain(sd_pipe, SOURCE)) <= tolerance()


def test_default_blend_level_falls_back_to_the_nearest_with_cross_attention():
    from diffusers import UNet2DConditionModel
    from pipelines import tiny_sd_pipeline

    pipe = on_device(tiny_sd_pipeline())
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().to(pipe.device, pipe.dtype)
    result = run(pipe, CASES["blend"])
    assert result.masks[0].shape == (16, 16)
    with pytest.raises(ValueError, match="no cross-attention at side 4"):
        p2p.Editor(pipe, blend_res=4).edit(SOURCE, CASES["blend"], num_inference_steps=2, seed=0, output_type="latent", **SIZE)


def test_inversion_guidance_and_negative_prompt_are_checked(sd_pipe):
    from PIL import Image

    editor = p2p.Editor(sd_pipe)
    inv = editor.invert(Image.new("RGB", (32, 32), "red"), SOURCE, method="direct", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale=7.5"):
        editor.edit(SOURCE, CASES["replace"], inversion=inv, guidance_scale=3.0, output_type="latent")
    with pytest.raises(ValueError, match="negative_prompt cannot be used"):
        editor.edit(SOURCE, CASES["replace"], inversion=inv, negative_prompt="blurry", output_type="latent")


@pytest.mark.parametrize("pipe_name", ["sd_pipe", "sdxl_pipe"])
def test_images_are_finite_and_not_black(request, pipe_name):
    # In float16, SDXL's VAE must decode upcast (force_upcast) or it overflows to NaN, which PIL shows as black.
    pipe = request.getfixturevalue(pipe_name)
    images = run(pipe, CASES["mixed"], output_type="np").images
    assert images.shape == (4, 32, 32, 3)
    assert np.isfinite(images).all()
    assert images.reshape(4, -1).max(-1).min() > 0.05  # every image has some light in it


def test_results_live_where_the_user_reads_them(sd_pipe):
    result = run(sd_pipe, CASES["blend"], record_attention=True)
    assert result.images.device == sd_pipe.device and result.images.dtype == sd_pipe.unet.dtype  # like diffusers'
    assert all(m.device.type == "cpu" for m in result.masks.values())
    assert all(a.device.type == "cpu" and a.dtype == torch.float32 for a in result.attention.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, not nan"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number, not inf"),
        ({"guidance_scale": 10**400}, "guidance_scale must be a finite number"),
        ({"guidance_scale": "7.5"}, "guidance_scale must be a finite number"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"seed": 2**64}, "seed must be an integer from 0"),
        ({"height": 0}, "positive integers"),
        ({"height": 32.0}, "positive integers"),
        ({"height": 256, "width": 256}, "more than 4 times this model's native 32x32"),
        ({"negative_prompt": " ".join(["blurry"] * 80)}, "the negative prompt .* is 82 tokens long"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
    ],
)
def test_settings_that_cannot_render_are_refused_before_any_compute(sd_pipe, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        p2p.Editor(sd_pipe).prepare(SOURCE, CASES["replace"], num_inference_steps=2, **{**SIZE, **kwargs})


def test_a_long_negative_prompt_is_refused_by_either_sdxl_tokenizer(sdxl_pipe):
    with pytest.raises(ValueError, match="the negative prompt .* more than the text encoder's 77"):
        p2p.Editor(sdxl_pipe).prepare(SOURCE, [], negative_prompt="blurry " * 80, num_inference_steps=2, **SIZE)
    p2p.Editor(sdxl_pipe).prepare(SOURCE, [], negative_prompt="blurry " * 10, num_inference_steps=2, **SIZE)


def test_runs_of_whitespace_in_api_prompts_make_no_empty_word(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    options = dict(num_inference_steps=2, seed=0, **SIZE)
    edit = p2p.Edit("a dog riding  a\tbicycle", weights={"bicycle": 2.0}, cross_steps={"default": 0.8, 4: 0.5})
    spaced = editor.prepare("  a  cat riding a bicycle\n", [edit], **options)
    single = editor.prepare(SOURCE, [p2p.Edit("a dog riding a bicycle", weights={"bicycle": 2.0},
                                              cross_steps={"default": 0.8, 4: 0.5})], **options)
    assert spaced.plan.replace == single.plan.replace == (True,)  # five words each: a word swap
    for name in ("mapper", "weights", "cross"):
        assert torch.equal(getattr(spaced.plan, name), getattr(single.plan, name)), name


def test_a_run_that_diverges_is_an_error_not_black_images(sd_pipe, monkeypatch):
    monkeypatch.setenv("P2P_ALLOW_LARGE", "1")  # lifts the guidance bound, so that the run overflows
    for output_type in ("pil", "np"):
        with pytest.raises(RuntimeError, match="NaN/inf"):
            run(sd_pipe, CASES["replace"], guidance_scale=1e30, output_type=output_type)
    assert p2p.Editor(sd_pipe).prepare(SOURCE, CASES["replace"], num_inference_steps=1001).num_inference_steps == 1001


def test_a_cross_steps_key_that_is_no_word_is_refused_at_once():
    with pytest.raises(TypeError, match="cross_steps keys are 'default', words or word positions, not None"):
        p2p.Edit("a dog riding a bicycle", cross_steps={None: 0.4})


def test_a_misspelt_pipeline_keyword_is_refused_with_the_close_match(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    with pytest.raises(ValueError, match="StableDiffusionPipeline takes no keyword 'guidance_rescal'; did you mean "
                                         "'guidance_rescale'"):
        editor.prepare(SOURCE, ["a dog riding a bicycle"], guidance_rescal=0.7, **SIZE)



def test_run_sends_what_prepare_checked_and_takes_no_new_setting(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    run = editor.prepare(SOURCE, ["a dog riding a bicycle"], num_inference_steps=2, seed=0, **SIZE)
    with pytest.raises(ValueError, match=r"run\(\) sends a run as prepare\(\) built and checked it; pass eta, "
                                         r"guidance_rescale to prepare\(\)"):
        editor.run(run, guidance_rescale=0.7, eta=0.5)


def test_a_text_length_changed_at_send_time_is_refused_not_run_on_the_prepared_plan():
    from mmdit_pipelines import tiny_sd3_pipeline

    editor = p2p.Editor(on_device(tiny_sd3_pipeline()))
    run = editor.prepare(SOURCE, ["a dog riding a bicycle"], num_inference_steps=2, seed=0, max_sequence_length=16,
                         **SIZE)
    assert run.text_length == 77 + 16  # the plan's text slices are for the prepared T5 length
    with pytest.raises(ValueError, match="pass max_sequence_length to prepare"):
        editor.run(run, max_sequence_length=32)
