"""Process bodies for the multi-process exchange tests (importable by spawned children)."""
import time

import torch


def writer(name, worker, pushes, n, slots_timeout=30.0):
    """Pushes integer-valued gradients: element j of push i is (worker+1)*1000 + i%1000 + j."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    base = torch.arange(n, dtype=torch.float32)
    seqs = []
    for i in range(pushes):
        g = base + float((worker + 1) * 1000 + i % 1000)
        seqs.append(region.push(g, version=i, tokens=1, worker=worker, timeout=slots_timeout))
    region.close()
    return seqs


def expected_total(workers, pushes, n):
    base = torch.arange(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for w in range(workers):
        for i in range(pushes):
            total += base + float((w + 1) * 1000 + i % 1000)
    return total


def seeded_grad(worker, i, n):
    """Push i of `worker`: normal values at a scale that varies by push (most not bf16 values)."""
    g = torch.Generator().manual_seed(worker * 100_003 + i)
    return torch.randn(n, generator=g) * 10.0 ** (i % 5 - 2)


def seeded_writer(name, worker, pushes, n):
    """Pushes seeded_grad(worker, i, n) for i < pushes, with i as the position."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    for i in range(pushes):
        region.push(seeded_grad(worker, i, n), version=0, tokens=1, worker=worker, position=i, timeout=60)
    region.close()


def push_tensors(name, grads):
    """Pushes the given gradients, in order (worker i for the i-th)."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    for i, g in enumerate(grads):
        region.push(g, version=0, worker=i, timeout=60)
    region.close()


def reader(name, until_version, q, started):
    """Pulls continuously; reports (pulls, distinct versions, problems) where a problem is a torn
    or backward pull."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    dst = torch.empty(region.n)
    started.wait()
    seen = set()
    last, pulls, problems = -1, 0, []
    while last < until_version:
        v = region.pull(dst)
        pulls += 1
        lo, hi = dst.min().item(), dst.max().item()
        if lo != hi or lo != float(v):
            problems.append(f"torn: version {v}, values {lo}..{hi}")
        if v < last:
            problems.append(f"version went back {last} -> {v}")
        last = v
        seen.add(v)
    region.close()
    q.put((pulls, len(seen), problems[:5]))


def hold_slot_then_sleep(name, ready):
    """Claims a slot and never commits it (the test kills this process with SIGKILL)."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    region._handle().claim(99, 5.0)
    ready.set()
    time.sleep(600)


def timed_pusher(name, count, gap_s):
    """Pushes `count` gradients `gap_s` apart, each stamped (in `loss`) with its monotonic push
    time in ns, so the server can measure wake-up latency across processes."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    g = torch.zeros(region.n)
    for _ in range(count):
        time.sleep(gap_s)
        region.push(g, version=0, loss=float(time.monotonic_ns()))
    region.close()


def bulk_pusher(name, count, worker, barrier):
    """Attaches, waits at the barrier with the others (and the server), then pushes `count`."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    g = torch.ones(region.n)
    barrier.wait()
    for _ in range(count):
        region.push(g, version=0, worker=worker, tokens=1)
    region.close()


# --- region hardening (tests/test_region_hardening.py) --------------------------------------------

def _delay(spec):
    """Arms the region's test-only delay hook (read once, at the first protocol step that checks
    it) in this process: `point:ms`, one of claim, reclaim, read."""
    import os

    if spec:
        os.environ["PYASGD_TEST_REGION_DELAY"] = spec


def claimer(name, attached, go, claimed, worker):
    """Attaches, waits for `go`, claims a slot and holds it uncommitted until killed."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    attached.set()
    go.wait()
    region._handle().claim(worker, 30.0)
    claimed.set()
    time.sleep(600)


def slow_reclaimer(name, started, q, delay_ms):
    """reclaim_dead() with a pause between seeing a dead owner and its compare-and-swap."""
    from pyasgd.core.region import SharedRegion

    _delay(f"reclaim:{delay_ms}")
    region = SharedRegion.attach(name)
    started.set()
    q.put(region.reclaim_dead())
    region.close()


def delayed_pusher(name, attached, go, worker, delay_ms):
    """Pushes one gradient of `worker`'s value with a pause right after the claim's CAS."""
    from pyasgd.core.region import SharedRegion

    _delay(f"claim:{delay_ms}")
    region = SharedRegion.attach(name)
    attached.set()
    go.wait()
    region.push(torch.full((region.n,), float(worker)), version=0, worker=worker, timeout=60)
    region.close()


