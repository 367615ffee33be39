"""Fault-injection soak: real training runs, each hit at a random moment by one random fault, then
checked for what must always hold: the run continued or stopped as specified (exit code), every
checkpoint on disk loads, a resumed run continues, and nothing is left behind (no process, no
/dev/shm/pyasgd-* segment, no sem.* semaphore). Then a ring check: 4 pushers, one repeatedly
SIGKILLed mid-copy, and every committed gradient is summed exactly once.

    python benchmarks/soak.py                      # 30 runs, all faults, prints a table
    python benchmarks/soak.py --runs 6 --faults fifo,worker_raise --seed 3
    python benchmarks/soak.py --nodes 2 --runs 24  # two launchers on 127.0.0.1 (benchmarks/soak_nodes.py)

A short version runs in the tests (tests/test_soak.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

SHM = "/dev/shm"
# fault -> the exit codes that are the specified outcome
FAULTS = {
    "worker_kill": {0},        # replaced, the run finishes
    "worker_raise": {0},       # reported, replaced, the run finishes
    "server_kill": {1},        # stops at once, names checkpoint and --resume
    "launcher_kill": {-9},     # the launcher is gone; its children must follow
    "launcher_int": {130},
    "launcher_term": {143},
    "corrupt_header": {0, 1},  # attached processes keep their own layout; a new attach is refused
    "fifo": {0},               # a FIFO named pyasgd-* does not hang create()
    "foreign_file": {0},       # nor does a file that is not a region; both are left alone
}


@dataclass
class Outcome:
    fault: str
    task: str
    rc: int | None
    ok: bool
    leaks: list[str] = field(default_factory=list)
    bad_checkpoints: list[str] = field(default_factory=list)
    resumed: bool | None = None
    note: str = ""


def children(pid: int) -> set[int]:
    """Every live descendant of pid."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out.update(kids)
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def outlived(seen: set[int]) -> list[str]:
    """The processes of `seen` still alive after 30 s (children of a killed launcher need a moment
    to follow it), named and then SIGKILLed: each one is a leak."""
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(k) for k in seen):
        time.sleep(0.1)
    left = [f"process {k} ({comm(k)})" for k in seen if alive(k)]
    for k in seen:
        if alive(k):
            os.kill(k, signal.SIGKILL)
    return left


def shm_names() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(("pyasgd-", "sem."))}


def base_command(task: str, out: str, corpus: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "pyasgd.trainer.cli", "--mode", "async", "--workers", "2", "--max-time", "0",
           "--quiet", "--out", out, "--save-every", "25", "--timeout", "60"]
    if task == "synthetic":
        return cmd + ["--task", "synthetic", "--compute-delay", "0.005", "--max-updates", "600", "--lr", "2e-3",
                      "--warmup", "50"]
    return cmd + [x for k, v in corpus.items() for x in (f"--{k.replace('_', '-')}", v)] + [
        "--vocab-size", "400", "--max-len", "60", "--batch-tokens", "1200", "--max-updates", "150",
        "--valid-every", "0"]


def wait_training(out: str, p: subprocess.Popen, limit: float = 180) -> bool:
    deadline = time.time() + limit
    path = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                if '"update"' in f.read():
                    return True
        time.sleep(0.1)
    return False


def corrupt_header(launcher_pid: int) -> bool:
    """Overwrite the layout fields of the run's segment header (not its atomics)."""
    for name in os.listdir(SHM):
        if name.startswith(f"pyasgd-{launcher_pid}-"):
            with open(os.path.join(SHM, name), "r+b") as f:
                f.seek(8)
                f.write(b"\xff" * 56)  # layout version, owner, n, slots, offsets: garbage
            return True
    return False


