"""Shared fixtures: the device list every kernel test body runs on, and the shm leak guard."""
import os

import pytest
import torch

from pyasgd import _ext

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    have_cuda = torch.cuda.is_available() and _ext.cuda_built()
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of pyasgd._C")
    for item in items:
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(skip)


def _segments():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("pyasgd-")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave /dev/shm as it found it."""
    before = _segments()
    yield
    leaked = _segments() - before
    assert not leaked, f"test leaked shared-memory segments: {sorted(leaked)}"
