"""The hostile input files: pictures, model folders, pickles, canary modules, PNGs carrying recipes.

Every file is made here, deterministically; a case's `setup` writes what it needs under its folder's `in/`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .case import CANARY, DEMO_MODEL, Context


def _gradient(width: int = 64, height: int = 64):
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, depth: int, color: int, rows: bytes, extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def _png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def write_image(path: Path, kind: str) -> Path:
    """Write one test picture of `kind` at `path` (made here, deterministically)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    photo = _gradient()
    if kind == "png":
        photo.save(path, format="PNG")
    elif kind == "truncated-png":
        data = _png_bytes(photo)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-jpeg":
        data = _jpeg_bytes(photo)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bad-crc-png":
        data = bytearray(_png_bytes(photo))
        at = data.index(b"IDAT") + 20
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind.startswith("bomb-"):  # a few bytes claiming side x side pixels
        side = int(kind.split("-")[1])
        path.write_bytes(raw_png(side, side, 8, 2, b"\0" * 64))
    elif kind == "zero-width-png":
        path.write_bytes(raw_png(0, 64, 8, 2, b"\0" * 64))
    elif kind == "one-pixel":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path, format="PNG")
    elif kind == "wide-100000x1":
        _gradient(100_000, 1).save(path, format="PNG")
    elif kind == "tall-1x20000":
        _gradient(1, 20_000).save(path, format="PNG")
    elif kind == "gif-animated":
        frames = [Image.new("P", (64, 64), i * 40) for i in range(4)]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    elif kind == "gray16":
        Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(path, format="PNG")
    elif kind == "rgb16":
        row = np.linspace(0, 65535, 64 * 3).astype(">u2").tobytes()
        path.write_bytes(raw_png(64, 64, 16, 2, (b"\0" + row) * 64))
    elif kind == "cmyk-jpeg":
        Image.new("CMYK", (64, 64), (0, 128, 255, 0)).save(path, format="JPEG")
    elif kind == "palette-trns":
        image = photo.convert("P")
        image.info["transparency"] = 0
        image.save(path, format="PNG", transparency=0)
    elif kind == "la":
        photo.convert("LA").save(path, format="PNG")
    elif kind == "rgba-transparent":
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path, format="PNG")
    elif kind == "mode1":
        photo.convert("1").save(path, format="PNG")
    elif kind == "int32-tiff":
        Image.fromarray(np.full((64, 64), 2**31 - 1, np.int32), "I").save(path, format="TIFF")
    elif kind == "float-nan-tiff":
        Image.fromarray(np.full((64, 64), np.nan, np.float32), "F").save(path, format="TIFF")
    elif kind == "float-inf-tiff":
        Image.fromarray(np.full((64, 64), np.inf, np.float32), "F").save(path, format="TIFF")
    elif kind == "multipage-tiff":
        photo.save(path, format="TIFF", save_all=True, append_images=[photo.rotate(90)] * 3)
    elif kind == "bmp":
        photo.save(path, format="BMP")
    elif kind == "webp":
        try:
            photo.save(path, format="WEBP")
        except (KeyError, OSError):
            photo.save(path, format="PNG")
    elif kind == "ico":
        photo.save(path, format="ICO")
    elif kind == "svg":
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" '
                        'height="64" fill="red"/></svg>')
    elif kind == "jpeg-named-png":
        path.write_bytes(_jpeg_bytes(photo))
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pdf":
        path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    elif kind == "ztxt-bomb":  # a valid PNG with a text chunk that inflates to 64 MB
        data = _png_bytes(photo)
        bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b" " * (64 << 20), 9))
        at = data.index(b"IDAT") - 4
        path.write_bytes(data[:at] + bomb + data[at:])
    elif kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.save(path, format="JPEG", exif=exif)
    elif kind == "exif-corrupt":
        data = _jpeg_bytes(photo)
        garbage = b"Exif\0\0II*\0" + struct.pack("<I", 8) + b"\xff\xff" + b"\x12\x01\x03\x00" * 40
        path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:])
    elif kind == "huge-exif-ifd-count":
        data = _jpeg_bytes(photo)
        garbage = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 0xFFFF) + b"\0" * 64
        path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:])
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return path


