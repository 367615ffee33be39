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

import datetime
import queue
import threading
import time
import traceback

import torch

from pyasgd.nodes.allreduce import FAIL, STOP, NodeGroup, NodeLostError
from pyasgd.trainer.proc import injected_server_fault, server_fault_step

HDR = 8                   # int64 words in every message's header: [kind, ...]
GRAD, UPDATE, ACK, STOP_MSG, FIN_GRADS, FIN_UPDATES, FIN_CTRL = range(1, 8)
DATA, CTRL = 11, 12       # gloo tags: gradients and updates (padded to one size), acks and control
FOREVER = datetime.timedelta(days=365)  # an idle channel is not a failure: lost peers raise at once


def shard_bounds(n: int, m: int) -> list[tuple[int, int]]:
    """M contiguous shards of n parameters whose sizes differ by at most one."""
    base, extra = divmod(n, m)
    out, lo = [], 0
    for s in range(m):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class Mailbox:
    """A server's point-to-point traffic: one receiver thread per peer and channel puts every
    message on `events` (as ("msg", src, header, payload)); one sender thread per peer sends in
    order. A lost peer becomes ("lost", peer, text)."""

    def __init__(self, pg, rank: int, size: int, bounds: list[tuple[int, int]], events: queue.Queue) -> None:
        self.pg, self.rank, self.size, self.bounds, self.events = pg, rank, size, bounds, events
        self.width = max(hi - lo for lo, hi in bounds)  # every DATA message carries this many floats
        self.bytes_sent = 0
        self._out = {p: queue.Queue() for p in self.peers}
        self._threads = [threading.Thread(target=self._send_loop, args=(p,), daemon=True, name=f"send-{p}")
                         for p in self.peers]
        self._threads += [threading.Thread(target=self._receive_loop, args=(p, tag), daemon=True,
                                           name=f"recv-{p}-{tag}") for p in self.peers for tag in (DATA, CTRL)]
        for t in self._threads:
            t.start()

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.size) if p != self.rank]

    def send(self, dst: int, tag: int, header: list[int], payload: torch.Tensor | None = None) -> None:
        size = HDR * 8 + (self.width * 4 if tag == DATA else 0)
        buf = torch.zeros(size, dtype=torch.uint8)
        buf[:HDR * 8].view(torch.int64)[:len(header)] = torch.tensor(header, dtype=torch.int64)
        if payload is not None:
            buf[HDR * 8:HDR * 8 + payload.numel() * 4].view(torch.float32).copy_(payload)
        self.bytes_sent += size
        self._out[dst].put((tag, buf))

    def close(self, timeout: float) -> None:
        """Let the senders finish what is queued, then wait for every thread (the receivers end
        with their channel's last message)."""
        for q in self._out.values():
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _send_loop(self, dst: int) -> None:
        while True:
            item = self._out[dst].get()
            if item is None:
                return
            tag, buf = item
            try:
                self.pg.send([buf], dst, tag).wait(FOREVER)
            except RuntimeError as e:
                self.events.put(("lost", dst, _first_line(e)))
                return
            except Exception:
                self.events.put(("thread_failed", f"send-{dst}", traceback.format_exc()))
                return

    def _receive_loop(self, src: int, tag: int) -> None:
        size = HDR * 8 + (self.width * 4 if tag == DATA else 0)
        buf = torch.empty(size, dtype=torch.uint8)
        last = FIN_UPDATES if tag == DATA else FIN_CTRL
        while True:
            try:
                self.pg.recv([buf], src, tag).wait(FOREVER)
            except RuntimeError as e:
                self.events.put(("lost", src, _first_line(e)))
                return
            except Exception:
                self.events.put(("thread_failed", f"receive-{src}", traceback.format_exc()))
                return
            header = buf[:HDR * 8].view(torch.int64).tolist()
            payload = None
            if header[0] in (GRAD, UPDATE):
                lo, hi = self.bounds[self.rank if header[0] == GRAD else src]
                payload = buf[HDR * 8:HDR * 8 + (hi - lo) * 4].view(torch.float32).clone()
            self.events.put(("msg", src, header, payload))
            if header[0] == last:
                return


def _f64_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64).item())


def _from_bits(i: int) -> float:
    return float(torch.tensor([i], dtype=torch.int64).view(torch.float64).item())


