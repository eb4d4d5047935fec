from pathlib import Path

import pytest
import torch

# One intra-op thread in the test process: the suite runs Ray workers, MLflow servers and subprocesses
# beside it on 2 cores, and an oversubscribed OpenMP pool makes tiny-model steps ~50x slower.
torch.set_num_threads(1)


# Modules that start Ray clusters (or DeepSpeed process groups): one pytest-xdist worker runs them one after
# another, because two local Ray clusters on one machine contend for the same default ports.
RAY_MODULES = ("test_distributed.py", "test_keystats.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in RAY_MODULES:
            item.add_marker(pytest.mark.xdist_group("ray"))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved to disk (seed 0), one per test module."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)
