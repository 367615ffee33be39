"""Flat fp32 buffers: the checks every buffer handed to the kernels or the exchange passes, and
models whose parameters (and gradients) live in one flat tensor, so a whole model is pulled,
pushed and updated as one buffer."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def check_flat(name: str, t, n: int, *, device: torch.device | None = None, of: str = "param",
               dtype: torch.dtype = torch.float32) -> None:
    """Raise a clear error unless `t` is a contiguous tensor of `dtype` (fp32 unless told) with
    `n` elements (on `device` when given, else on a CPU or CUDA device). Nothing is copied:
    callers write into `t`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        why = "pyasgd works on fp32 buffers" if dtype == torch.float32 else f"expected {dtype} here"
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}; {why}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is used in place; pass a contiguous flat buffer)")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements but {of} has {n}; the sizes must match")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {of} is on {device}; move it to {device}")
    if device is None and t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; use a CPU or CUDA tensor")


def flatten_params(params: Sequence[torch.Tensor], who: str = "pyasgd") -> torch.Tensor:
    """Copy `params` into one new flat fp32 tensor and re-point each parameter's data to its
    slice of it (so the model now lives in the flat buffer). Returns the flat tensor."""
    if not params:
        raise ValueError(f"{who}: no parameters to flatten")
    device = params[0].device
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"{who} needs float32 parameters, got {p.dtype}; keep fp32 master weights")
        if p.device != device:
            raise ValueError(f"{who}: all parameters must share a device ({device} vs {p.device})")
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
    offset = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            flat[offset:offset + k].copy_(p.reshape(-1))
            p.data = flat[offset:offset + k].view_as(p)
            offset += k
    return flat


class FlatModel:
    """Re-points every parameter of `model` into `self.params` and its gradient into
    `self.grads` (views), so backward() accumulates straight into the flat gradient."""

    def __init__(self, model: nn.Module) -> None:
        params = list(model.parameters())
        self.model = model
        self.params = flatten_params(params)
        self.n = self.params.numel()
        self.grads = torch.zeros_like(self.params)
        offset = 0
        for p in params:
            p.grad = self.grads[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_grad(self) -> None:
        self.grads.zero_()  # never None: backward must keep accumulating into the flat views
