"""Process roles and signals: a child names itself for `ps -o comm` and `top` (pyasgd-server,
pyasgd-worker-R) and leaves SIGINT and SIGTERM to the launcher, which decides how the run ends."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
PR_SET_NAME = 15  # prctl(2): the thread's comm, at most 15 bytes
_parent_gone = False


def _prctl(option: int, arg) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_name(name: str) -> None:
    """Name this process (what `ps -o comm`, `top` and `pkill -x` see); a no-op off Linux."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))  # a convenience: never fails the run


def become_child(name: str, *, on_parent_death: str = "die") -> None:
    """What every server and worker process does first: take its name, ignore the signals a
    terminal or a scheduler sends to the whole process group (so the launcher can stop the run in
    order: the server saves before anyone goes), and arrange not to outlive the launcher should
    it be killed outright: on_parent_death="die" (a worker: SIGKILL), or "flag" (the server:
    parent_gone() turns true, so it can save and leave)."""
    set_name(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if on_parent_death == "flag":
        signal.signal(signal.SIGUSR1, _on_parent_death)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL if on_parent_death == "die" else signal.SIGUSR1)
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl took hold
        if on_parent_death == "die":
            os._exit(1)
        _on_parent_death(signal.SIGUSR1, None)


def run_reporting(queue, process: str, body, *args, **record) -> None:
    """Run a child's body; on an exception send the launcher an error record (the process's
    name, its traceback, any extra fields such as the worker's rank) and exit 1."""
    import traceback

    from pyasgd.errors import SaveError

    try:
        body(*args)
    except Exception as e:
        # a SaveError (a full disk) is the user's to fix: its one line is what the launcher reports
        said = {"message": str(e)} if isinstance(e, SaveError) else {}
        queue.put({"kind": "error", "process": process, **record, **said, "traceback": traceback.format_exc()})
        raise SystemExit(1)


def _on_parent_death(signum, frame) -> None:
    global _parent_gone
    _parent_gone = True


def parent_gone() -> bool:
    """True once the launcher that spawned this process has died."""
    return _parent_gone


def stop_resource_tracker() -> None:
    """Reap multiprocessing's resource tracker (started by the run's queue and events) so no
    child of ours outlives the launcher. Only for a process that owns every multiprocessing
    object it made, as pyasgd-train does, and only once none of its named semaphores is left:
    the tracker, stopped, unlinks those it still has as "leaked" (a warning), and each one's own
    finalizer then fails at exit (a FileNotFoundError traceback each). A failed run's queue and
    events may still be held (by the exception on its way out): then the tracker is left to exit
    by itself as this process does, after those finalizers have unregistered them."""
    import gc
    from multiprocessing import resource_tracker, synchronize, util

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is None:
        return
    gc.collect()  # a finished run's queue and events, if a reference cycle still holds them
    registry = getattr(util, "_finalizer_registry", None)
    if registry is None:
        return  # cannot tell whether any is left: let the tracker go by itself
    cleanup = getattr(synchronize.SemLock, "_cleanup", None)
    if cleanup is None or any(getattr(f, "_callback", None) is cleanup for f in list(registry.values())):
        return
    stop()
