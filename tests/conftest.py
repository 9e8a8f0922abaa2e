import os

import pytest
import torch

# `make test` runs two pytest-xdist workers on this 2-core machine: one intra-op thread each (two threads per worker
# oversubscribe the cores and make every test several times slower). A plain `pytest` run keeps up to 2 threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
