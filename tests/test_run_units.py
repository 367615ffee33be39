"""Unit tests of the trainer's pieces, without processes: the server's Updater (policies, the
sync-mode publish rule, clipping, skipping; with a master copy and without one, on a region's
two buffers), the learning-rate schedule, early stopping, and refusing a resume whose fixed
settings changed."""
import types

import os

import pytest
import torch

from pyasgd.trainer import rundir
from pyasgd.config import ConfigError, TrainConfig, resume_fixed_fields
from pyasgd.core.region import SharedRegion
from pyasgd.trainer.launch import train
from pyasgd.trainer.runlog import RunLog
from pyasgd.trainer.schedule import learning_rate
from pyasgd.trainer.update import Updater

N = 37


def config(**kw):
    base = dict(task="synthetic", mode="async", workers=2, quiet=True, lr=0.01, warmup=0, schedule="constant", beta2=0.999,
                eps=1e-8, max_updates=10)
    return TrainConfig(**{**base, **kw})


def grads(k, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) for _ in range(k)]


def test_updater_is_adam_on_the_summed_gradient():
    p = torch.randn(N)
    up = Updater(config(), p)
    ref = p.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for t in range(5):
        gs = grads(3, t)
        res = up.apply([g.clone() for g in gs], [0, 0, 0])
        assert res.applied and res.publish and res.lr == 0.01 and res.dropped == 0
        ref.grad = gs[0] + gs[1] + gs[2]
        opt.step()
    assert up.step == 5
    torch.testing.assert_close(up.master, ref.detach(), rtol=1e-6, atol=1e-7)


def test_scale_policy_weights_each_gradient_by_one_over_its_staleness():
    p = torch.randn(N)
    scaled, plain = Updater(config(stale_policy="scale"), p), Updater(config(), p)
    # staleness 0 and 1 keep their weight; 2 and 4 are exact powers of two, so the two paths agree bit for bit
    for step, stale in enumerate(([0, 2], [4, 1])):
        gs = grads(2, step)
        scaled.apply([g.clone() for g in gs], stale)
        plain.apply([g / max(1, s) for g, s in zip(gs, stale)], stale)
    assert torch.equal(scaled.master, plain.master)
    assert not torch.equal(scaled.master, Updater(config(), p).master)  # it did move


def test_drop_policy_discards_gradients_staler_than_t():
    p = torch.randn(N)
    drop, plain = Updater(config(stale_policy="drop:2"), p), Updater(config(), p)
    g = grads(3, 0)
    res = drop.apply([x.clone() for x in g], [0, 3, 2])
    assert res.applied and res.dropped == 1
    plain.apply([g[0].clone(), g[2].clone()], [0, 2])
    assert torch.equal(drop.master, plain.master)
    before = drop.master.clone()
    res = drop.apply(grads(1, 1), [5])  # everything too stale: no update, nothing to publish
    assert not res.applied and not res.publish and res.dropped == 1
    assert drop.step == 1 and drop.dropped == 2 and torch.equal(drop.master, before)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_skipped_update_is_published_only_in_sync_mode(mode):
    p = torch.randn(N)
    up = Updater(config(mode=mode), p)
    bad = grads(2, 0)
    bad[1][3] = float("inf")
    out = torch.full((N,), -1.0)
    res = up.apply(bad, [0, 0], out=out)
    assert not res.applied and up.skipped == 1 and up.step == 0 and torch.equal(up.master, p)
    if mode == "sync":  # the workers wait at the barrier for a new version: release them unchanged
        assert res.publish and torch.equal(out, p)
    else:
        assert not res.publish and torch.equal(out, torch.full((N,), -1.0))


# Updates that exercise every path of apply(): plain, with the pushers' bounds (one pass), a
# non-finite gradient (skipped), varying staleness (scale, drop:1; all dropped in the last but
# one), then plain again. (gradients, staleness, give bounds)
def update_script(dtype):
    script = []
    for t, stale in enumerate(([0, 0], [0, 1], [2, 0], [0, 0], [0, 2], [3, 2], [1, 0])):
        gs = [g.to(dtype) for g in grads(2, 100 + t)]
        if t == 3:
            gs[1][N - 1] = float("nan")  # the last element: every element before it is finite
        script.append((gs, stale, t % 2 == 1))
    return script


