"""The launcher's validation service: at each validation point, a consistent snapshot of the
published parameters goes to the validator process (pyasgd-valid, at a lower CPU priority, so
the workers keep their cores) without pausing anyone; its answer is logged and, when best, kept
as best.pt. Without the process (--no-valid-process) the launcher validates in line."""
from __future__ import annotations

import os
from typing import Any

import torch

from pyasgd.core import checkpoint
from pyasgd.trainer import rundir
from pyasgd.trainer.runlog import RunLog
from pyasgd.trainer.steps import validate


class ValidationService:
    def __init__(self, config, ctx, task, flat, log: RunLog, run_dir: str, eval_device: torch.device,
                 records) -> None:
        self.config, self.ctx, self.task, self.flat, self.log, self.run_dir = config, ctx, task, flat, log, run_dir
        self.eval_device, self.records = eval_device, records  # records: the queue answers come back on
        self.process = None        # the pyasgd-valid process, its request queue and shared snapshot
        self.requests = None
        self.snapshot: torch.Tensor | None = None
        self.ready = False
        self.wanted = False        # a validation point has passed and is not yet served
        self.inflight: dict[str, Any] | None = None  # the validation the validator is working on

    def start(self) -> None:
        """Start the validator process (validation points are then served by it)."""
        from pyasgd.trainer.validator import ValidatorArgs, validator_main

        self.snapshot = torch.empty(self.flat.n).share_memory_()
        self.requests = self.ctx.Queue()
        self.process = self.ctx.Process(target=validator_main, name="validator", daemon=True, args=(
            ValidatorArgs(config=self.config, snapshot=self.snapshot, requests=self.requests,
                          queue=self.records, device=str(self.eval_device)),))
        self.process.start()

    def serve(self, due: bool, region) -> str:
        """Called on every turn of the launcher's loop: start or run a validation when one is due;
        returns "patience" when the run must stop."""
        self.wanted = due or self.wanted
        if not self.wanted:
            return ""
        if self.process is None:  # in line
            validate(self.task, self.flat, self.log, self.run_dir, self.log.updates, region.pull(self.flat.params))
            self.wanted = False
            return "patience" if self.log.out_of_patience else ""
        if self.ready and self.inflight is None:
            self._request(region)
        return ""

    def _request(self, region) -> None:
        """Hand the validator a consistent snapshot of the published parameters, taken now."""
        log = self.log
        version = region.pull(self.snapshot)
        self.inflight = {"id": len(log.valid), "update": log.updates, "version": version, "at": log.snapshot()}
        log.validation_started()
        self.requests.put({"id": self.inflight["id"]})
        self.wanted = False

    def done(self, r: dict) -> str:
        """Log the validator's answer; keep the snapshot as best.pt when it is the best."""
        v, log = self.inflight, self.log
        self.inflight = None
        if v is None or r["id"] != v["id"]:
            return ""
        log.validation_ended()
        log.valid_s += r["seconds"]
        metrics = {**r["metrics"], "version": v["version"]}
        if log.on_valid(v["update"], metrics, v["at"]):
            checkpoint.save_atomic({"params": self.snapshot.clone(), "update": v["update"]},
                                   os.path.join(self.run_dir, rundir.BEST))
        return "patience" if log.out_of_patience else ""

    def died(self) -> str:
        """What happened to the validator process, if it died."""
        if self.process is not None and self.process.exitcode not in (None, 0):
            return f"the validator process died ({exit_text(self.process.exitcode)})"
        return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.inflight is not None:
            self.process.kill()  # its answer is no longer wanted: do not wait for its decoding
        else:
            self.requests.put(None)

    def processes(self) -> list:
        return [self.process] if self.process is not None else []

    def close(self) -> None:
        if self.requests is not None:  # release its semaphores now, not at interpreter exit
            self.requests.close()
            self.requests.join_thread()
            self.process = self.requests = None


def exit_text(code: int) -> str:
    """How a process ended, from its exit code."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
