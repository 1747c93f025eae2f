"""Image input: files, PIL images and arrays in any mode, fitted to the sizes a model accepts."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from prompt2prompt.limits import check_pixels
from prompt2prompt.images import (fit_image, image_size, load_image, open_image, prepare_image, psnr,
                                  to_tensor)


class _Pipe:
    """Just the two attributes image sizing reads, to test the sizes of an SD (8x VAE, 64-latent) model."""

    class unet:
        class config:
            sample_size = 64

    vae_scale_factor = 8


def test_rgba_is_composited_over_the_background(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red, with alpha 0 on the left half and 255 on the right
    pixels[:, 2:, 3] = 255
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png", background=(0, 0, 255)))
    assert load_image(tmp_path / "a.png").mode == "RGB"
    assert (rgb[:, :2] == [0, 0, 255]).all()  # transparent: the background, not the hidden red
    assert (rgb[:, 2:] == [255, 0, 0]).all()


def test_grayscale_and_palette_become_rgb():
    gray = load_image(Image.new("L", (3, 2), 77))
    assert gray.mode == "RGB" and gray.size == (3, 2) and gray.getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert load_image(palette).getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_is_converted():
    rgb = load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))  # full magenta + yellow ink: red
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # Pillow keeps the 16 bits
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 4, 8))  # green left quarter
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "rotated.jpg")).astype(int)
    assert upright.shape == (16, 8, 3)
    assert (upright[0, :, 1] > upright[0, :, 0]).all()  # the green side is now on top
    assert (upright[-1, :, 0] > upright[-1, :, 1]).all()


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 200, np.uint8), (200, 200, 200)),
        (np.full((2, 3, 1), 200, np.uint8), (200, 200, 200)),
        (np.full((2, 3, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((2, 3, 3), 65535, np.uint16), (255, 255, 255)),
        (np.ones((2, 3), bool), (255, 255, 255)),
        (np.concatenate([np.zeros((2, 3, 3)), np.ones((2, 3, 1))], -1).astype(np.float64), (0, 0, 0)),
    ],
)
def test_arrays(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (3, 2) and image.getpixel((2, 1)) == expected


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 8, 8), np.uint8), "transpose"),
        (np.zeros((8, 8, 2), np.uint8), r"\(8, 8, 2\)"),
        (np.full((2, 2), 1.5), r"\[0, 1\]"),
        (np.zeros((2, 2), np.int64), "int64"),
        (np.zeros((0, 2), np.uint8), "empty"),
    ],
)
def test_bad_arrays_get_clear_errors(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


def test_corrupt_and_missing_files_get_clear_errors(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.png.*corrupt"):
        load_image(tmp_path / "junk.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:60])  # truncated mid-data
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        load_image([[0, 1]])


def test_crop_keeps_the_centre_and_pad_keeps_everything():
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 0, 255), (10, 0, 20, 10))  # blue centre third
    cropped = fit_image(wide, 8, 8, fit="crop")
    assert cropped.size == (8, 8) and np.asarray(cropped)[..., 2].min() > 200
    padded = np.asarray(fit_image(wide, 12, 12, fit="pad", background=(0, 255, 0)))
    assert padded.shape == (12, 12, 3)
    assert (padded[0] == [0, 255, 0]).all() and (padded[-1] == [0, 255, 0]).all()  # letterboxed
    assert padded[6, 0, 0] > 200 and padded[6, 6, 2] > 200  # red sides and blue centre both survive
    with pytest.raises(ValueError, match="'stretch'"):
        fit_image(wide, 8, 8, fit="stretch")


def test_sizes_default_to_the_model_and_must_be_latent_multiples_of_8():
    assert image_size(_Pipe) == (512, 512)
    assert image_size(_Pipe, height=768) == (768, 512)
    with pytest.raises(ValueError, match=r"height=520 .*multiple of 64 px.*height=512"):
        image_size(_Pipe, height=520)
    with pytest.raises(ValueError, match="width=0"):
        image_size(_Pipe, width=0)
    image = prepare_image(_Pipe, np.zeros((300, 200, 3), np.uint8), width=384, fit="pad")
    assert image.size == (384, 512) and image.mode == "RGB"


def test_to_tensor_range_and_psnr():
    image = Image.fromarray(np.array([[[0, 255, 51]]], np.uint8))
    assert to_tensor(image).flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6])
    noisy = np.full((4, 4, 3), 100, np.uint8)
    noisy[0, 0, 0] = 110  # mse = 100 / 48
    assert psnr(noisy, np.full((4, 4, 3), 100, np.uint8)) == pytest.approx(10 * np.log10(255**2 * 48 / 100))
    assert psnr(noisy, noisy) == float("inf")
    with pytest.raises(ValueError, match="same size"):
        psnr(noisy, np.zeros((2, 2, 3), np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims `width` x `height` pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


METADATA_BOMBS = {  # kind -> what the error says of it
    "text": "over 64 MiB of PNG text chunks",
    "ztxt": "a compressed PNG text chunk or colour profile that unpacks to over 1 MiB",
}


def metadata_bomb_png(kind: str) -> bytes:
    """An 8x8 PNG whose metadata Pillow refuses to read: "text", 65 MiB of text chunks (its limit is 64 MiB), or
    "ztxt", a compressed text chunk of a few KiB that unpacks to 2 MiB (its limit is 1 MiB)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    chunk = (png_chunk(b"tEXt", b"Comment\0" + b"x" * (65 << 20)) if kind == "text"
             else png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b" " * (2 << 20), 9)))
    return png[:33] + chunk + png[33:]  # after the signature (8 bytes) and the IHDR chunk (25)


