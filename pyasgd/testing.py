"""Fault hooks for tests, in one place. Each is an environment variable that production code reads
once, when the process starts (never on a hot path), through the functions below; unset, they
do nothing. They let the test suite make a worker or a server fail on cue, so the failure paths
(replacement, checkpoint on failure, a node that fails on its own) run for real.

- PYASGD_TEST_FAULT=raise:<rank>:<pushes>[:once:<marker file>]: worker <rank> raises after that
  many pushes; with `once` only its first incarnation does (it creates the marker file; a
  replacement that finds it goes on).
- PYASGD_TEST_SERVER_FAULT=<update>: the server raises after that update (a server that fails on
  its own, not a lost node).
- PYASGD_TEST_REGION_DELAY=<point>:<ms> (read by csrc/region.cpp, once per process): sleep at
  one named step of the region's protocol (claim, reclaim, read) to force interleavings that are
  otherwise a matter of luck.
"""
from __future__ import annotations

import os


def worker_fault(rank: int) -> int | None:
    """After how many pushes worker `rank` must raise (PYASGD_TEST_FAULT), or None."""
    spec = os.environ.get("PYASGD_TEST_FAULT", "")
    if not spec.startswith("raise:"):
        return None
    parts = spec.split(":")
    if int(parts[1]) != rank:
        return None
    if len(parts) >= 5 and parts[3] == "once":
        marker = ":".join(parts[4:])
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
    return int(parts[2])


def worker_fault_error(rank: int, pushes: int) -> RuntimeError:
    return RuntimeError(f"injected fault in worker {rank} after {pushes} pushes (PYASGD_TEST_FAULT)")


def server_fault_step() -> int | None:
    """The update after which the server must raise (PYASGD_TEST_SERVER_FAULT), or None."""
    at = os.environ.get("PYASGD_TEST_SERVER_FAULT", "")
    return int(at) if at else None


def server_fault_error(step: int) -> RuntimeError:
    return RuntimeError(f"injected fault in the server after update {step} (PYASGD_TEST_SERVER_FAULT)")
