"""The fused "sum G gradients + Adam" update against torch.optim.Adam/AdamW and the pure-PyTorch
reference, on every device, at sizes that hit the SIMD tails."""
import os
import subprocess
import sys

import pytest
import torch

from pyasgd import FusedAdam, fused_adam_step
from pyasgd.core.fused import adam_step_reference
from conftest import DEVICES

SIZES = [1, 7, 22, 1023, 2**20 + 3]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_state(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(device)
    return p, torch.zeros(n, device=device), torch.zeros(n, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES[:-1] + [pytest.param(SIZES[-1], marks=pytest.mark.slow)])
@pytest.mark.parametrize("G", [1, 2, 4, 7])
@pytest.mark.parametrize("decoupled", [False, True])
def test_matches_torch_adam_100_steps(device, n, G, decoupled):
    steps = 100 if n < 2**20 else 20  # the large size checks the threaded tiles, not drift
    p, m, v = make_state(n, device)
    ref = torch.nn.Parameter(p.clone())
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls([ref], lr=HYPER["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    out = torch.full((n,), float("nan"), device=device)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        grads = [torch.randn(n, generator=gen).to(device) for _ in range(G)]
        assert fused_adam_step(p, m, v, grads, step=step, weight_decay=0.05, decoupled=decoupled,
                               out=out, **HYPER)
        total = grads[0].clone()
        for x in grads[1:]:
            total.add_(x)
        ref.grad = total
        opt.step()
    st = opt.state[ref]
    assert rel_err(p, ref.detach()) < 1e-6
    assert rel_err(m, st["exp_avg"]) < 1e-6
    assert rel_err(v, st["exp_avg_sq"]) < 1e-6
    assert torch.equal(out, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("simd", [pytest.param("avx512", marks=pytest.mark.slow),
                                  pytest.param("avx2", marks=pytest.mark.slow), "scalar"])
def test_every_simd_level_matches_reference(device, simd, tmp_path):
    """Each ISA instantiation (chosen at import via PYASGD_SIMD) agrees with the reference."""
    if device == "cuda":
        pytest.skip("SIMD levels are a CPU matter")
    code = f"""
import torch, pyasgd.core.ext as e
from pyasgd.core.fused import fused_adam_step, adam_step_reference
assert e.ext().cpu_simd_level() in ({simd!r}, 'avx2', 'scalar'), e.ext().cpu_simd_level()
print(e.ext().cpu_simd_level())
torch.manual_seed(0)
for n in (1, 7, 22, 1023, 300001):
    a = [torch.randn(n), torch.zeros(n), torch.zeros(n)]
    b = [t.clone() for t in a]
    for s in range(1, 6):
        gs = [torch.randn(n) for _ in range(3)]
        assert fused_adam_step(*a, gs, step=s, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        assert adam_step_reference(*b, gs, step=s, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    for x, y in zip(a, b):
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-6
from pyasgd.core.region import SharedRegion  # the pushers' copy + bound, at this SIMD level too
for n in (1, 7, 22, 300001):
    with SharedRegion.create(n, 2) as r:
        g = torch.randn(n)
        r.push(g, version=0)
        b = r.collect(1)
        assert torch.equal(b.grads[0], g) and b.bounds == [g.abs().max().item()], (n, b.bounds)
        r.release(b)
        g[n // 2] = float("nan")
        r.push(g, version=0)
        assert r.collect(1).bounds == [float("inf")]
"""
    env = dict(os.environ, PYASGD_SIMD=simd)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if simd == "scalar":
        assert r.stdout.strip() == "scalar"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [22, 2**20 + 3])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("where", ["start", "middle", "tail"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_changes_nothing(device, n, G, where, bad):
    p, m, v = make_state(n, device)
    m.fill_(0.25)
    v.fill_(0.5)
    out = torch.full((n,), 7.0, device=device)
    before = [t.clone() for t in (p, m, v, out)]
    grads = [torch.randn(n, device=device) for _ in range(G)]
    idx = {"start": 0, "middle": n // 2, "tail": n - 1}[where]
    grads[-1][idx] = bad
    assert fused_adam_step(p, m, v, grads, step=3, out=out, **HYPER) is False
    for x, y in zip((p, m, v, out), before):
        assert torch.equal(x, y)


def test_overflowing_sum_of_finite_gradients_is_rejected():
    n = 1000
    p, m, v = make_state(n, "cpu")
    grads = [torch.full((n,), 3e38), torch.full((n,), 3e38), torch.zeros(n)]
    before = p.clone()
    assert fused_adam_step(p, m, v, grads, step=1, **HYPER) is False
    assert torch.equal(p, before)


def test_deterministic_sum_order_and_g_by_p_tensor():
    n, G = 4099, 5
    grads = torch.randn(G, n) * torch.logspace(-3, 3, G).unsqueeze(1)  # order-sensitive sums
    a, b = make_state(n, "cpu"), make_state(n, "cpu")
    assert fused_adam_step(*a, grads, step=1, **HYPER)          # G x P tensor form
    assert adam_step_reference(*b, list(grads), step=1, **HYPER)  # oracle, same order
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-6


BAD_CASES = {
    "size": (lambda: dict(grads=[torch.zeros(9)]), ValueError, "9 elements"),
    "dtype": (lambda: dict(grads=[torch.zeros(10, dtype=torch.float64)]), TypeError, "float32"),
    "noncontig": (lambda: dict(param=torch.zeros(20)[::2]), ValueError, "contiguous"),
    "empty": (lambda: dict(grads=[]), ValueError, "G >= 1"),
    "out_aliases_grad": (None, ValueError, "aliases grads"),
    "param_is_m": (None, ValueError, "share memory"),
    "bad_step": (lambda: dict(step=0), ValueError, "step"),
    "bad_beta": (lambda: dict(beta1=1.0), ValueError, "beta1"),
    "grad_3d": (lambda: dict(grads=torch.zeros(2, 2, 10)), ValueError, "G x P"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_arguments_raise_before_writing(case):
    make, exc, msg = BAD_CASES[case]
    p, m, v = make_state(10, "cpu")
    g = torch.randn(10)
    kw = dict(param=p, exp_avg=m, exp_avg_sq=v, grads=[g], step=1, out=None, **HYPER)
    if case == "out_aliases_grad":
        kw["out"] = g
    elif case == "param_is_m":
        kw["exp_avg"] = p
    else:
        kw.update(make())
    snapshot = [t.clone() for t in (p, m, v, g)]
    with pytest.raises(exc, match=msg):
        fused_adam_step(**kw)
    for x, y in zip((p, m, v, g), snapshot):
        assert torch.equal(x, y)


def test_explicit_backend_that_cannot_run_raises():
    p, m, v = make_state(10, "cpu")
    with pytest.raises(ValueError, match="cannot update buffers on cpu"):
        fused_adam_step(p, m, v, [torch.zeros(10)], step=1, backend="cuda", **HYPER)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_adam_step(p, m, v, [torch.zeros(10)], step=1, backend="gpu", **HYPER)


# --- FusedAdam, the drop-in optimizer -------------------------------------------------------


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_training_curve_matches_torch(device, decoupled):
    a, b = _model(device), _model(device)
    opt_a = FusedAdam(a.parameters(), lr=3e-3, weight_decay=0.01, decoupled=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt_b = cls(b.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 13, generator=gen).to(device)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5], device=device)).argmax(1)  # learnable labels
    losses = []
    for _ in range(60):
        pair = []
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    for la, lb in losses:
        assert abs(la - lb) <= 1e-5 * abs(lb)
    assert losses[-1][0] < 0.8 * losses[0][0]  # it trains
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert rel_err(pa.detach(), pb.detach()) < 1e-5


def test_fused_adam_skips_params_without_grad_and_non_finite_steps():
    model = _model("cpu")
    opt = FusedAdam(model.parameters(), lr=1e-2)
    first, last = model[0].weight, model[2].bias
    before_last = last.detach().clone()
    model[0].weight.grad = torch.ones_like(first)  # only the first layer has a gradient
    opt.step()
    assert torch.equal(last.detach(), before_last)
    assert int(opt.state[first]["step"]) == 1 and int(opt.state[last]["step"]) == 0
    snapshot = first.detach().clone()
    first.grad = torch.full_like(first, float("nan"))
    opt.step()
    assert torch.equal(first.detach(), snapshot)
    assert int(opt.state[first]["step"]) == 1


def test_fused_adam_state_dict_round_trip_and_torch_compat():
    a, b = _model("cpu"), _model("cpu")
    opt_a = FusedAdam(a.parameters(), lr=1e-2)
    x = torch.randn(64, 13)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).square().mean().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = FusedAdam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    # the same next step on both
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # a torch.optim.Adam state dict loads too (same state keys)
    c = _model("cpu")
    t_opt = torch.optim.Adam(c.parameters(), lr=1e-2)
    c(x).square().mean().backward()
    t_opt.step()
    f_opt = FusedAdam(c.parameters(), lr=1e-2)
    f_opt.load_state_dict(t_opt.state_dict())
    p0 = next(c.parameters())
    assert torch.equal(f_opt.state[p0]["exp_avg"], t_opt.state[p0]["exp_avg"])


@pytest.mark.parametrize("kwargs,msg", [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "beta1"),
    (dict(betas=(0.9, -0.1)), "beta2"), (dict(eps=-1.0), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="tpu"), "unknown backend"),
])
def test_fused_adam_validates_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        FusedAdam(_model("cpu").parameters(), **kwargs)


def test_fused_adam_rejects_non_fp32():
    model = _model("cpu").double()
    with pytest.raises(TypeError, match="float32"):
        FusedAdam(model.parameters())


# --- grad_bounds: the pushers' max |g| proves the sum finite, and the update is one pass ------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 4])
def test_bounds_give_the_same_result_in_one_pass(device, G):
    n = 2**20 + 3
    a, b = make_state(n, device), make_state(n, device)
    gen = torch.Generator().manual_seed(3)
    for step in (1, 2, 3):
        grads = [torch.randn(n, generator=gen).to(device) for _ in range(G)]
        bounds = [g.abs().max().item() for g in grads]
        assert fused_adam_step(*a, grads, step=step, grad_bounds=bounds, **HYPER)
        assert adam_step_reference(*b, grads, step=step, **HYPER)
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-6


def test_bounds_that_show_a_non_finite_input_change_nothing():
    p, m, v = make_state(100, "cpu")
    before = [t.clone() for t in (p, m, v)]
    grads = [torch.randn(100), torch.randn(100)]
    grads[1][3] = float("inf")
    for bounds in ([1.0, float("inf")], [float("nan"), 1.0]):
        assert fused_adam_step(p, m, v, grads, step=1, grad_bounds=bounds, **HYPER) is False
    assert all(torch.equal(x, y) for x, y in zip((p, m, v), before))


def test_bounds_too_large_or_unknown_fall_back_to_the_check_pass():
    n = 1000
    p, m, v = make_state(n, "cpu")
    before = p.clone()
    overflow = [torch.full((n,), 3e38), torch.full((n,), 3e38)]  # finite inputs, infinite sum
    assert fused_adam_step(p, m, v, overflow, step=1, grad_bounds=[3e38, 3e38], **HYPER) is False
    bad = [torch.randn(n)]
    bad[0][7] = float("nan")
    assert fused_adam_step(p, m, v, bad, step=1, grad_bounds=[-1.0], **HYPER) is False  # unknown
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="grad_bounds has 1 entries for 2 gradients"):
        fused_adam_step(p, m, v, overflow, step=1, grad_bounds=[1.0], **HYPER)


# --- param_out: read param, write the new parameters only to param_out (the server's front ->
# back buffer, with no master copy) --------------------------------------------------------------

DECAYS = {"none": dict(weight_decay=0.0), "l2": dict(weight_decay=0.05),
          "decoupled": dict(weight_decay=0.05, decoupled=True)}


def _offset_buffer(n, device, offset, fill=float("nan")):
    """n floats starting `offset` elements into a fresh buffer: offset 1 is misaligned, so the
    kernel stores with plain (not streaming) stores."""
    return torch.full((n + offset,), fill, device=device)[offset:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", [(7, 0), (1023, 1), pytest.param(2**20 + 3, 0, marks=pytest.mark.slow),
                                      (2**20 + 3, 1)])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("bounds", [False, True])
@pytest.mark.parametrize("decay", sorted(DECAYS))
def test_param_out_equals_the_in_place_update(device, n, offset, G, bounds, decay):
    """Three steps flipping between two buffers as the server does (read the published one,
    write the other): every new parameter equals the in-place update's bit for bit, and the
    buffer read is never written."""
    hyper = dict(HYPER, **DECAYS[decay])
    p, m, v = make_state(n, device)                     # in place: the oracle
    front = p.clone()
    back = _offset_buffer(n, device, offset)
    m2, v2 = m.clone(), v.clone()
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3):
        grads = [torch.randn(n, generator=gen).to(device) for _ in range(G)]
        kw = dict(grad_bounds=[g.abs().max().item() for g in grads]) if bounds else {}
        read_before = front.clone()
        assert fused_adam_step(p, m, v, grads, step=step, **kw, **hyper)
        assert fused_adam_step(front, m2, v2, grads, step=step, param_out=back, **kw, **hyper)
        assert torch.equal(front, read_before)          # param is only read
        assert torch.equal(back, p) and torch.equal(m2, m) and torch.equal(v2, v)
        front, back = back, front                       # publish: the next step reads it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("bounds", ["none", "measured", "unknown"])
