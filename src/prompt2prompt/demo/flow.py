"""The joint-attention demo model ("demo-flow"): an SD3-style transformer trained by flow matching.

    python -m prompt2prompt.demo.train flow        --run runs/demo --steps 6000
    python -m prompt2prompt.demo.train export-flow --run runs/demo --out src/prompt2prompt/demo/flow_model

It shares the data set and the autoencoder of the UNet demo model (`train.py`'s `data` and `vae`
stages) and is a plain `StableDiffusion3Pipeline`: an `SD3Transformer2DModel` with query/key RMS norm
(as SD3.5), two small `CLIPTextModelWithProjection`s (no T5), `FlowMatchEulerDiscreteScheduler`.

Without T5 the pipeline appends `max_sequence_length` zero vectors to the CLIP text (diffusers'
`encode_prompt`). They are all the same token: in every block each copy has the same query, key and
value, so L copies act exactly as one copy whose key counts L times, i.e. one token whose attention
logit carries `+ log(L)`. Training uses that one token with the bias (`RepeatedTokenProcessor`) and so
costs 78 text tokens instead of 77 + L, and the shipped model runs at the pipeline's default L.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prompt2prompt.demo import world
from prompt2prompt.demo.training import (Config, build_tokenizer, corrupt, draw_batch, export_folder,
                                         load_training_set, log, lr_at, optimizer_step, resume, save_atomic,
                                         step_generator, tokenize, vae_checkpoint)

PROBE_SIGMAS = (0.3, 0.6, 0.85)


def build_transformer(config: Config):
    """The demo's `SD3Transformer2DModel` over 16x16x4 latents: 2x2 patches, 64 image tokens."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=world.SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=config.flow_layers,
        attention_head_dim=config.flow_head_dim, num_attention_heads=config.flow_heads,
        joint_attention_dim=sum(config.flow_text_widths),
        caption_projection_dim=config.flow_heads * config.flow_head_dim,
        pooled_projection_dim=sum(config.flow_text_widths), pos_embed_max_size=world.SIZE // 8, qk_norm="rms_norm",
    )


