"""The deterministic simulator (`--simulate`): the N workers run as virtual workers in one
process, with the server logic of the real trainer (`update.Updater`, `update.UpdateBook`) and the same staleness
model. Each virtual worker computes its gradient on the parameters it last pulled.

A virtual clock says when each gradient arrives: a worker's computation of T target tokens takes
speed * T / sim_wps virtual seconds (--sim-speeds, --sim-wps), times a jitter with --sim-order
normal. The server serves arrivals in virtual-time order (--sim-order normal), or in turns 0, 1,
..., N-1, 0, ... (round-robin, the ideal async staleness N-1; an arrival then happens at the
later of its finish and the previous arrival). Asynchronous workers start their next batch as
soon as their gradient is taken; synchronous workers all start when the round's last (slowest)
gradient has arrived. Update and validation records carry the virtual time ("vtime"), so
time-to-BLEU means "with N such accelerators", deterministically, on any machine.

With --grad-dtype bf16 each gradient is rounded to bf16 (nearest even, as the real pushers
round) before the server sums it in fp32, so a simulated run shows what the rounding costs. The
server's state is an `Updater` with a master copy, written into `published` after each update
(the real CPU server has no master copy: it reads and writes the region's two buffers; the
tests check both paths give the same parameters bit for bit).

Same seed and config give bit-identical results, and a resumed run continues bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from pyasgd.core import checkpoint
from pyasgd.errors import SaveError
from pyasgd.trainer import rundir, tboard
from pyasgd.config import TrainConfig
from pyasgd.core.flat import FlatModel
from pyasgd.trainer.steps import ValidationSchedule, final_test, finish, local_gradient, start_run, validate, validate_last
from pyasgd.trainer.console import LOG, Progress
from pyasgd.trainer.runlog import RunLog
from pyasgd.trainer.stops import StopReason
from pyasgd.trainer.update import Applied, UpdateBook, Updater
from pyasgd.tasks import Cursor


@dataclass
class VirtualWorker:
    params: torch.Tensor  # what it last pulled
    pulled: int           # the version of those parameters
    cursor: Cursor        # where its current computation's batches start
    speed: float = 1.0    # relative compute time (--sim-speeds)
    finish: float = 0.0   # virtual time its current computation ends
    work: list = field(default_factory=list)  # the (batch, next cursor) pairs it is computing on


class Simulation:
    def __init__(self, config: TrainConfig, run_dir: str, task, resume: dict | None = None) -> None:
        c = self.config = config
        self.run_dir, self.task = run_dir, task
        self.sync = c.mode == "sync"
        torch.manual_seed(c.seed)
        self.flat = FlatModel(task.build_model())
        self.log = RunLog(run_dir, c, task)
        tboard.attach(self.log, c, run_dir)
        self.up = Updater(c, self.flat.params)
        self.published = self.up.master.clone()
        self.version = 0
        self.clock = 0.0  # virtual time of the last arrival the server took
        self.order = torch.Generator().manual_seed(c.seed * 31 + 7)
        self.vws = [VirtualWorker(self.published.clone(), 0, Cursor(), speed) for speed in c.worker_speeds()]
        self.rr = 0  # next worker in round-robin order
        self.ckpt_path = os.path.join(run_dir, rundir.CHECKPOINT)
        if c.resume:
            self.load(resume)
        self.data = [task.batches(i, c.workers, w.cursor) for i, w in enumerate(self.vws)]
        for i in range(c.workers):
            self.begin(i, 0.0, fresh=not c.resume)

    # -- state ----------------------------------------------------------------------------------
    def save(self) -> None:
        vws = self.vws
        checkpoint.save_atomic({"server": self.up.state_dict(), "sim": {
            "published": self.published, "version": self.version, "rr": self.rr,
            "params": torch.stack([w.params for w in vws]),
            "pulled": torch.tensor([w.pulled for w in vws]),
            "cursors": torch.tensor([[w.cursor.epoch, w.cursor.index] for w in vws]),
            "finish": torch.tensor([w.finish for w in vws], dtype=torch.float64), "clock": self.clock,
            "log": self.log.progress(),
            "order_rng": self.order.get_state(), "torch_rng": torch.get_rng_state()}}, self.ckpt_path)

    def load(self, st: dict | None = None) -> None:
        """Continue from the checkpoint `st` (rundir.check_resume loaded and checked it), else the run's."""
        st = st if st is not None else checkpoint.load(self.ckpt_path)
        self.up.load_state_dict(st["server"])
        sim = st["sim"]
        self.published.copy_(sim["published"])
        self.version, self.rr = int(sim["version"]), int(sim["rr"])
        for i, w in enumerate(self.vws):
            w.params.copy_(sim["params"][i])
            w.pulled = int(sim["pulled"][i])
            w.cursor = Cursor(int(sim["cursors"][i][0]), int(sim["cursors"][i][1]))
            w.finish = float(sim["finish"][i])
        self.clock = float(sim["clock"])
        self.order.set_state(sim["order_rng"])
        torch.set_rng_state(sim["torch_rng"])
        self.log.updates = self.up.step
        self.log.resume_from(self.up.step)
        self.log.restore(sim.get("log"), clocks=True)
        st.clear()  # all copied in: the caller's reference (pyasgd.train's) must not keep it through the run

    # -- the virtual workers and their clock ------------------------------------------------------
    def begin(self, i: int, now: float, fresh: bool = True) -> None:
        """Worker i takes its next k batches at virtual time `now`; its gradient arrives when
        their compute time has passed. (fresh=False: re-take the batches of a computation a
        resumed checkpoint had started; its finish time is the saved one.)"""
        c, w = self.config, self.vws[i]
        if w.work:
            w.cursor = w.work[-1][1]
        w.work = [next(self.data[i]) for _ in range(c.local_accum)]
        if fresh:
            tokens = sum(self.task.batch_tokens(b) for b, _ in w.work)
            w.finish = now + w.speed * tokens / c.sim_wps * self.jitter()

    def jitter(self) -> float:
        if self.config.sim_order != "normal" or self.config.sim_time_std == 0:
            return 1.0
        return max(0.05, 1.0 + self.config.sim_time_std * float(torch.randn(1, generator=self.order)))

    def next_worker(self) -> int:
        """The worker whose gradient the server takes next; advances the clock to its arrival."""
        if self.config.sim_order == "round-robin" or self.sync:
            i, self.rr = self.rr, (self.rr + 1) % self.config.workers
        else:
            i = min(range(self.config.workers), key=lambda j: (self.vws[j].finish, j))
        self.clock = max(self.clock, self.vws[i].finish)
        return i

    def compute(self, i: int) -> tuple[torch.Tensor, int, float]:
        """Worker i's (locally accumulated) gradient on the parameters it last pulled."""
        w = self.vws[i]
        self.flat.params.copy_(w.params)
        tokens, loss_sum, _ = local_gradient(self.task, self.flat, iter(w.work), self.config.local_accum,
                                             amp=self.config.amp)
        if self.config.grad_dtype == "bf16":  # what a real pusher's slot would hold
            return self.flat.grads.to(torch.bfloat16), tokens, loss_sum
        return self.flat.grads.clone(), tokens, loss_sum

    def pull_if_due(self, i: int) -> None:
        w = self.vws[i]
        if self.version - w.pulled >= self.config.pull_every:
            w.params.copy_(self.published)
            w.pulled = self.version

    def validate(self) -> None:
        self.flat.params.copy_(self.up.eval_params())  # the master or its average, not a prediction
        validate(self.task, self.flat, self.log, self.run_dir, self.up.step, self.version)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            out = self._run()
        except BaseException:
            try:
                self.log.close()
            except SaveError:  # the disk is full: the error already on its way is the one to report
                pass
            raise
        self.log.close()
        return out

    def _run(self) -> dict[str, Any]:
        c, up, log = self.config, self.up, self.log
        start_run(self.task, self.run_dir)
        t0 = log.t0  # restored by a resume: the clocks go on
        pending: list[tuple[torch.Tensor, int, int, float, int]] = []  # grad, version, tokens, loss, worker
        schedule = ValidationSchedule(c, up.step, log.tokens)
        book = UpdateBook(c, up, sink=log.on_update, save=self.save, t0=t0)
        LOG.info(f"simulating {c.workers} virtual workers in one process"
                 + (f", resuming from update {up.step:,}" if c.resume else ""))
        bar = Progress(f"sim {c.mode} N={c.workers} G={c.G} k={c.local_accum}", c.max_updates or None, up.step,
                       line=log.status_line)
        try:
            stopped_because = self._loop(pending, schedule, book, bar)
        finally:
            bar.close()
        LOG.info(f"stopping ({stopped_because}) at update {up.step:,}")
        self.save()
        wall = log.elapsed
        self.flat.params.copy_(self.up.eval_params())
        validate_last(self.task, self.flat, log, self.run_dir, up.step, self.version)
        return finish(log, self.run_dir, stopped_because=stopped_because, wall_s=wall,
                      extra=final_test(self.task, self.flat, self.run_dir))

    def _loop(self, pending: list, schedule: ValidationSchedule, book: UpdateBook, bar: Progress) -> str:
        """Serve arrivals until the run must stop; returns why."""
        c, up, log = self.config, self.up, self.log
        stopped_because = ""
        while not stopped_because:
            i = self.next_worker()
            grad, tokens, loss_sum = self.compute(i)
            pending.append((grad, self.vws[i].pulled, tokens, loss_sum, i))
            if len(pending) < c.G:
                if not self.sync:  # its gradient is in the accumulation: it pulls and goes on
                    self.pull_if_due(i)
                    self.begin(i, self.clock)
                continue
            staleness = [self.version - p[1] for p in pending]
            res = up.apply([p[0] for p in pending], staleness, out=self.published)
            if res.publish:
                self.version += 1
            used = Applied(staleness, [p[2] for p in pending], [p[3] for p in pending], [p[4] for p in pending])
            pending = []
            # sync: the barrier, everyone pulls the new version (if due) and starts together
            for j in (range(c.workers) if self.sync else [i]):
                self.pull_if_due(j)
                self.begin(j, self.clock)
            stopped_because = book.after_update(res, self.version, used, extra={"vtime": round(self.clock, 4)})
            if schedule.due(up.step, log.tokens):
                self.validate()
                stopped_because = stopped_because or (StopReason.PATIENCE if log.out_of_patience else "")
            if c.max_epochs and any(self.task.passes_done(j, c.workers, w.cursor, c.max_epochs)
                                    for j, w in enumerate(self.vws)):
                stopped_because = stopped_because or StopReason.MAX_EPOCHS
            if c.max_time and log.elapsed >= c.max_time:
                stopped_because = stopped_because or StopReason.MAX_TIME
            bar.update(up.step, log.postfix())
        return stopped_because


def simulate(config: TrainConfig, run_dir: str, task, resume: dict | None = None) -> dict[str, Any]:
    return Simulation(config, run_dir, task, resume).run()
