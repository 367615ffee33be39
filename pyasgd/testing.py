"""Fault hooks for tests, in one place. Each is an environment variable that production code reads
once, when the process starts (never on a hot path), through the functions below; unset, they
do nothing. They let the test suite make a worker or a server fail on cue, so the failure paths
(replacement, checkpoint on failure, a node that fails on its own) run for real.

- PYASGD_TEST_FAULT=raise:<rank>:<pushes>[:once:<marker file>]: worker <rank> raises after that
  many pushes; with `once` only its first incarnation does (it creates the marker file; a
  replacement that finds it goes on).
- PYASGD_TEST_SERVER_FAULT=<update>: the server raises after that update (a server that fails on
  its own, not a lost node).
- PYASGD_TEST_SERVER_PAUSE=<update>:<seconds>: the server stops that long after that update (a
  slow checkpoint on a slow disk, a stalled machine): across nodes, a node that is slow, not lost.
- PYASGD_TEST_SLOW_TEST=<seconds>: the launcher waits that long before its final test (a node
  slow to decode its test set).
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


def server_pause() -> tuple[int, float] | None:
    """(update, seconds) of PYASGD_TEST_SERVER_PAUSE, or None."""
    spec = os.environ.get("PYASGD_TEST_SERVER_PAUSE", "")
    if not spec:
        return None
    at, seconds = spec.split(":")
    return int(at), float(seconds)


def pause_before_test() -> None:
    """Sleep PYASGD_TEST_SLOW_TEST seconds, if set."""
    seconds = float(os.environ.get("PYASGD_TEST_SLOW_TEST", "0") or 0)
    if seconds > 0:
        import time

        time.sleep(seconds)
