"""The shipped demo models: load offline as plain diffusers pipelines, follow captions, keep a blend's outside, run the demo.

"demo" is a StableDiffusionPipeline (UNet), "demo-flow" a StableDiffusion3Pipeline (joint attention, flow matching);
both share the shapes world and an AutoencoderTiny (no normalisation layer, so local changes stay local).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import prompt2prompt as p2p
from prompt2prompt.demo import MODEL_DIR, run_demo, world
from prompt2prompt.demo.parse import parse
from prompt2prompt.loading import DEMO_MODELS

MODELS = ("demo", "demo-flow")
BEFORE = 23_182_504  # bytes of the package's one demo model before the second one came (commit a3c7150)


@pytest.fixture(scope="module", params=MODELS)
def demo_pipe(request):
    from diffusers import DiffusionPipeline

    # No T5 on demo-flow: diffusers loads such an SD3 folder when told the T5 parts are None, as its docs show.
    absent = {"text_encoder_3": None, "tokenizer_3": None} if request.param == "demo-flow" else {}
    pipe = DiffusionPipeline.from_pretrained(DEMO_MODELS[request.param], torch_dtype=torch.float32,
                                             local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folders_are_small_fp16_safetensors():
    files = [f for name in MODELS for f in DEMO_MODELS[name].rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= BEFORE + 30 * 10**6  # the second model's budget: 30 MB
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights if f.is_relative_to(MODEL_DIR)} == {"unet", "vae", "text_encoder"}
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]
    from safetensors import safe_open

    for f in weights:
        with safe_open(str(f), framework="pt") as checkpoint:
            assert {checkpoint.get_tensor(k).dtype for k in checkpoint.keys()} == {torch.float16}


def test_the_unet_model_loads_with_sd_components_and_the_training_schedule(tokenizer, monkeypatch):
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderTiny)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert pipe.tokenizer.get_vocab() == tokenizer.get_vocab()
    unet = pipe.unet.config
    sides = {unet.sample_size // 2**i for i, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")}
    assert len(sides) >= 2  # cross-attention at two or more resolutions
    assert json.loads((MODEL_DIR / "training.json").read_text())["unet_steps"] > 0


def test_the_flow_model_loads_as_an_sd3_pipeline_without_t5(tokenizer, monkeypatch):
    from diffusers import (AutoencoderTiny, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = DEMO_MODELS["demo-flow"]
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32, local_files_only=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.vae, AutoencoderTiny)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer.get_vocab() == pipe.tokenizer_2.get_vocab() == tokenizer.get_vocab()
    assert json.loads((folder / "training.json").read_text())["flow_steps"] > 0
    editor = p2p.Editor.from_pretrained("demo-flow", device="cpu")
    assert editor.family.name == "sd3" and editor.self_blocks is not None  # its prompt2prompt.json's blocks


def test_plain_samples_follow_their_colour_word(demo_pipe):
    scenes = [world.sample_scene(50_000_000 + i, split="heldout", layout=("fixed", "free")[i % 2]) for i in range(8)]
    images = demo_pipe([s.caption() for s in scenes], num_inference_steps=20, guidance_scale=5.0,
                       generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))]).images
    right = sum(parse(image).find(scene.objects[0].color) is not None for scene, image in zip(scenes, images))
    backgrounds = sum(parse(image).background == scene.background for scene, image in zip(scenes, images))
    assert right >= 6 and backgrounds >= 7, (right, backgrounds)


@pytest.mark.parametrize("model", MODELS)
def test_a_local_blend_keeps_the_pixels_outside_its_mask(model):
    """The autoencoder's decoder has no normalisation over the picture: latents kept outside the mask decode to the
    same pixels there (a GroupNorm decoder moved every pixel by ~14/255 on average, about 25 dB)."""
    editor = p2p.Editor.from_pretrained(model, device="cpu", torch_dtype=torch.float32)
    source = "a big red circle on the left and a small blue star on the right on a white background"
    blend = p2p.LocalBlend(["red", "circle"], ["green", "circle"], threshold=editor.defaults.blend_threshold)
    edit = p2p.Edit(source.replace("red", "green"), blend=blend)
    result = editor.edit(source, [edit], seed=0, num_inference_steps=12)
    mask = torch.nn.functional.interpolate(result.masks[0].float()[None, None], size=(64, 64))[0, 0].numpy() > 0.5
    assert 0.02 < mask.mean() < 0.6  # the blend found a region, not everything
    before, after = (np.asarray(image.convert("RGB"), dtype=np.float32) for image in result.images)
    mse = float(np.mean((before - after)[~mask] ** 2))
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) >= 35


@pytest.mark.parametrize("model", MODELS)
def test_demo_writes_its_four_pictures(tmp_path, model):
    paths = run_demo(tmp_path / "demo", model=model, num_inference_steps=6)
    assert [p.name for p in paths] == ["demo_grid.png", "regenerate_vs_p2p.png", "local_blend.png", "attention.png"]
    grid = Image.open(paths[0])
    assert grid.width == 5 * 192  # the source and four edits side by side
    assert np.asarray(grid.convert("RGB")).std() > 10  # images, not blank tiles
    assert Image.open(paths[1]).width == Image.open(paths[2]).width == 3 * 192
    assert not list((tmp_path / "demo").glob("*.tmp*"))


def test_demo_refuses_a_file_as_output_folder(tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("")
    with pytest.raises(NotADirectoryError, match="not-a-folder"):
        run_demo(target)
