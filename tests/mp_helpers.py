"""Process bodies for the multi-process exchange tests (importable by spawned children)."""
import time

import torch


def writer(name, worker, pushes, n, slots_timeout=30.0):
    """Pushes integer-valued gradients: element j of push i is (worker+1)*1000 + i%1000 + j."""
    from pyasgd.exchange import SharedRegion

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


def reader(name, until_version, q, started):
    """Pulls continuously; reports (pulls, distinct versions, problems) where a problem is a torn
    or backward pull."""
    from pyasgd.exchange import SharedRegion

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
    from pyasgd.exchange import SharedRegion

    region = SharedRegion.attach(name)
    region._handle().claim(99, 5.0)
    ready.set()
    time.sleep(600)


def timed_pusher(name, count, gap_s):
    """Pushes `count` gradients `gap_s` apart, each stamped (in `loss`) with its monotonic push
    time in ns, so the server can measure wake-up latency across processes."""
    from pyasgd.exchange import SharedRegion

    region = SharedRegion.attach(name)
    g = torch.zeros(region.n)
    for _ in range(count):
        time.sleep(gap_s)
        region.push(g, version=0, loss=float(time.monotonic_ns()))
    region.close()


def bulk_pusher(name, count, worker, barrier):
    """Attaches, waits at the barrier with the others (and the server), then pushes `count`."""
    from pyasgd.exchange import SharedRegion

    region = SharedRegion.attach(name)
    g = torch.ones(region.n)
    barrier.wait()
    for _ in range(count):
        region.push(g, version=0, worker=worker, tokens=1)
    region.close()
