"""Staleness compensation in the server's update rule (pyasgd/trainer/compensate.py, used by
Updater): each method against a plain torch reference written here from the papers' formulas, each
with a check that skipping the correction gives something else; the CPU server's no-master path;
a checkpoint round trip."""
import math
import os

import pytest
import torch

from pyasgd.config import ConfigError, TrainConfig
from pyasgd.trainer.compensate import History, momentum_beta1
from pyasgd.trainer.update import Updater

N = 41
LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8


def config(**kw):
    base = dict(task="synthetic", mode="async", workers=4, global_accum=1, quiet=True, lr=LR, warmup=0, schedule="constant",
                beta1=B1, beta2=B2, eps=EPS, max_updates=10)
    return TrainConfig(**{**base, **kw})


def grads(k, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) for _ in range(k)]


class Reference:
    """An asynchronous server written from the formulas with torch.optim.Adam: it keeps every
    published version, corrects each gradient with DC-ASGD (Zheng et al. 2017), publishes
    w + S * dw, averages the parameters, and sets beta1 from the running mean staleness."""

    def __init__(self, p, *, dc=0.0, adaptive=False, predict=0.0, ema=0.0, momentum=False):
        self.w = p.clone().requires_grad_()
        self.opt = torch.optim.Adam([self.w], lr=LR, betas=(B1, B2), eps=EPS)
        self.published = [p.clone()]
        self.dc, self.adaptive, self.predict, self.decay, self.momentum = dc, adaptive, predict, ema, momentum
        self.avg = p.clone()
        self.t = 0
        self.stale = []

    def update(self, gs, staleness, uncorrected=()):
        now = self.w.detach().clone()
        version = len(self.published) - 1
        total = torch.zeros(N)
        for i, (g, s) in enumerate(zip(gs, staleness)):
            g = g.clone()
            if self.dc and i not in uncorrected:
                lam = torch.full((N,), self.dc)
                if self.adaptive:
                    v = self.opt.state[self.w].get("exp_avg_sq", torch.zeros(N))
                    v_hat = v / (1 - B2 ** max(1, self.t))
                    lam = lam / (v_hat.sqrt() + EPS)
                g = g + lam * g * g * (now - self.published[version - s])
            total += g
        if self.momentum:
            self.stale.append(sum(staleness) / len(staleness))
            mean = sum(self.stale) / len(self.stale)  # a plain mean over the first 100 updates
            d = max(0.0, B1 / (1 - B1) - mean)
            self.opt.param_groups[0]["betas"] = (d / (1 + d), B2)
        self.w.grad = total
        self.opt.step()
        self.t += 1
        new = self.w.detach().clone()
        self.published.append(new + self.predict * (new - now))
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        self.avg = d * self.avg + (1 - d) * new


STALENESS = [[0], [1], [2], [3], [1], [4], [2], [0], [3], [5]]


def drive(up, ref, steps=STALENESS, out=True):
    for t, stale in enumerate(steps):
        gs = grads(len(stale), t)
        pub = torch.empty(N) if out else None
        up.apply([g.clone() for g in gs], stale, out=pub)
        if ref is not None:
            ref.update(gs, stale)
    return pub


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy,adaptive", [("dc:1.5", False), ("dc-adaptive:0.5", True)])
def test_delay_compensation_matches_the_reference(policy, adaptive):
    p = torch.randn(N)
    lam = float(policy.split(":")[1])
    up, ref = Updater(config(stale_policy=policy), p), Reference(p, dc=lam, adaptive=adaptive)
    drive(up, ref)
    close(up.master, ref.w.detach())
    assert up.uncorrected == 0  # N = 4, G = 1 keeps 6 versions: all of these staleness values
    plain = Updater(config(), p)
    drive(plain, None)
    assert (plain.master - up.master).abs().max() > 1e-4  # the correction is not skipped


def test_delay_compensation_counts_gradients_older_than_it_keeps():
    p = torch.randn(N)
    c = config(stale_policy="dc:1", global_accum=4)  # G = N keeps one version
    assert Updater(c, p).history.keep == 2  # 2 x the expected staleness 0.75, rounded up
    up = Updater(c, p)
    drive(up, None, steps=[[0, 0, 0, 0], [1, 1, 0, 0], [0, 3, 1, 1]])
    assert up.uncorrected == 1
    # the uncorrected gradient is the one of staleness 3: as the reference with it left alone
    ref = Reference(p, dc=1.0)
    for t, stale in enumerate([[0, 0, 0, 0], [1, 1, 0, 0], [0, 3, 1, 1]]):
        ref.update(grads(4, t), stale, uncorrected={1} if t == 2 else ())
    close(up.master, ref.w.detach())


