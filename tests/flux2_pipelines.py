"""Tiny, randomly initialised FLUX.2 pipelines (diffusers' `Flux2Pipeline` and `Flux2KleinPipeline`), for tests and
benchmarks.

Built fully in-process, as `mmdit_pipelines` and `qwen_pipelines` build theirs: the text encoders from configs, and
byte-level BPE tokenizers trained here on the same small English word list, so no download is needed.

The text sequence the transformer attends to (both pipelines pad every prompt to `max_sequence_length`, default
512, run the language model with the padding masked, then hand all of the positions to the transformer with no mask,
text first and the image after it in the joint sequence):

* FLUX.2 dev: a Mistral-Small-3.1 (`Mistral3ForConditionalGeneration`) conversation with the pipeline's system
  message, templated by the tokenizer as

      <s>[SYSTEM_PROMPT]You are an AI that reasons about ... without speculation.[/SYSTEM_PROMPT][INST]{prompt}[/INST]

  and padded on the left with `<pad>`: nothing is dropped, so the prompt's tokens sit just before the closing
  `[/INST]` at the end of the sequence, and their positions move with the prompt's length. The system prefix takes
  31 tokens here (each word of the message is one token, as in Mistral's own tokenizer), and truncation cuts the
  end: a prompt of n tokens needs `max_sequence_length` >= 32 + n to be kept whole (at 32 only its first token is
  left). The real pipeline hands this to a `PixtralProcessor`, which needs torchvision; the fixture hands it the
  tokenizer itself, whose `apply_chat_template` takes the same call.
* FLUX.2 klein: a Qwen3 (`Qwen3ForCausalLM`) conversation of the user's message alone, with the generation prompt and
  thinking turned off,

      <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

  padded on the right with `<|endoftext|>`: the prompt's tokens start at position 4 (`<|im_start|>`, "u", "ser",
  `\\n`: the fixture's tokenizer is `qwen_pipelines`', where "user" is two pieces; Qwen's own makes it one), and 12
  tokens follow them before the padding ("assistant" is four pieces; Qwen's own template suffix is 9 tokens).

Each pipeline stacks three hidden states of its language model (dev: layers 10, 20, 30; klein: 9, 18, 27; both
`text_encoder_out_layers` arguments of the call) per token: a token's embedding is its three states side by side
([layer 10 | layer 20 | layer 30]), 3 x the language model's width (the transformer's `joint_attention_dim`). The
fixtures' language models are one layer deeper than the deepest layer read, so every layer read is an inner one (the
last of `hidden_states` is the final norm's output), as in the real models.

Both pipelines take an image first: the prompt must be passed by name, `pipe(prompt="a red cat", ...)`. Dev embeds
`guidance_scale` in the transformer (no second pass); klein runs classifier-free guidance with the empty prompt as a
separate transformer call when `guidance_scale` > 1, unless the pipeline `is_distilled`.
"""

import functools

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from mmdit_pipelines import _WORDS
from pipelines import _cast, _on
from qwen_pipelines import _SPLIT, QWEN3_CHAT_TEMPLATE, _default_dtype, qwen_tokenizer
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
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The hidden states each pipeline reads by default (`text_encoder_out_layers`); the fixtures' language models have
# one layer more than the deepest, as `hidden_states[-1]` is the final norm's output, not a layer's.
DEV_LAYERS = (10, 20, 30)
KLEIN_LAYERS = (9, 18, 27)

# Mistral's special tokens, in the order of Mistral's own ids where it has them (`<unk>` 0, `<s>` 1, `</s>` 2,
# `[INST]` 3, `[/INST]` 4); the template uses `<s>`, `[SYSTEM_PROMPT]`, `[/SYSTEM_PROMPT]`, `[INST]`, `[/INST]`,
# `<pad>` pads, and the `[IMG]` tokens are the processor's (the pipeline strips "[IMG]" from prompts).
_MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

# The Mistral-Small-3.1 template's structure, for what the pipeline sends: a system message, then user messages,
# each message's content a string or a list of text (and image) blocks.
_MISTRAL_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for block in content -%}{%- if block['type'] == 'text' -%}{{ block['text'] }}{%- else -%}[IMG]{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ text(message['content']) }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]{{ text(message['content']) }}[/INST]"
    "{%- else -%}{{ text(message['content']) }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)