def commit_twice(name, committed, collected, q):
    """Pushes by claim + commit, then (once the server holds the slot) commits and abandons the
    same slot again; reports what each of those did."""
    from pyasgd.core.region import SharedRegion

    region = SharedRegion.attach(name)
    h = region._handle()
    k = h.claim(3, 30.0)
    region.slot_buffers[k].fill_(1.0)
    h.commit(k, 0, 1, 0.0, 1.0)
    committed.set()
    collected.wait(120)
    out = {}
    for what, call in (("commit", lambda: h.commit(k, 0, 1, 0.0, 1.0)), ("abandon", lambda: h.abandon(k))):
        try:
            call()
            out[what] = "no error"
        except Exception as e:  # reported, not raised: the test asserts on the text
            out[what] = f"{type(e).__name__}: {e}"
    q.put(out)
    region.close()


def delayed_reader(name, ready, q, delay_ms):
    """One pull with a pause between reading the published word and the buffer's sequence;
    reports (version, min, max) of what it copied."""
    from pyasgd.core.region import SharedRegion

    _delay(f"read:{delay_ms}")
    region = SharedRegion.attach(name)
    dst = torch.empty(region.n)
    ready.set()
    version = region.pull(dst)
    q.put((version, dst.min().item(), dst.max().item()))
    region.close()


def attach_and_sleep(name, attached):
    from pyasgd.core.region import SharedRegion

    SharedRegion.attach(name)
    attached.set()
    time.sleep(600)


# The header's fixed fields: (byte offset, struct format), pinned by static_asserts in
# csrc/region.cpp.
HEADER_FIELDS = {
    "magic": (0, "<Q"), "layout_version": (8, "<I"), "owner_pid": (12, "<i"), "n": (16, "<Q"),
    "slots": (24, "<Q"), "param_offset[0]": (32, "<Q"), "param_offset[1]": (40, "<Q"),
    "slot_meta_offset": (48, "<Q"), "slot_data_offset": (56, "<Q"), "slot_stride": (64, "<Q"),
    "total_bytes": (72, "<Q"), "grad_dtype": (80, "<I"),
}
REGION_MAGIC = 0x3130445347534150


def poke_header(path, field, value):
    import struct

    offset, fmt = HEADER_FIELDS[field]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_header(path, field):
    import struct

    offset, fmt = HEADER_FIELDS[field]
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def write_fake_segment(path, owner_pid, layout_version=4):
    """A file that looks like a region whose owner is `owner_pid` (nobody holds its lock)."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack("<QIi", REGION_MAGIC, layout_version, owner_pid).ljust(8192, b"\0"))


def pid_reuse_in_a_namespace(name, mode, outside_pid=0):
    """Run as pid 1 of a fresh PID namespace (unshare --pid --fork --mount-proc, as root), where
    /proc/sys/kernel/ns_last_pid picks the next pid. Prints one JSON line.

    mode "reuse": a pusher claims a slot and is SIGKILLed; a new process is then given its very
    pid, so the dead pusher's pid is alive again; reclaim_dead() must still free the slot.
    mode "foreign": a pusher is given pid `outside_pid` (a pid that is free outside the
    namespace), claims a slot and holds it; it says "claimed", and commits when told on stdin.
    Seen from outside, its slot carries a pid that does not exist there."""
    import json
    import os
    import signal
    import sys

    from pyasgd.core.region import SharedRegion

    def fork_with_pid(pid, body):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        child = os.fork()
        if child == 0:
            try:
                body()
            finally:
                os._exit(0)
        return child

    def claim_and_hold(w):
        region = SharedRegion.attach(name)
        region._handle().claim(41, 30.0)
        os.write(w, b"x")
        if mode == "foreign":
            sys.stdin.readline()
            region._handle().commit(0, 0, 1, 0.0, 0.0, 0)
            os.write(w, b"c")
        time.sleep(600)

    r, w = os.pipe()
    if mode == "reuse":
        victim = fork_with_pid(300, lambda: claim_and_hold(w))
        os.read(r, 1)
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        again = fork_with_pid(victim, lambda: time.sleep(600))
        alive = True
        try:
            os.kill(again, 0)
        except ProcessLookupError:
            alive = False
        region = SharedRegion.attach(name)
        reclaimed = region.reclaim_dead()
        os.kill(again, signal.SIGKILL)
        print(json.dumps({"victim": victim, "again": again, "alive": alive, "reclaimed": reclaimed}), flush=True)
        return
    pusher = fork_with_pid(outside_pid, lambda: claim_and_hold(w))
    os.read(r, 1)
    print(json.dumps({"claimed": pusher}), flush=True)
    committed = os.read(r, 1) == b"c"
    os.kill(pusher, signal.SIGKILL)
    print(json.dumps({"committed": committed}), flush=True)
