"""Which method should the default job use? (issue 23, part 4)

Runs `pyasgd-train` (the default job: 8 minutes, 2 worker processes, the bundled corpus) R times
for each method, alternating (round 1: A, B, C; round 2: A, B, C; ...), so a drift in the
machine's speed falls on every method alike. Run it on a quiet machine: words per second and so
BLEU within 8 minutes depend on it. Resumable: a run with a summary.json is not run again.

    python benchmarks/default_choice.py --out benchmarks/default-choice --rounds 3
    python benchmarks/default_choice.py --out benchmarks/default-choice --report   # the table only

Each run directory keeps config.json, summary.json and metrics.jsonl; the checkpoints are
deleted after the run (they are not committed). The table goes to OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = {
    "sync": ["--mode", "sync"],
    "async-GN": ["--mode", "async"],
    "async-GN-predict": ["--mode", "async", "--predict", "auto"],
}


def run(out: str, method: str, i: int, extra: list[str]) -> dict:
    run_dir = os.path.join(out, f"{method}-{i}")
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        print(f"{method} #{i}: done earlier", flush=True)
        with open(summary) as f:
            return json.load(f)
    if os.path.isdir(run_dir):  # an interrupted run: start it again (a resume would change its 8 minutes)
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "pyasgd.trainer.cli", "--out", run_dir, "--quiet", *METHODS[method], *extra]
    t = time.monotonic()
    with open(os.path.join(out, f"{method}-{i}.log"), "w") as log:
        subprocess.run(cmd, check=True, stderr=log)
    for name in ("checkpoint.pt", "best.pt"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)
    with open(summary) as f:
        s = json.load(f)
    print(f"{method} #{i}: dev BLEU {s['best_valid']}, test BLEU {s.get('test_bleu')}, {s['wps']} words/s, "
          f"{time.monotonic() - t:.0f} s", flush=True)
    return s


def table(out: str) -> str:
    rows = ["| method | runs | dev BLEU (mean ± sd) | each | test BLEU (mean) | words/s (mean) | staleness |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        ss = []
        for name in sorted(os.listdir(out)):
            path = os.path.join(out, name, "summary.json")
            if name.rsplit("-", 1)[0] == method and os.path.exists(path):
                with open(path) as f:
                    ss.append(json.load(f))
        if not ss:
            continue
        dev = [s["best_valid"] for s in ss]
        test = [s.get("test_bleu") for s in ss if s.get("test_bleu") is not None]
        sd = statistics.stdev(dev) if len(dev) > 1 else 0.0
        rows.append(f"| {method} | {len(ss)} | {statistics.mean(dev):.2f} ± {sd:.2f} | "
                    f"{', '.join(f'{d:.2f}' for d in dev)} | "
                    f"{statistics.mean(test):.2f} | {statistics.mean(s['wps'] for s in ss):,.0f} | "
                    f"{statistics.mean(s['avg_staleness'] for s in ss):.2f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--report", action="store_true", help="only write the table of the runs so far")
    ap.add_argument("extra", nargs="*", help="more pyasgd-train options for every run (after --)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not a.report:
        for i in range(1, a.rounds + 1):
            for method in METHODS:
                run(a.out, method, i, a.extra)
    text = table(a.out)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
