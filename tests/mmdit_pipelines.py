"""Tiny, randomly initialised MM-DiT pipelines (SD3, SD3.5, Flux) built from configs, for tests and benchmarks.

Built fully in-process, the way diffusers' own fast tests build them, but with the project's real CLIP tokenizer and
an in-process T5 (SentencePiece-style unigram) tokenizer, so no download is needed.

The joint text sequence each transformer attends to:

* SD3 / SD3.5: the 77 CLIP tokens (both CLIP encoders' penultimate states side by side, zero-padded up to the T5
  width), then `max_sequence_length` T5 tokens (default 256; zeros when there is no T5).
* Flux: the `max_sequence_length` T5 tokens only (default 512); CLIP gives only the pooled vector.
* Chroma: as Flux's, with no CLIP at all; the padding after EOS and one padding token is masked.
* PixArt-Σ (a cross-attention DiT, not an MM-DiT): cross-attention to the T5 tokens, the padding after EOS masked.
"""

import string

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from pipelines import _cast, _on, clip_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Whole-word pieces ("▁cat"). Words left out on purpose are split into several pieces, below.
_WORDS = """
a an the this that these those some one two three four five many few several every each other another
and or but with without on in of at by for from to into onto over under above below behind beside near next
between through across around along against inside outside up down off out after before during while
is are was were be been being has have had do does did can will would should could may might not no very
cat cats dog dogs horse cow sheep bird birds fish mouse rabbit bear lion tiger fox wolf deer duck owl
man woman boy girl child children person people baby king queen knight robot astronaut
riding sitting standing running walking flying swimming eating holding wearing sleeping lying jumping playing
reading looking smiling made covered filled full
red green blue yellow orange purple pink brown white black gray grey gold golden silver dark light bright
big small large tiny little tall short long old young new fluffy furry wooden metal glass stone shiny
beautiful cute happy sad angry funny ugly pretty
car truck bus train boat ship plane motor bike road street bridge city town village house home building
castle tower church room kitchen window door wall floor roof garden park field forest mountain mountains
hill river lake sea ocean beach island desert sky cloud clouds sun moon star stars rain snow storm fire water
tree trees flower flowers grass leaf leaves rose apple banana orange cake pizza bread soup salad cheese
egg eggs coffee tea milk wine cup bowl plate table chair bed sofa lamp book books clock box bag hat shirt
dress coat shoes glasses ball toy painting photo photograph picture drawing sketch image portrait
background foreground style art oil watercolor pencil cartoon anime realistic detailed night day
morning evening sunset sunrise winter summer spring autumn fall circle square triangle star heart shape
top bottom left right middle center side front back corner edge
pan straw burger
""".split()

# Pieces that make other words several pieces: "bicycle" = "▁bi" "cycle", "lasagne" = "▁las" "agne",
# "croutons" = "▁cr" "out" "ons", "motorcycle" = "▁motor" "cycle", "sunflower" = "▁sun" "flower",
# "strawberry" = "▁straw" "berry", "pancake" = "▁pan" "cake", "squirrel" = "▁squir" "rel".
_SUBWORDS = ["▁bi", "cycle", "▁las", "agne", "▁cr", "out", "ons", "flower", "berry", "cake", "▁squir", "rel"]
_SUFFIXES = ["s", "es", "ed", "ing", "er", "ly"]  # "hats" is "▁hat" "s"


def _t5_vocab() -> list[tuple[str, float]]:
    """The unigram vocabulary: `<pad>`, `</s>`, `<unk>` (ids 0, 1, 2), then words, subwords and single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -12.0)]
    pieces = [("▁" + w, -8.0) for w in _WORDS] + [("▁The", -8.0), ("▁An", -8.0)]
    pieces += [(p, -9.0) for p in _SUBWORDS] + [(p, -9.5) for p in _SUFFIXES]
    # Every printable ASCII character alone and after "▁": any ASCII text tokenizes without <unk>.
    pieces += [(p, -14.0) for c in string.ascii_letters + string.digits + string.punctuation for p in (c, "▁" + c)]
    seen = {piece for piece, _ in vocab}
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return vocab


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (SentencePiece unigram) tokenizer over a small built-in vocabulary: some words are several pieces."""
    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)


