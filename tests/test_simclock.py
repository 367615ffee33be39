"""The simulator's virtual clock and the fair measurement: validation by tokens, the fields of a
validation record, time to a target in virtual time, patience on dev loss."""
import math

import pytest

from pyasgd.config import ConfigError
from pyasgd.trainer.launch import train
from helpers import config_builder, records

BATCH, SEQ, WPS = 32, 16, 1000.0
D = BATCH * SEQ / WPS  # virtual seconds one synthetic batch takes a speed-1 worker


# cfg(tmp_path, name="run", **kw): unlike tests/test_trainer.py's, simulated by default, 40 updates,
# no time limit, and the batch, sequence length and virtual speed that D is computed from
cfg = config_builder(task="synthetic", workers=4, quiet=True, simulate=True, threads=1, lr=2e-3, warmup=20,
                     max_updates=40, max_time=0, valid_every_tokens=0, batch_size=BATCH, seq_len=SEQ, sim_wps=WPS)


def test_round_robin_equal_speeds_async_has_staleness_n_minus_1_and_n_updates_per_batch_time(tmp_path):
    s = train(cfg(tmp_path, mode="async", global_accum=1, max_updates=40))
    ups = records(str(tmp_path / "run"), "update")
    # Every worker finishes a batch every D: the four arrivals of a round share its time.
    assert [r["vtime"] for r in ups] == [pytest.approx(math.ceil(u / 4) * D, abs=1e-4) for u in range(1, 41)]
    assert all(r["staleness"] == [3] for r in ups[4:])
    assert s["virtual_time_s"] == pytest.approx(10 * D, abs=1e-3)
    assert s["virtual_wps"] == pytest.approx(4 * WPS, rel=1e-3)  # four workers at WPS each
    assert s["time_kind"] == "virtual"


def test_global_accumulation_updates_once_per_round(tmp_path):
    train(cfg(tmp_path, mode="async", global_accum=4, max_updates=20))
    ups = records(str(tmp_path / "run"), "update")
    assert [r["vtime"] for r in ups] == [pytest.approx(u * D, abs=1e-4) for u in range(1, 21)]


def test_sync_virtual_time_is_the_sum_of_each_rounds_slowest_worker(tmp_path):
    speeds = [1.0, 1.5, 1.0, 3.0]
    s = train(cfg(tmp_path, mode="sync", max_updates=12, sim_speeds=",".join(map(str, speeds))))
    ups = records(str(tmp_path / "run"), "update")
    assert [r["vtime"] for r in ups] == [pytest.approx(u * max(speeds) * D, abs=1e-4) for u in range(1, 13)]
    # With jitter, each round still waits for its slowest: the rounds add up to the end time.
    s = train(cfg(tmp_path, "jitter", mode="sync", max_updates=12, sim_order="normal", sim_time_std=0.3))
    ups = records(str(tmp_path / "jitter"), "update")
    rounds = [b["vtime"] - a["vtime"] for a, b in zip([{"vtime": 0.0}] + ups, ups)]
    assert all(r >= 0.05 * D - 1e-4 for r in rounds) and len(set(round(r, 3) for r in rounds)) > 3
    assert sum(rounds) == pytest.approx(s["virtual_time_s"], abs=1e-3)


@pytest.mark.slow
def test_a_slow_worker_costs_sync_more_than_async(tmp_path):
    """One worker 2x slower: sync waits for it every round (about half the speed), async with
    G = N only loses that worker's share (about 7/8)."""
    wps = {}
    for mode, g in (("sync", None), ("async", 4)):
        for speeds in ("", "1,1,1,2"):
            name = f"{mode}-{speeds or 'equal'}"
            s = train(cfg(tmp_path, name, mode=mode, global_accum=g, max_updates=60, sim_order="normal",
                          sim_time_std=0.1, sim_speeds=speeds))
            wps[name] = s["virtual_wps"]
    sync_ratio = wps["sync-1,1,1,2"] / wps["sync-equal"]
    async_ratio = wps["async-1,1,1,2"] / wps["async-equal"]
    assert sync_ratio == pytest.approx(0.5, abs=0.08)
    assert async_ratio == pytest.approx(7 / 8, abs=0.08)
    assert sync_ratio < async_ratio - 0.2


