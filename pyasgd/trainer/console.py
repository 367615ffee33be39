"""What a run tells its user, through the standard `logging` module (the logger "pyasgd"):

- on stderr, at --log-level (warnings and errors only with --quiet), each line with a timestamp;
- in RUN_DIR/train.log, the same lines at info and above (lines logged before the run directory
  existed, such as the corpus being read, are written there when it is made);
- progress: a tqdm bar when stderr is a terminal, else a line every --log-every seconds (a log
  file or a pipe then holds lines, never carriage returns); a line at each validation too.

`Console` is set up by `pyasgd.train` for one run and removes its handlers at the end, so a
program that calls train() several times (tests, a study) gets each run's lines once. Code that
wants to report progress (decoding the test set) asks `progress()` for the active run's
settings; without a run it logs nothing extra.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from pyasgd.trainer import rundir
from pyasgd.trainer.runlog import SHOWN

LOG = logging.getLogger("pyasgd")
FORMAT = "%(asctime)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_active: "Console | None" = None


class _Stderr(logging.StreamHandler):
    """stderr, written through tqdm while a bar is drawn (so a line does not cut the bar); the
    periodic progress lines are left out while a bar shows the same, and what the caller prints
    itself (file_only: a failure cli.main reports) is left to train.log."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False) or (self.bar is not None and getattr(record, "progress", False)):
            return
        if self.bar is None:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class _Early(logging.Handler):
    """Keeps what was logged before the run directory existed, for train.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _File(logging.FileHandler):
    """train.log. A write that fails (a full disk) is not logging's traceback on stderr: the
    handler says once on stderr that train.log stops there, and drops out (the run itself
    stops on its next checkpoint or metrics record, saying what filled up)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):  # not the disk: logging's own report
            super().handleError(record)
            return
        LOG.removeHandler(self)
        why = getattr(err, "strerror", None) or str(err)
        LOG.warning(f"{self.baseFilename}: cannot write ({why}); what follows goes to stderr only")


class Console:
    """The logging of one run: a stderr handler now, train.log once the run directory is known."""

    def __init__(self, config) -> None:
        self.config = config
        level = logging.WARNING if config.quiet else LEVELS[config.log_level]
        fmt = logging.Formatter(FORMAT, DATEFMT)
        self.stderr = _Stderr()
        self.stderr.setLevel(level)
        self.stderr.setFormatter(fmt)
        self.early: _Early | None = _Early()
        self.file: logging.FileHandler | None = None
        self.tty = _isatty(sys.stderr)
        self._saved = (LOG.level, LOG.propagate)
        LOG.setLevel(min(level, logging.INFO))
        LOG.propagate = False  # an application's root handlers would print each line twice
        LOG.addHandler(self.stderr)
        LOG.addHandler(self.early)

    # -- the run directory ----------------------------------------------------------------------
    def attach(self, run_dir: str) -> None:
        """Write train.log in `run_dir` (appended to on a resume), beginning with what was logged
        before it existed."""
        if self.file is not None:
            return
        self.file = _File(os.path.join(run_dir, rundir.TRAIN_LOG), encoding="utf-8")
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        LOG.addHandler(self.file)  # first: a replay that fails removes it, and says so once
        if self.early is not None:
            LOG.removeHandler(self.early)
            for r in self.early.records:
                self.file.handle(r)
            self.early = None

    def close(self) -> None:
        global _active
        for h in (self.stderr, self.early, self.file):
            if h is not None:
                LOG.removeHandler(h)
                try:
                    h.close()
                except OSError:  # train.log on a full disk: _File said so already
                    pass
        LOG.setLevel(self._saved[0])
        LOG.propagate = self._saved[1]
        if _active is self:
            _active = None

    def __enter__(self) -> "Console":
        global _active
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- progress -----------------------------------------------------------------------------------
    def bars(self) -> bool:
        """Whether progress is drawn as a bar: stderr is a terminal that shows info lines."""
        return self.tty and self.stderr.level <= logging.INFO


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def active() -> Console | None:
    return _active


class Progress:
    """The progress of a loop towards `total` (None: unknown): a tqdm bar on a terminal, else a
    line every --log-every seconds, made by `line()`. Every line also goes to train.log."""

    def __init__(self, what: str, total: int | None, initial: int = 0, unit: str = "upd",
                 line: Callable[[int], str] | None = None, every: float | None = None) -> None:
        con = _active
        self.what, self.total, self.n = what, total, initial
        self.line = line or (lambda n: f"{what}: {n:,}" + (f"/{total:,}" if total else ""))
        self.every = (con.config.log_every if con is not None else 0.0) if every is None else every
        self.last = time.monotonic()
        self.bar = None
        self.con = con
        if con is not None and con.bars():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=initial, unit=unit, desc=what, file=sys.stderr,
                            dynamic_ncols=True, leave=False)
            con.stderr.bar = self.bar

    def update(self, n: int, postfix: dict[str, Any] | None = None) -> None:
        """Progress is now `n`."""
        if self.con is None:
            return
        if self.bar is not None:
            self.bar.update(max(0, n - self.bar.n))
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        self.n = n
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            LOG.info(self.line(n), extra={"progress": True})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.con is not None and self.con.stderr.bar is self.bar:
                self.con.stderr.bar = None
            self.bar = None


def limits_text(c) -> str:
    """When the run stops, in words: "480 s" or "2,000 updates or 16 epochs"."""
    return " or ".join(x for x in (f"{c.max_updates:,} updates" if c.max_updates else "",
                                   f"{c.max_epochs:g} epochs" if c.max_epochs else "",
                                   f"{c.max_time:g} s" if c.max_time else "") if x)


def summary_line(s: dict[str, Any]) -> str:
    """The last line of a run: why it stopped, how good, how fast, where."""
    primary = s.get("primary_metric") or "loss"
    parts = [f"finished ({s.get('stopped_because')}) after {s.get('updates', 0):,} updates"]
    if s.get("best_valid") is not None:
        parts.append(f"best dev {SHOWN.get(primary, primary)} {s['best_valid']:.2f} "
                     f"(update {s.get('best_valid_update', 0):,})")
    if s.get("test_bleu") is not None:
        parts.append(f"test BLEU {s['test_bleu']:.2f}")
    if s.get("wps"):
        parts.append(f"{s['wps']:,.0f} words/s")
    return ", ".join(parts) + f"; run directory {s.get('run_dir')}"
