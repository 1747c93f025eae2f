"""Tiny, randomly initialised Qwen-Image pipelines (diffusers' `QwenImagePipeline`), for tests and benchmarks.

Built fully in-process, as `mmdit_pipelines` builds the SD3 and Flux ones: a Qwen2.5-VL text encoder from a config,
and a byte-level BPE tokenizer trained here on a small English word list, so no download is needed.

The text sequence the transformer attends to: the prompt is wrapped in Qwen's chat template

    <|im_start|>system\\nDescribe the image by ...:<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

and encoded by the language model (its last hidden state); the pipeline then drops the first
`prompt_template_encode_start_idx` tokens and keeps the rest: the prompt's tokens, then the template's suffix
(`<|im_end|>`, `\\n`, `<|im_start|>`, "assistant", `\\n`). The pipeline's 34 is the system prefix's length in
Qwen's own tokenizer; here the prefix is 67 tokens and the suffix 8 ("assistant" is four pieces), and the fixtures
set the drop to the prefix's count (`template_prefix_tokens`). Each prompt keeps its own length: a batch is
zero-padded to its longest, with a mask the pipeline replaces by None when every row has the same length.
"""

import contextlib
import functools
import inspect
import re

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from mmdit_pipelines import _WORDS
from pipelines import _cast, _on
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
)

# The chat template's special tokens; `<|endoftext|>` (id 0) pads.
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split: letters with at most one non-letter before them, digits one by one, newlines apart.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# QwenImagePipeline's template (`pipe.prompt_template_encode`), here only to train on its words.
_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial"
    " relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

# Qwen3's chat template, reduced to what a text-to-image pipeline renders (Z-Image, FLUX.2 klein): messages, the
# assistant's header, and the empty thinking block Qwen3 adds only when `enable_thinking` is False.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@functools.lru_cache(maxsize=1)
def _bpe() -> Tokenizer:
    """The trained `tokenizers` backend; `qwen_tokenizer` wraps a copy of it."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    # Offsets without the leading space the byte-level "Ġ" carries: " red" in "a red cat" is (2, 5), not (1, 5).
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    # Each word after a space ("Ġcat") and at a line's start ("cat", a prompt's first word after "user\n"), twice;
    # the template once. A merge needs two occurrences, so words only the template has ("Describe", "detailing",
    # "system") stay in the pieces the word list taught, and words in neither ("lasagne", "bicycle") are pieces too.
    template = re.sub("|".join(re.escape(s) for s in _SPECIAL), "\n", _TEMPLATE.format(""))
    corpus = [" ".join(_WORDS), "\n".join(_WORDS)] * 2 + [template]
    trainer = trainers.BpeTrainer(
        vocab_size=2048, min_frequency=2, special_tokens=_SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes without <unk>
    )
    bpe.train_from_iterator(corpus, trainer)  # ~1300 tokens: every merge the corpus has twice
    return bpe


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A new Qwen2-style byte-level BPE tokenizer (the backend is trained once): `<|endoftext|>` pads on the right,
    `<|im_end|>` is EOS, no special tokens are added, and offsets are character offsets without leading spaces."""
    return Qwen2TokenizerFast(
        tokenizer_object=_bpe(), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"], model_max_length=32768,
    )


