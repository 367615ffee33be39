"""What staleness compensation costs the server's update (issue 23), P = 5M, G = 4, fp32 slots.

The baseline, measured in the same run: the CPU server's plain update (`Updater.apply` without
a master copy: read the front buffer, write the back one). Each compensated variant runs the same
update through `Updater.apply` as the server calls it (a master copy where the method needs one),
with staleness [1, 1, 1, 0], the pattern of async + 4x GA. Results first: one update of each
variant equals the formula written out in torch here.

    python -m pytest benchmarks/test_bench_compensation.py --benchmark-only -s
"""
import time

import pytest
import torch

from pyasgd.config import TrainConfig
from pyasgd.trainer.update import Updater

P, G = 5_000_000, 4
STALE = [1, 1, 1, 0]
VARIANTS = {"plain": {}, "dc:1": dict(stale_policy="dc:1"), "dc-adaptive:2": dict(stale_policy="dc-adaptive:2"),
            "predict auto": dict(predict="auto"), "momentum": dict(stale_policy="momentum"), "ema 0.99": dict(ema=0.99)}


def config(**kw):
    return TrainConfig(task="synthetic", mode="async", workers=4, global_accum=4, lr=1e-3, warmup=0, schedule="constant",
                       beta2=0.999, eps=1e-8, **kw)


def make(n, kw):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 1e-3 for _ in range(G)]
    keep = bool(kw.get("predict"))
    bufs = [p.clone(), torch.empty(n)]
    up = Updater(config(**kw), bufs[0], keep_master=keep)
    return up, bufs, grads


def step(up, bufs, grads):
    res = up.apply([g.clone() for g in grads], STALE, out=bufs[1], current=bufs[0] if up.master is None else None)
    if res.publish:
        bufs.reverse()


def validate():
    """Two updates of each variant against the formulas (dc and prediction checked explicitly)."""
    n = 10_007
    up, bufs, grads = make(n, dict(stale_policy="dc:1"))
    w0 = bufs[0].clone()
    step(up, bufs, grads)  # no version before the first: its stale gradients go uncorrected
    w1 = bufs[0].clone()
    ref = Updater(config(), w1.clone())
    ref.exp_avg.copy_(up.exp_avg), ref.exp_avg_sq.copy_(up.exp_avg_sq)
    ref.step = up.step
    corrected = [g + g * g * (w1 - w0) if s else g.clone() for g, s in zip(grads, STALE)]
    step(up, bufs, grads)
    ref.apply(corrected, [0] * G)
    torch.testing.assert_close(bufs[0], ref.master, rtol=1e-6, atol=1e-7)
    up, bufs, grads = make(n, dict(predict="0.75"))
    step(up, bufs, grads)
    before = up.master.clone()
    step(up, bufs, grads)
    torch.testing.assert_close(bufs[0], up.master + 0.75 * (up.master - before), rtol=1e-6, atol=1e-6)


def best_of(fn, rounds=7):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@pytest.mark.benchmark(group="compensation")
def test_compensation_cost(benchmark):
    validate()
    torch.set_num_threads(1)
    states = {name: make(P, kw) for name, kw in VARIANTS.items()}
    for st in states.values():  # two updates first: the kept versions and averages exist
        step(*st), step(*st)
    grads = states["plain"][2]
    # Each timed update first copies its G gradients (dc corrects them in place): timed alone and
    # taken off, so the figures are the update's own.
    copy = best_of(lambda: [g.clone() for g in grads])
    times = {name: best_of(lambda st=st: step(*st)) - copy for name, st in states.items()}
    benchmark.pedantic(lambda: step(*states["plain"]), rounds=3, iterations=1)
    base = times["plain"]
    print(f"\nP = {P:,}, G = {G}, staleness {STALE}, best of 7 (1 torch thread; the fused kernel's threads as built); "
          f"the gradients' copy ({copy * 1e3:.1f} ms) taken off")
    for name, t in times.items():
        print(f"  {name:14s} {t * 1e3:8.1f} ms  {t / base:5.2f}x plain")
    assert all(t > 0 for t in times.values())
