"""Beyond one node: two nodes on loopback (two pyasgd-train launchers on 127.0.0.1, 2 workers
each, the synthetic task): the settings and torchrun's environment, the rendezvous and its
errors, synchronous SGD equal to one node of 4 workers, and a node killed mid-run."""
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pyasgd.core import checkpoint
from pyasgd.config import PER_NODE, TrainConfig
from pyasgd.errors import ConfigError
from pyasgd.nodes.agree import first_difference
from pyasgd.nodes.rendezvous import merge_summaries
import helpers
from helpers import children, read_json, segments_of


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(tmp_path, rank, port, *extra, name="run"):
    return [sys.executable, "-m", "pyasgd.trainer.cli", "--task", "synthetic", "--mode", "sync", "--workers", "2",
            "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--threads", "1", "--quiet", "--no-valid-process", "--valid-every", "0", "--lr", "1e-2", "--warmup", "2",
            "--out", str(tmp_path / f"{name}{rank}"), *map(str, extra)]


def start_nodes(tmp_path, *extra, ranks=(0, 1), port=None, per_node=None, name="run", env=None):
    """One launcher per node rank, started together; returns (port, processes). `env` maps a
    rank to extra environment variables."""
    port = port or free_port()
    per_node, env = per_node or {}, env or {}
    procs = [subprocess.Popen(node_args(tmp_path, r, port, *extra, *per_node.get(r, ()), name=name),
                              env={**os.environ, **env.get(r, {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ranks]
    return port, procs


def finish(procs, timeout=240):
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            pytest.fail(f"a node did not finish within {timeout} s: {e[-3000:]}")
        out.append((p.returncode, o, e))
    return out


# two nodes' processes get longer to go than one node's
assert_all_gone = functools.partial(helpers.assert_all_gone, within=15.0)


# --- settings -------------------------------------------------------------------------------------

def base(**kw):
    return TrainConfig(**{"task": "synthetic", "mode": "sync", "workers": 2, "max_updates": 5, **kw})


@pytest.mark.parametrize("kw, option", [
    (dict(nnodes=0), "--nnodes"),
    (dict(nnodes=2, node_rank=2, master_port=29500), "--node-rank"),
    (dict(nnodes=2, node_rank=-1, master_port=29500), "--node-rank"),
    (dict(nnodes=2), "--master-port"),
    (dict(nnodes=2, master_port=70000), "--master-port"),
    (dict(nnodes=2, master_port=29500, master_addr=" "), "--master-addr"),
    (dict(nnodes=2, master_port=29500, simulate=True), "--nnodes"),
    (dict(nnodes=2, master_port=29500, mode="async", clip_norm=1.0), "--clip-norm"),
    (dict(nnodes=2, master_port=29500, global_accum=2), "--global-accum"),
])
def test_bad_node_settings_name_the_option(kw, option):
    with pytest.raises(ConfigError, match=f"^{option}:"):
        base(**kw)


def test_G_and_the_data_count_every_node():
    c = base(nnodes=3, node_rank=2, master_port=29500, workers=4)
    assert c.total_workers == 12 and c.G == 12 and c.global_rank(1) == 9
    assert base(nnodes=2, master_port=29500, global_accum=4).G == 4
    with pytest.raises(ConfigError, match="--train-size"):
        base(nnodes=8, master_port=29500, workers=4, train_size=1000, batch_size=32)


def test_torchrun_environment_fills_the_node_settings_and_options_win(monkeypatch):
    from pyasgd.trainer.cli import build_parser, config_from_args

    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511", "LOCAL_WORLD_SIZE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = ["--task", "synthetic", "--mode", "sync", "--max-updates", "5"]
    c = config_from_args(build_parser().parse_args(args))
    assert (c.nnodes, c.node_rank, c.master_addr, c.master_port) == (2, 1, "10.0.0.7", 29511)
    c = config_from_args(build_parser().parse_args(args + ["--master-port", "30000"]))
    assert c.master_port == 30000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="--nproc-per-node 1"):
        config_from_args(build_parser().parse_args(args))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match=r"\$RANK"):
        config_from_args(build_parser().parse_args(args))


def test_a_torchrun_restart_gets_fresh_rendezvous_keys(monkeypatch):
    """torchrun's agent store outlives a restart of its workers: the restarted node must not see
    the rank its failed attempt registered ("another node already started with --node-rank")."""
    from torch.distributed import TCPStore

    from pyasgd.nodes.rendezvous import connect_store

    port = free_port()
    agent = TCPStore("127.0.0.1", port, 2, True, wait_for_workers=False)  # what torchrun's agent hosts
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "true")
    c = TrainConfig(task="synthetic", mode="sync", max_updates=5, nnodes=2, node_rank=1,
                    master_addr="127.0.0.1", master_port=port)
    counts = []
    for attempt in ("0", "0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        counts.append(connect_store(c, host=False, timeout=10).add("rank/1", 1))
    assert counts == [1, 2, 1]  # the same attempt twice is a duplicate rank; a restart is not
    del agent


def test_help_lists_the_node_options(run_main):
    from pyasgd.trainer.cli import main

    r = run_main(main, "--help")
    for opt in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "torchrun"):
        assert opt in r.stdout


def test_first_difference_follows_the_fields_and_per_node_ones_are_free():
    from pyasgd.nodes.agree import agreement

    a, b = agreement(base(seed=1, lr=1e-3)), agreement(base(seed=2, lr=2e-3))
    assert first_difference(a, b) == "seed"  # seed comes before lr among the fields
    assert first_difference(a, agreement(base(seed=1, lr=1e-3, out="x", threads=3, node_rank=0))) is None
    assert {"node_rank", "out", "resume"} <= set(PER_NODE)


def test_merge_summaries_adds_the_nodes_up():
    s0 = {"tokens": 100, "wps": 10.0, "staleness_hist": {"0": 3, "1": 1}, "updates": 4}
    s1 = {"tokens": 50, "wps": 5.5, "staleness_hist": {"1": 1, "2": 1}, "updates": 4}
    m = merge_summaries({0: s0, 1: s1}, 3)
    assert m["tokens"] == 150 and m["wps"] == 15.5 and m["staleness_hist"] == {"0": 3, "1": 2, "2": 1}
    assert m["avg_staleness"] == pytest.approx(4 / 6)
    assert [n.get("missing", False) for n in m["nodes"]] == [False, False, True]


def test_merged_sharded_summaries_count_each_gradient_once():
    # The sharded server: every gradient reaches every shard, so node 0's (shard 0's) counts are
    # the run's; the pieces each owner dropped are summed apart.
    s0 = {"shard": {}, "tokens": 100, "gradients": 10, "dropped_gradients": 2, "worker_restarts": 0}
    s1 = {"shard": {}, "tokens": 100, "gradients": 10, "dropped_gradients": 3, "worker_restarts": 1}
    m = merge_summaries({0: s0, 1: s1}, 2)
    assert (m["tokens"], m["gradients"], m["dropped_gradients"], m["dropped_pieces"]) == (100, 10, 2, 5)
    assert m["worker_restarts"] == 1  # each node's own workers: summed


# --- rendezvous errors ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_port_nobody_listens_on_fails_within_the_timeout(tmp_path):
    port = free_port()
    t = time.monotonic()
    _, (p,) = start_nodes(tmp_path, "--timeout", "4", "--max-updates", "5", ranks=(1,), port=port)
    ((code, out, err),) = finish([p], timeout=60)
    took = time.monotonic() - t
    assert code == 2, err
    assert f"no node 0 answered at 127.0.0.1:{port} (--master-addr, --master-port) within --timeout" in err
    assert took < 4 + 20  # the timeout, plus starting Python and torch on a busy machine
    assert not (tmp_path / "run1").exists()  # nothing was created


@pytest.mark.slow
def test_a_node_that_never_comes_fails_node_0_naming_it(tmp_path):
    _, (p,) = start_nodes(tmp_path, "--timeout", "3", "--max-updates", "5", ranks=(0,))
    ((code, out, err),) = finish([p], timeout=60)
    assert code == 2, err
    assert "node(s) 1 of --nnodes 2 did not join the rendezvous" in err


@pytest.mark.slow
@pytest.mark.parametrize("option, value, default", [("seed", "7", "1"), ("nnodes", "3", "2")])
def test_disagreeing_configurations_fail_at_rendezvous_naming_the_field(tmp_path, option, value, default):
    t = time.monotonic()
    _, procs = start_nodes(tmp_path, "--timeout", "60", "--max-updates", "5", per_node={1: [f"--{option}", value]})
    results = finish(procs, timeout=90)
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, err
        assert f"--{option}: node" in err and f"every node must be started with the same --{option}" in err
    assert f"node 1 has {value} but node 0 has {default}" in results[1][2]
    assert time.monotonic() - t < 40  # at once, not after --timeout
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


@pytest.mark.slow
def test_two_nodes_with_one_rank_fail_naming_it(tmp_path):
    port, procs = start_nodes(tmp_path, "--timeout", "60", "--max-updates", "5")
    _, (twin,) = start_nodes(tmp_path, "--timeout", "60", "--max-updates", "5", ranks=(1,), port=port, name="twin")
    results = finish([*procs, twin], timeout=180)
    codes = [code for code, _, _ in results]
    assert codes[0] == 0 and sorted(codes[1:]) == [0, 2], [err[-2000:] for _, _, err in results]
    err = next(err for code, _, err in results if code == 2)
    assert "--node-rank: another node was already started with --node-rank 1" in err


# --- synchronous SGD across nodes ---------------------------------------------------------------

@pytest.mark.slow
def test_sync_across_two_nodes_equals_one_node_of_four_workers(tmp_path):
    """2 nodes x 2 workers make, update by update, what one node of 4 workers makes on the same
    batches (worker R*N + r reads the global shard R*N + r): replayed here in one process, the
    way tests/test_trainer.py checks one node's sync against the same replay."""
    from pyasgd.core.flat import FlatModel
    from pyasgd.trainer.update import Updater
    from pyasgd.tasks import Cursor, make_task

    steps = 6
    _, procs = start_nodes(tmp_path, "--max-updates", steps, "--timeout", "60")
    for code, out, err in finish(procs):
        assert code == 0, err
    got = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt"))["server"] for r in (0, 1)]
    c = TrainConfig(task="synthetic", mode="sync", workers=4, max_updates=steps, lr=1e-2, warmup=2)
    task = make_task(c)
    flat = FlatModel(task.build_model())
    up = Updater(c, flat.params)
    data = [task.batches(i, 4, Cursor()) for i in range(4)]
    for _ in range(steps):
        flat.params.copy_(up.master)
        grads = []
        for i in range(4):
            flat.zero_grad()
            loss, _ = task.loss(flat.model, next(data[i])[0])
            loss.backward()
            grads.append(flat.grads.to(torch.bfloat16) if c.grad_dtype == "bf16" else flat.grads.clone())
        assert up.apply(grads, [0] * 4).applied
    for node in got:
        assert node["step"] == steps
        for key, mine in (("params", up.master), ("exp_avg", up.exp_avg), ("exp_avg_sq", up.exp_avg_sq)):
            assert ((node[key] - mine).abs().max() / mine.abs().max()).item() < 1e-5, key
    assert torch.equal(got[0]["params"], got[1]["params"])  # the replicas are the same, bit for bit
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["nnodes"] == 2 and summary["total_workers"] == 4 and summary["updates"] == steps
    assert summary["staleness_hist"] == {"0": 4 * steps}
    assert [n["node_rank"] for n in summary["nodes"]] == [0, 1]
    assert summary["tokens"] == sum(n["tokens"] for n in summary["nodes"]) == 4 * steps * 32 * 16
    ups = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines() if '"update"' in x]
    assert sorted(ups[0]["workers"]) == [2, 3]  # node 1's workers are global workers 2 and 3


