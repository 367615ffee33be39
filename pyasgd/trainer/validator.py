"""The validator process (`pyasgd-validator`): validation off the workers' cores. The launcher
pulls a consistent snapshot of the published parameters into a shared tensor and asks; this
process, at a lower CPU priority (nice) and on one thread (on a CUDA device: the GPU, decoding in
batches), evaluates it and sends the metrics back on the run's record queue. One request is in
flight at a time, so the snapshot stays put until its answer arrives (the launcher keeps it as
best.pt when it is the best). It ignores SIGINT/SIGTERM and dies with the launcher, as the
server and the workers do."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from pyasgd.config import TrainConfig
from pyasgd.trainer.proc import become_child, run_reporting

NICE = 10  # lower priority than the workers: validation takes only the cycles they leave


@dataclass
class ValidatorArgs:
    config: TrainConfig
    snapshot: torch.Tensor   # shared memory: the parameters to evaluate
    requests: object         # mp.Queue: {"id": int} per snapshot, None to stop
    queue: object            # mp.Queue of records to the launcher
    device: str = "cpu"


def validator_main(args: ValidatorArgs) -> None:
    become_child("pyasgd-valid")
    try:
        os.nice(NICE)
    except OSError:
        pass  # a convenience: a validator at normal priority still works
    run_reporting(args.queue, "validator", _serve, args)


def _serve(args: ValidatorArgs) -> None:
    from pyasgd.core.flat import FlatModel
    from pyasgd.tasks import make_task

    torch.set_num_threads(1)
    task = make_task(args.config)
    device = torch.device(args.device)
    flat = FlatModel(task.build_model().to(device))
    args.queue.put({"kind": "validator_ready"})
    while True:
        req = args.requests.get()
        if req is None:
            return
        t = time.monotonic()
        flat.params.copy_(args.snapshot)
        model = flat.model
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model)
        args.queue.put({"kind": "valid_result", "id": req["id"], "metrics": metrics,
                        "seconds": time.monotonic() - t})