def make_fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def demo_index() -> dict:
    return json.loads((DEMO_MODEL / "model_index.json").read_text())


def model_folder(root: Path, *, index: Any = None, index_text: str | None = None, name: str = "model",
                 components: tuple[str, ...] = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")) -> Path:
    """A model folder whose components are symlinks to the demo model's, with its own model_index.json."""
    folder = root / "in" / name
    folder.mkdir(parents=True)
    for component in components:
        (folder / component).symlink_to(DEMO_MODEL / component, target_is_directory=True)
    if index_text is None:
        index_text = json.dumps(demo_index() if index is None else index)
    (folder / "model_index.json").write_text(index_text)
    return folder


def real_component(folder: Path, component: str) -> Path:
    """Turn a symlinked component into a folder of symlinked files, so that one file can be changed."""
    link = folder / component
    link.unlink()
    link.mkdir()
    for file in (DEMO_MODEL / component).iterdir():
        (link / file.name).symlink_to(file)
    return link


def pickle_payload(target: Path) -> bytes:
    """A pickle that writes `target` when loaded by an unrestricted unpickler."""
    code = f"open({str(target)!r}, 'w').write('pickle payload ran')"
    # protocol 2: PROTO, GLOBAL builtins exec, the code string, TUPLE1, REDUCE, STOP
    return (b"\x80\x02cbuiltins\nexec\n" + b"X" + struct.pack("<I", len(code.encode())) + code.encode()
            + b"\x85R.")


def canary_module(root: Path, name: str = "canary_mod") -> None:
    """A module in the case's cwd (first on sys.path for `python -c`): importing it leaves a canary file."""
    (root / "cwd" / f"{name}.py").write_text(
        "import os\n"
        f"open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '{CANARY}-{name}'), 'w').write('imported')\n"
        "class Canary:\n    pass\n")


def write_recipe_png(source_png: Path, target: Path, text: str | None, how: str = "itxt") -> Path:
    """A copy of `source_png`'s pixels carrying `text` as its prompt2prompt chunk (written as `how` says)."""
    from PIL import Image, PngImagePlugin

    with Image.open(source_png) as image:
        pixels = image.convert("RGB")
    info = PngImagePlugin.PngInfo()
    if how == "itxt":
        info.add_itxt("prompt2prompt", text)
    elif how == "itxt-zip":
        info.add_itxt("prompt2prompt", text, zip=True)
    elif how == "text":
        info.add_text("prompt2prompt", text)
    elif how == "text-zip":
        info.add_text("prompt2prompt", text, zip=True)
    elif how == "twice":
        info.add_itxt("prompt2prompt", text)
        info.add_itxt("prompt2prompt", json.dumps({"format": 1}))
    elif how == "other-key":
        info.add_itxt("Prompt2Prompt", text)
    elif how != "none":
        raise ValueError(how)
    target.parent.mkdir(parents=True, exist_ok=True)
    pixels.save(target, format="PNG", pnginfo=info)
    return target


def system_file() -> Path:
    """A small readable file outside the case folder (for recipes that point at one)."""
    return next(p for p in (Path("/etc/hostname"), Path("/etc/passwd"), Path(__file__)) if p.is_file())


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def afile(root: Path, _ctx: Context) -> None:
    """A setup: a plain file `in/afile`, where a folder is expected."""
    (root / "in" / "afile").write_text("a file, not a folder\n")


def setup_all(*steps: Callable[[Path, Context], None]) -> Callable[[Path, Context], None]:
    """A setup that runs `steps` in order."""
    def setup(root: Path, ctx: Context) -> None:
        for step in steps:
            step(root, ctx)
    return setup


def image_at(name: str, kind: str) -> Callable[[Path, Context], None]:
    """A setup that writes the picture `kind` as `in/<name>`."""
    return lambda root, ctx: write_image(root / "in" / name, kind)