def _t5_encoder(d_model: int, *, num_layers: int = 2, d_ff: int | None = None, num_heads: int = 2,
                d_kv: int | None = None, seed: int = 0) -> T5EncoderModel:
    """A T5 v1.1-style (gated-gelu) encoder over `t5_tokenizer`'s vocabulary, with output width `d_model`."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(_t5_vocab()), d_model=d_model, d_ff=d_ff or 2 * d_model, d_kv=d_kv or d_model // num_heads,
        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _clip(hidden: int, *, projection: bool, layers: int = 2, heads: int = 2, intermediate: int | None = None,
          seed: int = 0):
    """A CLIP text tower over the real CLIP vocabulary (49408 ids, 77 positions) with output width `hidden`."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


# The real VAEs' latent normalisations (SD3 / SD3.5 and Flux.1); neither has quant convs.
_SD3_VAE = dict(shift_factor=0.0609, scaling_factor=1.5305)
_FLUX_VAE = dict(shift_factor=0.1159, scaling_factor=0.3611)


def _vae(latent_channels: int, block_out_channels: tuple[int, ...] = (8, 16), *, seed: int = 0, **factors):
    """A small AutoencoderKL: a latent pixel per 2 ** (len(block_out_channels) - 1) image pixels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=block_out_channels,
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels), use_quant_conv=False,
        use_post_quant_conv=False, **factors,
    ).eval()


def _sd3(transformer: SD3Transformer2DModel, clip_widths: tuple[int, int], t5_width: int | None, seed: int,
         vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    """An SD3 pipeline around `transformer`: two projected CLIPs, an optional T5, flow-matching Euler."""
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip(clip_widths[0], projection=True, seed=seed), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(clip_widths[1], projection=True, seed=seed + 1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5_width, seed=seed + 2) if t5_width else None,
        tokenizer_3=t5_tokenizer() if t5_width else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd3_transformer(seed: int, **features) -> SD3Transformer2DModel:
    """Four heads of 8 over 2x2 patches of 4 latent channels; text width 64, pooled width 48."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=48,
        **features,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, *, t5: bool = True) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline: two joint blocks (the last context-pre-only), CLIP widths 16 + 32, T5 width 64."""
    # 32 px by default: VAE factor 2 and 2x2 patches make a 8x8 grid of image tokens. The CLIP states (16 + 32
    # wide) are zero-padded to the T5 width 64, which is the transformer's joint_attention_dim.
    return _sd3(_tiny_sd3_transformer(seed), (16, 32), 64 if t5 else None, seed, _vae(4, seed=seed, **_SD3_VAE))


def tiny_sd35_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3.5-medium-shaped pipeline: as `tiny_sd3_pipeline`, with RMS q/k norms and an image-only `attn2` in
    block 0."""
    transformer = _tiny_sd3_transformer(seed, dual_attention_layers=(0,), qk_norm="rms_norm")
    return _sd3(transformer, (16, 32), 64, seed, _vae(4, seed=seed, **_SD3_VAE))


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = False) -> FluxPipeline:
    """A Flux.1-shaped pipeline: one double-stream and one single-stream block, T5 width 32, CLIP pooled width 32."""
    # 32 px by default: VAE factor 2 and the pipeline's 2x2 packing of 4 latent channels into 16 make a 8x8 grid.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer, vae=_vae(4, seed=seed, **_FLUX_VAE), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip(32, projection=False, seed=seed), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(32, seed=seed + 1), tokenizer_2=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mmdit_benchmark_pipeline(family: str, depth: int = 2, seed: int = 0, *, single_depth: int | None = None,
                             device=None, dtype=None):
    """For benchmarks: `family` "sd3" or "flux" at its real widths, with `depth` blocks and one-layer text encoders.

    SD3-medium: `depth` joint blocks of 24 heads x 64 (1536 wide), 2x2 patches of 16 latent channels, text width
    4096 (CLIP-L 768 + CLIP-G 1280 states zero-padded up to the T5-XXL width), pooled 768 + 1280 = 2048.
    Chroma: Flux.1's blocks (as below) with T5 alone and its real modulation approximator (5 layers of 5120).
    PixArt-Σ: `depth` blocks of 16 heads x 72 (1152 wide), 2x2 patches of 4 latent channels, T5 width 4096.
    Flux.1: `depth` double-stream and `depth` single-stream blocks of 24 heads x 128 (3072 wide), 64 input channels
    (16 latent channels packed 2x2), rope axes (16, 56, 56), T5 width 4096, CLIP-L pooled 768, distilled guidance
    (dev's `guidance_embeds`). The VAE is small but has the real factor 8 and 16 latent channels, so a 1024 px image
    has the real 64x64 grid of image tokens. The text encoders have the real output widths but one layer each (T5:
    one head of 64, feed-forward 256), so the transformer dominates the cost. Flux has `single_depth` single-stream
    blocks (default `depth`; the real model has 19 and 38). With `device` the modules are built there; `dtype`
    casts the whole pipeline.
    """
    if family not in ("sd3", "flux", "chroma", "pixart"):
        raise ValueError(f"family must be 'sd3', 'flux', 'chroma' or 'pixart', not {family!r}")
    one_layer = dict(layers=1, intermediate=256)
    with _on(device):
        t5 = _t5_encoder(4096, num_layers=1, d_ff=256, num_heads=1, d_kv=64, seed=seed + 2)
        vae_blocks = (8, 16, 32, 32)
        if family == "sd3":
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192,
            ).eval()
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, vae=_vae(16, vae_blocks, seed=seed, **_SD3_VAE),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                text_encoder=_clip(768, projection=True, heads=12, seed=seed, **one_layer), tokenizer=clip_tokenizer(),
                text_encoder_2=_clip(1280, projection=True, heads=20, seed=seed + 1, **one_layer),
                tokenizer_2=clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tokenizer(),
            )
        elif family == "pixart":
            torch.manual_seed(seed)
            transformer = PixArtTransformer2DModel(
                sample_size=128, num_layers=depth, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
            ).eval()
            pipe = PixArtSigmaPipeline(transformer=transformer, vae=_vae(4, vae_blocks, seed=seed),
                                       scheduler=DDIMScheduler(), text_encoder=t5, tokenizer=t5_tokenizer())
        elif family == "chroma":
            torch.manual_seed(seed)
            transformer = ChromaTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=depth, num_single_layers=depth if single_depth is None else single_depth,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
            ).eval()  # the real approximator: 64 channels, 5 layers of 5120
            pipe = ChromaPipeline(
                transformer=transformer, vae=_vae(16, vae_blocks, seed=seed, **_FLUX_VAE),
                scheduler=FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096,
                ),
                text_encoder=t5, tokenizer=t5_tokenizer(),
            )
        else:
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=depth, num_single_layers=depth if single_depth is None else single_depth, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ).eval()
            pipe = FluxPipeline(
                transformer=transformer, vae=_vae(16, vae_blocks, seed=seed, **_FLUX_VAE),
                scheduler=FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096,
                ),
                text_encoder=_clip(768, projection=False, heads=12, seed=seed, **one_layer),
                tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
            )
    return _cast(pipe, device, dtype)


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """A Chroma-shaped pipeline: Flux's blocks (one double-, one single-stream) with T5 width 32 alone, masked padding."""
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    pipe = ChromaPipeline(
        transformer=transformer, vae=_vae(4, seed=seed, **_FLUX_VAE), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_t5_encoder(32, seed=seed + 1), tokenizer=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """A PixArt-Σ-shaped pipeline: two blocks of self- and cross-attention (2x2 patches, learned sigma) at 32 px,
    T5 width 32 with its padding masked, DDIM as the scheduler."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtSigmaPipeline(
        transformer=transformer, vae=_vae(4, seed=seed), scheduler=DDIMScheduler(),
        text_encoder=_t5_encoder(32, seed=seed + 1), tokenizer=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
