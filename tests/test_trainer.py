"""The trainer: every method of the paper on the synthetic task, in the deterministic simulator
and with real processes; checkpoints; failure paths; the CLI as a user runs it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyasgd.core import checkpoint
from pyasgd.config import ConfigError, TrainConfig
from pyasgd.trainer.launch import TrainingError, train
from helpers import assert_all_gone, children, config_builder, gone, read_json, read_text, records

# The paper's average staleness for N = 4 (section 4.3 and figure 3).
PAPER_STALENESS = {
    "async": (dict(mode="async", global_accum=1), 3.0),
    "local 4": (dict(mode="async", local_accum=4, global_accum=1), 3.0),
    "local 2 x global 2": (dict(mode="async", local_accum=2, global_accum=2), 1.5),
    "global 4": (dict(mode="async", global_accum=4), 0.75),
    "sync": (dict(mode="sync"), 0.0),
    "sync pull-every 7": (dict(mode="sync", pull_every=7), 3.0),
    "sync pull-every 5": (dict(mode="sync", pull_every=5), 2.0),
}


# cfg(tmp_path, name="run", **kw): 4 workers on the synthetic task, no validation unless asked
cfg = config_builder(task="synthetic", workers=4, quiet=True, valid_every=0, threads=1, lr=2e-3, warmup=50,
                     max_updates=500)


# --- simulator ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c if c == "async" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(PAPER_STALENESS)])
def test_simulator_staleness_is_exactly_the_papers(tmp_path, case):
    kw, expected = PAPER_STALENESS[case]
    skip, window = 20, 420  # 420 covers whole cycles of every pattern (lengths 1, 2, 4, 5, 7)
    summary = train(cfg(tmp_path, simulate=True, max_updates=skip + window, **kw))
    ups = records(str(tmp_path / "run"), "update")[skip:]
    assert len(ups) == window
    values = [s for r in ups for s in r["staleness"]]
    assert sum(values) / len(values) == expected
    assert summary["updates"] == skip + window


METHODS = {
    "sync": dict(mode="sync"),
    "async": dict(mode="async", global_accum=1),
    "async G=N": dict(mode="async", global_accum=4),
    "local 2": dict(mode="async", local_accum=2, global_accum=1),
    "combined": dict(mode="async", local_accum=2, global_accum=2),
    "pull-every 3": dict(mode="async", pull_every=3, global_accum=1),
    "sync pull-every 3": dict(mode="sync", pull_every=3),
    # varying staleness: scaling by a constant 1/3 would be (almost) invisible to Adam
    "scale": dict(mode="async", stale_policy="scale", global_accum=1, sim_order="normal"),
    "drop:2": dict(mode="async", stale_policy="drop:2", pull_every=2, global_accum=1),
    "clip + adamw": dict(mode="async", global_accum=2, clip_norm=1.0, weight_decay=0.01, decoupled=True),
    "normal order": dict(mode="async", global_accum=2, sim_order="normal"),
}


# The same method without its policy: a policy must change the run, not only leave it converging.
WITHOUT_POLICY = {
    "scale": dict(stale_policy="none"),
    "drop:2": dict(stale_policy="none"),
    "clip + adamw": dict(clip_norm=0.0, weight_decay=0.0, decoupled=False),
}


@pytest.mark.parametrize("method", [m if m in ("async", "pull-every 3") else
                                    pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHODS)])
def test_every_method_converges_in_the_simulator(tmp_path, method):
    summary = train(cfg(tmp_path, simulate=True, max_updates=400, **METHODS[method]))
    ups = records(str(tmp_path / "run"), "update")
    first = sum(r["loss"] for r in ups[:10]) / 10
    last = sum(r["loss"] for r in ups[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert summary["final_valid"]["accuracy"] > 0.6
    if method == "drop:2":
        assert summary["dropped_gradients"] > 0
    if method == "clip + adamw":  # the norm is measured on every update, and clipping bit
        norms = [r["grad_norm"] for r in ups]
        assert len(norms) == len(ups) and max(norms) > 1.0
    if method in WITHOUT_POLICY:  # the simulator is deterministic: any difference is the policy's
        train(cfg(tmp_path, "twin", simulate=True, max_updates=400, **{**METHODS[method], **WITHOUT_POLICY[method]}))
        ours, twin = (checkpoint.load(str(tmp_path / d / "checkpoint.pt"))["server"]["params"] for d in ("run", "twin"))
        assert not torch.equal(ours, twin), f"{method} changed nothing"


@pytest.mark.slow
def test_bf16_autocast_trains_the_synthetic_task(tmp_path):
    kw = dict(simulate=True, mode="async", global_accum=2, max_updates=400)
    summary = train(cfg(tmp_path, "bf16", amp="bf16", **kw))
    assert summary["final_valid"]["accuracy"] > 0.6
    train(cfg(tmp_path, "fp32", **kw))
    bf16, fp32 = (checkpoint.load(str(tmp_path / d / "checkpoint.pt"))["server"] for d in ("bf16", "fp32"))
    assert bf16["params"].dtype == torch.float32  # fp32 masters whatever the workers compute in
    assert not torch.equal(bf16["params"], fp32["params"])  # the forward really ran in bf16


@pytest.mark.slow
def test_bf16_gradients_train_in_the_simulator_and_change_the_run(tmp_path):
    kw = dict(simulate=True, mode="async", global_accum=2, max_updates=400)
    summary = train(cfg(tmp_path, "bf16", grad_dtype="bf16", **kw))
    assert summary["final_valid"]["accuracy"] > 0.6
    train(cfg(tmp_path, "fp32", grad_dtype="fp32", **kw))
    bf16, fp32 = (checkpoint.load(str(tmp_path / d / "checkpoint.pt"))["server"] for d in ("bf16", "fp32"))
    assert bf16["params"].dtype == torch.float32
    assert not torch.equal(bf16["params"], fp32["params"])  # the gradients really were rounded


def test_simulator_is_deterministic_and_resumes_bit_for_bit(tmp_path):
    kw = dict(simulate=True, mode="async", global_accum=2, local_accum=2, sim_order="normal")
    train(cfg(tmp_path, "a", max_updates=60, **kw))
    train(cfg(tmp_path, "b", max_updates=60, **kw))
    train(cfg(tmp_path, "c", max_updates=30, **kw))
    train(cfg(tmp_path, "c", max_updates=60, resume=str(tmp_path / "c"), **kw))
    a, b, c = (checkpoint.load(str(tmp_path / d / "checkpoint.pt"))["server"] for d in "abc")
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a[key], b[key]), f"{key}: same seed, different result"
        assert torch.equal(a[key], c[key]), f"{key}: the resumed run differs"
    assert a["step"] == c["step"] == 60


# --- real processes ------------------------------------------------------------------------------

REAL_CASES = ["async", "local 2 x global 2", "global 4", "local 4", "sync", "sync pull-every 7", "sync pull-every 5"]


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL_CASES)
def test_real_process_staleness_within_10_percent(tmp_path, case):
    """Four real worker processes. Compute is emulated by a jittered sleep (compute_delay) so
    the four genuinely overlap on a 2-core machine, as accelerator-bound workers would."""
    kw, expected = PAPER_STALENESS[case]
    k = kw.get("local_accum", 1)
    summary = train(cfg(tmp_path, max_updates=160 // k, compute_delay=0.01, **kw))
    assert summary["stopped_because"] == "max_updates"
    got = summary["avg_staleness"]
    assert abs(got - expected) <= 0.1 * expected + (0.02 if expected == 0 else 0), (case, got)
    if kw["mode"] == "sync" and "pull_every" not in kw:
        assert summary["staleness_hist"] == {"0": 4 * summary["updates"]}


@pytest.mark.parametrize("method", ["sync", "async", pytest.param("combined", marks=pytest.mark.slow)])
def test_real_processes_converge(tmp_path, method):
    # Validation in the launcher: a run this short ends before a validator process has started.
    summary = train(cfg(tmp_path, workers=2, max_updates=300, valid_every=100, valid_process=False,
                        **METHODS[method]))
    ups = records(str(tmp_path / "run"), "update")
    assert sum(r["loss"] for r in ups[-10:]) < 0.5 * sum(r["loss"] for r in ups[:10])
    assert summary["best_valid"] > 0.6
    assert len(records(str(tmp_path / "run"), "valid")) >= 3
    for key in ("mode", "workers", "local_accum", "global_accum", "pull_every", "updates", "tokens",
                "wall_s", "wps", "avg_staleness", "staleness_hist", "best_valid_bleu", "test_bleu",
                "stopped_because"):
        assert key in summary
    assert os.path.exists(tmp_path / "run" / "best.pt")


@pytest.mark.slow
def test_validation_in_its_own_process_keeps_the_best_snapshot(tmp_path):
    """The pyasgd-valid process evaluates snapshots while the workers go on; its records carry
    the progress at the snapshot, best.pt holds the best one, and the summary says what
    validating cost the workers."""
    summary = train(cfg(tmp_path, workers=2, max_updates=400, valid_every=40, compute_delay=0.01, lr=5e-3))
    valid = records(str(tmp_path / "run"), "valid")
    assert len(valid) >= 3
    for v in valid:
        assert v["tokens"] >= v["update"] * 2 * 32 * 16 * 0.5 and v["version"] >= v["update"]
    assert [v["update"] for v in valid] == sorted(v["update"] for v in valid)
    # (a validation this fast may see no update arrive meanwhile: 0 words per second is a valid answer)
    assert summary["valid_s"] > 0 and summary["wps_while_validating"] is not None and summary["wps_not_validating"] > 0
    best = max(valid, key=lambda v: v["accuracy"])  # the first of the best (ties do not replace it)
    assert checkpoint.load(str(tmp_path / "run" / "best.pt"))["update"] == best["update"]


@pytest.mark.slow
def test_real_workers_stop_at_a_fractional_max_epochs(tmp_path):
    # 2 workers, 512 sequences, batches of 32: 8 batches per worker and pass; sync makes one
    # update per batch, so 1.5 passes are 12 updates.
    s = train(cfg(tmp_path, mode="sync", workers=2, train_size=512, batch_size=32, max_updates=0,
                  max_epochs=1.5))
    assert s["stopped_because"] == "max_epochs"
    assert s["updates"] == 12
    assert s["epochs"] == pytest.approx(1.5)


@pytest.mark.slow
def test_worker_slowdown_makes_one_worker_a_straggler(tmp_path):
    """--worker-slowdown 1:3: worker 1 takes three times as long per gradient (a slower
    accelerator); in sync mode worker 0 then spends most of its time waiting at the barrier."""
    train(cfg(tmp_path, workers=2, mode="sync", max_updates=150, compute_delay=0.01, worker_slowdown="1:3"))
    final = {r["worker"]: r for r in records(str(tmp_path / "run"), "progress") if r.get("final")}
    fast, slow = final[0], final[1]
    assert slow["compute_s"] / slow["pushes"] == pytest.approx(3 * fast["compute_s"] / fast["pushes"], rel=0.3)
    assert fast["wait_s"] > fast["compute_s"]


@pytest.mark.slow
def test_sync_matches_single_process_with_summed_batches(tmp_path):
    from pyasgd.core.flat import FlatModel
    from pyasgd.trainer.update import Updater
    from pyasgd.tasks import Cursor, make_task

    c = cfg(tmp_path, workers=3, mode="sync", max_updates=6, lr=1e-2, warmup=2)
    train(c)
    got = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["server"]
    # the same updates in one process: each step sums worker i's i-th batch for every i
    task = make_task(c)
    flat = FlatModel(task.build_model())
    up = Updater(c, flat.params)
    data = [task.batches(i, c.workers, Cursor()) for i in range(c.workers)]
    for _ in range(6):
        flat.params.copy_(up.master)
        grads = []
        for i in range(c.workers):
            flat.zero_grad()
            loss, _ = task.loss(flat.model, next(data[i])[0])
            loss.backward()
            # what a pusher puts in its slot: rounded to bf16 (the default) or as it is
            grads.append(flat.grads.to(torch.bfloat16) if c.grad_dtype == "bf16" else flat.grads.clone())
        assert up.apply(grads, [0] * c.workers).applied
    assert got["step"] == 6
    for key, mine in (("params", up.master), ("exp_avg", up.exp_avg), ("exp_avg_sq", up.exp_avg_sq)):
        # gradients arrive in any order, so sums differ by fp32 rounding only
        assert ((got[key] - mine).abs().max() / mine.abs().max()).item() < 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize("grad_dtype", ["fp32", "bf16"])
def test_the_cpu_server_without_a_master_copy_matches_the_master_path_bit_for_bit(tmp_path, grad_dtype):
    """One worker in sync mode is deterministic: the real run (the server reads the published
    buffer and writes the back one, no master copy; the gradient through an fp32 or bf16 slot)
    equals an in-process replay on a master copy, bit for bit, checkpoint included."""
    from pyasgd.core.flat import FlatModel
    from pyasgd.trainer.update import Updater
    from pyasgd.tasks import Cursor, make_task

    c = cfg(tmp_path, workers=1, mode="sync", max_updates=12, lr=1e-2, warmup=3, grad_dtype=grad_dtype)
    train(c)
    got = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["server"]
    task = make_task(c)
    flat = FlatModel(task.build_model())
    up = Updater(c, flat.params)
    assert up.master is not None  # the master-copy path
    data = task.batches(0, 1, Cursor())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (threads=1): the same reductions, the same bits
    try:
        for _ in range(12):
            flat.params.copy_(up.master)
            flat.zero_grad()
            loss, _ = task.loss(flat.model, next(data)[0])
            loss.backward()
            g = flat.grads.to(torch.bfloat16) if grad_dtype == "bf16" else flat.grads.clone()
            assert up.apply([g], [0]).applied
    finally:
        torch.set_num_threads(threads)
    assert got["step"] == 12
    for key, mine in (("params", up.master), ("exp_avg", up.exp_avg), ("exp_avg_sq", up.exp_avg_sq)):
        assert torch.equal(got[key], mine), key


@pytest.mark.slow
def test_checkpoint_keeps_the_position_of_the_last_applied_gradient(tmp_path):
    """Gradients still in flight or in the server's accumulation when it saves are not counted:
    the positions saved are those of each worker's last gradient in an update up to then."""
    from pyasgd.tasks import Cursor

    train(cfg(tmp_path, workers=2, mode="async", global_accum=4, max_updates=30, compute_delay=0.005))
    saved = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    last = {}
    for r in records(str(tmp_path / "run"), "update"):
        if r["update"] <= saved["server"]["step"]:
            last.update(zip(r["workers"], r["positions"]))
    assert saved["positions"].tolist() == [last[0], last[1]]
    assert all(Cursor.unpack(p).index > 0 or Cursor.unpack(p).epoch > 0 for p in last.values())
    assert Cursor.unpack(Cursor(3, 70_000).pack()) == Cursor(3, 70_000)


