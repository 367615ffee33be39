"""Broken checkpoints get one line: a checkpoint.pt (or config.json) that is truncated, damaged,
empty or not pyasgd's, given to `pyasgd-train --resume` or `pyasgd-translate`, ends the command
with exit 2 and one line naming the file, before anything is touched: the run directory stays
byte for byte, no process is started, no shared-memory segment is left. Run as a user runs them
(subprocesses); the run directories come from short simulated runs."""
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from helpers import segments_of
from pyasgd.core import checkpoint
from pyasgd.errors import CheckpointError, ConfigError

MARK = "BROKEN_CHECKPOINT_TEST_RUN"  # in a command's environment: its descendants inherit it


# --- the run directories --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A finished run of the synthetic task (2 workers, simulated): its checkpoint.pt and best.pt."""
    from pyasgd import train

    out = tmp_path_factory.mktemp("synthetic") / "run"
    train({"task": "synthetic", "simulate": True, "workers": 2, "max_updates": 5, "save_every": 5,
           "valid_every": 5, "quiet": True, "out": str(out)})
    return out


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    """A tiny translation run (made-up sentences, 2 simulated updates): what pyasgd-translate reads."""
    from pyasgd import train

    base = tmp_path_factory.mktemp("translation")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    files = {}
    for split, n in (("train", 200), ("dev", 4), ("test", 4)):
        src = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        tgt = [" ".join(reversed(s.split())).upper() for s in src]
        for side, lines in (("src", src), ("tgt", tgt)):
            path = base / f"{split}.{side}"
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            files[f"{split}_{side}"] = str(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYASGD_CACHE", str(base / "cache"))
        train({**files, "vocab_size": 60, "max_len": 20, "batch_tokens": 300, "workers": 2, "simulate": True,
               "beam": 1, "max_updates": 2, "save_every": 2, "valid_every": 0, "quiet": True, "out": str(base / "run")})
    return base / "run"


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# --- broken files ---------------------------------------------------------------------------------

def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _damaged(good: bytes) -> bytes:
    """A whole archive whose tensor data has 200 bytes overwritten (torch.load itself would load it)."""
    data, rng = bytearray(good), random.Random(1)
    at = len(good) // 3
    data[at:at + 200] = bytes(rng.randrange(256) for _ in range(200))
    return bytes(data)


# name -> (the broken file, made from the good one; what the line says is wrong)
BROKEN = {
    "truncated": (lambda good: good[:len(good) // 2], "(truncated: "),
    "random bytes": (lambda good: random.Random(0).randbytes(len(good)), "(not written by torch.save: "),
    "damaged": (_damaged, "(damaged: Bad CRC-32"),
    "empty": (lambda good: b"", "(empty: 0 bytes)"),
    "foreign dict": (lambda good: _torch_bytes({"model": torch.zeros(3), "epoch": 3}), "(no 'server' state: "),
    "text": (lambda good: b"epoch 3, loss 0.25\n", "(not written by torch.save: "),
}


def break_file(path, case):
    make, says = BROKEN[case]
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(make(good))
    return says


def snapshot(directory):
    """Every file under `directory`: its relative path -> sha256 of its bytes."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- commands as a user runs them ----------------------------------------------------------------

def marked_processes(mark):
    """Live processes whose environment carries MARK=mark (a command and whatever it started)."""
    want, found = f"{MARK}={mark}".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def run_command(module, *args, stdin=None, timeout=120):
    """`python -m module args`; asserts it left no process and no segment behind."""
    mark = uuid.uuid4().hex
    p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, MARK: mark})
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert not marked_processes(mark), "a process outlived the command"
    assert not segments_of([p.pid])
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_one_line(p, *fragments):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert 1 <= len(lines) <= 2, p.stderr
    for fragment in fragments:
        assert fragment in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr, p.stderr


# --- pyasgd-train --resume ------------------------------------------------------------------------

# Every case with the simulator, and the truncated one without it, in the fast tier: each is a
# pyasgd-train start (torch's import dominates); the other real-process cases run with --runslow.
RESUME_CASES = [pytest.param(case, processes, marks=[pytest.mark.slow] * (processes == "--no-simulate"
                                                                          and case != "truncated"))
                for case in BROKEN for processes in ("--simulate", "--no-simulate")]


@pytest.mark.parametrize("case,processes", RESUME_CASES)
def test_resume_from_a_broken_checkpoint_fails_in_one_line_touching_nothing(tmp_path, synthetic_run, case, processes):
    run = copy_run(synthetic_run, tmp_path)
    ckpt = run / "checkpoint.pt"
    says = break_file(ckpt, case)
    before = snapshot(run)
    assert {"summary.json", "config.json", "metrics.jsonl", "best.pt"} <= set(before)
    p = run_command("pyasgd.trainer.cli", "--resume", run, "--max-updates", "10", processes)
    assert_one_line(p, f"pyasgd-train: error: --resume: {ckpt} is not a pyasgd checkpoint", says)
    assert snapshot(run) == before  # summary.json not moved, config.json and metrics.jsonl not rewritten


@pytest.mark.parametrize("case,text,says", [
    ("not JSON", "{oops", "is not a run's settings (not JSON: "),
    ("a list", "[1, 2]", "is not a run's settings (a JSON list, not an object)"),
    ("unknown setting", None, "does not hold settings pyasgd-train takes: unknown setting 'bogus'"),
])
def test_resume_with_a_broken_config_json_fails_in_one_line_touching_nothing(tmp_path, synthetic_run, case, text,
                                                                               says):
    run = copy_run(synthetic_run, tmp_path)
    if text is None:
        text = json.dumps({**json.loads((run / "config.json").read_text()), "bogus": 1})
    (run / "config.json").write_text(text)
    before = snapshot(run)
    p = run_command("pyasgd.trainer.cli", "--resume", run, "--max-updates", "10")
    assert_one_line(p, f"pyasgd-train: error: --resume: {run / 'config.json'} ", says)
    assert snapshot(run) == before


def test_train_checks_the_checkpoint_before_touching_the_run_then_resumes_from_a_good_one(tmp_path, synthetic_run):
    """pyasgd.train (the simulator's path): CheckpointError, a ConfigError; the run directory
    intact, so with its checkpoint back the run resumes."""
    from pyasgd import train

    run = copy_run(synthetic_run, tmp_path)
    good = (run / "checkpoint.pt").read_bytes()
    break_file(run / "checkpoint.pt", "truncated")
    before = snapshot(run)
    settings = {"resume": str(run), "task": "synthetic", "simulate": True, "workers": 2, "max_updates": 10,
                "save_every": 5, "valid_every": 5, "quiet": True}
    with pytest.raises(CheckpointError, match="is not a pyasgd checkpoint") as e:
        train(settings)
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert snapshot(run) == before
    (run / "checkpoint.pt").write_bytes(good)
    assert train(settings)["updates"] == 10


def test_a_simulated_resume_names_a_checkpoint_of_real_processes(tmp_path, synthetic_run):
    state = checkpoint.load(str(synthetic_run / "checkpoint.pt"))
    del state["sim"]  # what the server of a real-process run writes has no simulator state
    checkpoint.save_atomic(state, str(tmp_path / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match="written by a run of real processes, not by --simulate"):
        checkpoint.load_checked(str(tmp_path / "checkpoint.pt"), "sim")
    assert checkpoint.load_checked(str(tmp_path / "checkpoint.pt"), "train")["server"]["step"] == 5


def test_the_check_accepts_every_checkpoint_pyasgd_writes(tmp_path, synthetic_run):
    ckpt, best = str(synthetic_run / "checkpoint.pt"), str(synthetic_run / "best.pt")
    state = checkpoint.load_checked(ckpt, "sim")
    assert checkpoint.load_checked(ckpt, "train")["server"]["step"] == 5
    assert torch.equal(checkpoint.params_of(checkpoint.load_checked(ckpt, "any")), state["server"]["params"])
    assert torch.equal(checkpoint.params_of(checkpoint.load_checked(best, "any")), checkpoint.load(best)["params"])
    # a shard's owner across nodes (pyasgd/nodes/topology.py: ShardedNodes.checkpoint_extra): its
    # server state holds its shard; "view" holds the whole vector, which is what decodes
    n = state["server"]["params"].numel()
    shard = {k: (v[:n // 2].clone() if k in ("params", "exp_avg", "exp_avg_sq") else v)
             for k, v in state["server"].items()}
    sharded = {"server": shard, "version": 5, "positions": torch.zeros(2, dtype=torch.int64), "progress": {},
               "config": "", "shard": {"index": 0, "lo": 0, "hi": n // 2, "nnodes": 2},
               "view": state["server"]["params"].clone(), "shard_stats": {}}
    checkpoint.save_atomic(sharded, str(tmp_path / "shard.pt"))
    got = checkpoint.load_checked(str(tmp_path / "shard.pt"), "train")
    assert got["shard"]["nnodes"] == 2 and torch.equal(checkpoint.params_of(got), state["server"]["params"])
    # and what is not one
    checkpoint.save_atomic({**state, "server": {**state["server"], "exp_avg": torch.zeros(3)}}, str(tmp_path / "x.pt"))
    with pytest.raises(CheckpointError, match="exp_avg is not a tensor of the parameters' shape"):
        checkpoint.load_checked(str(tmp_path / "x.pt"))
    with pytest.raises(FileNotFoundError):
        checkpoint.load_checked(str(tmp_path / "missing.pt"))


# --- the resource tracker --------------------------------------------------------------------------

STOP_TRACKER = """
import multiprocessing, sys
from multiprocessing import resource_tracker
from pyasgd.trainer.proc import stop_resource_tracker

ctx = multiprocessing.get_context("spawn")
held = [ctx.Event(), ctx.Queue()]  # a failed run's, still held (by its exception) when the launcher ends
print("sem" + held[0]._flag._semlock.name.replace("/", "."))
if sys.argv[1] == "released":
    del held
stop_resource_tracker()
print(resource_tracker._resource_tracker._pid)
"""


@pytest.mark.parametrize("objects", ["held", "released"])
def test_stopping_the_resource_tracker_is_silent_and_leaks_no_semaphore(objects):
    """The launcher's last step: stopping the tracker while the run's semaphores were still held
    made it unlink them as "leaked" (a warning) and each one's finalizer fail at exit (a
    FileNotFoundError traceback each)."""
    mark = uuid.uuid4().hex
    p = subprocess.run([sys.executable, "-c", STOP_TRACKER, objects], capture_output=True, text=True, timeout=60,
                       env={**os.environ, MARK: mark}, check=False)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    semaphore, tracker = p.stdout.split()
    assert not os.path.exists(os.path.join("/dev/shm", semaphore))
    assert (tracker == "None") == (objects == "released")  # reaped at once once nothing is held
    assert not marked_processes(mark)


# --- pyasgd-translate -------------------------------------------------------------------------------

def test_translate_takes_a_run_directory_or_a_checkpoint_file_in_one(translation_run):
    run = translation_run
    outputs = {}
    for target in (run, run / "best.pt", run / "checkpoint.pt"):
        p = run_command("pyasgd.tasks.translate_cli", "--checkpoint", target, stdin="w1 w2 w3\n\nw4\n")
        assert p.returncode == 0, p.stderr
        outputs[target.name] = p.stdout.splitlines()
        assert len(outputs[target.name]) == 3 and outputs[target.name][1] == ""
    assert outputs["run"] == outputs["best.pt"]  # the directory decodes with its best.pt
    p = run_command("pyasgd.tasks.translate_cli", "--checkpoint", run / "checkpoint.pt", "--last", stdin="w1\n")
    assert_one_line(p, "--last takes a run directory")


@pytest.mark.parametrize("case", ["truncated", "random bytes", pytest.param("empty", marks=pytest.mark.slow),
                                  pytest.param("foreign dict", marks=pytest.mark.slow)])
def test_translate_with_a_broken_checkpoint_fails_in_one_line(tmp_path, translation_run, case):
    run = copy_run(translation_run, tmp_path)
    target = "checkpoint.pt" if case in ("truncated", "empty") else "best.pt"
    says = break_file(run / target, case)
    before = snapshot(run)
    # the file itself, and (best.pt, or checkpoint.pt with --last) the run directory
    in_dir = ["--checkpoint", run] + (["--last"] if target == "checkpoint.pt" else [])
    for args in (["--checkpoint", run / target], in_dir):
        p = run_command("pyasgd.tasks.translate_cli", *args, stdin="w1 w2\n")
        assert_one_line(p, f"pyasgd-translate: error: {run / target} is not a pyasgd checkpoint", says)
        assert p.stdout == ""
    assert snapshot(run) == before


def test_translate_names_a_checkpoint_of_another_model(tmp_path, translation_run, synthetic_run):
    run = copy_run(translation_run, tmp_path)
    shutil.copy(synthetic_run / "checkpoint.pt", run / "checkpoint.pt")
    p = run_command("pyasgd.tasks.translate_cli", "--checkpoint", run / "checkpoint.pt", stdin="w1\n")
    assert_one_line(p, f"{run / 'checkpoint.pt'} holds", "it is not this run's checkpoint")
