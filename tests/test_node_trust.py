"""Trust between nodes: the join token (HMAC at the rendezvous, sealed notes and summaries,
settings never readable in the store), the checkpoints' agreement at the rendezvous, and "slow is
not lost" (a node that beats but makes no progress is waited for and reported, never called lost).
Real launchers on 127.0.0.1 where it matters; the protocol's pieces against a real TCPStore."""
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import helpers

from pyasgd.config import TrainConfig
from pyasgd.nodes import auth
from pyasgd.nodes.agree import RendezvousError, check_checkpoints, check_settings, resume_facts
from helpers import children, read_json, segments_of
from test_multinode import assert_all_gone, finish, free_port, node_args, start_nodes, wait_training


# --- the token's pieces ---------------------------------------------------------------------------

def test_sealed_text_opens_only_under_the_same_token_and_nonce_and_unaltered():
    s = auth.Sealer(b"secret", "n1")
    text = json.dumps({"run_dir": "/data/run0", "lr": 0.01})
    sealed = s.seal(text, "summary/1")
    assert "run0" not in sealed and "0.01" not in sealed and sealed != s.seal(text, "summary/1")  # a fresh IV each time
    assert s.open(sealed, "summary/1") == text
    assert s.open(sealed, "summary/2") is None  # moved to another key: refused
    assert auth.Sealer(b"other", "n1").open(sealed, "summary/1") is None
    assert auth.Sealer(b"secret", "n2").open(sealed, "summary/1") is None
    import base64
    for at in (0, 20, -1):  # one altered bit: in the IV, the tag, the ciphertext
        raw = bytearray(base64.b64decode(sealed[len("sealed:"):]))
        raw[at] ^= 1
        assert s.open("sealed:" + base64.b64encode(bytes(raw)).decode(), "summary/1") is None
    assert s.open(text, "summary/1") is None and s.open("sealed:@@", "summary/1") is None  # not sealed, not base64
    assert auth.Sealer(None, None).open(text, "summary/1") == text  # an open run: the identity


def test_settings_digests_hide_values_but_name_the_first_difference():
    key, nonce = b"k", "n"
    mine = {"seed": 1, "lr": 0.01, "workers": 2}
    theirs = auth.digests(key, nonce, {**mine, "lr": 0.02}, 1)
    shown = auth.digests(key, nonce, mine, 1)  # this node's values as node 1 would publish them
    assert "0.01" not in json.dumps(shown) and shown["seed"] == auth.digests(key, nonce, {"seed": 1}, 1)["seed"]
    with pytest.raises(RendezvousError, match=r"^--lr: node 0 has 0.01 but node 1 has a different value; every node"):
        check_settings(0, mine, shown, 1, theirs, sealed=True)
    check_settings(0, mine, shown, 1, auth.digests(key, nonce, mine, 1), sealed=True)
    with pytest.raises(RendezvousError, match="^--(workers|seed|lr): "):  # node 0's digests copied as node 1's: refused
        check_settings(0, mine, shown, 1, auth.digests(key, nonce, mine, 0), sealed=True)
    with pytest.raises(RendezvousError, match="^--(workers|seed|lr): "):  # garbage
        check_settings(0, mine, shown, 1, ["not", "a", "dict"], sealed=True)


@pytest.fixture
def store():
    from torch.distributed import TCPStore

    port = free_port()
    s = TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    yield lambda: TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=10))
    del s


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("token, admitted, says", [
    (b"secret", True, ""),
    (b"wrong", False, "node 0 refused this node: its join token is wrong"),
    (None, False, "node 0 requires a join token"),
])
def test_node_0_admits_only_a_node_that_proves_the_token(store, token, admitted, says):
    host, joiner = store(), store()
    sealer0 = auth.publish_mode(host, b"secret")
    log = Log()
    door = auth.Admissions(sealer0, log)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            door.answer(host)
            time.sleep(0.01)
    t = threading.Thread(target=serve)
    t.start()
    try:
        start = time.monotonic()
        if admitted:
            sealer1 = auth.join(joiner, 1, token, lambda what: time.sleep(0.01))
            assert sealer1.open(sealer0.seal("hello", "k"), "k") == "hello"  # both hold the same sealing keys
            assert not log.lines
        else:
            with pytest.raises(auth.JoinRefused, match=says):
                auth.join(joiner, 1, token, lambda what: time.sleep(0.01))
            time.sleep(0.1)
            assert len(log.lines) == 1 and "asked to join as node 1 from host" in log.lines[0], log.lines
        assert time.monotonic() - start < 10
    finally:
        stop.set()
        t.join()


