"""The fused "sum G gradients + Adam" update: one dispatcher over the CPU kernel, the CUDA kernel
and a pure-PyTorch reference (the oracle in tests), plus `FusedAdam`, a drop-in optimizer."""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterable, Sequence

import torch

from pyasgd.core import ext as _ext
from pyasgd.core.flat import check_flat, flatten_params

BACKENDS = ("auto", "reference", "cpu", "cuda")

# ---------------------------------------------------------------------------------------------
# argument checks (the edge: everything below trusts them)


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _as_grad_list(grads) -> list[torch.Tensor]:
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"grads as one tensor must be G x P (2-D), got shape {tuple(grads.shape)}")
        return list(grads.unbind(0))
    grads = list(grads)
    return grads


# The gradients' types the kernels read: bf16 halves the bytes of each gradient, and is widened
# to fp32 exactly before the (fp32) sum.
GRAD_DTYPES = (torch.float32, torch.bfloat16)


def _check_grads(grads, n: int, device: torch.device) -> list[torch.Tensor]:
    grads = _as_grad_list(grads)
    if not grads:
        raise ValueError("grads is empty: pass at least one gradient buffer (G >= 1)")
    # (a non-tensor counts as float32 here: check_flat then says what is wrong with it)
    dtypes = [g.dtype if isinstance(g, torch.Tensor) else torch.float32 for g in grads]
    first = dtypes[0]
    for i, (g, dtype) in enumerate(zip(grads, dtypes)):
        if dtype not in GRAD_DTYPES:
            raise TypeError(f"grads[{i}] must be float32 or bfloat16, got {dtype}")
        if dtype != first:
            raise ValueError(f"grads mix dtypes: grads[0] is {first} but grads[{i}] is {dtype}; "
                             "pass all the gradients of a call as float32 or all as bfloat16")
        gdev = device
        if device.type == "cuda" and isinstance(g, torch.Tensor) and g.device.type == "cpu":
            if not g.is_pinned():
                raise ValueError(
                    f"grads[{i}] is in pageable CPU memory but param is on {device}; "
                    "CPU gradient sources must be pinned (mapped) memory, or move them to the GPU")
            gdev = g.device
        check_flat(f"grads[{i}]", g, n, device=gdev, dtype=dtype)
    return grads


def _check_args(param, exp_avg, exp_avg_sq, grads, out, param_out=None) -> list[torch.Tensor]:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a torch.Tensor, got {type(param).__name__}")
    n, device = param.numel(), param.device
    check_flat("param", param, n, device=device)
    check_flat("exp_avg", exp_avg, n, device=device)
    check_flat("exp_avg_sq", exp_avg_sq, n, device=device)
    grads = _check_grads(grads, n, device)
    # Every buffer but the gradients must be distinct memory: all of them are written, except
    # param when param_out takes the new parameters (param is then read while they are written).
    buffers = [("param", param)]
    if param_out is not None:
        if out is not None:
            raise ValueError("pass out or param_out, not both: each receives the new parameters "
                             "(copy param_out afterwards if a second copy is needed)")
        check_flat("param_out", param_out, n, device=device)
        buffers.append(("param_out", param_out))
    buffers += [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if out is not None:
        # a GPU master may publish into host memory (the pinned back buffer): copied after
        host_out = isinstance(out, torch.Tensor) and out.device.type == "cpu"
        check_flat("out", out, n, device=out.device if host_out else device)
        buffers.append(("out", out))
    for i, (na, a) in enumerate(buffers):
        for nb, b in buffers[i + 1:]:
            if _overlap(a, b):
                hint = (" (leave param_out None to update param in place)" if {na, nb} == {"param", "param_out"}
                        else "")
                raise ValueError(f"{na} and {nb} share memory; each written buffer must be distinct{hint}")
        if na == "param" and param_out is not None:
            continue  # only read: it may share memory with a gradient
        for j, g in enumerate(grads):
            if _overlap(a, g):
                raise ValueError(f"{na} aliases grads[{j}]; the gradients are read while {na} is written")
    return grads


def _check_hyper(step, lr, beta1, beta2, eps, weight_decay) -> None:
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer (the step being taken, 1-based), got {step}")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1: {beta1} (need 0 <= beta1 < 1)")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: {beta2} (need 0 <= beta2 < 1)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


# ---------------------------------------------------------------------------------------------
# implementations


def adam_step_reference(param, exp_avg, exp_avg_sq, grads, *, step, lr, beta1, beta2, eps,
                        weight_decay=0.0, decoupled=False, out=None, param_out=None) -> bool:
    """Pure PyTorch, written as torch.optim.Adam's single-tensor path does it: the test oracle.
    bf16 gradients are widened to fp32 (exactly) before the fp32 sum; with `param_out` the new
    parameters go there and `param` is left as it was."""
    g = grads[0].to(param.device, torch.float32, copy=True)
    for x in grads[1:]:
        g.add_(x.to(param.device, torch.float32))  # fixed order, as the kernels sum
    if not bool(torch.isfinite(g).all()):
        return False
    if param_out is not None:
        param = param_out.copy_(param)  # then the same arithmetic, in place on param_out
    if weight_decay != 0 and not decoupled:
        g = g.add(param, alpha=weight_decay)
    if weight_decay != 0 and decoupled:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if out is not None:
        out.copy_(param)
    return True


