"""--tensorboard: the events a simulated run writes to RUN_DIR/tb say what its metrics.jsonl says
(same steps, same values), a resume drops the events of the updates it computes again, and
without the extra the run fails before it starts, in one line naming it."""
import os
import shutil
import sys

import pytest

from pyasgd.errors import ConfigError
from pyasgd.trainer.launch import train
from helpers import config_builder, records

cfg = config_builder(task="synthetic", mode="async", global_accum=2, workers=4, quiet=True, simulate=True, threads=1,
                     lr=2e-3, warmup=5, max_updates=20, max_time=0, valid_every=10, save_every=10, batch_size=32,
                     seq_len=16, sim_order="normal", tensorboard=True)
MISSING = "--tensorboard: needs the tensorboard package: pip install 'pyasgd[tensorboard]'"


def events(run_dir):
    """(scalars {tag: [(step, value)]}, histograms {tag: [(step, total count)]}) of RUN_DIR/tb."""
    ea_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_module.EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}
    hists = {t: [(e.step, e.histogram_value.num) for e in ea.Histograms(t)] for t in tags["histograms"]}
    return scalars, hists


def approx(pairs):
    return [(step, pytest.approx(v, rel=1e-6)) for step, v in pairs]  # the events hold float32


def test_the_events_hold_the_metrics_of_metrics_jsonl_by_update(tmp_path):
    pytest.importorskip("tensorboard")
    run = str(tmp_path / "run")
    train(cfg(tmp_path))
    scalars, hists = events(run)
    ups, valid = records(run, "update"), records(run, "valid")
    assert [u["update"] for u in ups] == list(range(1, 21))
    assert scalars["train/loss"] == approx([(u["update"], u["loss"]) for u in ups])
    assert scalars["train/lr"] == approx([(u["update"], u["lr"]) for u in ups])
    assert scalars["train/staleness"] == approx([(u["update"], sum(u["staleness"]) / len(u["staleness"]))
                                                 for u in ups])
    # words/s over the last updates (at most 50), in wall and in virtual time
    (_, t1, v1), (_, t20, v20) = [(u["update"], u["time"], u["vtime"]) for u in (ups[0], ups[-1])]
    tokens = sum(u["tokens"] for u in ups[1:])
    assert scalars["train/virtual_wps"][-1] == (20, pytest.approx(tokens / (v20 - v1), rel=1e-6))
    assert scalars["train/wps"][-1] == (20, pytest.approx(tokens / (t20 - t1), rel=1e-6))
    assert [v["update"] for v in valid] == [10, 20]
    for metric in ("accuracy", "loss"):  # the synthetic task's; translation has bleu, chrf and loss
        assert scalars[f"dev/{metric}"] == approx([(v["update"], v[metric]) for v in valid])
    # a histogram of the gradients since the previous one, at each validation
    per_window = [sum(len(u["staleness"]) for u in ups if lo < u["update"] <= hi) for lo, hi in ((0, 10), (10, 20))]
    assert hists["train/staleness_hist"] == [(10, per_window[0]), (20, per_window[1])]


def test_a_resume_drops_the_events_after_its_checkpoint(tmp_path):
    """Killed after its checkpoint at 10, the run had logged 11..20; the resume from 10 computes
    them again: each step's event is there once, with the resumed run's values."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(cfg(tmp_path, max_updates=10))
    shutil.copy(run / "checkpoint.pt", tmp_path / "at10.pt")
    train(cfg(tmp_path, max_updates=20, resume=str(run)))  # events 11..20, then "lost"
    shutil.copy(tmp_path / "at10.pt", run / "checkpoint.pt")
    train(cfg(tmp_path, max_updates=20, resume=str(run)))
    # one event file per launch; a resumed one starts by purging the steps after its checkpoint's
    # (what TensorBoard otherwise purges only for a tag that is written again)
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    purges = [[e.step for e in loader.EventFileLoader(str(run / "tb" / f)).Load()
               if e.HasField("session_log") and e.session_log.status == e.session_log.START]
              for f in sorted(os.listdir(run / "tb"))]
    assert purges == [[], [11], [11]]
    scalars, hists = events(str(run))
    ups, valid = records(str(run), "update"), records(str(run), "valid")
    assert scalars["train/loss"] == approx([(u["update"], u["loss"]) for u in ups])
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 21))
    assert scalars["dev/loss"] == approx([(v["update"], v["loss"]) for v in valid])
    assert [s for s, _ in hists["train/staleness_hist"]] == [10, 20]


def test_without_the_package_tensorboard_fails_before_the_run_in_one_line(tmp_path, monkeypatch, run_main):
    from pyasgd.trainer.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails, as without the extra
    with pytest.raises(ConfigError) as e:
        train(cfg(tmp_path))
    assert str(e.value) == MISSING
    assert not (tmp_path / "run").exists()
    r = run_main(main, "--task", "synthetic", "--simulate", "--max-updates", "2", "--tensorboard",
                 "--out", tmp_path / "cli")
    assert r.returncode == 2
    assert r.stderr == f"pyasgd-train: error: {MISSING}\n"
    assert not (tmp_path / "cli").exists()