def test_a_token_node_refuses_an_open_node_0_and_latecomers_are_refused(store):
    host, joiner = store(), store()
    auth.publish_mode(host, None)
    with pytest.raises(auth.JoinRefused, match="this node has a join token but node 0 runs without one"):
        auth.join(joiner, 1, b"secret", lambda what: time.sleep(0.01))
    assert not auth.join(store(), 1, None, lambda what: None).on  # an open run: as before


def test_a_malformed_attempt_or_verdict_is_refused_not_a_crash(store):
    host, joiner = store(), store()
    log = Log()
    door = auth.Admissions(auth.publish_mode(host, b"secret"), log, missing_s=0.3)
    n = host.add("auth/attempts", 1)
    host.set(f"auth/attempt/{n}", json.dumps({"node": 1, "proof": "\u00e9" * 64}))  # not ASCII
    host.add("auth/attempts", 1)  # counted, never written (its node died): skipped after missing_s
    n3 = host.add("auth/attempts", 1)
    host.set(f"auth/attempt/{n3}", "not json")
    deadline = time.monotonic() + 20
    while not host.check([f"auth/verdict/{n3}"]):
        door.answer(host)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not json.loads(host.get(f"auth/verdict/{n}"))["admitted"] and len(log.lines) == 2
    host.set("auth/verdict/4", "[]")
    host.add("auth/attempts", 0)
    with pytest.raises(auth.JoinRefused, match="not readable"):
        auth.join(joiner, 1, b"secret", lambda what: time.sleep(0.01))


def test_an_impostor_node_0_is_not_joined(store):
    host, joiner = store(), store()
    auth.publish_mode(host, b"secret")
    host.set("auth/verdict/1", json.dumps({"admitted": True, "proof": "0" * 64}))  # says yes, proves nothing
    with pytest.raises(auth.JoinRefused, match="cannot prove the join token"):
        auth.join(joiner, 1, b"secret", lambda what: time.sleep(0.01))


# --- the checkpoints' agreement ---------------------------------------------------------------------

def facts(step=5, params=10, shard=None):
    state = {"server": {"step": step, "params": torch.zeros(3)}, "view": torch.zeros(params)}
    if shard is not None:
        state["shard"] = dict(zip(("index", "nnodes", "lo", "hi"), shard))
    return resume_facts(state)


def cfg(mode="async"):
    return TrainConfig(task="synthetic", mode=mode, workers=2, nnodes=2, node_rank=0, master_port=29500,
                       max_updates=5)


@pytest.mark.parametrize("mine, theirs, message", [
    (facts(shard=[0, 2, 0, 5]), {"resume": False}, "node 0 resumes from its checkpoint but node 1 starts a new run"),
    ({"resume": False}, facts(shard=[1, 2, 5, 10]), "node 1 resumes from its checkpoint but node 0 starts a new run"),
    (facts(shard=[0, 2, 0, 5]), facts(params=12, shard=[1, 2, 6, 12]), "node 1's checkpoint holds 12 parameters"),
    (facts(shard=[0, 2, 0, 5]), facts(shard=[0, 2, 0, 5]), "node 1's checkpoint holds shard 0 of 2 nodes"),
    (facts(shard=[1, 2, 5, 10]), facts(shard=[0, 2, 0, 5]), "node 0's checkpoint holds shard 1 of 2 nodes"),
    (facts(shard=[0, 3, 0, 4]), facts(shard=[1, 3, 4, 7]), "node 0's checkpoint holds shard 0 of 3 nodes"),
    (facts(shard=[0, 2, 0, 5]), facts(), "node 1's checkpoint holds no shard"),
])
def test_checkpoints_that_do_not_fit_together_are_refused_naming_the_node(mine, theirs, message):
    with pytest.raises(RendezvousError, match=message):
        check_checkpoints(cfg(), 0, mine, 1, theirs)


