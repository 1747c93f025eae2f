import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    from pipelines import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def sd_pipe():
    from pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    from pipelines import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()
