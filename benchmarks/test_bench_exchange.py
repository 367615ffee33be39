"""The shared region's speed (issue targets: push and pull at >= 0.8 of a plain torch copy_ of
the same bytes at P = 25M; a push + collect at P = 1 in a few microseconds; median futex
wake-up latency; 1, 2 and 4 concurrent pushers).
Run: python -m pytest benchmarks/test_bench_exchange.py --benchmark-only
"""
import multiprocessing as mp
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import mp_helpers  # noqa: E402
from pyasgd.core.region import SharedRegion  # noqa: E402

P = 25_000_000
BYTES = 4 * P
CTX = mp.get_context("spawn")


@pytest.fixture(scope="module")
def region():
    with SharedRegion.create(P, 2) as r:
        yield r


def test_push_and_pull_bandwidth(benchmark, report, region):
    g, src, dst = torch.randn(P), torch.randn(P), torch.empty(P)
    # validate first: a push arrives intact, a pull returns the published vector
    region.push(g, version=0)
    batch = region.collect(1)
    assert torch.equal(batch.grads[0], g)
    region.release(batch)
    v = region.publish(src)
    assert region.pull(dst) == v and torch.equal(dst, src)

    def push():
        region.push(g, version=0)

    def release():  # untimed: make room for the next push
        region.release(region.collect(1))

    best = {"copy": float("inf"), "push": float("inf"), "pull": float("inf")}
    for _ in range(15):
        for name, fn in (("copy", lambda: dst.copy_(src)), ("push", push), ("pull", lambda: region.pull(dst))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
            if name == "push":
                release()
    benchmark.pedantic(lambda: region.pull(dst), rounds=3, warmup_rounds=0)
    copy = BYTES / best["copy"] / 1e9
    report("exchange: torch dst.copy_(src), 25M fp32", f"{copy:.1f} GB/s", "baseline, interleaved with push and pull")
    for name in ("push", "pull"):
        gbs = BYTES / best[name] / 1e9
        report(f"exchange: {name} 25M fp32 (CPU tensor)", f"{gbs:.1f} GB/s", f"{gbs / copy:.2f} of copy_ (target 0.8)")


def test_fixed_cost_push_collect_p1(benchmark, report):
    with SharedRegion.create(1, 2) as r:
        g = torch.ones(1)

        def cycle():
            r.push(g, version=0)
            r.release(r.collect(1))

        benchmark.pedantic(cycle, rounds=2000, warmup_rounds=100)
        med = benchmark.stats.stats.median * 1e6
    report("exchange: push + collect + release, P=1", f"{med:.1f} us", "median, one process")


def test_wakeup_latency(benchmark, report):
    """A sleeping server (futex) woken by a push from another process, 5 ms apart."""
    with SharedRegion.create(1, 4) as r:
        pusher = CTX.Process(target=mp_helpers.timed_pusher, args=(r.name, 150, 0.005))
        pusher.start()
        lat = []

        def collect_all():
            for _ in range(150):
                b = r.collect(1, timeout=60)
                lat.append(time.monotonic_ns() - b.losses[0])
                r.release(b)

        benchmark.pedantic(collect_all, rounds=1, warmup_rounds=0)
        pusher.join(30)
    med = statistics.median(lat[10:]) / 1e3
    report("exchange: wake-up latency, push -> collect", f"{med:.1f} us", "median over 140, server asleep in futex")


@pytest.mark.parametrize("pushers", [1, 2, 4])
def test_concurrent_pushers(benchmark, report, pushers):
    n, each = 1_000_000, 400 // pushers
    with SharedRegion.create(n, pushers + 1) as r:
        barrier = CTX.Barrier(pushers + 1)
        # as the trainer does: each process gets its share of the cores for its copy threads
        os.environ["PYASGD_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // pushers))
        procs = [CTX.Process(target=mp_helpers.bulk_pusher, args=(r.name, each, w, barrier)) for w in range(pushers)]
        for p in procs:
            p.start()
        barrier.wait(timeout=120)  # every pusher has imported torch and attached
        got = []

        def drain():
            total = 0
            while total < pushers * each:
                b = r.collect(1, timeout=60)
                got.extend(b.tokens)
                total += 1
                r.release(b)

        benchmark.pedantic(drain, rounds=1, warmup_rounds=0)
        for p in procs:
            p.join(30)
        del os.environ["PYASGD_NUM_THREADS"]
    assert len(got) == pushers * each
    s = benchmark.stats.stats.min
    report(f"exchange: {pushers} concurrent pusher(s), P=1M", f"{pushers * each / s:.0f} push/s",
           f"{pushers * each * 4 * n / s / 1e9:.1f} GB/s aggregate, server G=1")