def one_run(i: int, fault: str, task: str, rng: random.Random, work: str, corpus: dict[str, str]) -> Outcome:
    out = os.path.join(work, f"run{i:03d}-{fault}-{task}")
    env = dict(os.environ, PYASGD_CACHE=os.path.join(work, "cache"))
    planted = None
    if fault == "fifo":
        planted = os.path.join(SHM, f"pyasgd-soak-fifo-{os.getpid()}-{i}")
        os.mkfifo(planted, 0o600)
    elif fault == "foreign_file":
        planted = os.path.join(SHM, f"pyasgd-soak-foreign-{os.getpid()}-{i}")
        with open(planted, "wb") as f:
            f.write(b"not a region" * 100)
    if fault == "worker_raise":
        env["PYASGD_TEST_FAULT"] = f"raise:{rng.randrange(2)}:{rng.randint(3, 30)}:once:{out}.fault-marker"
    before = shm_names()
    p = subprocess.Popen(base_command(task, out, corpus), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    seen: set[int] = set()
    o = Outcome(fault, task, None, False)
    try:
        if not wait_training(out, p):
            p.kill()
            _, err = p.communicate(timeout=60)
            o.rc = p.returncode
            o.note = "never started: " + err[-300:]
            return o
        time.sleep(rng.uniform(0.2, 2.0))  # a random moment of the run
        seen |= children(p.pid)
        roles = {comm(k): k for k in seen}
        if fault == "worker_kill":
            os.kill(roles[f"pyasgd-worker-{rng.randrange(2)}"], signal.SIGKILL)
        elif fault == "server_kill":
            os.kill(roles["pyasgd-server"], signal.SIGKILL)
        elif fault == "launcher_kill":
            p.kill()
        elif fault == "launcher_int":
            p.send_signal(signal.SIGINT)
        elif fault == "launcher_term":
            p.send_signal(signal.SIGTERM)
        elif fault == "corrupt_header":
            corrupt_header(p.pid)
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            seen |= children(p.pid)
            time.sleep(0.1)
        if p.poll() is None:
            p.kill()
            o.note = "hung: killed after 300 s"
        _, err = p.communicate(timeout=60)
        o.rc = p.returncode
        o.ok = o.rc in FAULTS[fault] and not o.note
        if fault == "server_kill" and "--resume" not in err:
            o.ok, o.note = False, "no --resume in the message"
        if fault in ("worker_kill", "worker_raise") and o.rc == 0:
            with open(os.path.join(out, "summary.json")) as f:
                restarts = json.load(f)["worker_restarts"]
            if restarts != 1:
                o.ok, o.note = False, f"worker_restarts = {restarts}"
        if not o.ok and not o.note:
            o.note = err.strip().splitlines()[-1][:200] if err.strip() else ""
    finally:
        o.leaks += outlived(seen)
        if planted is not None:
            if not os.path.exists(planted):
                o.leaks.append(f"the planted {os.path.basename(planted)} was removed")
            else:
                kind = os.lstat(planted).st_mode
                if fault == "fifo" and not stat.S_ISFIFO(kind):
                    o.leaks.append("the planted FIFO was replaced")
                os.unlink(planted)
        time.sleep(0.2)
        o.leaks += [f"/dev/shm/{n}" for n in sorted(shm_names() - before)]
    for name in ("checkpoint.pt", "best.pt"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                o.bad_checkpoints.append(f"{name}: {e}")
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt) and os.path.exists(os.path.join(out, "config.json")):
        step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["server"]["step"])
        env.pop("PYASGD_TEST_FAULT", None)
        r = subprocess.run([sys.executable, "-m", "pyasgd.trainer.cli", "--resume", out, "--max-updates", str(step + 10),
                            "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        o.resumed = r.returncode == 0
        if not o.resumed:
            o.note = (o.note + "; resume failed: " + r.stderr.strip()[-200:]).strip("; ")
    return o


# --- the ring: every committed gradient summed exactly once under concurrent reclaim ------------

def _pusher(name: str, worker: int, pushes: int, n: int, pace: float) -> None:
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    for seq in range(pushes):
        region.push(torch.full((n,), float(worker * 1_000_000 + seq)), version=0, tokens=seq, worker=worker,
                    timeout=60)
        if pace:
            time.sleep(pace)
    region.close()


def ring_check(rounds: int = 40, n: int = 1_000_003, pushes: int = 300, seed: int = 0) -> dict:
    """3 steady pushers and 1 victim restarted and SIGKILLed at random moments (mostly mid-copy of
    a 4 MB gradient). Each gradient is filled with one value naming (worker, seq) and tagged with
    seq: a collected slot whose content is not that value would be two gradients in one buffer."""
    import multiprocessing as mp

    from pyasgd.core.region import RegionTimeoutError, SharedRegion

    ctx = mp.get_context("spawn")
    rng = random.Random(seed)
    seen: Counter = Counter()
    problems: list[str] = []
    kills = 0
    with SharedRegion.create(n, 6) as region:
        steady = [ctx.Process(target=_pusher, args=(region.name, w, pushes, n, 0.002)) for w in range(3)]
        for p in steady:
            p.start()
        victim, victim_round, kill_at = None, 0, None
        done_steady = False

        def take(timeout: float) -> bool:
            try:
                batch = region.collect(1, timeout=timeout)
            except RegionTimeoutError:
                return False
            for w, seq, g in zip(batch.workers, batch.tokens, batch.grads):
                want = float(w * 1_000_000 + seq)
                if not bool((g == want).all()):
                    problems.append(f"slot of worker {w} seq {seq} holds other data")
                seen[(w, seq)] += 1
            region.release(batch)
            return True

        while not done_steady or victim_round < rounds:
            if victim is None and victim_round < rounds:
                victim = ctx.Process(target=_pusher, args=(region.name, 3 + victim_round, 10_000, n, 0.0))
                victim.start()
                kill_at = None
            take(0.5)
            if victim is not None:
                if kill_at is None and seen[(3 + victim_round, 0)]:  # it is pushing: kill it soon, at random
                    kill_at = time.time() + rng.uniform(0.0, 0.05)
                if kill_at is not None and time.time() >= kill_at:
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.join(10)
                    victim, victim_round, kills = None, victim_round + 1, kills + 1
            done_steady = all(not p.is_alive() for p in steady) and all(seen[(w, pushes - 1)] for w in range(3))
        while take(1.0):  # whatever was committed and not yet taken
            pass
        for p in steady:
            p.join(30)
        reclaimed = region.reclaimed
    doubled = [k for k, c in seen.items() if c > 1]
    lost = [(w, s) for w in range(3) for s in range(pushes) if not seen[(w, s)]]
    for w in range(3, 3 + rounds):  # a victim's pushes arrive in order, without gaps
        got = sorted(s for (ww, s) in seen if ww == w)
        if got != list(range(len(got))):
            problems.append(f"victim {w} arrived with gaps: {got[:5]}...")
    return {"kills": kills, "reclaimed": reclaimed, "collected": sum(seen.values()), "doubled": len(doubled),
            "lost": len(lost), "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma list of: " + ", ".join(FAULTS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--translation-every", type=int, default=5, help="every k-th run trains the tiny translation model")
    ap.add_argument("--ring-rounds", type=int, default=40, help="victim kills in the ring check (0: skip it)")
    ap.add_argument("--work", help="directory for the runs (default: a temporary one)")
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                    help="2: the two-node soak (faults: worker_kill, launcher_kill, node_kill, node_term, slow, "
                         "wrong_token)")
    args = ap.parse_args(argv)
    if args.nodes == 2:
        import soak_nodes

        faults = list(soak_nodes.FAULTS) if args.faults == ",".join(FAULTS) else args.faults.split(",")
        work = args.work or tempfile.mkdtemp(prefix="pyasgd-soak-nodes-")
        os.makedirs(work, exist_ok=True)
        return soak_nodes.main(args.runs, args.seed, work, [f for f in faults if f])
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        ap.error(f"--faults: unknown {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="pyasgd-soak-")
    os.makedirs(work, exist_ok=True)
    corpus = {}
    if args.translation_every:
        from pyasgd.data import bible

        pairs = bible.read_tsv_xz(bible.BUNDLED)
        for split, chunk in (("train", pairs["train"][:300]), ("dev", pairs["dev"][:40]), ("test", pairs["test"][:40])):
            for side, k in (("src", 0), ("tgt", 1)):
                path = os.path.join(work, f"{split}.{side}")
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(x[k] + "\n" for x in chunk)
                corpus[f"{split}_{side}"] = path
    outcomes = []
    for i in range(args.runs):
        fault = faults[i % len(faults)] if i < len(faults) else rng.choice(faults)
        task = "translation" if args.translation_every and i % args.translation_every == args.translation_every - 1 else "synthetic"
        t = time.time()
        o = one_run(i, fault, task, rng, work, corpus)
        outcomes.append(o)
        print(f"run {i:3d} {fault:15s} {task:11s} rc={o.rc!s:4s} {'ok' if o.ok else 'NOT AS SPECIFIED'}"
              f"{' LEAKS ' + str(o.leaks) if o.leaks else ''}{' BAD CHECKPOINTS' if o.bad_checkpoints else ''}"
              f"{' resume-failed' if o.resumed is False else ''} ({time.time() - t:.0f} s) {o.note}", flush=True)
    table = defaultdict(lambda: [0, 0, 0, 0, 0])
    for o in outcomes:
        row = table[o.fault]
        row[0] += 1
        row[1] += o.ok
        row[2] += len(o.leaks)
        row[3] += len(o.bad_checkpoints)
        row[4] += o.resumed is False
    print("\n| fault | runs | as specified | leaks | unloadable checkpoints | failed resumes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fault in FAULTS:
        if fault in table:
            r = table[fault]
            print(f"| {fault} | {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    ring = ring_check(args.ring_rounds) if args.ring_rounds else None
    if ring:
        print(f"\nring: {ring['kills']} victim pushers SIGKILLed, {ring['reclaimed']} slots reclaimed, "
              f"{ring['collected']} gradients collected, {ring['doubled']} doubled, {ring['lost']} lost, "
              f"{len(ring['problems'])} torn or out-of-order: {ring['problems'][:3]}")
    bad = sum(not o.ok or o.leaks or o.bad_checkpoints or o.resumed is False for o in outcomes)
    if ring:
        bad += ring["doubled"] + ring["lost"] + len(ring["problems"])
    print(f"\n{len(outcomes)} runs, {bad} findings; work directory {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
