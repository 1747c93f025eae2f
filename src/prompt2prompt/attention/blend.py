"""Local blending: a latent mask from the recorded cross-attention maps of the blend words."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def word_mask(
    maps: torch.Tensor, positions: list[int], latent_size: tuple[int, int], threshold: float, *, pool: bool
) -> torch.Tensor:
    """Where the words' attention is high: a (h, w) boolean mask at the latent size.

    `maps` is one prompt's (res_h, res_w, L) attention; the words' tokens are summed, max-pooled 3x3
    (when `pool`), nearest-upsampled, divided by the maximum and compared with `threshold`.
    """
    if not positions:
        return torch.zeros(latent_size, dtype=torch.bool, device=maps.device)
    m = maps[..., positions].sum(-1)[None, None]  # (1, 1, res_h, res_w)
    if pool:
        m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_size, mode="nearest")[0, 0]
    return (m / m.max()) > threshold


def blend_mask(
    source_maps: torch.Tensor,
    edit_maps: torch.Tensor,
    latent_size: tuple[int, int],
    *,
    source_positions: list[int],
    edit_positions: list[int],
    threshold: float,
    exclude_source_positions: list[int] = (),
    exclude_edit_positions: list[int] = (),
    exclude_threshold: float = 0.3,
) -> torch.Tensor:
    """The union of the source words' and the edit words' masks, less what the excluded words cover."""
    mask = word_mask(source_maps, source_positions, latent_size, threshold, pool=True)
    mask |= word_mask(edit_maps, edit_positions, latent_size, threshold, pool=True)
    excluded = word_mask(source_maps, list(exclude_source_positions), latent_size, exclude_threshold, pool=False)
    excluded |= word_mask(edit_maps, list(exclude_edit_positions), latent_size, exclude_threshold, pool=False)
    return mask & ~excluded


def apply_blend(latents: torch.Tensor, row: int, mask: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """x_e = x_s + mask * (x_e - x_s) for the edit at `row` of (.., C, h, w) latents; returns new latents.

    The source x_s is `source` (C, h, w) when given (a cached source), else the first row.
    """
    m = mask.to(latents.dtype)
    source = latents[0] if source is None else source
    blended = source + m * (latents[row] - source)
    return torch.cat([latents[:row], blended[None], latents[row + 1 :]])


@dataclass(frozen=True)
class BlendSpec:
    """One edit's local blend, its words resolved to token positions."""

    source_positions: list[int]
    edit_positions: list[int]
    exclude_source_positions: list[int]
    exclude_edit_positions: list[int]
    threshold: float
    exclude_threshold: float
    start: float

    def mask(self, source_maps: torch.Tensor, edit_maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return blend_mask(
            source_maps, edit_maps, latent_size, source_positions=self.source_positions,
            edit_positions=self.edit_positions, threshold=self.threshold,
            exclude_source_positions=self.exclude_source_positions,
            exclude_edit_positions=self.exclude_edit_positions, exclude_threshold=self.exclude_threshold,
        )
