"""Visualisation: per-token attention heatmaps and captioned image grids."""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 18


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def caption(image: Image.Image, text: str, width: int | None = None) -> Image.Image:
    """The image (resized to `width` if given) with `text` written on a white strip beneath it."""
    if width is not None and image.width != width:
        image = image.resize((width, round(image.height * width / image.width)), Image.NEAREST)
    out = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font()
    if len(text) > image.width:  # no character is narrower than a pixel: cut first, so the loop below stays short
        text = text[: image.width - 1] + "…"
    while text and draw.textlength(text, font=font) > image.width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((2, image.height + 2), text, fill="black", font=font)
    return out


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, *, cols: int | None = None, width: int = 256) -> Image.Image:
    """Lay images out in a grid, each scaled to `width` px and captioned.

    >>> image_grid([Image.new("RGB", (64, 64))] * 3, ["a", "b", "c"], width=64).size
    (192, 82)
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(captions)} captions")
    tiles = [caption(im, text, width) for im, text in zip(images, captions)]
    cols = cols or len(tiles)
    rows = -(-len(tiles) // cols)
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    for n, tile in enumerate(tiles):
        grid.paste(tile, ((n % cols) * tile_w, (n // cols) * tile_h))
    return grid


def heatmap(attention: torch.Tensor, image: Image.Image | None = None, size: int = 256) -> Image.Image:
    """One (h, w) attention map as a heat image, laid over `image` when given."""
    a = attention.detach().float().cpu()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    w = size if image is None else image.width
    h = round(size * a.shape[0] / a.shape[1]) if image is None else image.height
    a = np.asarray(Image.fromarray((a.numpy() * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    # A black-red-yellow ramp: readable without a colour-map dependency.
    heat = np.stack([np.clip(2 * a, 0, 1), np.clip(2 * a - 1, 0, 1), np.zeros_like(a)], -1)
    if image is not None:
        base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        heat = 0.5 * base + 0.5 * heat
    return Image.fromarray((heat * 255).astype(np.uint8))


def attention_heatmaps(result, prompt_index: int = 0, res: int | None = None, *, overlay: bool = True) -> list[Image.Image]:
    """Per-token cross-attention heatmaps of one prompt of an EditResult, captioned with each token.

    On the transformers, one heatmap per word: its text-block attention summed over its tokens in every text part.

    The result must come from `edit(..., record_attention=...)`; `res` picks a recorded resolution
    (default: the first one).
    """
    if not result.attention:
        raise ValueError("this result has no attention maps; call edit(..., record_attention=True)")
    if res is None:
        res = next(iter(result.attention))
    if res not in result.attention:
        raise ValueError(f"no attention was recorded at resolution {res}; recorded: {sorted(result.attention)}")
    if not 0 <= prompt_index < len(result.prompts):
        raise ValueError(f"prompt_index {prompt_index} is out of range for {len(result.prompts)} prompts")
    maps = result.attention[res][prompt_index]  # (h, w, L)
    image = None
    if overlay and isinstance(result.images, list) and isinstance(result.images[prompt_index], Image.Image):
        image = result.images[prompt_index]
    if getattr(result, "map_unit", "token") == "word":
        # A joint text holds a word in several parts (SD3: CLIP and T5) and pads each: one map per word, summed
        # over all its tokens, as local blending sums them.
        return [caption(heatmap(maps[..., positions].sum(-1), image), word)
                for word, positions in result.words[prompt_index] if positions]
    tokens = result.tokens[prompt_index]
    return [caption(heatmap(maps[..., j], image), tokens[j]) for j in range(1, len(tokens) - 1)]