def template_prefix_tokens(pipe: QwenImagePipeline) -> int:
    """How many tokens the chat template's text before the prompt takes in `pipe.tokenizer`."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    return len(pipe.tokenizer(prefix)["input_ids"])


def _text_encoder(vocab_size: int, hidden: int, *, layers: int, heads: int, kv_heads: int, intermediate: int,
                  mrope_section: list[int], seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL model over `vocab_size` ids with text width `hidden`; its vision tower (one block of width 16)
    is never run, as the pipeline passes text alone. `mrope_section` sums to half the head width."""
    torch.manual_seed(seed)
    text = {
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
              "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _vae(z_dim: int, dim_mult: list[int], *, base_dim: int = 8, seed: int = 0) -> AutoencoderKLQwenImage:
    """A small causal-3D Qwen-Image VAE: a latent pixel per 2 ** (len(dim_mult) - 1) image pixels each way (no
    temporal downsampling), normalised with the first `z_dim` of the real VAE's per-channel means and deviations."""
    torch.manual_seed(seed)
    real = inspect.signature(AutoencoderKLQwenImage).parameters  # the defaults are Qwen-Image's VAE's
    return AutoencoderKLQwenImage(
        base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=1,
        temperal_downsample=[False] * (len(dim_mult) - 1), latents_mean=real["latents_mean"].default[:z_dim],
        latents_std=real["latents_std"].default[:z_dim],
    ).eval()


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's published scheduler config: resolution-dependent exponential shift (mu from 0.5 at 256 image
    tokens to 0.9 at 8192), the last sigma stretched to 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def _pipeline(transformer, vae, text_encoder, tokenizer, drop: int | None) -> QwenImagePipeline:
    """The pipeline around the modules, dropping `drop` tokens (default: the template's prefix)."""
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler=_scheduler())
    pipe.prompt_template_encode_start_idx = template_prefix_tokens(pipe) if drop is None else drop
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwenimage_pipeline(seed: int = 0, *, drop: int | None = None) -> QwenImagePipeline:
    """A Qwen-Image-shaped pipeline: two double-stream blocks of 2 heads x 16, a 2-layer text encoder of width 32.

    The pipeline drops `drop` tokens from the front of each templated prompt, by default exactly the template's
    system prefix (`template_prefix_tokens`), so the prompt's first token is the first one kept.
    """
    # 32 px by default: VAE factor 2 and 2x2 patches of 4 latent channels (16 packed) make a 8x8 grid of image
    # tokens; the text is the prompt's tokens and the template's suffix, 32 wide (the joint_attention_dim).
    tokenizer = qwen_tokenizer()
    text_encoder = _text_encoder(len(tokenizer), 32, layers=2, heads=2, kv_heads=1, intermediate=64,
                                 mrope_section=[2, 3, 3], seed=seed + 1)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    return _pipeline(transformer, _vae(4, [1, 2], seed=seed), text_encoder, tokenizer, drop)


@contextlib.contextmanager
def _default_dtype(dtype):
    """New floating-point tensors in `dtype` (None: as they are) while the block runs."""
    if dtype is None:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def qwenimage_benchmark_pipeline(depth: int = 1, seed: int = 0, *, device=None, dtype=None) -> QwenImagePipeline:
    """For benchmarks: Qwen-Image's transformer at its real width with `depth` of its 60 blocks.

    Each block: 24 heads x 128 (3072 wide), 2x2 patches of 16 latent channels (64 packed), rope axes (16, 56, 56),
    text width 3584; about 340M parameters (1.36 GB in float32) a block. The text encoder has Qwen2.5-VL-7B's width
    (3584, 28 heads and 4 key/value heads of 128) but one layer with a feed-forward of 256; the VAE is small but has
    the real factor 8 and 16 latent channels, so a 1024 px image has the real 64x64 grid of image tokens.

    With `device` the modules are built there, and with `dtype` the transformer is built in it (the rest is cast):
    all 60 blocks take 82 GB in float32, more than an H100 holds, and 41 GB in bfloat16.
    """
    tokenizer = qwen_tokenizer()
    with _on(device):
        text_encoder = _text_encoder(len(tokenizer), 3584, layers=1, heads=28, kv_heads=4, intermediate=256,
                                     mrope_section=[16, 24, 24], seed=seed + 1)
        torch.manual_seed(seed)
        with _default_dtype(dtype):
            transformer = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=depth, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
            ).eval()
        vae = _vae(16, [1, 2, 4, 4], base_dim=4, seed=seed)
    return _cast(_pipeline(transformer, vae, text_encoder, tokenizer, None), device, dtype)
