"""The deterministic simulator (`--simulate`): the N workers run as virtual workers in one
process, with the server logic of the real trainer (`server.Updater`) and the same staleness
model. Each virtual worker computes its gradient on the parameters it last pulled; the order in
which gradients arrive follows `--sim-order`:

- round-robin: workers finish in turn 0, 1, ..., N-1, 0, ... (ideal async staleness N-1);
- normal: each compute takes max(0.05, Normal(1, sim_time_std)) time units (Zhang et al. 2016).

Same seed and config give bit-identical results, and a resumed run continues bit for bit.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from pyasgd import checkpoint, rundir
from pyasgd.config import TrainConfig
from pyasgd.flat import FlatModel
from pyasgd.run import final_test, finish, local_gradient, next_validation, start_run, validate, validate_last
from pyasgd.runlog import RunLog
from pyasgd.server import Updater, update_record
from pyasgd.tasks import Cursor


@dataclass
class VirtualWorker:
    params: torch.Tensor  # what it last pulled
    pulled: int           # the version of those parameters
    cursor: Cursor
    next_time: float = 0.0


class Simulation:
    def __init__(self, config: TrainConfig, run_dir: str, task) -> None:
        c = self.config = config
        self.run_dir, self.task = run_dir, task
        self.sync = c.mode == "sync"
        torch.manual_seed(c.seed)
        self.flat = FlatModel(task.build_model())
        self.log = RunLog(run_dir, c, task)
        self.up = Updater(c, self.flat.params)
        self.published = self.up.master.clone()
        self.version = 0
        self.order = torch.Generator().manual_seed(c.seed * 31 + 7)
        self.vws = [VirtualWorker(self.published.clone(), 0, Cursor()) for _ in range(c.workers)]
        self.rr = 0  # next worker in round-robin order
        self.ckpt_path = os.path.join(run_dir, rundir.CHECKPOINT)
        if c.resume:
            self.load()
        elif c.sim_order == "normal":
            for w in self.vws:
                w.next_time = self.draw_time()
        self.data = [task.batches(i, c.workers, w.cursor) for i, w in enumerate(self.vws)]

    # -- state ----------------------------------------------------------------------------------
    def save(self) -> None:
        vws = self.vws
        checkpoint.save_atomic({"server": self.up.state_dict(), "sim": {
            "published": self.published, "version": self.version, "rr": self.rr,
            "params": torch.stack([w.params for w in vws]),
            "pulled": torch.tensor([w.pulled for w in vws]),
            "cursors": torch.tensor([[w.cursor.epoch, w.cursor.index] for w in vws]),
            "next_time": torch.tensor([w.next_time for w in vws], dtype=torch.float64),
            "order_rng": self.order.get_state(), "torch_rng": torch.get_rng_state()}}, self.ckpt_path)

    def load(self) -> None:
        st = checkpoint.load(self.ckpt_path)
        self.up.load_state_dict(st["server"])
        sim = st["sim"]
        self.published.copy_(sim["published"])
        self.version, self.rr = int(sim["version"]), int(sim["rr"])
        for i, w in enumerate(self.vws):
            w.params.copy_(sim["params"][i])
            w.pulled = int(sim["pulled"][i])
            w.cursor = Cursor(int(sim["cursors"][i][0]), int(sim["cursors"][i][1]))
            w.next_time = float(sim["next_time"][i])
        self.order.set_state(sim["order_rng"])
        torch.set_rng_state(sim["torch_rng"])
        self.log.updates = self.up.step

    # -- the virtual workers --------------------------------------------------------------------
    def draw_time(self) -> float:
        return max(0.05, 1.0 + self.config.sim_time_std * float(torch.randn(1, generator=self.order)))

    def next_worker(self) -> int:
        if self.config.sim_order == "round-robin" or self.sync:
            i, self.rr = self.rr, (self.rr + 1) % self.config.workers
            return i
        i = min(range(self.config.workers), key=lambda j: (self.vws[j].next_time, j))
        self.vws[i].next_time += self.draw_time()
        return i

    def compute(self, i: int) -> tuple[torch.Tensor, int, float]:
        """Worker i's (locally accumulated) gradient on the parameters it last pulled."""
        w = self.vws[i]
        self.flat.params.copy_(w.params)
        tokens, loss_sum, w.cursor = local_gradient(self.task, self.flat, self.data[i], self.config.local_accum,
                                                    amp=self.config.amp)
        return self.flat.grads.clone(), tokens, loss_sum

    def pull_if_due(self, i: int) -> None:
        w = self.vws[i]
        if self.version - w.pulled >= self.config.pull_every:
            w.params.copy_(self.published)
            w.pulled = self.version

    def validate(self) -> None:
        self.flat.params.copy_(self.published)
        validate(self.task, self.flat, self.log, self.run_dir, self.up.step, self.version)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.log.close()

    def _run(self) -> dict[str, Any]:
        c, up, log = self.config, self.up, self.log
        start_run(self.task, self.run_dir, c.quiet)
        start = t0 = time.monotonic()
        pending: list[tuple[torch.Tensor, int, int, float, int]] = []  # grad, version, tokens, loss, worker
        next_valid = next_validation(up.step, c.valid_every)
        stopped_because = ""
        while not stopped_because:
            i = self.next_worker()
            grad, tokens, loss_sum = self.compute(i)
            pending.append((grad, self.vws[i].pulled, tokens, loss_sum, i))
            if len(pending) == c.G:
                staleness = [self.version - p[1] for p in pending]
                res = up.apply([p[0] for p in pending], staleness, out=self.published)
                if res.publish:
                    self.version += 1
                log.on_update(update_record(up.step, self.version, res, staleness, [p[2] for p in pending],
                                            [p[3] for p in pending], [p[4] for p in pending], t0))
                pending = []
                if self.sync:  # the barrier: everyone pulls the new version (if due)
                    for j in range(c.workers):
                        self.pull_if_due(j)
                if res.applied:
                    if c.save_every and up.step % c.save_every == 0:
                        self.save()
                    if next_valid is not None and up.step >= next_valid:
                        self.validate()
                        next_valid = next_validation(up.step, c.valid_every)
                        stopped_because = "patience" if log.out_of_patience else ""
                    if c.max_updates and up.step >= c.max_updates:
                        stopped_because = "max_updates"
                if c.max_epochs and any(w.cursor.epoch >= c.max_epochs for w in self.vws):
                    stopped_because = stopped_because or "max_epochs"
                if c.max_time and time.monotonic() - start >= c.max_time:
                    stopped_because = stopped_because or "max_time"
            if not self.sync:
                self.pull_if_due(i)
        self.save()
        wall = time.monotonic() - start
        self.flat.params.copy_(self.published)
        validate_last(self.task, self.flat, log, self.run_dir, up.step, self.version)
        return finish(log, self.run_dir, stopped_because=stopped_because, wall_s=wall,
                      extra=final_test(self.task, self.flat, self.run_dir))


def simulate(config: TrainConfig, run_dir: str, task) -> dict[str, Any]:
    return Simulation(config, run_dir, task).run()
