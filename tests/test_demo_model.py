"""The shipped demo model: loads offline as a plain StableDiffusionPipeline, follows captions, runs the demo."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.demo import MODEL_DIR, run_demo
from prompt2prompt.demo.parse import parse


@pytest.fixture(scope="module")
def demo_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_fp16_safetensors():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "text_encoder"}
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]
    from safetensors import safe_open

    for f in weights:
        with safe_open(str(f), framework="pt") as checkpoint:
            assert {checkpoint.get_tensor(k).dtype for k in checkpoint.keys()} == {torch.float16}


def test_loads_offline_with_sd_components_and_the_training_schedule(demo_pipe, tokenizer, monkeypatch):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(demo_pipe.unet, UNet2DConditionModel) and isinstance(demo_pipe.vae, AutoencoderKL)
    assert isinstance(demo_pipe.text_encoder, CLIPTextModel) and isinstance(demo_pipe.scheduler, DDIMScheduler)
    config = demo_pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert demo_pipe.tokenizer.get_vocab() == tokenizer.get_vocab()
    unet = demo_pipe.unet.config
    sides = {unet.sample_size // 2**i for i, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")}
    assert len(sides) >= 2  # cross-attention at two or more resolutions
    assert json.loads((MODEL_DIR / "training.json").read_text())["unet_steps"] > 0


def test_plain_samples_follow_their_colour_word(demo_pipe):
    from prompt2prompt.demo import world

    scenes = [world.sample_scene(50_000_000 + i, split="heldout") for i in range(8)]
    images = demo_pipe([s.caption() for s in scenes], num_inference_steps=20, guidance_scale=5.0,
                       generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))]).images
    right = sum(parse(image).find(scene.objects[0].color) is not None for scene, image in zip(scenes, images))
    backgrounds = sum(parse(image).background == scene.background for scene, image in zip(scenes, images))
    assert right >= 6 and backgrounds >= 7, (right, backgrounds)


def test_demo_writes_its_three_pictures(tmp_path):
    paths = run_demo(tmp_path / "demo", num_inference_steps=8)
    assert [p.name for p in paths] == ["demo_grid.png", "attention.png", "local_blend.png"]
    grid = Image.open(paths[0])
    assert grid.width == 5 * 192  # the source and four edits side by side
    pixels = np.asarray(grid.convert("RGB"))
    assert pixels.std() > 10  # images, not blank tiles
    assert Image.open(paths[2]).width == 3 * 192
    assert not list((tmp_path / "demo").glob("*.tmp*"))


def test_demo_refuses_a_file_as_output_folder(tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("")
    with pytest.raises(NotADirectoryError, match="not-a-folder"):
        run_demo(target)