@functools.lru_cache(maxsize=1)
def _mistral_bpe() -> Tokenizer:
    """A byte-level BPE trained as `qwen_pipelines` trains Qwen's, with Mistral's special tokens, on the word list
    (after a space and at a line's start, twice) and the pipeline's system message (twice, so each of its words is a
    token, as in Mistral's own tokenizer). Words in neither ("lasagne", "bicycle") are several pieces."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)  # " red" in "a red cat" is (2, 5)
    corpus = [" ".join(_WORDS), "\n".join(_WORDS), SYSTEM_MESSAGE] * 2
    trainer = trainers.BpeTrainer(
        vocab_size=2048, min_frequency=2, special_tokens=_MISTRAL_SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A new Mistral-style tokenizer with the chat template: `<s>` / `</s>` / `<pad>`, padding on the left (as the
    pipeline's processor pads), no special tokens added outside the template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_mistral_bpe(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=[t for t in _MISTRAL_SPECIAL if t.startswith("[")], padding_side="left",
        chat_template=_MISTRAL_TEMPLATE, model_max_length=131072,
    )


def qwen3_tokenizer() -> Qwen2TokenizerFast:
    """`qwen_pipelines.qwen_tokenizer` with Qwen3's thinking tokens (`<think>`, `</think>`, plain added tokens as in
    Qwen3's own tokenizer) and the template: padding on the right with `<|endoftext|>`."""
    tokenizer = qwen_tokenizer()  # a new wrapper around a copy of the trained backend
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def templated_text(pipe) -> str:
    """The text `pipe` tokenizes for a prompt, "{}" in the prompt's place (as `qwen_pipelines` keeps its template)."""
    if isinstance(pipe, Flux2KleinPipeline):
        messages = [{"role": "user", "content": "{}"}]
        return pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)
    (messages,) = format_input(["{}"], system_message=pipe.system_message)
    return pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def prompt_span(pipe, prompt: str, max_sequence_length: int = 512) -> slice:
    """Where `prompt`'s tokens sit in the sequence `pipe` encodes for it (padded and truncated to
    `max_sequence_length`): the tokens whose characters lie inside the prompt's; empty when truncation cut them."""
    prefix, suffix = templated_text(pipe).split("{}")
    start, end = len(prefix), len(prefix) + len(prompt)
    encoding = pipe.tokenizer(prefix + prompt + suffix, add_special_tokens=False, return_offsets_mapping=True,
                              padding="max_length", truncation=True, max_length=max_sequence_length)
    inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if start <= a < b <= end]
    return slice(inside[0], inside[-1] + 1) if inside else slice(0, 0)


def _mistral3(vocab_size: int, hidden: int, *, layers: int, heads: int, kv_heads: int, head_dim: int,
              intermediate: int, pad_token_id: int, image_token_id: int, seed: int) -> Mistral3ForConditionalGeneration:
    """A Mistral3 model over `vocab_size` ids with text width `hidden`; its Pixtral vision tower (one block of width
    16) is never run, as the pipeline passes text alone."""
    torch.manual_seed(seed)
    text = {
        "model_type": "mistral", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 4096, "sliding_window": None, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
        "pad_token_id": pad_token_id, "bos_token_id": 1, "eos_token_id": 2,
    }
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "head_dim": 8, "intermediate_size": 16, "image_size": 32, "patch_size": 8}
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=image_token_id)
    return Mistral3ForConditionalGeneration(config).eval()


def _qwen3(vocab_size: int, hidden: int, *, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
           pad_token_id: int, seed: int) -> Qwen3ForCausalLM:
    """A Qwen3 language model over `vocab_size` ids with width `hidden`."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=pad_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


def _vae(latent_channels: int, block_out_channels: tuple[int, ...], *, seed: int = 0) -> AutoencoderKLFlux2:
    """A small FLUX.2 VAE: a latent pixel per 2 ** (len(block_out_channels) - 1) image pixels; its batch norm over
    the 2x2-patchified latents (4 x `latent_channels`) keeps its initial statistics (mean 0, variance 1)."""
    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=block_out_channels,
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
    ).eval()


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's published scheduler config. The pipelines pass their own sigmas (1 down to 1 / steps) and an
    empirical `mu` (from the image's token count and the step count), which this exponential dynamic shift uses."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _transformer(*, latent_channels: int, depth: int, single_depth: int, heads: int, head_dim: int, text_width: int,
                 axes: tuple[int, ...], guidance_embeds: bool, seed: int) -> Flux2Transformer2DModel:
    """A FLUX.2 transformer over 2x2 patches of `latent_channels` (4 x as many input channels): `depth`
    double-stream and `single_depth` single-stream blocks; `text_width` is 3 x the language model's width."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=depth, num_single_layers=single_depth,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
        axes_dims_rope=axes, guidance_embeds=guidance_embeds,
    ).eval()


