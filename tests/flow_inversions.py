"""The flow inversions' shared check for the newer families (FLUX.2 klein and dev, Z-Image): one home for it."""

import numpy as np
import torch
from conftest import rel_err, tolerance

import prompt2prompt as p2p
from prompt2prompt.inversion import invert


def blocky_image() -> np.ndarray:
    """A 32x32 RGB image of 4x4 random colour blocks (uint8), seeded."""
    rng = np.random.default_rng(0)
    return (np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8)


def check_direct_and_euler(pipe, image: np.ndarray, source: str, edit: str, *, source_tolerance: float = 1e-5,
                           **options):
    """Direct and euler inversions of `image` (`options`: `invert`'s) share one trajectory, which starts at the image's
    latent; an edit of the direct one gives the image in its source row (within `source_tolerance`) and is free to
    change the edit row; euler's source row is at least 100 times further from the image. Returns the direct one."""
    direct = invert(pipe, image, source, progress=False, **options)
    euler = invert(pipe, image, source, method="euler", progress=False, **options)
    assert torch.equal(direct.trajectory, euler.trajectory)
    family = p2p.Editor(pipe).family
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(pipe.device)
    torch.testing.assert_close(direct.trajectory[0], family.encode_pixels(pixels), rtol=1e-5, atol=1e-5)

    def rows(inversion):
        result = p2p.Editor(pipe).edit(source, [edit], inversion=inversion, output_type="latent")
        return family.output_latents(inversion.trajectory[0].to(result.images)), result.images

    target, images = rows(direct)
    assert rel_err(images[0], target[0]) <= tolerance(source_tolerance)  # the source row is the image
    assert rel_err(images[1], images[0]) > 1e-3  # and the edit is free to change
    _, from_euler = rows(euler)
    assert rel_err(from_euler[0], target[0]) > 100 * rel_err(images[0], target[0])
    return direct
