"""Two nodes on loopback against one: words per second of 2 nodes x 1 worker (two pyasgd-train
launchers on 127.0.0.1) against 1 node x 2 workers (the same total workers, the baseline measured
in the same run), and the bytes each node sends per update, measured, next to the formula:

    sync (all-reduce of the node sums):  ~2 P (M-1)/M x 4 bytes per node per update
    async (the sharded server):          P (M-1)/M x 4 bytes out (and in) per gradient, plus the
                                         owner's new shard, P/M x 4 bytes to each of M-1 nodes
                                         per update of its shard

Run: python -m pytest benchmarks/test_bench_multinode.py --benchmark-only -s
     PYASGD_BENCH_SECONDS=2 for a quick check (default 8 s per run).
On one machine the two "nodes" share its cores and its memory bus, so the ratio shows what the
network path costs, not what a second machine would add.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from pyasgd.config import TrainConfig
from pyasgd.trainer.launch import train

SECONDS = float(os.environ.get("PYASGD_BENCH_SECONDS", "8"))
MODES = {"sync": dict(mode="sync"), "async G=2": dict(mode="async", global_accum=2)}
COMMON = dict(task="synthetic", lr=2e-3, warmup=50, batch_size=256, train_size=65536, max_updates=0,
              valid_every=0, valid_process=False, quiet=True, threads=1)
BASE: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, kw: dict) -> list[dict]:
    """Two launchers of 1 worker each on loopback; returns their summaries (node 0's first)."""
    port = _free_port()
    opts = []
    for k, v in {**COMMON, **kw, "workers": 1, "max_time": SECONDS, "nnodes": 2, "master_port": port}.items():
        flag = "--" + k.replace("_", "-")
        opts += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    procs = [subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", *opts, "--node-rank", str(r),
                               "--out", str(tmp_path / f"node{r}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=SECONDS + 180)
        assert p.returncode == 0, err[-3000:]
    out = []
    for r in (0, 1):
        with open(tmp_path / f"node{r}" / "summary.json") as f:
            out.append(json.load(f))
    return out


def _sent_per_update(node: dict, P: int, M: int = 2) -> tuple[float, str]:
    """Bytes a node sent per update, measured, and the formula's value."""
    if "shard" in node:  # counted by the sharded server's mailbox (64-byte headers and acks included)
        s, updates = node["shard"], max(1, node["updates"])
        pieces = s["dispatched"] * P * (M - 1) / M * 4
        shard = updates * (P / M) * 4 * (M - 1)
        return s["bytes_sent"] / updates, (f"formula {(pieces + shard) / updates:,.0f} B: {s['dispatched']} pieces of "
                                           f"P(M-1)/M x 4 + the new shard to M-1 nodes, per update of its shard")
    io = node["internode"]
    return (io["bytes_written"] or 0) / max(1, io["rounds"]), f"formula 2P(M-1)/M x 4 = {2 * P * (M - 1) / M * 4:,.0f} B"


@pytest.mark.parametrize("mode", list(MODES))
def test_two_nodes_against_one(benchmark, report, tmp_path, mode):
    from pyasgd.core.flat import FlatModel
    from pyasgd.tasks import make_task

    kw = MODES[mode]
    base = train(TrainConfig(**COMMON, **kw, workers=2, max_time=SECONDS, out=str(tmp_path / "one")))
    nodes = benchmark.pedantic(_two_nodes, args=(tmp_path, kw), rounds=1, iterations=1)
    # validate first: both runs trained for the time asked, across nodes as one run
    assert base["updates"] > 10 and base["stopped_because"] == "max_time"
    s0 = nodes[0]
    assert s0["nnodes"] == 2 and s0["updates"] > 10 and s0["final_valid"]["accuracy"] > 0.1
    if mode == "sync":
        assert s0["staleness_hist"] == {"0": 2 * s0["updates"]}
    P = FlatModel(make_task(TrainConfig(**COMMON, **kw, max_time=1)).build_model()).n
    BASE[mode] = base["wps"]
    report(f"multinode {mode} 1 node x 2 workers", f"{base['wps']:,.0f} wps", "baseline")
    report(f"multinode {mode} 2 nodes x 1 worker", f"{s0['wps']:,.0f} wps",
           f"{s0['wps'] / base['wps']:.2f}x one node; staleness {s0['avg_staleness']:.2f}; {s0['updates']} updates")
    for r, node in enumerate(nodes):
        sent, formula = _sent_per_update(node, P)
        report(f"multinode {mode} node {r} sends", f"{sent:,.0f} B/upd", f"measured; {formula}; P = {P}")