# --- asynchronous SGD across nodes: the sharded server ----------------------------------------------

def test_shards_are_contiguous_and_even():
    from pyasgd.nodes.sharded import shard_bounds

    for n, m in ((7, 2), (22, 3), (1, 1), (2 ** 20 + 3, 4)):
        b = shard_bounds(n, m)
        assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(m - 1))
        assert max(hi - lo for lo, hi in b) - min(hi - lo for lo, hi in b) <= 1


def test_a_failing_server_thread_reaches_the_servers_loop():
    """An unexpected error in the collector (or a sender/receiver) thread becomes an event the
    server's loop raises, naming the thread: before, the thread died silently and the user saw
    "no gradients for --timeout s" two minutes later."""
    import queue
    import types

    from pyasgd.nodes.sharded import collect_loop

    class TornRegion:
        def collect(self, g, timeout):
            raise ValueError("slot 3 holds a torn header")

    fake = types.SimpleNamespace(stopping=False, region=TornRegion(), events=queue.Queue())
    collect_loop(fake)  # returns, having reported
    kind, thread, text = fake.events.get_nowait()
    assert (kind, thread) == ("thread_failed", "collect") and "slot 3 holds a torn header" in text


def check_conservation(summary=None, shards=None):
    """Every gradient any node pushed reached every shard's owner exactly once (same count, same
    sum of piece ids) and was applied, dropped, skipped or held at the stop."""
    shards = shards or [n["shard"] for n in summary["nodes"]]
    dispatched = sum(s["dispatched"] for s in shards)
    ids = sum(s["dispatched_ids"] for s in shards)
    assert dispatched > 0
    for s in shards:
        assert (s["received"], s["received_ids"]) == (dispatched, ids), s
        assert s["applied_gradients"] + s["dropped"] + s["skipped_gradients"] + s["held_at_stop"] == s["received"], s
    return shards


