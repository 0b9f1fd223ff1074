import os

import pytest
import torch

# Keep each test process to one thread: the suite runs with -n 2 on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny preset, built and saved once per session in a temp cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["REFL_ENGINE_CACHE"] = str(cache)
    from refl_engine.models.load import tiny_sd_path

    return str(tiny_sd_path())
