"""A cached source: later edits run only their own rows and give the images of a fresh run."""

import numpy as np
import pytest
import torch
from conftest import on_device, tolerance
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

import prompt2prompt as p2p
from prompt2prompt.inversion import invert

SOURCE = "a cat riding a bicycle"
STEPS = 4
SETTINGS = dict(num_inference_steps=STEPS, height=32, width=32)

EDITS = {
    "replace": [p2p.Edit("a dog riding a bicycle")],
    "replace-multi-token": [p2p.Edit("a lasagne riding a bicycle", self_steps=(0.25, 0.75))],
    "refine": [p2p.Edit("a black cat riding a red bicycle")],
    "reweight-negative": [p2p.Edit(SOURCE, weights={"cat": -0.5, "bicycle": 2.0})],
    "word-windows": [p2p.Edit("a dog riding a bicycle", cross_steps={"default": 0.5, "dog": (0.25, 1.0)}, self_steps=0.5)],
    "blend-exclude": [p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend(
        "cat", "dog", threshold=0.5, start=0.25, exclude_source_words="bicycle", exclude_edit_words=["bicycle"]))],
    "mixed": [
        p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("cat", "dog", threshold=0.5)),
        p2p.Edit("a cat riding a rusty bicycle", mode="refine", weights={"rusty": 2.0}),
        p2p.Edit(SOURCE, weights={"riding": -1.0}),
    ],
}


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def fresh_and_cached(editor, edits, **settings):
    """The images (decoded, in [0, 1]) of a fresh run and of a run on a cached source."""
    fresh = editor.edit(SOURCE, edits, output_type="pt", **settings)
    cache = editor.cache_source(SOURCE, **settings)
    kept = {k: v for k, v in settings.items() if k not in ("seed", "latents", "generator", "inversion")}
    cached = editor.edit(SOURCE, edits, cache=cache, output_type="pt", **kept)
    return fresh, cached, cache


@pytest.mark.parametrize("case", sorted(EDITS))
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_a_cached_source_gives_the_fresh_images(sd_pipe, case, guidance):
    fresh, cached, _ = fresh_and_cached(p2p.Editor(sd_pipe), EDITS[case], seed=0, guidance_scale=guidance, **SETTINGS)
    assert cached.images.shape == fresh.images.shape
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())
    assert set(cached.masks) == set(fresh.masks)
    for e in fresh.masks:
        assert torch.equal(cached.masks[e], fresh.masks[e])


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sdxl_cached_source(sdxl_pipe, guidance):
    fresh, cached, _ = fresh_and_cached(p2p.Editor(sdxl_pipe), EDITS["mixed"], seed=0, guidance_scale=guidance, **SETTINGS)
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())


@pytest.mark.parametrize("method", ["null-text", "direct", "negative-prompt"])
def test_a_cached_inverted_source(sd_pipe, method):
    rng = np.random.default_rng(0)
    image = (np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8)
    editor = p2p.Editor(sd_pipe)
    inv = invert(sd_pipe, image, SOURCE, method=method, num_inference_steps=STEPS, num_inner_steps=2, progress=False)
    fresh = editor.edit(SOURCE, EDITS["mixed"], inversion=inv, output_type="latent")
    cache = editor.cache_source(SOURCE, inversion=inv)
    cached = editor.edit(SOURCE, EDITS["mixed"], cache=cache, output_type="latent")
    bound = tolerance(1e-4, scale=fresh.images.abs().max().item())
    if method == "direct":
        # The direct source row is the guided step plus (pivot - the inversion's guided step). A cached source
        # is computed in a batch like the inversion's, so it lands on the pivot to float precision; a fresh
        # run's batch also holds the edits, whose other rounding this random UNet at guidance 7.5 amplifies
        # to about 1e-3. So each source row is held to the pivot, and the edit rows to each other.
        assert max_diff(cached.images[0], inv.trajectory[0, 0]) <= tolerance(1e-6, scale=bound)
        assert max_diff(fresh.images[0], inv.trajectory[0, 0]) <= max(3e-3, bound)
        assert max_diff(cached.images[1:], fresh.images[1:]) <= bound
    else:
        assert max_diff(cached.images, fresh.images) <= bound
    with pytest.raises(ValueError, match="another inversion"):
        editor.prepare(SOURCE, EDITS["replace"], cache=cache, inversion=invert(
            sd_pipe, image, SOURCE, method="ddim", num_inference_steps=STEPS, progress=False))


