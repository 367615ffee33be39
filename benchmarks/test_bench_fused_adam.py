"""Throughput of the fused "sum G gradients + Adam" update at P = 25M fp32 (issue targets:
CPU kernel >= 0.85 of an in-place bandwidth pass, >= 1.8x torch's sum + Adam(fused) + copy at G=4).
(a) is the general call (check pass + Adam pass); (a') the server's call, where the pushers'
bounds prove the sum finite and the update is a single pass.

Effective bytes per element: 4*G gradients read + 24 for param, m, v read and written + 4 for out.
The three are timed in turn, round after round, and each figure is its fastest round: this VM's
memory bandwidth drifts by tens of percent over minutes, so only interleaved figures compare.
Run: python -m pytest benchmarks/test_bench_fused_adam.py --benchmark-only
"""
import time

import pytest
import torch

from pyasgd.core import ext as _ext
from pyasgd.core.fused import adam_step_reference, fused_adam_step

P = 25_000_000
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def eff_bytes(G: int) -> int:
    return (4 * G + 24 + 4) * P


def validate_kernel(G: int) -> None:
    """Results first: 2 steps of the kernel equal the reference (threaded tile size)."""
    n = 1_000_003
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)]
    b = [t.clone() for t in a]
    gs = [torch.randn(n, generator=gen) for _ in range(G)]
    for s in (1, 2):
        assert fused_adam_step(*a, gs, step=s, backend="cpu", **HYPER)
        assert adam_step_reference(*b, gs, step=s, **HYPER)
    for x, y in zip(a, b):
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-6


@pytest.mark.parametrize("G", [1, 4])
def test_cpu_kernel_vs_torch_and_ceiling(benchmark, report, G):
    validate_kernel(G)
    gen = torch.Generator().manual_seed(G)
    p = torch.randn(P, generator=gen)
    m, v, out = torch.zeros(P), torch.zeros(P), torch.empty(P)
    gs = [torch.randn(P, generator=gen) * 1e-3 for _ in range(G)]
    x = torch.randn(P)
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.Adam([param], fused=True, lr=HYPER["lr"])
    step = [0]

    def ours():
        step[0] += 1
        assert fused_adam_step(p, m, v, gs, step=step[0], out=out, backend="cpu", **HYPER)

    bounds = [g.abs().max().item() for g in gs]  # what the pushers measure while copying

    def ours_one_pass():  # the server's path: the pushers' bounds prove the sum finite
        step[0] += 1
        assert fused_adam_step(p, m, v, gs, step=step[0], out=out, backend="cpu", grad_bounds=bounds, **HYPER)

    def torch_composition():  # what a user would write: sum, fused Adam, copy out
        g = gs[0].clone() if G == 1 else torch.add(gs[0], gs[1])
        for y in gs[2:]:
            g.add_(y)
        param.grad = g
        opt.step()
        out.copy_(param.detach())

    fns = {"ceiling": lambda: x.mul_(1.0000001), "torch": torch_composition, "ours": ours, "one_pass": ours_one_pass}
    best = {k: float("inf") for k in fns}
    for _ in range(8):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    benchmark.pedantic(ours, rounds=3, warmup_rounds=0)

    ceiling = 8 * P / best["ceiling"] / 1e9
    gbs = eff_bytes(G) / best["ours"] / 1e9
    C = _ext.ext()
    report(f"G={G} (c) ceiling: torch in-place x.mul_", f"{ceiling:.1f} GB/s", f"{torch.get_num_threads()} threads")
    report(f"G={G} (b) torch sum + Adam(fused) + copy", f"{best['torch'] * 1e3:.2f} ms",
           f"{eff_bytes(G) / best['torch'] / 1e9:.1f} GB/s eff")
    report(f"G={G} (a) pyasgd CPU kernel", f"{gbs:.1f} GB/s",
           f"{best['ours'] * 1e3:.2f} ms; {C.cpu_simd_level()}, {C.cpu_num_threads()} threads; "
           f"(a)/(c) = {gbs / ceiling:.2f} (target 0.85); {best['torch'] / best['ours']:.2f}x (b)"
           + (" (target 1.8)" if G == 4 else ""))
    one = eff_bytes(G) / best["one_pass"] / 1e9
    report(f"G={G} (a') same, with the pushers' bounds", f"{one:.1f} GB/s",
           f"{best['one_pass'] * 1e3:.2f} ms; one pass; (a')/(c) = {one / ceiling:.2f} (target 0.85); "
           f"{best['torch'] / best['one_pass']:.2f}x (b)")
