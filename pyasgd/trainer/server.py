"""The server process: attach the region, hold the `Updater` (pyasgd/trainer/update.py) and
the run's positions and progress, run the topology's loop (one node: `serve_one_node` below;
across nodes: pyasgd/nodes/), then write the last checkpoint and say why it stopped."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pyasgd import testing
from pyasgd.config import TrainConfig
from pyasgd.core import ext as _ext
from pyasgd.trainer.proc import become_child, parent_gone, run_reporting
from pyasgd.trainer.stops import StopReason, StopRequest
from pyasgd.trainer.update import Applied, UpdateBook, Updater


@dataclass
class ServerArgs:
    config: TrainConfig
    topology: Any                # a pyasgd.trainer.topology.OneNode (or a multi-node topology)
    region: str
    checkpoint_path: str
    resume_state: str = ""       # path of a checkpoint to start from
    cursors: object = None       # mp.Array of N int64: where each worker started (Cursor.pack)
    stop: object = None          # mp.Event
    queue: object = None         # mp.Queue of records to the launcher
    stop_request: object = None  # mp.Value holding a StopRequest: why the launcher set `stop`
    eval_region: str = ""        # with --predict or --ema: where the evaluated parameters are published
    activity: object = None      # across nodes: mp.Array of the server's activity (pyasgd.nodes.rendezvous.TAKEN...)


def server_main(args: ServerArgs) -> None:
    """The server process: collect G gradients, update, publish, until told to stop."""
    become_child("pyasgd-server", on_parent_death="flag")
    run_reporting(args.queue, "server", _serve, args)


@dataclass
class Server:
    """One server's state, handed whole to the topology's loop: the region, the Updater of the
    parameters it owns ([lo, hi) of the region), each worker's data position, the progress
    counters, the bookkeeping after each update, and the counts a topology keeps in the
    checkpoint (`counts`)."""
    args: ServerArgs
    region: Any
    up: Updater
    lo: int
    hi: int
    in_region: bool               # a CPU server: its parameters are the region's front buffer
    book: UpdateBook = field(init=False)
    counts: dict = field(default_factory=dict)
    resumed: dict = field(default_factory=dict)
    eval_region: Any = None       # --predict / --ema: the launcher validates what is published here

    @property
    def config(self) -> TrainConfig:
        return self.args.config

    def current(self) -> torch.Tensor | None:
        """The published parameters this server owns (None for a server with a master copy)."""
        return self.region.front()[self.lo:self.hi] if self.in_region else None

    def stop_asked(self) -> StopRequest:
        """NONE while the launcher lets the run go on."""
        if not self.args.stop.is_set():
            return StopRequest.NONE
        req = self.args.stop_request
        return StopRequest(req.value) if req is not None and req.value else StopRequest.STOP

    def save(self) -> None:
        from pyasgd.core import checkpoint

        state = {"server": self.up.state_dict(current=self.current()), "version": self.region.version,
                 "positions": torch.tensor(self.book.positions, dtype=torch.int64),
                 "progress": dict(self.book.progress), "config": repr(self.config),
                 **self.args.topology.checkpoint_extra(self)}
        checkpoint.save_atomic(state, self.args.checkpoint_path)
        self.args.queue.put({"kind": "checkpoint", "update": self.up.step, "path": self.args.checkpoint_path})

    def save_after(self, error: BaseException) -> None:
        """The checkpoint after a failure across nodes; a save that fails too (a broken CUDA context,
        a full disk) must not hide the error that stopped the server (the caller re-raises it)."""
        try:
            self.save()
        except Exception as e2:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            print(f"pyasgd-server: saving the checkpoint after '{first}' failed too: {e2}", file=sys.stderr)

    def publish_eval(self) -> None:
        """Publish what validation evaluates (the master, or its average) into the eval region:
        with --predict the workers' region holds extrapolated parameters, with --ema not the average."""
        if self.eval_region is None:
            return
        from pyasgd.core.region import publish_slice

        params = self.up.eval_params(self.current())

        def write(front, back):
            back.copy_(params)
            return True

        publish_slice(self.eval_region, self.lo, self.hi, write)

    def pulled(self) -> torch.Tensor:
        """A consistent copy of the whole published vector."""
        t = torch.empty(self.region.n)
        self.region.pull(t)
        return t


