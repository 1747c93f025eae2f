"""image: `p2p edit --image FILE` with pictures that are broken, huge, odd, or not files at all."""

from __future__ import annotations

from .case import EDIT, INLINE, SRC, Case
from .inputs import image_at, make_fifo, make_sparse


def image_cases() -> list[Case]:
    """`p2p edit --image FILE`: pictures that are broken, huge, odd, or not files at all."""
    def args(path: str, *extra: str) -> list[str]:
        return ["edit", "--image", path, "--prompt", SRC, "--to", EDIT, "--steps", "2", "--inversion", "ddim",
                "--out", "@OUT@", *extra]

    cases: list[Case] = []
    kinds = [("png", "ok"), ("truncated-png", "usage"), ("truncated-jpeg", "usage"), ("bad-crc-png", "usage"),
             ("bomb-30000", "usage"), ("bomb-10000", "usage"), ("zero-width-png", "usage"), ("one-pixel", "ok"),
             ("wide-100000x1", "ok"), ("tall-1x20000", "ok"), ("gif-animated", "ok"), ("gray16", "ok"),
             ("rgb16", "ok"), ("cmyk-jpeg", "ok"), ("palette-trns", "ok"), ("la", "ok"), ("rgba-transparent", "ok"),
             ("mode1", "ok"), ("int32-tiff", "ok"), ("float-nan-tiff", "any"), ("float-inf-tiff", "any"),
             ("multipage-tiff", "ok"), ("bmp", "ok"), ("webp", "ok"), ("ico", "ok"), ("svg", "usage"),
             ("jpeg-named-png", "ok"), ("text", "usage"), ("empty", "usage"), ("pdf", "usage"), ("ztxt-bomb", "any"),
             ("exif-rotated", "ok"), ("exif-corrupt", "any"), ("huge-exif-ifd-count", "any")]
    for kind, expect in kinds:
        name = f"photo.{'png' if 'tiff' not in kind else 'tif'}"
        cases.append(Case("image", kind, args=args(f"@IN@/{name}"), expect=expect, setup=image_at(name, kind)))
    cases += [
        Case("image", "missing-file", args=args("@IN@/nowhere.png"), expect="usage"),
        Case("image", "directory", args=args("@IN@"), expect="usage"),
        Case("image", "fifo", args=args("@IN@/fifo.png"), expect="error",
             setup=lambda root, ctx: make_fifo(root / "in" / "fifo.png")),
        Case("image", "dev-zero", args=args("/dev/zero"), expect="error"),
        Case("image", "dev-null", args=args("/dev/null"), expect="error"),
        Case("image", "dev-stdin", args=args("/dev/stdin"), expect="error"),
        Case("image", "proc-self-cmdline", args=args("/proc/self/cmdline"), expect="error"),
        Case("image", "symlink-to-etc-passwd", args=args("@IN@/passwd.png"), expect="usage",
             setup=lambda root, ctx: (root / "in" / "passwd.png").symlink_to("/etc/passwd")),
        Case("image", "sparse-200GB", args=args("@IN@/huge.png"), expect="error",
             setup=lambda root, ctx: make_sparse(root / "in" / "huge.png", 200 << 30),
             why="the CLI hashes the file (file_digest) before it opens it as an image"),
        Case("image", "default-null-text", args=["edit", "--image", "@IN@/photo.png", "--prompt", SRC, "--to", EDIT,
                                                 "--steps", "2", "--out", "@OUT@"], expect="ok",
             setup=image_at("photo.png", "png")),
    ]
    for method, expect in [("bogus", "usage"), ("euler", "usage"), ("", "usage"), ("NULL-TEXT", "usage"),
                           ("negative-prompt", "ok"), ("direct", "ok")]:
        cases.append(Case("image", f"inversion={method!r}", args=args("@IN@/photo.png")[:-4] + [
            "--inversion", method, "--out", "@OUT@"], expect=expect, setup=image_at("photo.png", "png")))
    cases += [
        Case("image", "caption-over-77-tokens", args=["edit", "--image", "@IN@/photo.png", "--prompt", "red " * 90,
                                                      "--to", EDIT, "--steps", "2", "--inversion", "ddim", "--out",
                                                      "@OUT@"], expect="usage", setup=image_at("photo.png", "png")),
        Case("image", "inline-markup-caption", args=["edit", INLINE, "--image", "@IN@/photo.png", "--steps", "2",
                                                     "--inversion", "ddim", "--out", "@OUT@"], expect="ok",
             setup=image_at("photo.png", "png")),
        Case("image", "size-32x96", args=args("@IN@/photo.png", "--height", "32", "--width", "96"), expect="ok",
             setup=image_at("photo.png", "png")),
        Case("image", "size-8x8", args=args("@IN@/photo.png", "--height", "8", "--width", "8"), expect="usage",
             setup=image_at("photo.png", "png")),
        Case("image", "guidance-1-null-text", args=["edit", "--image", "@IN@/photo.png", "--prompt", SRC, "--to", EDIT,
                                                    "--steps", "2", "--guidance", "1", "--out", "@OUT@"],
             expect="usage", setup=image_at("photo.png", "png")),
        Case("image", "steps-1000-ddim", args=args("@IN@/photo.png", "--steps", "1000"), expect="ok",
             setup=image_at("photo.png", "png")),
    ]
    return cases