def test_validation_by_tokens_is_at_the_same_progress_whatever_g(tmp_path):
    every = 4 * BATCH * SEQ * 5  # five rounds of four batches; each run trains 160 batches
    for name, g in (("g1", 1), ("g4", 4)):
        train(cfg(tmp_path, name, mode="async", global_accum=g, max_updates=160 // g, valid_every_tokens=every))
    v1, v4 = (records(str(tmp_path / n), "valid") for n in ("g1", "g4"))
    assert [v["tokens"] for v in v1] == [v["tokens"] for v in v4] == [every * i for i in range(1, 9)]
    for v in v1 + v4:
        for key in ("update", "gradients", "tokens", "epoch", "time", "train_time", "vtime", "accuracy", "loss"):
            assert key in v, key
        assert v["train_time"] <= v["time"]
        assert v["epoch"] == pytest.approx(v["tokens"] / (4096 * SEQ), abs=1e-4)
    assert [v["update"] for v in v1] == [4 * v["update"] for v in v4]  # G = 1 takes 4x the updates
    assert [v["gradients"] for v in v1] == [v["gradients"] for v in v4]


def test_time_to_target_is_virtual_in_the_simulator(tmp_path):
    s = train(cfg(tmp_path, mode="async", global_accum=4, max_updates=40, valid_every=10, bleu_targets="0.0"))
    hit = s["time_to_target"]["0"]
    first = records(str(tmp_path / "run"), "valid")[0]
    assert hit["update"] == 10 and hit["time"] == first["vtime"] == pytest.approx(10 * D, abs=1e-3)
    assert hit["wall_s"] == first["time"]


def test_resumed_simulation_continues_the_clock_and_counters_bit_for_bit(tmp_path):
    kw = dict(mode="async", global_accum=2, local_accum=2, sim_order="normal", sim_speeds="1,1,2,1",
              valid_every_tokens=BATCH * SEQ * 24)
    train(cfg(tmp_path, "a", max_updates=60, **kw))
    train(cfg(tmp_path, "c", max_updates=30, **kw))
    train(cfg(tmp_path, "c", max_updates=60, resume=str(tmp_path / "c"), **kw))
    a, c = (records(str(tmp_path / d), "update") for d in "ac")
    assert [(r["vtime"], r["staleness"], r["tokens"]) for r in a] == [(r["vtime"], r["staleness"], r["tokens"]) for r in c]
    va, vc = (records(str(tmp_path / d), "valid") for d in "ac")
    pick = ("update", "tokens", "gradients", "vtime", "loss")
    assert [[v[k] for k in pick] for v in va] == [[v[k] for k in pick] for v in vc]


def test_patience_on_dev_loss_stops_the_run(tmp_path):
    # A learning rate so small nothing improves at the 3rd significant digit... is not guaranteed;
    # a huge one makes the loss rise: patience on loss stops it.
    s = train(cfg(tmp_path, mode="async", global_accum=1, lr=5.0, warmup=0, max_updates=400, valid_every=10,
                  patience=2, patience_metric="loss"))
    assert s["stopped_because"] == "patience"
    assert s["updates"] < 400


@pytest.mark.parametrize("kw, option", [
    (dict(sim_speeds="1,2"), "--sim-speeds"),           # not one per worker
    (dict(sim_speeds="1,1,0,1"), "--sim-speeds"),       # not positive
    (dict(sim_speeds="1,x,1,1"), "--sim-speeds"),
    (dict(sim_wps=0), "--sim-wps"),
    (dict(patience_metric="bleu"), "--patience-metric"),  # the synthetic task has no BLEU
    (dict(patience_metric="ppl"), "--patience-metric"),
    (dict(valid_every_tokens=-1), "--valid-every-tokens"),
])
def test_bad_clock_and_validation_settings_name_the_option(tmp_path, kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg(tmp_path, **kw)


@pytest.mark.parametrize("max_epochs, updates", [(1, 4), (1.5, 6), pytest.param(2.25, 9, marks=pytest.mark.slow)])
def test_max_epochs_counts_fractions_of_a_pass(tmp_path, max_epochs, updates):
    # 512 sequences over 4 workers in batches of 32: 4 batches per worker and pass, and sync
    # takes one from each worker per update, so a pass is 4 updates.
    s = train(cfg(tmp_path, mode="sync", train_size=512, max_updates=0, max_epochs=max_epochs))
    assert s["stopped_because"] == "max_epochs"
    assert s["updates"] == updates
    assert s["epochs"] == pytest.approx(max_epochs)


def test_a_resume_from_an_older_checkpoint_drops_the_lost_records_and_keeps_the_summary(tmp_path):
    """A run killed after its last checkpoint logged updates (and validations) that the resume
    computes again: metrics.jsonl must hold each once, and the summary (staleness histogram, best
    validation, updates) must be the uninterrupted run's, pre-checkpoint records included."""
    import shutil

    kw = dict(mode="async", global_accum=2, sim_order="normal", valid_every=10, save_every=10)
    a = train(cfg(tmp_path, "a", max_updates=60, **kw))
    train(cfg(tmp_path, "c", max_updates=30, **kw))
    shutil.copy(tmp_path / "c" / "checkpoint.pt", tmp_path / "at30.pt")
    train(cfg(tmp_path, "c", max_updates=45, resume=str(tmp_path / "c"), **kw))  # logs 31..45, then is "lost"
    shutil.copy(tmp_path / "at30.pt", tmp_path / "c" / "checkpoint.pt")
    c = train(cfg(tmp_path, "c", max_updates=60, resume=str(tmp_path / "c"), **kw))
    ua, uc = (records(str(tmp_path / d), "update") for d in "ac")
    assert [r["update"] for r in uc] == list(range(1, 61))
    assert [(r["vtime"], r["staleness"], r["loss"]) for r in ua] == [(r["vtime"], r["staleness"], r["loss"]) for r in uc]
    va, vc = (records(str(tmp_path / d), "valid") for d in "ac")
    assert [(v["update"], v["loss"]) for v in va] == [(v["update"], v["loss"]) for v in vc]
    for key in ("updates", "staleness_hist", "avg_staleness", "best_valid", "best_valid_update", "tokens"):
        assert c[key] == a[key], key
