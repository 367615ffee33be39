"""Shared fixtures: the two tiers (`pytest` runs the fast one, `pytest --runslow` everything),
the device list every kernel test body runs on, the shm leak guard, and console-script entry
points run in-process. Helper functions the test modules share are in tests/helpers.py."""
import io
import os
from dataclasses import dataclass

import pytest
import torch

from helpers import shm_names
from pyasgd.core import ext as _ext

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run the slow tier too (tests marked slow): the whole suite")


def pytest_collection_modifyitems(config, items):
    have_cuda = torch.cuda.is_available() and _ext.cuda_built()
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of pyasgd._C")
    runslow = config.getoption("--runslow")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(skip)
        if item.get_closest_marker("slow") and not runslow:  # the marker, not a parameter id "slow"
            item.add_marker(skip_slow)


def _ours(name: str) -> bool:
    """A segment is this test's when its creator (the pid in its name) is this process, one of
    its descendants, or dead; a live process elsewhere (another test run) is not ours."""
    try:
        pid = int(name.split("-")[1])
    except (IndexError, ValueError):
        return True
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # parent pid
        except (OSError, ValueError, IndexError):
            return True  # the creator is gone: whoever made it, it is left behind
    return False


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave /dev/shm as it found it."""
    before = shm_names()
    yield
    leaked = sorted(n for n in shm_names() - before if _ours(n))
    assert not leaked, f"test leaked shared-memory segments: {leaked}"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Run a console script's main(argv) in this process, as its entry point would (an
    argparse error's SystemExit becomes the exit code): no interpreter start, no torch import."""
    def run(main, *argv, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)
    return run
