"""The C++/CUDA kernels below the Python layer: the per-ISA table, the Adam arithmetic bit for bit
(fp32 and bf16 gradients, in place and into param_out), the pushers' bf16 copy, portability of
the CPU sources (no x86 code outside the ISA files; an aarch64 cross compile), and the CUDA push
copies and persistent check flag (on a GPU)."""
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_with_simd(simd: str, code: str) -> str:
    """Runs `code` in a fresh interpreter (the ISA is chosen once per process) with PYASGD_SIMD."""
    env = dict(os.environ, PYASGD_SIMD=simd)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_level(cap: str) -> str:
    """What the ISA table should pick under PYASGD_SIMD=cap on this machine."""
    flags = cpu_flags()
    if not X86 or cap == "scalar":
        return "scalar"
    if "avx512f" in flags and cap != "avx2":
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "scalar"


@pytest.mark.parametrize("cap", ["", pytest.param("avx512", marks=pytest.mark.slow),
                                 pytest.param("avx2", marks=pytest.mark.slow), "scalar"])
def test_isa_table_picks_the_level_this_cpu_supports(cap):
    level = run_with_simd(cap, "import pyasgd._C as C; print(C.cpu_simd_level())")
    assert level == expected_level(cap)


# One Adam step from zero moments, written as the kernel's own operation sequence in numpy fp32
# (each operation correctly rounded; torch's CPU sqrt is not, so it cannot be the oracle here):
# the kernel must match it bit for bit, at every ISA and in the scalar tail. The same step with
# the denominator multiplied by 1/sqrt(1 - beta2^t) must differ, so the test tells division from
# the reciprocal (torch.optim.Adam and the CUDA kernel divide).
EXACT_STEP = r"""
import math
import numpy as np, torch
import pyasgd._C as C
f = np.float32
n, step, lr, b1, b2, eps = 4099, 3, 1e-2, 0.9, 0.999, 1e-8
rng = np.random.default_rng(0)
p0, g = rng.standard_normal(n, dtype=f), rng.standard_normal(n, dtype=f)
m_hat = f(1.0 - b1) * g                        # fma(1-b1, g - 0, 0)
v = (f(1.0 - b2) * g) * g                      # fma((1-b2)*g, g, b2*0)
bc2 = f(math.sqrt(1.0 - b2 ** step))
upd = f(-lr / (1.0 - b1 ** step)) * m_hat
want = p0 + upd / (np.sqrt(v) / bc2 + f(eps))
recip = p0 + upd / (np.sqrt(v) * (f(1) / bc2) + f(eps))
assert want.dtype == f and (want != recip).any(), "division and reciprocal agree here: other data"
T = torch.from_numpy
for assume_finite in (False, True):
    p, m, vv, gt = T(p0.copy()), torch.zeros(n), torch.zeros(n), T(g)
    out = torch.full((n,), float("nan"))
    assert C.adam_step_cpu(p.data_ptr(), m.data_ptr(), vv.data_ptr(), [gt.data_ptr()], n,
                           out.data_ptr(), 0, step, lr, b1, b2, eps, 0.0, False, assume_finite)
    assert torch.equal(m, T(m_hat)) and torch.equal(vv, T(v)), assume_finite
    assert torch.equal(p, T(want)), (assume_finite, (p != T(want)).sum().item())
    assert torch.equal(out, T(want))
# bf16 gradients (the oracle on their widened values) into param_out, aligned (streaming stores)
# and not: param is only read.
gb = T(g).to(torch.bfloat16)
gw = gb.float().numpy()
m_hat_b, v_b = f(1.0 - b1) * gw, (f(1.0 - b2) * gw) * gw
want_b = p0 + (f(-lr / (1.0 - b1 ** step)) * m_hat_b) / (np.sqrt(v_b) / bc2 + f(eps))
assert (gw != g).any() and (want_b != want).any(), "bf16 rounding changed nothing: other data"
for assume_finite in (False, True):
    for offset in (0, 1):
        p, m, vv = T(p0.copy()), torch.zeros(n), torch.zeros(n)
        param_out = torch.full((n + offset,), float("nan"))[offset:]
        assert C.adam_step_cpu(p.data_ptr(), m.data_ptr(), vv.data_ptr(), [gb.data_ptr()], n, 0, 0,
                               step, lr, b1, b2, eps, 0.0, False, assume_finite,
                               param_out=param_out.data_ptr(), bf16_grads=True)
        assert torch.equal(p, T(p0)), (assume_finite, offset)
        assert torch.equal(m, T(m_hat_b)) and torch.equal(vv, T(v_b)), (assume_finite, offset)
        assert torch.equal(param_out, T(want_b)), (assume_finite, offset)
print(C.cpu_simd_level())
"""


