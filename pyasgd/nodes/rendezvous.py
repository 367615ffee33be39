"""Beyond one node, the launchers' side: the M launchers meet at node 0 through torch.distributed's
TCPStore (hosted by node 0's launcher, or by torchrun's agent), check that their configurations
agree, watch each other (a heartbeat thread, notes saying why a node stopped), and gather the
per-node summaries into node 0's. The servers' gradient traffic is pyasgd/nodes/allreduce.py's.

    nodes = Nodes.join(config)        # rendezvous: every node or a clear error within --timeout
    nodes.lost()                      # '' or what happened to another node
    nodes.note("failed", message)     # why this node stops, for the others' messages
    summary = nodes.gather(summary)   # node 0: the global summary with per-node figures
    nodes.close()
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from pyasgd.config import TrainConfig
from pyasgd.errors import first_line
from pyasgd.nodes import auth
from pyasgd.nodes.agree import RendezvousError, agreement, check_checkpoints, check_settings, resume_facts

PREFIX = "pyasgd/"   # every key of ours, so torchrun's agent store can be shared
BEAT_S = 0.5         # heartbeat period
LOG = logging.getLogger("pyasgd")

# The server's activity, shared with its launcher (an mp.Array of doubles) and sent with every
# heartbeat: gradients taken in all, updates made, gradients held for the next update, and when
# its wait for the other nodes in a synchronous round began (time.monotonic(); 0: not waiting).
TAKEN, ROUNDS, HELD, WAITING = range(4)
ACTIVITY = 4


def dead_after(config: TrainConfig) -> float:
    """Seconds without a heartbeat after which a node is lost. Liveness is the heartbeat alone:
    a node that beats but makes no progress is slow, never lost. (A dead node's processes close
    their sockets, which the servers' collectives notice at once; this catches hung or cut-off
    ones.)"""
    return max(2.0, min(config.timeout / 2, 30.0))


def agent_store() -> bool:
    """True under torchrun: its agent already hosts a TCPStore on MASTER_PORT, which we share."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def store_prefix() -> str:
    """Our keys' namespace. Under torchrun the agent's store outlives a restart of its workers
    (--max-restarts), so each attempt gets its own (TORCHELASTIC_RESTART_COUNT): the restarted
    nodes must not find the ranks and heartbeats of the attempt that failed."""
    if agent_store():
        return f"{PREFIX}restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return PREFIX


def connect_store(config: TrainConfig, *, host: bool, timeout: float):
    """A TCPStore client of node 0's store (host=True: node 0 creates and serves it), prefixed
    with our namespace. Errors are RendezvousErrors that name the address, within `timeout`."""
    from torch.distributed import PrefixStore, TCPStore

    addr, port = config.master_addr, config.master_port
    where = f"{addr}:{port} (--master-addr, --master-port)"
    td = datetime.timedelta(seconds=timeout)
    if host:
        try:
            store = TCPStore(addr, port, config.nnodes, True, timeout=td, wait_for_workers=False)
        except RuntimeError as e:
            why = "the port is in use" if "EADDRINUSE" in str(e) else first_line(e)
            raise RendezvousError(f"node 0 cannot listen on port {port} for the rendezvous: {why}; choose "
                                  "another --master-port") from None
        return PrefixStore(store_prefix(), store)
    deadline = time.monotonic() + timeout
    _wait_reachable(addr, port, deadline, where)  # TCPStore's own connect retries for up to 2x its timeout
    try:
        store = TCPStore(addr, port, config.nnodes, False, timeout=datetime.timedelta(
            seconds=max(1.0, deadline - time.monotonic())))
    except RuntimeError as e:
        raise RendezvousError(f"node {config.node_rank} cannot join the rendezvous at {where}: "
                              f"{first_line(e)}") from None
    store.set_timeout(td)
    return PrefixStore(store_prefix(), store)


