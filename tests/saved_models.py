"""Tiny pipelines saved to disk, as the CLI, the loader and the web app take them: a diffusers folder per session."""

from pathlib import Path

import pytest
from pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A saved tiny SD 1.x pipeline: 32 px images (16x16 latents), DDIM scheduler."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A saved tiny SDXL pipeline."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_pickle_dir(tmp_path_factory) -> Path:
    """The tiny SD 1.x pipeline saved with pickle (.bin) weights for its UNet and VAE, as old checkpoints are."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd-pickle"
    tiny_sd_pipeline().save_pretrained(folder, safe_serialization=False)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A saved tiny SD3 pipeline (CLIP x2 + T5, flow matching)."""
    from mmdit_pipelines import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A saved tiny Flux.1 pipeline."""
    from mmdit_pipelines import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chroma_dir(tmp_path_factory) -> Path:
    """A saved tiny Chroma pipeline (T5 alone, masked padding)."""
    from mmdit_pipelines import tiny_chroma_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-chroma"
    tiny_chroma_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory) -> Path:
    """A saved tiny PixArt-Σ pipeline (a cross-attention DiT, masked T5 padding)."""
    from mmdit_pipelines import tiny_pixart_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-pixart"
    tiny_pixart_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen-Image pipeline. Loaded again, it drops the pipeline's own 34 template tokens, fewer than this
    tokenizer's template prefix takes: its kept text starts inside the template."""
    from qwen_pipelines import tiny_qwenimage_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-qwenimage"
    tiny_qwenimage_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux2_klein_dir(tmp_path_factory) -> Path:
    """A saved tiny FLUX.2 klein pipeline (base: true CFG on the empty prompt)."""
    from flux2_pipelines import tiny_flux2_klein_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-flux2-klein"
    tiny_flux2_klein_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux2_dev_dir(tmp_path_factory) -> Path:
    """A saved tiny FLUX.2 dev pipeline (embedded guidance; its Mistral text padded on the left)."""
    from flux2_pipelines import tiny_flux2_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-flux2-dev"
    tiny_flux2_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory) -> Path:
    """A saved tiny Z-Image pipeline (image-first single stream after its refiners; CFG at any guidance above 0)."""
    from zimage_pipelines import tiny_zimage_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-zimage"
    tiny_zimage_pipeline().save_pretrained(folder)
    return folder