def test_param_out_non_finite_writes_nothing(device, G, bad, bounds):
    n = 2**20 + 3
    p, m, v = make_state(n, device)
    m.fill_(0.25)
    v.fill_(0.5)
    param_out = torch.full((n,), 7.0, device=device)
    grads = [torch.randn(n, device=device) for _ in range(G)]
    grads[G // 2][n - 2] = bad
    kw = {"none": {}, "measured": dict(grad_bounds=[g.abs().max().item() for g in grads]),
          "unknown": dict(grad_bounds=[-1.0] * G)}[bounds]
    before = [t.clone() for t in (p, m, v, param_out)]
    assert fused_adam_step(p, m, v, grads, step=2, param_out=param_out, **kw, **HYPER) is False
    for x, y in zip((p, m, v, param_out), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", ["is_param", "overlaps_param", "aliases_grad", "is_exp_avg", "length",
                                  "dtype", "noncontig", "with_out"])
def test_param_out_bad_arguments_raise_before_writing(case):
    n = 10
    buf = torch.randn(3 * n)
    p, m, v = buf[:n], torch.zeros(n), torch.zeros(n)
    grads = [torch.randn(n), torch.randn(n)]
    kw = {}
    param_out, exc, msg = {
        "is_param": (p, ValueError, "param and param_out share memory"),
        "overlaps_param": (buf[n // 2:n // 2 + n], ValueError, "param and param_out share memory"),
        "aliases_grad": (grads[1], ValueError, r"param_out aliases grads\[1\]"),
        "is_exp_avg": (m, ValueError, "param_out and exp_avg share memory"),
        "length": (torch.zeros(n - 1), ValueError, "param_out has 9 elements but param has 10"),
        "dtype": (torch.zeros(n, dtype=torch.float64), TypeError, "param_out must be float32"),
        "noncontig": (torch.zeros(2 * n)[::2], ValueError, "param_out must be contiguous"),
        "with_out": (torch.zeros(n), ValueError, "out or param_out, not both"),
    }[case]
    if case == "with_out":
        kw["out"] = torch.zeros(n)
    snapshot = [t.clone() for t in (buf, m, v, param_out, *grads)]
    with pytest.raises(exc, match=msg):
        fused_adam_step(p, m, v, grads, step=1, param_out=param_out, **kw, **HYPER)
    for x, y in zip((buf, m, v, param_out, *grads), snapshot):
        assert torch.equal(x, y)


def test_param_out_may_share_memory_with_a_gradient_it_does_not_write():
    """param is only read when param_out is given: a gradient overlapping it is harmless."""
    n = 100
    p, m, v = make_state(n, "cpu")
    g = p.clone()
    param_out = torch.empty(n)
    assert fused_adam_step(p, m, v, [p], step=1, param_out=param_out, **HYPER)
    q, m2, v2 = make_state(n, "cpu")
    assert fused_adam_step(q, m2, v2, [g], step=1, **HYPER)
    assert torch.equal(param_out, q)


# --- bf16 gradients: half the bytes per gradient, widened exactly and summed in fp32 ----------------

def _bf16_grads(G, n, device, seed=7):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, G)  # order-sensitive sums
    return [(torch.randn(n, generator=gen) * s).to(torch.bfloat16).to(device) for s in scale]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 22, 1023, pytest.param(2**20 + 3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("bounds", [False, True])
def test_bf16_grads_equal_the_update_from_their_widened_values(device, n, G, bounds):
    """bf16 gradients give, bit for bit, the fp32 update of the same values widened (bits << 16),
    on the check pass (G >= 3: the presum workspace) and on the one-pass path; and agree with
    the reference given the bf16 gradients themselves."""
    a, b, c = make_state(n, device), make_state(n, device), make_state(n, device)
    for step in (1, 2):
        gb = _bf16_grads(G, n, device, seed=step)
        gw = [g.float() for g in gb]
        assert all(torch.equal(w.view(torch.int32), g.view(torch.int16).to(torch.int32) << 16)
                   for w, g in zip(gw, gb))  # the widening the kernels must do
        kw = dict(grad_bounds=[g.abs().max().item() for g in gb]) if bounds else {}
        assert fused_adam_step(*a, gb, step=step, weight_decay=0.05, **kw, **HYPER)
        assert fused_adam_step(*b, gw, step=step, weight_decay=0.05, **kw, **HYPER)
        assert adam_step_reference(*c, gb, step=step, weight_decay=0.05, **HYPER)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert rel_err(x, z) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 3, 5])
