"""Helpers the test modules share: run-directory readers, the config builder, and the process
and shared-memory checks. (tests/mp_helpers.py holds the targets spawned processes run.)"""
import json
import os
import subprocess
import time

import pytest


# --- run directories ------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_text(path):
    with open(path) as f:
        return f.read()


def records(run_dir, kind):
    """The records of one kind ("update", "valid", "restart", ...) in a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def config_builder(**defaults):
    """A module's `cfg(tmp_path, name="run", **kw)`: TrainConfig(**defaults) writing to
    tmp_path/name, with `kw` overriding the defaults. Each module states its own defaults."""
    def cfg(tmp_path, name="run", **kw):
        from pyasgd.config import TrainConfig  # here: conftest imports this module

        return TrainConfig(**{**defaults, "out": str(tmp_path / name), **kw})
    return cfg


# --- processes ------------------------------------------------------------------------------------

def children(pid):
    """The pids of `pid`'s children (skips the test where pgrep is missing)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        pytest.skip("pgrep not available")
    return [int(x) for x in out.split()]


def gone(pid):
    """The process has exited (a zombie waiting to be reaped is gone too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cmdline(pid):
    try:
        return read_text(f"/proc/{pid}/cmdline").replace("\0", " ")[:120]
    except OSError:
        return "(gone)"


def assert_all_gone(pids, within=10.0):
    """No process of the run outlives it (multiprocessing's resource tracker exits once its
    pipe closes, so allow a moment)."""
    deadline = time.time() + within
    while time.time() < deadline and not all(gone(k) for k in pids):
        time.sleep(0.1)
    left = {k: _cmdline(k) for k in pids if not gone(k)}
    assert not left, f"processes outlived the run: {left}"


# --- shared-memory segments -----------------------------------------------------------------------

def shm_names():
    """The pyasgd segments in /dev/shm now."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("pyasgd-")}
    except FileNotFoundError:
        return set()


def segments_of(pids):
    """The segments in /dev/shm created by any of `pids` (segment names start pyasgd-PID-)."""
    return sorted(n for n in shm_names() if any(n.startswith(f"pyasgd-{p}-") for p in pids))


def semaphores_of(pid):
    """The named POSIX semaphores in /dev/shm (multiprocessing's sem.mp-*) that process `pid` has
    mapped, found by inode (glibc maps a temporary file, then links it to the name)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            inodes = {int(line.split()[4]) for line in f if "/dev/shm/sem." in line}
    except OSError:
        return []
    out = []
    for name in os.listdir("/dev/shm") if inodes else []:
        path = os.path.join("/dev/shm", name)
        try:
            if name.startswith("sem.mp-") and os.stat(path).st_ino in inodes:
                out.append(path)
        except FileNotFoundError:
            pass
    return out


def remove_files(paths):
    """Remove what a test's SIGKILLed process group left (its semaphores: their resource
    tracker died with it), as a machine's reboot would."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
