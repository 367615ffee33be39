"""What every run does, whoever drives it (the launcher's real processes or the simulator's
virtual workers): announce the run, compute a worker's locally accumulated gradient, schedule and
run validations on a snapshot of the published parameters, test the best parameters at the end,
and write the summary."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Iterator

import torch

from pyasgd.core import checkpoint
from pyasgd.trainer import rundir
from pyasgd.core.flat import FlatModel
from pyasgd.trainer.runlog import RunLog

LOG = logging.getLogger("pyasgd")


def start_run(task, run_dir: str) -> None:
    """Say what is being trained, and keep what the run directory needs to stand alone."""
    line = task.describe()
    if line:
        LOG.info(line)
    for name, path in task.artifacts().items():
        shutil.copyfile(path, os.path.join(run_dir, name))


def local_gradient(task, flat: FlatModel, data: Iterator, k: int, device: torch.device | None = None,
                   amp: str = "none"):
    """Sum the gradients of a worker's next k batches into flat.grads (local accumulation).
    With amp="bf16" the forward pass runs under bf16 autocast (and so its backward); parameters
    and their gradients stay fp32. Returns (target tokens, summed loss, cursor of the next batch)."""
    flat.zero_grad()
    tokens, loss_sum, cursor = 0, 0.0, None
    device_type = (device or flat.params.device).type
    for _ in range(k):
        batch, cursor = next(data)
        if device is not None:
            batch = task.batch_to(batch, device)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, n = task.loss(flat.model, batch)
        loss.backward()
        tokens += n
        loss_sum += loss.item()
    return tokens, loss_sum, cursor


class ValidationSchedule:
    """When to validate: every --valid-every server updates when it is set, else every
    --valid-every-tokens target tokens trained on (the fair default: every method is validated
    at the same training progress, whatever its G or k); neither = only at the end."""

    def __init__(self, config, updates: int = 0, tokens: int = 0) -> None:
        self.by_updates = config.valid_every > 0
        self.every = config.valid_every if self.by_updates else config.valid_every_tokens
        self.next = self._after(updates if self.by_updates else tokens)

    def _after(self, x: int) -> int | None:
        return (x // self.every + 1) * self.every if self.every else None

    def due(self, updates: int, tokens: int) -> bool:
        """True (once) when the run has reached the next validation point."""
        x = updates if self.by_updates else tokens
        if self.next is None or x < self.next:
            return False
        self.next = self._after(x)
        return True


def validate(task, flat: FlatModel, log: RunLog, run_dir: str, update: int, version: int | None = None) -> None:
    """Evaluate the parameters in flat.params (a consistent snapshot, taken just before the
    call), log it with the run's progress at the snapshot, and keep the best parameters in
    best.pt."""
    model = flat.model
    at = log.snapshot()  # the progress and clocks at the snapshot, not after decoding
    log.validation_started()
    model.eval()
    try:
        metrics = task.evaluate(model)
    finally:
        model.train()
        log.validation_ended()
    if version is not None:
        metrics["version"] = version
    log.valid_s += log.elapsed - at["time"]
    if log.on_valid(update, metrics, at):
        checkpoint.save_atomic({"params": flat.params.clone(), "update": update}, os.path.join(run_dir, rundir.BEST))


def validate_last(task, flat: FlatModel, log: RunLog, run_dir: str, update: int, version: int | None) -> None:
    """Validate the final parameters unless the last validation already saw them."""
    if not log.valid or log.valid[-1]["update"] != update:
        LOG.info(f"validating the final parameters (update {update:,})")
        validate(task, flat, log, run_dir, update, version)


def final_test(task, flat: FlatModel, run_dir: str) -> dict[str, Any]:
    """The task's test fields for the best validated parameters (else the last ones); nothing
    with --no-test."""
    if not task.config.test:
        LOG.info("no final test (--no-test)")
        return {}
    best = os.path.join(run_dir, rundir.BEST)
    if os.path.exists(best):
        saved = checkpoint.load(best)
        flat.params.copy_(saved["params"])
        LOG.debug(f"the test uses the best parameters, of update {int(saved.get('update', 0)):,}")
    return task.final_test(flat.model, run_dir)


def finish(log: RunLog, run_dir: str, *, stopped_because: str, wall_s: float,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write summary.json (atomically, last: only a run that ended has one) and return it."""
    summary = log.summary(stopped_because=stopped_because, wall_s=wall_s, extra=extra)
    rundir.write_json(os.path.join(run_dir, rundir.SUMMARY), summary)
    return summary
