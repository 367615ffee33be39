"""Build report: `python -m pyasgd.info` prints what the extension was built with and what it
will use on this machine."""
from __future__ import annotations

import platform
import sys

import torch


def build_info() -> dict:
    from pyasgd import __version__
    from pyasgd.core import ext as _ext

    info = {
        "pyasgd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "extension": "built" if _ext.available() else f"missing ({_ext.IMPORT_ERROR})",
    }
    if _ext.available():
        C = _ext.ext()
        info.update({
            "extension_version": C.__version__,
            "compiler": C.compiler,
            "cpu_simd": C.cpu_simd_level(),
            "cpu_threads": C.cpu_num_threads(),
            "cuda_built": bool(C.cuda_built),
            "cuda_archs": C.cuda_archs or "-",
            "cuda_devices": C.cuda_device_count(),
        })
    return info


def report() -> str:
    return "\n".join(f"{k:>18}: {v}" for k, v in build_info().items())


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