@pytest.mark.parametrize("simd", [pytest.param("avx512", marks=pytest.mark.slow),
                                  pytest.param("avx2", marks=pytest.mark.slow), "scalar"])
def test_adam_denominator_divides_bit_exactly(simd):
    assert run_with_simd(simd, EXACT_STEP) == expected_level(simd)


# bf16 gradients and param_out through every ISA's kernels, bit for bit against the same ISA's
# fp32 in-place path on the widened gradients: G = 1..5 (G >= 3 without bounds: the presum
# workspace), the SIMD tails (sizes), the threaded tiles (300001), a non-finite bf16 element at
# either end of a tile, and a misaligned param_out.
BF16_PARAM_OUT = r"""
import torch
from pyasgd.core.fused import fused_adam_step
H = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
torch.manual_seed(0)
for n in (1, 7, 22, 1023, 300001):
    for G in (1, 2, 3, 4, 5):
        for bounds in (False, True):
            gb = [(torch.randn(n) * 10.0 ** k).to(torch.bfloat16) for k in range(G)]
            kw = dict(grad_bounds=[g.abs().max().item() for g in gb]) if bounds else {}
            a = [torch.randn(n), torch.rand(n), torch.rand(n)]
            b = [t.clone() for t in a]
            p0 = a[0].clone()
            param_out = torch.full((n + G % 2,), float("nan"))[G % 2:]
            assert fused_adam_step(*a, gb, step=3, param_out=param_out, **kw, **H)
            assert fused_adam_step(*b, [g.float() for g in gb], step=3, **kw, **H)
            assert torch.equal(a[0], p0), (n, G, bounds)
            assert torch.equal(param_out, b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), (n, G, bounds)
        for idx in {0, n // 2, n - 1}:
            for bits in (0x7FC0, 0x7F80, -0x80):  # NaN, inf, -inf
                gb = [torch.randn(n).to(torch.bfloat16) for _ in range(G)]
                gb[-1].view(torch.int16)[idx] = bits
                a = [torch.randn(n), torch.rand(n), torch.rand(n)]
                before = [t.clone() for t in a]
                param_out = torch.full((n,), 7.0)
                assert fused_adam_step(*a, gb, step=3, param_out=param_out, **H) is False, (n, G, idx)
                assert all(torch.equal(x, y) for x, y in zip(a, before)) and (param_out == 7.0).all()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("simd", ["avx512", "avx2", "scalar"])
def test_bf16_grads_and_param_out_at_every_simd_level(simd):
    assert run_with_simd(simd, BF16_PARAM_OUT) == "ok"


# The pusher's bf16 copy at every ISA: src.to(torch.bfloat16) bit for bit (torch rounds to nearest
# even; its NaN bits differ by path, so NaN is checked as NaN), on random bit patterns (every
# exponent, subnormals, signalling NaNs whose payload is only in the low half) and on chosen
# values; the bound is max |rounded| or +inf; odd sizes and misaligned source and destination.
COPY_BF16 = r"""
import math
import torch
import pyasgd._C as C
chosen = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, 1.1754942e-38, 1.00390625, 1.01171875,
                       -1.00390625, 3.3895313e38, 3.3961e38, 3.4e38, -3.4e38, 65504.0,
                       float("inf"), float("-inf"), float("nan")])
assert math.isinf(chosen[11:12].to(torch.bfloat16).item()), "3.4e38 must round up to inf"
gen = torch.Generator().manual_seed(0)
for n in (1, 7, 15, 16, 17, 22, 1023, 300001):
    for offset in (0, 1):
        for kind in ("bits", "finite", "chosen"):
            if kind == "bits":
                src = torch.randint(-2**31, 2**31, (n,), generator=gen).to(torch.int32).view(torch.float32)
            else:
                src = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-40, 37, (n,), generator=gen)
                if kind == "chosen":
                    k = min(n, len(chosen))
                    src[-k:] = chosen[:k] if n > 1 else chosen[11:12]
            src = torch.cat([torch.zeros(offset), src])[offset:]
            dst = torch.full((n + offset,), 1.0, dtype=torch.bfloat16)[offset:]
            bound = C.copy_bf16_absmax_cpu(dst.data_ptr(), src.data_ptr(), n)
            want = src.to(torch.bfloat16)
            nan = want.isnan()
            assert torch.equal(dst.isnan(), nan), (n, offset, kind)
            assert torch.equal(dst.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), (n, offset, kind)
            wf = want.float()
            expect = wf.abs().max().item() if torch.isfinite(wf).all() else math.inf
            assert bound == expect, (n, offset, kind, bound, expect)
            assert kind != "finite" or math.isfinite(bound)
