"""Tiny, randomly initialised Stable Diffusion pipelines built from configs, for tests and benchmarks."""

import contextlib
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip-tokenizer"


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, derived offline from open_clip's vocabulary."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def _text_encoder(hidden: int, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()


def _scheduler(**kwargs) -> DDIMScheduler:
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    config.update(kwargs)
    return DDIMScheduler(**config)


def tiny_sd_pipeline(seed: int = 0, **scheduler_kwargs) -> StableDiffusionPipeline:
    """An SD-1.x-shaped pipeline: cross-attention at three resolutions (latent side, /2, /4)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(seed), text_encoder=_text_encoder(32, seed=seed), tokenizer=clip_tokenizer(),
        scheduler=_scheduler(**scheduler_kwargs), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two text encoders, pooled embeddings and added time ids."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(seed), text_encoder=_text_encoder(32, seed=seed), tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(32, projection=True, seed=seed + 1), tokenizer_2=clip_tokenizer(),
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _on(device):
    """Build a big random model directly on `device`: random init of billions of parameters is slow on a CPU."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def _cast(pipe, device, dtype):
    """The pipeline on `device` in `dtype` (each as is where None), without a progress bar."""
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_random_pipeline(seed: int = 0, device=None, dtype=None) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture with random weights: the cost of a real model, no download.

    With `device` the modules are built there (same architecture, other random values than a CPU build).
    """
    torch.manual_seed(seed)
    with _on(device):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, cross_attention_dim=768,
            attention_head_dim=8,
        ).eval()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        ).eval()
        text = CLIPTextModel(_clip_l_config()).eval()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _cast(pipe, device, dtype)


def _clip_l_config() -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower: SD 1.x's text encoder and SDXL's first."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)


def sdxl_random_pipeline(seed: int = 0, device=None, dtype=None) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture with random weights (2.6B-parameter UNet, CLIP-L and OpenCLIP-bigG text
    encoders, 1024 px), no download. Build it with `device="cuda"`: on a CPU its random init takes minutes."""
    torch.manual_seed(seed)
    with _on(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ).eval()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024, scaling_factor=0.13025,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, force_upcast=True,
        ).eval()
        text = CLIPTextModel(_clip_l_config()).eval()
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        )).eval()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), text_encoder_2=text_2,
        tokenizer_2=clip_tokenizer(), scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _cast(pipe, device, dtype)
