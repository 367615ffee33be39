"""Where a run's processes stand, chosen once by `train()`: one node (this module), or several
(pyasgd/nodes/topology.py: synchronous by all-reduce, asynchronous by a sharded server). The
topology owns everything that differs between them, so the supervisor, the server and the
workers hold no multi-node branch:
- the server's loop (how gradients are gathered, an update published, the stop agreed),
- the part of the parameters the server owns, and what its checkpoint adds,
- how often a worker may pull, and how many gradients a server update takes from this node,
- the launcher's dealings with the other nodes (rendezvous, liveness, why a node stopped, the
  global summary).
A topology is picklable: the server and worker processes get it in their arguments; the live
connection to the other nodes (`join()`) stays in the launcher.

Stop reasons and the launcher's stop request are enums (pyasgd/trainer/stops.py)."""
from __future__ import annotations

from typing import Any

from pyasgd.config import TrainConfig


class OneNode:
    """A run on one node: the server owns every parameter and takes G gradients from its region;
    nobody else to meet, watch or tell."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    # -- the server's side ------------------------------------------------------------------------
    def shard(self, n: int) -> tuple[int, int]:
        """The parameters [lo, hi) this node's server owns."""
        return 0, n

    def serve(self, server) -> tuple[str, dict[str, Any]]:
        """Run the server's loop (server: a pyasgd.trainer.server.Server); returns why it stopped
        and what to add to its server_done record."""
        from pyasgd.trainer.server import serve_one_node

        return serve_one_node(server), {}

    def checkpoint_extra(self, server) -> dict[str, Any]:
        """What this topology adds to the server's checkpoint."""
        return {}

    def check_resume(self, state: dict[str, Any]) -> None:
        """Raise when a checkpoint cannot be resumed in this topology."""

    # -- the workers' side ------------------------------------------------------------------------
    def pull_every(self) -> int:
        """U counted in the region's versions: a worker pulls when it is U versions behind."""
        return self.config.pull_every

    @property
    def barrier_timeout(self) -> float | None:
        """How long a synchronous worker waits at the barrier for the next version before it fails
        (None: as long as the run goes on; the server and the launcher decide when it cannot)."""
        return self.config.timeout

    # -- the launcher's side ------------------------------------------------------------------------
    @property
    def region_G(self) -> int:
        """Gradients one server update takes from this node's region (what sizes its ring)."""
        return self.config.G

    @property
    def run_tag(self) -> str:
        """Added to a default run directory's name (nodes may share a filesystem)."""
        return ""

    @property
    def server_reports_ready(self) -> bool:
        """The server says when it is ready (its group with the other nodes formed), and the run's
        clock waits for it too."""
        return False

    def join(self, resume: dict | None = None) -> None:
        """Meet the other nodes (before anything is created); `resume`: this node's checkpoint."""

    def watch_server(self, activity) -> None:
        """The server's activity array (None on one node: nobody else to tell)."""

    def activity_array(self, ctx):
        """What the server shares of its progress with the launcher, for the other nodes."""
        return None

    def set_phase(self, phase: str) -> None:
        """Where the launcher stands (starting, training, stopping, testing), for the other nodes."""

    def close(self) -> None:
        """Leave the other nodes."""

    def lost(self) -> str:
        """'' while every other node is well, else what happened to which."""
        return ""

    def waiting_for_alive_nodes(self) -> bool:
        """The server is in a round with the other nodes, all alive (a slow one is waited for)."""
        return False

    def tell_stop(self, failure: str, reason: str) -> None:
        """Tell the other nodes why this node stops (its own decision)."""

    def why(self, node: int) -> str:
        """What node `node` said when it stopped."""
        return ""

    def loss_text(self) -> str:
        """After the server lost its peers: which node was lost."""
        return ""

    def gather(self, summary: dict[str, Any], failed: bool) -> tuple[dict[str, Any], bool]:
        """The summary to return, and whether it is the run's global one to write as summary.json."""
        return summary, False
