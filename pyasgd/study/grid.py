"""`pyasgd-study`: the paper's comparisons as one command. A study file names a grid of training
runs (methods x learning rates x seeds x language pairs x any other setting); `run` trains every
cell into its own run directory (resumable, failures recorded, optionally in parallel) and
`report` turns the run directories into the paper's tables and figures.

    pyasgd-study run studies/smoke.toml --out runs/smoke
    pyasgd-study run studies/paper-cpu.toml --out runs/paper-cpu --jobs 2
    pyasgd-study report runs/paper-cpu          # report.md, report.json, *.png

A study file (TOML):

    [base]                      # any pyasgd-train setting, for every cell
    simulate = true
    workers = 4
    [grid]                      # lists of values; every combination is a cell
    method = ["sync", "async", "async-global4"]
    lr = [0.0015, 0.003]
    seed = [1, 2]
    pair = ["en-de"]            # optional; a name from [pairs.*] ("bundled" = the default corpus)
    [methods.my-method]         # a method of your own: any settings
    mode = "async"
    global_accum = 2
    [pairs.en-fr]               # a corpus: files relative to the study file
    train_src = "data/en-fr/train.en"  # ... train_tgt, dev_src, dev_tgt, test_src, test_tgt

Instead of one [grid], [[grids]] tables give several grids whose cells are pooled (a learning-rate
sweep for three methods and an accumulation comparison at one rate, without the full product).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyasgd.trainer import rundir
from pyasgd.config import TrainConfig, load_toml
from pyasgd.errors import ConfigError

# The paper's methods (Aji & Heafield 2019, Tables 1, 3, 5 and Figure 2) as TrainConfig settings.
METHODS: dict[str, dict[str, Any]] = {
    "sync": {"mode": "sync"},
    "async": {"mode": "async", "global_accum": 1},
    "async-local4": {"mode": "async", "local_accum": 4, "global_accum": 1},
    "async-local2-global2": {"mode": "async", "local_accum": 2, "global_accum": 2},
    "async-global4": {"mode": "async", "global_accum": 4},
    "async-globalN": {"mode": "async", "global_accum": None},  # G = N, whatever N is
    "sync-pull7": {"mode": "sync", "pull_every": 7},
    "sync-pull5": {"mode": "sync", "pull_every": 5},
    "async-scale": {"mode": "async", "global_accum": 1, "stale_policy": "scale"},
    "async-drop2": {"mode": "async", "global_accum": 1, "stale_policy": "drop:2"},
}
PAIR_FILES = ("train_src", "train_tgt", "dev_src", "dev_tgt", "test_src", "test_tgt")
CELL = "cell.json"           # in each cell's run directory: what the cell is
CELL_ERROR = "cell-error.txt"  # a failed cell's error
CELL_LOG = "cell.log"        # the cell's stderr
STUDY = "study.json"         # in the study directory: the study file's content and its cells
# Grid keys that name a cell's position in the paper's tables; any other grid key is a "variant".
AXES = ("method", "pair", "lr", "seed")


@dataclass
class Cell:
    name: str
    method: str
    pair: str
    lr: float
    seed: int
    variant: dict[str, Any]          # the other grid keys of this cell
    settings: dict[str, Any] = field(repr=False)  # the TrainConfig fields (without out)

    def describe(self) -> dict[str, Any]:
        return {"cell": self.name, "method": self.method, "pair": self.pair, "lr": self.lr, "seed": self.seed,
                "variant": self.variant}


class StudyError(ConfigError):
    """A study file that cannot run; the message names the key."""


# -- the study file ------------------------------------------------------------------------------
def load_study(path: str) -> tuple[dict[str, Any], list[Cell]]:
    """The study file's content and its cells, every one checked (TrainConfig accepts it, its files
    exist) before anything runs."""
    try:
        spec = load_toml(path)
    except ConfigError as e:
        raise StudyError(str(e).replace("--config: ", "")) from None
    return spec, expand(spec, os.path.dirname(os.path.abspath(path)), source=path)


def expand(spec: dict[str, Any], root: str, source: str = "study") -> list[Cell]:
    known = {"study", "base", "grid", "grids", "methods", "pairs"}
    for key in spec:
        if key not in known:
            raise StudyError(f"{source}: unknown table [{key}]; a study file has {', '.join(sorted(known))}")
    for key in ("study", "base", "grid", "methods", "pairs"):
        if not isinstance(spec.get(key, {}), dict):
            raise StudyError(f"{source}: {key} must be a table ([{key}]), not a {type(spec[key]).__name__}")
    base = dict(spec.get("base", {}))
    for key in AXES[:2]:
        if key in base:
            raise StudyError(f"{source}: [base] {key}: give it in [grid] (a list)")
    for name, m in spec.get("methods", {}).items():
        if not isinstance(m, dict):
            raise StudyError(f"{source}: [methods.{name}] must be a table of settings")
    methods = {**METHODS, **{k: dict(v) for k, v in spec.get("methods", {}).items()}}
    pairs = {"bundled": {}, **_pairs(spec.get("pairs", {}), root, source)}
    if "grid" in spec and "grids" in spec:
        raise StudyError(f"{source}: give [grid] or [[grids]], not both")
    grids = spec.get("grids") or [spec.get("grid", {})]
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise StudyError(f"{source}: [[grids]] must be tables")
    fields = set(TrainConfig.field_names())
    default_lr = base.get("lr", TrainConfig.lr)
    default_seed = base.get("seed", TrainConfig.seed)
    cells: dict[str, Cell] = {}
    for gi, grid in enumerate(grids):
        where = "[grid]" if len(grids) == 1 else f"[[grids]] #{gi + 1}"
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
        for key, values in axes.items():
            if key not in AXES and key.replace("-", "_") not in fields:
                raise StudyError(f"{source}: {where} {key}: not a setting of pyasgd-train nor one of {', '.join(AXES)}")
            if not values:
                raise StudyError(f"{source}: {where} {key}: give at least one value")
            if not all(isinstance(v, (str, int, float, bool)) for v in values):
                raise StudyError(f"{source}: {where} {key}: give a list of values (strings, numbers or booleans)")
            if key in ("method", "pair") and not all(isinstance(v, str) for v in values):
                raise StudyError(f"{source}: {where} {key}: give a list of names (strings)")
        axes.setdefault("method", ["async-globalN"])
        axes.setdefault("pair", ["bundled"])
        for m in axes["method"]:
            if m not in methods:
                raise StudyError(f"{source}: {where} method: unknown method {m!r}; built in: "
                                 f"{', '.join(METHODS)}; or define [methods.{m}]")
        for p in axes["pair"]:
            if p not in pairs:
                raise StudyError(f"{source}: {where} pair: unknown pair {p!r}; define [pairs.{p}] with "
                                 f"{', '.join(PAIR_FILES[:4])}" + (f" (defined: {', '.join(pairs)})" if pairs else ""))
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            method, pair = values.pop("method"), values.pop("pair")
            lr, seed = values.pop("lr", default_lr), values.pop("seed", default_seed)
            variant = {k.replace("-", "_"): v for k, v in values.items()}
            settings = {**base, **methods[method], **pairs[pair], **variant, "lr": lr, "seed": seed, "quiet": True}
            if settings.get("global_accum", 0) is None:
                settings.pop("global_accum")
            name = cell_name(method, pair, lr, seed, variant)
            try:
                TrainConfig.from_dict(settings, source=f"{source}: cell {name}")
            except ConfigError as e:
                raise StudyError(f"{source}: {where}: {e}") from None
            cells.setdefault(name, Cell(name, method, pair, float(lr), int(seed), variant, settings))
    if not cells:
        raise StudyError(f"{source}: the grid has no cells")
    return list(cells.values())


def _pairs(pairs: dict[str, Any], root: str, source: str) -> dict[str, dict[str, str]]:
    out = {}
    for name, files in pairs.items():
        if not isinstance(files, dict):
            raise StudyError(f"{source}: [pairs.{name}] must be a table of files")
        for key in files:
            if key not in PAIR_FILES:
                raise StudyError(f"{source}: [pairs.{name}] {key}: unknown; a pair has {', '.join(PAIR_FILES)}")
        for key in PAIR_FILES[:4]:
            if key not in files:
                raise StudyError(f"{source}: [pairs.{name}] {key}: missing (a pair needs {', '.join(PAIR_FILES[:4])})")
        resolved = {}
        for key, path in files.items():
            if not isinstance(path, str) or not path:
                raise StudyError(f"{source}: [pairs.{name}] {key}: give a file path (a string)")
            full = path if os.path.isabs(path) else os.path.join(root, path)
            if not os.path.isfile(full):
                raise StudyError(f"{source}: [pairs.{name}] {key}: no such file {full}"
                                 + ("; build it with pyasgd-data bible (see the study file's comments)"))
            resolved[key] = full
        out[name] = resolved
    return out


def cell_name(method: str, pair: str, lr: float, seed: int, variant: dict[str, Any]) -> str:
    rate = f"lr{lr:g}" if isinstance(lr, (int, float)) else f"lr{lr}"  # not a number: TrainConfig names --lr
    parts = [method] + ([] if pair == "bundled" else [pair]) + [rate, f"s{seed}"]
    parts += [f"{k}{v}" for k, v in sorted(variant.items())]
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", "-".join(str(p) for p in parts))


# -- running ---------------------------------------------------------------------------------------
def cell_status(run_dir: str) -> str:
    if os.path.isfile(os.path.join(run_dir, rundir.SUMMARY)):
        return "done"
    if os.path.isfile(os.path.join(run_dir, CELL_ERROR)):
        return "failed"
    return "unfinished" if os.path.isdir(run_dir) else "new"


def studies_run(out: str) -> list[dict[str, Any]]:
    """The study files run into `out`, in order, each with its spec and cells (from study.json;
    a directory written before several studies could share one holds a single study)."""
    path = os.path.join(out, STUDY)
    if not os.path.isfile(path):
        return []
    data = rundir.read_json(path)
    return data.get("studies", [data] if "study_file" in data else [])


def record_study(out: str, path: str, spec: dict[str, Any], cells: list[Cell]) -> None:
    """Add (or refresh) this study file's entry in study.json; other studies run into the same
    directory (e.g. the paper's grid, then the beyond-the-paper one) keep theirs."""
    entry = {"study_file": os.path.abspath(path), "spec": spec, "cells": [c.describe() for c in cells]}
    studies = [s for s in studies_run(out) if s.get("study_file") != entry["study_file"]] + [entry]
    rundir.write_json(os.path.join(out, STUDY), {"studies": studies})


def run_study(path: str, out: str, jobs: int = 1, echo=print) -> int:
    """Run every unfinished cell; returns the number of cells that failed."""
    spec, cells = load_study(path)
    if jobs < 1:
        raise StudyError(f"--jobs: must be >= 1, got {jobs}")
    os.makedirs(out, exist_ok=True)
    record_study(out, path, spec, cells)
    _STOPPING.clear()
    total = len(cells)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0

    def one(item: tuple[int, Cell]) -> bool:
        i, cell = item
        tag = f"[{i}/{total}] {cell.name}"
        run_dir = os.path.join(out, cell.name)
        if cell_status(run_dir) == "done":
            echo(f"{tag}: finished earlier, skipped")
            return True
        t = time.monotonic()
        ok, message = run_cell(cell, run_dir, threads)
        took = time.monotonic() - t
        if ok or _STOPPING.is_set():
            echo(f"{tag}: {message} ({took:.0f} s)")
        else:
            echo(f"{tag}: FAILED after {took:.0f} s: {message}")
        return ok

    items = list(enumerate(cells, 1))
    started = time.monotonic()
    pool = ThreadPoolExecutor(jobs) if jobs > 1 else None
    try:
        results = list(pool.map(one, items)) if pool else [one(item) for item in items]
    except BaseException:  # Ctrl-C or SIGTERM (see study_cli): stop the running cells first
        stop_cells()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    failed = results.count(False)
    took = time.monotonic() - started
    echo(f"pyasgd-study: {total - failed} of {total} cells finished, {failed} failed, in {took / 60:.1f} min "
         f"with --jobs {jobs}; pyasgd-study report {out}")
    return failed


# The cells' processes now running, so that an interrupted study stops them (each saves its
# checkpoint) instead of leaving them behind. They run in their own sessions: a Ctrl-C reaches
# the study alone, which passes one SIGTERM to each (two signals would make a run stop unsaved).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def stop_cells(timeout: float = 300.0) -> None:
    """Ask every running cell to stop (SIGTERM: it saves a checkpoint and exits), start no more,
    and wait for them; one that outlasts `timeout` is killed (its last periodic checkpoint stays)."""
    _STOPPING.set()
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_cell(cell: Cell, run_dir: str, threads: int = 0) -> tuple[bool, str]:
    """Train one cell in its own process (a crash or a leak stays there): resumed from its
    checkpoint where a previous try left one, else from the start."""
    if os.path.isdir(run_dir):  # held while it is looked at, cleared and written: a run in it is not deleted
        try:
            rundir.lock(run_dir, "cell")
        except ConfigError as e:  # another study, or a pyasgd-train, is running it: touch nothing
            return False, f"{e}; not started"
    try:
        argv = _prepare_cell(cell, run_dir)
    finally:
        rundir.release(run_dir)  # the cell's own pyasgd-train takes it
    return _run_cell_process(run_dir, argv, threads)


def _prepare_cell(cell: Cell, run_dir: str) -> list[str]:
    """The cell's directory made ready (a try that left nothing to continue from is cleared), and
    pyasgd-train's arguments for it."""
    status = cell_status(run_dir)
    resumable = os.path.isfile(os.path.join(run_dir, rundir.CHECKPOINT)) and \
        os.path.isfile(os.path.join(run_dir, rundir.CONFIG))
    if status in ("unfinished", "failed") and not resumable:
        shutil.rmtree(run_dir)  # nothing to continue from: start again
    elif status == "failed":
        os.remove(os.path.join(run_dir, CELL_ERROR))
    os.makedirs(run_dir, exist_ok=True)
    rundir.write_json(os.path.join(run_dir, CELL), cell.describe())
    cfg_path = os.path.join(run_dir, "cell.toml")
    if resumable:
        return ["--resume", run_dir, "--quiet"]
    _write_toml(cfg_path, {**cell.settings, "out": run_dir})
    return ["--config", cfg_path]


def _run_cell_process(run_dir: str, argv: list[str], threads: int) -> tuple[bool, str]:
    """Run the cell's pyasgd-train; (finished, its result line or why it failed)."""
    resumable = argv[0] == "--resume"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(os.path.join(run_dir, CELL_LOG), "a", encoding="utf-8") as log, _LIVE_LOCK:
        if _STOPPING.is_set():
            return False, "not started: the study is stopping"
        proc = subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=log, env=env, start_new_session=True)
        _LIVE.add(proc)
    try:
        proc.wait()
    except BaseException:  # interrupted in this thread (--jobs 1): stop the cell before leaving it
        stop_cells()
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    if _STOPPING.is_set():
        return False, f"stopped (exit code {proc.returncode}); run the study again to resume it"
    if proc.returncode == 0 and os.path.isfile(os.path.join(run_dir, rundir.SUMMARY)):
        s = rundir.read_json(os.path.join(run_dir, rundir.SUMMARY))
        return True, _result_line(s, resumed=resumable)
    with open(os.path.join(run_dir, CELL_LOG), encoding="utf-8") as f:
        tail = [line.rstrip() for line in f.readlines()[-20:] if line.strip()]
    why = next((line for line in reversed(tail) if "error" in line.lower() or "failed" in line.lower()),
               tail[-1] if tail else f"exit code {proc.returncode}")
    with open(os.path.join(run_dir, CELL_ERROR), "w", encoding="utf-8") as f:
        f.write(f"exit code {proc.returncode}\n" + "\n".join(tail) + "\n")
    return False, why


def _result_line(s: dict[str, Any], resumed: bool) -> str:
    bits = ["resumed and finished" if resumed else "finished"]
    if s.get("best_valid_bleu") is not None:
        bits.append(f"dev BLEU {s['best_valid_bleu']:.2f}")
    elif s.get("best_valid") is not None:
        bits.append(f"dev {s.get('primary_metric')} {s['best_valid']:.4g}")
    if s.get("test_bleu") is not None:
        bits.append(f"test BLEU {s['test_bleu']:.2f}")
    bits.append(f"{s['updates']} updates")
    if s.get("epochs") is not None:
        bits.append(f"{s['epochs']:.2f} epochs")
    bits.append(f"stopped: {s['stopped_because']}")
    return ", ".join(bits)


def _write_toml(path: str, settings: dict[str, Any]) -> None:
    lines = []
    for k, v in sorted(settings.items()):
        if v is None:
            continue
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
