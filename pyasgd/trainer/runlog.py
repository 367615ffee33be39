"""RunLog: what a run measures and writes: metrics.jsonl (one JSON object per line, each with a
"kind"), the staleness histogram, words per second, validation with early stopping, and the
summary. It knows no task's metrics: the task names its primary metric and adds its own fields."""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Any, Callable

from pyasgd.errors import write_failure
from pyasgd.trainer import rundir

LOG = logging.getLogger("pyasgd")
SHOWN = {"bleu": "BLEU", "chrf": "chrF"}  # metric names as the progress lines write them

# The summary fields DESIGN.md promises in every summary.json; a task that does not measure one
# (the synthetic task has no BLEU) writes null.
REQUIRED_SUMMARY_KEYS = ("mode", "workers", "local_accum", "global_accum", "pull_every", "updates", "tokens",
                         "wall_s", "wps", "avg_staleness", "staleness_hist", "best_valid_bleu", "test_bleu",
                         "stopped_because")


class RunLog:
    def __init__(self, run_dir: str, config, task) -> None:
        self.run_dir = run_dir
        self.config = config
        self.task = task
        self._f = open(os.path.join(run_dir, rundir.METRICS), "a", encoding="utf-8")
        self.t0 = time.monotonic()
        self.staleness: Counter[int] = Counter()
        self.updates = 0
        self.tokens = 0            # target tokens of every gradient the server took
        self.gradients = 0         # gradients in applied updates
        self.vtime: float | None = 0.0 if config.simulate else None  # the simulator's virtual clock
        self.valid_s = 0.0         # wall time spent validating
        self.window_s = 0.0        # wall time while a validation was running, and the tokens
        self.window_tokens = 0     # trained on meanwhile (the workers' speed with and without it)
        self._window: tuple[float, int] | None = None
        # The simulator stops training while it validates; real workers go on meanwhile.
        self.pauses_for_validation = bool(config.simulate)
        self.epoch_tokens = task.epoch_tokens()
        self.recent_loss: list[float] = []
        self.dropped = 0
        self.compensation: dict[str, Any] = {}  # the last update's dc and momentum state
        self.valid: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_update = 0
        self.best_loss: float | None = None  # the lowest dev loss (cross-entropy per target token)
        self.patience_metric = config.patience_metric or task.primary
        self.patience_higher = (task.higher_is_better if self.patience_metric == task.primary
                                else self.patience_metric != "loss")
        self.patience_best: float | None = None
        self.bad_validations = 0
        self.workers: dict[int, dict[str, Any]] = {}
        self.targets = {t: None for t in config.targets()}  # first (wall_s, update) reaching each
        self.restarts: list[dict[str, Any]] = []  # workers replaced: rank, update, cause
        self.retired: list[dict[str, Any]] = []   # the last progress record of each replaced worker
        # Whoever else wants each record as it is written (TensorBoard, the progress lines); each
        # may have a close().
        self.sinks: list[Callable[[dict[str, Any]], None]] = []

    # -- records ------------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        except OSError as e:  # a full disk: the run stops, saying so in one line
            raise write_failure(self._f.name, e) from e
        for sink in self.sinks:
            sink(record)

    def record(self, r: dict[str, Any]) -> None:
        """Take a record from the server or a worker (control records are the launcher's)."""
        kind = r["kind"]
        if kind == "update":
            self.on_update(r)
        elif kind == "progress":
            self.on_progress(r)
        elif kind == "checkpoint":
            self.write(r)

    def on_update(self, r: dict[str, Any]) -> None:
        self.write(r)
        self._count_update(r)

    def _count_update(self, r: dict[str, Any]) -> None:
        self.staleness.update(r["staleness"])
        self.tokens += r["tokens"]
        self.dropped += r.get("dropped", 0)
        if r["applied"]:
            self.updates = max(self.updates, r["update"])
            self.gradients += len(r["staleness"]) - r.get("dropped", 0)
        if r.get("vtime") is not None:
            self.vtime = r["vtime"]
        for key in ("uncorrected", "beta1"):  # compensation's state after this update
            if key in r:
                self.compensation[key] = r[key]
        self.recent_loss = (self.recent_loss + [r["loss"]])[-50:]

    def on_progress(self, r: dict[str, Any]) -> None:
        self.workers[r["worker"]] = r
        self.write(r)

    def on_restart(self, rank: int, cause: str) -> None:
        r = {"kind": "restart", "worker": rank, "update": self.updates, "time": round(self.elapsed, 3),
             "cause": cause}
        self.write(r)
        self.restarts.append({k: r[k] for k in ("worker", "update", "cause")})
        if rank in self.workers:  # its compute and wait time still count; the replacement starts at 0
            self.retired.append(self.workers.pop(rank))

    def snapshot(self) -> dict[str, Any]:
        """The run's progress and clocks now: what a validation record says about when its
        parameters were taken."""
        t = self.elapsed
        at = {"time": round(t, 3), "train_time": round(t - self.valid_s if self.pauses_for_validation else t, 3),
              "gradients": self.gradients, "tokens": self.tokens, "epoch": self.epochs()}
        if self.vtime is not None:
            at["vtime"] = round(self.vtime, 3)
        return at

    def validation_started(self) -> None:
        self._window = (self.elapsed, self.tokens)

    def validation_ended(self) -> None:
        if self._window is not None:
            t, tokens = self._window
            self.window_s += self.elapsed - t
            self.window_tokens += self.tokens - tokens
            self._window = None

    def epochs(self) -> float | None:
        """Passes over the training data so far (target tokens / tokens per epoch)."""
        return round(self.tokens / self.epoch_tokens, 4) if self.epoch_tokens else None

    @property
    def time_kind(self) -> str:
        return "virtual" if self.vtime is not None else "wall"

    def on_valid(self, update: int, metrics: dict[str, float], at: dict[str, Any] | None = None) -> bool:
        """Records a validation of the parameters taken at `at` (snapshot()); returns True when
        it is the best so far by the task's primary metric."""
        at = at or self.snapshot()
        rec = {"kind": "valid", "update": update, **at, **metrics}
        self.write(rec)
        try:
            self._f.flush()  # a validation is worth seeing at once (tail -f, a study's progress)
        except OSError as e:
            raise write_failure(self._f.name, e) from e
        better = self._count_valid(rec)
        LOG.info(self.valid_line(rec))
        return better

    def _count_valid(self, rec: dict[str, Any]) -> bool:
        """Account for a validation record (its metrics are among its fields)."""
        update, metrics = rec["update"], rec
        self.valid.append(rec)
        score = metrics[self.task.primary]
        clock = rec["vtime"] if self.time_kind == "virtual" else rec["time"]
        for t, hit in self.targets.items():
            if hit is None and (score >= t if self.task.higher_is_better else score <= t):
                self.targets[t] = {"time": clock, "wall_s": rec["time"], "update": update, "tokens": rec["tokens"]}
        if "loss" in metrics and (self.best_loss is None or metrics["loss"] < self.best_loss):
            self.best_loss = metrics["loss"]
        better = self.best is None or (score > self.best if self.task.higher_is_better else score < self.best)
        if better:
            self.best, self.best_update = score, update
        watched = metrics.get(self.patience_metric)
        if watched is not None:
            improved = self.patience_best is None or (
                watched > self.patience_best if self.patience_higher else watched < self.patience_best)
            if improved:
                self.patience_best, self.bad_validations = watched, 0
            else:
                self.bad_validations += 1
        return better

    # -- resuming ---------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run's counters and clocks go on."""
        return {"tokens": self.tokens, "gradients": self.gradients, "vtime": self.vtime,
                "elapsed": self.elapsed, "valid_s": self.valid_s}

    def resume_from(self, update: int) -> None:
        """Continue the log of a run resumed from a checkpoint of `update`: metrics.jsonl keeps the
        records up to it, replayed into this log (staleness histogram, validations, best, patience,
        BLEU targets: as an uninterrupted run has them), and loses those of the part of the run the
        checkpoint did not keep (each resume computes those updates again; an earlier resume's
        duplicates are removed too)."""
        path = os.path.join(self.run_dir, rundir.METRICS)
        self._f.close()
        kept: list[dict[str, Any]] = []
        last = 0  # the last applied update kept
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut short when the process was killed
                u = r.get("update") if r.get("kind") in ("update", "valid") else None
                if u is not None and u > update:
                    continue
                if r.get("kind") == "update" and r.get("applied", True):
                    if u <= last:  # a resume began again at u: what followed u - 1 before it was lost
                        kept = [k for k in kept if k.get("kind") not in ("update", "valid") or k["update"] < u]
                    last = u
                kept.append(r)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")
        for r in kept:
            if r.get("kind") == "update":
                self._count_update(r)
            elif r.get("kind") == "valid":
                self._count_valid(r)

    def restore(self, progress: dict[str, Any] | None, *, clocks: bool) -> None:
        """Continue from a checkpoint's progress(); with clocks, the wall clock goes on too."""
        if not progress:
            return
        self.tokens, self.gradients = int(progress["tokens"]), int(progress["gradients"])
        if self.vtime is not None and progress.get("vtime") is not None:
            self.vtime = float(progress["vtime"])
        if clocks:
            self.t0 = time.monotonic() - float(progress["elapsed"])
            self.valid_s = float(progress["valid_s"])

    @property
    def out_of_patience(self) -> bool:
        return self.config.patience > 0 and self.bad_validations >= self.config.patience

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- summaries ------------------------------------------------------------------------------
    def avg_staleness(self) -> float | None:
        n = sum(self.staleness.values())
        return None if n == 0 else sum(k * v for k, v in self.staleness.items()) / n

    def postfix(self) -> dict[str, Any]:
        out = {"wps": f"{self.tokens / max(self.elapsed, 1e-9):.0f}"}
        if self.recent_loss:
            out["loss"] = f"{sum(self.recent_loss) / len(self.recent_loss):.3f}"
        s = self.avg_staleness()
        if s is not None:
            out["stale"] = f"{s:.2f}"
        if self.valid:
            out[self.task.primary] = f"{self.valid[-1][self.task.primary]:.3f}"
        return out

    def status_line(self, updates: int | None = None) -> str:
        """One progress line: where the run is, how fast, how stale, how good."""
        n = self.updates if updates is None else updates
        total = self.config.max_updates
        parts = [f"update {n:,}" + (f"/{total:,}" if total else "")]
        e = self.epochs()
        if e is not None:
            parts.append(f"epoch {e:.2f}")
        p = self.postfix()
        if "loss" in p:
            parts.append(f"loss {p['loss']}")
        parts.append(f"{self.tokens / max(self.elapsed, 1e-9):,.0f} words/s")
        if "stale" in p:
            parts.append(f"staleness {p['stale']}")
        if self.valid:
            parts.append(f"dev {SHOWN.get(self.task.primary, self.task.primary)} "
                         f"{self.valid[-1][self.task.primary]:.2f}")
        return ", ".join(parts)

    def valid_line(self, rec: dict[str, Any]) -> str:
        """One line for a validation record (after it was counted)."""
        metrics = [f"{SHOWN.get(k, k)} {rec[k]:.2f}" for k in (self.task.primary, "chrf", "loss", "accuracy")
                   if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)]
        best = (f"best {self.best:.2f} at update {self.best_update:,}" if self.best is not None else "")
        return f"validation at update {rec['update']:,}: dev " + ", ".join(dict.fromkeys(metrics)) + (
            f" ({best})" if best else "")

    def summary(self, *, stopped_because: str, wall_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        c = self.config
        every = [*self.workers.values(), *self.retired]
        wait = sum(w.get("wait_s", 0.0) for w in every)
        compute = sum(w.get("compute_s", 0.0) for w in every)
        s = {
            "mode": c.mode, "workers": c.workers, "local_accum": c.local_accum, "global_accum": c.G,
            "pull_every": c.pull_every, "stale_policy": c.stale_policy, "predict": c.predict,
            "ema": c.ema, "uncorrected_gradients": self.compensation.get("uncorrected"),
            "final_beta1": self.compensation.get("beta1"), "task": c.task,
            "simulate": c.simulate, "updates": self.updates, "tokens": self.tokens, "gradients": self.gradients,
            "epochs": self.epochs(), "time_kind": self.time_kind, "valid_s": round(self.valid_s, 3),
            "virtual_time_s": round(self.vtime, 3) if self.vtime is not None else None,
            "virtual_wps": round(self.tokens / self.vtime, 1) if self.vtime else None,
            "wps_while_validating": round(self.window_tokens / self.window_s, 1) if self.window_s > 0 else None,
            "wps_not_validating": (round((self.tokens - self.window_tokens) / (wall_s - self.window_s), 1)
                                   if wall_s - self.window_s > 0 else None),
            "wall_s": round(wall_s, 3), "wps": round(self.tokens / wall_s, 1) if wall_s > 0 else None,
            "updates_per_s": round(self.updates / wall_s, 3) if wall_s > 0 else None,
            "avg_staleness": self.avg_staleness(),
            "staleness_hist": {str(k): v for k, v in sorted(self.staleness.items())},
            "dropped_gradients": self.dropped,
            "worker_compute_s": round(compute, 3), "worker_wait_s": round(wait, 3),
            "worker_restarts": len(self.restarts), "restarts": list(self.restarts),
            "best_valid": self.best, "best_valid_update": self.best_update, "best_valid_loss": self.best_loss,
            "primary_metric": self.task.primary,
            "final_valid": self.valid[-1] if self.valid else None,
            "time_to_target": {f"{t:g}": hit for t, hit in self.targets.items()},
            "stopped_because": stopped_because,
            "run_dir": self.run_dir,
        }
        s.update(self.task.summary_fields(self.best, s["time_to_target"]))
        s.update(extra or {})
        for key in REQUIRED_SUMMARY_KEYS:
            s.setdefault(key, None)
        return s

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise write_failure(self._f.name, e) from e
        finally:
            self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self.sinks = []
