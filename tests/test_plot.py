"""pyasgd-plot draws any runs from their run directories; bad input and a missing matplotlib (the
`plots` extra) give one line and exit 2; pyasgd-study report without matplotlib writes its tables
and says in one line why there are no figures."""
import importlib.util
import sys

import pytest

from pyasgd.study import plots
from pyasgd.trainer.launch import train
from helpers import config_builder

cfg = config_builder(task="synthetic", mode="async", workers=2, quiet=True, simulate=True, threads=1, lr=2e-3,
                     warmup=5, max_updates=20, max_time=0, valid_every=5, batch_size=32, seq_len=16)
PNG = b"\x89PNG\r\n\x1a\n"
MISSING = "figures need matplotlib: pip install 'pyasgd[plots]'"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two plain simulated runs that differ in G and the learning rate."""
    d = tmp_path_factory.mktemp("plot")
    train(cfg(d, "a", global_accum=1))
    train(cfg(d, "b", global_accum=2, lr=1e-3))
    return d


@pytest.mark.parametrize("x", plots.X_AXES)
def test_two_runs_are_drawn_side_by_side(two_runs, tmp_path, run_main, x):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    r = run_main(plots.main, two_runs / "a", two_runs / "b", "--out", out, "--x", x)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"pyasgd-plot: wrote {out}\n"
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == PNG


def test_the_legend_names_each_run_and_what_differs(two_runs):
    assert plots.legend_labels([str(two_runs / "a"), str(two_runs / "b")]) == ["a (G=1, lr=0.002)", "b (G=2, lr=0.001)"]
    assert plots.legend_labels([str(two_runs / "a")]) == ["a (mode=async, G=1, lr=0.002)"]


def test_the_default_figure_is_plot_png_here(two_runs, tmp_path, monkeypatch, run_main):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    r = run_main(plots.main, two_runs / "a")
    assert r.returncode == 0 and r.stdout == "pyasgd-plot: wrote plot.png\n"
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG


def test_the_suffix_of_out_picks_the_format(two_runs, tmp_path, run_main):
    pytest.importorskip("matplotlib")
    out = tmp_path / "m.svg"
    r = run_main(plots.main, two_runs / "a", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_text().lstrip().startswith("<?xml")


def test_bad_input_is_one_line_naming_the_directory(two_runs, tmp_path, run_main):
    (tmp_path / "empty").mkdir()
    novalid = tmp_path / "novalid"
    novalid.mkdir()
    (novalid / "metrics.jsonl").write_text('{"kind":"update","update":1,"tokens":5,"loss":1.0,"time":0.1}\n')
    cases = {tmp_path / "nowhere": "no such directory", tmp_path / "empty": "not a run directory (no metrics.jsonl)",
             novalid: "no validation records in metrics.jsonl yet"}
    for d, what in cases.items():
        r = run_main(plots.main, two_runs / "a", d, "--out", tmp_path / "x.png")
        assert r.returncode == 2
        assert r.stderr == f"pyasgd-plot: error: {d}: {what}\n"
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_pyasgd_plot_says_which_extra(two_runs, tmp_path, monkeypatch, run_main):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the import fails, as without the extra
    r = run_main(plots.main, two_runs / "a", "--out", tmp_path / "x.png")
    assert r.returncode == 2
    assert r.stderr == f"pyasgd-plot: error: {MISSING}\n"


STUDY = """
[base]
task = "synthetic"
simulate = true
workers = 2
max_updates = 10
max_time = 0
valid_every = 5
[grid]
method = ["sync"]
"""


def test_a_report_without_matplotlib_has_the_tables_and_says_why_no_figures(tmp_path, monkeypatch, run_main):
    from pyasgd.study.cli import main

    study, out = tmp_path / "s.toml", tmp_path / "out"
    study.write_text(STUDY)
    r = run_main(main, "run", study, "--out", out, "--no-report")
    assert r.returncode == 0, r.stderr
    if importlib.util.find_spec("matplotlib") is not None:  # with it, the study has its figures
        r = run_main(main, "report", out)
        assert r.returncode == 0 and r.stderr == ""
        pngs = sorted(out.glob("*.png"))
        assert [p.name for p in pngs] == ["fig-curves-1.png", "fig-staleness-1.png"]
        for p in pngs:
            p.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_main(main, "report", out)
    assert r.returncode == 0
    assert r.stderr == f"pyasgd-study: report without figures: {MISSING}\n"
    report = (out / "report.md").read_text()
    assert "### Every cell" in report and f"No figures: {MISSING}." in report
    assert not list(out.glob("*.png"))
