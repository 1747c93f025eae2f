"""Trains the embedded demo model on the shapes world, in stages that each resume after interruption.

    python -m prompt2prompt.demo.train data   --run runs/demo              # render the data set
    python -m prompt2prompt.demo.train vae    --run runs/demo --steps 3000 # 64x64x3 <-> 16x16x4
    python -m prompt2prompt.demo.train unet   --run runs/demo --steps 8000 # UNet + text encoder
    python -m prompt2prompt.demo.train decoder --run runs/demo --steps 500 # sharpen the decoder (optional)
    python -m prompt2prompt.demo.train export --run runs/demo --out src/prompt2prompt/demo/model

Every stage is seeded: batches and noise are drawn from generators seeded by (seed, step), so a run
that is killed and resumed from its last checkpoint continues exactly as an uninterrupted one would.
Checkpoints are written to a temporary file and renamed, so a kill -9 never leaves a broken one.

The recipe (v-prediction, zero-terminal-SNR betas, trailing timesteps, EMA, joint text encoder with
10% caption dropout) is the one that made a model this small follow its captions on a CPU; the
shipped `DDIMScheduler` carries the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prompt2prompt.demo import world
from prompt2prompt.files import write_atomic

TOKENIZER_DIR = Path(__file__).resolve().parents[3] / "tests" / "assets" / "clip-tokenizer"
HELDOUT_SEED = 10_000_000  # held-out scenes use seeds from here on; training seeds stay far below
PROBE_TIMESTEPS = (300, 600, 850)


@dataclass
class Config:
    """Sizes and hyper-parameters of the demo model; stored with the run so a resume cannot change them."""

    seed: int = 0
    num_images: int = 40_000
    two_object_fraction: float = 0.2
    num_latents: int = 12_000  # the first images of the data set that the UNet trains on (encoding is slow on a CPU)
    # VAE: 64x64x3 -> 16x16x4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_batch: int = 8
    # The VAE is fully convolutional (no mid-block attention), so it can train on crops; but GroupNorm's
    # statistics then differ from whole images and colours drift: whole images (64) are the default.
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet: latent 16x16, cross-attention at 16x16 and 8x8 (and in the 4x4 mid block)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers: int = 1
    unet_down: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_heads: int = 4
    # Text encoder: a small CLIP text transformer over the real CLIP vocabulary
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    batch: int = 16
    lr: float = 8e-4
    high_noise_fraction: float = 0.5  # share of timesteps drawn from the upper 60%, where layout and shape form
    warmup: int = 200
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    probe_every: int = 400
    probe_size: int = 32


# ----------------------------------------------------------------------------- building blocks


def build_vae(config: Config):
    """The demo's `AutoencoderKL`: two downsamplings, 64x64x3 -> 16x16x4."""
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=16, sample_size=world.SIZE, mid_block_add_attention=False,
    )


def build_unet(config: Config):
    """The demo's `UNet2DConditionModel` over 16x16x4 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers, down_block_types=config.unet_down, up_block_types=config.unet_up,
        cross_attention_dim=config.text_width, attention_head_dim=config.unet_heads, norm_num_groups=32,
    )


def build_text_encoder(config: Config):
    """The demo's `CLIPTextModel`: narrow and shallow, with the full 49,408-token CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    ))


def build_tokenizer():
    """The real CLIP BPE tokenizer, the one Stable Diffusion users hit."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def build_scheduler(kind: str = "ddim"):
    """The noise schedule: v-prediction on zero-terminal-SNR betas with trailing timesteps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    settings = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                    clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**settings)
    return DDIMScheduler(**settings, set_alpha_to_one=False, steps_offset=0)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to 77, exactly as `StableDiffusionPipeline.encode_prompt` pads them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def resume(run: Path, ckpt_path: Path, stage: str, **stateful) -> int:
    """Loads each named state dict from the stage's checkpoint, if there is one; returns the step to go on from."""
    if not ckpt_path.exists():
        return 0
    ckpt = torch.load(ckpt_path, weights_only=False)
    for key, obj in stateful.items():
        obj.load_state_dict(ckpt[key])
    log(run, f"{stage}: resumed at step {ckpt['step']}")
    return ckpt["step"]


def save_atomic(obj, path: Path) -> None:
    """`torch.save` to a temporary file, then rename: a kill at any moment leaves the old file or the new one."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def log(run: Path, message: str) -> None:
    """Prints a line and appends it to the run's log.txt."""
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(run / "log.txt", "a") as f:
        f.write(line + "\n")


