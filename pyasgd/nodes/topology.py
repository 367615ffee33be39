"""The two multi-node topologies (see pyasgd/trainer/topology.py for what a topology owns):
synchronous SGD by an all-reduce round between the nodes' servers, and asynchronous SGD by a
sharded parameter server. Both meet at node 0's rendezvous and watch each other's heartbeats
(pyasgd/nodes/rendezvous.py)."""
from __future__ import annotations

from typing import Any

from pyasgd.config import TrainConfig
from pyasgd.trainer.topology import OneNode


class Nodes(OneNode):
    """What both multi-node topologies share: the launcher's rendezvous and its dealings with the
    other nodes, and a server that reports ready once its group with them has formed."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.link = None  # the launcher's live rendezvous (pyasgd.nodes.rendezvous.Nodes), after join()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "link": None}  # a process gets the topology, not the launcher's link

    @property
    def region_G(self) -> int:
        return self.config.workers  # a server update takes this node's N gradients of a round

    @property
    def run_tag(self) -> str:
        return f"-node{self.config.node_rank}"

    @property
    def server_reports_ready(self) -> bool:
        return True

    def join(self, resume: dict | None = None) -> None:
        from pyasgd.nodes.rendezvous import Nodes as Rendezvous

        self.link = Rendezvous.join(self.config, resume)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    def activity_array(self, ctx):
        from pyasgd.nodes.rendezvous import ACTIVITY

        return ctx.Array("d", ACTIVITY, lock=False)

    def watch_server(self, activity) -> None:
        if self.link is not None:
            self.link.activity = activity

    def set_phase(self, phase: str) -> None:
        if self.link is not None:
            self.link.phase = phase

    def lost(self) -> str:
        return self.link.lost() if self.link is not None else ""

    def waiting_for_alive_nodes(self) -> bool:
        return self.link is not None and not self.link.lost() and self.link.state().get("waiting_s") is not None

    def tell_stop(self, failure: str, reason: str) -> None:
        if self.link is not None:
            self.link.note("failed" if failure else "stopped", failure.splitlines()[0] if failure else reason)

    def why(self, node: int) -> str:
        return self.link.why(node, wait=2.0)

    def loss_text(self) -> str:
        return self.link.name_loss()

    def gather(self, summary: dict[str, Any], failed: bool) -> tuple[dict[str, Any], bool]:
        summary = self.link.gather(summary, wait=10.0 if failed else None)
        return summary, self.link.rank == 0  # node 0's summary.json is the global one


class SyncNodes(Nodes):
    """Synchronous SGD across nodes: each server sums its node's N gradients and the M node sums
    are all-reduced, so every node applies the same update (pyasgd/nodes/sync_server.py)."""

    @property
    def barrier_timeout(self) -> float | None:
        return None  # the next version waits for the slowest node: slow is not lost

    def serve(self, server) -> tuple[Any, dict[str, Any]]:
        from pyasgd.nodes.sync_server import serve_sync_nodes

        reason, extra = serve_sync_nodes(server)
        return reason, {**extra, **_ended_by(reason)}


class ShardedNodes(Nodes):
    """Asynchronous SGD across nodes: node R's server owns shard R of the parameters
    (pyasgd/nodes/sharded.py). Each of the M shards' updates is a version of the region."""

    def shard(self, n: int) -> tuple[int, int]:
        from pyasgd.nodes.agree import shard_bounds

        return shard_bounds(n, self.config.nnodes)[self.config.node_rank]

    def pull_every(self) -> int:
        U = self.config.pull_every
        return U * self.config.nnodes if U > 1 else U  # M shard versions make one update of every shard

    def check_resume(self, state: dict[str, Any]) -> None:
        c = self.config
        got = state.get("shard") or {}
        if got.get("nnodes") != c.nnodes or got.get("index") != c.node_rank:
            raise RuntimeError(f"the checkpoint holds shard {got.get('index')} of {got.get('nnodes')} nodes, not "
                               f"shard {c.node_rank} of {c.nnodes}: resume with the same --nnodes and --node-rank")

    def checkpoint_extra(self, server) -> dict[str, Any]:
        """A shard's owner keeps its part, this node's view of the rest, and its counts (which
        outlive a killed launcher)."""
        view = server.region.front().clone() if server.in_region else server.pulled()
        return {"shard": {"index": self.config.node_rank, "lo": server.lo, "hi": server.hi,
                          "nnodes": self.config.nnodes},
                "view": view, "shard_stats": server.counts}

    def serve(self, server) -> tuple[Any, dict[str, Any]]:
        from pyasgd.nodes.allreduce import NodeGroup, leave_when_told
        from pyasgd.nodes.agree import shard_bounds
        from pyasgd.nodes.sharded import ShardServer

        group = NodeGroup(self.config, on_wait=leave_when_told(server))
        shards = ShardServer(server, group, shard_bounds(server.region.n, self.config.nnodes))
        shards.start(resumed=bool(server.resumed))
        server.args.queue.put({"kind": "server_ready"})
        try:
            reason = shards.run()
        except Exception as e:
            server.save_after(e)  # this shard as it stands: the pair resumes from the shards' checkpoints
            raise
        return reason, {"shard": server.counts, **_ended_by(reason)}


def _ended_by(reason) -> dict[str, Any]:
    from pyasgd.nodes.allreduce import NodeEnded

    return reason.record() if isinstance(reason, NodeEnded) else {}