def build_text_encoders(config: Config) -> list:
    """SD3's two CLIP text encoders, narrow and shallow, over the full CLIP vocabulary (their pooled
    projections as wide as their hidden states)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=config.text_layers, num_attention_heads=max(1, width // 32), max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    )) for width in config.flow_text_widths]


def build_flow_scheduler():
    """Euler steps of the rectified flow, no resolution shift (the latents are 16x16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class RepeatedTokenProcessor:
    """SD3's joint attention whose last text token stands for `repeats` identical copies (logit + log(repeats))."""

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n_image = hidden_states.shape[:2]

        def heads(x):  # (B, N, H*D) -> (B, H, N, D)
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        tq, tk = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
        bias = torch.zeros(1, k.shape[2], dtype=q.dtype)  # (1, keys): every query, every head
        bias[0, -1] = self.log_repeats
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)  # (B, N, H*D)
        image, text = out[:, :n_image], out[:, n_image:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, text
        return image, attn.to_add_out(text)


def encode_text(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `StableDiffusion3Pipeline.encode_prompt` gives without T5, with one zero token for all of them.

    Returns the text (B, 77 + 1, sum of widths): both CLIPs' penultimate hidden states side by side, then
    the zero token; and the pooled text (B, sum of widths).
    """
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # the pipeline's clip_skip=None: the penultimate layer
        pooled.append(out.text_embeds)
    text = torch.cat(hidden, -1)
    return torch.cat([text, text.new_zeros(text.shape[0], 1, text.shape[2])], 1), torch.cat(pooled, -1)


def sample_sigmas(batch: int, g: torch.Generator) -> torch.Tensor:
    """Noise levels: half logit-normal (SD3's), half uniform, so both ends of the schedule are seen."""
    logit_normal = torch.sigmoid(torch.randn(batch, generator=g))
    uniform = torch.rand(batch, generator=g)
    return torch.where(torch.rand(batch, generator=g) < 0.5, logit_normal, uniform)


def flow_loss(transformer, text_encoders, x0, ids, noise, sigmas) -> torch.Tensor:
    """The rectified-flow loss: predict noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise."""
    s = sigmas.view(-1, 1, 1, 1)
    text, pooled = encode_text(text_encoders, ids)
    pred = transformer(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=text,
                       pooled_projections=pooled, timestep=sigmas * 1000).sample
    return F.mse_loss(pred, noise - x0)


@torch.no_grad()
def flow_probe(transformer, text_encoders, tokenizer, probe, captions, seed: int) -> dict[str, float]:
    """The flow loss on held-out latents with the right caption, one attribute corrupted, and none (see train.py)."""
    rng = np.random.default_rng(seed)
    variants = {"right": captions, "empty": [""] * len(captions)}
    for attribute in ("color", "shape", "position", "background"):
        variants[attribute] = [corrupt(c, attribute, rng) for c in captions]
    noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, texts in variants.items():
        ids = tokenize(tokenizer, texts)
        losses = [flow_loss(transformer, text_encoders, probe, ids, noise, torch.full((len(probe),), s)).item()
                  for s in PROBE_SIGMAS]
        results[name] = sum(losses) / len(losses)
    return results


def init_text_encoder(encoder, folder: Path) -> None:
    """Starts a text encoder from a trained `CLIPTextModel` of the same shape (the UNet demo model's)."""
    from transformers import CLIPTextModel

    trained = CLIPTextModel.from_pretrained(folder, torch_dtype=torch.float32)
    encoder.text_model.load_state_dict(trained.state_dict())  # transformers 5: CLIPTextModel is the bare text model


def stage_flow(run: Path, config: Config, steps: int, init_text: Path | None = None) -> None:
    """Trains the transformer and both text encoders jointly on the autoencoder's latents, with EMA copies."""
    from tqdm.auto import tqdm

    encoded, captions, probe_captions = load_training_set(run, config)
    latents, probe = encoded["latents"], encoded["probe"]
    torch.manual_seed(config.seed)
    transformer, text_encoders = build_transformer(config), build_text_encoders(config)
    if init_text is not None:
        init_text_encoder(text_encoders[0], init_text)
    repeats = RepeatedTokenProcessor(config.flow_t5_length)
    tokenizer = build_tokenizer()
    tokens, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0]
    models = [transformer, *text_encoders]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.flow_lr, weight_decay=0.0)
    emas = [copy.deepcopy(m).eval() for m in models]
    for model in (transformer, emas[0]):
        model.set_attn_processor(repeats)
    ckpt_path = run / "flow.pt"
    named = {"transformer": transformer, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1],
             "ema_transformer": emas[0], "ema_text_encoder": emas[1], "ema_text_encoder_2": emas[2], "opt": opt}
    start = resume(run, ckpt_path, "flow", **named)
    counts = ", ".join(f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for m in models)
    log(run, f"flow: parameters {counts} (transformer, text encoders), {len(latents)} scenes")
    ema_params = [p for m in emas for p in m.parameters()]
    for model in models:
        model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="flow", mininterval=10)
    started, losses = time.time(), []
    for step in bar:
        g = step_generator(config.seed, 4, step)
        x0, ids = draw_batch(latents, tokens, empty, config, g)
        noise = torch.randn(x0.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = config.flow_lr * lr_at(step, steps, config.warmup)
        loss = flow_loss(transformer, text_encoders, x0, ids, noise, sample_sigmas(config.batch, g))
        optimizer_step(loss, opt, params, ema_params, step, config.ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            save_atomic({**{k: m.state_dict() for k, m in named.items()}, "step": done,
                         "scaling_factor": encoded["scaling_factor"]}, ckpt_path)
        if done % config.probe_every == 0 or done == steps:
            rate = (time.time() - started) / (done - start)
            probe_losses = flow_probe(emas[0], emas[1:], tokenizer, probe, probe_captions, config.seed)
            text = " ".join(f"{k} {v:.3f}" for k, v in probe_losses.items())
            log(run, f"flow: step {done} loss {np.mean(losses[-config.probe_every:]):.4f} "
                     f"{rate:.2f} s/step | probe {text}")


def export_flow(run: Path, config: Config, out: Path) -> None:
    """Saves the EMA weights as a fp16 safetensors `StableDiffusion3Pipeline` folder (atomically replaced)."""
    from diffusers import StableDiffusion3Pipeline

    ckpt = torch.load(run / "flow.pt", weights_only=False)
    vae, vae_ckpt = vae_checkpoint(run, config)
    vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    transformer, (text_encoder, text_encoder_2) = build_transformer(config), build_text_encoders(config)
    transformer.load_state_dict(ckpt["ema_transformer"])
    text_encoder.load_state_dict(ckpt["ema_text_encoder"])
    text_encoder_2.load_state_dict(ckpt["ema_text_encoder_2"])
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_flow_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=build_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=build_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    ).to(torch.float16)
    info = {"flow_steps": ckpt["step"], "vae_steps": vae_ckpt["step"], "decoder_steps": vae_ckpt.get("decoder_step", 0)}
    export_folder(run, pipe, out, info, config, tokenizers=("tokenizer", "tokenizer_2"))
