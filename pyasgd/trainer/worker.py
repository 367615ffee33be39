"""A worker process: its own model replica and data shard; computes gradients on the parameters
it last pulled, optionally sums k local batches, pushes, and pulls again every U server updates.
In sync mode it waits after each push until the server has used it (the barrier)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pyasgd import testing
from pyasgd.core import ext as _ext
from pyasgd.config import TrainConfig
from pyasgd.trainer.proc import become_child, run_reporting
from pyasgd.trainer.steps import local_gradient


@dataclass
class WorkerArgs:
    rank: int
    config: TrainConfig
    topology: Any         # pyasgd.trainer.topology.OneNode or a multi-node topology
    region: str
    cursors: object       # mp.Array of N int64: each worker's last pushed position (Cursor.pack)
    stop: object          # mp.Event
    queue: object         # mp.Queue of records to the launcher
    go: object = None     # mp.Event: set by the launcher once every worker is ready


def worker_main(args: WorkerArgs) -> None:
    become_child(worker_name(args.rank))
    config = args.config
    threads = config.worker_threads()
    _ext.set_cpu_threads(threads)  # the push's copy runs on the kernels' pool
    torch.set_num_threads(threads)
    run_reporting(args.queue, f"worker {args.rank}", _work, args, config, worker=args.rank)


def worker_name(rank: int) -> str:
    """The process name of worker `rank`: at most the 15 characters a process name keeps."""
    name = f"pyasgd-worker-{rank}"
    return name if len(name) <= 15 else f"pyasgd-w{rank}"


def _work(args: WorkerArgs, config: TrainConfig) -> None:
    from pyasgd.core.region import RegionClosedError, SharedRegion
    from pyasgd.core.flat import FlatModel
    from pyasgd.tasks import Cursor, make_task

    rank, q = args.rank, args.queue
    device = torch.device(config.worker_devices()[rank])
    task = make_task(config)
    model = task.build_model().to(device)
    flat = FlatModel(model)
    region = SharedRegion.attach(args.region, pin=device.type == "cuda")
    cursor = Cursor.unpack(args.cursors[rank])
    # Worker randomness (dropout, ...) follows the seed, the rank and the data position, so a
    # resumed run reseeds deterministically (the simulator saves the RNG state itself).
    # Across nodes the data shards and seeds follow the global rank R x N + rank of M x N workers,
    # so M nodes of N workers see the batches one node of M x N workers would.
    global_rank = config.global_rank(rank)
    torch.manual_seed(config.seed * 1_000_003 + global_rank * 10_007 + cursor.epoch * 101 + cursor.index)
    data = task.batches(global_rank, config.total_workers, cursor)
    sync, U, k = config.mode == "sync", args.topology.pull_every(), config.local_accum
    compute_s = wait_s = 0.0
    slowdown = config.slowdowns().get(rank, 1.0)  # a slower accelerator, emulated by sleeping
    fault_after = testing.worker_fault(rank)
    pushes, last_report = 0, time.monotonic()
    try:
        q.put({"kind": "ready", "worker": rank})
        while args.go is not None and not args.go.wait(0.5):  # start together: fair timing
            if args.stop.is_set():
                return
        t = time.monotonic()
        pulled = region.pull(flat.params)  # the version our gradients are computed from
        round_version = pulled
        wait_s += time.monotonic() - t
        while not args.stop.is_set():
            t = time.monotonic()
            tokens, loss_sum, cursor = local_gradient(task, flat, data, k, device, config.amp)
            if slowdown > 1.0:
                time.sleep((slowdown - 1.0) * (time.monotonic() - t))
            t2 = time.monotonic()
            compute_s += t2 - t
            region.push(flat.grads, version=pulled, tokens=tokens, worker=rank, loss=loss_sum,
                        position=cursor.pack(), timeout=config.timeout)
            args.cursors[rank] = cursor.pack()  # a replacement goes on from here
            pushes += 1
            if pushes == fault_after:
                raise testing.worker_fault_error(rank, pushes)
            if sync:  # the barrier: our gradient is in the update everyone computes from next
                round_version = barrier(region, round_version, args)
            else:  # parameter-server order: push, the server takes it, then pull
                region.wait_processed(timeout=config.timeout)
            if region.version - pulled >= U:
                pulled = region.pull(flat.params)
            wait_s += time.monotonic() - t2
            if config.max_epochs and task.passes_done(global_rank, config.total_workers, cursor, config.max_epochs):
                q.put({"kind": "worker_done", "worker": rank, "epoch": cursor.epoch})
                break
            if time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                q.put({"kind": "progress", "worker": rank, "epoch": cursor.epoch, "pushes": pushes,
                       "compute_s": round(compute_s, 3), "wait_s": round(wait_s, 3)})
    except RegionClosedError:
        pass  # the launcher is shutting the run down
    finally:
        q.put({"kind": "progress", "worker": rank, "epoch": cursor.epoch, "pushes": pushes,
               "compute_s": round(compute_s, 3), "wait_s": round(wait_s, 3), "final": True})
        region.close()


def barrier(region, version: int, args) -> int:
    """Wait for the version after `version` (the synchronous barrier), for --timeout, or across
    nodes for as long as the run goes on (the slowest node sets the pace; the launcher's stop
    closes the region, which wakes us)."""
    from pyasgd.core.region import RegionTimeoutError

    limit = args.topology.barrier_timeout
    while True:
        try:
            return region.wait_version(version, timeout=limit if limit is not None else 5.0)
        except RegionTimeoutError:
            if limit is not None:
                raise
