"""Beyond one node: the rendezvous, the synchronous all-reduce round and the sharded
asynchronous server. The only package (with the config) that knows about --nnodes: `topology_for`
is where a run's topology is chosen, once."""
from __future__ import annotations

from pyasgd.config import TrainConfig


def topology_for(config: TrainConfig):
    """One node, synchronous nodes, or sharded asynchronous nodes."""
    from pyasgd.trainer.topology import OneNode

    if config.nnodes == 1:
        return OneNode(config)
    from pyasgd.nodes.topology import ShardedNodes, SyncNodes

    return SyncNodes(config) if config.mode == "sync" else ShardedNodes(config)
