"""Staleness compensation, the parts of the server's update rule beyond the paper (the Updater in
pyasgd/trainer/update.py applies them; docs/compensation.md derives and justifies each):

- delay compensation (`--stale-policy dc:L`, DC-ASGD, Zheng et al. 2017): a gradient g computed on
  w_pulled is corrected to g + L * g*g*(w_now - w_pulled) before the sum (a diagonal
  outer-product estimate of the Hessian times the parameters' drift). `dc-adaptive:L` divides L by
  the root of the running mean of g*g per element; pyasgd uses Adam's own second moment (bias
  corrected) for that mean, so it costs no extra state. The server keeps the versions a live
  gradient may have pulled (`History`); a gradient older than those is applied uncorrected and
  counted;
- weight prediction (`--predict auto|S`, as in SpecTrain and PipeMare): the server publishes
  w + S * dw (dw the update it has just applied), so a gradient is computed near where it will be
  applied; the master stays exact and is what validation, checkpoints and the test use;
- momentum under asynchrony (`--stale-policy momentum`, after Mitliagkas et al. 2016): Adam's
  beta1 is lowered so that the mean age of the gradients in the update stays what it is without
  staleness (`momentum_beta1`);
- exponential smoothing (`--ema D`, Marian's --exponential-smoothing): an average of the master,
  updated after every applied update, used for validation, the best checkpoint and the test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyasgd.config.policy import parse_policy


@dataclass(frozen=True)
class Compensation:
    """What a config asks of the update rule, parsed once."""
    dc: float = 0.0              # lambda of dc / dc-adaptive (0: off)
    adaptive: bool = False       # dc-adaptive: lambda / sqrt(v_hat) per element
    momentum: bool = False       # beta1 from the measured staleness
    predict: float = 0.0         # S: published = w + S * dw (0: off)
    ema: float = 0.0             # decay of the parameters' average (0: off)
    keep: int = 0                # versions kept for dc (besides the current parameters)


def compensation_for(config) -> Compensation:
    """The Compensation a TrainConfig asks for."""
    kind, arg = parse_policy(config.stale_policy)
    predict = config.predict_s()
    dc = float(arg) if kind in ("dc", "dc-adaptive") else 0.0
    # dc: keep what a gradient twice the expected staleness may have pulled (G = N = 4: 2 versions).
    keep = max(1, math.ceil(2 * config.expected_staleness())) if dc else 0
    return Compensation(dc=dc, adaptive=kind == "dc-adaptive", momentum=kind == "momentum", predict=predict,
                        ema=config.ema, keep=keep)


def momentum_beta1(beta1: float, staleness: float) -> float:
    """Adam's beta1 under a mean staleness of `staleness` updates. Adam's first moment is an average
    of past gradients whose mean age is beta1 / (1 - beta1) updates; a gradient of staleness s is
    s updates old when applied, so asynchrony adds s to that age (Mitliagkas et al.'s implicit
    momentum 1 - 1/N has mean age N - 1, the mean staleness of N round-robin workers). Lowering
    beta1 to D / (1 + D), D = max(0, beta1 / (1 - beta1) - s), keeps the update's mean age what
    it is in synchronous training."""
    d = max(0.0, beta1 / (1.0 - beta1) - staleness)
    return d / (1.0 + d)


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the average after `updates` applied updates: min(D, (1 + t) / (10 + t)), the
    warm-up TensorFlow's ExponentialMovingAverage uses, so early parameters fade fast."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def delay_compensate(g: torch.Tensor, now: torch.Tensor, pulled: torch.Tensor, lam: float,
                     scale: torch.Tensor | None = None) -> None:
    """g += lam * g * g * (now - pulled) [* scale], in place (g fp32)."""
    drift = now.to(g.device) - pulled.to(g.device)
    drift.mul_(g).mul_(g)
    if scale is not None:
        drift.mul_(scale)
    g.add_(drift, alpha=lam)


class History:
    """The published versions a live gradient may have pulled, newest first: `at(s)` is the
    vector published s versions ago, or None when it is no longer kept. Without prediction the
    current version is the parameters themselves (at(0) = None: no drift), so `keep` older
    copies are kept; with prediction the current published vector differs from the master and is
    kept too."""

    def __init__(self, keep: int, n: int, device, with_current: bool) -> None:
        self.keep, self.with_current = keep, with_current
        self.size = keep + (1 if with_current else 0)
        self.buf = torch.zeros(self.size, n, dtype=torch.float32, device=device)
        self.count = 0   # valid entries
        self.head = 0    # index of the newest
        self.pushes = 0  # pushes so far (what undo compares)

    def push(self, vector: torch.Tensor) -> None:
        self.head = (self.head - 1) % self.size
        self.buf[self.head].copy_(vector)
        self.count = min(self.count + 1, self.size)
        self.pushes += 1

    def replace_newest(self, vector: torch.Tensor) -> None:
        """What was published is not what was kept (a resume republishes the master): say so."""
        if self.count:
            self.buf[self.head].copy_(vector)
        else:
            self.push(vector)

    def mark(self) -> tuple[int, int, int]:
        return self.head, self.count, self.pushes

    def undo(self, mark: tuple[int, int, int]) -> None:
        """Forget the one push since `mark` (a push into a full ring lost the oldest)."""
        head, count, pushes = mark
        if self.pushes != pushes:
            self.head, self.count, self.pushes = head, min(count, self.size - 1), pushes

    def at(self, s: int) -> torch.Tensor | None:
        i = s if self.with_current else s - 1
        if i < 0 or i >= self.count:
            return None
        return self.buf[(self.head + i) % self.size]

    def state_dict(self) -> dict:
        order = [(self.head + i) % self.size for i in range(self.count)]
        return {"vectors": self.buf[order].cpu(), "with_current": self.with_current}

    def load_state_dict(self, state: dict) -> None:
        vectors = state["vectors"]
        if bool(state.get("with_current")) != self.with_current:
            # --predict changed across the resume: the entries would be one version off. Start
            # empty; the next gradients older than what is kept again go uncorrected (counted).
            vectors = vectors[:0]
        vectors = vectors[:self.size]
        self.count, self.head = len(vectors), 0
        if len(vectors):
            self.buf[:len(vectors)].copy_(vectors)
