"""Synchronous SGD across M nodes, the server's loop: collect this node's N gradients, sum them
(the stale policy applied per gradient), all-reduce the node sums with every node's stop vote
(pyasgd/nodes/allreduce.py), and apply the same update as every other node."""
from __future__ import annotations

import os
import time

import torch

from pyasgd.nodes.allreduce import FAIL, GO, STOP, NodeEnded, NodeGroup, NodeLostError, leave_when_told, vote_of
from pyasgd.nodes.rendezvous import HELD, ROUNDS, TAKEN, WAITING
from pyasgd.trainer.proc import parent_gone
from pyasgd.trainer.server import Server, collect_one
from pyasgd.trainer.stops import StopReason
from pyasgd.trainer.update import Applied, weighted_sum


class Activity:
    """What the server tells its launcher (and so the other nodes' heartbeat watch) of its
    progress: the shared array of pyasgd.nodes.rendezvous.TAKEN... (nothing without one)."""

    def __init__(self, array) -> None:
        self.a = array

    def set(self, i: int, value: float) -> None:
        if self.a is not None:
            self.a[i] = value

    def took(self, held: int) -> None:
        if self.a is not None:
            self.a[TAKEN] += 1
            self.a[HELD] = held




def serve_sync_nodes(server: Server) -> tuple[object, dict]:
    """Returns why it stopped and what it measured (the server_done record's "internode"); a lost
    node raises NodeLostError after the checkpoint is saved."""
    from pyasgd.core.region import GradientBatch, RegionClosedError

    config, region, up, q = server.config, server.region, server.up, server.args.queue
    N, R = config.workers, config.node_rank
    group = NodeGroup(config, on_wait=leave_when_told(server))
    activity = Activity(server.args.activity)
    activity.set(ROUNDS, server.up.step)
    if server.resumed:
        _agree_on_resume(group, server)
    q.put({"kind": "server_ready"})
    written, rounds = bytes_written(), 0
    local = torch.empty(region.n)
    buf = torch.empty(region.n + group.size + 1)
    held: list = []  # this round's local gradients, taken one at a time
    idle_since = time.monotonic()
    try:
        while True:
            vote = vote_of(server)
            if parent_gone():  # the launcher was killed outright: tell the others, save, leave
                vote = FAIL
                group.note("failed", f"its launcher died (pid {os.getppid()} is not its parent any more); its "
                                     f"server saved the node's checkpoint at update {up.step}")
            if vote == GO and len(held) < N:
                try:
                    taken = collect_one(server, idle_since)
                except RegionClosedError:
                    vote = STOP
                else:
                    if taken is None:
                        continue
                    idle_since = time.monotonic()
                    held.append(taken)
                    activity.took(len(held))
                    if len(held) < N:
                        region.ack(taken)  # in this round's sum: its pusher waits for the next version
                        continue
            batch = GradientBatch.merge(held) if held else None
            mine = batch is not None and vote == GO
            dropped = weighted_sum(batch.grads, batch.staleness, config, local) if mine else 0
            activity.set(WAITING, time.monotonic())
            try:
                total, votes, kept = group.sync_round(local if mine else None,
                                                      len(batch.grads) - dropped if mine else 0, vote, buf)
            except NodeLostError:
                if batch is not None:
                    region.release(batch)
                raise
            finally:
                activity.set(WAITING, 0.0)
            # Time spent waiting for the other nodes is not this node's workers being idle.
            idle_since = time.monotonic()
            rounds += 1
            if any(v != GO for v in votes):  # a node stops: the round is void everywhere
                if batch is not None:
                    region.release(batch)
                return _why_nodes_stop(votes, R), measured(written, rounds)
            held = []
            front = server.current()
            back, res = region.begin_update(), None
            try:
                # The node sums arrive as one summed gradient; a round whose gradients were all
                # dropped is a skipped update, published unchanged (the barrier goes on).
                res = up.apply([total] if kept else [], [0] if kept else [], out=back, current=front)
            finally:
                region.end_update(batch, publish=res is not None and res.publish)
            res.dropped = dropped
            up.dropped += dropped
            activity.set(ROUNDS, up.step)
            activity.set(HELD, 0)
            used = Applied(batch.staleness, batch.tokens, batch.losses,
                           [config.global_rank(w) for w in batch.workers], batch.positions,
                           local_workers=batch.workers)
            if server.book.after_update(res, region.version, used):
                return StopReason.MAX_UPDATES, measured(written, rounds)
    except Exception as e:
        # A lost node, or this server's own failure (no gradients for --timeout, ...): the last
        # update every node applied is saved, so the pair resumes from here (the launcher tells
        # the other nodes why this one stopped).
        server.save_after(e)
        raise


def bytes_written() -> int | None:
    """This process's bytes written so far (/proc/self/io wchar: sockets, pipes and files)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def measured(since: int | None, rounds: int) -> dict:
    now = bytes_written()
    return {"internode": {"rounds": rounds, "bytes_written": None if since is None or now is None else now - since,
                          "how": "/proc/self/io wchar of the server: its gloo socket writes, plus its records to "
                                 "the launcher (a few hundred bytes per update)"}}


def _why_nodes_stop(votes: list[float], me: int):
    """The server's stop reason from a round's votes: its own stop, or the node that stopped
    (failed first) the others."""
    failed = [p for p, v in enumerate(votes) if v == FAIL]
    if me in failed or (not failed and votes[me] != GO):
        return StopReason.STOPPED
    p = failed[0] if failed else next(p for p, v in enumerate(votes) if v != GO)
    return NodeEnded(p, bool(failed))


def _agree_on_resume(group: NodeGroup, server: Server) -> None:
    """All nodes continue from the same state: a node whose checkpoint is behind takes the one
    that is ahead (see NodeGroup.agree_on_state)."""
    up = server.up
    params = server.current().clone() if server.in_region else up.master.cpu()
    state = [params, up.exp_avg.cpu(), up.exp_avg_sq.cpu()]
    src, step = group.agree_on_state(up.step, state)
    if src == group.rank:
        return
    server.region.publish(state[0])
    if up.master is not None:
        up.master.copy_(state[0])
    up.exp_avg.copy_(state[1])
    up.exp_avg_sq.copy_(state[2])
    up.step = step
