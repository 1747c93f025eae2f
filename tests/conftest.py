"""Shared fixtures. The device and dtype of the engine tests come from the environment, as diffusers' `torch_device`:

    P2P_TEST_DEVICE=cuda P2P_TEST_DTYPE=float16 python -m pytest tests/test_editor.py

Both default to the CPU in float32. `tolerance` gives each dtype's bound for results that should agree up to
rounding; float32 keeps the bounds the tests had before they ran anywhere else.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["saved_models"]  # the tiny saved models' session fixtures (tiny_sd_dir, ...), for every test file

torch.set_num_threads(2)

TORCH_DEVICE = torch.device(os.environ.get("P2P_TEST_DEVICE", "cpu"))
DTYPE_NAME = os.environ.get("P2P_TEST_DTYPE", "float32")  # as the CLI and the batch runner take it
TORCH_DTYPE = getattr(torch, DTYPE_NAME, None)
if not isinstance(TORCH_DTYPE, torch.dtype) or not TORCH_DTYPE.is_floating_point:
    raise ValueError(f"P2P_TEST_DTYPE must name a torch floating-point dtype, not {os.environ['P2P_TEST_DTYPE']!r}")

# Relative bounds for two computations of the same result in each dtype (after a few denoising steps).
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def tolerance(fp32: float = 1e-4, *, scale: float = 1.0) -> float:
    """`fp32` in float32 (and float64); in half precision the dtype's relative bound times `scale` (the size of
    the values compared), if larger."""
    if TORCH_DTYPE in (torch.float32, torch.float64):
        return fp32
    return max(fp32, _TOLERANCE[TORCH_DTYPE] * scale)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float32: how far a result is from its reference."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def on_device(pipe):
    """A tiny pipeline moved to the test device and dtype."""
    return pipe.to(TORCH_DEVICE, TORCH_DTYPE)


@pytest.fixture(scope="session")
def torch_device() -> torch.device:
    return TORCH_DEVICE


@pytest.fixture(scope="session")
def torch_dtype() -> torch.dtype:
    return TORCH_DTYPE


@pytest.fixture(scope="session")
def tokenizer():
    from pipelines import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def sd_pipe():
    from pipelines import tiny_sd_pipeline

    return on_device(tiny_sd_pipeline())


@pytest.fixture(scope="session")
def sdxl_pipe():
    from pipelines import tiny_sdxl_pipeline

    return on_device(tiny_sdxl_pipeline())


def pytest_collection_modifyitems(items):
    """A test that takes the browser's `page` fixture is in the "browser" group (pyproject.toml's markers)."""
    for item in items:
        if "page" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