def _finish(pipe):
    """The pipeline without a progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_pipeline(seed: int = 0) -> Flux2Pipeline:
    """A FLUX.2-dev-shaped pipeline: two double- and two single-stream blocks of 2 heads x 16, embedded guidance, a
    31-layer Mistral3 language model of width 16 (text width 3 x 16 = 48)."""
    # 32 px: VAE factor 2 makes a 16x16 grid of 4 latent channels, patchified 2x2 into an 8x8 grid of 16 channels.
    tokenizer = mistral_tokenizer()
    text_encoder = _mistral3(len(tokenizer), 16, layers=DEV_LAYERS[-1] + 1, heads=2, kv_heads=1, head_dim=8,
                             intermediate=32, pad_token_id=tokenizer.pad_token_id,
                             image_token_id=tokenizer.convert_tokens_to_ids("[IMG]"), seed=seed + 1)
    transformer = _transformer(latent_channels=4, depth=2, single_depth=2, heads=2, head_dim=16, text_width=48,
                               axes=(4, 4, 4, 4), guidance_embeds=True, seed=seed)
    return _finish(Flux2Pipeline(scheduler=_scheduler(), vae=_vae(4, (8, 16), seed=seed), text_encoder=text_encoder,
                                 tokenizer=tokenizer, transformer=transformer))


def tiny_flux2_klein_pipeline(seed: int = 0, *, distilled: bool = False) -> Flux2KleinPipeline:
    """A FLUX.2-klein-shaped pipeline: two double- and two single-stream blocks of 2 heads x 16, no guidance
    embedding, a 28-layer Qwen3 language model of width 16 (text width 48).

    Not `distilled` (klein "base"), a `guidance_scale` above 1 runs classifier-free guidance: a second transformer
    call per step on the empty prompt's embedding; `distilled` ignores `guidance_scale`.
    """
    tokenizer = qwen3_tokenizer()
    text_encoder = _qwen3(len(tokenizer), 16, layers=KLEIN_LAYERS[-1] + 1, heads=2, kv_heads=1, head_dim=8,
                          intermediate=32, pad_token_id=tokenizer.pad_token_id, seed=seed + 1)
    transformer = _transformer(latent_channels=4, depth=2, single_depth=2, heads=2, head_dim=16, text_width=48,
                               axes=(4, 4, 4, 4), guidance_embeds=False, seed=seed)
    return _finish(Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(4, (8, 16), seed=seed),
                                      text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                      is_distilled=distilled))


# The published geometries: heads of 128 in the transformer, and the language model's width (a third of the
# transformer's text width). The real block counts are in `flux2_benchmark_pipeline`'s docstring.
_BENCHMARK = {
    "dev": (48, 5120),  # FLUX.2-dev, Mistral-Small-3.1
    "klein": (24, 2560),  # FLUX.2-klein-4B, Qwen3-4B
    "klein-9b": (32, 4096),  # FLUX.2-klein-9B, Qwen3-8B
}


def flux2_benchmark_pipeline(kind: str = "dev", depth: int = 1, single_depth: int | None = None, seed: int = 0, *,
                             device=None, dtype=None, distilled: bool = False):
    """For benchmarks: a FLUX.2 transformer at its real width with `depth` double-stream blocks and `single_depth`
    single-stream ones (default `depth`).

    `kind` "dev": 48 heads x 128 (6144 wide), text width 15360, embedded guidance; the real model has 8 and 48
    blocks. "klein" (4B): 24 heads x 128 (3072 wide), text width 7680, no guidance embedding, 5 and 20 blocks.
    "klein-9b": 32 heads x 128 (4096 wide), text width 12288, 8 and 24 blocks. All: 2x2 patches of 32 latent
    channels (128 input channels), rope axes (32, 32, 32, 32), theta 2000, feed-forward 3 x the width.

    The language model has the real width but only one head (and one key/value head) of 128, a feed-forward of 256,
    and just enough layers for the pipeline's default `text_encoder_out_layers` (31 for dev, 28 for klein), so the
    transformer dominates the cost. The VAE is small but has the real factor 8 and 32 latent channels, so a 1024 px
    image has the real 64x64 grid of image tokens.

    Klein is built as the base model unless `distilled`: its default `guidance_scale` (4.0) then runs two transformer
    calls a step; pass `guidance_scale=1.0` for one. With `device` the modules are built there, and with `dtype` the
    transformer is built in it (the rest is cast): dev's 8 + 48 blocks take 128 GB in float32, 64 GB in bfloat16.
    """
    if kind not in _BENCHMARK:
        raise ValueError(f"kind must be one of {sorted(_BENCHMARK)}, not {kind!r}")
    heads, width = _BENCHMARK[kind]
    single_depth = depth if single_depth is None else single_depth
    with _on(device):
        if kind == "dev":
            tokenizer = mistral_tokenizer()
            text_encoder = _mistral3(len(tokenizer), width, layers=DEV_LAYERS[-1] + 1, heads=1, kv_heads=1,
                                     head_dim=128, intermediate=256, pad_token_id=tokenizer.pad_token_id,
                                     image_token_id=tokenizer.convert_tokens_to_ids("[IMG]"), seed=seed + 1)
        else:
            tokenizer = qwen3_tokenizer()
            text_encoder = _qwen3(len(tokenizer), width, layers=KLEIN_LAYERS[-1] + 1, heads=1, kv_heads=1,
                                  head_dim=128, intermediate=256, pad_token_id=tokenizer.pad_token_id, seed=seed + 1)
        with _default_dtype(dtype):
            transformer = _transformer(latent_channels=32, depth=depth, single_depth=single_depth, heads=heads,
                                       head_dim=128, text_width=3 * width, axes=(32, 32, 32, 32),
                                       guidance_embeds=kind == "dev", seed=seed)
        vae = _vae(32, (8, 16, 32, 32), seed=seed)
    if kind == "dev":
        pipe = Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    else:
        pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=distilled)
    return _cast(pipe, device, dtype)
