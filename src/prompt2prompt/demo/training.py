"""What both demo models' training shares: the config, the autoencoder, the text tokens, checkpoints and logs.

The stages themselves are in `train.py` (data, autoencoder, UNet; the command line) and `flow.py` (the
joint-attention model).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prompt2prompt.demo import world
from prompt2prompt.files import write_atomic, write_folder_atomic

# The real CLIP BPE tokenizer, read from the shipped UNet demo model's own folder: the package carries it, so that
# training runs from an installed wheel as from a checkout.
TOKENIZER_DIR = Path(__file__).parent / "model" / "tokenizer"
HELDOUT_SEED = 10_000_000  # held-out scenes use seeds from here on; training seeds stay far below


@dataclass
class Config:
    """Sizes and hyper-parameters of the demo model; stored with the run so a resume cannot change them."""

    seed: int = 0
    num_images: int = 40_000
    two_object_fraction: float = 0.2  # of the fixed-layout scenes
    free_fraction: float = 0.5  # scenes whose caption names no position (world.py's free layout)
    free_two_object_fraction: float = 0.6  # of the free-layout scenes: adding an object is where P2P shows most
    num_latents: int = 40_000  # the first images of the data set that the denoisers train on
    # VAE: 64x64x3 -> 16x16x4, diffusers' AutoencoderTiny: convolutions and ReLUs, no normalisation. A
    # GroupNorm decoder (AutoencoderKL) normalises over the whole picture, so a change in one corner of the
    # latents moves every pixel and a local blend cannot keep the rest as it was; this decoder's changes
    # stay within its receptive field. Every level has the same width (AutoencoderTiny's blocks need it).
    vae_channels: tuple[int, ...] = (48, 48, 48)
    vae_blocks: tuple[int, ...] = (1, 1, 1)  # AutoencoderTinyBlocks per level, encoder order (the decoder's reversed)
    vae_batch: int = 16
    # No normalisation, so crops train the same convolutions as whole pictures, 4x cheaper at 32.
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_latent_l2: float = 1e-4  # keeps the latents well inside the decoder's tanh clamp (+-3)
    # The decoder is trained on noisy latents (a share of their std), so that a denoiser's small errors decode cleanly.
    vae_latent_noise: float = 0.1
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
    # The joint-attention model (flow.py): SD3Transformer2DModel, two CLIP text encoders, no T5
    flow_layers: int = 6
    flow_heads: int = 4
    flow_head_dim: int = 32
    flow_text_widths: tuple[int, ...] = (128, 32)  # CLIP-L's and CLIP-G's places; the pooled text is both
    flow_t5_length: int = 256  # the zero tokens StableDiffusion3Pipeline appends by default (max_sequence_length)
    flow_lr: float = 5e-4


def build_vae(config: Config):
    """The demo's `AutoencoderTiny`: two downsamplings, 64x64x3 -> 16x16x4, no normalisation layer."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=config.vae_channels,
        decoder_block_out_channels=config.vae_channels, num_encoder_blocks=config.vae_blocks,
        num_decoder_blocks=tuple(reversed(config.vae_blocks)),
    )


def build_tokenizer():
    """The real CLIP BPE tokenizer, the one Stable Diffusion users hit."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


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


def optimizer_step(loss: torch.Tensor, opt, params: list, ema_params: list, step: int, ema_decay: float) -> None:
    """Backpropagates `loss`, clips the gradient norm at 1, steps `opt`, then moves the EMA copies towards `params`.

    The EMA's decay warms up as (1 + step) / (10 + step), so that its first steps follow the young model closely.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def load_data(run: Path) -> dict:
    path = run / "data.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the 'data' stage first")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_training_set(run: Path, config: Config) -> tuple[dict, list[str], list[str]]:
    """What a denoiser stage trains and probes on: the encoded latents (`latents.pt`: "latents", "probe",
    "scaling_factor"), the captions of those latents, and the probe's captions (`config.probe_size` of each)."""
    path = run / "latents.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the 'vae' stage first")
    encoded = torch.load(path, weights_only=False)
    encoded["probe"] = encoded["probe"][:config.probe_size]
    data = load_data(run)
    captions = [str(c) for c in data["captions"][:len(encoded["latents"])]]
    return encoded, captions, [str(c) for c in data["probe_captions"]][:config.probe_size]


def draw_batch(latents: torch.Tensor, tokens: torch.Tensor, empty: torch.Tensor, config: Config,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch drawn from `g`: latents (B, 4, 16, 16) in fp32 and their token ids, a share
    `config.caption_dropout` of them replaced by the empty caption's (classifier-free guidance learns from those)."""
    idx = torch.randint(len(latents), (config.batch,), generator=g)
    ids = tokens[idx].clone()
    ids[torch.rand(config.batch, generator=g) < config.caption_dropout] = empty
    return latents[idx].float(), ids


def psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error measured in [-1, 1] (a range of 2), as on uint8 images in [0, 255]."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


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


def vae_checkpoint(run: Path, config: Config):
    """The trained autoencoder and its checkpoint: the decoder fine-tune's when there is one (same encoder)."""
    path = run / "decoder.pt" if (run / "decoder.pt").exists() else run / "vae.pt"
    ckpt = torch.load(path, weights_only=False)
    vae = build_vae(config)
    vae.load_state_dict(ckpt["model"])
    return vae, ckpt


def export_folder(run: Path, pipe, out: Path, info: dict, config: Config, tokenizers: tuple[str, ...]) -> None:
    """Saves `pipe` (fp16 safetensors) with its training record, replacing `out` whole and atomically."""
    import shutil

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        # Ship the tokenizer's own vocab.json and merges.txt, as SD checkpoints do, not a re-serialisation.
        for name in tokenizers:
            shutil.rmtree(folder / name)
            shutil.copytree(TOKENIZER_DIR, folder / name)
        (folder / "training.json").write_text(json.dumps({**info, "config": asdict(config)}, indent=1))
        for name in ("MODEL_CARD.md", "prompt2prompt.json"):  # written by hand from the measurements: carried over
            if (out / name).exists():
                shutil.copy2(out / name, folder / name)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomic(out.parent, out.name, write, numbered=False, replace=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(run, f"export: {info} -> {out} ({size / 1e6:.1f} MB)")
