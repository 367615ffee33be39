"""The shared region's Python face: versioned parameters and the lock-free gradient ring in one
shared-memory segment (csrc/region.h has the protocol), as torch tensors. Segments live in
/dev/shm, or in the tmpfs directory named by PYASGD_SHM_DIR.

    region = SharedRegion.create(n=P, slots=N + G)           # launcher (owner); grad_dtype=bf16: 2-byte slots
    region = SharedRegion.attach(name)                       # worker / server (spawned)
    version = region.pull(params)                            # worker: consistent snapshot
    region.push(grad, version=version, tokens=T, worker=i)   # worker: lock-free slot claim
    batch = region.collect(G)                                # server: G earliest arrivals
    front, back = region.front(), region.begin_update()      # server: the published and the back buffer
    ok = fused_adam_step(front, m, v, batch.grads, ..., param_out=back)  # read one, write the other
    region.end_update(batch, publish=ok)                     # publish (or not), release the slots

The region is a transport: it knows the slot layout and the publish protocol, never the update.

Staleness of a collected gradient = the version published when it is applied − the version it
was computed from: the number of updates it missed (0 in synchronous SGD, N−1 in round-robin
asynchronous SGD with N workers).
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
import signal
import threading
import weakref
from dataclasses import dataclass, field

import torch

from pyasgd.core import ext as _ext
from pyasgd.core.flat import check_flat

__all__ = ["SharedRegion", "GradientBatch", "RegionTimeoutError", "RegionClosedError", "RegionSpaceError",
           "default_slots", "publish_slice"]

_C = _ext.ext()
RegionTimeoutError = _C.RegionTimeoutError
RegionClosedError = _C.RegionClosedError
RegionSpaceError = _C.RegionSpaceError  # an OSError: the shm directory cannot hold the region
FREE, WRITING, READY, READING = 0, 1, 2, 3
# What the gradient slots may hold, and its code in the segment's header. bf16 halves the bytes a
# push writes and the server reads; pushers round to nearest even while copying in.
GRAD_DTYPES = {torch.float32: _C.GRAD_F32, torch.bfloat16: _C.GRAD_BF16}


def default_slots(workers: int, global_accum: int) -> int:
    """Room for every worker to be writing one gradient while the server reads G: pushers then
    wait only when the server falls behind, never because of each other."""
    return workers + global_accum


@dataclass
class GradientBatch:
    """G collected gradients, in arrival order, with what the server needs to apply them."""
    slots: list[int]
    grads: list[torch.Tensor]  # views of the slot buffers (the region's grad_dtype); valid until released
    workers: list[int]
    versions: list[int]
    tokens: list[int]
    losses: list[float]
    push_seqs: list[int]
    staleness: list[int]
    reclaimed: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, pid, worker)
    bounds: list[float] = field(default_factory=list)  # max |g| per gradient (see fused_adam_step)
    positions: list[int] = field(default_factory=list)  # each pusher's data position after it

    @staticmethod
    def merge(batches: list[GradientBatch]) -> GradientBatch:
        """One batch of the gradients collected one at a time (in arrival order)."""
        names = [f.name for f in dataclasses.fields(GradientBatch)]
        return GradientBatch(**{name: [x for b in batches for x in getattr(b, name)] for name in names})


_owned: weakref.WeakSet = weakref.WeakSet()
_handlers_installed = False
_install_lock = threading.Lock()


def _cleanup_owned() -> None:
    for region in list(_owned):
        region.close()


def _on_signal(signum, frame):  # owner killed by SIGTERM: remove its segments, then die of it
    _cleanup_owned()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_owner_handlers() -> None:
    global _handlers_installed
    with _install_lock:
        if _handlers_installed:
            return
        _handlers_installed = True
        atexit.register(_cleanup_owned)
        if threading.current_thread() is threading.main_thread():
            # Only where nobody else handles it: a launcher with its own handler calls close().
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_signal)
        # SIGINT raises KeyboardInterrupt, which unwinds through `with`/finally and atexit.
        # SIGKILL cannot be handled: the next create() sweeps segments whose owner is dead (the
        # kernel dropped the owner's lock on the segment with its last file descriptor).


def _from_handle(attr: str, doc: str) -> property:
    """A read-only property read from the open segment's handle."""
    return property(lambda self: getattr(self._handle(), attr), doc=doc)


