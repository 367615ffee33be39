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
from pyasgd.metrics import RunLog
from pyasgd.server import Updater, update_record
from pyasgd.tasks import Cursor, make_task


@dataclass
class VirtualWorker:
    params: torch.Tensor  # what it last pulled
    pulled: int           # the version of those parameters
    cursor: Cursor
    next_time: float = 0.0


def simulate(config: TrainConfig, run_dir: str, task=None) -> dict[str, Any]:
    from pyasgd.launcher import final_test, start_run, validate  # shared with the real launcher

    c = config
    N, G, k, U = c.workers, c.G, c.local_accum, c.pull_every
    sync = c.mode == "sync"
    torch.manual_seed(c.seed)
    task = task or make_task(c)
    flat = FlatModel(task.build_model())
    log = RunLog(run_dir, c, task)
    start_run(task, run_dir, c.quiet)
    up = Updater(c, flat.params)
    published = up.master.clone()
    version = 0
    order = torch.Generator().manual_seed(c.seed * 31 + 7)
    vws = [VirtualWorker(published.clone(), 0, Cursor()) for _ in range(N)]
    rr = 0  # next worker in round-robin order
    ckpt_path = os.path.join(run_dir, rundir.CHECKPOINT)

    def draw_time() -> float:
        return max(0.05, 1.0 + c.sim_time_std * float(torch.randn(1, generator=order)))

    if c.resume:
        st = checkpoint.load(ckpt_path)
        up.load_state_dict(st["server"])
        sim = st["sim"]
        published.copy_(sim["published"])
        version, rr = int(sim["version"]), int(sim["rr"])
        for i, w in enumerate(vws):
            w.params.copy_(sim["params"][i])
            w.pulled = int(sim["pulled"][i])
            w.cursor = Cursor(int(sim["cursors"][i][0]), int(sim["cursors"][i][1]))
            w.next_time = float(sim["next_time"][i])
        order.set_state(sim["order_rng"])
        torch.set_rng_state(sim["torch_rng"])
        log.updates = up.step
    elif c.sim_order == "normal":
        for w in vws:
            w.next_time = draw_time()
    data = [task.batches(i, N, vws[i].cursor) for i in range(N)]

    def save() -> None:
        checkpoint.save_atomic({"server": up.state_dict(), "sim": {
            "published": published, "version": version, "rr": rr,
            "params": torch.stack([w.params for w in vws]),
            "pulled": torch.tensor([w.pulled for w in vws]),
            "cursors": torch.tensor([[w.cursor.epoch, w.cursor.index] for w in vws]),
            "next_time": torch.tensor([w.next_time for w in vws], dtype=torch.float64),
            "order_rng": order.get_state(), "torch_rng": torch.get_rng_state()}}, ckpt_path)

    def compute(i: int) -> tuple[torch.Tensor, int, float]:
        """Worker i's (summed over k batches) gradient on the parameters it last pulled."""
        w = vws[i]
        flat.params.copy_(w.params)
        flat.zero_grad()
        tokens, loss_sum = 0, 0.0
        for _ in range(k):
            batch, w.cursor = next(data[i])
            loss, n = task.loss(flat.model, batch)
            loss.backward()
            tokens += n
            loss_sum += loss.item()
        return flat.grads.clone(), tokens, loss_sum

    def next_worker() -> int:
        nonlocal rr
        if c.sim_order == "round-robin" or sync:
            i, rr = rr, (rr + 1) % N
            return i
        i = min(range(N), key=lambda j: (vws[j].next_time, j))
        vws[i].next_time += draw_time()
        return i

    def pull_if_due(i: int) -> None:
        w = vws[i]
        if version - w.pulled >= U:
            w.params.copy_(published)
            w.pulled = version

    start, t0 = time.monotonic(), time.monotonic()
    pending: list[tuple[torch.Tensor, int, int, float, int]] = []  # grad, version, tokens, loss, worker
    next_valid = (up.step // c.valid_every + 1) * c.valid_every if c.valid_every else None
    stopped_because = ""
    while not stopped_because:
        i = next_worker()
        grad, tokens, loss_sum = compute(i)
        pending.append((grad, vws[i].pulled, tokens, loss_sum, i))
        if len(pending) == G:
            staleness = [version - p[1] for p in pending]
            res = up.apply([p[0] for p in pending], staleness, out=published)
            if res.applied or sync:
                version += 1  # sync: the barrier releases the workers even after a skipped step
            log.on_update(update_record(up.step, version, res, staleness, [p[2] for p in pending],
                                        [p[3] for p in pending], [p[4] for p in pending], t0))
            pending = []
            if sync:
                for j in range(N):
                    pull_if_due(j)
            if res.applied:
                if c.save_every and up.step % c.save_every == 0:
                    save()
                if next_valid is not None and up.step >= next_valid:
                    flat.params.copy_(published)
                    validate(task, flat, log, run_dir, up.step, version)
                    next_valid = (up.step // c.valid_every + 1) * c.valid_every
                    stopped_because = "patience" if log.out_of_patience else ""
                if c.max_updates and up.step >= c.max_updates:
                    stopped_because = "max_updates"
            if c.max_epochs and any(w.cursor.epoch >= c.max_epochs for w in vws):
                stopped_because = stopped_because or "max_epochs"
            if c.max_time and time.monotonic() - start >= c.max_time:
                stopped_because = stopped_because or "max_time"
        if not sync:
            pull_if_due(i)
    save()
    wall = time.monotonic() - start
    if not log.valid or log.valid[-1]["update"] != up.step:
        flat.params.copy_(published)
        validate(task, flat, log, run_dir, up.step, version)
    summary = log.summary(stopped_because=stopped_because, wall_s=wall, extra=final_test(task, flat, run_dir))
    rundir.write_json(os.path.join(run_dir, "summary.json"), summary)
    log.close()
    return summary
