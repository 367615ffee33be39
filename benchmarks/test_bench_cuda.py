"""The CUDA half on a GPU, validated first, then timed against baselines measured in the same run.
Skipped without a GPU. Run: bash benchmarks/gpu_check.sh (on a GPU machine)

(1) The server step at P = 25M and 100M, G = 4, fp32: sum 4 gradients + Adam + copy out.
    pyasgd (with the pushers' bounds: one kernel, no allocation, no host sync) against
    torch.compile of the same step and against torch's sum + Adam(fused=True) + copy.
    Targets: >= 1.0x torch.compile at both sizes, >= 1.6x the eager composition.
(2) Pinned shared memory at P = 25M: push a CUDA gradient into a pinned slot (one kernel copies
    and measures max|g|) and pull the published buffer into a CUDA tensor, against cudaMemcpy
    between pinned host and device memory of the same size. Target: >= 0.8x.
"""
import time

import pytest
import torch

from pyasgd.core import ext as _ext
from pyasgd.core.fused import adam_step_reference, fused_adam_step

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_built()),
                                reason="needs a CUDA device and a CUDA build of pyasgd._C")
G = 4
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def eff_bytes(P: int) -> int:
    return (4 * G + 24 + 4) * P  # G gradients read, p/m/v read and written, out written


def cuda_time(fn, iters=20) -> float:
    """Median seconds per call, by CUDA events (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def wall_time(fn, iters=20) -> float:
    """Median seconds per call by the host clock (for calls that synchronise themselves)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def adam_scalars(step: int, dev) -> torch.Tensor:
    b1, b2, lr, eps = HYPER["beta1"], HYPER["beta2"], HYPER["lr"], HYPER["eps"]
    return torch.tensor([1 - b1, b2, 1 - b2, (1 - b2 ** step) ** 0.5, eps, -lr / (1 - b1 ** step)], device=dev)


def server_step_torch(p, m, v, g0, g1, g2, g3, out, s):
    """The step as a user would write it in PyTorch (scalars in a tensor: no recompiles per step)."""
    g = g0 + g1 + g2 + g3
    m.lerp_(g, s[0])                                   # m = lerp(m, g, 1 - beta1)
    v.mul_(s[1]).add_(s[2] * g * g)                    # v = beta2 v + (1 - beta2) g^2
    p.add_(s[5] * m / (v.sqrt() / s[3] + s[4]))        # p -= lr m_hat / (sqrt(v_hat) + eps)
    out.copy_(p)


@pytest.mark.parametrize("P", [25_000_000, 100_000_000])
def test_cuda_server_step_vs_torch_compile_and_eager(report, P):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    p = torch.randn(P, device=dev, generator=gen)
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), torch.empty_like(p)
    gs = [torch.randn(P, device=dev, generator=gen) * 1e-3 for _ in range(G)]
    bounds = [float(g.abs().max()) for g in gs]
    compiled = torch.compile(server_step_torch, fullgraph=True)

    # results first: ours (both paths) and the compiled step against the reference, on a slice
    n = 1_000_003
    ref = [p[:n].clone(), m[:n].clone(), v[:n].clone()]
    mine = [t.clone() for t in ref]
    comp = [t.clone() for t in ref]
    sl = [g[:n] for g in gs]
    for s in (1, 2):
        assert adam_step_reference(*ref, sl, step=s, **HYPER)
        assert fused_adam_step(*mine, sl, step=s, backend="cuda", grad_bounds=[1.0] * G, **HYPER)
        compiled(*comp, *sl, torch.empty(n, device=dev), adam_scalars(s, dev))
    for a, b, c in zip(mine, comp, ref):
        assert ((a - c).abs().max() / c.abs().max()).item() < 1e-6
        assert ((b - c).abs().max() / c.abs().max()).item() < 1e-5
    assert not fused_adam_step(*mine, [torch.full((n,), float("nan"), device=dev)], step=3, backend="cuda", **HYPER)

    step = [0]

    def ours():  # the server's call: bounds prove the sum finite
        step[0] += 1
        fused_adam_step(p, m, v, gs, step=step[0], out=out, backend="cuda", grad_bounds=bounds, **HYPER)

    def ours_checked():  # the general call: check pass, then the update, verdict read on the host
        step[0] += 1
        fused_adam_step(p, m, v, gs, step=step[0], out=out, backend="cuda", **HYPER)

    s = adam_scalars(10, dev)
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.Adam([param], fused=True, lr=HYPER["lr"])

    def eager():
        g = torch.add(gs[0], gs[1])
        for x in gs[2:]:
            g.add_(x)
        param.grad = g
        opt.step()
        out.copy_(param.detach())

    x = torch.randn(P, device=dev)
    t = {"copy": cuda_time(lambda: out.copy_(x)), "ours": cuda_time(ours), "checked": cuda_time(ours_checked),
         "compile": cuda_time(lambda: compiled(p, m, v, *gs, out, s)), "eager": cuda_time(eager)}
    tag = f"P={P // 1_000_000}M G=4"
    name = torch.cuda.get_device_name()
    report(f"cuda {tag}: d2d copy", f"{8 * P / t['copy'] / 1e12:.2f} TB/s", name)
    for k in ("compile", "eager", "checked", "ours"):
        label = {"compile": "torch.compile step", "eager": "torch sum+Adam(fused)+copy",
                 "checked": "pyasgd (check pass)", "ours": "pyasgd (bounds, 1 pass)"}[k]
        report(f"cuda {tag}: {label}", f"{t[k] * 1e3:.3f} ms",
               f"{eff_bytes(P) / t[k] / 1e12:.2f} TB/s eff; ours = {t[k] / t['ours']:.2f}x faster")
    report(f"cuda {tag}: ours vs torch.compile", f"{t['compile'] / t['ours']:.2f}x", "target >= 1.0")
    report(f"cuda {tag}: ours vs eager", f"{t['eager'] / t['ours']:.2f}x", "target >= 1.6")


def test_pinned_push_and_pull_vs_cudamemcpy(report):
    from pyasgd.core.region import SharedRegion

    P = 25_000_000
    dev = torch.device("cuda")
    with SharedRegion.create(P, 2, pin=True) as region:
        g = torch.randn(P, device=dev)
        dst = torch.empty(P, device=dev)
        # results first
        region.push(g, version=0)
        batch = region.collect(1)
        assert torch.equal(batch.grads[0], g.cpu()) and batch.bounds[0] == float(g.abs().max())
        region.release(batch)
        region.publish(g.cpu())
        assert region.pull(dst) == 1 and torch.equal(dst, g)

        def push():
            region.push(g, version=0)
            region.release(region.collect(1))

        host = torch.empty(P, pin_memory=True)
        t = {"d2h": wall_time(lambda: host.copy_(g)), "h2d": wall_time(lambda: dst.copy_(host)),
             "push": wall_time(push), "pull": wall_time(lambda: region.pull(dst))}
    gbs = {k: 4 * P / v / 1e9 for k, v in t.items()}
    report("pinned P=25M: cudaMemcpy d2h (pinned)", f"{gbs['d2h']:.1f} GB/s", torch.cuda.get_device_name())
    report("pinned P=25M: cudaMemcpy h2d (pinned)", f"{gbs['h2d']:.1f} GB/s")
    report("pinned P=25M: push (copy + max|g|)", f"{gbs['push']:.1f} GB/s",
           f"{gbs['push'] / gbs['d2h']:.2f}x d2h (target 0.8)")
    report("pinned P=25M: pull", f"{gbs['pull']:.1f} GB/s", f"{gbs['pull'] / gbs['h2d']:.2f}x h2d (target 0.8)")
