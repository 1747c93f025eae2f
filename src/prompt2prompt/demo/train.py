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
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prompt2prompt.demo import world
from prompt2prompt.demo.training import (HELDOUT_SEED, Config, build_tokenizer, build_vae, corrupt, draw_batch,
                                         export_folder, load_config, load_data, load_training_set, log, lr_at,
                                         optimizer_step, psnr_db, resume, save_atomic, step_generator, to_pixels,
                                         tokenize, vae_checkpoint)
from prompt2prompt.files import write_atomic

PROBE_TIMESTEPS = (300, 600, 850)

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


def build_scheduler(kind: str = "ddim"):
    """The noise schedule: v-prediction on zero-terminal-SNR betas with trailing timesteps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    settings = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                    clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**settings)
    return DDIMScheduler(**settings, set_alpha_to_one=False, steps_offset=0)


def sample_timesteps(config: Config, num_train_timesteps: int, g: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, with a share moved to the noisier 60% of the schedule.

    At high noise the caption decides where the object is and what shape it has; at low noise the
    model only sharpens flat colours, which it learns quickly.
    """
    uniform = torch.randint(0, num_train_timesteps, (config.batch,), generator=g)
    high = torch.randint(int(0.4 * num_train_timesteps), num_train_timesteps, (config.batch,), generator=g)
    return torch.where(torch.rand(config.batch, generator=g) < config.high_noise_fraction, high, uniform)


def stage_data(run: Path, config: Config) -> None:
    """Renders the training set to data.npz (images and captions) and a held-out probe set."""
    path = run / "data.npz"
    if path.exists():
        log(run, f"data: {path} exists")
        return
    images, captions = world.render_dataset(config.num_images, seed=config.seed * 1_000_000,
                                            two_object_fraction=config.two_object_fraction,
                                            free_fraction=config.free_fraction,
                                            free_two_object_fraction=config.free_two_object_fraction)
    probe_images, probe_captions = world.render_dataset(64, seed=HELDOUT_SEED + config.seed, two_object_fraction=0.0,
                                                        split="heldout", progress=False)
    write_atomic(path, lambda tmp: np.savez(tmp, images=images, captions=np.array(captions), probe_images=probe_images,
                                            probe_captions=np.array(probe_captions)))
    log(run, f"data: {len(captions)} scenes, {len(set(captions))} distinct captions -> {path}")


def stage_vae(run: Path, config: Config, steps: int) -> None:
    """Trains the autoencoder (L1 + MSE reconstruction of noisy latents), then encodes the data set to latents."""
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
        z = vae.encode(x).latents
        noise = config.vae_latent_noise * z.detach().std() * torch.randn(z.shape, generator=g)
        recon = vae.decode(z + noise).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.vae_latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt_path)
            with torch.no_grad():
                vae.eval()
                mse = F.mse_loss(vae.decode(vae.encode(val).latents).sample, val).item()
                vae.train()
            log(run, f"vae: step {done} loss {loss.item():.4f} val mse {mse:.5f} ({psnr_db(mse):.2f} dB)")
    encode_latents(run, config, vae, images[:config.num_latents], data["probe_images"])


@torch.no_grad()
def encode_latents(run: Path, config: Config, vae, images: np.ndarray, probe_images: np.ndarray) -> None:
    """Encodes every training image to its latents and sets `scaling_factor` to 1 / their std."""
    from tqdm.auto import tqdm

    path = run / "latents.pt"
    if path.exists():
        return
    vae.eval()
    chunks = [vae.encode(to_pixels(images[i:i + 256])).latents
              for i in tqdm(range(0, len(images), 256), desc="encoding", mininterval=10)]
    latents = torch.cat(chunks)
    scaling = 1.0 / latents.std().item()
    probe = vae.encode(to_pixels(probe_images)).latents
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
    params = list(vae.decoder.parameters())
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


def stage_unet(run: Path, config: Config, steps: int, init: Path | None = None) -> None:
    """Trains the UNet and the text encoder jointly on the latents, with EMA copies of both.

    `init`, a trained demo model folder, gives the starting weights (before any checkpoint of the run).
    """
    from tqdm.auto import tqdm

    encoded, captions, probe_captions = load_training_set(run, config)
    latents, probe = encoded["latents"], encoded["probe"]
    torch.manual_seed(config.seed)
    unet, text_encoder = build_unet(config), build_text_encoder(config)
    if init is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder").state_dict())
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
        x0, ids = draw_batch(latents, tokens, empty, config, g)
        noise = torch.randn(x0.shape, generator=g)
        timesteps = sample_timesteps(config, scheduler.config.num_train_timesteps, g)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.get_velocity(x0, noise, timesteps)
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_at(step, steps, config.warmup)
        pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        optimizer_step(loss, opt, params, ema_params, step, config.ema_decay)
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
    from diffusers import StableDiffusionPipeline

    vae, vae_ckpt = vae_checkpoint(run, config)
    unet_ckpt = torch.load(run / "unet.pt", weights_only=False)
    unet, text_encoder = build_unet(config), build_text_encoder(config)
    vae.register_to_config(scaling_factor=unet_ckpt["scaling_factor"])
    unet.load_state_dict(unet_ckpt["ema_unet"])
    text_encoder.load_state_dict(unet_ckpt["ema_text_encoder"])
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_tokenizer(), scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    info = {"unet_steps": unet_ckpt["step"], "vae_steps": vae_ckpt["step"],
            "decoder_steps": vae_ckpt.get("decoder_step", 0)}
    export_folder(run, pipe, out, info, config, tokenizers=("tokenizer",))


def main(argv: list[str] | None = None) -> None:
    """Command line: one stage per call, see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m prompt2prompt.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["data", "vae", "unet", "decoder", "export", "flow", "export-flow"])
    parser.add_argument("--run", type=Path, required=True, help="folder for the data, checkpoints and log")
    parser.add_argument("--steps", type=int, help="total optimisation steps of the stage (vae, unet)")
    parser.add_argument("--out", type=Path, help="export folder (export, export-flow)")
    parser.add_argument("--init", type=Path, help="a trained demo model folder to start from (unet: its UNet and "
                                                  "text encoder; flow: its text encoder as the first one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"seed": args.seed, "num_images": args.num_images, "batch": args.batch, "lr": args.lr}
    config = load_config(args.run, overrides)
    if args.stage in ("vae", "unet", "decoder", "flow") and (args.steps is None or args.steps < 1):
        parser.error(f"the {args.stage} stage needs --steps N with N >= 1, got {args.steps}")
    if args.stage in ("export", "export-flow") and args.out is None:
        parser.error("the export stage needs --out FOLDER")
    if args.stage == "data":
        stage_data(args.run, config)
    elif args.stage == "vae":
        stage_vae(args.run, config, args.steps)
    elif args.stage == "unet":
        stage_unet(args.run, config, args.steps, init=args.init)
    elif args.stage == "flow":
        from prompt2prompt.demo.flow import stage_flow

        stage_flow(args.run, config, args.steps, init_text=args.init and args.init / "text_encoder")
    elif args.stage == "export-flow":
        from prompt2prompt.demo.flow import export_flow

        export_flow(args.run, config, args.out)
    elif args.stage == "decoder":
        stage_decoder(args.run, config, args.steps)
    else:
        stage_export(args.run, config, args.out)


if __name__ == "__main__":
    sys.exit(main())