def test_weight_prediction_publishes_an_extrapolation_and_keeps_the_master_exact():
    p = torch.randn(N)
    up, ref = Updater(config(predict="0.75"), p), Reference(p, predict=0.75)
    pub = drive(up, ref)
    close(up.master, ref.w.detach())       # the master is plain Adam
    close(pub, ref.published[-1])          # what workers pull is extrapolated
    assert (pub - up.master).abs().max() > 1e-4
    assert up.eval_params() is up.master   # validation and checkpoints use the master
    close(up.state_dict()["params"], ref.w.detach())


def test_predict_auto_is_the_expected_staleness():
    assert Updater(config(predict="auto", global_accum=4), torch.zeros(3)).comp.predict == 0.75
    assert Updater(config(predict="auto", global_accum=1), torch.zeros(3)).comp.predict == 3.0
    assert config(mode="sync", global_accum=None, pull_every=3, predict="auto").predict_s() == 1.0
    # sync with one pull per update has no staleness: auto would silently be off, so it is refused
    with pytest.raises(ConfigError, match="--predict: sync mode has no staleness"):
        config(predict="auto", mode="sync", global_accum=None)
    with pytest.raises(ConfigError, match="--stale-policy: momentum compensates stale gradients"):
        config(stale_policy="momentum", mode="sync", global_accum=None)


def test_dc_with_prediction_corrects_from_the_published_vector():
    p = torch.randn(N)
    up = Updater(config(stale_policy="dc:1", predict="1"), p)
    ref = Reference(p, dc=1.0, predict=1.0)
    drive(up, ref)
    close(up.master, ref.w.detach())


def test_momentum_sets_beta1_from_the_running_mean_staleness():
    p = torch.randn(N)
    up, ref = Updater(config(stale_policy="momentum"), p), Reference(p, momentum=True)
    drive(up, ref)
    close(up.master, ref.w.detach())
    mean = sum(s[0] for s in STALENESS) / len(STALENESS)
    assert math.isclose(up.beta1, momentum_beta1(B1, mean), rel_tol=1e-12)
    assert up.beta1 < B1
    plain = Updater(config(), p)
    drive(plain, None)
    assert (plain.master - up.master).abs().max() > 1e-5


def test_momentum_rule_keeps_the_mean_age_of_the_update():
    for b1, s in ((0.9, 0.0), (0.9, 0.75), (0.9, 3.0), (0.95, 7.0)):
        b = momentum_beta1(b1, s)
        assert math.isclose(b / (1 - b) + s, b1 / (1 - b1))
    assert momentum_beta1(0.9, 12.0) == 0.0  # older than the whole average: no explicit momentum


def test_ema_averages_the_master_and_is_what_is_evaluated():
    p = torch.randn(N)
    up, ref = Updater(config(ema=0.9), p), Reference(p, ema=0.9)
    drive(up, ref)
    close(up.ema, ref.avg)
    assert up.eval_params() is up.ema
    assert (up.ema - up.master).abs().max() > 1e-4
    close(up.state_dict()["ema"], ref.avg)


@pytest.mark.parametrize("kw", [dict(stale_policy="dc:1"), dict(stale_policy="dc-adaptive:1"), dict(ema=0.9),
                                dict(stale_policy="momentum")])
def test_the_cpu_server_without_a_master_gives_the_same_parameters(kw):
    """The CPU server reads the published buffer and writes the back one: the same results."""
    p = torch.randn(N)
    master = Updater(config(**kw), p)
    bufs = [p.clone(), torch.empty(N)]
    inplace = Updater(config(**kw), bufs[0], keep_master=False)
    for t, stale in enumerate(STALENESS):
        gs = grads(1, t)
        master.apply([gs[0].clone()], stale)
        res = inplace.apply([gs[0].clone()], stale, out=bufs[1], current=bufs[0])
        if res.publish:
            bufs.reverse()
    close(bufs[0], master.master)
    if master.ema is not None:
        close(inplace.eval_params(bufs[0]), master.ema)