_workspaces = threading.local()


def _workspace(n: int, device: torch.device) -> torch.Tensor:
    """A per-thread, per-device scratch buffer for G >= 3 (reused: no page faults per step)."""
    cache = getattr(_workspaces, "bufs", None)
    if cache is None:
        cache = _workspaces.bufs = {}
    buf = cache.get(device)
    if buf is None or buf.numel() < n:
        buf = cache[device] = torch.empty(n, dtype=torch.float32, device=device)
    return buf


def _kernel_args(param, exp_avg, exp_avg_sq, grads, out, assume_finite=False):
    ws = _workspace(param.numel(), param.device).data_ptr() if len(grads) >= 3 and not assume_finite else 0
    return (param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            [g.data_ptr() for g in grads], param.numel(),
            0 if out is None else out.data_ptr(), ws)


def _kernel_kwargs(grads, param_out) -> dict:
    return {"param_out": 0 if param_out is None else param_out.data_ptr(),
            "bf16_grads": grads[0].dtype == torch.bfloat16}


def adam_step_cpu(param, exp_avg, exp_avg_sq, grads, *, step, lr, beta1, beta2, eps,
                  weight_decay=0.0, decoupled=False, out=None, param_out=None,
                  assume_finite=False) -> bool:
    C = _ext.ext()
    return C.adam_step_cpu(*_kernel_args(param, exp_avg, exp_avg_sq, grads, out, assume_finite), int(step),
                           float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                           bool(decoupled), bool(assume_finite), **_kernel_kwargs(grads, param_out))


def adam_step_cuda(param, exp_avg, exp_avg_sq, grads, *, step, lr, beta1, beta2, eps,
                   weight_decay=0.0, decoupled=False, out=None, param_out=None,
                   assume_finite=False) -> bool:
    C = _ext.ext()
    if len(grads) > C.cuda_max_grads:
        raise ValueError(f"the CUDA kernel sums at most {C.cuda_max_grads} gradients per call, got {len(grads)}")
    device = param.device
    stream = torch.cuda.current_stream(device).cuda_stream
    return C.adam_step_cuda(*_kernel_args(param, exp_avg, exp_avg_sq, grads, out, assume_finite), int(step),
                            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                            bool(decoupled), device.index if device.index is not None else
                            torch.cuda.current_device(), stream, bool(assume_finite),
                            **_kernel_kwargs(grads, param_out))


_IMPLS = {"reference": adam_step_reference, "cpu": adam_step_cpu, "cuda": adam_step_cuda}
_warned: set[str] = set()


