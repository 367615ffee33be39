"""The server: Adam moments, the learning-rate schedule and one update from G collected gradients
(stale policy, clipping, fused sum + Adam). `Updater` is shared by the real server process
(`server_main`) and the simulator.

Where the parameters live: a CPU server keeps no copy of its own. The region's published (front)
buffer is the current parameters; an update reads it and writes the new ones straight into the
back buffer (`fused_adam_step(..., param_out=back)`), which is then published. A CUDA server
(--server-device cuda:I) keeps master parameters on its GPU and copies them into the back buffer,
and so does the simulator (its published vector is not double-buffered)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from pyasgd.core import ext as _ext
from pyasgd.config import TrainConfig
from pyasgd.core.fused import fused_adam_step
from pyasgd.trainer.proc import become_child, injected_server_fault, parent_gone, run_reporting, server_fault_step
from pyasgd.trainer.schedule import learning_rate


@dataclass
class UpdateResult:
    applied: bool      # the parameters changed
    publish: bool      # publish a new version (an applied update; in sync mode, a skipped one too)
    lr: float
    dropped: int       # gradients discarded as too stale
    grad_norm: float | None = None


class Updater:
    """The server's optimiser state and its update rule.

    keep_master=True: `master` holds the parameters on `device`; apply() updates it in place and
    copies the result into `out`. keep_master=False (CPU only): no parameters are kept (`master`
    is None; `params` gives only the size); apply() reads them from `current` (the region's front
    buffer) and writes the new ones into `out` (the back buffer) alone: by construction 4G + 24
    bytes per parameter per update (2G + 24 with bf16 gradients) instead of 4G + 28, and 4 bytes
    per parameter less memory."""

    def __init__(self, config: TrainConfig, params: torch.Tensor, device: str = "cpu", *,
                 keep_master: bool = True) -> None:
        self.config = config
        self.device = torch.device(device)
        if keep_master:
            self.master = params.detach().to(self.device, dtype=torch.float32, copy=True).contiguous()
        else:
            if self.device.type != "cpu":
                raise ValueError(f"an Updater without a master copy writes the region's back buffer from the "
                                 f"CPU; on {self.device} keep the master (keep_master=True)")
            self.master = None
        self.exp_avg = torch.zeros(params.numel(), dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step = 0          # applied updates: the schedule's clock
        self.dropped = 0       # gradients discarded by drop:T
        self.skipped = 0       # updates skipped for a non-finite gradient
        self.drop_after = config.stale_drop()
        self._sum = None       # workspace for clipping

    def lr(self, update: int) -> float:
        c = self.config
        return learning_rate(update, lr=c.lr, schedule=c.schedule, warmup=c.warmup)

    def apply(self, grads: list[torch.Tensor], staleness: list[int], out: torch.Tensor | None = None,
              bounds: list[float] | None = None, *, current: torch.Tensor | None = None) -> UpdateResult:
        """One server update from `grads` (fp32 or bf16, all alike; the server owns them: fp32
        ones are scaled in place). `out`, when given, receives the parameters to publish (the
        region's back buffer); publish them when the result says so. `bounds` (max |g| per
        gradient, measured by the pushers) let the fused update skip its check pass.

        Without a master copy, `current` (the published parameters, the region's front buffer)
        is read and `out` is required: an applied update writes every element of it, a skipped
        one nothing (it then holds an older version: never publish it as it is)."""
        if self.master is None and (current is None or out is None):
            raise ValueError("this Updater keeps no master copy: pass current= (the published parameters) "
                             "and out= (the buffer that receives the new ones)")
        params = self.master if self.master is not None else current
        res = self._apply(grads, staleness, out, bounds, params)
        if not res.applied and self.config.mode == "sync":
            # Everyone waits at the barrier for the next version: publish the unchanged
            # parameters so they go on (a skipped or all-dropped update is still a round).
            res.publish = True
            if out is not None:
                out.copy_(params)
        return res

    def _apply(self, grads, staleness, out, bounds, params) -> UpdateResult:
        c = self.config
        kept = list(range(len(grads)))
        if self.drop_after is not None:
            kept = [i for i in kept if staleness[i] <= self.drop_after]
        dropped = len(grads) - len(kept)
        self.dropped += dropped
        lr = self.lr(self.step + 1)
        if not kept:
            return UpdateResult(False, False, lr, dropped)
        use = [grads[i] for i in kept]
        use_bounds = [bounds[i] for i in kept] if bounds else None  # 1/staleness scaling keeps them valid
        if c.stale_policy == "scale" and any(staleness[i] > 1 for i in kept):
            if use[0].dtype != torch.float32:  # scaled in bf16 they would be rounded again: widen
                use = [g.float() for g in use]
            for i, g in zip(kept, use):
                if staleness[i] > 1:
                    g.mul_(1.0 / staleness[i])  # Zhang et al. 2016: weight by 1/staleness
        norm = None
        if c.clip_norm > 0:
            if self._sum is None:
                self._sum = torch.empty_like(self.exp_avg)  # fp32, on the server's device
            self._sum.copy_(use[0])  # bf16 widens exactly, as in the kernel
            for g in use[1:]:
                self._sum.add_(g.to(self._sum.device))  # the kernel's order: clipping only rescales
            norm = float(self._sum.norm())
            if norm > c.clip_norm:
                self._sum.mul_(c.clip_norm / (norm + 1e-6))
            use, use_bounds = [self._sum], None
        if self.device.type == "cuda":
            use = [g if g.device == self.device or g.is_pinned() else g.to(self.device) for g in use]
        # With a master: in place, and copied to `out`. Without: read `params` (the published
        # buffer), write only `out` (the back buffer); m and v in place either way.
        where = {"out": out} if self.master is not None else {"param_out": out}
        ok = fused_adam_step(params, self.exp_avg, self.exp_avg_sq, use, step=self.step + 1, lr=lr,
                             beta1=c.beta1, beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                             decoupled=c.decoupled, grad_bounds=use_bounds, **where)
        if ok:
            self.step += 1
        else:
            self.skipped += 1
        return UpdateResult(ok, ok, lr, dropped, norm)

    def state_dict(self, current: torch.Tensor | None = None) -> dict:
        """What a checkpoint keeps. Without a master copy the parameters are `current` (the
        published buffer: copied, so the checkpoint does not hold a view of the region)."""
        if self.master is None and current is None:
            raise ValueError("this Updater keeps no master copy: pass current= (the published parameters)")
        params = self.master.cpu() if self.master is not None else current.detach().clone()
        return {"params": params, "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                "step": self.step, "dropped": self.dropped, "skipped": self.skipped}

    def load_state_dict(self, state: dict, current: torch.Tensor | None = None) -> None:
        """Continue from a checkpoint. Without a master copy the parameters are not loaded here:
        they are what was published (the launcher publishes the checkpoint's before the server
        starts), and `current`, when given, must equal them."""
        if self.master is not None:
            self.master.copy_(state["params"])
        elif current is not None and not torch.equal(current, state["params"].to(current.device)):
            raise RuntimeError("the published parameters are not the checkpoint's: the server resumes from the "
                               "parameters the launcher published, which must be the checkpoint's")
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step = int(state["step"])
        self.dropped = int(state.get("dropped", 0))
        self.skipped = int(state.get("skipped", 0))


def update_record(update: int, version: int, res: UpdateResult, staleness, tokens, loss_sum, workers, t0,
                  positions=None) -> dict:
    return {"kind": "update", "update": update, "version": version, "time": round(time.monotonic() - t0, 4),
            "lr": res.lr, "staleness": list(staleness), "workers": list(workers), "tokens": int(sum(tokens)),
            "loss": (float(sum(loss_sum)) / max(1, int(sum(tokens)))), "applied": res.applied,
            "dropped": res.dropped, **({"grad_norm": res.grad_norm} if res.grad_norm is not None else {}),
            **({"positions": list(positions)} if positions is not None else {})}


@dataclass
class ServerArgs:
    config: TrainConfig
    region: str
    checkpoint_path: str
    resume_state: str = ""       # path of a checkpoint to start from
    cursors: object = None       # mp.Array of N int64: where each worker started (Cursor.pack)
    stop: object = None          # mp.Event
    queue: object = None         # mp.Queue of records to the launcher
    stop_code: object = None     # mp.Value: 2 when the launcher stops because the run failed


def server_main(args: ServerArgs) -> None:
    """The server process: collect G gradients, update, publish, until told to stop."""
    become_child("pyasgd-server", on_parent_death="flag")
    run_reporting(args.queue, "server", _serve, args)


def _serve(args: ServerArgs) -> None:
    from pyasgd.core.region import RegionClosedError, RegionTimeoutError, SharedRegion

    config = args.config
    # The fused update is memory-bound: two threads saturate a socket's bandwidth, and where the
    # workers already take every core, one thread keeps the server from stealing theirs.
    _ext.set_cpu_threads(1 if config.workers >= (os.cpu_count() or 1) else 2)
    torch.set_num_threads(1)
    region = SharedRegion.attach(args.region, pin=config.server_device.startswith("cuda"))
    segment = region.path
    q = args.queue
    try:
        # A CPU server's parameters are the published ones (the front buffer, read in place); a
        # CUDA server keeps a master copy on its GPU, starting from what the launcher published.
        in_region = config.server_device == "cpu"
        # Asynchronous across nodes, this server owns one contiguous shard of the parameters.
        lo, hi = 0, region.n
        if config.nnodes > 1 and config.mode == "async":
            from pyasgd.nodes.sharded import shard_bounds

            lo, hi = shard_bounds(region.n, config.nnodes)[config.node_rank]
        if in_region:
            up = Updater(config, region.front()[lo:hi], keep_master=False)
        else:
            init = torch.empty(region.n)
            region.pull(init)
            up = Updater(config, init[lo:hi], config.server_device)

        def current() -> torch.Tensor | None:
            return region.front()[lo:hi] if in_region else None

        resumed = {}
        if args.resume_state:
            from pyasgd.core import checkpoint

            resumed = checkpoint.load(args.resume_state)
            up.load_state_dict(resumed["server"], current=current())
        t0 = time.monotonic()

        # Each worker's data position after the last of its gradients this server has used (applied,
        # or deliberately dropped or skipped): a resume starts there, so batches whose gradients
        # were still in flight or in the accumulation are computed again, none twice.
        positions = list(args.cursors[:]) if args.cursors is not None else [0] * config.workers
        # The run's progress counters, kept in the checkpoint so a resumed run's token-scheduled
        # validations and epochs go on (the launcher's RunLog counts the same from the records).
        progress = {"tokens": 0, "gradients": 0, "vtime": None, "elapsed": 0.0, "valid_s": 0.0}
        progress.update(resumed.get("progress") or {})

        kept_too: dict = {}  # more for the checkpoint (the sharded server's counts)

        def save() -> None:
            from pyasgd.core import checkpoint

            state = {"server": up.state_dict(current=current()), "version": region.version,
                     "positions": torch.tensor(positions, dtype=torch.int64),
                     "progress": dict(progress), "config": repr(config)}
            if (lo, hi) != (0, region.n):  # a shard's owner: its part, and this node's view of the rest
                state["shard"] = {"index": config.node_rank, "lo": lo, "hi": hi, "nnodes": config.nnodes}
                state["view"] = region.front().clone() if in_region else _pulled(region)
            state.update(kept_too)
            checkpoint.save_atomic(state, args.checkpoint_path)
            q.put({"kind": "checkpoint", "update": up.step, "path": args.checkpoint_path})

        extra = {}
        if config.nnodes > 1 and config.mode == "async":
            reason, extra = _serve_shard(args, region, up, current, positions, progress, save, t0, resumed,
                                         kept_too)
        elif config.nnodes > 1:
            reason, extra = _serve_across_nodes(args, region, up, current, positions, progress, save, t0)
        else:
            reason = _serve_one_node(args, region, up, current, positions, progress, save, t0)
        save()
        q.put({"kind": "server_done", "reason": reason, "update": up.step, "dropped": up.dropped,
               "skipped": up.skipped, **extra})
    finally:
        region.close()
        if parent_gone():
            q.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it
            try:  # its owner is dead: remove the segment now (attached processes keep their mapping)
                os.unlink(segment)
            except FileNotFoundError:
                pass


def _serve_one_node(args: ServerArgs, region, up: Updater, current, positions, progress, save, t0) -> str:
    """Collect G gradients, update, publish, until told to stop; returns why it stopped."""
    from pyasgd.core.region import RegionClosedError, RegionTimeoutError, SharedRegion

    config, q, G = args.config, args.queue, args.config.G
    idle_since = time.monotonic()
    reason = "stopped"
    # Gradients are taken one at a time (so each pusher learns at once that its gradient is in
    # the accumulation) and summed G at a time by the fused kernel straight from their slots.
    held = []  # gradients taken into the accumulation, one at a time in arrival order
    while not args.stop.is_set():
        if parent_gone():  # the launcher was killed outright: save, and leave nothing behind
            reason = "launcher died"
            break
        try:
            taken = region.collect(1, timeout=0.25)
        except RegionTimeoutError:
            if time.monotonic() - idle_since > config.timeout:
                raise RuntimeError(f"no gradients from the workers for {config.timeout:.0f} s (--timeout)")
            continue
        except RegionClosedError:
            break
        idle_since = time.monotonic()
        held.append(taken)
        if len(held) < G:
            region.ack(taken)  # accumulated: its pusher may pull and go on
            continue
        batch, held = SharedRegion.merge(held), []
        front = current()  # read before begin_update: the front stays the front until published
        back, res = region.begin_update(), None
        try:
            res = up.apply(batch.grads, batch.staleness, out=back, bounds=batch.bounds, current=front)
        finally:  # publish (or not), then release (ack) every slot of the batch
            region.end_update(batch, publish=res is not None and res.publish)
        for w, pos in zip(batch.workers, batch.positions):
            positions[w] = pos
        progress["tokens"] += int(sum(batch.tokens))
        if res.applied:
            progress["gradients"] += len(batch.staleness) - res.dropped
        q.put(update_record(up.step, region.version, res, batch.staleness, batch.tokens, batch.losses,
                            batch.workers, t0, positions=batch.positions))
        if res.applied and config.save_every and up.step % config.save_every == 0:
            save()
        if config.max_updates and up.step >= config.max_updates:
            reason = "max_updates"
            break
    return reason


def _serve_across_nodes(args: ServerArgs, region, up: Updater, current, positions, progress, save,
                        t0) -> tuple[str, dict]:
    """Synchronous SGD across M nodes (pyasgd/nodes/allreduce.py): collect this node's N gradients, sum
    them (stale policy applied per gradient), all-reduce the node sums with every node's stop
    vote, and apply the same update as every other node. Returns why it stopped and what it
    measured (the server_done record's "internode"); a lost node raises NodeLostError after the
    checkpoint is saved."""
    from pyasgd.core.region import RegionClosedError, RegionTimeoutError, SharedRegion
    from pyasgd.nodes.allreduce import FAIL, GO, STOP, NodeGroup, NodeLostError, weighted_sum

    config, q, N, R = args.config, args.queue, args.config.workers, args.config.node_rank
    group = NodeGroup(config)
    if args.resume_state:
        _agree_on_resume(group, region, up, current)
    q.put({"kind": "server_ready"})
    written, rounds = _bytes_written(), 0
    local = torch.empty(region.n)
    buf = torch.empty(region.n + config.nnodes + 1)
    held: list = []  # this round's local gradients, taken one at a time
    idle_since = time.monotonic()
    fault_at = server_fault_step()
    try:
        while True:
            vote = GO
            if parent_gone():  # the launcher was killed outright: tell the others, save, leave
                vote = FAIL
                group.note("failed", f"its launcher died (pid {os.getppid()} is not its parent any more); its "
                                     f"server saved the node's checkpoint at update {up.step}")
            elif args.stop.is_set():
                vote = FAIL if args.stop_code is not None and args.stop_code.value == 2 else STOP
            if vote == GO and len(held) < N:
                try:
                    taken = region.collect(1, timeout=0.25)
                except RegionTimeoutError:
                    if time.monotonic() - idle_since > config.timeout:
                        raise RuntimeError(f"no gradients from the workers for {config.timeout:.0f} s (--timeout)")
                    continue
                except RegionClosedError:
                    vote = STOP
                else:
                    idle_since = time.monotonic()
                    held.append(taken)
                    if len(held) < N:
                        region.ack(taken)  # in this round's sum: its pusher waits for the next version
                        continue
            batch = SharedRegion.merge(held) if held else None
            mine = batch is not None and vote == GO
            dropped = weighted_sum(batch.grads, batch.staleness, config, local) if mine else 0
            try:
                total, votes, kept = group.sync_round(local if mine else None, len(batch.grads) - dropped if mine else 0,
                                                      vote, buf)
            except NodeLostError:
                if batch is not None:
                    region.release(batch)
                raise
            rounds += 1
            if any(v != GO for v in votes):  # a node stops: the round is void everywhere
                if batch is not None:
                    region.release(batch)
                return _why_nodes_stop(votes, R), _measured(written, rounds)
            held = []
            front = current()
            back, res = region.begin_update(), None
            try:
                # The node sums arrive as one summed gradient; a round whose gradients were all
                # dropped is a skipped update, published unchanged (the barrier goes on).
                res = up.apply([total] if kept else [], [0] if kept else [], out=back, current=front)
            finally:
                region.end_update(batch, publish=res is not None and res.publish)
            res.dropped = dropped
            up.dropped += dropped
            for w, pos in zip(batch.workers, batch.positions):
                positions[w] = pos
            progress["tokens"] += int(sum(batch.tokens))
            if res.applied:
                progress["gradients"] += len(batch.staleness) - dropped
            q.put(update_record(up.step, region.version, res, batch.staleness, batch.tokens, batch.losses,
                                [config.global_rank(w) for w in batch.workers], t0, positions=batch.positions))
            if res.applied and config.save_every and up.step % config.save_every == 0:
                save()
            if up.step == fault_at:
                raise injected_server_fault(up.step)
            if config.max_updates and up.step >= config.max_updates:
                return "max_updates", _measured(written, rounds)
    except Exception as e:
        # A lost node, or this server's own failure (no gradients for --timeout, ...): the last
        # update every node applied is saved, so the pair resumes from here (the launcher tells
        # the other nodes why this one stopped).
        _save_after(save, e)
        raise


def _save_after(save, error: BaseException) -> None:
    """The checkpoint after a failure across nodes; a save that fails too (a broken CUDA context,
    a full disk) must not hide the error that stopped the server."""
    try:
        save()
    except Exception as e2:  # the caller re-raises the original error
        first = (str(error).splitlines() or [type(error).__name__])[0]
        print(f"pyasgd-server: saving the checkpoint after '{first}' failed too: {e2}", file=sys.stderr)


def _bytes_written() -> int | None:
    """This process's bytes written so far (/proc/self/io wchar: sockets, pipes and files)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def _measured(since: int | None, rounds: int) -> dict:
    now = _bytes_written()
    return {"internode": {"rounds": rounds, "bytes_written": None if since is None or now is None else now - since,
                          "how": "/proc/self/io wchar of the server: its gloo socket writes, plus its records to "
                                 "the launcher (a few hundred bytes per update)"}}


def _why_nodes_stop(votes: list[float], me: int) -> str:
    """The server's stop reason from a round's votes: its own stop, or the node that stopped
    (failed first) the others: "node R failed" / "node R stopped"."""
    from pyasgd.nodes.allreduce import FAIL, GO

    failed = [p for p, v in enumerate(votes) if v == FAIL]
    if me in failed or (not failed and votes[me] != GO):
        return "stopped"
    p = failed[0] if failed else next(p for p, v in enumerate(votes) if v != GO)
    return f"node {p} {'failed' if failed else 'stopped'}"


def _agree_on_resume(group, region, up: Updater, current) -> None:
    """All nodes continue from the same state: a node whose checkpoint is behind takes the one
    that is ahead (see NodeGroup.agree_on_state)."""
    params = current().clone() if current() is not None else up.master.cpu()
    state = [params, up.exp_avg.cpu(), up.exp_avg_sq.cpu()]
    src, step = group.agree_on_state(up.step, state)
    if src == group.rank:
        return
    region.publish(state[0])
    if up.master is not None:
        up.master.copy_(state[0])
    up.exp_avg.copy_(state[1])
    up.exp_avg_sq.copy_(state[2])
    up.step = step


def _pulled(region) -> torch.Tensor:
    t = torch.empty(region.n)
    region.pull(t)
    return t


def _serve_shard(args: ServerArgs, region, up: Updater, current, positions, progress, save, t0,
                 resumed: dict, kept_too: dict) -> tuple[str, dict]:
    """Asynchronous SGD across nodes: this server owns one shard (pyasgd/nodes/sharded.py). Returns why
    it stopped and the shard's counts (the server_done record's "shard", and the checkpoint's
    "shard_stats", which outlives a killed launcher)."""
    from pyasgd.nodes.allreduce import NodeGroup
    from pyasgd.nodes.sharded import ShardServer, shard_bounds

    config = args.config
    if resumed:
        got = resumed.get("shard") or {}
        if got.get("nnodes") != config.nnodes or got.get("index") != config.node_rank:
            raise RuntimeError(f"the checkpoint holds shard {got.get('index')} of {got.get('nnodes')} nodes, not "
                               f"shard {config.node_rank} of {config.nnodes}: resume with the same --nnodes and "
                               "--node-rank")
    group = NodeGroup(config)
    server = ShardServer(args, region, up, current, positions, progress, t0, save, group,
                         shard_bounds(region.n, config.nnodes), update_record)
    kept_too["shard_stats"] = server.stats  # the same dict: the checkpoint has the counts as they stand
    server.start(resume_steps=[] if resumed else None)
    args.queue.put({"kind": "server_ready"})
    try:
        reason = server.run()
    except Exception as e:
        _save_after(save, e)  # this shard as it stands: the pair resumes from the shards' checkpoints
        raise
    return reason, {"shard": server.stats}
