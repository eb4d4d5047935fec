import pytest
import torch

# One intra-op thread in the test process: the suite runs Ray workers, MLflow servers and subprocesses
# beside it on 2 cores, and an oversubscribed OpenMP pool makes tiny-model steps ~50x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
