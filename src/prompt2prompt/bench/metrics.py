"""PIE-Bench's seven metrics, computed as the reference evaluator computes them (cure-lab/PnPInversion,
`evaluation/matrics_calculator.py` and `evaluate.py`), quirks included.

- Structure distance (x10^3): DINO ViT-B/8's keys of the last block (all heads concatenated, every token with
  CLS), their cosine self-similarity matrix, and the MSE between the source's and the edit's. The whole images,
  as float 0-255 pixels resized to 224 on the short side (480 at most on the long one) and then normalised with
  ImageNet's mean and std: the reference never divides by 255, so neither does this.
- On the unedited region, both images multiplied by (1 - mask) (the rest black), with torchmetrics: PSNR (data
  range 1), LPIPS (x10^3, SqueezeNet, inputs in [-1, 1]), MSE (x10^4) and SSIM (x10^2). A mask that covers the
  whole image gives NaN, which the table's means skip.
- CLIP score (torchmetrics `CLIPScore`, CLIP ViT-L/14, max(100 cos, 0), on uint8 pixels) of the edited image
  against the editing prompt: the whole image, and the image times the mask (the rest black, the whole frame).

Metric models load by hub id or local folder (the HF cache, `HF_HUB_OFFLINE`); a model that cannot load is one
`MetricError` naming it and how to leave the metric out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CLIP", "DINO", "METRICS", "SCALE", "MetricError", "Metrics", "structure_distance"]

METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
# How the tables print each metric (the published rows' units): structure, LPIPS and MSE are scaled up.
SCALE = {"structure_distance": 1e3, "psnr": 1.0, "lpips": 1e3, "mse": 1e4, "ssim": 1e2, "clip_whole": 1.0,
         "clip_edited": 1.0}
DINO = "facebook/dino-vitb8"
CLIP = "openai/clip-vit-large-patch14"
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class MetricError(ValueError):
    """A metric that cannot be computed here (its model or library is missing); the message says what to do."""


def _resize_224(x: torch.Tensor, size: int = 224, max_size: int = 480) -> torch.Tensor:
    """torchvision's `Resize(224, max_size=480)` of a (1, C, H, W) float tensor: bilinear, antialiased."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out = (new_short, new_long) if h <= w else (new_long, new_short)
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)


def _last_keys_module(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of a ViT's last attention block (transformers names it `k_proj` or `key`)."""
    keys = [m for name, m in model.named_modules() if name.endswith((".k_proj", ".key"))]
    if not keys:
        raise MetricError(f"{type(model).__name__} has no key projection to read the structure from")
    return keys[-1]


def structure_distance(dino: torch.nn.Module, source: np.ndarray, edited: np.ndarray) -> float:
    """MSE between the cosine self-similarities of DINO's last-block keys on two (H, W, 3) uint8 images."""
    device = next(dino.parameters()).device
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in _IMAGENET)
    sims = []
    for image in (source, edited):
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1))[None].to(device)
        x = (_resize_224(x) - mean) / std  # on 0-255 values, as the reference does
        captured: list[torch.Tensor] = []
        hook = _last_keys_module(dino).register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            with torch.no_grad():
                dino(pixel_values=x, interpolate_pos_encoding=True)
        finally:
            hook.remove()
        keys = captured[-1][0]  # (tokens, heads * head_dim): every head's keys side by side
        norms = keys.norm(dim=-1, keepdim=True)
        sims.append((keys @ keys.T) / torch.clamp(norms @ norms.T, min=1e-8))
    return float(F.mse_loss(sims[1], sims[0]))


def _unit(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W) in [0, 1]


