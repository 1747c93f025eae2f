"""Image input for real-image editing: any file, PIL image or array, in any mode, fitted to a size the model accepts."""

from __future__ import annotations


import warnings
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .families import family_of

ImageInput = str | PathLike | Image.Image | np.ndarray



def load_image(image: ImageInput, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Read a path, PIL image or array into an 8-bit RGB PIL image, upright.

    EXIF orientation is applied; transparency (RGBA, LA, palette) is composited over `background`; 16-bit and
    float images are scaled to 8 bits rather than clipped; CMYK is converted. Arrays are (H, W), (H, W, 1),
    (H, W, 3) or (H, W, 4), of uint8, uint16, bool, or floats in [0, 1].

    >>> load_image(np.zeros((4, 6), dtype=np.uint16)).size
    (6, 4)
    """
    if isinstance(image, (str, PathLike)):
        image = open_image(image)
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"an image must be a file path, a PIL image or a numpy array, not {type(image).__name__}; "
            "convert tensors with `tensor.permute(1, 2, 0).cpu().numpy()`"
        )
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a crafted EXIF block can break Pillow's parser in many ways
        raise ValueError(f"the image's EXIF orientation cannot be read ({_one_line(error)}); save it without "
                         "EXIF") from None
    return _to_rgb(image, background)


def fit_image(
    image: Image.Image,
    height: int,
    width: int,
    *,
    fit: Literal["crop", "pad"] = "crop",
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Resize `image` to `width` x `height`, keeping its aspect ratio: centre-crop the overflow or pad the rest.

    >>> fit_image(Image.new("RGB", (40, 20)), 16, 16, fit="pad").size
    (16, 16)
    """
    if min(image.size) < 1:
        raise ValueError(f"the image is {image.width}x{image.height} pixels: there is nothing to edit")
    if fit == "crop":
        return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    if fit == "pad":
        return ImageOps.pad(image, (width, height), method=Image.Resampling.LANCZOS, color=background)
    raise ValueError(f"fit must be 'crop' or 'pad', not {fit!r}")


def fit_note(size: tuple[int, int], height: int, width: int, *, fit: Literal["crop", "pad"] = "crop") -> str | None:
    """What fitting an image of `size` (width, height) to `width` x `height` does, in one line; None: nothing.

    >>> fit_note((256, 192), 64, 64)
    "the image is 256x192 px: it was resized and centre-cropped to the model's 64x64 px, the size of the results"
    >>> fit_note((64, 64), 64, 64) is None
    True
    """
    if tuple(size) == (width, height):
        return None
    how = "resized" if size[0] * height == size[1] * width else {"crop": "resized and centre-cropped",
                                                                 "pad": "resized and padded"}[fit]
    return f"the image is {size[0]}x{size[1]} px: it was {how} to the model's {width}x{height} px, the size of the results"


def image_size(pipe, *, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The pixel size (height, width) to use with `pipe`: the caller's, checked, or the model's default.

    Both sides must be multiples of what the model's family needs (SD: 8 latent pixels, 64 px; the transformers: a
    2x2 patch of the VAE's factor, 16 px).
    """
    family = family_of(pipe)
    default = family.default_size()
    height = default if height is None else height
    width = default if width is None else width
    unit = family.inversion_multiple()
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % unit:
            sane = isinstance(value, (int, float)) and 0 < value < 2**31  # NaN and 10**400 have no nearest
            nearest = max(unit, round(value / unit) * unit) if sane else default
            raise ValueError(
                f"{name}={value!r} is not a size this model accepts: it must be a positive multiple of {unit} px "
                f"({family.size_unit()}); use for example {name}={nearest}"
            )
    family.check_pixels(height, width)
    return height, width


def prepare_image(
    pipe,
    image: ImageInput,
    *,
    height: int | None = None,
    width: int | None = None,
    fit: Literal["crop", "pad"] = "crop",
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Load `image` and fit it to `height` x `width` (default: the model's own size) for `pipe`."""
    height, width = image_size(pipe, height=height, width=width)
    return fit_image(load_image(image, background=background), height, width, fit=fit, background=background)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) float32 tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def psnr(image: ImageInput, reference: ImageInput) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit RGB images of the same size.

    >>> round(psnr(np.full((2, 2), 0, np.uint8), np.full((2, 2), 255, np.uint8)), 1)
    0.0
    """
    a = np.asarray(load_image(image), dtype=np.float64)
    b = np.asarray(load_image(reference), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same size, got {a.shape[1::-1]} and {b.shape[1::-1]}")
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def open_image(path: str | PathLike) -> Image.Image:
    """Open and decode an image file, refusing what is not an image and what is too large to decode safely.

    Real images to edit (files, uploads) come through here. Raises FileNotFoundError for a missing file and
    ValueError for anything else, one line that starts with the quoted path: not an image, corrupt or truncated, or
    larger than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89 million pixels), which a
    crafted header can claim in a few bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at '{path}'")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()  # decode now, so that a truncated file fails here and not deep inside a resize
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"'{path}' is too large to decode safely ({_one_line(error)}); prompt2prompt reads images of up to "
            f"{Image.MAX_IMAGE_PIXELS} pixels: resize it first"
        ) from None
    except Exception as error:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        if metadata := metadata_too_large(error):
            raise ValueError(f"'{path}' has {metadata}: save the picture again without its metadata") from None
        raise ValueError(
            f"'{path}' is not an image that can be read ({_one_line(error)}): it is corrupt or in a format Pillow "
            "does not read; use PNG, JPEG, WebP, TIFF or BMP"
        ) from None
    return image


