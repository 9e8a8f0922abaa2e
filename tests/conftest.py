import os
import shutil
import tempfile
from pathlib import Path

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


@pytest.fixture
def one_thread():
    """One torch intra-op thread for a test (files that sample tiny models use it for every test): on this shared
    2-core machine two threads made sampling the toy models ~25x slower (17 s vs 0.6 s for 16 images), the threads
    waiting for each other while other processes run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fast_tmp(tmp_path):
    """RAM-backed scratch (/dev/shm) when available: this disk writes ~100 MB/s (the 1 GB file of the keymap oracle
    test costs ~10 s on it). Our reader uses read(), not mmap, so files there do not count in the process's RSS."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="dev2pro-test-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path
