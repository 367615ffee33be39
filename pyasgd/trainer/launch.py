"""`pyasgd.train(config)`: choose the topology once, then run the simulator (--simulate) or the
supervisor: one server and N workers (torch.multiprocessing, spawn), watched for health and
replaced when a worker dies, validated by the validation service (pyasgd/trainer/validation.py)
without pausing anyone; on any ending (done, failure, Ctrl-C, SIGTERM) every process is stopped
and the shared region removed."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from pyasgd import testing
from pyasgd.config import TrainConfig
from pyasgd.core import checkpoint
from pyasgd.core.flat import FlatModel
from pyasgd.errors import SaveError, Terminated
from pyasgd.trainer import rundir, tboard
from pyasgd.trainer.console import LOG, Console, Progress, limits_text, summary_line
from pyasgd.trainer.outcome import after_save_failure, finish_run, server_died
from pyasgd.trainer.runlog import RunLog
from pyasgd.trainer.steps import ValidationSchedule, final_test, start_run, validate_last
from pyasgd.trainer.stops import StopReason, StopRequest
from pyasgd.trainer.validation import ValidationService, exit_text


class TrainingError(RuntimeError):
    """A process of the run failed; the message names it and carries its traceback."""


def train(config: TrainConfig | dict) -> dict[str, Any]:
    """Train as `config` says; returns the summary (also written to <run dir>/summary.json).
    What the run tells its user goes through the logger "pyasgd" (pyasgd/trainer/console.py)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    with Console(config) as con:
        try:
            summary = _train(config, con)
        except TrainingError as e:  # the caller prints it; train.log keeps it too
            LOG.error(f"training failed: {e}", extra={"file_only": True})
            raise
        finally:
            rundir.release_all()  # the run directory (and --resume's) goes with the run
        LOG.info(summary_line(summary))
        return summary


def _train(config: TrainConfig, con: Console) -> dict[str, Any]:
    from pyasgd.nodes import topology_for
    from pyasgd.tasks import make_task

    resume = rundir.check_resume(config)  # --resume's files, read once and checked before anything is touched
    config.check_devices()
    tboard.check(config)  # a missing extra fails before the run directory is made
    LOG.info(f"preparing the {config.task} task" + (" (the corpus and its subword model)"
                                                     if config.task == "translation" else ""))
    task = make_task(config)  # reads and checks the data before anything is created
    if config.simulate:
        from pyasgd.trainer.simulate import simulate

        run_dir = rundir.prepare(config)
        con.attach(run_dir)
        try:
            return simulate(config, run_dir, task, resume)
        except SaveError as e:  # the simulator's own files: a full disk
            raise TrainingError(after_save_failure(str(e), run_dir)) from None
    topology = topology_for(config)
    topology.join(resume)  # before anything is created: a bad rendezvous leaves nothing behind
    try:
        try:
            run_dir = rundir.prepare(config, topology.run_tag)
        except Exception as e:
            topology.tell_stop(f"its run directory: {e}", "")
            raise
        con.attach(run_dir)
        return Supervisor(config, run_dir, task, topology, resume).run()
    finally:
        topology.close()