@pytest.mark.parametrize("kind", METADATA_BOMBS)
def test_a_png_with_oversized_metadata_is_one_error_in_our_words(tmp_path, kind):
    """Pillow's own message names its internals ("...>MAX_TEXT_MEMORY", "PngImagePlugin.MAX_TEXT_CHUNK")."""
    path = tmp_path / "meta.png"
    path.write_bytes(metadata_bomb_png(kind))
    with pytest.raises(ValueError) as caught:
        open_image(path)
    assert str(caught.value) == (f"'{path}' has metadata too large to read safely ({METADATA_BOMBS[kind]}): save the "
                                 "picture again without its metadata")


@pytest.mark.parametrize("side", [20_000, 10_000])  # over twice Pillow's limit (its error), and over it (a warning)
def test_a_decompression_bomb_is_one_clear_error_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(side, side))
    for read in (load_image, open_image):
        with pytest.raises(ValueError, match=r"^'.*bomb.png' is too large to decode safely .*resize it first$"):
            read(bomb)


def test_sizes_beyond_4x_the_models_pixels_are_refused():
    assert image_size(_Pipe, height=1024, width=1024) == (1024, 1024)
    assert image_size(_Pipe, height=512, width=2048) == (512, 2048)
    with pytest.raises(ValueError, match="height=1536 and width=1536 make 2359296 pixels, more than 4 times this "
                                         "model's native 512x512; .*e.g. 1024x1024"):
        image_size(_Pipe, height=1536, width=1536)
    with pytest.raises(ValueError, match="more than 4 times"):
        check_pixels(8192, 8192, 512)
    with pytest.raises(ValueError, match="height=nan"):
        image_size(_Pipe, height=float("nan"))  # no nearest size to suggest, and no crash looking for one


def test_a_caption_far_too_long_for_its_tile_is_cut_at_once():
    """A recipe can carry a huge label (100,000 reweighted words): cutting it one character at a time took minutes."""
    import time

    from prompt2prompt.visualize import caption

    started = time.perf_counter()
    tile = caption(Image.new("RGB", (64, 64), "white"), "reweight " + "green, " * 100_000 + "x1", width=256)
    assert time.perf_counter() - started < 2 and tile.size == (256, 256 + 18)
    strip = np.asarray(tile.convert("L"))[256:]
    assert strip.min() < 128 and (strip[:, -2:] == 255).all()  # text written, and it stops inside the tile