def test_checkpoints_that_fit_together_pass():
    check_checkpoints(cfg(), 0, facts(shard=[0, 2, 0, 5]), 1, facts(step=9, shard=[1, 2, 5, 10]))
    check_checkpoints(cfg("sync"), 0, facts(step=5), 1, facts(step=6))  # sync: the node ahead's state is taken
    check_checkpoints(cfg(), 0, {"resume": False}, 1, {"resume": False})


# --- real launchers -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_wrong_token_is_refused_within_10_s_and_named_in_node_0s_log(tmp_path):
    from torch.distributed import PrefixStore, TCPStore

    from pyasgd.nodes.rendezvous import PREFIX

    port = free_port()
    args = ("--max-updates", "20", "--timeout", "20")
    node0 = subprocess.Popen(node_args(tmp_path, 0, port, *args), env={**os.environ, auth.ENV: "right"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Without the token nothing of the settings is readable in node 0's store.
        deadline = time.monotonic() + 60
        spy = None
        while spy is None:
            try:
                spy = PrefixStore(PREFIX, TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=5)))
            except RuntimeError:
                assert time.monotonic() < deadline and node0.poll() is None
                time.sleep(0.2)
        spy.wait(["config/0"], datetime.timedelta(seconds=60))
        published = spy.get("config/0").decode()
        assert '"lr"' in published and "0.01" not in published and "synthetic" not in published
        t = time.monotonic()
        code, out, err = finish([subprocess.Popen(node_args(tmp_path, 1, port, *args, "--rdzv-token", "wrong"),
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)], 60)[0]
        assert time.monotonic() - t < 10 + 5  # 10 s, plus this interpreter's start on a busy machine
        assert code == 2 and err.strip().splitlines() == [
            "pyasgd-train: error: node 0 refused this node: its join token is wrong (--rdzv-token or "
            "PYASGD_RDZV_TOKEN must be node 0's)"], err
        assert not os.path.exists(tmp_path / "run1")  # refused before anything was made
    finally:
        node0.kill()
        _, err0 = node0.communicate(timeout=60)
    assert "refused a node that asked to join as node 1 from host" in err0, err0


@pytest.mark.slow
def test_nodes_with_the_same_token_train_and_seal_what_they_send(tmp_path):
    _, procs = start_nodes(tmp_path, "--max-updates", "10", env={0: {auth.ENV: "s3cret"}, 1: {auth.ENV: "s3cret"}})
    for code, out, err in finish(procs):
        assert code == 0, err
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["updates"] == 10 and [n.get("missing") for n in summary["nodes"]] == [None, None]
    assert summary["nodes"][1]["run_dir"].endswith("run1")  # node 1's sealed summary was opened


@pytest.mark.slow
def test_swapped_shard_checkpoints_are_refused_at_the_rendezvous(tmp_path):
    _, procs = start_nodes(tmp_path, "--mode", "async", "--max-updates", "6")
    for code, _, err in finish(procs):
        assert code == 0, err
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", "--resume", str(tmp_path / f"run{1 - r}"),
                               "--node-rank", str(r), "--master-port", str(port), "--max-updates", "12"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = finish(procs, timeout=120)
    assert [code for code, _, _ in results] == [2, 2], results
    assert "node 0's checkpoint holds shard 1 of 2 nodes" in results[0][2] + results[1][2]
    assert all(len(err.strip().splitlines()) == 1 for _, _, err in results), results