class SharedRegion:
    """One run's shared-memory segment. Create it in the launcher (the owner, which unlinks it on
    every exit path), attach to it by name in spawned processes."""

    def __init__(self, handle, *, pin: bool = False) -> None:
        self._h = handle
        mem = handle.memory()
        n = handle.n
        self.grad_dtype = next(d for d, code in GRAD_DTYPES.items() if code == handle.grad_dtype)
        self.params = [torch.frombuffer(mem, dtype=torch.float32, count=n, offset=handle.param_offset(i))
                       for i in (0, 1)]
        self.slot_buffers = [torch.frombuffer(mem, dtype=self.grad_dtype, count=n, offset=handle.slot_offset(k))
                             for k in range(handle.slots)]
        self._pinned = False
        self._ticket = None
        if pin:
            self._pin()
        if handle.is_owner:
            _owned.add(self)
            _install_owner_handlers()

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    def create(cls, n: int, slots: int, *, pin: bool = False,
               grad_dtype: torch.dtype = torch.float32) -> SharedRegion:
        """A new region for `n` fp32 parameters and `slots` gradient slots of `grad_dtype`
        (torch.float32, or torch.bfloat16: pushes are rounded to nearest even). Stale `pyasgd-*`
        segments whose owner died are removed first. All of the region's memory is reserved
        here: RegionSpaceError (an OSError saying how much is needed and free) when /dev/shm, or
        PYASGD_SHM_DIR, is too small."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1 (the number of fp32 parameters), got {n}")
        if int(slots) < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be torch.float32 or torch.bfloat16, got {grad_dtype}")
        return cls(_C.Region.create(int(n), int(slots), GRAD_DTYPES[grad_dtype]), pin=pin)

    @classmethod
    def attach(cls, name: str, *, pin: bool = False) -> SharedRegion:
        return cls(_C.Region.attach(name), pin=pin)

    def _pin(self) -> None:
        """Register the mapping as pinned memory so CUDA copies go by DMA."""
        if not torch.cuda.is_available():
            return
        if _ext.cuda_built():
            _C.cuda_host_register(self._h.address, self._h.size)
        else:
            err = torch.cuda.cudart().cudaHostRegister(self._h.address, self._h.size, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the shared region failed ({err})")
        self._pinned = True

    def close(self) -> None:
        """Detach (and, for the owner, unlink). Tensors taken from this region (params,
        slot_buffers, a batch's grads) stay readable: each keeps the mapping alive, and it is
        unmapped when the last of them is gone. They are no longer pinned, and once the owner has
        closed, the memory is no run's any more."""
        h = self._h
        if h is None:
            return
        self.params = []
        self.slot_buffers = []
        if self._pinned:
            if _ext.cuda_built():
                _C.cuda_host_unregister(h.address)
            else:
                torch.cuda.cudart().cudaHostUnregister(h.address)
            self._pinned = False
        if h.is_owner:
            h.close()  # wake every waiter: they raise RegionClosedError instead of hanging
            h.unlink()
        self._h = None
        _owned.discard(self)

    def shutdown(self) -> None:
        """Tell every process waiting on the region to stop waiting (they get RegionClosedError)."""
        self._handle().close()

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise RuntimeError("the shared region is closed")
        return self._h

    name = _from_handle("name", "The segment's name (pyasgd-<pid>-<random>).")
    path = _from_handle("path", "The segment's file (in /dev/shm or PYASGD_SHM_DIR).")
    n = _from_handle("n", "Parameters per buffer.")
    slots = _from_handle("slots", "Gradient slots in the ring.")
    version = _from_handle("version", "The published version (server updates published so far).")
    reclaimed = _from_handle("reclaimed", "Slots taken back from pushers that died mid-push.")

    # -- parameters -----------------------------------------------------------------------------

    def publish(self, params: torch.Tensor) -> int:
        """Write a whole new parameter vector (e.g. the initial one) and publish it."""
        check_flat("params", params, self.n, of="the region")
        back, ok = self.begin_update(), False
        try:
            back.copy_(params.reshape(-1))
            ok = True
        finally:
            self.end_update(None, publish=ok)
        return self.version

    def front(self) -> torch.Tensor:
        """Server (the only writer): the published buffer, i.e. the current parameters, as a view
        read in place. It is the version `self.version` until end_update(publish=True) makes the
        back buffer the front; nobody else may rely on it (readers pull(), which validates)."""
        return self.params[self._handle().front_index()]

    def begin_update(self) -> torch.Tensor:
        """Server: start writing the next parameters; returns the back buffer to write them into
        (readers keep pulling the published one meanwhile). It holds an older version, or
        nothing valid: write every element before publishing it. Always pair with end_update()."""
        return self.params[self._handle().begin_write()]

    def end_update(self, batch: GradientBatch | None, *, publish: bool) -> int:
        """Server: publish what was written into the back buffer as the next version (or, with
        publish=False, keep the current one), then release the batch's slots, which acks their
        pushers, whatever happened. Returns the published version."""
        h = self._handle()
        try:
            return h.end_write(bool(publish))
        finally:
            if batch is not None:
                h.release(batch.slots)

    def pull(self, dst: torch.Tensor) -> int:
        """Copy the published parameters into `dst` (CPU or CUDA) and return their version. Never
        a mix of two versions; never blocks the server."""
        h = self._handle()
        check_flat("dst", dst, h.n, of="the region")
        if dst.device.type == "cpu":
            return h.pull_cpu(dst.data_ptr())
        while True:
            version, idx, seq = h.read_begin()
            dst.copy_(self.params[idx])  # synchronous: done before validation
            if h.read_validate(idx, seq):
                return version

    def wait_version(self, above: int, timeout: float = 60.0) -> int:
        """Block (futex, no spinning) until the published version exceeds `above`."""
        return self._handle().wait_version(int(above), float(timeout))

    # -- gradient ring --------------------------------------------------------------------------

    def push(self, grad: torch.Tensor, *, version: int, tokens: int = 0, worker: int = -1,
             loss: float = 0.0, position: int = 0, timeout: float = 60.0) -> int:
        """Claim a free slot (lock-free), copy `grad` (fp32) in, rounded to bf16 in a bf16 region,
        measuring max |g| (of the rounded values) on the way, and mark it ready. Waits with backoff while
        every slot is taken and raises RegionTimeoutError after `timeout` seconds. `position` (an
        int64 the region carries untouched: the pusher's data position after this gradient)
        reaches the server with it. Returns the push sequence number."""
        h = self._handle()
        check_flat("grad", grad, h.n, of="the region")
        if version < 0 or tokens < 0 or position < 0:
            raise ValueError(f"version, tokens and position must be >= 0, got {version}, {tokens}, {position}")
        if grad.device.type == "cpu":
            ticket = h.push_cpu(grad.data_ptr(), int(worker), int(version), int(tokens), float(loss), int(position),
                                float(timeout))
        else:
            ticket = _push_cuda(self, grad, int(worker), int(version), int(tokens), float(loss), int(position),
                                     float(timeout))
        self._ticket = ticket
        return ticket.push_seq

    def wait_processed(self, timeout: float = 60.0) -> None:
        """Wait until the server has processed this process's last push: taken into its
        accumulation, or (when it completed G gradients) applied and published. Pulling after
        this is the parameter-server order the paper's staleness figures assume."""
        if self._ticket is not None:
            self._handle().wait_ack(self._ticket, float(timeout))

    def ack(self, batch: GradientBatch) -> None:
        """Server: the batch's gradients are in the accumulation; their pushers may pull."""
        self._handle().ack(batch.slots)

    def collect(self, G: int, timeout: float = 60.0) -> GradientBatch:
        """Wait for G ready gradients and take the G earliest arrivals (marked in use until
        release()). Slots held by dead writers are reclaimed meanwhile and reported."""
        h = self._handle()
        if not 1 <= G <= h.slots:
            raise ValueError(f"G must be between 1 and the region's {h.slots} slots, got {G}")
        got, reclaimed = h.collect(int(G), float(timeout))
        current = h.version
        return GradientBatch(
            slots=[c.slot for c in got],
            grads=[self.slot_buffers[c.slot] for c in got],
            workers=[c.worker for c in got],
            versions=[c.version for c in got],
            tokens=[c.tokens for c in got],
            losses=[c.loss for c in got],
            push_seqs=[c.push_seq for c in got],
            staleness=[current - c.version for c in got],
            reclaimed=[(r.slot, r.pid, r.worker) for r in reclaimed],
            bounds=[c.bound for c in got],
            positions=[c.position for c in got],
        )

    def release(self, batch: GradientBatch) -> None:
        self._handle().release(batch.slots)

    def slot_state(self, k: int) -> int:
        return self._handle().slot_state(k)

    def reclaim_dead(self) -> list[tuple[int, int, int]]:
        return [(r.slot, r.pid, r.worker) for r in self._handle().reclaim_dead()]


def _push_cuda(region: SharedRegion, grad: torch.Tensor, worker: int, version: int, tokens: int, loss: float, position: int,
               timeout: float):
    """A CUDA gradient into a pinned slot. With pyasgd's CUDA build and a mapped region, one
    kernel stores it straight into the slot (device -> host; rounded to bf16 in a bf16
    region) and measures max |g| in the same pass; otherwise torch rounds (bf16) and measures
    the bound first and copies after. Either way the claim is given back if anything fails
    between claim and commit, so no slot leaks."""
    h = region._handle()
    bf16 = region.grad_dtype == torch.bfloat16
    fused = region._pinned and _ext.cuda_built()
    bound = math.nan
    src = grad.detach().reshape(-1)
    if not fused:  # before the claim: an error here holds nothing
        if bf16:
            src = src.to(torch.bfloat16)  # nearest even, as the fused kernel rounds
        bound = float(src.abs().amax())  # of what the slot will hold
    slot = h.claim(worker, timeout)
    try:
        if fused:
            stream = torch.cuda.current_stream(grad.device)
            copy = _C.cuda_copy_bf16_absmax if bf16 else _C.cuda_copy_absmax
            bound = copy(region.slot_buffers[slot].data_ptr(), grad.data_ptr(), h.n, grad.device.index,
                         stream.cuda_stream)  # synchronises
        else:
            region.slot_buffers[slot].copy_(src)  # device -> pinned host, synchronous
    except BaseException:
        h.abandon(slot)
        raise
    return h.commit(slot, version, tokens, loss, bound if math.isfinite(bound) else math.inf, position)


def publish_slice(region, lo: int, hi: int, write) -> None:
    """Publish a new region version that differs from the current one in [lo, hi) only:
    `write(front_slice, back_slice)` writes that part and says whether to publish."""
    front = region.front()
    back = region.begin_update()
    publish = False
    try:
        back[:lo].copy_(front[:lo])
        back[hi:].copy_(front[hi:])
        publish = write(front[lo:hi], back[lo:hi])
    finally:
        region.end_update(None, publish=publish)