@pytest.mark.slow
def test_real_run_checkpoint_and_resume(tmp_path):
    train(cfg(tmp_path, workers=2, max_updates=40, save_every=20))
    first = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert first["server"]["step"] == 40
    summary = train(cfg(tmp_path, workers=2, max_updates=80, resume=str(tmp_path / "run")))
    assert summary["updates"] == 80
    second = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert second["server"]["step"] == 80
    assert not torch.equal(first["server"]["params"], second["server"]["params"])
    assert os.path.exists(tmp_path / "run" / "summary.prev.json")


@pytest.mark.slow
def test_worker_raising_stops_the_run_without_restarts(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASGD_TEST_FAULT", "raise:1:5")
    with pytest.raises(TrainingError, match=r"worker 1 failed(.|\n)*injected fault"):
        train(cfg(tmp_path, workers=2, max_updates=10_000, max_restarts=0))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["stopped_because"].startswith("failed: worker 1 failed")
    assert summary["worker_restarts"] == 0
    assert os.path.exists(tmp_path / "run" / "checkpoint.pt")  # the master state was sound


@pytest.mark.slow
def test_a_worker_that_keeps_failing_uses_up_its_restarts(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASGD_TEST_FAULT", "raise:1:5")  # every incarnation of worker 1 raises
    with pytest.raises(TrainingError, match=r"worker 1 died \(RuntimeError: injected fault(.|\n)*2 of --max-restarts 2"):
        train(cfg(tmp_path, workers=2, max_updates=10_000, max_restarts=2))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["worker_restarts"] == 2 and [r["worker"] for r in summary["restarts"]] == [1, 1]
    assert "injected fault" in summary["restarts"][0]["cause"]
    assert len(records(str(tmp_path / "run"), "restart")) == 2
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["server"]["step"] > 0  # saved on the way out


# --- the CLI, as a user runs it -------------------------------------------------------------------

@pytest.fixture
def cli(run_main):
    """pyasgd-train's main() in this process, on the synthetic task."""
    from pyasgd.trainer.cli import main

    return lambda *args: run_main(main, "--task", "synthetic", "--lr", "2e-3", "--warmup", "50", *args)


def start_cli(tmp_path, *args):
    p = subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", "--task", "synthetic", "--workers", "2", "--max-time", "0",
                          "--max-updates", "100000", "--valid-every", "50",
                          "--quiet", "--out", str(tmp_path / "run"), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is really training
        path = tmp_path / "run" / "metrics.jsonl"
        if path.exists() and '"update"' in path.read_text():
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("the run never started: " + p.communicate()[1][-2000:])
    return p, children(p.pid)


@pytest.mark.slow
def test_a_real_run_with_bf16_gradients_trains_leaves_nothing_and_resumes(tmp_path):
    p, kids = start_cli(tmp_path, "--grad-dtype", "bf16", "--max-updates", "400", "--compute-delay", "0.005",
                        "--lr", "5e-3", "--warmup", "50", "--save-every", "200")
    assert len(kids) >= 3  # server + 2 workers (+ multiprocessing's resource tracker)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert_all_gone(kids)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"pyasgd-{p.pid}-")]
    run = tmp_path / "run"
    assert read_json(run / "config.json")["grad_dtype"] == "bf16"
    ups = records(str(run), "update")
    assert len(ups) == 400
    assert sum(r["loss"] for r in ups[-10:]) < 0.5 * sum(r["loss"] for r in ups[:10])
    first = checkpoint.load(str(run / "checkpoint.pt"))["server"]
    assert first["step"] == 400 and first["params"].dtype == torch.float32
    summary = train(cfg(tmp_path, workers=2, grad_dtype="bf16", max_updates=450, resume=str(run)))
    assert summary["updates"] == 450 and summary["stopped_because"] == "max_updates"
    second = checkpoint.load(str(run / "checkpoint.pt"))["server"]
    assert second["step"] == 450 and not torch.equal(first["params"], second["params"])
    assert summary["final_valid"]["accuracy"] > 0.6


def test_sigint_stops_cleanly_with_130(tmp_path):
    p, kids = start_cli(tmp_path)
    assert len(kids) >= 3  # server + 2 workers (+ multiprocessing's resource tracker)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert_all_gone(kids)
    assert read_json(tmp_path / "run" / "summary.json")["stopped_because"] == "interrupted"


@pytest.mark.slow
def test_killed_worker_fails_the_run_cleanly_without_restarts(tmp_path):
    p, kids = start_cli(tmp_path, "--max-restarts", "0")
    os.kill(role(kids, "pyasgd-worker-1"), signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "died (killed by SIGKILL)" in err
    assert_all_gone(kids)


def role(kids, name):
    """The pid of the run's process named `name` (`ps -o comm`)."""
    named = {read_text(f"/proc/{k}/comm").strip(): k for k in kids if not gone(k)}
    assert name in named, named
    return named[name]


@pytest.mark.slow
def test_processes_are_named_by_role(tmp_path):
    p, kids = start_cli(tmp_path)
    try:
        names = sorted(read_text(f"/proc/{k}/comm").strip() for k in kids)
        assert {"pyasgd-server", "pyasgd-worker-0", "pyasgd-worker-1"} <= set(names), names
        assert read_text(f"/proc/{p.pid}/comm").strip() == "pyasgd-train"
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=120)
    assert_all_gone(kids, within=2.0)  # the launcher reaped everyone, its resource tracker too


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_killed_worker_is_replaced_and_the_run_finishes(tmp_path, mode):
    p, kids = start_cli(tmp_path, "--mode", mode, "--compute-delay", "0.01", "--max-updates", "1500",
                        "--save-every", "500")
    victim = role(kids, "pyasgd-worker-1")
    os.kill(victim, signal.SIGKILL)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert "worker 1 died (killed by SIGKILL); starting a replacement" in err
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["stopped_because"] == "max_updates" and summary["updates"] == 1500
    assert summary["worker_restarts"] == 1
    assert summary["restarts"][0]["worker"] == 1 and "SIGKILL" in summary["restarts"][0]["cause"]
    assert [r["worker"] for r in records(str(tmp_path / "run"), "restart")] == [1]
    after = [r for r in records(str(tmp_path / "run"), "update") if r["update"] > summary["restarts"][0]["update"] + 50]
    assert any(1 in r["workers"] for r in after)  # the replacement's gradients are applied
    assert_all_gone(kids)


@pytest.mark.slow
def test_sigterm_saves_and_stops_like_ctrl_c(tmp_path):
    p, kids = start_cli(tmp_path)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["stopped_because"] == "terminated"
    saved = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))  # the server saved on the way out
    assert saved["server"]["step"] >= summary["updates"] - 1 > 0
    assert_all_gone(kids)


