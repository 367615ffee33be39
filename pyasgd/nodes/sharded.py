"""Asynchronous SGD across nodes: a sharded parameter server (as BytePS and Marian shard theirs).
The parameters are split into M contiguous shards and node R's server owns shard R: its master
values (in the node's region), Adam moments and step. A gradient pushed on any node is split and
each piece sent to its owner (gloo point-to-point, from sender threads, so the server never
blocks on the network); an owner applies its fused update when it holds G pieces, from any node,
and sends the new shard to every node, whose region publishes it.

Versions and staleness: shard s's version is its owner's step. Every node maps each version of
its region to the shard versions it held, so a gradient computed from region version v carries,
for each shard, the version of that shard it saw; its staleness on shard s is s's version when
the owner applies it minus that. A pull is a consistent copy of the node's region, which may hold
shards of different ages: the newest version of each shard this node has received, never a mix
of two versions of one shard.

Order (the paper's parameter-server order, across nodes): a worker's push is acknowledged, so it
may pull, only when every owner has taken its piece into the accumulation and every update its
piece completed is published on the worker's node.

Stopping: a node that stops tells the others (STOP, with whether it failed); each node then takes
no new gradients, says so (FIN_GRADS), finishes the updates of the pieces it already received,
says so (FIN_UPDATES, FIN_CTRL), and leaves once every other node has said the same: every piece
sent is received by its owner exactly once and either applied, dropped, skipped or still held at
the stop (the server's `shard` record counts them, and identifies the pieces, so tests can check
the conservation).
"""
from __future__ import annotations

import queue
import threading
import time
import traceback

import torch

from pyasgd.core.region import publish_slice
from pyasgd.nodes.agree import shard_bounds
from pyasgd.nodes.allreduce import FAIL, GO, STOP, NodeEnded, NodeGroup, NodeLostError, vote_of
from pyasgd.nodes.mailbox import (ACK, CTRL, DATA, FIN_CTRL, FIN_GRADS, FIN_UPDATES, GRAD, STOP_MSG, UPDATE,
                                  Mailbox)
from pyasgd.trainer.server import Server
from pyasgd.trainer.stops import StopReason
from pyasgd.trainer.update import Applied, UpdateResult


def _f64_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64).item())


def _from_bits(i: int) -> float:
    return float(torch.tensor([i], dtype=torch.int64).view(torch.float64).item())


class ShardVersions:
    """Which version of each shard this node's region holds (a shard's version is its owner's
    step), and which it held at each region version a worker may still compute from: a gradient
    computed from region version v saw, for each shard, the version `seen(v)` gives, and its
    staleness on shard s is s's version when the owner applies it minus that."""

    def __init__(self, shards: int) -> None:
        self.now = [0] * shards                   # each shard's version as this node has published it
        self.at: dict[int, tuple[int, ...]] = {}  # region version -> the shard versions it held

    def seen(self, region_version: int) -> tuple[int, ...]:
        return self.at.get(region_version, tuple(self.now))

    def published(self, region_version: int, shard: int | None = None, version: int = 0) -> None:
        """The region published `region_version`, in which `shard` (if any) is at `version`."""
        if shard is not None:
            self.now[shard] = version
        self.at[region_version] = tuple(self.now)
        if len(self.at) > 100_000:  # versions no worker still computes from
            for v in sorted(self.at)[:50_000]:
                del self.at[v]


class PieceIds:
    """Piece ids are (node << 40) | n, n = 0, 1, ... in order on each node's ordered DATA channel,
    so any id but the next one expected from its node is a piece lost or repeated (O(M) memory)."""

    def __init__(self, nodes: int, me: int) -> None:
        self.expected, self.me, self.next = [0] * nodes, me, 0

    def new(self) -> int:
        pid, self.next = (self.me << 40) | self.next, self.next + 1
        return pid

    def check(self, src: int, pid: int) -> None:
        want = (src << 40) | self.expected[src]
        if pid != want:
            raise RuntimeError(f"piece {pid:#x} from node {src} arrived where {want:#x} was due (a piece lost or "
                               f"repeated): the exchange between nodes is broken")
        self.expected[src] += 1


