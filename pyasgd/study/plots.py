"""Curves of runs: `pyasgd-plot RUN_DIR... [--out FILE.png] [--x update|tokens|time]` draws the dev
metric (BLEU for translation), the dev loss and the training loss of any runs side by side, from
their run directories alone (metrics.jsonl; config.json for the legend), finished or still
running. The study report's figures (pyasgd/study/report.py) draw with the same pieces.

Drawing needs matplotlib, an optional extra: pip install 'pyasgd[plots]'."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pyasgd.errors import ConfigError, MissingExtra
from pyasgd.trainer import rundir

PLOTS_EXTRA = "pip install 'pyasgd[plots]'"
X_AXES = ("update", "tokens", "time")
DEV_METRICS = ("bleu", "chrf", "accuracy")  # the first one a run has is drawn beside the dev loss
TRAIN_POINTS = 300  # the training loss is drawn as means over about this many windows of updates
# The settings a legend shows when they differ between the runs drawn (G is the gradients per update).
LABEL_FIELDS = ("task", "mode", "workers", "G", "local_accum", "pull_every", "stale_policy", "predict", "ema", "lr",
                "seed")
LABEL_NAMES = {"workers": "N", "local_accum": "k", "pull_every": "U"}


def pyplot():
    """matplotlib.pyplot, drawing to files only (the Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"figures need matplotlib: {PLOTS_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """The valid and update records of a run's metrics.jsonl (none where it has none)."""
    valid, updates = [], []
    path = os.path.join(run_dir, rundir.METRICS)
    if not os.path.isfile(path):
        return valid, updates
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if r.get("kind") == "valid":
                valid.append(r)
            elif r.get("kind") == "update":
                updates.append(r)
    return valid, updates


@dataclass
class Curves:
    """One run's records, as curves against the server update, the target tokens trained on or
    the time (virtual time for a simulated run, else wall seconds)."""
    label: str
    valid: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)

    @property
    def virtual(self) -> bool:
        return any("vtime" in r for r in self.valid or self.updates)

    def dev(self, metric: str, x: str) -> tuple[list[float], list[float]]:
        return [_x(r, x, r.get("tokens", math.nan)) for r in self.valid], [r.get(metric, math.nan) for r in self.valid]

    def train_loss(self, x: str, points: int = TRAIN_POINTS) -> tuple[list[float], list[float]]:
        """The loss per target token, averaged (by tokens) over windows of consecutive updates."""
        xs, ys, tokens, n = [], [], 0, max(1, len(self.updates) // points)
        for i in range(0, len(self.updates), n):
            window = self.updates[i:i + n]
            w_tokens = sum(u["tokens"] for u in window)
            tokens += w_tokens
            xs.append(_x(window[-1], x, tokens))
            ys.append(sum(u["loss"] * u["tokens"] for u in window) / w_tokens if w_tokens else math.nan)
        return xs, ys


def dev_metric(runs: list[Curves]) -> str | None:
    """The quality metric to draw: the first of DEV_METRICS the runs' validations have."""
    return next((m for m in DEV_METRICS if any(m in r for c in runs for r in c.valid)), None)


def _x(r: dict, x: str, tokens: float) -> float:
    if x == "update":
        return r["update"]
    if x == "tokens":
        return tokens
    return r.get("vtime", r.get("time", math.nan))


def _time_unit(runs: list[Curves]) -> tuple[float, str]:
    """Seconds per unit of the time axis (hours, minutes or seconds, by the longest run) and its label."""
    times = [t for c in runs for t in c.dev("loss", "time")[0] + c.train_loss("time")[0] if not math.isnan(t)]
    longest = max(times, default=0.0)
    seconds, unit = (3600, "hours") if longest >= 7200 else (60, "minutes") if longest >= 120 else (1, "seconds")
    kinds = {c.virtual for c in runs}
    clock = "virtual" if kinds == {True} else "wall" if kinds == {False} else "virtual (simulated) or wall"
    return seconds, f"{clock} {unit}"


def panel(ax, runs: list[Curves], y: str, x: str) -> None:
    """Draw each run's curve of `y` (a dev metric, or "train_loss") against `x` on `ax`."""
    seconds, time_label = _time_unit(runs) if x == "time" else (1, "")
    drawn = []
    for c in runs:
        xs, ys = c.train_loss(x) if y == "train_loss" else c.dev(y, x)
        drawn += [v for v in ys if v > 0]  # what a log scale can show (not NaN)
        if xs:
            ax.plot([v / seconds for v in xs], ys, label=c.label,
                    **({"linewidth": 0.8} if y == "train_loss" else {"marker": "."}))
    what = "training loss per token" if y == "train_loss" else f"dev {'BLEU' if y == 'bleu' else y}"
    xlabel = {"update": "server updates", "tokens": "target tokens trained on", "time": time_label}[x]
    ax.set(xlabel=xlabel, ylabel=what, title=f"{what} by {x}")
    if y == "train_loss" and drawn and max(drawn) > 4 * min(drawn):  # a loss falling by orders of magnitude
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


# -- pyasgd-plot ------------------------------------------------------------------------------------------
def load_run(run_dir: str, label: str) -> Curves:
    """A run directory's curves; a ConfigError naming it when it has nothing to draw."""
    if not os.path.isfile(os.path.join(run_dir, rundir.METRICS)):
        what = "no such directory" if not os.path.isdir(run_dir) else f"not a run directory (no {rundir.METRICS})"
        raise ConfigError(f"{run_dir}: {what}")
    valid, updates = read_metrics(run_dir)
    if not valid:
        raise ConfigError(f"{run_dir}: no validation records in {rundir.METRICS} yet")
    return Curves(label, valid, updates)


def _settings(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, rundir.CONFIG)
    try:
        cfg = rundir.read_json(path) if os.path.isfile(path) else {}
    except (OSError, ValueError):
        cfg = {}
    G = cfg.get("global_accum") or (cfg["workers"] * cfg.get("nnodes", 1) if "workers" in cfg else None)
    return {**cfg, "G": G}


def legend_labels(run_dirs: list[str]) -> list[str]:
    """Each run's name and the settings that differ between the runs (mode, G and lr for one run)."""
    settings = [_settings(d) for d in run_dirs]
    keys = [k for k in LABEL_FIELDS if len({json.dumps(s.get(k)) for s in settings}) > 1]
    if len(run_dirs) == 1:
        keys = ["mode", "G", "lr"]
    out = []
    for d, s in zip(run_dirs, settings):
        shown = [f"{LABEL_NAMES.get(k, k)}={s[k]:g}" if isinstance(s[k], float) else f"{LABEL_NAMES.get(k, k)}={s[k]}"
                 for k in keys if s.get(k) not in (None, "")]
        name = os.path.basename(os.path.normpath(d))
        out.append(name + (f" ({', '.join(shown)})" if shown else ""))
    return out


def plot_runs(run_dirs: list[str], out: str, x: str = "update") -> str:
    """Draw the runs' dev metric, dev loss and training loss against `x` into `out`."""
    runs = [load_run(d, label) for d, label in zip(run_dirs, legend_labels(run_dirs))]
    plt = pyplot()
    ys = [y for y in (dev_metric(runs), "loss", "train_loss") if y]
    fig, ax = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4.5), squeeze=False)
    for a, y in zip(ax[0], ys):
        panel(a, runs, y, x)
    ax[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=90)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out: cannot write {out}: {e}") from None
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyasgd-plot", description="Draw the dev metric (BLEU for translation), "
                                "the dev loss and the training loss of runs side by side into one figure.",
                                epilog=f"Needs matplotlib: {PLOTS_EXTRA}.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="plot.png", help="the figure to write; its suffix picks the format "
                   "(.png, .pdf, .svg; default: plot.png in the current directory)")
    p.add_argument("--x", choices=X_AXES, default="update",
                   help="the x axis: server updates (default), target tokens trained on, or time (virtual "
                   "time for simulated runs, else wall time)")
    args = p.parse_args(argv)
    try:
        print(f"pyasgd-plot: wrote {plot_runs(args.runs, args.out, args.x)}")
        return 0
    except ConfigError as e:
        print(f"pyasgd-plot: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