POLICIES = {
    "sync": dict(mode="sync"),
    "async": dict(mode="async"),
    "sync drop:1": dict(mode="sync", stale_policy="drop:1"),
    "async drop:1": dict(mode="async", stale_policy="drop:1"),
    "scale": dict(mode="async", stale_policy="scale"),
    "clip + adamw": dict(mode="async", clip_norm=1.0, weight_decay=0.01, decoupled=True),
    "l2": dict(mode="sync", weight_decay=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_back_buffer_update_equals_the_master_copy_update_bit_for_bit(policy, dtype):
    """The CPU server's path (no master: read the region's front buffer, write the back one,
    publish) against the master-copy path (the simulator's and the CUDA server's), update after
    update: the published parameters, the moments and every decision are the same bits."""
    c = config(**POLICIES[policy])
    p = torch.randn(N)
    master = Updater(c, p)
    with SharedRegion.create(N, 1) as region:
        v0 = region.publish(p)
        up = Updater(c, region.front(), keep_master=False)
        assert up.master is None
        published, skipped, dropped = 0, 0, 0
        for gs, stale, with_bounds in update_script(dtype):
            bounds = [float(g.float().abs().max()) for g in gs] if with_bounds else None
            out = torch.full((N,), -7.0)
            a = master.apply([g.clone() for g in gs], stale, out=out, bounds=bounds)
            front, back = region.front(), region.begin_update()
            old_back, res = back.clone(), None
            try:
                res = up.apply([g.clone() for g in gs], stale, out=back, bounds=bounds, current=front)
            finally:
                region.end_update(None, publish=res is not None and res.publish)
            assert (res.applied, res.publish, res.dropped, res.lr) == (a.applied, a.publish, a.dropped, a.lr)
            assert repr(res.grad_norm) == repr(a.grad_norm)  # the same float (or both nan, or None)
            if not res.publish:  # a skipped step wrote nothing into the back buffer
                assert torch.equal(back, old_back)
            published += res.publish
            skipped += not res.applied and res.dropped == 0
            dropped += res.dropped
            assert region.version == v0 + published
            assert torch.equal(region.front(), master.master)  # what the workers pull
            if a.publish:
                assert torch.equal(out, master.master)
            assert torch.equal(up.exp_avg, master.exp_avg) and torch.equal(up.exp_avg_sq, master.exp_avg_sq)
            assert (up.step, up.skipped, up.dropped) == (master.step, master.skipped, master.dropped)
        assert skipped >= 1  # the non-finite update
        if "drop" in policy:
            assert dropped >= 3  # including an update whose every gradient was dropped
        if c.mode == "sync":  # every round published, skipped or not: the barrier is released
            assert published == len(update_script(dtype))
        # a checkpoint reads the parameters from the front buffer (a copy, not a view of the region)
        st, ref = up.state_dict(current=region.front()), master.state_dict()
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], ref[key]), key
        assert st["params"].data_ptr() != region.front().data_ptr()
        assert (st["step"], st["skipped"], st["dropped"]) == (ref["step"], ref["skipped"], ref["dropped"])


def test_an_updater_without_a_master_copy_needs_the_published_parameters():
    c = config()
    with SharedRegion.create(N, 1) as region:
        p = torch.randn(N)
        region.publish(p)
        up = Updater(c, region.front(), keep_master=False)
        with pytest.raises(ValueError, match="no master copy: pass current="):
            up.apply(grads(1, 0), [0], out=torch.empty(N))
        with pytest.raises(ValueError, match="no master copy: pass current="):
            up.state_dict()
        # resume: the checkpoint's parameters must be the published ones (the launcher publishes them)
        saved = Updater(c, p).state_dict()
        saved["step"] = 5
        up.load_state_dict(saved, current=region.front())
        assert up.step == 5 and torch.equal(region.front(), p)
        wrong = dict(saved, params=p + 1)
        with pytest.raises(RuntimeError, match="published parameters are not the checkpoint's"):
            up.load_state_dict(wrong, current=region.front())
    with pytest.raises(ValueError, match="keep the master"):
        Updater(c, torch.zeros(N), "meta", keep_master=False)


def test_bf16_gradients_are_summed_in_fp32_and_scaled_without_a_second_rounding():
    """bf16 gradients: the update is the fp32 update of the widened values, whatever the policy
    (the scale policy widens before it scales, rather than rounding the scaled value to bf16)."""
    for kw, stale in ((dict(), [0, 0, 0]), (dict(stale_policy="scale"), [3, 1, 5]), (dict(clip_norm=1.0), [0, 0, 0])):
        c = config(**kw)
        p = torch.randn(N)
        a, b = Updater(c, p), Updater(c, p)
        for t in range(3):
            gs = [g * 4 for g in grads(3, 50 + t)]
            half = [g.to(torch.bfloat16) for g in gs]
            assert a.apply(half, stale).applied and b.apply([g.float() for g in half], stale).applied
            assert all(torch.equal(h, g.to(torch.bfloat16)) for h, g in zip(half, gs))  # not scaled in place
        assert torch.equal(a.master, b.master), kw
        assert not torch.equal(a.master, Updater(c, p).master)