def load_config(run: Path, overrides: dict) -> Config:
    """The run's stored config, or a new one (with `overrides`) saved for the next resume."""
    path = run / "config.json"
    if path.exists():
        stored = json.loads(path.read_text())
        config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(config, k) != v}
        if changed:
            raise SystemExit(f"{path} was made with other settings than {changed}; use a new --run folder")
        return config
    config = Config(**{k: v for k, v in overrides.items() if v is not None})
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(config), indent=1))
    return config


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator for one training step: a pure function of the seed, the stage and the step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_019 + step)


def sample_timesteps(config: Config, num_train_timesteps: int, g: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, with a share moved to the noisier 60% of the schedule.

    At high noise the caption decides where the object is and what shape it has; at low noise the
    model only sharpens flat colours, which it learns quickly.
    """
    uniform = torch.randint(0, num_train_timesteps, (config.batch,), generator=g)
    high = torch.randint(int(0.4 * num_train_timesteps), num_train_timesteps, (config.batch,), generator=g)
    return torch.where(torch.rand(config.batch, generator=g) < config.high_noise_fraction, high, uniform)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- stages


def stage_data(run: Path, config: Config) -> None:
    """Renders the training set to data.npz (images and captions) and a held-out probe set."""
    path = run / "data.npz"
    if path.exists():
        log(run, f"data: {path} exists")
        return
    images, captions = world.render_dataset(config.num_images, seed=config.seed * 1_000_000,
                                            two_object_fraction=config.two_object_fraction)
    probe_images, probe_captions = world.render_dataset(64, seed=HELDOUT_SEED + config.seed, two_object_fraction=0.0,
                                                        split="heldout", progress=False)
    write_atomic(path, lambda tmp: np.savez(tmp, images=images, captions=np.array(captions), probe_images=probe_images,
                                            probe_captions=np.array(probe_captions)))
    log(run, f"data: {len(captions)} scenes, {len(set(captions))} distinct captions -> {path}")


def load_data(run: Path) -> dict:
    path = run / "data.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the 'data' stage first")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error measured in [-1, 1] (a range of 2), as on uint8 images in [0, 255]."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def stage_vae(run: Path, config: Config, steps: int) -> None:
    """Trains the VAE (L1 + MSE reconstruction, a faint KL term), then encodes the data set to latents."""
    from tqdm.auto import tqdm

    data = load_data(run)
    images = data["images"]
    vae = build_vae(config)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    ckpt_path = run / "vae.pt"
    start = resume(run, ckpt_path, "vae", model=vae, opt=opt)
    val = to_pixels(data["probe_images"])
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae", mininterval=10)
    vae.train()
    for step in bar:
        g = step_generator(config.seed, 1, step)
        idx = torch.randint(len(images), (config.vae_batch,), generator=g).numpy()
        top, left = (4 * torch.randint(0, (world.SIZE - config.vae_crop) // 4 + 1, (2,), generator=g)).tolist()
        x = to_pixels(images[np.sort(idx), top:top + config.vae_crop, left:left + config.vae_crop])
        for group in opt.param_groups:
            group["lr"] = config.vae_lr * lr_at(step, steps, 100)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt_path)
            with torch.no_grad():
                vae.eval()
                mse = F.mse_loss(vae.decode(vae.encode(val).latent_dist.mean).sample, val).item()
                vae.train()
            log(run, f"vae: step {done} loss {loss.item():.4f} val mse {mse:.5f} ({psnr_db(mse):.2f} dB)")
    encode_latents(run, config, vae, images[:config.num_latents], data["probe_images"])


@torch.no_grad()
def encode_latents(run: Path, config: Config, vae, images: np.ndarray, probe_images: np.ndarray) -> None:
    """Encodes every training image to its posterior mean and sets `scaling_factor` to 1 / their std."""
    from tqdm.auto import tqdm

    path = run / "latents.pt"
    if path.exists():
        return
    vae.eval()
    chunks = [vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean
              for i in tqdm(range(0, len(images), 256), desc="encoding", mininterval=10)]
    latents = torch.cat(chunks)
    scaling = 1.0 / latents.std().item()
    probe = vae.encode(to_pixels(probe_images)).latent_dist.mean
    save_atomic({"latents": (latents * scaling).half(), "probe": probe * scaling, "scaling_factor": scaling}, path)
    log(run, f"vae: latent std {1 / scaling:.4f}, scaling_factor {scaling:.4f} -> {path}")


def stage_decoder(run: Path, config: Config, steps: int) -> None:
    """Fine-tunes the VAE decoder alone on the stored latents: sharper images, same latent space.

    The UNet was trained on the encoder's latents, so the encoder stays frozen; the decoder learns
    to map exactly those latents back to the images, without an encoder pass per step.
    """
    from tqdm.auto import tqdm

    data = load_data(run)
    encoded = torch.load(run / "latents.pt", weights_only=False)
    latents, scaling = encoded["latents"], encoded["scaling_factor"]
    images = data["images"][:len(latents)]
    vae = build_vae(config)
    ckpt_path = run / "decoder.pt"
    source = ckpt_path if ckpt_path.exists() else run / "vae.pt"
    ckpt = torch.load(source, weights_only=False)
    vae.load_state_dict(ckpt["model"])
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.vae_lr / 2, weight_decay=0.0)
    start = 0
    if source == ckpt_path:
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["decoder_step"]
        log(run, f"decoder: resumed at step {start}")
    vae.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="decoder", mininterval=10)
    for step in bar:
        g = step_generator(config.seed, 3, step)
        idx = torch.randint(len(latents), (config.vae_batch,), generator=g)
        x = to_pixels(images[idx.numpy()])
        for group in opt.param_groups:
            group["lr"] = config.vae_lr / 2 * lr_at(step, steps, 50)
        recon = vae.decode(latents[idx].float() / scaling).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": ckpt["step"],
                         "decoder_step": done}, ckpt_path)
            log(run, f"decoder: step {done} loss {loss.item():.4f}")


def corrupt(caption: str, attribute: str, rng: np.random.Generator) -> str:
    """The caption with one attribute word of its first object (or its background) swapped for another."""
    words = caption.split(" ")
    choices = {"color": list(world.COLORS), "shape": list(world.SHAPES), "background": list(world.BACKGROUNDS),
               "position": ["left", "right", "top", "bottom", "center"]}[attribute]
    if attribute == "background":
        index = len(words) - 2 - (words[-2] == "gradient")
    else:
        index = next(i for i, w in enumerate(words) if w in choices)
    old = words[index]
    new = str(rng.choice([c for c in choices if c != old]))
    if attribute == "position":
        # "on the left" and "in the center" differ in their preposition too.
        phrase = world.POSITION_PHRASES[new].split(" ")
        words[index - 2:index + 1] = phrase
    else:
        words[index] = new
    return " ".join(words)


@torch.no_grad()
def conditioning_probe(unet, text_encoder, tokenizer, scheduler, probe: torch.Tensor, captions: list[str],
                       seed: int) -> dict[str, float]:
    """The v-loss on held-out latents with the right caption, one attribute corrupted, and no caption.

    A model that follows its captions has a clearly lower loss with the right one; if a corrupted
    attribute costs nothing, the model ignores that attribute.
    """
    rng = np.random.default_rng(seed)
    variants = {"right": captions, "empty": [""] * len(captions)}
    for attribute in ("color", "shape", "position", "background"):
        variants[attribute] = [corrupt(c, attribute, rng) for c in captions]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(probe.shape, generator=g)
    results = {}
    for name, texts in variants.items():
        states = text_encoder(tokenize(tokenizer, texts))[0]
        total = 0.0
        for t in PROBE_TIMESTEPS:
            timesteps = torch.full((len(probe),), t, dtype=torch.long)
            noisy = scheduler.add_noise(probe, noise, timesteps)
            target = scheduler.get_velocity(probe, noise, timesteps)
            total += F.mse_loss(unet(noisy, timesteps, states).sample, target).item()
        results[name] = total / len(PROBE_TIMESTEPS)
    return results


def stage_unet(run: Path, config: Config, steps: int) -> None:
    """Trains the UNet and the text encoder jointly on the latents, with EMA copies of both."""
    from tqdm.auto import tqdm

    latents_path = run / "latents.pt"
    if not latents_path.exists():
        raise SystemExit(f"{latents_path} is missing: run the 'vae' stage first")
    encoded = torch.load(latents_path, weights_only=False)
    latents, probe = encoded["latents"], encoded["probe"][:config.probe_size]
    data = load_data(run)
    captions = [str(c) for c in data["captions"][:len(latents)]]
    probe_captions = [str(c) for c in data["probe_captions"]][:config.probe_size]
    torch.manual_seed(config.seed)
    unet, text_encoder = build_unet(config), build_text_encoder(config)
    tokenizer, scheduler = build_tokenizer(), build_scheduler("ddpm")
    tokens = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ckpt_path = run / "unet.pt"
    start = resume(run, ckpt_path, "unet", unet=unet, text_encoder=text_encoder, ema_unet=ema_unet,
                   ema_text_encoder=ema_text, opt=opt)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(run, f"unet: {n_unet / 1e6:.2f}M parameters, text encoder {n_text / 1e6:.2f}M, {len(latents)} scenes")
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet", mininterval=10)
    started, losses = time.time(), []
    for step in bar:
        g = step_generator(config.seed, 2, step)
        idx = torch.randint(len(latents), (config.batch,), generator=g)
        x0 = latents[idx].float()
        ids = tokens[idx].clone()
        drop = torch.rand(config.batch, generator=g) < config.caption_dropout
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        timesteps = sample_timesteps(config, scheduler.config.num_train_timesteps, g)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.get_velocity(x0, noise, timesteps)
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_at(step, steps, config.warmup)
        pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_text.state_dict(),
                         "opt": opt.state_dict(), "step": done, "scaling_factor": encoded["scaling_factor"]},
                        ckpt_path)
        if done % config.probe_every == 0 or done == steps:
            rate = (time.time() - started) / (done - start)
            probe_losses = conditioning_probe(ema_unet, ema_text, tokenizer, scheduler, probe, probe_captions,
                                              config.seed)
            text = " ".join(f"{k} {v:.3f}" for k, v in probe_losses.items())
            log(run, f"unet: step {done} loss {np.mean(losses[-config.probe_every:]):.4f} "
                     f"{rate:.2f} s/step | probe {text}")


def stage_export(run: Path, config: Config, out: Path) -> None:
    """Saves the EMA weights as a fp16 safetensors `StableDiffusionPipeline` folder (atomically replaced)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    # The decoder fine-tune, when there is one, holds the same encoder and a better decoder.
    vae_path = run / "decoder.pt" if (run / "decoder.pt").exists() else run / "vae.pt"
    vae_ckpt = torch.load(vae_path, weights_only=False)
    unet_ckpt = torch.load(run / "unet.pt", weights_only=False)
    vae, unet, text_encoder = build_vae(config), build_unet(config), build_text_encoder(config)
    vae.load_state_dict(vae_ckpt["model"])
    vae.register_to_config(scaling_factor=unet_ckpt["scaling_factor"])
    unet.load_state_dict(unet_ckpt["ema_unet"])
    text_encoder.load_state_dict(unet_ckpt["ema_text_encoder"])
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_tokenizer(), scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Ship the tokenizer's own vocab.json and merges.txt, as SD checkpoints do, not a re-serialisation.
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    info = {"unet_steps": unet_ckpt["step"], "vae_steps": vae_ckpt["step"],
            "decoder_steps": vae_ckpt.get("decoder_step", 0), "config": asdict(config)}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if (out / "MODEL_CARD.md").exists():  # the card is written by hand: carry it over
        shutil.copy2(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(run, f"export: step {unet_ckpt['step']} -> {out} ({size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    """Command line: one stage per call, see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m prompt2prompt.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["data", "vae", "unet", "decoder", "export"])
    parser.add_argument("--run", type=Path, required=True, help="folder for the data, checkpoints and log")
    parser.add_argument("--steps", type=int, help="total optimisation steps of the stage (vae, unet)")
    parser.add_argument("--out", type=Path, help="export folder (export)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"seed": args.seed, "num_images": args.num_images, "batch": args.batch, "lr": args.lr}
    config = load_config(args.run, overrides)
    if args.stage in ("vae", "unet", "decoder") and (args.steps is None or args.steps < 1):
        parser.error(f"the {args.stage} stage needs --steps N with N >= 1, got {args.steps}")
    if args.stage == "export" and args.out is None:
        parser.error("the export stage needs --out FOLDER")
    if args.stage == "data":
        stage_data(args.run, config)
    elif args.stage == "vae":
        stage_vae(args.run, config, args.steps)
    elif args.stage == "unet":
        stage_unet(args.run, config, args.steps)
    elif args.stage == "decoder":
        stage_decoder(args.run, config, args.steps)
    else:
        stage_export(args.run, config, args.out)


if __name__ == "__main__":
    sys.exit(main())