def test_prediction_needs_a_master_copy():
    with pytest.raises(ValueError, match="keep_master"):
        Updater(config(predict="auto"), torch.zeros(3), keep_master=False)


@pytest.mark.parametrize("kw", [dict(stale_policy="dc-adaptive:1", predict="auto", ema=0.9),
                                dict(stale_policy="momentum")])
def test_a_checkpoint_carries_the_compensation_state(kw):
    p = torch.randn(N)
    whole, first = Updater(config(**kw), p), Updater(config(**kw), p)
    pub_whole = drive(whole, None)
    drive(first, None, steps=STALENESS[:6])
    second = Updater(config(**kw), torch.zeros(N))
    second.load_state_dict(first.state_dict())
    pub = torch.empty(N)
    for t, stale in enumerate(STALENESS[6:], start=6):
        second.apply([grads(1, t)[0]], stale, out=pub)
    assert torch.equal(second.master, whole.master) and torch.equal(pub, pub_whole)
    if whole.ema is not None:
        assert torch.equal(second.ema, whole.ema)


def test_history_forgets_an_update_that_was_not_published():
    h = History(2, 3, "cpu", with_current=False)
    for i in range(3):
        h.push(torch.full((3,), float(i)))
    assert [h.at(s)[0].item() for s in (1, 2)] == [2.0, 1.0] and h.at(3) is None
    mark = h.mark()
    h.push(torch.full((3,), 9.0))
    h.undo(mark)
    assert h.at(1)[0].item() == 2.0 and h.at(2) is None  # the push into the full ring lost the oldest


def test_a_sync_round_skipped_for_a_non_finite_gradient_publishes_unchanged_parameters_with_prediction():
    p = torch.randn(N)
    up = Updater(config(mode="sync", global_accum=None, predict="0.5"), p)
    pub = torch.empty(N)
    up.apply([torch.full((N,), float("nan"))] * 4, [0] * 4, out=pub)
    assert torch.equal(pub, p)


@pytest.mark.parametrize("settings,needle", [
    (dict(stale_policy="dc:0"), "--stale-policy"), (dict(stale_policy="dc-adaptive:x"), "--stale-policy"),
    (dict(predict="soon"), "--predict"), (dict(predict="-0.5"), "--predict"), (dict(ema=1.0), "--ema"),
    (dict(ema=-0.1), "--ema")])