def new_counts(index: int, lo: int, hi: int) -> dict[str, int]:
    """A shard's counts (the server_done record's and the checkpoint's "shard"): every piece
    sent is received by its owner exactly once and applied, dropped, skipped or held at the stop."""
    return {"index": index, "lo": lo, "hi": hi, "received": 0, "received_ids": 0, "applied_gradients": 0,
            "dropped": 0, "skipped_gradients": 0, "held_at_stop": 0, "dispatched": 0, "dispatched_ids": 0,
            "not_dispatched": 0, "updates_received": 0}


class ShardServer:
    """Node R's server in an asynchronous multi-node run: owner of shard R, pusher of its own
    workers' gradients. `run()` returns why it stopped; a lost node raises NodeLostError. Its
    state is the node's `Server` (region, Updater of shard R, positions, bookkeeping); the
    shard's counts live in `server.counts`, which the checkpoint keeps."""

    def __init__(self, server: Server, group: NodeGroup, bounds: list[tuple[int, int]]) -> None:
        self.server, self.config, self.q = server, server.config, server.args.queue
        self.region, self.up = server.region, server.up
        self.group, self.bounds = group, bounds
        self.R, self.M = group.rank, group.size
        self.lo, self.hi = bounds[self.R]
        self.versions = ShardVersions(self.M)
        self.held: list[dict] = []      # pieces of my shard taken into the accumulation
        self.pending: dict[int, dict] = {}  # my workers' pushes not yet acknowledged
        self.ids = PieceIds(self.M, self.R)
        self.events: queue.Queue = queue.Queue()
        self.stopping = False
        self.stop_votes: dict[int, float] = {}
        self.fin_grads: set[int] = set()
        self.fin_updates: set[int] = set()
        self.fin_ctrl: set[int] = set()
        self.sent_fins = False
        self.stats = server.counts
        self.stats.update(new_counts(self.R, self.lo, self.hi))

    # -- start -------------------------------------------------------------------------------------

    def start(self, resumed: bool) -> None:
        """Reassemble the parameters from every owner's shard (on a resume their checkpoints
        differ outside their own shard) and agree on the shard versions."""
        steps = torch.zeros(self.M, dtype=torch.float64)
        steps[self.R] = float(self.up.step)
        self.group.allreduce(steps, "exchanging the shards' steps")
        self.versions.now = [int(x) for x in steps.tolist()]
        if resumed:
            reassemble(self.server, self.group, self.bounds)
        self.versions.published(self.region.version)
        self.mail = Mailbox(self.group.pg, self.R, self.M, self.bounds, self.events)
        self.collector = threading.Thread(target=collect_loop, args=(self,), daemon=True, name="collect")
        self.collector.start()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> str:
        from pyasgd.trainer.proc import parent_gone

        c = self.config
        self._reason = StopReason.STOPPED
        idle_since = time.monotonic()
        stop_deadline = None
        while True:
            if not self.stopping:
                vote = vote_of(self.server)
                if parent_gone():
                    self.group.note("failed", f"its launcher died; its server saved the node's checkpoint "
                                              f"(shard {self.R} at update {self.up.step})")
                    vote = FAIL
                if vote != GO:
                    self._begin_stop(vote, initiator=True)
            if self.stopping:
                stop_deadline = stop_deadline or time.monotonic() + c.timeout
                if self._finished():
                    break
                if time.monotonic() > stop_deadline:
                    missing = sorted(set(self.mail.peers) - (self.fin_updates & self.fin_ctrl))
                    raise NodeLostError(f"node(s) {missing} did not finish stopping within --timeout {c.timeout:g} s")
            try:
                ev = self.events.get(timeout=0.25)
            except queue.Empty:
                if not self.stopping and time.monotonic() - idle_since > c.timeout:
                    raise RuntimeError(f"no gradients from the workers for {c.timeout:.0f} s (--timeout)")
                continue
            kind = ev[0]
            if kind == "local":
                idle_since = time.monotonic()
                self._dispatch(ev[1])
            elif kind == "msg":
                self._receive(ev[1], ev[2], ev[3])
            elif kind == "lost":
                raise NodeLostError(f"the connection to node {ev[1]} failed: {ev[2]}")
            elif kind == "thread_failed":
                raise RuntimeError(f"the server's {ev[1]} thread failed:\n{ev[2]}")
            elif kind == "closed" and not self.stopping:
                self._begin_stop(STOP, initiator=True)
            if not self.stopping and c.max_updates and self.up.step >= c.max_updates:
                self._begin_stop(STOP, initiator=True, reason=StopReason.MAX_UPDATES)
        self.mail.close(c.timeout)
        self.collector.join(1.0)
        for item in list(self.pending.values()):  # every ack has come; nothing should be left
            self.region.release(item["batch"])
        self.pending.clear()
        self.stats["held_at_stop"] = len(self.held)
        self.stats["bytes_sent"] = self.mail.bytes_sent
        return self._reason

    def _finished(self) -> bool:
        peers = set(self.mail.peers)
        if not self.sent_fins and self.fin_grads >= peers:
            # every piece of my shard has arrived and been acknowledged: no more updates, acks.
            # Pieces held short of G are applied now, as a last smaller update: they were already
            # acknowledged (their workers moved on), so a resume would never compute them again.
            # Not past --max-updates: a shard that made its last update stops there (as one node
            # does), and what it holds is counted in held_at_stop.
            c = self.config
            if self.held and not (c.max_updates and self.up.step >= c.max_updates):
                self._apply()
            for p in peers:
                self.mail.send(p, DATA, [FIN_UPDATES])
                self.mail.send(p, CTRL, [FIN_CTRL])
            self.sent_fins = True
        return self.sent_fins and self.fin_updates >= peers and self.fin_ctrl >= peers and not self.pending

    def _begin_stop(self, code: float, *, initiator: bool, reason=StopReason.STOPPED) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._reason = reason
        if initiator:
            self.stop_votes[self.R] = code
            for p in self.mail.peers:
                self.mail.send(p, CTRL, [STOP_MSG, int(code)])
        for p in self.mail.peers:
            self.mail.send(p, DATA, [FIN_GRADS])

    def _note_stop(self, src: int, code: float) -> None:
        """Another node stops: so do we; unless we stopped first, the reason names it (a failed
        node before a stopped one)."""
        self.stop_votes.setdefault(src, code)
        self._begin_stop(code, initiator=False)
        if self.R not in self.stop_votes:
            failed = [p for p, v in sorted(self.stop_votes.items()) if v == FAIL]
            self._reason = NodeEnded(failed[0] if failed else src, bool(failed))

    # -- a local gradient: split it and send each piece to its owner -------------------------------

    def _dispatch(self, b) -> None:
        if self.stopping:  # taken after the stop: not sent anywhere, its batch is computed again on resume
            self.region.release(b)
            self.stats["not_dispatched"] += 1
            return
        seen = self.versions.seen(b.versions[0])
        pid = self.ids.new()
        worker = self.config.global_rank(b.workers[0])
        g = b.grads[0]
        meta = [pid, worker, 0, int(b.tokens[0]), _f64_bits(float(b.losses[0]))]
        self.pending[pid] = {"batch": b, "acks": set(self.mail.peers), "need": {}}
        self.stats["dispatched"] += 1
        self.stats["dispatched_ids"] += pid
        for s, (lo, hi) in enumerate(self.bounds):
            if s == self.R:
                continue
            meta[2] = seen[s]
            self.mail.send(s, DATA, [GRAD, *meta], g[lo:hi].float())
        meta[2] = seen[self.R]
        completed = self._take(self.R, [GRAD, *meta], g[self.lo:self.hi].float().clone())
        self._acked(pid, self.R, completed)

    def _acked(self, pid: int, owner: int, completed: int) -> None:
        item = self.pending.get(pid)
        if item is None:
            return
        item["acks"].discard(owner)
        if completed >= 0:
            item["need"][owner] = completed
        self._maybe_release(pid)

    def _maybe_release(self, pid: int) -> None:
        item = self.pending[pid]
        if item["acks"] or any(self.versions.now[s] < v for s, v in item["need"].items()):
            return
        b = self.pending.pop(pid)["batch"]
        self.server.book.positions[b.workers[0]] = b.positions[0]
        self.region.release(b)  # acks the worker: it may pull now

    # -- messages ------------------------------------------------------------------------------------

    def _receive(self, src: int, h: list[int], payload) -> None:
        kind = h[0]
        if kind == GRAD:
            completed = self._take(src, h, payload)
            self.mail.send(src, CTRL, [ACK, h[1], completed])
        elif kind == ACK:
            self._acked(h[1], src, h[2])
        elif kind == UPDATE:
            self._publish_remote(src, h[1], payload)
        elif kind == STOP_MSG:
            self._note_stop(src, float(h[1]))
        elif kind == FIN_GRADS:
            self.fin_grads.add(src)
            if not self.stopping:  # its STOP may still be on the way (another channel)
                self._begin_stop(STOP, initiator=False)
                self._reason = NodeEnded(src, False)
        elif kind == FIN_UPDATES:
            self.fin_updates.add(src)
        elif kind == FIN_CTRL:
            self.fin_ctrl.add(src)

    def _take(self, src: int, h: list[int], grad: torch.Tensor) -> int:
        """Take a piece of my shard into the accumulation; apply when G are held. Returns the
        version it completed, or -1."""
        _, pid, worker, version, tokens, loss_bits = h[:6]
        self.ids.check(src, pid)
        self.stats["received"] += 1
        self.stats["received_ids"] += pid
        self.held.append({"grad": grad, "version": version, "worker": worker, "tokens": tokens,
                          "loss": _from_bits(loss_bits)})
        if len(self.held) < self.config.G:
            return -1
        return self._apply()

    def _apply(self) -> int:
        batch, self.held = self.held, []
        staleness = [self.versions.now[self.R] - x["version"] for x in batch]
        res: UpdateResult | None = None

        def update(front, back):
            nonlocal res
            res = self.up.apply([x["grad"] for x in batch], staleness, out=back, current=front)
            return res.publish

        publish_slice(self.region, self.lo, self.hi, update)  # a CUDA server copies its master shard in
        kept = len(batch) - res.dropped
        self.stats["dropped"] += res.dropped
        self.stats["applied_gradients" if res.applied else "skipped_gradients"] += kept
        if res.applied:
            self.versions.published(self.region.version, self.R, self.up.step)
            values = self.region.front()[self.lo:self.hi]
            for p in self.mail.peers:
                self.mail.send(p, DATA, [UPDATE, self.up.step], values)
        used = Applied(staleness, [x["tokens"] for x in batch], [x["loss"] for x in batch],
                       [x["worker"] for x in batch])
        self.server.book.after_update(res, self.region.version, used, extra={"shard": self.R})
        return self.up.step if res.applied else -1

    def _publish_remote(self, s: int, version: int, values: torch.Tensor) -> None:
        lo, hi = self.bounds[s]

        def write(front, back):
            back.copy_(values)
            return True

        publish_slice(self.region, lo, hi, write)
        self.versions.published(self.region.version, s, version)
        self.stats["updates_received"] += 1
        for pid in [p for p, item in self.pending.items() if item["need"].get(s, -1) >= 0]:
            self._maybe_release(pid)


def collect_loop(self) -> None:
    """The collector thread of a ShardServer (`self`): every local gradient, and any failure, becomes
    an event for the server's loop."""
    from pyasgd.core.region import RegionClosedError, RegionTimeoutError

    while not self.stopping:
        try:
            b = self.region.collect(1, timeout=0.25)
        except RegionTimeoutError:
            continue
        except RegionClosedError:
            self.events.put(("closed",))
            return
        except Exception:  # any other failure must reach the server's loop, not die with the thread
            self.events.put(("thread_failed", "collect", traceback.format_exc()))
            return
        self.events.put(("local", b))


def reassemble(server: Server, group: NodeGroup, bounds: list[tuple[int, int]]) -> None:
    """On a resume the owners' checkpoints differ outside their own shard: each owner broadcasts
    its shard, and every node publishes the whole."""
    full = server.region.front().clone() if server.in_region else server.pulled()
    for s, (lo, hi) in enumerate(bounds):
        group.broadcast(full[lo:hi], s, f"reassembling the parameters from node {s}'s shard")
    server.region.publish(full)