zero = torch.zeros(5)
assert C.copy_bf16_absmax_cpu(torch.empty(5, dtype=torch.bfloat16).data_ptr(), zero.data_ptr(), 0) == 0.0
print(C.cpu_simd_level())
"""


@pytest.mark.parametrize("simd", [pytest.param("avx512", marks=pytest.mark.slow),
                                  pytest.param("avx2", marks=pytest.mark.slow), "scalar"])
def test_copy_bf16_absmax_rounds_as_torch_and_bounds(simd):
    assert run_with_simd(simd, COPY_BF16) == expected_level(simd)


# ---------------------------------------------------------------------------------------------
# portability

ISA_FILES = {"cpu/adam_avx2.cpp", "cpu/adam_avx512.cpp"}
X86_CODE = re.compile(r"[a-z]*intrin\.h|\b_mm\d*_\w+|\b__m\d{3}[di]?\b")


def sources():
    for p in sorted(CSRC.rglob("*")):
        if p.suffix in (".cpp", ".h", ".inl", ".cu", ".cuh"):
            yield p.relative_to(CSRC).as_posix(), p.read_text()


def test_x86_intrinsics_only_in_the_isa_files():
    found = {rel: X86_CODE.findall(text) for rel, text in sources() if rel not in ISA_FILES}
    assert not {k: v for k, v in found.items() if v}
    for rel in ISA_FILES:  # the check would pass vacuously if they had moved
        assert X86_CODE.search((CSRC / rel).read_text()), rel


def guarded_lines(text: str, open_re: str, close_re: str, else_re: str, elif_re: str, pattern: str):
    """(line, enclosing active conditions) for each line matching `pattern`; conditions in an
    else branch are dropped (they are false there)."""
    stack, hits = [], []
    for line in text.splitlines():
        s = line.strip()
        if re.match(open_re, s):
            stack.append(s)
        elif re.match(elif_re, s):
            stack[-1] = s
        elif re.match(else_re, s):
            stack[-1] = ""
        elif re.match(close_re, s):
            stack.pop()
        if re.search(pattern, s):
            hits.append((s, list(stack)))
    return hits


def test_x86_flags_and_builtins_only_under_x86_conditions():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    flags = guarded_lines(cmake, r"if\s*\(", r"endif\s*\(", r"else\s*\(", r"elseif\s*\(",
                          r"-m(avx|fma|sse|bmi|f16c|arch)")
    assert flags, "no -m flags found: is the check still looking at the right file?"
    for line, conds in flags:
        assert any("x86_64" in c for c in conds), f"x86 flag outside an x86-only block: {line}"
    builtins = []
    for rel, text in sources():
        builtins += guarded_lines(text, r"#\s*if", r"#\s*endif", r"#\s*else", r"#\s*elif",
                                  r"__builtin_(cpu_|ia32_)")
    assert builtins
    for line, conds in builtins:
        assert any("__x86_64__" in c for c in conds), f"x86 builtin outside #if __x86_64__: {line}"


CROSS = "aarch64-linux-gnu-g++"
# Everything but the pybind11 bindings (those need Python's headers for the target).
PORTABLE = ["region.cpp", "cpu/adam_cpu.cpp", "cpu/adam_scalar.cpp", "cpu/thread_pool.cpp",
            "cpu/copy.cpp"]


def test_cpu_sources_cross_compile_for_aarch64(tmp_path):
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} not on PATH (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)")
    # -c, not -fsyntax-only: the assembler then checks the spin hint's instruction too.
    for src in PORTABLE:
        r = subprocess.run([CROSS, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra",
                            "-Werror", "-I", str(CSRC), "-c", str(CSRC / src),
                            "-o", str(tmp_path / (Path(src).stem + ".o"))],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{src}:\n{r.stderr}"


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


def stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 7, 22, 1023, 2**20 + 3])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned, so the scalar kernel does it all
def test_cuda_copy_absmax_copies_and_bounds(n, offset):
    import pyasgd._C as C

    dev = torch.device("cuda", torch.cuda.current_device())
    src_buf = torch.randn(n + offset, device=dev)
    src = src_buf[offset:]
    dst_buf = torch.full((n + offset,), float("nan"), pin_memory=True)
    dst = dst_buf[offset:]
    bound = C.cuda_copy_absmax(dst.data_ptr(), src.data_ptr(), n, dev.index, stream_of(dev))
    assert torch.equal(dst, src.cpu())  # complete on return: no synchronise here
    assert bound == src.abs().max().item()
    for bad in (float("nan"), float("inf"), float("-inf")):
        src[n // 2] = bad
        torch.cuda.current_stream(dev).synchronize()
        assert C.cuda_copy_absmax(dst.data_ptr(), src.data_ptr(), n, dev.index, stream_of(dev)) == float("inf")
        src[n // 2] = 0.0


@pytest.mark.cuda
def test_cuda_copy_absmax_of_zeros_and_empty():
    import pyasgd._C as C

    dev = torch.device("cuda", torch.cuda.current_device())
    src, dst = torch.zeros(1001, device=dev), torch.ones(1001, pin_memory=True)
    assert C.cuda_copy_absmax(dst.data_ptr(), src.data_ptr(), 1001, dev.index, stream_of(dev)) == 0.0
    assert not dst.any()
    assert C.cuda_copy_absmax(dst.data_ptr(), src.data_ptr(), 0, dev.index, stream_of(dev)) == 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 7, 22, 1023, 2**20 + 3])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned, so the scalar kernel does it all
def test_cuda_copy_bf16_absmax_rounds_as_torch_and_bounds(n, offset):
    import pyasgd._C as C

    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(n)
    src_host = torch.randn(n + offset, generator=gen) * 10.0 ** torch.randint(-40, 37, (n + offset,), generator=gen)
    src = src_host.to(dev)[offset:]
    dst = torch.full((n + offset,), 1.0, dtype=torch.bfloat16, pin_memory=True)[offset:]
    bound = C.cuda_copy_bf16_absmax(dst.data_ptr(), src.data_ptr(), n, dev.index, stream_of(dev))
    want = src.cpu().to(torch.bfloat16)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))  # complete on return
    assert bound == want.float().abs().max().item()
    bits = torch.randint(-2**31, 2**31, (n,), generator=gen).to(torch.int32).view(torch.float32)
    src.copy_(bits.to(dev))
    bound = C.cuda_copy_bf16_absmax(dst.data_ptr(), src.data_ptr(), n, dev.index, stream_of(dev))
    want = bits.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(dst.isnan(), nan)
    assert torch.equal(dst.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert bound == (want.float().abs().max().item() if torch.isfinite(want.float()).all() else float("inf"))
    for bad in (float("nan"), float("inf"), 3.4e38):  # 3.4e38 rounds up to inf
        src.fill_(1.0)
        src[n // 2] = bad
        torch.cuda.current_stream(dev).synchronize()
        got = C.cuda_copy_bf16_absmax(dst.data_ptr(), src.data_ptr(), n, dev.index, stream_of(dev))
        assert got == float("inf"), bad


def cuda_step(C, p, m, v, grads, *, step, assume_finite, stream):
    return C.adam_step_cuda(p.data_ptr(), m.data_ptr(), v.data_ptr(), [g.data_ptr() for g in grads],
                            p.numel(), 0, 0, step, 1e-2, 0.9, 0.999, 1e-8, 0.0, False,
                            p.device.index, stream, assume_finite)


@pytest.mark.cuda
def test_cuda_check_flag_is_reset_between_steps():
    """The persistent flag: a skipped step must not leak into the next one, and the unchecked
    path (no flag) must not read a stale verdict."""
    import pyasgd._C as C

    dev = torch.device("cuda", torch.cuda.current_device())
    n, s = 4099, stream_of(dev)
    p, m, v = torch.randn(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    good, bad = torch.randn(n, device=dev), torch.randn(n, device=dev)
    bad[n - 1] = float("nan")
    before = p.clone()
    assert not cuda_step(C, p, m, v, [bad], step=1, assume_finite=False, stream=s)
    assert torch.equal(p, before) and not m.any()
    assert cuda_step(C, p, m, v, [good], step=1, assume_finite=True, stream=s)  # flag still set
    torch.cuda.synchronize(dev)
    assert not torch.equal(p, before)
    after = p.clone()
    assert not cuda_step(C, p, m, v, [bad], step=2, assume_finite=False, stream=s)
    assert torch.equal(p, after)
    assert cuda_step(C, p, m, v, [good], step=2, assume_finite=False, stream=s)
    assert not torch.equal(p, after)


@pytest.mark.cuda
def test_cuda_checked_steps_on_two_streams_keep_their_own_verdicts():
    """Two threads on two streams of one device share the per-device flag; each must still get
    its own verdict (the flag is held from reset to read-back)."""
    import pyasgd._C as C

    dev = torch.device("cuda", torch.cuda.current_device())
    n, rounds = 1 << 16, 50
    errors = []

    def worker(poisoned: bool):
        try:
            stream = torch.cuda.Stream(dev)
            with torch.cuda.stream(stream):
                p, m, v = torch.randn(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
                g = torch.randn(n, device=dev)
                if poisoned:
                    g[n // 3] = float("inf")
                stream.synchronize()
                for step in range(1, rounds + 1):
                    ok = cuda_step(C, p, m, v, [g], step=step, assume_finite=False, stream=stream.cuda_stream)
                    if ok == poisoned:
                        errors.append((poisoned, step))
        except Exception as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