@pytest.mark.slow
def test_async_across_nodes_has_the_papers_staleness_and_conserves_every_gradient(tmp_path):
    """Async with G = 4 over 2 nodes x 2 workers: staleness per gradient per shard is the
    paper's 0.75 for N = 4 (within 10 %), with compute that overlaps (--compute-delay)."""
    _, procs = start_nodes(tmp_path, "--mode", "async", "--global-accum", "4", "--max-updates", "160",
                           "--compute-delay", "0.04", "--lr", "2e-3", "--warmup", "50", "--timeout", "60")
    for code, out, err in finish(procs):
        assert code == 0, err
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["mode"] == "async" and summary["global_accum"] == 4 and summary["stopped_because"] == "max_updates"
    assert abs(summary["avg_staleness"] - 0.75) <= 0.075, summary["staleness_hist"]
    shards = check_conservation(summary)
    assert [s["index"] for s in shards] == [0, 1] and shards[0]["hi"] == shards[1]["lo"]
    assert summary["tokens"] == sum(n["tokens"] for n in summary["nodes"]) / 2  # each shard saw every gradient
    # at an ordered stop every node has published every shard's last update: the views agree
    saved = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt")) for r in (0, 1)]
    assert torch.equal(saved[0]["view"], saved[1]["view"])
    for r, state in enumerate(saved):
        lo, hi = state["shard"]["lo"], state["shard"]["hi"]
        assert torch.equal(state["server"]["params"], state["view"][lo:hi])
        assert state["server"]["exp_avg"].numel() == hi - lo
    ups = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines() if '"update"' in x]
    assert {u["shard"] for u in ups if u["kind"] == "update"} == {1}


