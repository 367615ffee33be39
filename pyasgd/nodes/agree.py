"""What the nodes must agree on before anything is created: their settings (all but the per-node
ones) and, with --resume, their checkpoints (both resume or neither, the same model, each
sharded node its own shard). Each disagreement is one line naming the option or the node."""
from __future__ import annotations

from typing import Any

from pyasgd.config import PER_NODE, TrainConfig
from pyasgd.errors import ConfigError


def shard_bounds(n: int, m: int) -> list[tuple[int, int]]:
    """M contiguous shards of n parameters whose sizes differ by at most one."""
    base, extra = divmod(n, m)
    out, lo = [], 0
    for s in range(m):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class RendezvousError(ConfigError):
    """The nodes could not meet (wrong port, unreachable master, a node missing) or their
    configurations disagree; the message says which and how to fix it."""


def resume_facts(state: dict | None) -> dict[str, Any]:
    """What the rendezvous compares of the nodes' checkpoints: whether the node resumes, its
    step, how many parameters, and which shard of how many nodes it holds (the sharded server)."""
    if state is None:
        return {"resume": False}
    server = state.get("server") or {}
    full = state["view"] if "view" in state else server.get("params")
    shard = state.get("shard") or None
    return {"resume": True, "step": int(server.get("step", 0)), "params": int(full.numel()) if full is not None else None,
            "shard": [shard.get("index"), shard.get("nnodes"), shard.get("lo"), shard.get("hi")] if shard else None}


def check_checkpoints(config: TrainConfig, me: int, mine: dict[str, Any], p: int, theirs: dict[str, Any]) -> None:
    """Node `me` and node `p` can continue together: both resume or neither, from checkpoints of
    the same model, each of the sharded server holding its own shard of the same M. One line,
    naming the node, before any process group forms."""
    if mine.get("resume") != theirs.get("resume"):
        who, other = (p, me) if theirs.get("resume") else (me, p)
        raise RendezvousError(f"--resume: node {who} resumes from its checkpoint but node {other} starts a new run; "
                              "resume every node (pyasgd-train --resume RUN_DIR on each, with the same --nnodes) or none")
    if not mine.get("resume"):
        return
    if mine.get("params") != theirs.get("params"):
        raise RendezvousError(f"--resume: node {p}'s checkpoint holds {theirs.get('params')} parameters but node {me}'s "
                              f"holds {mine.get('params')}: the nodes' run directories are not of the same run")
    M = config.nnodes
    for node, facts in ((me, mine), (p, theirs)):
        shard = facts.get("shard")
        if config.mode == "async" and shard is not None:
            lo, hi = shard_bounds(facts["params"], M)[node] if shard[1] == M else (None, None)
            if shard[:2] != [node, M] or shard[2:] != [lo, hi]:
                raise RendezvousError(f"--resume: node {node}'s checkpoint holds shard {shard[0]} of {shard[1]} nodes "
                                      f"(parameters {shard[2]}..{shard[3]}), not shard {node} of {M}: resume each node "
                                      "from its own run directory, with the --nnodes it was started with")
        elif config.mode == "async":
            raise RendezvousError(f"--resume: node {node}'s checkpoint holds no shard (a synchronous run's?): a "
                                  "sharded (async) run resumes from its own nodes' checkpoints")


def agreement(config: TrainConfig) -> dict[str, Any]:
    """The settings every node must share (all but PER_NODE)."""
    return {k: v for k, v in config.to_dict().items() if k not in PER_NODE}


def first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first field (in TrainConfig's order) where two nodes' settings differ."""
    for _, f in TrainConfig.flat_fields():
        if f.name in mine and mine.get(f.name) != theirs.get(f.name):
            return f.name
    return None


def check_settings(me: int, mine: dict[str, Any], shown: dict[str, Any], p: int, theirs: dict[str, Any],
                   sealed: bool) -> None:
    """Node `p` published `theirs` (settings, or with a join token their digests; `shown`: this
    node's settings `mine` as node p would publish them): the first field that differs fails,
    naming it."""
    if not isinstance(theirs, dict):
        theirs = {}
    name = first_difference(shown, theirs)
    if name is None:
        return
    opt = "--" + name.replace("_", "-")
    value = "a different value" if sealed else repr(theirs.get(name))
    raise RendezvousError(f"{opt}: node {me} has {mine[name]!r} but node {p} has {value}; every node must be started "
                          f"with the same {opt} (only {', '.join('--' + n.replace('_', '-') for n in PER_NODE)} may "
                          "differ)")