@pytest.mark.slow
def test_a_node_slow_to_update_and_to_decode_is_waited_for_not_lost(tmp_path):
    """Node 1's server stops 12 s after update 3 (a slow disk) and its launcher 12 s before the
    test: node 0 waits in the all-reduce and for the summary far past --timeout (8 s), says node
    1 is slow, and never calls it lost; both finish and both are in the summary."""
    timeout = 8
    args = ("--max-updates", "8", "--timeout", timeout, "--compute-delay", "0.02")
    _, procs = start_nodes(tmp_path, *args, env={1: {"PYASGD_TEST_SERVER_PAUSE": "3:12", "PYASGD_TEST_SLOW_TEST": "12"}})
    kids = children(procs[0].pid) + children(procs[1].pid)
    (code0, _, err0), (code1, _, err1) = finish(procs)
    assert (code0, code1) == (0, 0), err0 + err1
    assert "node 1 is slow, not lost: this node has waited" in err0 and "alive" in err0, err0
    log0 = (tmp_path / "run0" / "train.log").read_text()  # info lines (stderr is --quiet)
    assert "waiting for the summary of node(s) 1 (alive, testing)" in log0, log0
    assert "lost" not in err0.replace("not lost", "") and "stopped responding" not in err0, err0
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["stopped_because"] == "max_updates" and summary["updates"] == 8
    assert [n.get("missing") for n in summary["nodes"]] == [None, None]
    assert summary["slow_nodes"]["1"]["waits"] >= 1 and summary["slow_nodes"]["1"]["longest_s"] > timeout
    assert_all_gone(kids)
    assert not segments_of([p.pid for p in procs])


@pytest.mark.slow
def test_a_node_3x_slow_finishes_with_both_nodes_in_the_summary(tmp_path):
    """Sync across 2 nodes, node 1's workers 3x slow: the pair runs at node 1's pace, and the
    run ends with no node called lost and both nodes in node 0's summary."""
    args = ("--max-updates", "15", "--timeout", "10", "--compute-delay", "0.1")
    _, procs = start_nodes(tmp_path, *args, per_node={1: ("--worker-slowdown", "0:3,1:3")})
    (code0, _, err0), (code1, _, err1) = finish(procs)
    assert (code0, code1) == (0, 0), err0 + err1
    assert "stopped responding" not in err0 + err1 and "was lost" not in err0 + err1
    summary = read_json(tmp_path / "run0" / "summary.json")
    assert summary["updates"] == 15 and [n.get("missing") for n in summary["nodes"]] == [None, None]
    node = {n["node_rank"]: n for n in summary["nodes"]}
    assert node[0]["wall_s"] > 15 * 0.1 * 1.5  # paced by node 1 (each round waits for its 3x slower gradients)


@pytest.mark.slow
def test_a_hung_node_is_lost_by_its_silence_and_the_other_leaves_its_collective(tmp_path, request):
    """Node 1 stopped whole (SIGSTOP: sockets open, no heartbeat): node 0's server waits in the
    all-reduce until its launcher names node 1 lost, then leaves the collective it waits in
    (abandon: exit without waiting on gloo), saves, and the run ends within --timeout."""
    import signal

    timeout = 10
    args = ("--max-updates", "100000", "--max-time", "0", "--timeout", timeout, "--compute-delay", "0.01")
    port = free_port()
    procs = [subprocess.Popen(node_args(tmp_path, r, port, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for r in (0, 1)]
    try:
        wait_training(tmp_path, procs)
        kids0 = children(procs[0].pid)
        semaphores = helpers.semaphores_of(procs[1].pid)  # its resource tracker dies with it: nobody unlinks them
        request.addfinalizer(lambda: helpers.remove_files(semaphores))
        os.killpg(procs[1].pid, signal.SIGSTOP)
        t = time.monotonic()
        (code0, _, err0), = finish(procs[:1], timeout=timeout + 60)
        assert time.monotonic() - t < timeout + 15
        assert code0 == 1 and "node 1 stopped responding (no heartbeat for 5 s)" in err0, err0
        from pyasgd.core import checkpoint
        assert checkpoint.load(str(tmp_path / "run0" / "checkpoint.pt"))["server"]["step"] > 0
        assert_all_gone(kids0)
        assert not segments_of([procs[0].pid])
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate(timeout=60)
        from pyasgd.core.region import SharedRegion
        SharedRegion.create(1, 1).close()  # node 1's segment: the sweep removes it
