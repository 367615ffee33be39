"""The smoke run a new user tries first: `pyasgd-train --max-updates 20` on the bundled corpus, end
to end as a program (interpreter and torch start, corpus and subword model, spawning, 20 updates,
the final validation of 433 dev sentences and the test of 1,007), against issue 24's target of 90 s
on 2 cores. The baseline, measured in the same session, is the same run with --no-test (what the
test's decoding adds).

Run: python -m pytest benchmarks/test_bench_smoke.py --benchmark-only -s
"""
import json
import subprocess
import sys
import time

import pytest

TARGET_S = 90.0
WALL: dict[str, float] = {}


def smoke(out: str, *extra: str) -> tuple[float, dict]:
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pyasgd.trainer.cli", "--max-updates", "20", "--out", out, *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    wall = time.monotonic() - t
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr  # piped: lines, not a redrawn bar
    return wall, json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", ["no-test", "whole"])
def test_smoke_run_end_to_end(benchmark, report, tmp_path, case):
    extra = ("--no-test",) if case == "no-test" else ()
    wall, summary = benchmark.pedantic(smoke, args=(str(tmp_path / "run"), *extra), rounds=1, iterations=1)
    # validate first: 20 updates, a validation, and the test where it was asked for
    assert summary["updates"] == 20 and summary["stopped_because"] == "max_updates"
    assert summary["best_valid"] is not None
    assert (summary["test_bleu"] is None) == (case == "no-test")
    WALL[case] = wall
    note = (f"{wall / WALL['no-test']:.2f}x the run without the test; " if case == "whole" and "no-test" in WALL
            else "baseline; ")
    report(f"smoke run (20 updates) {case}", f"{wall:.1f} s", note + f"{wall / TARGET_S:.2f}x the 90 s target")
