"""Every committed study cell can be rerun as it ran: its config.json, loaded as a user would
(`pyasgd-train --config`), reproduces the first updates recorded in its metrics.jsonl. (Before
2026-12-07 the paper-cpu cells said max_epochs = 2.5 although they ran 3 whole passes.)"""
import glob
import json
import os

import pytest

from pyasgd.config import TrainConfig
from helpers import read_json as _json

ROOT = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
CELLS = sorted(glob.glob(os.path.join(ROOT, "*", "*", "config.json")))


def _updates(path, n):
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "update":
                out.append(r)
                if len(out) == n:
                    break
    return out


def test_committed_cells_stop_where_they_ran():
    """A cell's recorded max_epochs is the number of passes it ran (whole passes: the fraction in
    summary.json is the mean over workers, the stop is when the first worker ends its pass)."""
    assert CELLS, "no committed cells found under benchmarks/"
    for path in CELLS:
        summary = os.path.join(os.path.dirname(path), "summary.json")
        if not os.path.exists(summary):
            continue  # a cell still running
        config = _json(path)
        s = _json(summary)
        if s.get("stopped_because") == "max_epochs":
            assert config["max_epochs"] >= s["epochs"] - 1e-9, path
            assert config["max_epochs"] - s["epochs"] < 1.0, (path, config["max_epochs"], s["epochs"])


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["paper-cpu/sync-lr0.002-s1", "paper-cpu/async-global4-lr0.002-s1"])
def test_a_committed_cell_reproduces_its_first_updates(tmp_path, monkeypatch, cell):
    from pyasgd.trainer import simulate as sim
    from pyasgd.trainer.launch import train

    d = os.path.join(ROOT, cell)
    settings = _json(os.path.join(d, "config.json"))
    settings.update(out=str(tmp_path / "rerun"), max_updates=3, valid_every_tokens=0, quiet=True)
    # the first updates are the point: skip the final dev and test decoding
    monkeypatch.setattr(sim, "validate_last", lambda *a, **k: None)
    monkeypatch.setattr(sim, "final_test", lambda *a, **k: {})
    train(TrainConfig.from_dict(settings))
    got = _updates(tmp_path / "rerun" / "metrics.jsonl", 3)
    want = _updates(os.path.join(d, "metrics.jsonl"), 3)
    assert [(r["update"], r["staleness"], r["workers"], r["tokens"]) for r in got] == \
           [(r["update"], r["staleness"], r["workers"], r["tokens"]) for r in want]
    for g, w in zip(got, want):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)  # the same arithmetic, maybe another SIMD width
