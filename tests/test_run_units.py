"""Unit tests of the trainer's pieces, without processes: the server's Updater (policies, the
sync-mode publish rule, clipping, skipping), the learning-rate schedule, early stopping, and
refusing a resume whose fixed settings changed."""
import dataclasses
import types

import pytest
import torch

from pyasgd import rundir
from pyasgd.config import ConfigError, TrainConfig, resume_fixed_fields
from pyasgd.launcher import train
from pyasgd.runlog import RunLog
from pyasgd.schedule import learning_rate
from pyasgd.server import Updater

N = 37


def config(**kw):
    base = dict(task="synthetic", workers=2, quiet=True, lr=0.01, warmup=0, schedule="constant", beta2=0.999,
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
    from pyasgd.cli import main

    assert {"task", "workers", "seed", "batch_size", "preset", "vocab_size", "train_src"} <= set(resume_fixed_fields())
    c = config(out=str(tmp_path / "run"), simulate=True, max_updates=5)
    train(c)
    again = dataclasses.replace(c, resume=c.out, max_updates=8)
    for field, value in (("workers", 3), ("seed", 2), ("batch_size", 16)):
        with pytest.raises(ConfigError, match=rf"--{field.replace('_', '-')} is {value}.*must keep it"):
            rundir.prepare(dataclasses.replace(again, **{field: value}))
    assert rundir.prepare(dataclasses.replace(again, lr=0.02)) == c.out  # an ordinary setting may change
    r = run_main(main, "--resume", c.out, "--workers", "3", "--quiet")
    assert r.returncode == 2 and "--workers is 3" in r.stderr