def test_bad_compensation_settings_are_one_line_errors(settings, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        TrainConfig(**settings)
    assert "\n" not in str(e.value)


def test_predict_may_be_a_number_in_a_toml_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("mode = \"async\"\npredict = 0.75\nstale_policy = \"dc:2\"\nema = 0.99\n")
    c = TrainConfig.from_toml(str(f))
    assert (c.predict, c.stale_policy, c.ema) == ("0.75", "dc:2", 0.99)


# --- in runs: the simulator, real processes, two nodes -------------------------------------------

from pyasgd.core import checkpoint  # noqa: E402
from pyasgd.trainer.launch import train  # noqa: E402
from helpers import config_builder, records, segments_of  # noqa: E402

run_cfg = config_builder(task="synthetic", mode="async", workers=2, quiet=True, threads=1, lr=2e-3, warmup=10, max_updates=24,
                         valid_every=0, save_every=0)


@pytest.mark.parametrize("simulate", [True, False])
@pytest.mark.parametrize("kw,key", [(dict(predict="auto", stale_policy="dc-adaptive:1"), "params"),
                                    (dict(ema=0.9, stale_policy="momentum"), "ema")])
def test_a_run_evaluates_the_master_or_its_average_not_what_workers_pull(tmp_path, simulate, kw, key):
    """The only validation is the last one: best.pt holds what it evaluated, which must be the
    checkpoint's master (with --predict) or its average (with --ema), whatever the workers pulled."""
    summary = train(run_cfg(tmp_path, simulate=simulate, global_accum=1, **kw))
    assert summary["stopped_because"] == "max_updates" and summary["updates"] == 24
    server = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["server"]
    best = checkpoint.load(str(tmp_path / "run" / "best.pt"))["params"]
    assert torch.equal(best, server[key])
    if key == "ema":
        assert not torch.equal(best, server["params"])
    ups = records(str(tmp_path / "run"), "update")
    if "dc-adaptive:1" in kw.values():
        assert all("uncorrected" in r for r in ups) and summary["uncorrected_gradients"] == ups[-1]["uncorrected"]
    else:
        assert summary["final_beta1"] == ups[-1]["beta1"] < 0.9
    assert summary["predict"] == kw.get("predict", "0") and summary["ema"] == kw.get("ema", 0.0)
    assert not segments_of([os.getpid()])  # the eval region is gone with the run's


def test_a_simulated_run_with_compensation_resumes_bit_for_bit(tmp_path):
    kw = dict(simulate=True, global_accum=1, stale_policy="dc:1", predict="auto", ema=0.9, save_every=10)
    whole = train(run_cfg(tmp_path, name="whole", **kw))
    train(run_cfg(tmp_path, name="parts", **{**kw, "max_updates": 10}))
    parts = train(run_cfg(tmp_path, name="parts", **{**kw, "resume": str(tmp_path / "parts")}))
    a, b = (checkpoint.load(str(tmp_path / n / "checkpoint.pt"))["server"] for n in ("whole", "parts"))
    for k in ("params", "ema", "exp_avg"):
        assert torch.equal(a[k], b[k]), k
    assert whole["best_valid"] == parts["best_valid"]


# --- edges the review found ------------------------------------------------------------------------

def test_dc_with_bf16_gradients_of_mixed_staleness_sums_them_all_in_fp32():
    p = torch.randn(N)
    up, ref = Updater(config(stale_policy="dc:1", global_accum=2), p), Reference(p, dc=1.0)
    for t, stale in enumerate([[0, 0], [1, 0], [0, 1], [2, 0]]):
        gs = [g.to(torch.bfloat16) for g in grads(2, t)]
        assert up.apply([g.clone() for g in gs], stale).applied
        ref.update([g.float() for g in gs], stale)
    close(up.master, ref.w.detach())


def test_a_correction_that_overflows_skips_the_update_despite_the_pushers_bounds():
    p = torch.randn(N)
    up = Updater(config(stale_policy="dc:1", global_accum=2), p)
    up.apply(grads(2, 0), [0, 0])
    g = grads(2, 1)
    g[1][3] = 1e30  # finite, but g*g overflows
    res = up.apply(g, [0, 1], bounds=[x.abs().max().item() for x in g])
    assert not res.applied and up.skipped == 1 and torch.isfinite(up.master).all()


def test_history_of_one_version_undoes_a_push():
    h = History(1, 3, "cpu", with_current=False)
    h.push(torch.zeros(3))
    mark = h.mark()
    h.push(torch.ones(3))
    h.undo(mark)
    assert h.at(1) is None  # the one kept version was overwritten: none is better than a wrong one


def test_a_resume_that_republishes_the_master_is_what_dc_measures_from():
    p = torch.randn(N)
    kw = dict(stale_policy="dc:1", predict="0.5")
    first = Updater(config(**kw), p)
    pub = drive(first, None, steps=STALENESS[:4])
    second = Updater(config(**kw), torch.zeros(N))
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.history.at(0), pub)
    second.republished(second.master)  # what a real-process launcher publishes on resume
    assert torch.equal(second.history.at(0), second.master)
    third = Updater(config(stale_policy="dc:1"), torch.zeros(N))  # --predict dropped at the resume
    third.load_state_dict(first.state_dict())
    assert third.history.count == 0


def test_expected_staleness_counts_pull_every():
    assert config(global_accum=4).expected_staleness() == 0.75
    assert config(global_accum=4, pull_every=3).expected_staleness() == 1.75
    assert config(mode="sync", global_accum=None, pull_every=7).expected_staleness() == 3.0
    assert Updater(config(stale_policy="dc:1", global_accum=4, pull_every=3), torch.zeros(3)).history.keep == 4


def test_real_processes_resume_with_compensation(tmp_path):
    """The launcher republishes the checkpoint's master to the workers and its average to the eval
    region; the server measures dc's drift from what was republished."""
    kw = dict(global_accum=1, stale_policy="dc:1", predict="auto", ema=0.9, save_every=6)
    train(run_cfg(tmp_path, max_updates=12, **kw))
    summary = train(run_cfg(tmp_path, max_updates=24, resume=str(tmp_path / "run"), **kw))
    assert summary["updates"] == 24 and summary["stopped_because"] == "max_updates"
    server = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["server"]
    assert torch.equal(checkpoint.load(str(tmp_path / "run" / "best.pt"))["params"], server["ema"])
    assert not segments_of([os.getpid()])
