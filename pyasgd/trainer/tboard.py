"""`--tensorboard`: a RunLog sink that writes the records of metrics.jsonl as TensorBoard events to
RUN_DIR/tb, with the server update as the step (tensorboard --logdir RUN_DIR/tb, or the runs'
parent directory to compare runs). Needs the extra: pip install 'pyasgd[tensorboard]'.

Tags: train/loss (per target token), train/lr, train/staleness (the mean over an update's
gradients), train/wps (target tokens per wall second over the last WPS_WINDOW updates; also
train/virtual_wps in the simulator's clock), train/staleness_hist (a histogram of the gradients
since the previous one, written at each validation and at the end), and dev/<metric> for each
metric of a validation (dev/bleu, dev/chrf, dev/loss for translation). A resumed run drops the
events after its checkpoint's update (SummaryWriter's purge_step), as metrics.jsonl drops those
records."""
from __future__ import annotations

import os
from collections import deque
from typing import Any

from pyasgd.errors import MissingExtra
from pyasgd.trainer import rundir

MISSING = "--tensorboard: needs the tensorboard package: pip install 'pyasgd[tensorboard]'"
WPS_WINDOW = 50  # updates in the words/s window
# The fields of a valid record that say when it was taken, not how good the parameters were.
_VALID_CLOCKS = frozenset({"kind", "update", "version", "time", "train_time", "vtime", "gradients", "tokens", "epoch"})


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtra(MISSING) from None
    return SummaryWriter


def check(config) -> None:
    """At launch, before the run directory is made: --tensorboard needs its package."""
    if config.tensorboard:
        _summary_writer()


def attach(log, config, run_dir: str) -> None:
    """Feed `log`'s records to TensorBoard when --tensorboard is set."""
    if config.tensorboard:
        log.sinks.append(TensorBoardSink(os.path.join(run_dir, rundir.TENSORBOARD), log, resumed=bool(config.resume)))


class TensorBoardSink:
    """Called with every record RunLog writes. The writer is made at the first record, when a
    resumed log already knows its checkpoint's update (RunLog.resume_from): the events of a step
    after it, written before the resume, are purged."""

    def __init__(self, log_dir: str, log, *, resumed: bool = False) -> None:
        self.log_dir, self.log, self.resumed = log_dir, log, resumed
        self.writer = None
        self.window: deque[tuple[int, float, float | None]] = deque(maxlen=WPS_WINDOW + 1)  # tokens, time, vtime
        self.staleness: list[int] = []  # the gradients' staleness since the last histogram

    def __call__(self, r: dict[str, Any]) -> None:
        kind = r.get("kind")
        if kind == "update":
            self._update(r)
        elif kind == "valid":
            self._valid(r)
        elif kind == "checkpoint" and self.writer is not None:
            self.writer.flush()

    def _open(self):
        if self.writer is None:
            purge = self.log.updates + 1 if self.resumed else None
            self.writer = _summary_writer()(self.log_dir, purge_step=purge, flush_secs=30)
        return self.writer

    def _update(self, r: dict[str, Any]) -> None:
        w, step = self._open(), r["update"]
        w.add_scalar("train/loss", r["loss"], step)
        if r.get("lr") is not None:
            w.add_scalar("train/lr", r["lr"], step)
        if r["staleness"]:
            w.add_scalar("train/staleness", sum(r["staleness"]) / len(r["staleness"]), step)
            self.staleness += r["staleness"]
        self.window.append((r["tokens"], r["time"], r.get("vtime")))
        if len(self.window) > 1:
            (_, t0, v0), (_, t1, v1) = self.window[0], self.window[-1]
            tokens = sum(n for n, _, _ in list(self.window)[1:])
            if t1 > t0:
                w.add_scalar("train/wps", tokens / (t1 - t0), step)
            if v0 is not None and v1 is not None and v1 > v0:
                w.add_scalar("train/virtual_wps", tokens / (v1 - v0), step)

    def _valid(self, r: dict[str, Any]) -> None:
        w, step = self._open(), r["update"]
        for key, value in r.items():
            if key not in _VALID_CLOCKS and isinstance(value, (int, float)) and not isinstance(value, bool):
                w.add_scalar(f"dev/{key}", value, step)
        self._histogram(step)
        w.flush()  # a validation is worth seeing at once

    def _histogram(self, step: int) -> None:
        if self.staleness:
            import numpy as np

            values = np.asarray(self.staleness)
            # one bin per staleness value, centred on it
            self.writer.add_histogram("train/staleness_hist", values, step, bins=np.arange(-0.5, values.max() + 1.5))
            self.staleness = []

    def close(self) -> None:
        if self.writer is not None:
            self._histogram(self.log.updates)
            self.writer.close()
            self.writer = None
