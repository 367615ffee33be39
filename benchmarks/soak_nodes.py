"""The two-node soak (`python benchmarks/soak.py --nodes 2`): pairs of launchers on 127.0.0.1,
sync and async (the sharded server) in turn, each run hit by one seeded fault, then checked for
what must hold across nodes:

- the exit codes are the specified ones and the survivor names the node that ended the run;
- a slow node (3x, --worker-slowdown) is never called lost, and both nodes are in the summary;
- a wrong join token is refused in under 10 s, and the right node then joins;
- conservation: with the sharded server every piece any node sent was received by its owner
  exactly once and applied, dropped, skipped or held (the shard counts, from the summaries or the
  checkpoints); in sync both nodes saved the same update;
- every checkpoint loads, and the pair resumes from them (sync: to identical parameters);
- nothing is left: no process, no /dev/shm/pyasgd-* segment once the resume's sweep ran. (A node
  SIGKILLed whole loses its resource tracker with it, so its named semaphores stay: they are
  counted apart and removed here.)
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from soak import children, comm, outlived, shm_names

TOKEN_ENV = "PYASGD_RDZV_TOKEN"
# fault -> (exit codes of the node hit, exit codes of the other); None: any
FAULTS = {
    "worker_kill": ({0}, {0}),
    "launcher_kill": ({-9}, {1}),
    "node_kill": ({-9}, {1}),
    "node_term": ({143}, {0}),
    "slow": ({0}, {0}),
    "wrong_token": ({0}, {0}),   # the wrong node exits 2 (checked apart); the pair then trains
}


@dataclass
class PairOutcome:
    fault: str
    mode: str
    node: int
    rcs: list = field(default_factory=list)
    ok: bool = False
    leaks: list[str] = field(default_factory=list)
    semaphores: int = 0
    conserved: bool | None = None
    resumed: bool | None = None
    called_lost: bool = False
    refused_s: float | None = None
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(out: str, rank: int, port: int, mode: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pyasgd.trainer.cli", "--task", "synthetic", "--mode", mode, "--workers", "2",
            "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--threads", "1", "--quiet", "--no-valid-process", "--valid-every", "0", "--lr", "1e-2", "--warmup", "2",
            "--compute-delay", "0.005", "--max-time", "0", "--timeout", "20", "--save-every", "20",
            "--out", os.path.join(out, f"node{rank}"), *extra]


def start(cmd: list[str], token: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=dict(os.environ, **{TOKEN_ENV: token}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def training(out: str, procs: list[subprocess.Popen], limit: float = 120) -> bool:
    deadline = time.time() + limit
    paths = [os.path.join(out, f"node{r}", "metrics.jsonl") for r in (0, 1)]
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if all(os.path.exists(p) and '"update"' in _read(p) for p in paths):
            return True
        time.sleep(0.1)
    return False


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def semaphores_of(pid: int) -> set[str]:
    """The named semaphores (sem.*) a process has mapped."""
    found = set()
    for p in {pid} | children(pid):
        try:
            with open(f"/proc/{p}/maps") as f:
                found |= {line[line.index("/dev/shm/sem.") + len("/dev/shm/"):].split()[0]
                          for line in f if "/dev/shm/sem." in line}
        except OSError:
            pass
    return found


def conserved(out: str, mode: str, summary: dict | None, whole: bool) -> bool | None:
    """Sharded: every piece sent was received once by its owner and accounted for; sync: both
    nodes saved the same update. None where it cannot be told (a node killed whole lost its
    pieces in flight with it)."""
    if not whole:
        return None
    states = [torch.load(os.path.join(out, f"node{r}", "checkpoint.pt"), map_location="cpu", weights_only=True)
              for r in (0, 1)]
    if mode == "sync":
        return states[0]["server"]["step"] == states[1]["server"]["step"]
    shards = [n["shard"] for n in summary["nodes"]] if summary and all(n.get("shard") for n in summary["nodes"]) \
        else [s["shard_stats"] for s in states]
    sent, ids = sum(s["dispatched"] for s in shards), sum(s["dispatched_ids"] for s in shards)
    return sent > 0 and all((s["received"], s["received_ids"]) == (sent, ids) and s["applied_gradients"] + s["dropped"]
                            + s["skipped_gradients"] + s["held_at_stop"] == s["received"] for s in shards)


def resume(out: str, mode: str, token: str) -> tuple[bool, str]:
    steps = [int(torch.load(os.path.join(out, f"node{r}", "checkpoint.pt"), map_location="cpu",
                            weights_only=True)["server"]["step"]) for r in (0, 1)]
    port = free_port()
    procs = [start([sys.executable, "-m", "pyasgd.trainer.cli", "--resume", os.path.join(out, f"node{r}"),
                    "--master-port", str(port), "--max-updates", str(max(steps) + 10), "--quiet"], token)
             for r in (0, 1)]
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=240)[1])
        except subprocess.TimeoutExpired:
            p.kill()
            errs.append("resume hung")
    if any(p.returncode != 0 for p in procs):
        return False, " | ".join(e.strip().splitlines()[-1][:160] for e in errs if e.strip())
    if mode == "sync":
        after = [torch.load(os.path.join(out, f"node{r}", "checkpoint.pt"), map_location="cpu",
                            weights_only=True)["server"]["params"] for r in (0, 1)]
        if not torch.equal(after[0], after[1]):
            return False, "the resumed nodes' parameters differ"
    return True, ""


def one_pair(i: int, fault: str, mode: str, rng: random.Random, work: str) -> PairOutcome:
    out = os.path.join(work, f"pair{i:03d}-{fault}-{mode}")
    os.makedirs(out)
    hit = rng.randrange(2)
    o = PairOutcome(fault, mode, hit)
    token = f"token-{rng.getrandbits(64):x}"
    updates = "100" if fault == "slow" else "100000" if fault in ("launcher_kill", "node_kill", "node_term") else "300"
    extra = {r: ["--max-updates", updates] for r in (0, 1)}
    if fault == "slow":
        extra[hit] += ["--worker-slowdown", "0:3,1:3"]
    port = free_port()
    before = shm_names()
    seen: set[int] = set()
    procs: list[subprocess.Popen] = []
    try:
        if fault == "wrong_token":  # an impostor as node 1 first: refused, then the real node 1 joins
            procs.append(start(node_command(out, 0, port, mode, extra[0]), token))
            t = time.monotonic()
            wrong = start(node_command(out, 1, port, mode, extra[1]), token + "-wrong")
            _, err = wrong.communicate(timeout=60)
            o.refused_s = round(time.monotonic() - t, 1)
            if wrong.returncode != 2 or "refused this node" not in err or o.refused_s >= 10:
                o.note = f"wrong token: rc {wrong.returncode} after {o.refused_s} s: {err.strip()[-160:]}"
            procs.append(start(node_command(out, 1, port, mode, extra[1]), token))
        else:
            procs = [start(node_command(out, r, port, mode, extra[r]), token) for r in (0, 1)]
        if not training(out, procs):
            raise RuntimeError("the pair never trained")
        time.sleep(rng.uniform(0.3, 2.5))  # a random moment of the run
        for p in procs:
            seen |= children(p.pid)
        roles = {(comm(k), r): k for r, p in enumerate(procs) for k in children(p.pid)}
        victim = procs[hit]
        if fault == "worker_kill":
            os.kill(roles[(f"pyasgd-worker-{rng.randrange(2)}", hit)], signal.SIGKILL)
        elif fault == "launcher_kill":
            victim.kill()
        elif fault == "node_kill":
            sems = semaphores_of(victim.pid)
            o.semaphores = len(sems)
            os.killpg(victim.pid, signal.SIGKILL)
        elif fault == "node_term":
            victim.send_signal(signal.SIGTERM)
        errs = []
        for p in procs:
            try:
                errs.append(p.communicate(timeout=300)[1])
            except subprocess.TimeoutExpired:
                p.kill()
                errs.append(p.communicate()[1] + " (hung: killed after 300 s)")
            seen |= children(p.pid)
        o.rcs = [p.returncode for p in procs]
        want_hit, want_other = FAULTS[fault]
        o.ok = o.rcs[hit] in want_hit and o.rcs[1 - hit] in want_other and not o.note
        other_err = errs[1 - hit]
        if fault in ("launcher_kill", "node_kill") and f"node {hit}" not in other_err:
            o.ok, o.note = False, "the survivor did not name the node: " + other_err.strip()[-160:]
        text = " ".join(errs)
        o.called_lost = "stopped responding" in text or "was lost" in text
        if fault in ("slow", "worker_kill", "wrong_token", "node_term") and o.called_lost:
            o.ok, o.note = False, "a node was called lost: " + text.strip()[-160:]
        summary = None
        path = os.path.join(out, "node0", "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
        if fault in ("slow", "worker_kill", "wrong_token"):
            if summary is None or any(n.get("missing") for n in summary["nodes"]):
                o.ok, o.note = False, "a node is missing from the summary"
            elif fault == "worker_kill" and summary.get("worker_restarts") != 1:
                o.ok, o.note = False, f"worker_restarts = {summary.get('worker_restarts')}"
        if not o.ok and not o.note:
            o.note = f"rcs {o.rcs}: " + " | ".join(e.strip().splitlines()[-1][:160] for e in errs if e.strip())
        o.conserved = conserved(out, mode, summary, whole=fault != "node_kill")
        if o.conserved is False:
            o.ok = False
        if fault in ("launcher_kill", "node_kill", "node_term"):
            o.resumed, why = resume(out, mode, token)
            if not o.resumed:
                o.note = (o.note + "; resume failed: " + why).strip("; ")
        if fault == "node_kill":
            for name in sems:
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except FileNotFoundError:
                    pass
    except Exception as e:  # noqa: BLE001 - the soak reports every failure as a finding
        o.ok, o.note = False, f"{type(e).__name__}: {e}"
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    finally:
        o.leaks += outlived(seen)
        time.sleep(0.2)
        o.leaks += [f"/dev/shm/{n}" for n in sorted(shm_names() - before)]
    return o


def main(runs: int, seed: int, work: str, faults: list[str]) -> int:
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        print(f"--faults: unknown {', '.join(unknown)} for --nodes 2; choose from {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    rng = random.Random(seed)
    outcomes = []
    for i in range(runs):
        fault = faults[i % len(faults)] if i < len(faults) else rng.choice(faults)
        mode = ("sync", "async")[(i // len(faults)) % 2] if i < 2 * len(faults) else rng.choice(("sync", "async"))
        t = time.time()
        o = one_pair(i, fault, mode, rng, work)
        outcomes.append(o)
        print(f"pair {i:3d} {fault:13s} {mode:5s} node {o.node} rc={o.rcs} {'ok' if o.ok else 'NOT AS SPECIFIED'}"
              f"{' LEAKS ' + str(o.leaks) if o.leaks else ''}{' not-conserved' if o.conserved is False else ''}"
              f"{' resume-failed' if o.resumed is False else ''}{' called-lost' if o.called_lost else ''}"
              f"{f' refused in {o.refused_s} s' if o.refused_s is not None else ''} ({time.time() - t:.0f} s) {o.note}",
              flush=True)
    table = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])
    for o in outcomes:
        row = table[o.fault]
        row[0] += 1
        row[1] += o.ok
        row[2] += len(o.leaks)
        row[3] += o.conserved is True
        row[4] += o.conserved is False
        row[5] += o.resumed is True
        row[6] += o.resumed is False
    print("\n| fault (2 nodes) | runs | as specified | leaks (processes, segments) | conserved | not conserved "
          "| resumed | failed resumes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fault in FAULTS:
        if fault in table:
            print(f"| {fault} | " + " | ".join(map(str, table[fault])) + " |")
    slow = [o for o in outcomes if o.fault in ("slow", "worker_kill", "wrong_token", "node_term")]
    refused = [o.refused_s for o in outcomes if o.refused_s is not None]
    print(f"\nslow or healthy nodes called lost: {sum(o.called_lost for o in slow)} of {len(slow)} runs; "
          f"wrong tokens refused in {max(refused) if refused else '-'} s at most; semaphores left by nodes "
          f"SIGKILLed whole (removed here): {sum(o.semaphores for o in outcomes)}")
    bad = sum(not o.ok or bool(o.leaks) or o.conserved is False or o.resumed is False for o in outcomes)
    print(f"\n{len(outcomes)} pairs, {bad} findings; work directory {work}")
    return 1 if bad else 0
