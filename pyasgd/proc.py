"""Process roles and signals: a child names itself for `ps -o comm` and `top` (pyasgd-server,
pyasgd-worker-R) and leaves SIGINT and SIGTERM to the launcher, which decides how the run ends."""
from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_NAME = 15  # prctl(2): the thread's comm, at most 15 bytes


def set_name(name: str) -> None:
    """Name this process (what `ps -o comm`, `top` and `pkill -x` see); a no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # a name is a convenience, never a reason to fail


def become_child(name: str) -> None:
    """What every server and worker process does first: take its name, and ignore the signals a
    terminal or a scheduler sends to the whole process group, so the launcher can stop the run
    in order (the server saves before anyone goes)."""
    set_name(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_resource_tracker() -> None:
    """Reap multiprocessing's resource tracker (started by the run's queue and events) so no
    child of ours outlives the launcher. Only for a process that owns every multiprocessing
    object it made, as pyasgd-train does."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()
