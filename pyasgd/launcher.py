"""The launcher: `pyasgd.train(config)` starts one server and N workers (torch.multiprocessing,
spawn), watches them, validates on consistent snapshots of the published parameters without
pausing anyone, and on any ending (done, failure, Ctrl-C) stops every process and removes the
shared region."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from pyasgd import checkpoint, rundir
from pyasgd.config import TrainConfig
from pyasgd.metrics import RunLog


class TrainingError(RuntimeError):
    """A process of the run failed; the message names it and carries its traceback."""


def train(config: TrainConfig | dict) -> dict[str, Any]:
    """Train as `config` says; returns the summary (also written to <run dir>/summary.json)."""
    from pyasgd.tasks import make_task

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    task = make_task(config)  # reads and checks the data before anything is created
    run_dir = rundir.prepare(config)
    if config.simulate:
        from pyasgd.simulate import simulate

        return simulate(config, run_dir, task)
    return Launcher(config, run_dir, task).run()


def start_run(task, run_dir: str, quiet: bool) -> None:
    """Say what is being trained, and keep what the run directory needs to stand alone."""
    import shutil

    line = task.describe()
    if line and not quiet:
        print(f"pyasgd: {line}", file=sys.stderr)
    for name, path in task.artifacts().items():
        shutil.copyfile(path, os.path.join(run_dir, name))


def final_test(task, flat, run_dir: str) -> dict[str, Any]:
    """Test metrics of the best validated parameters (else the last ones)."""
    best = os.path.join(run_dir, rundir.BEST)
    if os.path.exists(best):
        flat.params.copy_(checkpoint.load(best)["params"])
    out = task.final_test(flat.model)
    if "bleu_signature" in out:
        with open(os.path.join(run_dir, "sacrebleu.txt"), "w", encoding="utf-8") as f:
            f.write(f"{out['bleu_signature']}\n{out['chrf_signature']}\n")
    return out


def validate(task, flat, log: RunLog, run_dir: str, update: int, version: int | None = None) -> None:
    """Evaluate the parameters in flat.params (a consistent snapshot), log it, and keep the best
    parameters in best.pt."""
    model = flat.model
    model.eval()
    try:
        metrics = task.evaluate(model)
    finally:
        model.train()
    if version is not None:
        metrics["version"] = version
    if log.on_valid(update, metrics):
        checkpoint.save_atomic({"params": flat.params.clone(), "update": update}, os.path.join(run_dir, rundir.BEST))


class Launcher:
    def __init__(self, config: TrainConfig, run_dir: str, task) -> None:
        self.config = config
        self.run_dir = run_dir
        self.task = task

    def run(self) -> dict[str, Any]:
        from pyasgd.exchange import SharedRegion, default_slots
        from pyasgd.flat import FlatModel
        from pyasgd.server import ServerArgs, server_main
        from pyasgd.worker import WorkerArgs, worker_main

        c = self.config
        task = self.task
        flat = FlatModel(task.build_model())
        log = RunLog(self.run_dir, c, task)
        start_run(task, self.run_dir, c.quiet)
        ckpt_path = os.path.join(self.run_dir, rundir.CHECKPOINT)
        # The workers own the cores: the launcher validates on one thread, so it does not fight
        # them (torch's idle OpenMP threads spin, which starves the workers on small machines).
        torch.set_num_threads(1)
        resume = checkpoint.load(ckpt_path) if c.resume else None
        if resume is not None:
            flat.params.copy_(resume["server"]["params"])
            log.updates = int(resume["server"]["step"])

        ctx = mp.get_context("spawn")
        uses_cuda = c.server_device.startswith("cuda") or any(d.startswith("cuda") for d in c.worker_devices())
        region = SharedRegion.create(flat.n, default_slots(c.workers, c.G), pin=uses_cuda)
        procs: list = []
        stop, go = ctx.Event(), ctx.Event()
        queue = ctx.Queue()
        stopped_because, failure, extra = "", None, {}
        start = time.monotonic()
        train_end = None
        pbar = None
        try:
            region.publish(flat.params)
            cursors = ctx.Array("q", 2 * c.workers, lock=False)
            if resume is not None and resume["cursors"].numel() == 2 * c.workers:
                cursors[:] = resume["cursors"].tolist()
            cfg = c.to_dict()
            procs.append(ctx.Process(target=server_main, name="server", daemon=True, args=(ServerArgs(
                config=cfg, region=region.name, checkpoint_path=ckpt_path,
                resume_state=ckpt_path if resume is not None else "", cursors=cursors, stop=stop, queue=queue),)))
            for i in range(c.workers):
                procs.append(ctx.Process(target=worker_main, name=f"worker {i}", daemon=True, args=(WorkerArgs(
                    rank=i, config=cfg, region=region.name, cursors=cursors, stop=stop, queue=queue, go=go),)))
            for p in procs:
                p.start()
            ready = 0
            if not c.quiet:
                from tqdm import tqdm

                pbar = tqdm(total=c.max_updates or None, initial=log.updates, unit="upd", file=sys.stderr,
                            dynamic_ncols=True, desc=f"{c.mode} N={c.workers} G={c.G} k={c.local_accum}")
            next_valid = (log.updates // c.valid_every + 1) * c.valid_every if c.valid_every else None
            server_done = False
            while not stopped_because:
                for r in _drain(queue, 0.05):
                    log.record(r)
                    kind = r["kind"]
                    if kind == "error":
                        failure = f"{r['process']} failed:\n{r['traceback']}"
                        stopped_because = "failed"
                    elif kind == "server_done":
                        server_done = True
                        stopped_because = stopped_because or r["reason"]
                    elif kind == "worker_done":
                        stopped_because = stopped_because or "max_epochs"
                    elif kind == "ready":
                        ready += 1
                        if ready == c.workers:  # everyone has started: the clock starts now
                            go.set()
                            start = log.t0 = time.monotonic()
                if pbar is not None:
                    pbar.update(max(0, log.updates - pbar.n))
                if stopped_because:
                    break
                if next_valid is not None and log.updates >= next_valid:
                    validate(task, flat, log, self.run_dir, log.updates, region.pull(flat.params))
                    next_valid = (log.updates // c.valid_every + 1) * c.valid_every
                    if log.out_of_patience:
                        stopped_because = "patience"
                if not go.is_set() and time.monotonic() - start > c.timeout:
                    failure = f"the workers did not start within {c.timeout:.0f} s (--timeout)"
                    stopped_because = "failed"
                if c.max_time and go.is_set() and time.monotonic() - start >= c.max_time:
                    stopped_because = "max_time"
                for p in procs:
                    if p.exitcode is not None and p.exitcode != 0 and not stopped_because:
                        failure = f"{p.name} died ({_exit_text(p.exitcode)}) without reporting an error"
                        stopped_because = "failed"
                if pbar is not None:
                    pbar.set_postfix(log.postfix(), refresh=False)
            self._stop(procs, stop, region, queue, log, server_done)
            train_end = time.monotonic()  # wall_s and wps count training, not the final decoding
            torch.set_num_threads(os.cpu_count() or 1)  # the workers are gone: all cores
            if not failure and (not log.valid or log.valid[-1]["update"] != log.updates):
                validate(task, flat, log, self.run_dir, log.updates, region.pull(flat.params))
            if not failure:
                extra = final_test(task, flat, self.run_dir)
        except KeyboardInterrupt:
            stopped_because = "interrupted"
            self._stop(procs, stop, region, queue, log, False)
            raise
        finally:
            if pbar is not None:
                pbar.close()
            for p in procs:  # nothing outlives the run
                if p.is_alive():
                    p.kill()
                p.join(5)
            region.close()
            wall = (train_end or time.monotonic()) - start
            if stopped_because:
                because = f"failed: {failure.splitlines()[0]}" if failure else stopped_because
                rundir.write_json(os.path.join(self.run_dir, "summary.json"),
                                  log.summary(stopped_because=because, wall_s=wall, extra=extra))
            log.close()
        if failure:
            raise TrainingError(failure)
        return log.summary(stopped_because=stopped_because, wall_s=wall, extra=extra)

    def _stop(self, procs, stop, region, queue, log, server_done: bool) -> None:
        """Ask the server to finish (it writes the last checkpoint), then release everyone who
        waits on the region, and drain the queue while the processes exit."""
        stop.set()
        deadline = time.monotonic() + 60
        server = procs[0] if procs else None
        while server is not None and not server_done and server.is_alive() and time.monotonic() < deadline:
            for r in _drain(queue, 0.05):
                log.record(r)
                server_done = server_done or r["kind"] == "server_done"
        region.shutdown()
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            for r in _drain(queue, 0.05):
                log.record(r)
        for r in _drain(queue, 0.0):
            log.record(r)


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
