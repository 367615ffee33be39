"""The run directory: created (or reopened for --resume) before anything starts, so a bad
--out fails fast; summary.json is written last and atomically, so only a run that ended has one.
Every file name of a run directory is defined here."""
from __future__ import annotations

import fcntl
import json
import os
import time

from pyasgd.config import TrainConfig, resume_fixed_fields
from pyasgd.errors import ConfigError, write_failure

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREV_SUMMARY = "summary.prev.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
TRAIN_LOG = "train.log"  # what the run told its user (pyasgd/trainer/console.py)
TENSORBOARD = "tb"  # --tensorboard's event files
LOCK = ".lock"  # flock-ed by the process whose run uses the directory (lock())


def prepare(config: TrainConfig, tag: str = "") -> str:
    """The run directory: a resumed one (checked against the config it ran with) or a new one,
    default runs/<timestamp>-<mode><tag> (the topology's tag: nodes may share a filesystem).
    It is locked for this process (release() or the process's end lets it go): a second run, a
    resume or a study cell on a directory in use is refused, naming the pid that holds it."""
    if config.resume:
        d = config.resume
        if not os.path.isfile(os.path.join(d, CONFIG)):
            raise ConfigError(f"--resume: {d!r} is not a run directory (no {CONFIG})")
        lock(d, "--resume")  # before anything in it is touched
        try:
            if not os.path.isfile(os.path.join(d, CHECKPOINT)):
                raise ConfigError(f"--resume: {d!r} has no {CHECKPOINT} to continue from")
            saved = read_json(os.path.join(d, CONFIG))
            for name in resume_fixed_fields():
                if name in saved and saved[name] != getattr(config, name):
                    raise ConfigError(f"--resume: --{name.replace('_', '-')} is {getattr(config, name)!r} but the "
                                      f"run in {d} used {saved[name]!r}; a resumed run must keep it")
        except BaseException:
            release(d)
            raise
        try:
            if os.path.exists(os.path.join(d, SUMMARY)):
                os.replace(os.path.join(d, SUMMARY), os.path.join(d, PREV_SUMMARY))
        except OSError as e:
            release(d)
            raise write_failure(os.path.join(d, PREV_SUMMARY), e) from e
    else:
        d = config.out or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.mode}{tag}")
        for attempt in (0, 1):  # again under the lock: another run may have started meanwhile
            if os.path.exists(os.path.join(d, CONFIG)):
                release(d)
                pid = holder(d)
                if pid is not None:
                    raise ConfigError(f"--out: {d!r} is in use by another run (pid {_shown(pid)}); wait for it to end, "
                                      f"or choose another --out")
                raise ConfigError(f"--out: {d!r} already holds a run; pass --resume {d} to continue it, "
                                  f"or choose another --out")
            if attempt == 0:
                os.makedirs(d, exist_ok=True)
                lock(d, "--out")
    try:
        write_json(os.path.join(d, CONFIG), config.to_dict())
    except BaseException:
        release(d)
        raise
    return d


_held: dict[str, int] = {}  # run directory (real path) -> the descriptor of its lock, held by this process


def lock(d: str, option: str) -> None:
    """Hold run directory `d` for this process: an exclusive flock on d/.lock, which the kernel
    releases when the process ends however it ends (SIGKILL included), so a lock is never stale.
    ConfigError, naming the holder's pid, when another process holds it."""
    key = os.path.realpath(d)
    if key in _held:
        return
    fd = os.open(os.path.join(d, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + 0.25  # a holder() probe holds it shared for an instant: try again
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            pid = _pid_in(fd)
            os.close(fd)
            raise ConfigError(f"{option}: {d!r} is in use by another run (pid {_shown(pid)}); "
                              "wait for it to end, or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release(d: str) -> None:
    """Let run directory `d` go (the lock file stays: removing it would race with a new holder)."""
    fd = _held.pop(os.path.realpath(d), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)  # no pid of a process that no longer holds it
        except OSError:
            pass
        os.close(fd)


def release_all() -> None:
    """Let every run directory this process holds go (the end of a pyasgd.train call)."""
    for key in list(_held):
        release(key)


def holder(d: str) -> int | None:
    """The pid of the process that holds run directory `d`, or None when none does."""
    try:
        fd = os.open(os.path.join(d, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            return pid if pid is not None else 0  # held, by a pid not yet written
        return None
    finally:
        os.close(fd)


def _shown(pid: int | None) -> str:
    return str(pid) if pid else "?"


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def check_resume(config: TrainConfig) -> dict | None:
    """What --resume will read, checked before anything in the run directory is touched (before
    prepare() moves summary.json or rewrites config.json, before any process or shared region):
    its config.json (JSON, an object, settings TrainConfig takes) and its checkpoint.pt, whole
    and pyasgd's. Returns the loaded checkpoint (so it is read once), or None without --resume;
    raises ConfigError (CheckpointError for the checkpoint), one line naming the file."""
    if not config.resume:
        return None
    from pyasgd.core import checkpoint

    d = config.resume
    saved_settings(d)
    lock(d, "--resume")  # held from here: nobody else resumes it between this check and the run
    try:
        path = os.path.join(d, CHECKPOINT)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {d!r} has no {CHECKPOINT} to continue from")
        return checkpoint.load_checked(path, "sim" if config.simulate else "train", context="--resume: ")
    except BaseException:
        release(d)
        raise


def saved_settings(d: str, context: str = "--resume: ") -> dict:
    """The settings in run directory `d`'s config.json, checked: JSON, an object, settings
    TrainConfig takes (else ConfigError, one line, after `context`)."""
    path = os.path.join(d, CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{context}{d!r} is not a run directory (no {CONFIG})")
    try:
        saved = read_json(path)
    except OSError as e:
        raise ConfigError(f"{context}{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{context}{path} is not a run's settings (not JSON: {e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{context}{path} is not a run's settings (a JSON {type(saved).__name__}, "
                          f"not an object)")
    try:
        TrainConfig.from_dict(saved, source=path)
    except ConfigError as e:
        text = str(e).removeprefix(f"{path}: ")
        raise ConfigError(f"{context}{path} does not hold settings pyasgd-train takes: {text}") from None
    return saved


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write `obj` as JSON atomically; a failed write (a full disk) removes the temporary file,
    leaves `path` as it was and raises SaveError, one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise write_failure(path, e) from e
