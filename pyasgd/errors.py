"""The errors a user's input can raise, in a module of their own so that every layer (config, data,
run directory) can raise them without importing another layer."""
from __future__ import annotations

import os


class ConfigError(ValueError):
    """An invalid setting; the message names the option and how to fix it."""


class CorpusError(ConfigError):
    """A corpus that cannot be used; the message names the file and what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (empty, truncated, damaged, or not one pyasgd wrote);
    the message names the file and what is wrong, on one line."""


class MissingExtra(ConfigError):
    """An optional dependency is not installed; the message names the extra that brings it
    (pip install 'pyasgd[plots]', 'pyasgd[tensorboard]')."""


class SaveError(RuntimeError):
    """A file of the run could not be written (a full disk, a read-only or vanished directory):
    the message names the file and the cause on one line, and says what was kept. The run stops;
    the previous checkpoint stays whole (checkpoints are written to a temporary file and renamed)."""


def write_failure(path: str, e: BaseException) -> "SaveError":
    """SaveError for a failed write of `path`: the OS's reason (torch.save wraps it in a
    RuntimeError) and the space left where it was written."""
    import errno
    import shutil

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        room = f"; {_size(free)} free on its file system"
    except OSError:
        free, room = None, ""
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        why = "the disk is full (no space left on device)"
    elif isinstance(cause, OSError):
        why = cause.strerror or str(cause)
    else:
        why = (str(e).splitlines() or [type(e).__name__])[0]
    return SaveError(f"cannot write {path}: {why}{room}")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Terminated(Exception):
    """SIGTERM, raised in the launcher so the run stops as it does on Ctrl-C: the server saves,
    every process is stopped, summary.json says "terminated"."""


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing): for one-line messages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