def _fallback(reason: str) -> str:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"pyasgd: {reason}; using the pure-PyTorch reference update (slower)",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """Which implementation runs for buffers on `device`. An explicit backend that cannot run
    raises; "auto" falls back to the reference with a one-time warning."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    want = device.type if backend == "auto" else backend
    if want == "reference":
        return want
    if want != device.type:
        raise ValueError(f"backend {backend!r} cannot update buffers on {device}")
    if want == "cpu":
        if _ext.available():
            return "cpu"
        if backend == "cpu":
            _ext.ext()  # raises with the build hint
        return _fallback(f"C++ extension not available ({_ext.IMPORT_ERROR})")
    if want == "cuda":
        if _ext.cuda_built():
            return "cuda"
        reason = ("C++ extension not available" if not _ext.available()
                  else "the C++ extension was built without CUDA (no nvcc at build time, or PYASGD_CUDA=0)")
        if backend == "cuda":
            raise RuntimeError(f"backend 'cuda' requested but {reason}")
        return _fallback(reason)
    raise ValueError(f"no fused Adam implementation for device type {device.type!r}")


# Bounds whose sum stays below this prove the fp32 sum finite, with room for the rounding of
# partial sums (FLT_MAX is 3.4e38).
SAFE_BOUND_SUM = 1e38


def bounds_verdict(bounds, G: int) -> bool | None:
    """What per-gradient bounds (max |g|, negative = unknown) prove about the sum of G gradients:
    True = every summed element is finite; False = some element is not; None = unknown."""
    if bounds is None:
        return None
    bounds = [float(b) for b in bounds]
    if len(bounds) != G:
        raise ValueError(f"grad_bounds has {len(bounds)} entries for {G} gradients")
    if any(not math.isfinite(b) for b in bounds):
        return False  # an input holds inf or NaN, so the sum holds one too
    if any(b < 0 for b in bounds):
        return None
    return True if sum(bounds) < SAFE_BOUND_SUM else None


def fused_adam_step(param, exp_avg, exp_avg_sq, grads, *, step, lr, beta1, beta2, eps,
                    weight_decay=0.0, decoupled=False, out=None, param_out=None, backend="auto",
                    grad_bounds=None) -> bool:
    """Sum the G gradients in `grads` (a sequence of flat tensors, or a G x P tensor) in order,
    apply one bias-corrected Adam step (L2 weight decay, or AdamW when `decoupled`) to `param`
    and its moments in place, and write the new parameters to `out` too when given (in the same
    pass; for a CUDA `param`, `out` may be host memory, then it is copied after the step).

    The gradients are all float32 or all bfloat16; bf16 values are widened to fp32 exactly and
    summed in fp32, so the result is the fp32 update of the widened gradients.

    With `param_out` the parameters are only read from `param` (left unchanged) and the new ones
    written to `param_out` alone: a flat fp32 buffer of param's size on param's device, sharing
    memory with no other buffer (the moments are still updated in place). It replaces `out`:
    passing both is a ValueError.

    Returns False, changing nothing (`param_out` included), when a summed gradient element is not
    finite. Knowing that takes a read of every gradient before the first write (a check pass),
    unless `grad_bounds` (max |g| of each gradient, as the exchange's pushers measure it while
    copying) proves the sum finite: then the update is a single pass over memory.
    """
    grads = _check_args(param, exp_avg, exp_avg_sq, grads, out, param_out)
    _check_hyper(step, lr, beta1, beta2, eps, weight_decay)
    verdict = bounds_verdict(grad_bounds, len(grads))
    if verdict is False:
        return False
    name = resolve_backend(param.device, backend)
    kw = {"assume_finite": True} if verdict and name != "reference" else {}
    same = out is None or out.device == param.device  # else: out is host memory for a GPU master
    ok = _IMPLS[name](param, exp_avg, exp_avg_sq, grads, step=step, lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=weight_decay, decoupled=decoupled, out=out if same else None,
                      param_out=param_out, **kw)
    if ok and not same:
        out.copy_(param)
    return ok


# ---------------------------------------------------------------------------------------------
# the optimizer


class FusedAdam(torch.optim.Optimizer):
    """Drop-in `torch.optim.Adam` (or AdamW with `decoupled=True`) backed by the fused kernel.

    Each param group's parameters are re-pointed into one flat buffer (so is their Adam state),
    and a step is one kernel call per group. Where a gradient is not finite the step is skipped
    for that group, leaving parameters and moments unchanged (torch.optim.Adam would write NaN).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                 backend: str = "auto") -> None:
        _check_hyper(1, lr, betas[0], betas[1], eps, weight_decay)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled, backend=backend)
        self._flat: list[dict[str, torch.Tensor]] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(1, group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        self._flat.append(self._flatten(group["params"]))

    def _flatten(self, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = {"param": flatten_params(params, "FusedAdam")}  # the model now lives in flat["param"]
        for name in ("exp_avg", "exp_avg_sq", "grad"):
            flat[name] = torch.zeros_like(flat["param"])
        offset = 0
        for p in params:
            n = p.numel()
            self.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": flat["exp_avg"][offset:offset + n].view_as(p),
                "exp_avg_sq": flat["exp_avg_sq"][offset:offset + n].view_as(p),
            }
            offset += n
        return flat

    def _runs(self, group: dict):
        """Maximal runs of consecutive params that have a gradient and the same step count:
        each run is one kernel call (normally the whole group)."""
        run, offset, key = [], 0, None
        for p in group["params"]:
            n = p.numel()
            k = (p.grad is not None, float(self.state[p]["step"]))
            if run and k != key:
                yield key[0], run
                run = []
            key = k
            run.append((p, offset, n))
            offset += n
        if run:
            yield key[0], run

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, flat in zip(self.param_groups, self._flat):
            beta1, beta2 = group["betas"]
            for has_grad, run in self._runs(group):
                if not has_grad:
                    continue  # like torch.optim.Adam: params without gradients are not touched
                lo, hi = run[0][1], run[-1][1] + run[-1][2]
                for p, off, n in run:
                    if p.grad.is_sparse:
                        raise RuntimeError("FusedAdam does not support sparse gradients")
                    dst = flat["grad"][off:off + n]
                    if p.grad.data_ptr() != dst.data_ptr():
                        dst.copy_(p.grad.reshape(-1))
                step = int(self.state[run[0][0]]["step"]) + 1
                ok = fused_adam_step(
                    flat["param"][lo:hi], flat["exp_avg"][lo:hi], flat["exp_avg_sq"][lo:hi],
                    [flat["grad"][lo:hi]], step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled=group.get("decoupled", False), backend=group.get("backend", "auto"))
                if ok:
                    for p, _, _ in run:
                        self.state[p]["step"] += 1
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The base class replaced our flat views with fresh tensors: copy them back into the flat
        # buffers and restore the views, so the next step runs on one buffer again.
        for group, flat in zip(self.param_groups, self._flat):
            offset = 0
            for p in group["params"]:
                n = p.numel()
                st = self.state[p]
                for name in ("exp_avg", "exp_avg_sq"):
                    view = flat[name][offset:offset + n].view_as(p)
                    if name in st:
                        view.copy_(st[name])
                    st[name] = view
                st["step"] = torch.tensor(float(st.get("step", 0.0)))
                offset += n