def _serve(args: ServerArgs) -> None:
    from pyasgd.core.region import SharedRegion

    config, topology = args.config, args.topology
    # The fused update is memory-bound: two threads saturate a socket's bandwidth, and where the
    # workers already take every core, one thread keeps the server from stealing theirs.
    _ext.set_cpu_threads(1 if config.workers >= (os.cpu_count() or 1) else 2)
    torch.set_num_threads(1)
    region = SharedRegion.attach(args.region, pin=config.server_device.startswith("cuda"))
    segment, server = region.path, None
    try:
        # A CPU server's parameters are the published ones (the front buffer, read in place); a
        # CUDA server keeps a master copy on its GPU, starting from what the launcher published,
        # and so does a server that publishes predicted parameters (--predict).
        in_region = config.server_device == "cpu" and config.predict_s() == 0
        lo, hi = topology.shard(region.n)
        if in_region:
            up = Updater(config, region.front()[lo:hi], keep_master=False)
        else:
            init = torch.empty(region.n)
            region.pull(init)
            up = Updater(config, init[lo:hi], config.server_device)
        server = Server(args, region, up, lo, hi, in_region)
        if args.eval_region:
            server.eval_region = SharedRegion.attach(args.eval_region, pin=config.server_device.startswith("cuda"))
        if args.resume_state:
            from pyasgd.core import checkpoint

            server.resumed = checkpoint.load(args.resume_state)
            topology.check_resume(server.resumed)
            up.load_state_dict(server.resumed["server"], current=server.current())
            up.republished(server.pulled()[lo:hi] if up.history is not None else None)
        # The run's progress counters, kept in the checkpoint so a resumed run's token-scheduled
        # validations and epochs go on (the launcher's RunLog counts the same from the records).
        progress = {"tokens": 0, "gradients": 0, "vtime": None, "elapsed": 0.0, "valid_s": 0.0}
        progress.update(server.resumed.get("progress") or {})
        positions = list(args.cursors[:]) if args.cursors is not None else [0] * config.workers
        server.book = UpdateBook(config, up, sink=args.queue.put, save=server.save, t0=time.monotonic(),
                                 positions=positions, progress=progress, fault_at=testing.server_fault_step(),
                                 pause_at=testing.server_pause(),
                                 on_publish=server.publish_eval)
        reason, extra = topology.serve(server)
        server.save()
        args.queue.put({"kind": "server_done", "reason": str(reason), "update": up.step, "dropped": up.dropped,
                        "skipped": up.skipped, **extra})
    finally:
        segments = [segment]
        try:
            region.close()
        finally:
            if server is not None and server.eval_region is not None:
                segments.append(server.eval_region.path)
                server.eval_region.close()
        if parent_gone():
            args.queue.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it
            for path in segments:
                try:  # its owner is dead: remove the segment now (attached processes keep their mapping)
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def collect_one(server: Server, idle_since: float):
    """One gradient from the region (taken into the accumulation), None after 0.25 s without one,
    or RegionClosedError; raises when there has been none for --timeout."""
    from pyasgd.core.region import RegionTimeoutError

    timeout = server.config.timeout
    try:
        return server.region.collect(1, timeout=0.25)
    except RegionTimeoutError:
        if time.monotonic() - idle_since > timeout:
            raise RuntimeError(f"no gradients from the workers for {timeout:.0f} s (--timeout)") from None
        return None


def serve_one_node(server: Server) -> StopReason:
    """Collect G gradients, update, publish, until told to stop; returns why it stopped."""
    from pyasgd.core.region import GradientBatch, RegionClosedError

    region, up, G = server.region, server.up, server.config.G
    idle_since = time.monotonic()
    # Gradients are taken one at a time (so each pusher learns at once that its gradient is in
    # the accumulation) and summed G at a time by the fused kernel straight from their slots.
    held = []  # gradients taken into the accumulation, one at a time in arrival order
    while server.stop_asked() == StopRequest.NONE:
        if parent_gone():  # the launcher was killed outright: save, and leave nothing behind
            return StopReason.LAUNCHER_DIED
        try:
            taken = collect_one(server, idle_since)
        except RegionClosedError:
            break
        if taken is None:
            continue
        idle_since = time.monotonic()
        held.append(taken)
        if len(held) < G:
            region.ack(taken)  # accumulated: its pusher may pull and go on
            continue
        batch, held = GradientBatch.merge(held), []
        front = server.current()  # read before begin_update: the front stays the front until published
        back, res = region.begin_update(), None
        try:
            res = up.apply(batch.grads, batch.staleness, out=back, bounds=batch.bounds, current=front)
        finally:  # publish (or not), then release (ack) every slot of the batch
            region.end_update(batch, publish=res is not None and res.publish)
        used = Applied(batch.staleness, batch.tokens, batch.losses, batch.workers, batch.positions)
        if server.book.after_update(res, region.version, used):
            return StopReason.MAX_UPDATES
    return StopReason.STOPPED