class Metrics:
    """The requested metrics, their models loaded once: `metrics(source, edited, mask, prompt)` -> values.

    Args:
        names: which of `METRICS` to compute.
        dino, clip: hub ids or local folders of the structure-distance and CLIP models, or loaded models (a
            `ViTModel`; a callable returning `(CLIPModel, CLIPProcessor)`, as torchmetrics' `CLIPScore` takes).
        lpips: None (torchmetrics' SqueezeNet LPIPS, which needs torchvision) or a callable `(a, b) -> tensor` on
            (1, 3, H, W) images in [-1, 1].
    """

    def __init__(self, names: Sequence[str] = METRICS, *, device: str | torch.device = "cpu", dino: Any = DINO,
                 clip: Any = CLIP, lpips: Callable | None = None):
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise MetricError(f"unknown metrics {unknown}; the metrics are {', '.join(METRICS)}")
        self.names = [name for name in METRICS if name in names]
        self.device = torch.device(device)
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise MetricError("the metrics need torchmetrics: pip install 'prompt2prompt[bench]'") from None
        self.dino = self._dino(dino) if "structure_distance" in self.names else None
        self.clip = self._clip(clip) if {"clip_whole", "clip_edited"} & set(self.names) else None
        self.lpips = self._lpips(lpips) if "lpips" in self.names else None

    def _dino(self, dino: Any) -> torch.nn.Module:
        if isinstance(dino, torch.nn.Module):
            return dino.to(self.device).eval()
        from transformers import ViTModel

        try:
            return ViTModel.from_pretrained(str(dino), add_pooling_layer=False).to(self.device).eval()
        except Exception as error:  # noqa: BLE001 (any loading failure is one line naming the model)
            raise MetricError(_cannot_load("structure_distance", "--dino", dino, error)) from None

    def _clip(self, clip: Any):
        from torchmetrics.multimodal import CLIPScore

        if callable(clip):
            model, processor = clip()
        else:
            from transformers import CLIPModel, CLIPProcessor

            try:
                model, processor = CLIPModel.from_pretrained(str(clip)), CLIPProcessor.from_pretrained(str(clip))
            except Exception as error:  # noqa: BLE001
                raise MetricError(_cannot_load("clip_whole and clip_edited", "--clip", clip, error)) from None
        features = _TensorFeatures(model)
        return CLIPScore(model_name_or_path=lambda: (features, processor)).to(self.device)

    def _lpips(self, lpips: Callable | None) -> Callable:
        if lpips is not None:
            return lpips
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            return LearnedPerceptualImagePatchSimilarity(net_type="squeeze").to(self.device)
        except Exception as error:  # noqa: BLE001 (torchvision missing or not matching torch; weights not cached)
            raise MetricError(f"lpips cannot be computed here ({' '.join(str(error).split())[:160]}): torchmetrics' "
                              "LPIPS needs torchvision and its SqueezeNet weights; leave it out with --metrics") from None

    def __call__(self, source: np.ndarray, edited: np.ndarray, mask: np.ndarray, prompt: str) -> dict[str, float]:
        """Every requested metric of one edit: (H, W, 3) uint8 images, an (H, W) 0/1 mask, the editing prompt."""
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
        from torchmetrics.functional.regression import mean_squared_error

        if source.shape != edited.shape or mask.shape != source.shape[:2]:
            raise ValueError(f"source {source.shape}, edit {edited.shape} and mask {mask.shape} must be the same size")
        keep = torch.from_numpy(1.0 - np.asarray(mask, dtype=np.float32))[None]  # (1, H, W): the unedited region
        a, b = (_unit(image) * keep for image in (source, edited))
        a, b = a[None].to(self.device), b[None].to(self.device)
        untouched = bool(keep.sum() > 0)
        values: dict[str, float] = {}
        for name in self.names:
            if name in ("psnr", "lpips", "mse", "ssim") and not untouched:
                values[name] = math.nan  # the mask covers the whole image: nothing is left unedited
            elif name == "psnr":
                values[name] = float(peak_signal_noise_ratio(a, b, data_range=1.0))
            elif name == "mse":
                values[name] = float(mean_squared_error(a[0].contiguous(), b[0].contiguous()))
            elif name == "ssim":
                values[name] = float(structural_similarity_index_measure(a, b, data_range=1.0))
            elif name == "lpips":
                with torch.no_grad():
                    values[name] = float(self.lpips(a * 2 - 1, b * 2 - 1))
            elif name == "structure_distance":
                values[name] = structure_distance(self.dino, source, edited)
            elif name == "clip_whole":
                values[name] = self._clip_score(edited, prompt)
            elif name == "clip_edited":
                values[name] = self._clip_score(np.uint8(edited * np.asarray(mask)[..., None]), prompt) \
                    if mask.sum() else math.nan
        return values

    def _clip_score(self, image: np.ndarray, prompt: str) -> float:
        with torch.no_grad():
            return float(self.clip(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device), prompt))


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose `get_image_features` and `get_text_features` return the projected embeddings as tensors,
    as torchmetrics' `CLIPScore` expects; transformers 5 returns them as the `pooler_output` of an output object."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _cannot_load(metric: str, option: str, model: Any, error: Exception) -> str:
    detail = " ".join(str(error).split())[:160]
    return (f"cannot load the {metric} model {str(model)!r} ({detail}); download it into the HF cache, pass its folder "
            f"with {option}, or leave the metric out with --metrics")