def _wait_reachable(addr: str, port: int, deadline: float, where: str) -> None:
    """Connect to node 0's port until it answers or the deadline passes (node 0 may start later)."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(f"cannot resolve the master address {addr!r} (--master-addr): {e}") from None
    last = ""
    while True:
        for family, kind, proto, _, sockaddr in infos:
            s = socket.socket(family, kind, proto)
            s.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                s.connect(sockaddr)
                return
            except OSError as e:
                last = e.strerror or str(e)
            finally:
                s.close()
        if time.monotonic() >= deadline:
            raise RendezvousError(f"no node 0 answered at {where} within --timeout ({last}): start node 0 "
                                  "first or together, check the address and port, and that no firewall blocks it")
        time.sleep(0.2)


class Nodes:
    """This launcher's view of the other nodes, from the rendezvous to the end of the run."""

    def __init__(self, config: TrainConfig, store) -> None:
        self.config, self.store = config, store
        self.rank, self.size = config.node_rank, config.nnodes
        self.dead_after = dead_after(config)
        self.phase = "starting"   # sent with the heartbeat: starting, training, stopping, testing, done
        self.activity = None      # the server's activity (ACTIVITY doubles), once it is started
        self.peer: dict[int, dict] = {}  # each other node's last heartbeat
        self.slow: dict[int, dict] = {}  # node -> {"waits": n, "longest_s": s}: slow, never lost
        self.sealer = auth.Sealer(None, None)  # seals what this node sends (with a join token)
        self.admissions: auth.Admissions | None = None  # node 0: answers join attempts
        self._lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def join(cls, config: TrainConfig, resume: dict | None = None) -> Nodes:
        """Meet the other nodes and check the configurations agree, and with --resume that the
        nodes' checkpoints fit together (`resume`: this node's, loaded); raises RendezvousError."""
        t = config.timeout
        deadline = time.monotonic() + t
        store = connect_store(config, host=config.node_rank == 0 and not agent_store(), timeout=t)
        self = cls(config, store)
        R, M = self.rank, self.size

        def wait_until(what: str) -> None:
            if time.monotonic() > deadline:
                raise RendezvousError(f"no {what} within --timeout {t:g} s at {config.master_addr}:"
                                      f"{config.master_port}: is node 0 running with the same --master-port?")
            time.sleep(0.05)

        key = auth.token()
        try:
            self.sealer = auth.publish_mode(store, key) if R == 0 else auth.join(store, R, key, wait_until)
        except auth.JoinRefused as e:
            raise RendezvousError(str(e)) from None
        self.admissions = auth.Admissions(self.sealer, LOG)
        if store.add(f"rank/{R}", 1) > 1:
            raise RendezvousError(f"--node-rank: another node was already started with --node-rank {R}; give each of "
                                  f"the {M} nodes its own rank in 0..{M - 1}")
        mine = agreement(config)
        # With a join token the store gets one HMAC per setting, never a value (pyasgd/nodes/auth.py).
        sealed = self.sealer.on

        def shown(rank: int) -> dict[str, Any]:  # what node `rank` publishes for these settings
            return auth.digests(self.sealer.key, self.sealer.nonce, mine, rank) if sealed else mine

        facts = resume_facts(resume)
        store.set(f"resume/{R}", self.sealer.seal(json.dumps(facts), f"resume/{R}"))  # before config/R: both are there
        store.set(f"config/{R}", json.dumps(shown(R), sort_keys=True))
        # Compare with each node's settings as soon as they arrive: a disagreement (even in
        # --nnodes) fails at once, without waiting for nodes that may never come.
        pending = [p for p in range(M) if p != R]
        while pending:
            if R == 0:
                self.admissions.answer(store)
            for p in [p for p in pending if store.check([f"config/{p}"])]:
                pending.remove(p)
                check_settings(R, mine, shown(p), p, _loads(store.get(f"config/{p}")), sealed)
                theirs_facts = self.sealer.open(store.get(f"resume/{p}").decode(), f"resume/{p}")
                check_checkpoints(config, R, facts, p, _loads(theirs_facts) if theirs_facts else {})
            if pending and time.monotonic() > deadline:
                raise RendezvousError(f"node(s) {', '.join(map(str, pending))} of --nnodes {M} did not join the "
                                      f"rendezvous at {config.master_addr}:{config.master_port} within --timeout "
                                      f"{t:g} s: start one pyasgd-train per node with the same --master-addr and "
                                      "--master-port, each with its own --node-rank")
            if pending:
                time.sleep(0.1)
        store.set(f"beat/{R}", "0")
        self._thread = threading.Thread(target=self._watch, name="pyasgd-heartbeat", daemon=True)
        self._thread.start()
        return self

    # -- watching the others ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Beat, and watch the others' beats and notes (its own store connection: a client is not
        shared between threads)."""
        try:
            store = connect_store(self.config, host=False, timeout=self.config.timeout)
        except RendezvousError as e:
            self._lost = f"node 0 is gone: {e}"
            return
        seen = {p: ("", time.monotonic()) for p in range(self.size) if p != self.rank}
        beat = 0
        while not self._stop.wait(BEAT_S):
            beat += 1
            try:
                store.set(f"beat/{self.rank}", json.dumps({"n": beat, **self.state()}))
                for p in seen:
                    if store.check([f"done/{p}"]) or store.check([f"stopped/{p}"]):
                        continue  # it ended its part in order: silence is expected now
                    note = self._note_of(store, p)
                    if note:
                        self._lost = self._lost or note
                    value = store.get(f"beat/{p}").decode()
                    if value != seen[p][0]:
                        seen[p] = (value, time.monotonic())
                        self.peer[p] = _parse_beat(value)
                    elif time.monotonic() - seen[p][1] > self.dead_after and not self._lost:
                        self._lost = f"node {p} stopped responding (no heartbeat for {self.dead_after:g} s)"
                self._report_slow()
                if self.admissions is not None and self.rank == 0:
                    self.admissions.answer(store, open_=False)  # the rendezvous is over: refuse latecomers
            except RuntimeError as e:  # node 0's store is gone with node 0
                if not self._stop.is_set():
                    self._lost = self._lost or f"node 0 is gone (its rendezvous store stopped answering: {first_line(e)})"
                return

    def state(self) -> dict[str, Any]:
        """What this node's heartbeat says besides "alive": its phase and its server's activity."""
        a = self.activity
        if a is None:
            return {"phase": self.phase}
        since = a[WAITING]
        return {"phase": self.phase, "taken": int(a[TAKEN]), "updates": int(a[ROUNDS]), "held": int(a[HELD]),
                "waiting_s": round(time.monotonic() - since, 1) if since else None}

    def _report_slow(self) -> None:
        """While this node's server has waited longer than --timeout for the other nodes in a
        synchronous round, each node that is alive but not yet in that round is slow: said once
        per round (a warning the first time), counted for the summary, never called lost."""
        a, T = self.activity, self.config.timeout
        since = a[WAITING] if a is not None else 0.0
        if not since or time.monotonic() - since <= T:
            return
        waited, update = time.monotonic() - since, int(a[ROUNDS]) + 1
        for p, st in self.peer.items():
            if st.get("waiting_s") is not None and st.get("updates", -1) >= update - 1:
                continue  # it is in this round too, waiting for someone else
            rec = self.slow.setdefault(p, {"waits": 0, "longest_s": 0.0, "_update": None})
            rec["longest_s"] = round(max(rec["longest_s"], waited), 1)
            if rec["_update"] == update:
                continue
            rec["_update"], rec["waits"] = update, rec["waits"] + 1
            held = st.get("held")
            (LOG.warning if rec["waits"] == 1 else LOG.info)(
                f"node {p} is slow, not lost: this node has waited {waited:.0f} s (over --timeout {T:g} s) for "
                f"its part of update {update:,}; it is alive (heartbeat, {st.get('phase', '?')})"
                + (f" and holds {held} of its {self.config.workers} gradients for it" if held is not None else ""))

    def slow_nodes(self) -> dict[str, dict]:
        """For the summary: each node that made this one wait over --timeout, how often and how long."""
        return {str(p): {k: v for k, v in rec.items() if not k.startswith("_")} for p, rec in sorted(self.slow.items())}

    def _open(self, value: bytes, where: str) -> str:
        got = self.sealer.open(value.decode(), where)
        return got if got is not None else "(a note not sealed under this run's join token)"

    def _note_of(self, store, p: int) -> str:
        if store.check([f"failed/{p}"]):
            return f"node {p} failed: {self._open(store.get(f'failed/{p}'), f'failed/{p}')}"
        return ""

    def lost(self) -> str:
        """'' while every other node is alive and well, else what happened (naming the node)."""
        return self._lost

    def note(self, kind: str, message: str) -> None:
        """Tell the others why this node stops: kind "failed" or "stopped"."""
        try:
            self.store.set(f"{kind}/{self.rank}", self.sealer.seal(message, f"{kind}/{self.rank}"))
        except RuntimeError:
            pass  # node 0 is gone: nobody to tell

    def why(self, node: int, wait: float = 0.0) -> str:
        """What node `node` said when it stopped (waiting up to `wait` s for it to say)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                for kind in ("failed", "stopped"):
                    if self.store.check([f"{kind}/{node}"]):
                        return self._open(self.store.get(f"{kind}/{node}"), f"{kind}/{node}")
            except RuntimeError:
                return "(its reason is lost with node 0's store)"
            if time.monotonic() >= deadline:
                return "(it gave no reason)"
            time.sleep(0.1)

    def name_loss(self) -> str:
        """After a collective failed: which node was lost, waiting up to the heartbeat limit."""
        deadline = time.monotonic() + self.dead_after + 2 * BEAT_S
        while not self._lost and time.monotonic() < deadline:
            time.sleep(0.1)
        return self._lost or "another node was lost (the collective between the nodes failed)"

    # -- the end ------------------------------------------------------------------------------------

    def gather(self, summary: dict[str, Any], wait: float | None = None) -> dict[str, Any]:
        """Every node sends node 0 its summary; node 0 returns the global one (totals over the
        nodes, each node's figures under "nodes"), the others their own, marked with their rank."""
        summary = {**summary, "nnodes": self.size, "node_rank": self.rank,
                   "total_workers": self.config.total_workers}
        if self.slow:
            summary["slow_nodes"] = self.slow_nodes()
        if self.rank != 0:
            try:
                self.store.set(f"summary/{self.rank}", self.sealer.seal(json.dumps(summary), f"summary/{self.rank}"))
            except RuntimeError:
                pass
            return summary
        per_node = {0: summary}
        waiting = self._await_summaries(per_node, wait)
        if waiting:
            LOG.warning(f"node(s) {', '.join(map(str, waiting))} sent no summary; the global summary "
                        "lists them as missing")
        return merge_summaries(per_node, self.size)

    def _await_summaries(self, per_node: dict[int, dict], wait: float | None) -> list[int]:
        """Take each node's summary as it comes, for as long as the node is alive (a node slow to
        decode its test set is waited for; a line every --timeout says so), or at most `wait` s.
        A node that stops beating, or says goodbye without one, is given up. Returns those given up."""
        start = now = time.monotonic()
        seen = {p: ("", now) for p in range(1, self.size)}
        gone: list[int] = []
        said = now
        while True:
            for p in [p for p in range(1, self.size) if p not in per_node and p not in gone]:
                if self.store.check([f"summary/{p}"]):
                    got = self.sealer.open(self.store.get(f"summary/{p}").decode(), f"summary/{p}")
                    if got is None:
                        gone.append(p)
                        LOG.warning(f"node {p}'s summary is not sealed under this run's join token: ignored")
                        continue
                    per_node[p] = json.loads(got)
                    continue
                beat = self.store.get(f"beat/{p}").decode() if self.store.check([f"beat/{p}"]) else ""
                if beat != seen[p][0]:
                    seen[p] = (beat, now)
                elif now - seen[p][1] > self.dead_after or self.store.check([f"done/{p}"]):
                    if not self.store.check([f"summary/{p}"]):  # it may have sent one just before
                        gone.append(p)
            left = [p for p in range(1, self.size) if p not in per_node and p not in gone]
            if not left or (wait is not None and now - start > wait):
                return gone + left
            if now - said > self.config.timeout:
                said = now
                LOG.info("waiting for the summary of node(s) " + ", ".join(
                    f"{p} (alive, {_parse_beat(seen[p][0]).get('phase', '?')})" for p in left))
            time.sleep(0.05)
            now = time.monotonic()

    def close(self) -> None:
        """Stop watching; node 0 (the store's host) waits until the others have said goodbye, so
        their last store calls find it."""
        try:
            self.store.set(f"done/{self.rank}", "1")
            if self.rank == 0:
                deadline = time.monotonic() + min(self.config.timeout, 30.0)
                while time.monotonic() < deadline and not self._lost and not all(
                        self.store.check([f"done/{p}"]) for p in range(1, self.size)):
                    time.sleep(0.05)
        except RuntimeError:
            pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _loads(value) -> Any:
    """JSON another node put in the store ({} when it is not JSON: a check then fails, naming it)."""
    try:
        return json.loads(value)
    except ValueError:
        return {}