# --- failures ----------------------------------------------------------------------------------

def wait_training(tmp_path, procs, name="run"):
    deadline = time.time() + 120
    while time.time() < deadline:
        paths = [tmp_path / f"{name}{r}" / "metrics.jsonl" for r in (0, 1)]
        if all(p.exists() and '"kind":"update"' in p.read_text() for p in paths):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    pytest.fail("the nodes never trained: " + "\n".join(p.communicate()[1][-2000:] for p in procs))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_node_stops_the_other_cleanly_and_the_pair_resumes(tmp_path, mode):
    timeout = 20
    args = ("--mode", mode, "--max-updates", "100000", "--max-time", "0", "--timeout", timeout,
            "--compute-delay", "0.005")
    _, procs = start_nodes(tmp_path, *args)
    wait_training(tmp_path, procs)
    kids = {r: children(p.pid) for r, p in enumerate(procs)}
    assert all(len(k) >= 3 for k in kids.values()), kids  # a server and 2 workers per node
    t = time.monotonic()
    procs[1].kill()  # node 1's launcher, SIGKILLed
    (code0, _, err0), (code1, _, _) = finish(procs, timeout=timeout + 60)
    assert code1 == -signal.SIGKILL
    assert code0 == 1, err0
    assert time.monotonic() - t < timeout + 15
    assert "node 1 failed: its launcher died" in err0, err0
    assert_all_gone([k for ks in kids.values() for k in ks])
    assert not segments_of([p.pid for p in procs])
    saved = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt")) for r in (0, 1)]
    steps = [state["server"]["step"] for state in saved]
    assert min(steps) > 0
    if mode == "sync":
        assert steps[0] == steps[1]  # both saved the last update they made together
    else:  # each owner saved its shard; after the ordered stop the views agree
        assert [state["shard"]["index"] for state in saved] == [0, 1]
        assert torch.equal(saved[0]["view"], saved[1]["view"])
        shards = check_conservation(shards=[state["shard_stats"] for state in saved])  # node 1 sent no summary
        # the ordered stop (below --max-updates) applied what each owner still held: nothing lost
        assert all(s["held_at_stop"] == 0 and s["applied_gradients"] + s["dropped"] == s["received"] for s in shards)
    assert "failed" in read_json(tmp_path / "run0" / "summary.json")["stopped_because"]
    # the pair resumes from its checkpoints (reassembled from the shards) and goes on
    port = free_port()
    target = max(steps) + 10
    procs = [subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", "--resume", str(tmp_path / f"run{r}"),
                               "--master-port", str(port), "--max-updates", str(target), "--max-time", "600"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for code, out, err in finish(procs):
        assert code == 0, err
    resumed = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt")) for r in (0, 1)]
    if mode == "sync":
        assert [s["server"]["step"] for s in resumed] == [target] * 2
        assert torch.equal(resumed[0]["server"]["params"], resumed[1]["server"]["params"])
    else:  # the first shard to reach the target stops the pair
        assert max(s["server"]["step"] for s in resumed) == target
        assert all(s["server"]["step"] > step for s, step in zip(resumed, steps))
        assert torch.equal(resumed[0]["view"], resumed[1]["view"])
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["stopped_because"] in ("max_updates", "node 1 stopped (max_updates)")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_whole_node_killed_at_once_is_named_by_its_silence(tmp_path, mode, request):
    """Every process of node 1 SIGKILLed together (a machine lost): node 0's collective fails at
    once, it saves, and its launcher names node 1 from the missing heartbeat within --timeout."""
    from pyasgd.core.region import SharedRegion

    timeout = 20  # a node is lost after timeout / 2 s without a heartbeat
    args = ("--mode", mode, "--max-updates", "100000", "--max-time", "0", "--timeout", timeout,
            "--compute-delay", "0.005")
    port = free_port()
    procs = [subprocess.Popen(node_args(tmp_path, r, port, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for r in (0, 1)]
    wait_training(tmp_path, procs)
    kids = children(procs[0].pid) + children(procs[1].pid)
    semaphores = helpers.semaphores_of(procs[1].pid)  # its resource tracker dies with it: nobody unlinks them
    request.addfinalizer(lambda: helpers.remove_files(semaphores))
    t = time.monotonic()
    os.killpg(procs[1].pid, signal.SIGKILL)
    (code0, _, err0), _ = finish(procs, timeout=timeout + 60)
    assert code0 == 1, err0
    assert time.monotonic() - t < timeout + 15
    assert "node 1 stopped responding" in err0, err0
    assert checkpoint.load(str(tmp_path / "run0" / "checkpoint.pt"))["server"]["step"] > 0
    assert_all_gone(kids)
    assert not segments_of([procs[0].pid])
    SharedRegion.create(1, 1).close()  # node 1 died with its segment: the next run's create() sweeps it
    assert not segments_of([procs[1].pid])
    assert semaphores  # the run's queue and events, removed at the end of the test


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failing_node_fails_the_other_naming_it(tmp_path, mode):
    _, procs = start_nodes(tmp_path, "--mode", mode, "--max-updates", "100000", "--max-time", "0", "--max-restarts", "0",
                           "--timeout", "30", env={1: {"PYASGD_TEST_FAULT": "raise:1:20"}})
    (code0, _, err0), (code1, _, err1) = finish(procs, timeout=120)
    assert code1 == 1 and "injected fault in worker 1" in err1, err1
    assert code0 == 1, err0
    assert "node 1 failed: worker 1 failed" in err0, err0
    steps = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt"))["server"]["step"] for r in (0, 1)]
    assert min(steps) > 0 and (mode == "async" or steps[0] == steps[1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_failing_on_its_own_saves_its_checkpoint_and_names_itself(tmp_path, mode):
    """Not a lost node: node 1's server itself raises after update 12 (as an idle --timeout or a
    CUDA error would). It saves its checkpoint first (--save-every 0: no other would exist), and
    node 0 stops naming it."""
    _, procs = start_nodes(tmp_path, "--mode", mode, "--max-updates", "100000", "--max-time", "0", "--save-every", "0",
                           "--timeout", "30", env={1: {"PYASGD_TEST_SERVER_FAULT": "12"}})
    (code0, _, err0), (code1, _, err1) = finish(procs, timeout=120)
    assert code1 == 1 and "injected fault in the server after update 12" in err1, err1
    assert code0 == 1 and "node 1 failed: server failed" in err0, err0
    assert checkpoint.load(str(tmp_path / "run1" / "checkpoint.pt"))["server"]["step"] == 12


@pytest.mark.slow
def test_an_interrupted_node_stops_the_other_after_the_same_update(tmp_path):
    _, procs = start_nodes(tmp_path, "--max-updates", "100000", "--max-time", "0", "--timeout", "30")
    wait_training(tmp_path, procs)
    procs[1].send_signal(signal.SIGINT)  # node 1 ends its part (as Ctrl-C would): node 0 stops with it
    (code0, _, err0), (code1, _, err1) = finish(procs, timeout=90)
    assert code1 == 130, err1
    assert code0 == 0, err0
    assert read_json(tmp_path / "run0" / "summary.json")["stopped_because"] == "node 1 stopped (interrupted)"
    steps = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt"))["server"]["step"] for r in (0, 1)]
    assert steps[0] == steps[1] > 0


@pytest.mark.slow
def test_torchrun_launches_the_nodes(tmp_path):
    """torchrun --nproc-per-node 1 on each node: pyasgd-train reads RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT, and shares the store torchrun's agent hosts on MASTER_PORT."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "pyasgd.trainer.cli", "--task", "synthetic", "--mode", "sync", "--workers", "2",
                               "--max-updates", "5", "--threads", "1", "--quiet", "--no-valid-process",
                               "--valid-every", "0", "--timeout", "60", "--out", str(tmp_path / f"run{r}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for code, out, err in finish(procs):
        assert code == 0, err
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["nnodes"] == 2 and summary["updates"] == 5 and len(summary["nodes"]) == 2
    assert read_json(tmp_path / "run1" / "config.json")["node_rank"] == 1


@pytest.mark.slow
def test_a_sync_resume_takes_the_state_of_the_node_ahead(tmp_path):
    """If one node's checkpoint is behind (it lost the last update the other completed), a
    resumed pair continues from the node ahead: both end with the same parameters and step."""
    _, procs = start_nodes(tmp_path, "--max-updates", "5", "--timeout", "60")
    for code, out, err in finish(procs):
        assert code == 0, err
    path = str(tmp_path / "run1" / "checkpoint.pt")
    behind = checkpoint.load(path)
    behind["server"]["step"] = 4
    behind["server"]["params"] = behind["server"]["params"] + 0.5  # not what node 0 holds
    checkpoint.save_atomic(behind, path)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", "--resume", str(tmp_path / f"run{r}"),
                               "--master-port", str(port), "--max-updates", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for code, out, err in finish(procs):
        assert code == 0, err
    after = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt"))["server"] for r in (0, 1)]
    assert [s["step"] for s in after] == [8, 8]
    assert torch.equal(after[0]["params"], after[1]["params"])
    assert torch.equal(after[0]["exp_avg"], after[1]["exp_avg"])


# --- staleness compensation across nodes ------------------------------------------------------------

def test_prediction_and_averaging_are_refused_for_the_sharded_server():
    for kw in (dict(predict="auto"), dict(ema=0.99)):
        with pytest.raises(ConfigError, match="one node or --mode sync") as e:
            base(mode="async", nnodes=2, master_port=29500, **kw)
        assert "\n" not in str(e.value)
    base(mode="async", nnodes=2, master_port=29500, stale_policy="dc-adaptive:1")  # dc works shard by shard
    base(mode="sync", nnodes=2, master_port=29500, ema=0.99, predict="0.5")


@pytest.mark.slow
def test_sync_across_nodes_with_averaging_validates_the_average(tmp_path):
    _, procs = start_nodes(tmp_path, "--max-updates", 8, "--timeout", "60", "--ema", "0.9")
    for code, out, err in finish(procs):
        assert code == 0, err
    got = [checkpoint.load(str(tmp_path / f"run{r}" / "checkpoint.pt"))["server"] for r in (0, 1)]
    assert torch.equal(got[0]["ema"], got[1]["ema"]) and not torch.equal(got[0]["ema"], got[0]["params"])
    best = checkpoint.load(str(tmp_path / "run0" / "best.pt"))["params"]
    assert torch.equal(best, got[0]["ema"])  # node 0 validated the average, not the published parameters


@pytest.mark.slow
def test_async_across_nodes_with_delay_compensation_conserves_every_gradient(tmp_path):
    _, procs = start_nodes(tmp_path, "--mode", "async", "--global-accum", "4", "--max-updates", "40",
                           "--compute-delay", "0.02", "--lr", "2e-3", "--warmup", "10", "--timeout", "60",
                           "--stale-policy", "dc-adaptive:1")
    for code, out, err in finish(procs):
        assert code == 0, err
    summary = read_json(tmp_path / "run0" / "summary.json")
    check_conservation(summary)
    for r in (0, 1):
        ups = [json.loads(x) for x in (tmp_path / f"run{r}" / "metrics.jsonl").read_text().splitlines()
               if '"kind":"update"' in x.replace(" ", "")]
        assert ups and all("uncorrected" in u for u in ups)
        stale = sum(s for u in ups for s in u["staleness"])
        assert stale > 0  # there was something to correct
