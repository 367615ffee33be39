"""The launcher: `pyasgd.train(config)` starts one server and N workers (torch.multiprocessing,
spawn), watches them, validates on consistent snapshots of the published parameters without
pausing anyone, and on any ending (done, failure, Ctrl-C) stops every process and removes the
shared region. `--simulate` runs the same loop's pieces (pyasgd/trainer/steps.py) in one process."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from pyasgd.core import checkpoint
from pyasgd.trainer import rundir
from pyasgd.config import TrainConfig
from pyasgd.errors import Terminated
from pyasgd.core.flat import FlatModel
from pyasgd.trainer.steps import ValidationSchedule, final_test, finish, start_run, validate, validate_last
from pyasgd.trainer.runlog import RunLog


class TrainingError(RuntimeError):
    """A process of the run failed; the message names it and carries its traceback."""


def train(config: TrainConfig | dict) -> dict[str, Any]:
    """Train as `config` says; returns the summary (also written to <run dir>/summary.json)."""
    from pyasgd.tasks import make_task

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    task = make_task(config)  # reads and checks the data before anything is created
    if config.simulate:
        from pyasgd.trainer.simulate import simulate

        return simulate(config, rundir.prepare(config), task)
    if config.nnodes == 1:
        return Launcher(config, rundir.prepare(config), task).run()
    from pyasgd.nodes.rendezvous import Nodes

    nodes = Nodes.join(config)  # before anything is created: a bad rendezvous leaves nothing behind
    try:
        try:
            run_dir = rundir.prepare(config)
        except Exception as e:
            nodes.note("failed", f"its run directory: {e}")
            raise
        return Launcher(config, run_dir, task, nodes).run()
    finally:
        nodes.close()


class Launcher:
    """One real-process run: the server, the workers, the shared region between them, the queue
    their records come back on, and the run's log."""

    def __init__(self, config: TrainConfig, run_dir: str, task, nodes=None) -> None:
        self.config, self.run_dir, self.task = config, run_dir, task
        self.nodes = nodes  # pyasgd.nodes.rendezvous.Nodes when this is one node of several
        # Validation decodes where the run has a GPU (the server's, else the first worker's):
        # on one launcher CPU thread it would take longer than the training it checks.
        devices = [config.server_device, *config.worker_devices()]
        self.eval_device = torch.device(next((d for d in devices if d.startswith("cuda")), "cpu"))
        self.flat = FlatModel(task.build_model().to(self.eval_device))
        self.log = RunLog(run_dir, config, task)
        self.ckpt_path = os.path.join(run_dir, rundir.CHECKPOINT)
        ctx = self.ctx = mp.get_context("spawn")
        self.stop, self.go, self.queue = ctx.Event(), ctx.Event(), ctx.Queue()
        self.stop_code = ctx.Value("i", 0, lock=False)  # 2: the run failed (the server votes so across nodes)
        self.procs: list = []  # the server first, then the workers
        self.region = None
        self.ready = 0             # workers (and, across nodes, the server) that reported ready
        self.server_extra: dict = {}  # summary fields the server reports at its end
        self.server_done = False   # the server wrote its last checkpoint
        self.failure = ""          # what went wrong, with a traceback where there is one
        self.worker_errors: dict[int, str] = {}  # rank -> traceback it reported before dying
        self.last_checkpoint: int | None = None  # server update of the last checkpoint written
        self.validator = None      # the pyasgd-valid process, its request queue and shared snapshot
        self.valid_requests = None
        self.snapshot: torch.Tensor | None = None
        self.validator_ready = False
        self.valid_wanted = False  # a validation point has passed and is not yet served
        self.inflight: dict | None = None  # the validation the validator is working on
        self.start = time.monotonic()  # reset when every worker is ready

    def run(self) -> dict[str, Any]:
        from pyasgd.core.region import SharedRegion, default_slots

        c, task, flat, log = self.config, self.task, self.flat, self.log
        start_run(task, self.run_dir, c.quiet)
        # The workers own the cores: the launcher validates on one thread, so it does not fight
        # them (torch's idle OpenMP threads spin, which starves the workers on small machines).
        torch.set_num_threads(1)
        resume = checkpoint.load(self.ckpt_path) if c.resume else None
        if resume is not None:  # a shard's owner kept its view of every shard; its server reassembles them
            flat.params.copy_(resume["view"] if "view" in resume else resume["server"]["params"])
            log.updates = self.last_checkpoint = int(resume["server"]["step"])
            log.restore(resume.get("progress"), clocks=False)
        # Across nodes a server holds only its own node's N gradients of a round.
        local_G = c.workers if c.nnodes > 1 else c.G
        self.region = SharedRegion.create(flat.n, default_slots(c.workers, local_G), pin=self.eval_device.type == "cuda",
                                          grad_dtype=torch.bfloat16 if c.grad_dtype == "bf16" else torch.float32)
        stopped_because, extra, summary, train_end = "", {}, None, None
        pbar = self._progress_bar()
        previous_term = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops the run as Ctrl-C does
            previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            self.region.publish(flat.params)
            self._spawn(resume)
            schedule = ValidationSchedule(c, log.updates, log.tokens)
            if c.valid_process and schedule.every:
                self._spawn_validator()
            while not stopped_because:
                stopped_because = self._poll()
                if pbar is not None:
                    pbar.update(max(0, log.updates - pbar.n))
                    pbar.set_postfix(log.postfix(), refresh=False)
                if stopped_because:
                    break
                self.valid_wanted = schedule.due(log.updates, log.tokens) or self.valid_wanted
                if self.valid_wanted and self.validator is None:
                    validate(task, flat, log, self.run_dir, log.updates, self.region.pull(flat.params))
                    self.valid_wanted = False
                    if log.out_of_patience:
                        stopped_because = "patience"
                elif self.valid_wanted and self.validator_ready and self.inflight is None:
                    self._request_validation()
                stopped_because = self._check_health() or stopped_because
            self._stop(stopped_because)
            train_end = time.monotonic()  # wall_s and wps count training, not the final decoding
            torch.set_num_threads(os.cpu_count() or 1)  # the workers are gone: all cores
            if not self.failure:
                validate_last(task, flat, log, self.run_dir, log.updates, self.region.pull(flat.params))
                extra = final_test(task, flat, self.run_dir)
        except (KeyboardInterrupt, Terminated) as e:
            stopped_because = "terminated" if isinstance(e, Terminated) else "interrupted"
            if previous_term is not None:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
            self._stop(stopped_because)  # the server writes the last checkpoint
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if pbar is not None:
                pbar.close()
            self._reap()
            self.region.close()
            wall = (train_end or time.monotonic()) - self.start
            if stopped_because:
                because = f"failed: {self.failure.splitlines()[0]}" if self.failure else stopped_because
                summary = finish(log, self.run_dir, stopped_because=because, wall_s=wall,
                                 extra={**self.server_extra, **extra})
                if self.nodes is not None:  # node 0's summary.json is the global one
                    summary = self.nodes.gather(summary, wait=10.0 if self.failure else None)
                    if self.nodes.rank == 0:
                        rundir.write_json(os.path.join(self.run_dir, rundir.SUMMARY), summary)
            log.close()
        if self.failure:
            raise TrainingError(self.failure)
        return summary

    def _progress_bar(self):
        c = self.config
        if c.quiet:
            return None
        from tqdm import tqdm

        return tqdm(total=c.max_updates or None, initial=self.log.updates, unit="upd", file=sys.stderr,
                    dynamic_ncols=True, desc=f"{c.mode} N={c.workers} G={c.G} k={c.local_accum}")

    def _spawn(self, resume: dict | None) -> None:
        from pyasgd.trainer.server import ServerArgs, server_main

        c, ctx = self.config, self.ctx
        cursors = ctx.Array("q", c.workers, lock=False)  # each worker's data position (Cursor.pack)
        if resume is not None:
            cursors[:] = _resume_positions(resume, c.workers)
        self.common = dict(config=c, region=self.region.name, cursors=cursors, stop=self.stop, queue=self.queue)
        self.procs.append(ctx.Process(target=server_main, name="server", daemon=True, args=(ServerArgs(
            checkpoint_path=self.ckpt_path, resume_state=self.ckpt_path if resume is not None else "",
            stop_code=self.stop_code, **self.common),)))
        self.procs[0].start()
        for rank in range(c.workers):
            self.procs.append(self._start_worker(rank))

    def _spawn_validator(self) -> None:
        from pyasgd.trainer.validator import ValidatorArgs, validator_main

        self.snapshot = torch.empty(self.flat.n).share_memory_()
        self.valid_requests = self.ctx.Queue()
        self.validator = self.ctx.Process(target=validator_main, name="validator", daemon=True, args=(
            ValidatorArgs(config=self.config, snapshot=self.snapshot, requests=self.valid_requests,
                          queue=self.queue, device=str(self.eval_device)),))
        self.validator.start()

    def _request_validation(self) -> None:
        """Hand the validator a consistent snapshot of the published parameters, taken now."""
        log = self.log
        version = self.region.pull(self.snapshot)
        self.inflight = {"id": len(log.valid), "update": log.updates, "version": version, "at": log.snapshot()}
        log.validation_started()
        self.valid_requests.put({"id": self.inflight["id"]})
        self.valid_wanted = False

    def _validation_done(self, r: dict) -> str:
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

    def _start_worker(self, rank: int):
        """Worker `rank` (a first one or a replacement): it pulls the current parameters and goes
        on from the data position its rank last pushed."""
        from pyasgd.trainer.worker import WorkerArgs, worker_main

        p = self.ctx.Process(target=worker_main, name=f"worker {rank}", daemon=True,
                             args=(WorkerArgs(rank=rank, go=self.go, **self.common),))
        p.start()
        return p

    def _poll(self, timeout: float = 0.05) -> str:
        """Take the records the processes sent; returns why the run must stop, or ''."""
        reason = ""
        for r in _drain(self.queue, timeout):
            reason = self._handle(r) or reason
        return reason

    def _handle(self, r: dict) -> str:
        self.log.record(r)
        kind = r["kind"]
        if kind == "error":
            if "worker" in r and self.config.max_restarts > 0:
                self.worker_errors[r["worker"]] = r["traceback"]  # the death itself decides
                return ""
            if self.nodes is not None and r["process"] == "server" and "NodeLostError" in r["traceback"]:
                self.failure = self.failure or (f"{self.nodes.name_loss()}; this node stopped with its checkpoint "
                                                f"(node {self.nodes.rank}'s server):\n{r['traceback']}")
                return "failed"
            self.failure = self.failure or f"{r['process']} failed:\n{r['traceback']}"
            return "failed"
        if kind == "valid_result":
            return self._validation_done(r)
        if kind == "validator_ready":
            self.validator_ready = True
        elif kind == "checkpoint":
            self.last_checkpoint = r["update"]
        elif kind == "server_done":
            self.server_done = True
            self._server_counts(r)
            return self._node_stopped(r["reason"]) if r["reason"].startswith("node ") else r["reason"]
        elif kind == "worker_done":
            return "max_epochs"
        elif kind in ("ready", "server_ready"):
            self.ready += 1
            # Everyone has started (across nodes, the server too: its group with the other nodes
            # is formed and the parameters are assembled): the clock starts now.
            if self.ready == self.config.workers + (self.config.nnodes > 1):
                self.go.set()
                self.start = self.log.t0 = time.monotonic()
        return ""

    def _server_counts(self, r: dict) -> None:
        """What a server across nodes counted (pyasgd/nodes/sharded.py, server.py), for the summary."""
        for key in ("shard", "internode"):
            if key in r:
                self.server_extra[key] = r[key]

    def _node_stopped(self, reason: str) -> str:
        """Another node ended the round ("node R failed" or "node R stopped"): fail naming it, or
        stop as it did."""
        node = int(reason.split()[1])
        why = self.nodes.why(node, wait=2.0)
        if reason.endswith("failed"):
            self.failure = self.failure or (f"node {node} failed: {why}; this node (node {self.nodes.rank}) "
                                            "stopped with its checkpoint")
            return "failed"
        return f"node {node} stopped ({why})"

    def _check_health(self) -> str:
        """Why the run must stop now (a time limit, a process that died, another node lost), or
        ''. A dead worker is replaced while --max-restarts allows."""
        c, now = self.config, time.monotonic()
        if self.nodes is not None and self.nodes.lost():
            self.failure = self.failure or f"{self.nodes.lost()}; this node (node {self.nodes.rank}) stopped"
            return "failed"
        if not self.go.is_set() and now - self.start > c.timeout:
            self.failure = f"the workers did not start within {c.timeout:.0f} s (--timeout)"
            return "failed"
        for i, p in enumerate(self.procs):
            if p.exitcode is None or p.exitcode == 0:
                continue
            reason = self._poll(0.2)  # an error record sent just before dying
            if reason:
                return reason
            if i == 0:
                self.failure = self._server_died(_exit_text(p.exitcode))
                return "failed"
            rank = i - 1
            tb = self.worker_errors.pop(rank, "")
            cause = tb.strip().splitlines()[-1] if tb else _exit_text(p.exitcode)
            if len(self.log.restarts) >= c.max_restarts:
                self.failure = (f"worker {rank} died ({cause})" + (f":\n{tb}" if tb else "")
                                + f"\n{len(self.log.restarts)} of --max-restarts {c.max_restarts} replacements "
                                "were used; the run stops with its checkpoint")
                return "failed"
            self.log.on_restart(rank, cause)
            print(f"pyasgd: worker {rank} died ({cause}); starting a replacement "
                  f"({len(self.log.restarts)} of --max-restarts {c.max_restarts})" + (f"\n{tb}" if tb else ""),
                  file=sys.stderr)
            p.join(1)
            self.procs[i] = self._start_worker(rank)
        if self.validator is not None and self.validator.exitcode not in (None, 0):
            reason = self._poll(0.2)  # its error record, sent just before dying
            self.failure = self.failure or f"the validator process died ({_exit_text(self.validator.exitcode)})"
            return reason or "failed"
        if c.max_time and self.go.is_set() and now - self.start >= c.max_time:
            return "max_time"
        return ""

    def _server_died(self, how: str) -> str:
        where = (f"its last checkpoint, {self.ckpt_path}, holds update {self.last_checkpoint}"
                 if self.last_checkpoint is not None and os.path.exists(self.ckpt_path)
                 else "it wrote no checkpoint (set --save-every to keep one)")
        return (f"the server died ({how}); the updates since its last checkpoint are lost and it cannot be "
                f"replaced: {where}. Continue with: pyasgd-train --resume {self.run_dir}")

    def _stop(self, reason: str = "") -> None:
        """Ask the server to finish (it writes the last checkpoint), then release everyone who
        waits on the region, and drain the queue while the processes exit. Across nodes the
        server passes the word on (its vote in the next round) and may wait up to --timeout for
        the others to reach it."""
        if self.nodes is not None:
            self.stop_code.value = 2 if self.failure else 1
            if not reason.startswith("node "):  # this node's own decision: say why, for the others
                self.nodes.note("failed" if self.failure else "stopped",
                                self.failure.splitlines()[0] if self.failure else reason or "stopped")
        self.stop.set()
        deadline = time.monotonic() + (60 if self.nodes is None else max(60, self.config.timeout + 10))
        server = self.procs[0] if self.procs else None
        while server is not None and not self.server_done and server.is_alive() and time.monotonic() < deadline:
            for r in _drain(self.queue, 0.05):
                self.log.record(r)
                if r["kind"] == "server_done":
                    self.server_done = True
                    self._server_counts(r)
        self.region.shutdown()
        if self.validator is not None:
            if self.inflight is not None:
                self.validator.kill()  # its answer is no longer wanted: do not wait for its decoding
            else:
                self.valid_requests.put(None)
        everyone = self.procs + ([self.validator] if self.validator is not None else [])
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in everyone) and time.monotonic() < deadline:
            for r in _drain(self.queue, 0.05):
                self.log.record(r)
        for r in _drain(self.queue, 0.0):
            self.log.record(r)

    def _reap(self) -> None:
        """Nothing outlives the run."""
        for p in self.procs + ([self.validator] if self.validator is not None else []):
            if p.is_alive():
                p.kill()
            p.join(5)
        if self.valid_requests is not None:  # release its semaphores now, not at interpreter exit
            self.valid_requests.close()
            self.valid_requests.join_thread()
            self.validator = self.valid_requests = None


def _resume_positions(state: dict, workers: int) -> list[int]:
    """Each worker's data position in a checkpoint (older checkpoints kept (epoch, index) pairs
    of the last pushed batches)."""
    from pyasgd.tasks import Cursor

    if "positions" in state and state["positions"].numel() == workers:
        return [int(x) for x in state["positions"].tolist()]
    pairs = state.get("cursors")
    if pairs is not None and pairs.numel() == 2 * workers:
        flat = pairs.tolist()
        return [Cursor(int(flat[2 * i]), int(flat[2 * i + 1])).pack() for i in range(workers)]
    return [0] * workers


def _raise_terminated(signum, frame):
    raise Terminated()


def _drain(queue, timeout: float) -> list[dict]:
    import queue as queue_mod

    out = []
    try:
        out.append(queue.get(timeout=timeout) if timeout > 0 else queue.get_nowait())
        while True:
            out.append(queue.get_nowait())
    except queue_mod.Empty:
        pass
    except (EOFError, OSError):
        pass
    return out


def _exit_text(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