def test_clipping_rescales_the_summed_gradient_to_the_norm():
    p = torch.randn(N)
    clip, plain = Updater(config(clip_norm=1.0), p), Updater(config(), p)
    for step, scale in enumerate((10.0, 0.01)):  # clipped, then below the norm (unchanged)
        gs = [g * scale for g in grads(2, step)]
        s = gs[0].clone().add_(gs[1])
        norm = float(s.norm())
        res = clip.apply([g.clone() for g in gs], [0, 0])
        assert res.grad_norm == pytest.approx(norm, rel=1e-6)
        if norm > 1.0:
            s.mul_(1.0 / (norm + 1e-6))
        plain.apply([s], [0])
    assert torch.equal(clip.master, plain.master)


def test_learning_rate_schedule():
    lrs = [learning_rate(u, lr=1.0, schedule="inverse-sqrt", warmup=4) for u in (1, 2, 3, 4, 16, 64)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 0.5, 0.25]  # linear warm-up, then lr * sqrt(warmup / update)
    assert learning_rate(4, lr=1.0, schedule="inverse-sqrt", warmup=0) == 0.5
    assert learning_rate(1000, lr=0.3, schedule="constant", warmup=4) == 0.3
    up = Updater(config(lr=1.0, schedule="inverse-sqrt", warmup=4), torch.zeros(N))
    assert up.apply(grads(1, 0), [0]).lr == 0.25  # the schedule counts the server's updates from 1


def fake_task(higher_is_better=True):
    return types.SimpleNamespace(primary="score", higher_is_better=higher_is_better,
                                 summary_fields=lambda best, targets: {}, epoch_tokens=lambda: None)


@pytest.mark.parametrize("higher", [True, False])
def test_patience_counts_validations_without_improvement(tmp_path, higher):
    sign = 1 if higher else -1
    log = RunLog(str(tmp_path), config(patience=2, bleu_targets=f"{sign * 0.55}"), fake_task(higher))
    try:
        seq = [(0.5, True, False), (0.4, False, False), (0.6, True, False), (0.6, False, False), (0.1, False, True)]
        for update, (score, best, out) in enumerate(seq, 1):
            assert log.on_valid(update, {"score": sign * score}) is best
            assert log.out_of_patience is out
        assert log.best == sign * 0.6 and log.best_update == 3
        assert log.targets[sign * 0.55]["update"] == 3  # a target is reached from its better side
    finally:
        log.close()
    never = RunLog(str(tmp_path), config(patience=0), fake_task())
    try:
        for update in range(1, 10):
            never.on_valid(update, {"score": -update})
        assert not never.out_of_patience
    finally:
        never.close()


def test_resume_refuses_a_changed_fixed_setting(tmp_path, run_main):
    from pyasgd.trainer.cli import main

    assert {"task", "workers", "seed", "batch_size", "preset", "vocab_size", "train_src"} <= set(resume_fixed_fields())
    c = config(out=str(tmp_path / "run"), simulate=True, max_updates=5)
    train(c)
    again = c.replace(resume=c.out, max_updates=8)
    for field, value in (("workers", 3), ("seed", 2), ("batch_size", 16)):
        with pytest.raises(ConfigError, match=rf"--{field.replace('_', '-')} is {value}.*must keep it"):
            rundir.prepare(again.replace(**{field: value}))
    assert rundir.prepare(again.replace(lr=0.02)) == c.out  # an ordinary setting may change
    assert rundir.holder(c.out) == os.getpid()  # prepare holds the run directory for this process
    rundir.release(c.out)
    assert rundir.holder(c.out) is None
    r = run_main(main, "--resume", c.out, "--workers", "3", "--quiet")
    assert r.returncode == 2 and "--workers is 3" in r.stderr


def test_each_node_gets_its_own_default_run_directory(tmp_path, monkeypatch):
    """Nodes started in the same second on a shared filesystem must not share a run directory
    (one checkpoint.pt, one metrics.jsonl): the default name carries the node's rank."""
    monkeypatch.chdir(tmp_path)
    from pyasgd.nodes import topology_for

    configs = [TrainConfig(task="synthetic", mode="async", nnodes=2, node_rank=r, master_port=29500, max_updates=1) for r in (0, 1)]
    dirs = [rundir.prepare(c, topology_for(c).run_tag) for c in configs]
    rundir.release_all()
    assert [d.endswith(f"-async-node{r}") for r, d in enumerate(dirs)] == [True, True]
    assert dirs[0] != dirs[1] and all((tmp_path / d / "config.json").is_file() for d in dirs)
    one = TrainConfig(task="synthetic", max_updates=1)
    assert not rundir.prepare(one, topology_for(one).run_tag).endswith("node0")
