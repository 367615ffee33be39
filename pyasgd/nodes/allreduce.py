"""Beyond one node, the servers' side: the M servers' gloo process group (over node 0's TCPStore)
and the synchronous round between them. Each node's server sums its N local gradients; one
all-reduce sums the M node sums and carries every node's stop vote, so all nodes apply the same
update to identical replicas of the parameters and Adam moments, and stop after the same one.

The slots are host memory and a CPU server reads them in place, so the collective is gloo on CPU
tensors (a CUDA server's summed gradient goes to its GPU afterwards, as on one node)."""
from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import socket
import time
from typing import Callable

import torch

from pyasgd.config import TrainConfig
from pyasgd.errors import first_line
from pyasgd.nodes import auth
from pyasgd.nodes.rendezvous import BEAT_S, connect_store, dead_after
from pyasgd.trainer.proc import parent_gone
from pyasgd.trainer.stops import StopRequest

# A collective between the nodes waits as long as the other nodes are alive (a slow node is not a
# lost one): gloo's own timeout is never what ends it. A dead node's sockets close, which fails
# the collective at once; a node that stopped beating is named lost by the launcher's heartbeat
# watch (pyasgd/nodes/rendezvous.py), which then asks the server to fail, and the server leaves
# the collective it waits in (see `abandon`).
FOREVER = datetime.timedelta(days=365)
POLL = datetime.timedelta(seconds=0.5)
_abandoned: list = []  # (group, work) a server left pending; see abandon()

# A node's vote in each round's all-reduce: go on, stop (its launcher ends the run: max time,
# Ctrl-C, patience...), or fail (its run failed; the others fail too, naming it).
GO, STOP, FAIL = 0.0, 1.0, 2.0


class NodeEnded:
    """Another node ended the run: the server's stop reason "node R failed" / "node R stopped"."""

    def __init__(self, node: int, failed: bool) -> None:
        self.node, self.failed = node, failed

    def __str__(self) -> str:
        return f"node {self.node} {'failed' if self.failed else 'stopped'}"

    def record(self) -> dict:
        return {"ended_by": {"node": self.node, "failed": self.failed}}


def vote_of(server) -> float:
    """A server's vote (a pyasgd.trainer.server.Server): GO, or STOP/FAIL as its launcher asked."""
    asked = server.stop_asked()
    if asked == StopRequest.NONE:
        return GO
    return FAIL if asked == StopRequest.FAIL else STOP


class NodeLostError(RuntimeError):
    """A collective with the other nodes failed: one of them died or cannot be reached."""


def leave_when_told(server) -> Callable[[NodeGroup, float], None]:
    """The group's on_wait: a synchronous round waits for a slow node as long as it takes, but
    not for a lost one. The launcher says "fail" when its heartbeat watch lost a node (or this
    node failed): the server then leaves the round (pyasgd.nodes.allreduce.abandon)."""
    def on_wait(group: NodeGroup, waited: float) -> None:
        if parent_gone():
            group.note("failed", f"its launcher died (pid {os.getppid()} is not its parent any more); its "
                                 f"server saved the node's checkpoint at update {server.up.step}")
            raise NodeLostError(f"this node's launcher died while its server waited {waited:.0f} s for the other nodes")
        if server.stop_asked() == StopRequest.FAIL:
            raise NodeLostError(f"this node's launcher stopped the run while its server waited {waited:.0f} s for "
                                "the other nodes")
    return on_wait


def _device(config: TrainConfig):
    """Gloo's transport device: $GLOO_SOCKET_IFNAME when set (as torch.distributed does), the
    loopback interface when the master is on loopback, else the address this host's name
    resolves to (torch's default)."""
    import torch.distributed as dist

    gloo = dist.ProcessGroupGloo
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return gloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"].split(",")[0])
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(config.master_addr)).is_loopback
    except (OSError, ValueError):
        loopback = False
    return gloo.create_device(hostname="127.0.0.1") if loopback else gloo.create_default_device()


def abandon(group: NodeGroup, work) -> None:
    """Leave a collective that will never complete (its peer is lost but its sockets are open: a
    hung or cut-off node). Destroying its process group would wait for it forever, so the group
    is kept alive to the end and this process ends with os._exit once Python's own exit work is
    done (the multiprocessing queues are flushed before atexit handlers run)."""
    if not _abandoned:
        atexit.register(_exit_now)
    _abandoned.append((group, work))


