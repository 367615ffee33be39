"""Words per second of the paper's methods with real worker processes on the synthetic task
(CPU-bound compute, no emulated delay), as ratios to synchronous SGD measured in the same run.
Run: python -m pytest benchmarks/test_bench_trainer.py --benchmark-only -s
"""
import pytest

from pyasgd.config import TrainConfig
from pyasgd.trainer.launch import train

SECONDS = 8.0
METHODS = {
    "sync": dict(mode="sync"),
    "async": dict(mode="async", global_accum=1),
    "async G=N": dict(mode="async", global_accum="N"),
    "combined k=2 G=2": dict(mode="async", local_accum=2, global_accum=2),
}
WPS: dict[tuple[int, str], float] = {}


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_words_per_second(benchmark, report, tmp_path, workers, method):
    kw = dict(METHODS[method])
    if kw.get("global_accum") == "N":
        kw["global_accum"] = workers
    config = TrainConfig(task="synthetic", lr=2e-3, warmup=50, workers=workers, batch_size=256, train_size=65536, max_updates=0,
                         max_time=SECONDS, valid_every=0, quiet=True, out=str(tmp_path / "run"), **kw)
    summary = benchmark.pedantic(train, args=(config,), rounds=1, iterations=1)
    # validate first: it trained, and for the time asked
    assert summary["updates"] > 10 and summary["stopped_because"] == "max_time"
    assert summary["final_valid"]["accuracy"] > 0.1
    WPS[(workers, method)] = summary["wps"]
    base = WPS.get((workers, "sync"))
    ratio = f"{summary['wps'] / base:.2f}x sync" if base else "baseline"
    report(f"trainer N={workers} {method}", f"{summary['wps']:,.0f} wps",
           f"{ratio}; staleness {summary['avg_staleness']:.2f}; {summary['updates']} updates in {summary['wall_s']:.1f} s")
