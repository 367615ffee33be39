"""Beyond one node, the servers' side: the M servers' gloo process group (over node 0's TCPStore)
and the synchronous round between them. Each node's server sums its N local gradients; one
all-reduce sums the M node sums and carries every node's stop vote, so all nodes apply the same
update to identical replicas of the parameters and Adam moments, and stop after the same one.

The slots are host memory and a CPU server reads them in place, so the collective is gloo on CPU
tensors (a CUDA server's summed gradient goes to its GPU afterwards, as on one node)."""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket

import torch

from pyasgd.config import TrainConfig
from pyasgd.nodes.rendezvous import connect_store
from pyasgd.trainer.stops import StopRequest

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


class NodeGroup:
    """This server's place among the M servers."""

    def __init__(self, config: TrainConfig) -> None:
        import torch.distributed as dist
        from torch.distributed import PrefixStore

        self.config, self.rank, self.size = config, config.node_rank, config.nnodes
        self.store = connect_store(config, host=False, timeout=config.timeout)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=config.timeout)
        opts._devices = [_device(config)]
        try:
            self.pg = dist.ProcessGroupGloo(PrefixStore("servers", self.store), self.rank, self.size, opts)
        except RuntimeError as e:
            raise NodeLostError(f"the servers of the {self.size} nodes could not form their gloo group within "
                                f"--timeout {config.timeout:g} s: {_first_line(e)}") from None

    def note(self, kind: str, message: str) -> None:
        """What the launcher would say, said by the server (when its launcher is gone)."""
        try:
            self.store.set(f"{kind}/{self.rank}", message)
        except RuntimeError:
            pass

    def allreduce(self, t: torch.Tensor, what: str) -> None:
        try:
            self.pg.allreduce([t]).wait()
        except RuntimeError as e:
            raise NodeLostError(f"{what} failed: {_first_line(e)}") from None

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
            try:
                self.pg.broadcast(t, src).wait()
            except RuntimeError as e:
                raise NodeLostError(f"taking node {src}'s state failed: {_first_line(e)}") from None
        return src, int(steps[src].item())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