def _exit_now() -> None:
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class NodeGroup:
    """This server's place among the M servers."""

    def __init__(self, config: TrainConfig, on_wait: Callable[[NodeGroup, float], None] | None = None) -> None:
        import torch.distributed as dist
        from torch.distributed import PrefixStore

        self.config, self.rank, self.size = config, config.node_rank, config.nnodes
        self.on_wait = on_wait  # called every POLL while a collective waits (it may raise NodeLostError)
        self.store = connect_store(config, host=False, timeout=config.timeout)
        try:
            self.sealer = auth.open_sealer(self.store)
        except auth.JoinRefused as e:
            raise NodeLostError(str(e)) from None
        self._meet()
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=config.timeout)  # forming the group: every server is here
        self._allreduce = dist.AllreduceOptions()
        self._allreduce.timeout = FOREVER  # each collective waits as long as the nodes live (see wait)
        opts._devices = [_device(config)]
        try:
            self.pg = dist.ProcessGroupGloo(PrefixStore("servers", self.store), self.rank, self.size, opts)
        except RuntimeError as e:
            raise NodeLostError(f"the servers of the {self.size} nodes could not form their gloo group: "
                                f"{first_line(e)}") from None

    def _meet(self) -> None:
        """Wait until every node's server is here, for as long as each missing node's launcher is
        alive (a node slow to start is not lost), then the group forms at once."""
        self.store.set(f"server/{self.rank}", "1")
        limit, seen = dead_after(self.config), {}
        start = time.monotonic()
        while True:
            missing = [p for p in range(self.size) if p != self.rank and not self.store.check([f"server/{p}"])]
            if not missing:
                return
            now = time.monotonic()
            for p in missing:
                state = self.store.get(f"beat/{p}").decode() if self.store.check([f"beat/{p}"]) else ""
                if seen.get(p, ("", start))[0] != state:
                    seen[p] = (state, now)
                elif now - seen[p][1] > limit:
                    raise NodeLostError(f"node {p} stopped responding before its server joined (no heartbeat "
                                        f"for {limit:g} s)")
                if self.store.check([f"failed/{p}"]):
                    said = self.sealer.open(self.store.get(f"failed/{p}").decode(), f"failed/{p}")
                    raise NodeLostError(f"node {p} failed before its server joined: {said or '(no reason readable)'}")
            if self.on_wait is not None:
                self.on_wait(self, now - start)
            time.sleep(BEAT_S / 2)

    def wait(self, work, what: str) -> None:
        """Wait for a collective as long as it takes (see FOREVER); a failure (a node's sockets
        closed) is a NodeLostError, and so is what `on_wait` raises (then the collective is
        abandoned)."""
        start = time.monotonic()
        while True:
            try:
                work.wait(POLL)
                return
            except RuntimeError:
                if work.is_completed():  # done in the meantime, or failed: a node died or cannot be reached
                    try:
                        work.wait()
                        return
                    except RuntimeError as e:
                        raise NodeLostError(f"{what} failed: {first_line(e)}") from None
            if self.on_wait is not None:
                try:
                    self.on_wait(self, time.monotonic() - start)
                except BaseException:
                    abandon(self, work)
                    raise

    def note(self, kind: str, message: str) -> None:
        """What the launcher would say, said by the server (when its launcher is gone)."""
        try:
            self.store.set(f"{kind}/{self.rank}", self.sealer.seal(message, f"{kind}/{self.rank}"))
        except RuntimeError:
            pass

    def allreduce(self, t: torch.Tensor, what: str) -> None:
        try:
            work = self.pg.allreduce([t], self._allreduce)
        except RuntimeError as e:
            raise NodeLostError(f"{what} failed: {first_line(e)}") from None
        self.wait(work, what)

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> None:
        import torch.distributed as dist

        try:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor, opts.timeout = src, 0, FOREVER
            work = self.pg.broadcast([t], opts)
        except RuntimeError as e:
            raise NodeLostError(f"{what} failed: {first_line(e)}") from None
        self.wait(work, what)

    def sync_round(self, local: torch.Tensor | None, kept: int, vote: float,
                   buf: torch.Tensor) -> tuple[torch.Tensor, list[float], int]:
        """One synchronous round: sum `local` (this node's weighted sum of its gradients, P
        floats; None when it stops without one), the gradients each node kept, and every node's
        vote, over the nodes. `buf` (P + M + 1 floats) is the workspace. Returns the summed
        gradient (a view of `buf`), the M votes and the gradients kept in all."""
        M = self.size
        P = buf.numel() - M - 1
        if local is None:
            buf.zero_()
        else:
            buf[:P].copy_(local)
            buf[P:].zero_()
        buf[P + self.rank] = vote
        buf[P + M] = float(kept)
        self.allreduce(buf, f"the all-reduce with the other {M - 1} node(s)")
        return buf[:P], buf[P:P + M].tolist(), int(round(buf[P + M].item()))

    def agree_on_state(self, step: int, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """Resuming: the nodes' checkpoints should hold the same step; if one is ahead (it
        completed the last update before the run stopped), everyone takes its state (CPU
        tensors, overwritten in place). Returns (the node whose state is used, its step)."""
        steps = torch.zeros(self.size, dtype=torch.float64)
        steps[self.rank] = float(step)
        self.allreduce(steps, "comparing the nodes' checkpoints")
        src = int(torch.argmax(steps).item())
        if bool((steps == steps[src]).all()):
            return self.rank, step
        for t in tensors:
            self.broadcast(t, src, f"taking node {src}'s state")
        return src, int(steps[src].item())

