"""Tiny, randomly initialised Z-Image pipelines (diffusers' `ZImagePipeline`), for tests and benchmarks.

Built fully in-process, as `qwen_pipelines` builds Qwen-Image: a Qwen3 text encoder from a config, and the byte-level
BPE tokenizer trained there (`qwen_tokenizer`) with Qwen3's `<think>` tokens and a chat template of Qwen3's structure.

The text: each prompt is wrapped as one user message with `add_generation_prompt=True, enable_thinking=True`,

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

(no `<think>` block: Qwen3 adds an empty one only when `enable_thinking` is False), zero-padded to
`max_sequence_length` (512), and encoded by the language model; the pipeline keeps the second-to-last hidden state
(`hidden_states[-2]`: the output of the next-to-last decoder layer, before the final norm) and nothing is dropped
but the padding: each prompt is a `(tokens, width)` tensor of its own length, template included (4 + prompt + 8
tokens here: "user" is two pieces, "assistant" four, as in `qwen_pipelines`).

The joint sequence, per row: `[image tokens, caption tokens]`. Before it, the image tokens alone pass the
`noise_refiner` blocks and the caption alone the `context_refiner` blocks. Each part is padded to a multiple of 32
(with the learned `x_pad_token` / `cap_pad_token`, which are attended), rows to the longest with a boolean key mask.
RoPE positions (3 axes): caption token k at (1 + k, 0, 0), its pads continuing; the image token (h, w) at
(padded caption length + 1, h, w), so a caption padded to 64 instead of 32 moves every image token.
"""

import contextlib

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from mmdit_pipelines import _FLUX_VAE, _vae
from pipelines import _cast, _on
from qwen_pipelines import QWEN3_CHAT_TEMPLATE, _default_dtype, qwen_tokenizer
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model


# Z-Image-Turbo's published transformer config (transformer/config.json); diffusers' class default for axes_lens is
# (1024, 512, 512), the published one (1536, 512, 512).
ZIMAGE_TURBO = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512),
)


def zimage_tokenizer() -> Qwen2TokenizerFast:
    """`qwen_tokenizer` with Qwen3's `<think>` / `</think>` (added, not special) and the chat template above."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text `ZImagePipeline._encode_prompt` tokenizes for `prompt`."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def caption_length(pipe: ZImagePipeline, prompt: str) -> int:
    """How many caption tokens (rows of its prompt embedding) the pipeline gives the transformer for `prompt`."""
    return len(pipe.tokenizer(chat_prompt(pipe.tokenizer, prompt))["input_ids"])


def padded_length(tokens: int) -> int:
    """The caption's (or image's) length in the transformer: `tokens` rounded up to a multiple of 32."""
    return tokens + (-tokens) % 32


def _text_encoder(vocab_size: int, hidden: int, *, layers: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int, seed: int) -> Qwen3Model:
    """A Qwen3 model (no LM head, as the pipeline loads it) of width `hidden`: the caption features' width. The
    pipeline reads `hidden_states[-2]`, so with two layers the first layer's output is the caption."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
    )
    return Qwen3Model(config).eval()


def _transformer(seed: int, **config) -> ZImageTransformer2DModel:
    """A `ZImageTransformer2DModel` with random pad tokens (the class starts them at zero; the real ones are
    learned, and a zero pad would add nothing but weight to the softmax)."""
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return transformer


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Z-Image-Turbo's published scheduler: a static shift of 3, no resolution-dependent shift (the `mu` the
    pipeline passes is ignored); the pipeline passes sigmas linspace(1, 1/n, n)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def _pipeline(transformer, vae, text_encoder, tokenizer) -> ZImagePipeline:
    pipe = ZImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """A Z-Image-shaped pipeline: 2 main blocks, 2 noise- and 2 context-refiner blocks, each 2 heads x 16 (RoPE axes
    4 + 6 + 6, the real 32:48:48), caption width 32 from a 2-layer Qwen3, 16 latent channels.

    At 32 px: VAE factor 2 (the pipeline asks for sizes divisible by 4) gives 16x16 latents, 2x2 patches an 8x8 grid
    of 64 image tokens (a multiple of 32: no image pad); "a red cat" is 15 caption tokens, padded to 32.
    """
    tokenizer = zimage_tokenizer()
    text_encoder = _text_encoder(len(tokenizer), 32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                                 seed=seed + 1)
    config = dict(ZIMAGE_TURBO, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(4, 6, 6))
    transformer = _transformer(seed, **config)
    return _pipeline(transformer, _vae(16, seed=seed, **_FLUX_VAE), text_encoder, tokenizer)


def zimage_benchmark_pipeline(depth: int = 1, seed: int = 0, *, device=None, dtype=None) -> ZImagePipeline:
    """For benchmarks: Z-Image-Turbo's transformer at its real width with `depth` of its 30 main blocks.

    Each block: 30 heads x 128 (3840 wide, feed-forward 10240), RoPE axes (32, 48, 48), 2x2 patches of 16 latent
    channels; about 181M parameters (0.72 GB in float32) a block, and the two noise- and two context-refiner blocks
    are kept (4 more). Caption width 2560 from a Qwen3 of Qwen3-4B's width (32 heads and 8 key/value heads of 128)
    with two layers (the pipeline reads the next-to-last hidden state) of feed-forward 256. The VAE is small but has
    the real factor 8 and 16 latent channels, so a 1024 px image has the real 64x64 grid of image tokens.

    With `device` the modules are built there, and with `dtype` the transformer is built in it (the rest is cast):
    the full 34 blocks take about 25 GB in float32, 12.3 GB in bfloat16.
    """
    tokenizer = zimage_tokenizer()
    with _on(device):
        text_encoder = _text_encoder(len(tokenizer), 2560, layers=2, heads=32, kv_heads=8, head_dim=128,
                                     intermediate=256, seed=seed + 1)
        with _default_dtype(dtype):
            transformer = _transformer(seed, **dict(ZIMAGE_TURBO, n_layers=depth))
        vae = _vae(16, (8, 8, 16, 16), seed=seed, **_FLUX_VAE)
    return _cast(_pipeline(transformer, vae, text_encoder, tokenizer), device, dtype)


@contextlib.contextmanager
def wrapped_patchify(transformer, wrap):
    """`transformer.patchify_and_embed` replaced by `wrap(original)` on the instance, then as it was."""
    before = transformer.__dict__.get("patchify_and_embed")
    transformer.patchify_and_embed = wrap(transformer.patchify_and_embed)
    try:
        yield
    finally:
        if before is None:
            del transformer.patchify_and_embed
        else:
            transformer.patchify_and_embed = before


def image_positions_after(transformer, padded: int):
    """Every row's image tokens at axis-0 position `padded + 1`, as after a caption padded to `padded`; the image's
    own pad tokens stay at (0, 0, 0). One wrapped method: the engine's way to one image position per run."""

    def wrap(original):
        def patchify(*args, **kwargs):
            images, captions, sizes, image_pos, caption_pos, image_pads, caption_pads = original(*args, **kwargs)
            moved = []
            for pos, pads, caption in zip(image_pos, image_pads, captions):
                shift = torch.tensor([padded - len(caption), 0, 0], dtype=pos.dtype)
                moved.append(torch.where(pads[:, None], pos, pos + shift))
            return images, captions, sizes, moved, caption_pos, image_pads, caption_pads
        return patchify

    return wrapped_patchify(transformer, wrap)
