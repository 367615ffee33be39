"""Atomic checkpoints: written to a temporary file, fsynced, renamed over the target (so a crash
leaves the old checkpoint or the new one, never half of one), loaded with weights_only=True.
`load_checked` loads a file a user points at (--resume, pyasgd-translate) and says in one line
what is wrong with one that is empty, truncated, damaged or not pyasgd's."""
from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from typing import Any

import torch

from pyasgd.errors import CheckpointError, write_failure

ZIP_START, ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # torch.save writes a zip archive; its end record
# What each kind of checkpoint holds (what the code that resumes or decodes from it reads):
# "train" the server's checkpoint.pt, "sim" the simulator's, "best" best.pt, "any" either file.
SERVER_KEYS = ("params", "exp_avg", "exp_avg_sq", "step")
SIM_KEYS = ("published", "version", "rr", "params", "pulled", "cursors", "finish", "clock", "order_rng", "torch_rng")
KINDS = ("train", "sim", "best", "any")


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """Write `obj` to `path` atomically. A failed write (a full disk) removes its temporary file,
    leaves the previous `path` whole and raises SaveError, one line naming the file and why."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself is durable
        finally:
            os.close(dfd)
    except (OSError, RuntimeError) as e:
        if not _os_error_in(e):  # not the disk's doing (a CUDA error, say): as it was
            raise
        raise write_failure(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _os_error_in(e: BaseException | None) -> bool:
    """Whether an OSError is `e` or in its chain (torch.save wraps the file's error)."""
    while e is not None:
        if isinstance(e, OSError):
            return True
        e = e.__cause__ or e.__context__
    return False


def load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checked(path: str, kind: str = "train", context: str = "") -> dict[str, Any]:
    """The checkpoint at `path`, loaded once and checked to be one pyasgd wrote of this `kind`
    (KINDS); anything else raises CheckpointError, one line: "{context}{path} is not a pyasgd
    checkpoint (truncated: ...)". A missing file is the caller's to report (FileNotFoundError)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")

    def broken(why: str) -> CheckpointError:
        return CheckpointError(f"{context}{path} is not a pyasgd checkpoint ({why})")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = f.read(len(ZIP_START))
            f.seek(max(0, size - (1 << 16) - 22))  # the end record: 22 bytes and a comment of < 64 KiB
            tail = f.read()
    except IsADirectoryError:
        raise broken("it is a directory") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{context}{path} cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise broken("empty: 0 bytes")
    if start != ZIP_START:
        raise broken(f"not written by torch.save: {size:,} bytes that are not a zip archive")
    if ZIP_END not in tail:
        raise broken(f"truncated: {size:,} bytes, the end of its zip archive is missing")
    why = _bad_checksum(path)  # torch.load does not check: damaged tensor data would load
    if why:
        raise broken(f"damaged: {why}")
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol, say: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises on a file it cannot read
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:
            raise broken("it holds objects other than tensors and plain values") from None
        first = text.split(". ")[0][:160] or type(e).__name__
        raise broken(f"damaged: {first}") from None
    why = _not_pyasgd(state, "train" if kind == "sim" else kind)
    if not why and kind == "sim":
        sim = state.get("sim")
        if not isinstance(sim, dict):
            raise CheckpointError(f"{context}{path} was written by a run of real processes, not by --simulate: "
                                  f"resume it without --simulate")
        missing = [k for k in SIM_KEYS if k not in sim]
        why = f"its 'sim' state lacks {', '.join(missing)}" if missing else ""
    if why:
        raise broken(why)
    return state


def _bad_checksum(path: str) -> str:
    """Why the zip archive at `path` is damaged (a member whose bytes do not match its CRC-32,
    a broken directory), or ''. One sequential read: a fraction of what torch.load takes."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:  # written without checksums (torch.serialization.set_crc32_options)
                    continue
                with z.open(info) as f:  # the CRC-32 is checked at the member's end
                    while f.read(1 << 24):
                        pass
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, or what a broken directory makes zipfile raise
        return " ".join(str(e).split())[:160] or type(e).__name__
    return ""


def params_of(state: dict[str, Any]) -> torch.Tensor:
    """The whole parameter vector of a checkpoint load_checked accepted: best.pt's, or the
    server's (a shard's owner keeps its view of every shard)."""
    if "params" in state:
        return state["params"]
    return state["view"] if "view" in state else state["server"]["params"]


def _not_pyasgd(state: Any, kind: str) -> str:
    """Why `state` is not a checkpoint of `kind`, or ''."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not the dict pyasgd writes"
    if kind == "any":
        kind = "best" if "params" in state else "train"
    if kind == "best":
        return _vector(state, "params", "") or ("" if isinstance(state.get("update"), int) else "no 'update' number")
    server = state.get("server")
    if not isinstance(server, dict):
        keys = ", ".join(repr(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "") or "nothing"
        return f"no 'server' state: it holds {keys}"
    missing = [k for k in SERVER_KEYS if k not in server]
    if missing:
        return f"its 'server' state lacks {', '.join(missing)}"
    why = _vector(server, "params", "server ")
    if why:
        return why
    for key in ("exp_avg", "exp_avg_sq"):
        if not isinstance(server[key], torch.Tensor) or server[key].shape != server["params"].shape:
            return f"its server {key} is not a tensor of the parameters' shape"
    if not isinstance(server["step"], int) or server["step"] < 0:
        return "its server step is not an update count"
    return _vector(state, "view", "") if "view" in state else ""


def _vector(d: dict, key: str, where: str) -> str:
    """'' when d[key] is a 1-D floating-point tensor, else why not."""
    t = d.get(key)
    if not isinstance(t, torch.Tensor):
        return f"no {where}{key!r} tensor"
    if t.dim() != 1 or not t.is_floating_point():
        return f"its {where}{key} is a {tuple(t.shape)} {t.dtype} tensor, not a vector of parameters"
    return ""
