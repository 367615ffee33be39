"""A model whose parameters and gradients live in two flat fp32 buffers, so a whole model is
pulled, pushed and updated as one tensor."""
from __future__ import annotations

import torch
from torch import nn


class FlatModel:
    """Re-points every parameter of `model` into `self.params` and its gradient into
    `self.grads` (views), so backward() accumulates straight into the flat gradient."""

    def __init__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters()]
        if not params:
            raise ValueError("the model has no parameters")
        device = params[0].device
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"pyasgd trains fp32 parameters, got {p.dtype}")
        self.model = model
        self.n = sum(p.numel() for p in params)
        self.params = torch.empty(self.n, dtype=torch.float32, device=device)
        self.grads = torch.zeros(self.n, dtype=torch.float32, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                self.params[offset:offset + k].copy_(p.reshape(-1))
                p.data = self.params[offset:offset + k].view_as(p)
                p.grad = self.grads[offset:offset + k].view_as(p)
                offset += k

    def zero_grad(self) -> None:
        self.grads.zero_()  # never None: backward must keep accumulating into the flat views
