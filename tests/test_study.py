"""pyasgd-study as a user runs it: the bundled smoke study end to end, resuming, a failing
cell, and study files that must fail before any cell runs."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pyasgd.study.grid import load_study
from pyasgd.study.cli import main
from helpers import read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "studies", "smoke.toml")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study, run once by the console script as a user would."""
    out = tmp_path_factory.mktemp("smoke") / "study"
    r = subprocess.run([sys.executable, "-m", "pyasgd.study.cli", "run", SMOKE, "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    return out, r


@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first runs the whole smoke study (module fixture): 3-6 min on 2 cores
def test_the_smoke_study_runs_every_cell_and_reports_the_cells_own_numbers(smoke):
    out, r = smoke
    _, cells = load_study(SMOKE)
    assert len(cells) == 4
    for i, cell in enumerate(cells, 1):
        assert f"[{i}/4] {cell.name}: finished" in r.stdout
    rows = read_json(out / "report.json")
    assert sorted(row["cell"] for row in rows) == sorted(c.name for c in cells)
    for row in rows:
        s = read_json(os.path.join(row["run_dir"], "summary.json"))
        assert row["status"] == "done"
        for key in ("best_valid_bleu", "test_bleu", "best_valid_loss", "avg_staleness", "updates", "epochs",
                    "time_kind"):
            assert row[key] == s[key], key
        assert row["wps"] == s["virtual_wps"] and row["time_kind"] == "virtual"
        assert row["time_to_bleu"] == s["time_to_bleu"]
        assert row["best_valid_loss"] is not None and row["epochs"] > 0
        cfg = read_json(os.path.join(row["run_dir"], "config.json"))
        assert cfg["lr"] == row["lr"] and cfg["seed"] == row["seed"] and cfg["simulate"] is True
        assert cfg["mode"] == ("sync" if row["method"] == "sync" else "async")
    report = (out / "report.md").read_text()
    for heading in ("Best dev BLEU by learning rate", "Quality and convergence", "Every cell"):
        assert heading in report
    for row in rows:  # the table of every cell shows the summary's numbers
        assert f"| {row['cell']} | done" in report and f"{row['best_valid_loss']:.3f}" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fig-curves-1.png", "fig-staleness-1.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first runs the whole smoke study (module fixture): 3-6 min on 2 cores
def test_a_second_run_skips_finished_cells(smoke, run_main):
    out, _ = smoke
    before = {p: os.path.getmtime(p) for p in out.glob("*/summary.json")}
    r = run_main(main, "run", SMOKE, "--out", out, "--no-report")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished earlier, skipped") == 4
    assert {p: os.path.getmtime(p) for p in out.glob("*/summary.json")} == before


@pytest.mark.slow
@pytest.mark.timeout(900)  # whichever runs first runs the whole smoke study (module fixture): 3-6 min on 2 cores
def test_report_works_from_a_copied_study_directory(smoke, tmp_path, run_main):
    out, _ = smoke
    copy = tmp_path / "copied"
    shutil.copytree(out, copy)
    for p in list(copy.glob("*.png")) + [copy / "report.json", copy / "report.md", copy / "study.json"]:
        p.unlink()
    r = run_main(main, "report", copy)
    assert r.returncode == 0, r.stderr
    a, b = read_json(out / "report.json"), read_json(copy / "report.json")
    strip = lambda rows: [{k: v for k, v in row.items() if k != "run_dir"} for row in rows]  # noqa: E731
    assert strip(a) == strip(b)


SYNTH = """
[base]
task = "synthetic"
simulate = true
workers = 2
max_updates = 20
max_time = 0
valid_every_tokens = 0
save_every = 10
[grid]
method = {methods}
seed = [1, 2]
"""


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_an_interrupted_study_stops_its_cells_and_resumes_them(tmp_path, jobs):
    """SIGTERM (as Ctrl-C) to `pyasgd-study run`: every running cell saves its checkpoint and
    stops, no cell process outlives the study, none is marked failed, and the same command
    resumes them to the end."""
    study, out = tmp_path / "s.toml", tmp_path / "out"
    slow = "max_updates = 150\ncompute_delay = 0.04"  # about 12 s a cell: long enough to interrupt
    study.write_text(SYNTH.format(methods='["sync"]').replace("max_updates = 20", slow)
                     .replace("save_every = 10", "save_every = 5"))
    cmd = [sys.executable, "-m", "pyasgd.study.cli", "run", str(study), "--out", str(out), "--jobs", str(jobs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = 2 if jobs == 2 else 1
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/checkpoint.pt"))) < running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(out.glob("*/checkpoint.pt"))) >= running, "the cells never saved a checkpoint"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "saved their checkpoints" in stderr and "FAILED" not in stdout
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], f"cell processes left behind: {left}"
    assert not list(out.glob("*/cell-error.txt"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("resumed and finished") == running
    for d in out.glob("*/"):
        assert read_json(d / "summary.json")["updates"] == 150


@pytest.mark.slow
def test_two_study_files_run_into_one_directory_are_both_recorded(tmp_path, run_main):
    """As paper-cpu.toml then beyond-cpu.toml into one directory: study.json keeps both files'
    cells and the report's title names both (a rerun of the first refreshes its own entry)."""
    a, b, out = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "out"
    a.write_text(SYNTH.format(methods='["sync"]'))
    b.write_text(SYNTH.format(methods='["async"]').replace("max_updates = 20", "max_updates = 8"))
    for study in (a, b, a):
        r = run_main(main, "run", study, "--out", out)
        assert r.returncode == 0, r.stderr
    studies = read_json(out / "study.json")["studies"]
    assert [os.path.basename(s["study_file"]) for s in studies] == ["b.toml", "a.toml"]
    assert [len(s["cells"]) for s in studies] == [2, 2]
    assert (out / "report.md").read_text().startswith("# Study report: b.toml + a.toml")
    assert len(read_json(out / "report.json")) == 4


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_complete(tmp_path, run_main):
    study = tmp_path / "s.toml"
    # "crash" passes the study's checks (its settings are well-formed) but fails when it runs:
    # the run directory it asks to resume does not exist.
    study.write_text(SYNTH.format(methods='["sync", "crash"]')
                     + '[methods.crash]\nmode = "async"\nresume = "/nonexistent"\n')
    out = tmp_path / "out"
    r = run_main(main, "run", study, "--out", out)
    assert r.returncode == 1
    assert r.stdout.count(": FAILED after") == 2 and r.stdout.count(": finished (") == 0
    assert re.search(r"2 of 4 cells finished, 2 failed, in \d+\.\d min with --jobs \d", r.stdout), r.stdout
    rows = {row["cell"]: row for row in read_json(out / "report.json")}
    failed = [row for row in rows.values() if row["status"] == "failed"]
    assert len(failed) == 2 and all("not a run directory" in row["error"] for row in failed)
    assert all(row["status"] == "done" for row in rows.values() if row["method"] == "sync")
    assert (out / failed[0]["cell"] / "cell-error.txt").is_file()


@pytest.mark.parametrize("text, key", [
    ('[grid]\nmethod = ["sync", "asynch"]\n', "method: unknown method 'asynch'"),
    ('[grid]\nlr = [0.001, -1.0]\n', "--lr"),
    ('[grid]\nlearning_rate = [0.1]\n', "learning_rate: not a setting"),
    ('[base]\nworkers = 0\n[grid]\nmethod = ["sync"]\n', "--workers"),
    ('[grid]\npair = ["en-xx"]\n', "pair: unknown pair 'en-xx'"),
    ('[grid]\npair = ["p"]\n[pairs.p]\ntrain_src = "a"\ntrain_tgt = "b"\ndev_src = "c"\ndev_tgt = "d"\n',
     "[pairs.p] train_src: no such file"),
    ('[grid]\npair = ["p"]\n[pairs.p]\ntrain_src = "a"\n', "[pairs.p] train_tgt: missing"),
    ('[gird]\nmethod = ["sync"]\n', "unknown table [gird]"),
    ('[grid\n', "not valid TOML"),
])
def test_a_bad_study_file_fails_before_any_cell_naming_the_key(tmp_path, run_main, text, key):
    study = tmp_path / "bad.toml"
    study.write_text('[base]\ntask = "synthetic"\nsimulate = true\nmax_updates = 5\n' + text
                     if not text.startswith("[base]") else text)
    out = tmp_path / "out"
    r = run_main(main, "run", study, "--out", out)
    assert r.returncode == 2
    assert key in r.stderr, r.stderr
    assert not out.exists()  # nothing ran, nothing was written


def test_report_of_a_missing_directory_is_a_clear_error(tmp_path, run_main):
    r = run_main(main, "report", tmp_path / "nowhere")
    assert r.returncode == 2 and "no such study directory" in r.stderr


@pytest.mark.parametrize("name", ["smoke", "paper-cpu", "beyond-cpu", "paper-gpu"])
def test_the_shipped_study_files_expand_or_say_what_they_need(name):
    """Every shipped study file is valid: it expands to its cells, or (here) stops only on what
    this machine lacks: the English-Russian pair not built yet, or no GPU for paper-gpu."""
    from pyasgd.study.grid import StudyError

    try:
        _, cells = load_study(os.path.join(ROOT, "studies", f"{name}.toml"))
    except StudyError as e:
        assert ("pyasgd-data bible" in str(e) and "en-ru" in str(e)) or "CUDA is not available" in str(e), str(e)
        return
    assert len(cells) >= 4 and len({c.name for c in cells}) == len(cells)


def test_table3_without_a_sync_cell_has_as_many_columns_in_every_row():
    """A block with no sync cell has no BLEU targets: its table has no time columns, and every
    row (header, separator, cells) has as many columns as the header names."""
    from pyasgd.study.report import methods_table

    def row(method, G, bleu):
        return {"cell": f"{method}-lr0.002-s1", "method": method, "lr": 0.002, "seed": 1, "pair": "bundled",
                "variant": {"workers": 8}, "status": "done", "time_kind": "virtual", "bleu_targets": "",
                "local_accum": 1, "global_accum": G, "tokens_per_update": 500 * G, "avg_staleness": 0.9,
                "wps": 40000.0, "best_valid_bleu": bleu, "test_bleu": bleu, "_valid": [
                    {"update": 10, "vtime": 1.0, "bleu": bleu}]}

    lines = methods_table([row("async", 1, 0.01), row("async-globalN", 8, 0.11)])
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == ("| method | k | G | tokens/update | avg staleness | wps | best dev BLEU | test BLEU | "
                        "speed-up over sync |")
    assert len(table) == 4 and {line.count("|") for line in table} == {10}
    with_sync = methods_table([row("sync", 8, 2.0), row("async-globalN", 8, 0.11)])
    table = [line for line in with_sync if line.startswith("|")]
    assert "virtual s to 1.6" in table[0] and len({line.count("|") for line in table}) == 1