class ShardServer:
    """Node R's server in an asynchronous multi-node run: owner of shard R, pusher of its own
    workers' gradients. `run()` returns why it stopped; a lost node raises NodeLostError."""

    def __init__(self, args, region, up, current, positions: list[int], progress: dict, t0: float, save,
                 group: NodeGroup, bounds: list[tuple[int, int]], record) -> None:
        self.args, self.config, self.q = args, args.config, args.queue
        self.region, self.up, self.current, self.positions, self.progress, self.t0 = (
            region, up, current, positions, progress, t0)
        self.save, self.record = save, record  # record: server.update_record (the server's record format)
        self.group, self.bounds = group, bounds
        self.fault_at = server_fault_step()  # tests only (PYASGD_TEST_SERVER_FAULT)
        self.R, self.M = group.rank, group.size
        self.lo, self.hi = bounds[self.R]
        self.sv = [0] * self.M          # each shard's version as this node has published it
        self.vmap: dict[int, tuple[int, ...]] = {}  # region version -> shard versions it held
        self.held: list[dict] = []      # pieces of my shard taken into the accumulation
        self.pending: dict[int, dict] = {}  # my workers' pushes not yet acknowledged
        self.next_id = 0
        self.events: queue.Queue = queue.Queue()
        self.stopping = False
        self.stop_votes: dict[int, float] = {}
        self.fin_grads: set[int] = set()
        self.fin_updates: set[int] = set()
        self.fin_ctrl: set[int] = set()
        self.sent_fins = False
        # the next piece id expected from each node: ids are (node << 40) | n, n = 0, 1, ... in order
        # on its ordered DATA channel, so any other id is a piece lost or repeated (O(M) memory)
        self.expected = [0] * self.M
        self.stats = {"index": self.R, "lo": self.lo, "hi": self.hi, "received": 0, "received_ids": 0,
                      "applied_gradients": 0, "dropped": 0, "skipped_gradients": 0, "held_at_stop": 0,
                      "dispatched": 0, "dispatched_ids": 0, "not_dispatched": 0, "updates_received": 0}

    # -- start -------------------------------------------------------------------------------------

    def start(self, resume_steps: list[int] | None) -> None:
        """Reassemble the parameters from every owner's shard (on a resume their checkpoints
        differ outside their own shard) and agree on the shard versions."""
        steps = torch.zeros(self.M, dtype=torch.float64)
        steps[self.R] = float(self.up.step)
        self.group.allreduce(steps, "exchanging the shards' steps")
        self.sv = [int(x) for x in steps.tolist()]
        if resume_steps is not None:
            full = self.region.front().clone() if self.current() is not None else self._pull()
            for s, (lo, hi) in enumerate(self.bounds):
                try:
                    self.group.pg.broadcast(full[lo:hi], s).wait()
                except RuntimeError as e:
                    raise NodeLostError(f"reassembling the parameters from node {s}'s shard failed: "
                                        f"{_first_line(e)}") from None
            self.region.publish(full)
        self.vmap[self.region.version] = tuple(self.sv)
        self.mail = Mailbox(self.group.pg, self.R, self.M, self.bounds, self.events)
        self.collector = threading.Thread(target=self._collect_loop, daemon=True, name="collect")
        self.collector.start()

    def _pull(self) -> torch.Tensor:
        t = torch.empty(self.region.n)
        self.region.pull(t)
        return t

    def _collect_loop(self) -> None:
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

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> str:
        from pyasgd.trainer.proc import parent_gone

        args, c = self.args, self.config
        self._reason = "stopped"
        idle_since = time.monotonic()
        stop_deadline = None
        while True:
            if not self.stopping:
                if parent_gone():
                    self.group.note("failed", f"its launcher died; its server saved the node's checkpoint "
                                              f"(shard {self.R} at update {self.up.step})")
                    self._begin_stop(FAIL, initiator=True)
                elif args.stop.is_set():
                    code = FAIL if args.stop_code is not None and args.stop_code.value == 2 else STOP
                    self._begin_stop(code, initiator=True)
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
                self._begin_stop(STOP, initiator=True, reason="max_updates")
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

    def _begin_stop(self, code: float, *, initiator: bool, reason: str = "") -> None:
        if self.stopping:
            return
        self.stopping = True
        self._reason = reason or "stopped"
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
            p = failed[0] if failed else src
            self._reason = f"node {p} {'failed' if failed else 'stopped'}"

    # -- a local gradient: split it and send each piece to its owner -------------------------------

    def _dispatch(self, b) -> None:
        if self.stopping:  # taken after the stop: not sent anywhere, its batch is computed again on resume
            self.region.release(b)
            self.stats["not_dispatched"] += 1
            return
        version = b.versions[0]
        seen = self.vmap.get(version, tuple(self.sv))
        pid = (self.R << 40) | self.next_id
        self.next_id += 1
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
        if item["acks"] or any(self.sv[s] < v for s, v in item["need"].items()):
            return
        b = self.pending.pop(pid)["batch"]
        self.positions[b.workers[0]] = b.positions[0]
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
                self._reason = f"node {src} stopped"
        elif kind == FIN_UPDATES:
            self.fin_updates.add(src)
        elif kind == FIN_CTRL:
            self.fin_ctrl.add(src)

    def _take(self, src: int, h: list[int], grad: torch.Tensor) -> int:
        """Take a piece of my shard into the accumulation; apply when G are held. Returns the
        version it completed, or -1."""
        _, pid, worker, version, tokens, loss_bits = h[:6]
        want = (src << 40) | self.expected[src]
        if pid != want:
            raise RuntimeError(f"piece {pid:#x} from node {src} arrived where {want:#x} was due (a piece lost or "
                               f"repeated): the exchange between nodes is broken")
        self.expected[src] += 1
        self.stats["received"] += 1
        self.stats["received_ids"] += pid
        self.held.append({"grad": grad, "version": version, "worker": worker, "tokens": tokens,
                          "loss": _from_bits(loss_bits)})
        if len(self.held) < self.config.G:
            return -1
        return self._apply()

    def _apply(self) -> int:
        batch, self.held = self.held, []
        staleness = [self.sv[self.R] - x["version"] for x in batch]
        res = None

        def update(front, back):
            nonlocal res
            res = self.up.apply([x["grad"] for x in batch], staleness, out=back, current=front)
            return res.publish

        self._publish(update)  # a CUDA server updates its master shard and copies it into the slice
        kept = len(batch) - res.dropped
        self.stats["dropped"] += res.dropped
        self.stats["applied_gradients" if res.applied else "skipped_gradients"] += kept
        self.progress["tokens"] += sum(x["tokens"] for x in batch)
        if res.applied:
            self.progress["gradients"] += kept
        rec = self.record(self.up.step, self.region.version, res, staleness, [x["tokens"] for x in batch],
                            [x["loss"] for x in batch], [x["worker"] for x in batch], self.t0)
        self.q.put({**rec, "shard": self.R})
        if not res.applied:
            return -1
        self.sv[self.R] = self.up.step
        self.vmap[self.region.version] = tuple(self.sv)
        values = self.region.front()[self.lo:self.hi]
        for p in self.mail.peers:
            self.mail.send(p, DATA, [UPDATE, self.up.step], values)
        if self.config.save_every and self.up.step % self.config.save_every == 0:
            self.save()
        if self.up.step == self.fault_at:
            raise injected_server_fault(self.up.step)
        return self.up.step

    def _publish(self, write) -> None:
        """Publish a new region version that differs from the current one in my shard only:
        `write(front_slice, back_slice)` writes it and says whether to publish."""
        front = self.region.front()
        back = self.region.begin_update()
        publish = False
        try:
            back[:self.lo].copy_(front[:self.lo])
            back[self.hi:].copy_(front[self.hi:])
            publish = write(front[self.lo:self.hi], back[self.lo:self.hi])
        finally:
            self.region.end_update(None, publish=publish)

    def _publish_remote(self, s: int, version: int, values: torch.Tensor) -> None:
        lo, hi = self.bounds[s]
        front = self.region.front()
        back = self.region.begin_update()
        ok = False
        try:
            back[:lo].copy_(front[:lo])
            back[hi:].copy_(front[hi:])
            back[lo:hi].copy_(values)
            ok = True
        finally:
            self.region.end_update(None, publish=ok)
        self.sv[s] = version
        self.stats["updates_received"] += 1
        self.vmap[self.region.version] = tuple(self.sv)
        if len(self.vmap) > 100_000:  # versions no worker still computes from
            for v in sorted(self.vmap)[:50_000]:
                del self.vmap[v]
        for pid in [p for p, item in self.pending.items() if item["need"].get(s, -1) >= 0]:
            self._maybe_release(pid)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


