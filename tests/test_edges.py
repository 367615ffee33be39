"""Edges a run must survive (issue 25): one run per directory (a lock naming its holder), and a full
disk while a checkpoint or a record is written (the previous checkpoint stays whole, the run stops
with one line saying what filled up, nothing is left behind)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import assert_all_gone, children, segments_of

SIM = ["--task", "synthetic", "--simulate", "--workers", "2", "--quiet"]


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "pyasgd.trainer.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_updates(run_dir, p, timeout=120):
    deadline = time.time() + timeout
    path = os.path.join(run_dir, "metrics.jsonl")
    while not (os.path.exists(path) and '"update"' in _read(path)):
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() < deadline, "the run never started"
        time.sleep(0.1)


def _read(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def wait_for_file(path, p, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.05)


def hashes(d) -> dict[str, bytes]:
    import hashlib

    out = {}
    for n in sorted(os.listdir(d)):
        if os.path.isfile(os.path.join(d, n)):
            with open(os.path.join(d, n), "rb") as f:
                out[n] = hashlib.sha256(f.read()).digest()
    return out


# --- one run per directory ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_directory_in_use_refuses_a_second_run_and_a_resume_naming_the_pid(tmp_path):
    out = tmp_path / "run"
    holder = start(*SIM, "--max-updates", "1000000", "--max-time", "0", "--save-every", "20", "--out", out)
    try:
        wait_for_updates(out, holder)
        wait_for_file(out / "checkpoint.pt", holder)
        before = {n: h for n, h in hashes(out).items() if n in ("config.json", ".lock")}
        for args in (["--out", out, *SIM, "--max-updates", "5"], ["--resume", out, "--max-updates", "5"]):
            r = cli(*args)
            assert r.returncode == 2, r.stderr
            assert len(r.stderr.splitlines()) == 1, r.stderr
            assert f"is in use by another run (pid {holder.pid})" in r.stderr, r.stderr
        after = {n: h for n, h in hashes(out).items() if n in before}
        assert after == before  # config.json and summary untouched by the refused ones
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=120)
    assert holder.returncode == 130
    r = cli("--resume", out, "--max-updates", "60")  # the lock went with its holder
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = start(*SIM, "--max-updates", "1000000", "--max-time", "0", "--save-every", "10", "--out", out)
    wait_for_updates(out, holder)
    wait_for_file(out / "checkpoint.pt", holder)
    holder.kill()
    holder.communicate(timeout=60)
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # the file stays, the lock does not
    r = cli("--resume", out, "--max-updates", "30")
    assert r.returncode == 0, r.stderr


def test_a_study_cell_on_a_directory_in_use_fails_naming_the_holder(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[base]\ntask = "synthetic"\nsimulate = true\nworkers = 2\nmax_updates = 5\n'
                     'valid_every = 0\n[grid]\nmethod = ["sync"]\nlr = [0.01]\nseed = [1]\n')
    cell = tmp_path / "out" / "sync-lr0.01-s1"
    cell.mkdir(parents=True)
    fd = os.open(cell / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        r = subprocess.run([sys.executable, "-m", "pyasgd.study.cli", "run", str(study), "--out", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=240)
    finally:
        os.close(fd)
    said = r.stdout + r.stderr + ((cell / "cell-error.txt").read_text() if (cell / "cell-error.txt").exists() else "")
    assert f"is in use by another run (pid {os.getpid()})" in said, said
    assert "1 failed" in r.stdout, r.stdout


# --- a full disk -----------------------------------------------------------------------------------

def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_stops_in_one_line(tmp_path, monkeypatch):
    """The simulator's second checkpoint meets ENOSPC halfway through torch.save."""
    import torch

    from pyasgd.config import TrainConfig
    from pyasgd.core import checkpoint
    from pyasgd.trainer.launch import TrainingError, train

    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04" + b"\0" * 100)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(TrainConfig(task="synthetic", simulate=True, workers=2, quiet=True, max_updates=40, save_every=10,
                          valid_every=0, out=str(out)))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"cannot write {out / 'checkpoint.pt'}: the disk is full (no space left on device)" in msg
    assert f"pyasgd-train --resume {out}" in msg
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    state = checkpoint.load_checked(str(out / "checkpoint.pt"), "sim")
    assert int(state["server"]["step"]) == 10  # the first checkpoint, whole
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")] and not (out / "summary.json").exists()
    assert "cannot write" in (out / "train.log").read_text()
    from pyasgd.trainer import rundir

    assert rundir.holder(str(out)) is None  # the failed run let its directory go


def _mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_real_run_on_a_disk_that_fills_up_stops_in_one_line_and_leaves_nothing(tmp_path):
    """Real processes on a small tmpfs: once the first checkpoint is written, a file takes all but
    4 KiB; the next checkpoint (or record) fails. Needs root to mount the tmpfs: CI and this
    project's machines have it; elsewhere the injected test above covers the code path."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        p = start("--task", "synthetic", "--workers", "2", "--max-updates", "1000000", "--max-time", "0",
                  "--save-every", "20", "--compute-delay", "0.005", "--threads", "1", "--quiet", "--out", out)
        kids = []
        try:
            wait_for_updates(out, p)
            kids = children(p.pid)
            wait_for_file(out / "checkpoint.pt", p)
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - 4096))
            _, err = p.communicate(timeout=180)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 1, err
        lines = err.splitlines()
        assert 1 <= len(lines) <= 2 and "the disk is full (no space left on device)" in lines[-1], err
        assert f"pyasgd-train --resume {out}" in lines[-1]
        from pyasgd.core import checkpoint

        (disk / "filler").unlink()
        state = checkpoint.load_checked(str(out / "checkpoint.pt"), "train")
        assert int(state["server"]["step"]) >= 20
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
        assert_all_gone(kids)
        assert not segments_of([p.pid, *kids])
        r = cli("--resume", out, "--max-updates", str(int(state["server"]["step"]) + 10), "--quiet")
        assert r.returncode == 0, r.stderr  # with room again, the run goes on from it
        assert json.loads(r.stdout.splitlines()[-1])["updates"] == int(state["server"]["step"]) + 10
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
