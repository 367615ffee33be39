"""The server's update rule, pure: Adam moments, the learning-rate schedule, the stale policy and
one update from G collected gradients (clipping, fused sum + Adam); and `UpdateBook`, the one
bookkeeping step after every update (positions, progress, record, checkpoint, stop), shared by
every gradient source: the one-node server, the synchronous round across nodes, the sharded
server's shards and the simulator. Nothing here starts, signals or waits for a process.

Where the parameters live: a CPU server keeps no copy of its own. The region's published (front)
buffer is the current parameters; an update reads it and writes the new ones straight into the
back buffer (`fused_adam_step(..., param_out=back)`), which is then published. A CUDA server
(--server-device cuda:I) keeps master parameters on its GPU and copies them into the back buffer,
and so does the simulator (its published vector is not double-buffered)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from pyasgd import testing
from pyasgd.config import TrainConfig
from pyasgd.core.fused import fused_adam_step
from pyasgd.trainer.compensate import History, compensation_for, delay_compensate, ema_decay, momentum_beta1
from pyasgd.trainer.schedule import learning_rate


@dataclass
class UpdateResult:
    applied: bool      # the parameters changed
    publish: bool      # publish a new version (an applied update; in sync mode, a skipped one too)
    lr: float
    dropped: int       # gradients discarded as too stale
    grad_norm: float | None = None


def stale_weights(staleness: list[int], config: TrainConfig) -> list[float | None]:
    """The stale policy, the one rule every server applies: each gradient's weight in the sum, or
    None to drop it. none: 1; scale: 1/staleness for staleness > 1 (Zhang et al. 2016); drop:T:
    None above T (Dutta et al. 2018)."""
    limit, scale = config.stale_drop(), config.stale_policy == "scale"
    return [None if limit is not None and s > limit else (1.0 / s if scale and s > 1 else 1.0) for s in staleness]


def weighted_sum(grads, staleness: list[int], config: TrainConfig, out: torch.Tensor) -> int:
    """Sum gradients into `out` (fp32) weighted by the stale policy; returns how many it dropped
    (the synchronous round across nodes sums each node's gradients so before the all-reduce)."""
    out.zero_()
    weights = stale_weights(staleness, config)
    for g, w in zip(grads, weights):
        if w is not None:
            out.add_(g, alpha=w)  # bf16 slots widen exactly
    return weights.count(None)


class Updater:
    """The server's optimiser state and its update rule.

    keep_master=True: `master` holds the parameters on `device`; apply() updates it in place and
    copies the result into `out`. keep_master=False (CPU only): no parameters are kept (`master`
    is None; `params` gives only the size); apply() reads them from `current` (the region's front
    buffer) and writes the new ones into `out` (the back buffer) alone: by construction 4G + 24
    bytes per parameter per update (2G + 24 with bf16 gradients) instead of 4G + 28, and 4 bytes
    per parameter less memory."""

    def __init__(self, config: TrainConfig, params: torch.Tensor, device: str = "cpu", *,
                 keep_master: bool = True) -> None:
        self.config = config
        self.device = torch.device(device)
        if keep_master:
            self.master = params.detach().to(self.device, dtype=torch.float32, copy=True).contiguous()
        else:
            if self.device.type != "cpu":
                raise ValueError(f"an Updater without a master copy writes the region's back buffer from the "
                                 f"CPU; on {self.device} keep the master (keep_master=True)")
            self.master = None
        self.exp_avg = torch.zeros(params.numel(), dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step = 0          # applied updates: the schedule's clock
        self.dropped = 0       # gradients discarded by drop:T
        self.skipped = 0       # updates skipped for a non-finite gradient
        self._sum = None       # workspace for clipping
        # Staleness compensation (pyasgd/trainer/compensate.py), parsed once.
        comp = self.comp = compensation_for(config)
        if comp.predict and self.master is None:
            raise ValueError("weight prediction publishes parameters other than the master: keep_master=True")
        n = params.numel()
        self.history = History(comp.keep, n, self.device, with_current=comp.predict > 0) if comp.dc else None
        if self.history is not None and self.history.with_current:
            self.history.push(params)  # the first published version
        self.ema = params.detach().to(self.device, dtype=torch.float32, copy=True) if comp.ema else None
        self._old = torch.empty(n, device=self.device) if comp.predict else None  # the master before an update
        self.uncorrected = 0   # dc: gradients older than the kept versions, applied uncorrected
        self.mean_staleness: float | None = None  # momentum: the running mean the rule reads
        self.beta1 = config.beta1  # what the last update used (momentum lowers it)

    def lr(self, update: int) -> float:
        c = self.config
        return learning_rate(update, lr=c.lr, schedule=c.schedule, warmup=c.warmup)

    def apply(self, grads: list[torch.Tensor], staleness: list[int], out: torch.Tensor | None = None,
              bounds: list[float] | None = None, *, current: torch.Tensor | None = None) -> UpdateResult:
        """One server update from `grads` (fp32 or bf16, all alike; the server owns them: fp32
        ones are scaled in place). `out`, when given, receives the parameters to publish (the
        region's back buffer); publish them when the result says so. `bounds` (max |g| per
        gradient, measured by the pushers) let the fused update skip its check pass.

        Without a master copy, `current` (the published parameters, the region's front buffer)
        is read and `out` is required: an applied update writes every element of it, a skipped
        one nothing (it then holds an older version: never publish it as it is)."""
        if self.master is None and (current is None or out is None):
            raise ValueError("this Updater keeps no master copy: pass current= (the published parameters) "
                             "and out= (the buffer that receives the new ones)")
        if self.comp.predict and out is None:
            raise ValueError("weight prediction publishes extrapolated parameters: pass out=")
        params = self.master if self.master is not None else current
        mark = self.history.mark() if self.history is not None else None
        res = self._apply(grads, staleness, out, bounds, params)
        if not res.applied and self.config.mode == "sync":
            # Everyone waits at the barrier for the next version: publish the unchanged
            # parameters so they go on (a skipped or all-dropped update is still a round).
            res.publish = True
            if out is not None:
                out.copy_(params)
        self._after(res, mark, out if out is not None else params)
        return res

    def _after(self, res: UpdateResult, mark, published: torch.Tensor) -> None:
        """Compensation's part after the update: predict the published vector, keep it for dc, and
        move the average."""
        h = self.history
        if h is not None and not h.with_current and not res.publish:
            h.undo(mark)  # the pre-update parameters were kept for a version that was not published
        if not res.publish:
            return
        if self.comp.predict and res.applied:
            # published = w + S * (w - w_old): extrapolated from the master, which stays exact
            self._old.lerp_(self.master, 1.0 + self.comp.predict)
            published.copy_(self._old)
        if h is not None and h.with_current:
            h.push(published)
        if self.ema is not None and res.applied:
            new = self.master if self.master is not None else published
            self.ema.lerp_(new.to(self.device), 1.0 - ema_decay(self.comp.ema, self.step))

    def compensation_record(self) -> dict:
        """What an update record adds for dc (gradients applied uncorrected so far) and momentum (beta1)."""
        out = {}
        if self.history is not None:
            out["uncorrected"] = self.uncorrected
        if self.comp.momentum:
            out["beta1"] = round(self.beta1, 6)
        return out

    def republished(self, published: torch.Tensor | None) -> None:
        """A resumed run's launcher republished `published` (the master, not the last prediction):
        dc measures drift from what workers now pull."""
        if self.history is not None and self.history.with_current:
            self.history.replace_newest(published)

    def eval_params(self, current: torch.Tensor | None = None) -> torch.Tensor:
        """What validation, the best checkpoint and the test evaluate: the average (--ema), else the
        master, else (a CPU server without one) the published parameters `current`."""
        if self.ema is not None:
            return self.ema
        return self.master if self.master is not None else current

    def _compensate(self, use: list[torch.Tensor], staleness: list[int],
                    params: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
        """Delay compensation of each stale gradient; returns the gradients (all fp32 if any was
        corrected: the kernel takes one dtype) and whether any was."""
        c, h, scale = self.config, self.history, None
        out, corrected = [], False
        for g, s in zip(use, staleness):
            pulled = h.at(s) if s > 0 or h.with_current else None
            if pulled is None:
                self.uncorrected += s > 0
                out.append(g)
                continue
            if g.dtype != torch.float32 or g.device != self.device:
                g = g.to(self.device, dtype=torch.float32)
            if self.comp.adaptive and scale is None:
                # lambda / sqrt(mean g*g): Adam's second moment, bias corrected, is that running mean
                v_hat = self.exp_avg_sq / (1.0 - c.beta2 ** max(1, self.step))
                scale = v_hat.sqrt_().add_(c.eps if c.eps > 0 else 1e-12).reciprocal_()
            delay_compensate(g, params, pulled, self.comp.dc, scale if self.comp.adaptive else None)
            out.append(g)
            corrected = True
        if corrected and any(g.dtype != torch.float32 for g in out):
            out = [g.float() for g in out]  # bf16 widens exactly
        return out, corrected

    def _momentum(self, staleness: list[int]) -> float:
        """beta1 for this update: lowered by the running mean of the measured staleness."""
        x = sum(staleness) / len(staleness)
        if self.mean_staleness is None:
            self.mean_staleness = float(x)
        else:  # a running mean over the first 100 updates, then an average with decay 0.99
            self.mean_staleness += (x - self.mean_staleness) / min(self.step + 1, 100)
        return momentum_beta1(self.config.beta1, self.mean_staleness)

    def _apply(self, grads, staleness, out, bounds, params) -> UpdateResult:
        c = self.config
        weights = stale_weights(staleness, c)
        kept = [i for i, w in enumerate(weights) if w is not None]
        dropped = len(grads) - len(kept)
        self.dropped += dropped
        lr = self.lr(self.step + 1)
        if not kept:
            return UpdateResult(False, False, lr, dropped)
        use = [grads[i] for i in kept]
        use_bounds = [bounds[i] for i in kept] if bounds else None  # weights <= 1 keep them valid
        if self.history is not None:
            use, corrected = self._compensate(use, [staleness[i] for i in kept], params)
            if corrected:
                use_bounds = None  # the pushers' bounds no longer hold: the kernel checks finiteness
            if not self.history.with_current:
                self.history.push(params)  # about to become the previous version
        self.beta1 = self._momentum([staleness[i] for i in kept]) if self.comp.momentum else c.beta1
        if self._old is not None:
            self._old.copy_(params)
        if any(weights[i] != 1.0 for i in kept):
            if use[0].dtype != torch.float32:  # scaled in bf16 they would be rounded again: widen
                use = [g.float() for g in use]
            for i, g in zip(kept, use):
                if weights[i] != 1.0:
                    g.mul_(weights[i])
        norm = None
        if c.clip_norm > 0:
            if self._sum is None:
                self._sum = torch.empty_like(self.exp_avg)  # fp32, on the server's device
            self._sum.copy_(use[0])  # bf16 widens exactly, as in the kernel
            for g in use[1:]:
                self._sum.add_(g.to(self._sum.device))  # the kernel's order: clipping only rescales
            norm = float(self._sum.norm())
            if norm > c.clip_norm:
                self._sum.mul_(c.clip_norm / (norm + 1e-6))
            use, use_bounds = [self._sum], None
        if self.device.type == "cuda":
            use = [g if g.device == self.device or g.is_pinned() else g.to(self.device) for g in use]
        # With a master: in place, and copied to `out`. Without: read `params` (the published
        # buffer), write only `out` (the back buffer); m and v in place either way.
        # (With --predict, `out` gets the extrapolation after the update, not the master: one write.)
        if self.master is not None:
            where = {"out": None if self.comp.predict else out}
        else:
            where = {"param_out": out}
        ok = fused_adam_step(params, self.exp_avg, self.exp_avg_sq, use, step=self.step + 1, lr=lr,
                             beta1=self.beta1, beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                             decoupled=c.decoupled, grad_bounds=use_bounds, **where)
        if ok:
            self.step += 1
        else:
            self.skipped += 1
        return UpdateResult(ok, ok, lr, dropped, norm)

    def state_dict(self, current: torch.Tensor | None = None) -> dict:
        """What a checkpoint keeps. Without a master copy the parameters are `current` (the
        published buffer: copied, so the checkpoint does not hold a view of the region)."""
        if self.master is None and current is None:
            raise ValueError("this Updater keeps no master copy: pass current= (the published parameters)")
        params = self.master.cpu() if self.master is not None else current.detach().clone()
        state = {"params": params, "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                 "step": self.step, "dropped": self.dropped, "skipped": self.skipped}
        if self.ema is not None:
            state["ema"] = self.ema.cpu()
        if self.history is not None:
            state["history"] = self.history.state_dict()
            state["uncorrected"] = self.uncorrected
        if self.mean_staleness is not None:
            state["mean_staleness"] = self.mean_staleness
        return state

    def load_state_dict(self, state: dict, current: torch.Tensor | None = None) -> None:
        """Continue from a checkpoint. Without a master copy the parameters are not loaded here:
        they are what was published (the launcher publishes the checkpoint's before the server
        starts), and `current`, when given, must equal them."""
        if self.master is not None:
            self.master.copy_(state["params"])
        elif current is not None and not torch.equal(current, state["params"].to(current.device)):
            raise RuntimeError("the published parameters are not the checkpoint's: the server resumes from the "
                               "parameters the launcher published, which must be the checkpoint's")
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step = int(state["step"])
        self.dropped = int(state.get("dropped", 0))
        self.skipped = int(state.get("skipped", 0))
        if self.ema is not None:  # a checkpoint without an average starts it from the parameters
            self.ema.copy_(state.get("ema", state["params"]))
        if self.history is not None and "history" in state:
            self.history.load_state_dict(state["history"])
        self.uncorrected = int(state.get("uncorrected", 0))
        self.mean_staleness = state.get("mean_staleness")


def update_record(update: int, version: int, res: UpdateResult, staleness, tokens, loss_sum, workers, t0,
                  positions=None) -> dict:
    """The metrics.jsonl record of one server update."""
    return {"kind": "update", "update": update, "version": version, "time": round(time.monotonic() - t0, 4),
            "lr": res.lr, "staleness": list(staleness), "workers": list(workers), "tokens": int(sum(tokens)),
            "loss": (float(sum(loss_sum)) / max(1, int(sum(tokens)))), "applied": res.applied,
            "dropped": res.dropped, **({"grad_norm": res.grad_norm} if res.grad_norm is not None else {}),
            **({"positions": list(positions)} if positions is not None else {})}


@dataclass
class Applied:
    """What one update consumed: per gradient its staleness, target tokens, loss sum, worker (a
    global rank) and, where the source knows it, the data position after it."""
    staleness: list[int]
    tokens: list[int]
    losses: list[float]
    workers: list[int]
    positions: list[int] | None = None
    local_workers: list[int] | None = None  # the workers' ranks on this node, for `positions`


class UpdateBook:
    """The bookkeeping after every update, written once: each worker's data position after the
    last gradient the server used (applied, dropped or skipped: a resume starts there, so batches
    still in flight are computed again, none twice), the run's progress counters (kept in the
    checkpoint), the update record, a checkpoint every --save-every updates, and the stop at
    --max-updates. `sink` takes each record (the launcher's queue, or the simulator's log);
    `save` writes a checkpoint; `fault_at` (tests only, pyasgd/testing.py) makes it raise after
    that update, `pause_at` (update, seconds) stop that long after it."""

    def __init__(self, config: TrainConfig, up: Updater, *, sink: Callable[[dict], None], save: Callable[[], None],
                 t0: float, positions: list[int] | None = None, progress: dict | None = None,
                 fault_at: int | None = None, on_publish: Callable[[], None] | None = None,
                 pause_at: tuple[int, float] | None = None) -> None:
        self.config, self.up, self.sink, self.save, self.t0 = config, up, sink, save, t0
        self.on_publish = on_publish  # after each published update (the server's eval region)
        self.positions = positions
        self.progress = progress if progress is not None else {"tokens": 0, "gradients": 0}
        self.fault_at, self.pause_at = fault_at, pause_at

    def after_update(self, res: UpdateResult, version: int, used: Applied, extra: dict | None = None) -> str:
        """Account for one update; returns "max_updates" when the run must stop, else ""."""
        c, up = self.config, self.up
        if self.positions is not None and used.positions is not None:
            for w, pos in zip(used.local_workers or used.workers, used.positions):
                self.positions[w] = pos
        if res.publish and self.on_publish is not None:
            self.on_publish()
        self.progress["tokens"] += int(sum(used.tokens))
        if res.applied:
            self.progress["gradients"] += len(used.staleness) - res.dropped
        record = update_record(up.step, version, res, used.staleness, used.tokens, used.losses, used.workers,
                               self.t0, positions=used.positions)
        self.sink({**record, **up.compensation_record(), **(extra or {})})
        if res.applied and c.save_every and up.step % c.save_every == 0:
            self.save()
        if res.applied and up.step == self.fault_at:
            raise testing.server_fault_error(up.step)
        if res.applied and self.pause_at is not None and up.step == self.pause_at[0]:
            time.sleep(self.pause_at[1])
        return "max_updates" if c.max_updates and up.step >= c.max_updates else ""
