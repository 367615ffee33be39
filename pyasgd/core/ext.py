"""Loads the compiled core (pyasgd._C) once; a missing build is reported, not fatal, so the
pure-PyTorch reference paths keep working."""
from __future__ import annotations

import importlib
from types import ModuleType

_C: ModuleType | None
try:
    _C = importlib.import_module("pyasgd._C")
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
    _C = None
    IMPORT_ERROR = f"{exc}. Build it with `pip install -e .` from the repository root."


def ext() -> ModuleType:
    """The compiled module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(f"pyasgd's C++ extension is not available: {IMPORT_ERROR}")
    return _C


def available() -> bool:
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and bool(_C.cuda_built)


def set_cpu_threads(n: int) -> None:
    """Threads of the CPU kernels' pool in this process (a no-op without the extension)."""
    if _C is not None:
        _C.cpu_set_num_threads(int(n))