@pytest.mark.parametrize("bad", [0x7FC0, 0xFFC1, 0x7F80, 0xFF80])  # NaN, -NaN, inf, -inf (bits)
@pytest.mark.parametrize("where", ["start", "middle", "tail"])
def test_bf16_non_finite_changes_nothing(device, G, bad, where):
    n = 2**20 + 3
    p, m, v = make_state(n, device)
    param_out = torch.full((n,), 7.0, device=device)
    grads = _bf16_grads(G, n, device)
    idx = {"start": 0, "middle": n // 2, "tail": n - 1}[where]
    grads[-1].view(torch.int16)[idx] = bad - 0x10000 if bad >= 0x8000 else bad
    before = [t.clone() for t in (p, m, v, param_out)]
    assert fused_adam_step(p, m, v, grads, step=4, **HYPER) is False
    assert fused_adam_step(p, m, v, grads, step=4, param_out=param_out, **HYPER) is False
    for x, y in zip((p, m, v, param_out), before):
        assert torch.equal(x, y)


def test_bf16_copy_bounds_prove_the_sum_finite_and_the_update_is_one_pass(monkeypatch):
    """The pusher's bf16 copy measures max |rounded g|; those bounds prove the sum finite, so the
    kernel is called with assume_finite (no check pass) and gives the checked call's result. A
    finite fp32 value that rounds to inf in bf16 gives an inf bound: the update is skipped."""
    import pyasgd._C as C
    import pyasgd.core.fused as optim

    n, G = 4099, 4
    gen = torch.Generator().manual_seed(11)
    srcs = [torch.randn(n, generator=gen) * 1e3 for _ in range(G)]
    slots = [torch.empty(n, dtype=torch.bfloat16) for _ in range(G)]
    bounds = [C.copy_bf16_absmax_cpu(d.data_ptr(), s.data_ptr(), n) for d, s in zip(slots, srcs)]
    assert bounds == [d.float().abs().max().item() for d in slots]
    assert optim.bounds_verdict(bounds, G) is True and sum(bounds) < optim.SAFE_BOUND_SUM
    calls = []
    cpu_step = optim._IMPLS["cpu"]
    monkeypatch.setitem(optim._IMPLS, "cpu", lambda *a, **kw: calls.append(kw) or cpu_step(*a, **kw))
    a, b = make_state(n, "cpu"), make_state(n, "cpu")
    assert fused_adam_step(*a, slots, step=1, grad_bounds=bounds, backend="cpu", **HYPER)
    assert fused_adam_step(*b, slots, step=1, backend="cpu", **HYPER)
    assert [kw.get("assume_finite", False) for kw in calls] == [True, False]
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    srcs[2][5] = 3.4e38  # finite in fp32, inf once rounded to bf16
    assert C.copy_bf16_absmax_cpu(slots[2].data_ptr(), srcs[2].data_ptr(), n) == float("inf")
    assert slots[2][5].item() == float("inf")
    before = [t.clone() for t in a]
    assert fused_adam_step(*a, slots, step=2, grad_bounds=[1.0, 1.0, float("inf"), 1.0], **HYPER) is False
    assert fused_adam_step(*a, slots, step=2, **HYPER) is False  # and the check pass agrees
    assert all(torch.equal(x, y) for x, y in zip(a, before))


def test_bf16_grads_as_a_g_by_p_tensor():
    n, G = 1023, 3
    grads = torch.stack(_bf16_grads(G, n, "cpu"))
    a, b = make_state(n, "cpu"), make_state(n, "cpu")
    assert fused_adam_step(*a, grads, step=1, **HYPER)
    assert fused_adam_step(*b, list(grads.float()), step=1, **HYPER)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("grads,exc,msg", [
    (lambda n: [torch.randn(n), torch.randn(n).to(torch.bfloat16)], ValueError,
     r"grads mix dtypes: grads\[0\] is torch.float32 but grads\[1\] is torch.bfloat16"),
    (lambda n: [torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16), torch.randn(n)],
     ValueError, r"grads\[2\] is torch.float32"),
    (lambda n: [torch.randn(n).half()], TypeError, r"grads\[0\] must be float32 or bfloat16, got torch.float16"),
    (lambda n: [torch.randn(n - 1).to(torch.bfloat16)], ValueError, r"grads\[0\] has 9 elements"),
    (lambda n: [torch.randn(2 * n).to(torch.bfloat16)[::2]], ValueError, r"grads\[0\] must be contiguous"),
])
def test_bf16_grads_bad_arguments_raise(grads, exc, msg):
    p, m, v = make_state(10, "cpu")
    before = [t.clone() for t in (p, m, v)]
    with pytest.raises(exc, match=msg):
        fused_adam_step(p, m, v, grads(10), step=1, **HYPER)
    assert all(torch.equal(x, y) for x, y in zip((p, m, v), before))


def test_reference_param_out_and_bf16_grads():
    """The oracle's own two features: param_out is its in-place update written elsewhere, bf16
    gradients are their widened values, and a skipped step writes nothing."""
    n = 1023
    gb = _bf16_grads(3, n, "cpu")
    a, b = make_state(n, "cpu"), make_state(n, "cpu")
    p0 = a[0].clone()
    param_out = torch.full((n,), 7.0)
    kw = dict(step=2, weight_decay=0.1, decoupled=True, **HYPER)
    assert adam_step_reference(*a, gb, param_out=param_out, **kw)
    assert adam_step_reference(*b, [g.float() for g in gb], **kw)
    assert torch.equal(a[0], p0) and torch.equal(param_out, b[0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    gb[1][4] = float("nan")
    kept = param_out.clone()
    assert adam_step_reference(*a, gb, param_out=param_out, **kw) is False
    assert torch.equal(param_out, kept)
