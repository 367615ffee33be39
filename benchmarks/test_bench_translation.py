"""Words per second of the default translation model (tiny Transformer, bundled corpus) with 2
real worker processes: synchronous SGD and asynchronous SGD with G = N, same run, as a ratio.
Run: python -m pytest benchmarks/test_bench_translation.py --benchmark-only
(The default job's BLEU is measured by running `pyasgd-train` itself: see RESULTS.md.)
"""
import pytest

from pyasgd.config import TrainConfig
from pyasgd.trainer.launch import train

SECONDS = 60.0
WPS: dict[str, float] = {}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_default_model_words_per_second(benchmark, report, tmp_path, mode):
    config = TrainConfig(mode=mode, workers=2, max_time=SECONDS, valid_every=0, quiet=True,
                         out=str(tmp_path / "run"))  # async: G = N by default
    summary = benchmark.pedantic(train, args=(config,), rounds=1, iterations=1)
    assert summary["updates"] > 20 and summary["stopped_because"] == "max_time"  # it trained
    WPS[mode] = summary["wps"]
    note = f"{summary['wps'] / WPS['sync']:.2f}x sync" if mode != "sync" and "sync" in WPS else "baseline"
    report(f"translation N=2 {mode} (G={summary['global_accum']})", f"{summary['wps']:,.0f} wps",
           f"{note}; {summary['updates']} updates in {summary['wall_s']:.0f} s; staleness {summary['avg_staleness']:.2f}")