def metadata_too_large(error: Exception) -> str | None:
    """Pillow's refusal of a PNG's oversized metadata, in words (its own message names its internal limits,
    `MAX_TEXT_MEMORY` and `MAX_TEXT_CHUNK`); None for any other error. Images and recipes are read with it."""
    text = str(error) if isinstance(error, ValueError) else ""
    if "MAX_TEXT_MEMORY" in text:
        return f"metadata too large to read safely (over {PngImagePlugin.MAX_TEXT_MEMORY >> 20} MiB of PNG text chunks)"
    if "MAX_TEXT_CHUNK" in text:
        return ("metadata too large to read safely (a compressed PNG text chunk or colour profile that unpacks to "
                f"over {PngImagePlugin.MAX_TEXT_CHUNK >> 20} MiB)")
    return None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
            "for a channels-first (C, H, W) array use `array.transpose(1, 2, 0)`"
        )
    if array.size == 0:
        raise ValueError(f"the image array is empty (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _to_uint8(array.astype(np.float64) / 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"a float image array must hold values in [0, 1], got [{array.min()}, {array.max()}]; "
                "divide 8-bit values by 255"
            )
        array = _to_uint8(array)
    elif array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, uint16, bool or float in [0, 1], not {array.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own conversion clips these to 0..255, which turns a 16-bit image white
        values = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 65535.0
        image = Image.fromarray(_to_uint8(np.clip(values / scale, 0, 1)), mode="L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


NON_FINITE = ("the result has NaN/inf values (a float16 overflow, usually): run in float32, or try another guidance "
              "scale, weight or seed")


def check_finite_images(images) -> None:
    """Raise RuntimeError when a result's images hold NaN or infinite values (a run that diverged).

    `images`: a float array or tensor, or a list of them or of PIL images. A PIL image can no longer hold NaN:
    diffusers turned those pixels into 0s, so an image that is black in every pixel and channel counts as NaN.
    The engine checks every run's floats before they become PIL images.

    >>> check_finite_images(np.full((2, 8, 8, 3), 0.5))
    >>> check_finite_images([np.full((8, 8, 3), np.nan)])
    Traceback (most recent call last):
    ...
    RuntimeError: the result has NaN/inf values (a float16 overflow, usually): run in float32, or try another guidance scale, weight or seed
    """
    items = images if isinstance(images, (list, tuple)) else [images]
    for item in items:
        if isinstance(item, Image.Image):
            bad = item.mode in ("RGB", "L") and item.getbbox() is None  # every pixel 0
        elif isinstance(item, torch.Tensor):
            bad = not bool(torch.isfinite(item).all())
        else:
            array = np.asarray(item)
            bad = array.dtype.kind in "fc" and not np.isfinite(array).all()
        if bad:
            raise RuntimeError(NON_FINITE)