def _parse_beat(value: str) -> dict[str, Any]:
    try:
        got = json.loads(value)
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


# Per-node summary fields added up into the global summary.
SUMMED = ("tokens", "gradients", "wps", "dropped_gradients", "worker_compute_s", "worker_wait_s", "worker_restarts")


def merge_summaries(per_node: dict[int, dict[str, Any]], size: int) -> dict[str, Any]:
    """Node 0's summary over every node: sums of what each node counts for its own workers
    (tokens, words per second, ...; with the sharded server node 0's, whose shard saw every
    gradient once), the staleness histogram of every gradient (per shard with the sharded
    server), and each node's own figures under "nodes" (a node that sent none is listed as
    missing)."""
    out = dict(per_node[0])
    hist: dict[str, int] = {}
    for s in per_node.values():
        for k, v in (s.get("staleness_hist") or {}).items():
            hist[k] = hist.get(k, 0) + v
    # With the sharded server every gradient reaches every shard's owner: node 0 (shard 0)
    # counted each gradient's tokens once, the other nodes counted the same ones again.
    # Each owner drops its own pieces (a gradient's staleness differs by shard): the pieces
    # dropped over all shards are "dropped_pieces", and "dropped_gradients" stays shard 0's count
    # of whole gradients, as its tokens and gradients do (their sum counted a gradient up to M times).
    sharded = "shard" in per_node[0]
    if sharded:
        out["dropped_pieces"] = sum(s.get("dropped_gradients") or 0 for s in per_node.values())
    for key in SUMMED:
        if sharded and key in ("tokens", "gradients", "wps", "dropped_gradients"):
            continue
        values = [s.get(key) for s in per_node.values()]
        if all(v is not None for v in values):
            out[key] = round(sum(values), 3) if isinstance(values[0], float) else sum(values)
    n = sum(hist.values())
    out["staleness_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    out["avg_staleness"] = sum(int(k) * v for k, v in hist.items()) / n if n else None
    keep = ("updates", "tokens", "wps", "avg_staleness", "staleness_hist", "wall_s", "stopped_because", "run_dir",
            "shard", "internode", "slow_nodes")
    out["nodes"] = [{"node_rank": p, **{k: per_node[p].get(k) for k in keep}} if p in per_node
                    else {"node_rank": p, "missing": True} for p in range(size)]
    return out