def test_a_cached_run_computes_only_the_edit_rows(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    cache = editor.cache_source(SOURCE, seed=0, **SETTINGS)
    batches = []
    hook = sd_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        result = editor.edit(SOURCE, EDITS["mixed"], cache=cache, output_type="pil")
    finally:
        hook.remove()
    assert batches == [2 * 3] * STEPS  # three edits, guided: no source row, conditional or not
    assert len(result.images) == 4 and result.prompts[0] == SOURCE
    fresh = editor.edit(SOURCE, EDITS["mixed"], seed=0, output_type="pil", **SETTINGS)
    for got, expected in zip(result.images, fresh.images):  # rounding to 8 bits may move a value by one step
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_recorded_attention_through_a_cache(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    fresh = editor.edit(SOURCE, EDITS["refine"], seed=0, record_attention=[16, 4], output_type="latent", **SETTINGS)
    cache = editor.cache_source(SOURCE, seed=0, record_attention=[16, 4], **SETTINGS)
    cached = editor.edit(SOURCE, EDITS["refine"], cache=cache, record_attention=[16, 4], output_type="latent")
    assert set(cached.attention) == {16, 4}
    for side in (16, 4):
        assert max_diff(cached.attention[side], fresh.attention[side]) <= tolerance(1e-5)
    with pytest.raises(ValueError, match=r"sides \[8\].*did not record"):
        editor.prepare(SOURCE, EDITS["refine"], cache=cache, record_attention=8)


def test_the_cache_says_its_size_and_can_live_on_the_cpu(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    cache = editor.cache_source(SOURCE, seed=0, device="cpu", **SETTINGS)
    assert cache.device.type == "cpu"
    q, k = next(iter(cache.evaluations[0].values()))
    assert q.device.type == "cpu" and k.device.type == "cpu"
    assert cache.nbytes > cache.step_latents.numel() * cache.step_latents.element_size()
    fresh = editor.edit(SOURCE, EDITS["replace"], seed=0, output_type="latent", **SETTINGS)
    cached = editor.edit(SOURCE, EDITS["replace"], cache=cache, output_type="latent")
    assert cached.images.device == fresh.images.device
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())


def test_the_source_alone_from_a_cache(sd_pipe):
    editor = p2p.Editor(sd_pipe)
    cache = editor.cache_source(SOURCE, seed=0, **SETTINGS)
    alone = editor.edit(SOURCE, [], cache=cache, output_type="latent")
    fresh = editor.edit(SOURCE, [], seed=0, output_type="latent", **SETTINGS)
    assert alone.images.shape == (1, 4, 16, 16)
    assert max_diff(alone.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 5}, "num_inference_steps=5"),
        ({"guidance_scale": 3.0}, "guidance_scale=3.0"),
        ({"height": 48}, "height=48"),
        ({"negative_prompt": "blurry"}, "negative_prompt='blurry'"),
        ({"seed": 1}, "supplies the initial latent"),
        ({"eta": 0.5}, "pipeline_kwargs"),
    ],
)
def test_a_run_that_differs_from_its_cache_is_refused(sd_pipe, kwargs, message):
    editor = p2p.Editor(sd_pipe)
    cache = editor.cache_source(SOURCE, seed=0, **SETTINGS)
    with pytest.raises(ValueError, match=message):
        editor.prepare(SOURCE, EDITS["replace"], cache=cache, **kwargs)


def test_other_misuses_of_a_cache_are_refused(sd_pipe, sdxl_pipe):
    editor = p2p.Editor(sd_pipe)
    cache = editor.cache_source(SOURCE, seed=0, **SETTINGS)
    with pytest.raises(ValueError, match="of the prompt 'a cat riding a bicycle'"):
        editor.prepare("a cat riding a horse", EDITS["replace"], cache=cache)
    with pytest.raises(ValueError, match="another pipeline"):
        p2p.Editor(sdxl_pipe).prepare(SOURCE, EDITS["replace"], cache=cache)
    with pytest.raises(ValueError, match="self_max_side"):
        p2p.Editor(sd_pipe, self_replace_max_res=8).prepare(SOURCE, EDITS["replace"], cache=cache)
    with pytest.raises(TypeError, match="SourceCache"):
        editor.prepare(SOURCE, EDITS["replace"], cache="cache")


def test_stochastic_schedulers_cannot_be_cached():
    from pipelines import tiny_sd_pipeline

    pipe = on_device(tiny_sd_pipeline())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="draws noise at every step"):
        p2p.Editor(pipe).cache_source(SOURCE, seed=0, **SETTINGS)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # deterministic: fine
    fresh, cached, _ = fresh_and_cached(p2p.Editor(pipe), EDITS["blend-exclude"], seed=0, **SETTINGS)
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())


# -- SD3, SD3.5 and Flux: inverted sources and Flux's true CFG ------------------------------------------------------

from mmdit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd35_pipeline  # noqa: E402

MMDIT = dict(num_inference_steps=STEPS, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def mmdit_pipes():
    return {"sd3": on_device(tiny_sd3_pipeline()), "sd35": on_device(tiny_sd35_pipeline()),
            "flux": on_device(tiny_flux_pipeline())}


@pytest.mark.parametrize("method", ["direct", "euler"])
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_a_cached_inverted_mmdit_source(mmdit_pipes, family, method):
    pipe = mmdit_pipes[family]
    image = np.random.default_rng(0).random((32, 32, 3))
    inv = invert(pipe, image, SOURCE, method=method, progress=False, **MMDIT)
    editor = p2p.Editor(pipe)
    fresh = editor.edit(SOURCE, EDITS["mixed"], inversion=inv, output_type="pt")
    cache = editor.cache_source(SOURCE, inversion=inv)
    cached = editor.edit(SOURCE, EDITS["mixed"], cache=cache, output_type="pt")
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())
    assert cache.nbytes > 0 and cache.inversion is not None


def test_flux_true_cfg_cached_source(mmdit_pipes):
    editor = p2p.Editor(mmdit_pipes["flux"])
    settings = dict(seed=0, true_cfg_scale=4.0, negative_prompt="blurry", **MMDIT)
    fresh, cached, _ = fresh_and_cached(editor, EDITS["mixed"], **settings)
    assert max_diff(cached.images, fresh.images) <= tolerance(1e-4, scale=fresh.images.abs().max().item())


def test_an_mmdit_cache_refuses_other_blocks(mmdit_pipes):
    cache = p2p.Editor(mmdit_pipes["sd3"]).cache_source(SOURCE, seed=0, **MMDIT)
    with pytest.raises(ValueError, match="self_blocks"):
        p2p.Editor(mmdit_pipes["sd3"], self_blocks=[0]).edit(SOURCE, EDITS["replace"], cache=cache)