@pytest.mark.slow
def test_a_killed_launcher_leaves_nothing_and_its_checkpoint_resumes(tmp_path):
    p, kids = start_cli(tmp_path)
    p.kill()
    p.communicate(timeout=30)  # reaped, as a shell would
    assert_all_gone(kids, within=30.0)  # workers die with it; the server saves first, then leaves
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"pyasgd-{p.pid}-")]
    saved = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert saved["server"]["step"] > 0
    summary = train(cfg(tmp_path, workers=2, max_updates=saved["server"]["step"] + 20, resume=str(tmp_path / "run")))
    assert summary["updates"] == saved["server"]["step"] + 20


@pytest.mark.slow
def test_a_killed_server_stops_the_run_naming_the_checkpoint_and_resume(tmp_path):
    p, kids = start_cli(tmp_path, "--save-every", "20")
    deadline = time.time() + 60
    while not records(str(tmp_path / "run"), "checkpoint") and time.time() < deadline:
        time.sleep(0.1)
    os.kill(role(kids, "pyasgd-server"), signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "the server died (killed by SIGKILL)" in err and "holds update" in err
    assert f"pyasgd-train --resume {tmp_path / 'run'}" in err
    assert_all_gone(kids)


def test_cli_runs_a_simulation_and_writes_the_run_directory(tmp_path, cli):
    r = cli("--simulate", "--mode", "async", "--workers", "4", "--global-accum", "2", "--max-updates", "50", "--quiet",
            "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert printed["updates"] == 50 and printed["global_accum"] == 2
    d = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= set(os.listdir(d))
    again = TrainConfig.from_dict(read_json(d / "config.json"))  # config.json round-trips
    assert again.global_accum == 2 and again.workers == 4 and again.simulate


def test_cli_loads_toml_and_options_override_it(tmp_path, cli):
    toml = tmp_path / "run.toml"
    toml.write_text('mode = "sync"\nworkers = 3\nmax-updates = 7\nbeta2 = 0.99\n')
    r = cli("--config", str(toml), "--simulate", "--max-updates", "9", "--quiet", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["mode"] == "sync" and saved["workers"] == 3 and saved["max_updates"] == 9 and saved["beta2"] == 0.99


@pytest.mark.parametrize("args,option", [
    (["--workers", "0"], "--workers"),
    (["--global-accum", "0"], "--global-accum"),
    (["--local-accum", "0"], "--local-accum"),
    (["--pull-every", "0"], "--pull-every"),
    (["--lr", "0"], "--lr"),
    (["--mode", "sync", "--workers", "4", "--global-accum", "2"], "--global-accum"),
    (["--devices", "tpu:0"], "--devices"),
    (["--devices", "cuda:0"], "--devices"),
    (["--stale-policy", "drop:x"], "--stale-policy"),
    (["--mode", "semi"], "--mode"),
    (["--grad-dtype", "fp16"], "--grad-dtype"),
])
def test_cli_rejects_bad_settings_before_starting(tmp_path, cli, args, option):
    if option == "--devices" and "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert option in r.stderr and "error" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_cli_refuses_an_out_directory_holding_another_run(tmp_path, cli):
    assert cli("--simulate", "--max-updates", "5", "--quiet", "--out", str(tmp_path / "run")).returncode == 0
    before = read_text(tmp_path / "run" / "summary.json")
    r = cli("--simulate", "--max-updates", "5", "--quiet", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--resume" in r.stderr and "already holds a run" in r.stderr
    assert read_text(tmp_path / "run" / "summary.json") == before


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="--max-updates"):
        TrainConfig(max_updates=0, max_time=0)
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        TrainConfig.from_dict({"batchsize": 3})


@pytest.mark.parametrize("spec", ["1", "x:2", "2:2", "0:0.5", "0:inf"])
def test_a_bad_worker_slowdown_names_the_option(spec):
    with pytest.raises(ConfigError, match="--worker-slowdown"):
        TrainConfig(workers=2, worker_slowdown=spec)