class Supervisor:
    """One real-process run on this node: spawns the server and the workers around the shared
    region, takes their records, watches their health (replacing dead workers), handles signals,
    and stops everyone in order."""

    def __init__(self, config: TrainConfig, run_dir: str, task, topology, resume: dict | None = None) -> None:
        self.config, self.run_dir, self.task, self.topology = config, run_dir, task, topology
        self.resumed = resume  # the checkpoint rundir.check_resume loaded (None: load_resume reads it)
        # Validation decodes where the run has a GPU (the server's, else the first worker's):
        # on one launcher CPU thread it would take longer than the training it checks.
        devices = [config.server_device, *config.worker_devices()]
        self.eval_device = torch.device(next((d for d in devices if d.startswith("cuda")), "cpu"))
        self.flat = FlatModel(task.build_model().to(self.eval_device))
        self.log = RunLog(run_dir, config, task)
        tboard.attach(self.log, config, run_dir)
        self.ckpt_path = os.path.join(run_dir, rundir.CHECKPOINT)
        ctx = self.ctx = mp.get_context("spawn")
        self.stop, self.go, self.queue = ctx.Event(), ctx.Event(), ctx.Queue()
        self.stop_request = ctx.Value("i", StopRequest.NONE, lock=False)  # why `stop` is set (StopRequest)
        self.validation = ValidationService(config, ctx, task, self.flat, self.log, run_dir, self.eval_device,
                                            self.queue)
        self.procs: list = []  # the server first, then the workers
        self.region = None
        self.eval_region = None  # --predict / --ema: the server publishes what validation evaluates here
        self.ready = 0             # workers (and, where it reports, the server) that reported ready
        self.server_extra: dict = {}  # summary fields the server reports at its end
        self.server_done = False   # the server wrote its last checkpoint
        self.ended_by_node = False  # another node ended the run (it said why itself)
        self.failure = ""          # what went wrong, with a traceback where there is one
        self.worker_errors: dict[int, str] = {}  # rank -> traceback it reported before dying
        self.last_checkpoint: int | None = None  # server update of the last checkpoint written
        self.start = time.monotonic()  # reset when every worker is ready

    def run(self) -> dict[str, Any]:
        from pyasgd.core.region import SharedRegion, default_slots

        c, task, flat, log = self.config, self.task, self.flat, self.log
        start_run(task, self.run_dir)
        # The workers own the cores: the launcher validates on one thread, so it does not fight
        # them (torch's idle OpenMP threads spin, which starves the workers on small machines).
        torch.set_num_threads(1)
        resume = load_resume(self.ckpt_path, flat, log, self.resumed) if c.resume else None
        self.last_checkpoint = log.updates if resume is not None else None
        self.region = SharedRegion.create(flat.n, default_slots(c.workers, self.topology.region_G),
                                          pin=self.eval_device.type == "cuda", grad_dtype=GRAD_DTYPES[c.grad_dtype])
        stopped_because, extra, summary, train_end = "", {}, None, None
        pbar = Progress(f"{c.mode} N={c.workers} G={c.G} k={c.local_accum}", c.max_updates or None, log.updates,
                        line=log.status_line)
        first_update = log.updates
        previous_term = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops the run as Ctrl-C does
            previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            if c.eval_copy:  # slots=1: it carries no gradients; the server publishes, the launcher pulls
                self.eval_region = SharedRegion.create(flat.n, 1, pin=self.eval_device.type == "cuda")
            evaluated = self.eval_region or self.region
            self.region.publish(flat.params)
            if self.eval_region is not None:  # the average of a resumed run, else the master
                self.eval_region.publish(resume["server"].get("ema", flat.params) if resume else flat.params)
            LOG.info(f"starting the server and {c.workers} worker processes"
                     + (f", resuming from update {log.updates:,}" if resume is not None else ""))
            self._spawn(resume)
            schedule = ValidationSchedule(c, log.updates, log.tokens)
            if c.valid_process and schedule.every:
                self.validation.start()
            while not stopped_because:
                stopped_because = self._poll()
                if self.go.is_set():
                    pbar.update(log.updates, log.postfix())
                if first_update is not None and log.updates > first_update:
                    LOG.info(f"first update applied, {time.monotonic() - self.start:.1f} s after the workers started")
                    first_update = None
                if stopped_because:
                    break
                stopped_because = self.validation.serve(schedule.due(log.updates, log.tokens), evaluated)
                stopped_because = self._check_health() or stopped_because
            LOG.info(f"stopping ({stopped_because}) at update {log.updates:,}")
            self.topology.set_phase("stopping")
            self._stop(stopped_because)
            self.topology.set_phase("testing")
            train_end = time.monotonic()  # wall_s and wps count training, not the final decoding
            torch.set_num_threads(os.cpu_count() or 1)  # the workers are gone: all cores
            if not self.failure:
                try:
                    validate_last(task, flat, log, self.run_dir, log.updates, evaluated.pull(flat.params))
                    testing.pause_before_test()
                    extra = final_test(task, flat, self.run_dir)
                except SaveError as e:  # best.pt or metrics.jsonl on a full disk
                    self.failure = after_save_failure(str(e), self.run_dir)
        except (KeyboardInterrupt, Terminated) as e:
            stopped_because = StopReason.TERMINATED if isinstance(e, Terminated) else StopReason.INTERRUPTED
            if previous_term is not None:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
            self._stop(stopped_because)  # the server writes the last checkpoint
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            pbar.close()
            self._reap()
            try:
                self.region.close()
            finally:
                if self.eval_region is not None:
                    self.eval_region.close()
            wall = (train_end or time.monotonic()) - self.start
            try:  # on a full disk these fail too: the first failure is the one reported
                if stopped_because:
                    summary = finish_run(log, self.run_dir, self.topology, self.failure, stopped_because, wall,
                                         {**self.server_extra, **extra})
            except SaveError as e:
                self.failure = self.failure or after_save_failure(str(e), self.run_dir)
            finally:
                try:
                    log.close()
                except SaveError as e:
                    self.failure = self.failure or after_save_failure(str(e), self.run_dir)
        if self.failure:
            raise TrainingError(self.failure)
        return summary

    # -- processes ------------------------------------------------------------------------------------
    def _spawn(self, resume: dict | None) -> None:
        from pyasgd.trainer.server import ServerArgs, server_main

        c, ctx = self.config, self.ctx
        cursors = ctx.Array("q", c.workers, lock=False)  # each worker's data position (Cursor.pack)
        if resume is not None:
            cursors[:] = _resume_positions(resume, c.workers)
        self.common = dict(config=c, topology=self.topology, region=self.region.name, cursors=cursors,
                           stop=self.stop, queue=self.queue)
        activity = self.topology.activity_array(ctx)  # across nodes: the server's progress, for the heartbeat
        self.topology.watch_server(activity)
        self.procs.append(ctx.Process(target=server_main, name="server", daemon=True, args=(ServerArgs(
            checkpoint_path=self.ckpt_path, resume_state=self.ckpt_path if resume is not None else "",
            stop_request=self.stop_request, eval_region=self.eval_region.name if self.eval_region else "",
            activity=activity, **self.common),)))
        self.procs[0].start()
        for rank in range(c.workers):
            self.procs.append(start_worker(self.ctx, rank, go=self.go, **self.common))

    # -- records --------------------------------------------------------------------------------------
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
            if r["process"] == "server" and "NodeLostError" in r["traceback"]:
                self.failure = self.failure or (f"{self.topology.loss_text()}; this node stopped with its checkpoint "
                                                f"(node {self.config.node_rank}'s server):\n{r['traceback']}")
                return StopReason.FAILED
            if r.get("message"):  # a SaveError: one line, and what the user can do
                self.failure = self.failure or after_save_failure(f"the {r['process']} stopped: {r['message']}",
                                                                  self.run_dir)
                return StopReason.FAILED
            self.failure = self.failure or f"{r['process']} failed:\n{r['traceback']}"
            return StopReason.FAILED
        if kind == "valid_result":
            return self.validation.done(r)
        if kind == "validator_ready":
            self.validation.ready = True
        elif kind == "checkpoint":
            self.last_checkpoint = r["update"]
        elif kind == "server_done":
            self._server_done(r)
            return self._ended_by_node(r["ended_by"]) if "ended_by" in r else r["reason"]
        elif kind == "worker_done":
            return StopReason.MAX_EPOCHS
        elif kind in ("ready", "server_ready"):
            self.ready += 1
            # Everyone has started (and where the server reports, its group with the other nodes
            # is formed and the parameters are assembled): the clock starts now.
            if self.ready == self.config.workers + self.topology.server_reports_ready:
                self.go.set()
                self.topology.set_phase("training")
                LOG.info(f"all {self.config.workers} workers ready, {time.monotonic() - self.start:.1f} s after "
                         f"they were started; training until {limits_text(self.config)}")
                self.start = self.log.t0 = time.monotonic()
        return ""

    def _server_done(self, r: dict) -> None:
        """What the server counted across nodes (pyasgd/nodes/), for the summary."""
        self.server_done = True
        for key in ("shard", "internode"):
            if key in r:
                self.server_extra[key] = r[key]

    def _ended_by_node(self, ended: dict) -> str:
        """Another node ended the run: fail naming it, or stop as it did."""
        node, why = ended["node"], self.topology.why(ended["node"])
        self.ended_by_node = True
        if ended["failed"]:
            self.failure = self.failure or (f"node {node} failed: {why}; this node (node {self.config.node_rank}) "
                                            "stopped with its checkpoint")
            return StopReason.FAILED
        return f"node {node} stopped ({why})"

    # -- health ---------------------------------------------------------------------------------------
    def _check_health(self) -> str:
        """Why the run must stop now (a time limit, a process that died, another node lost), or
        ''. A dead worker is replaced while --max-restarts allows."""
        c, now = self.config, time.monotonic()
        lost = self.topology.lost()
        if lost:
            self.failure = self.failure or f"{lost}; this node (node {c.node_rank}) stopped"
            return StopReason.FAILED
        if not self.go.is_set() and now - self.start > c.timeout:
            self.failure = f"the workers did not start within {c.timeout:.0f} s (--timeout)"
            return StopReason.FAILED
        for i, p in enumerate(self.procs):
            if p.exitcode is None or p.exitcode == 0:
                continue
            reason = self._poll(0.2)  # an error record sent just before dying
            if reason:
                return reason
            if i == 0:
                self.failure = server_died(exit_text(p.exitcode), self.ckpt_path, self.last_checkpoint, self.run_dir)
                return StopReason.FAILED
            if not self._replace_worker(i - 1, p):
                return StopReason.FAILED
        died = self.validation.died()
        if died:
            reason = self._poll(0.2)  # its error record, sent just before dying
            self.failure = self.failure or died
            return reason or StopReason.FAILED
        if c.max_time and self.go.is_set() and now - self.start >= c.max_time:
            return StopReason.MAX_TIME
        return ""

    def _replace_worker(self, rank: int, p) -> bool:
        """Start a replacement for dead worker `rank`; False when --max-restarts is used up."""
        c = self.config
        tb = self.worker_errors.pop(rank, "")
        cause = tb.strip().splitlines()[-1] if tb else exit_text(p.exitcode)
        if len(self.log.restarts) >= c.max_restarts:
            self.failure = (f"worker {rank} died ({cause})" + (f":\n{tb}" if tb else "")
                            + f"\n{len(self.log.restarts)} of --max-restarts {c.max_restarts} replacements "
                            "were used; the run stops with its checkpoint")
            return False
        self.log.on_restart(rank, cause)
        LOG.warning(f"worker {rank} died ({cause}); starting a replacement "
                    f"({len(self.log.restarts)} of --max-restarts {c.max_restarts})" + (f"\n{tb}" if tb else ""))
        p.join(1)
        self.procs[rank + 1] = start_worker(self.ctx, rank, go=self.go, **self.common)
        return True

    # -- the end --------------------------------------------------------------------------------------
    def _stop(self, reason: str = "") -> None:
        """Ask the server to finish (it writes the last checkpoint), then release everyone who
        waits on the region, and drain the queue while the processes exit. Across nodes the
        server passes the word on (its vote in the next round), after the round it may be waiting
        in with a slow node."""
        self.stop_request.value = StopRequest.FAIL if self.failure else StopRequest.STOP
        if not self.ended_by_node:  # this node's own decision: say why, for the others
            self.topology.tell_stop(self.failure, str(reason or StopReason.STOPPED))
        self.stop.set()
        grace = max(60, self.config.timeout + 10) if self.topology.server_reports_ready else 60
        deadline = time.monotonic() + grace
        server = self.procs[0] if self.procs else None
        # Across nodes a server in a round with a slow node is waited for while the nodes live; a
        # node lost meanwhile makes it leave the round (a failure), so it still saves.
        while server is not None and not self.server_done and server.is_alive() and (
                time.monotonic() < deadline or self.topology.waiting_for_alive_nodes()):
            if self.topology.lost() and self.stop_request.value != StopRequest.FAIL:
                self.failure = self.failure or f"{self.topology.lost()}; this node (node {self.config.node_rank}) stopped"
                self.stop_request.value = StopRequest.FAIL
            for r in _drain(self.queue, 0.05):
                self._stopping_record(r)
        self.region.shutdown()
        self.validation.stop()
        processes = self.procs + self.validation.processes()
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            for r in _drain(self.queue, 0.05):
                self._stopping_record(r)
        for r in _drain(self.queue, 0.0):
            self._stopping_record(r)

    def _stopping_record(self, r: dict) -> None:
        """A record taken while the run stops: logged, and a SaveError (the server's last
        checkpoint on a full disk) still fails the run. (Other errors at the stop keep their old
        meaning: a node that left first, a process stopped while it waited.)"""
        if r["kind"] == "error" and r.get("message"):
            self._handle(r)
            return
        self.log.record(r)
        if r["kind"] == "server_done":
            self._server_done(r)
        elif r["kind"] == "checkpoint":
            self.last_checkpoint = r["update"]

    def _reap(self) -> None:
        """Nothing outlives the run."""
        for p in self.procs + self.validation.processes():
            if p.is_alive():
                p.kill()
            p.join(5)
        self.validation.close()


GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_resume(ckpt_path: str, flat: FlatModel, log: RunLog, state: dict | None = None) -> dict:
    """The checkpoint to continue from (`state`, already loaded and checked, else read from
    `ckpt_path`), its parameters loaded into `flat` and its progress into `log` (a shard's owner
    kept its view of every shard; its server reassembles them)."""
    resume = state if state is not None else checkpoint.load(ckpt_path)
    flat.params.copy_(resume["view"] if "view" in resume else resume["server"]["params"])
    log.updates = int(resume["server"]["step"])
    log.resume_from(log.updates)
    log.restore(resume.get("progress"), clocks=False)
    return resume


def start_worker(ctx, rank: int, **common):
    """Worker `rank` (a first one or a replacement): it pulls the current parameters and goes
    on from the data position its rank last pushed."""
    from pyasgd.trainer.worker import WorkerArgs, worker_main

    p = ctx.Process(target=worker_main, name=f"worker {rank}", daemon=True,
                    args=(WorkerArgs(rank=rank, **common),))
    p.start()
    return p


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
