"""`pyasgd-study report DIR`: the paper's tables and figures from a study's run directories alone
(each cell's cell.json, config.json, summary.json and metrics.jsonl), so a study copied from
another machine reports the same.

- Tables 1 and 5: best dev BLEU per method x learning rate (mean +- sd over seeds; a diverged
  cell, best dev BLEU under 1 as the paper's "did not rise above 0", is marked);
- Table 3: per method at the study's reference learning rate: local k, global G, tokens per
  update, average staleness, words per second, best dev BLEU, test BLEU, time and updates to each
  BLEU target, and the speed-up over sync;
- Table 4: per language pair, sync / async / async + 4x global accumulation;
- Figures: dev BLEU against updates and against (virtual) time, training loss, staleness (drawn
  with pyasgd/study/plots.py; without matplotlib, the `plots` extra, report.md has the tables and
  says why it has no figures).
"""
from __future__ import annotations

import os
import statistics
import sys
from collections import defaultdict
from typing import Any

from pyasgd.trainer import rundir
from pyasgd.study.grid import CELL, CELL_ERROR, cell_status, studies_run
from pyasgd.errors import MissingExtra
from pyasgd.study.plots import Curves, dev_metric, panel, pyplot, read_metrics

DIVERGED_BLEU = 1.0  # best dev BLEU below this: the run never learned (the paper's 0.00 entries)
TABLE4_METHODS = ("sync", "async", "async-global4")


def collect(study_dir: str) -> list[dict[str, Any]]:
    """One row per cell directory (report.json's objects)."""
    rows = []
    for name in sorted(os.listdir(study_dir)):
        d = os.path.join(study_dir, name)
        if not os.path.isfile(os.path.join(d, CELL)):
            continue
        cell = rundir.read_json(os.path.join(d, CELL))
        status = cell_status(d)
        row: dict[str, Any] = {**{k: cell[k] for k in ("cell", "method", "lr", "seed", "pair")},
                               "variant": cell.get("variant", {}), "run_dir": d, "status": status}
        if status == "failed":
            with open(os.path.join(d, CELL_ERROR), encoding="utf-8") as f:
                lines = f.read().strip().splitlines()
            row["error"] = lines[-1] if lines else ""
        cfg = rundir.read_json(os.path.join(d, rundir.CONFIG)) if os.path.isfile(os.path.join(d, rundir.CONFIG)) else {}
        row.update(preset=cfg.get("preset"), workers=cfg.get("workers"), sim_speeds=cfg.get("sim_speeds", ""),
                   bleu_targets=cfg.get("bleu_targets", ""))
        if status == "done":
            s = rundir.read_json(os.path.join(d, rundir.SUMMARY))
            time_kind = s.get("time_kind", "wall")
            row.update(
                best_valid_bleu=s.get("best_valid_bleu"), test_bleu=s.get("test_bleu"),
                best_valid_loss=s.get("best_valid_loss"), avg_staleness=s.get("avg_staleness"),
                wps=s.get("virtual_wps") if time_kind == "virtual" else s.get("wps"), wall_wps=s.get("wps"),
                updates=s.get("updates"), epochs=s.get("epochs"), tokens=s.get("tokens"),
                time_to_bleu=s.get("time_to_bleu") or s.get("time_to_target"), time_kind=time_kind,
                local_accum=s.get("local_accum"), global_accum=s.get("global_accum"),
                pull_every=s.get("pull_every"), stale_policy=s.get("stale_policy"),
                tokens_per_update=round(s["tokens"] / s["updates"]) if s.get("updates") else None,
                staleness_hist=s.get("staleness_hist"), stopped_because=s.get("stopped_because"),
                time=s.get("virtual_time_s") if time_kind == "virtual" else s.get("wall_s"))
            bleu = row["best_valid_bleu"]
            row["diverged"] = bleu is not None and bleu < DIVERGED_BLEU
            row["_valid"] = read_metrics(d)[0]
        rows.append(row)
    return rows


# -- tables ---------------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {statistics.stdev(values):.2f}"


def _variant_key(row: dict[str, Any]) -> str:
    v = row.get("variant") or {}
    return ", ".join(f"{k}={v[k]}" for k in sorted(v)) or "–"


def _block_title(pair: str, variant: str) -> str:
    return f"pair {pair}" + ("" if variant == "–" else f"; {variant}")


def _methods_in_order(rows) -> list[str]:
    from pyasgd.study.grid import METHODS

    names = {r["method"] for r in rows}
    return [m for m in METHODS if m in names] + sorted(names - set(METHODS))


def table_lr(rows) -> list[str]:
    """Tables 1 and 5: best dev BLEU per method and learning rate."""
    out = []
    blocks = defaultdict(list)
    for r in rows:
        blocks[(r["pair"], _variant_key(r))].append(r)
    for (pair, variant), rs in sorted(blocks.items()):
        lrs = sorted({r["lr"] for r in rs})
        if len(lrs) < 2:
            continue
        methods = _methods_in_order(rs)
        out += [f"### Best dev BLEU by learning rate ({_block_title(pair, variant)})", "",
                "| lr | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for lr in lrs:
            cells = []
            for m in methods:
                done = [r for r in rs if r["lr"] == lr and r["method"] == m and r["status"] == "done"]
                vals = [r["best_valid_bleu"] for r in done if r["best_valid_bleu"] is not None]
                mark = " †" if any(r["diverged"] for r in done) else ""
                cells.append(_mean_sd(vals) + mark + (f" (n={len(vals)})" if len(vals) > 1 else ""))
            out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        out += ["", "† at least one seed never reached dev BLEU 1 (diverged, or did not learn to translate "
                "within the budget: the paper's 0.00 entries).", ""]
    return out


def reference_lr(rows) -> dict[tuple, float]:
    """Per block, the learning rate Table 3 uses: the one with the most methods (ties: the median)."""
    ref = {}
    blocks = defaultdict(list)
    for r in rows:
        blocks[(r["pair"], _variant_key(r))].append(r)
    for key, rs in blocks.items():
        by_lr = defaultdict(set)
        for r in rs:
            by_lr[r["lr"]].add(r["method"])
        most = max(len(v) for v in by_lr.values())
        cands = sorted(lr for lr, v in by_lr.items() if len(v) == most)
        ref[key] = cands[(len(cands) - 1) // 2]
    return ref


def _targets(rows, given: list[float] | None) -> list[float]:
    """The BLEU targets of Table 3: given ones, else the cells' --bleu-targets, else (as the
    paper's 33/34/35 against sync's 35.66) 80, 90 and 95% of sync's best dev BLEU."""
    if given:
        return sorted(given)
    ts = set()
    for r in rows:
        ts.update(float(x) for x in (r.get("bleu_targets") or "").split(",") if x.strip())
    if ts:
        return sorted(ts)
    sync = [r["best_valid_bleu"] for r in rows if r["method"] == "sync" and r.get("best_valid_bleu")]
    if not sync:
        return []
    best = statistics.fmean(sync)
    return sorted({round(best * f, 1) for f in (0.8, 0.9, 0.95)})


def first_reach(row: dict[str, Any], target: float) -> dict[str, float] | None:
    """The first validation of a cell at or above `target` dev BLEU: its (virtual) time and update."""
    for v in row.get("_valid", []):
        if v.get("bleu") is not None and v["bleu"] >= target:
            t = v.get("vtime") if row.get("time_kind") == "virtual" else v.get("time")
            return {"time": t, "update": v["update"]}
    return None


def methods_table(rows, given_targets: list[float] | None = None) -> list[str]:
    """The paper's Table 3: every method at the reference rate (staleness, words/s, BLEU, time to targets)."""
    out = []
    ref = reference_lr(rows)
    blocks = defaultdict(list)
    for r in rows:
        key = (r["pair"], _variant_key(r))
        if r["lr"] == ref[key] and r["status"] == "done":
            blocks[key].append(r)
    for (pair, variant), rs in sorted(blocks.items()):
        targets = _targets(rs, given_targets)
        kind = rs[0]["time_kind"]
        unit = "virtual s" if kind == "virtual" else "s"
        # no targets (no sync cell, no --bleu-targets) means no time columns, not empty ones
        columns = ["method", "k", "G", "tokens/update", "avg staleness", "wps", "best dev BLEU", "test BLEU",
                   *[f"{unit} to {t:g}" for t in targets], *[f"updates to {t:g}" for t in targets],
                   "speed-up over sync"]
        out += [f"### Quality and convergence at lr {ref[(pair, variant)]:g} ({_block_title(pair, variant)})", "",
                "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        sync_times = _times(rs, "sync", targets)
        for m in _methods_in_order(rs):
            mine = [r for r in rs if r["method"] == m]
            times = _times(rs, m, targets)
            ups = []
            for t in targets:
                hits = [first_reach(r, t) for r in mine]
                ups.append("–" if any(h is None for h in hits) else f"{statistics.fmean(h['update'] for h in hits):.0f}")
            speedup = "–"
            common = [t for t in targets if sync_times.get(t) and times.get(t)]  # both reached, in > 0 s
            if m != "sync" and common:
                t = common[-1]
                speedup = f"{sync_times[t] / times[t]:.2f}x (to {t:g})"
            elif m == "sync" and common:
                speedup = "1.00x"
            out.append("| " + " | ".join([
                m, _same(mine, "local_accum"), _same(mine, "global_accum"), _avg(mine, "tokens_per_update", 0),
                _avg(mine, "avg_staleness", 2), _avg(mine, "wps", 0),
                _mean_sd([r["best_valid_bleu"] for r in mine if r["best_valid_bleu"] is not None]),
                _mean_sd([r["test_bleu"] for r in mine if r.get("test_bleu") is not None]),
                *[f"{times[t]:.4g}" if times.get(t) is not None else "–" for t in targets], *ups, speedup]) + " |")
        out += ["", f"Times are {'virtual seconds of the simulator clock' if kind == 'virtual' else 'wall seconds'}, "
                "means over seeds; – : not reached by every seed.", ""]
    return out


def _times(rs, method, targets) -> dict[str, float]:
    out = {}
    mine = [r for r in rs if r["method"] == method]
    for t in targets:
        hits = [first_reach(r, t) for r in mine]
        if mine and all(h is not None and h["time"] is not None for h in hits):
            out[t] = statistics.fmean(h["time"] for h in hits)
    return out


def _same(rs, key) -> str:
    vals = {r.get(key) for r in rs}
    return str(vals.pop()) if len(vals) == 1 else "/".join(map(str, sorted(vals, key=str)))


def _avg(rs, key, digits) -> str:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return "–" if not vals else f"{statistics.fmean(vals):,.{digits}f}"


def pairs_table(rows) -> list[str]:
    """The paper's Table 4: the methods on each language pair."""
    ref = reference_lr(rows)
    pairs = sorted({r["pair"] for r in rows})
    use = [r for r in rows if r["status"] == "done" and r["lr"] == ref[(r["pair"], _variant_key(r))]
           and r["method"] in TABLE4_METHODS]
    variants = sorted({_variant_key(r) for r in use})
    if len(pairs) < 2:
        return []
    out = ["### Global accumulation across language pairs (dev / test BLEU)", "",
           "| model | method | " + " | ".join(pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for v in variants:
        for m in TABLE4_METHODS:
            cells = []
            for p in pairs:
                rs = [r for r in use if r["pair"] == p and r["method"] == m and _variant_key(r) == v]
                dev = _mean_sd([r["best_valid_bleu"] for r in rs if r["best_valid_bleu"] is not None])
                test = _mean_sd([r["test_bleu"] for r in rs if r.get("test_bleu") is not None])
                cells.append(f"{dev} / {test}" if rs else "–")
            out.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
    return out + [""]


def table_cells(rows) -> list[str]:
    out = ["### Every cell", "", "| cell | status | best dev BLEU | test BLEU | best dev loss | avg staleness | "
           "wps | updates | epochs | stopped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt="{:.2f}"):
            v = r.get(key)
            return "–" if v is None else fmt.format(v)
        status = r["status"] + (" (diverged)" if r.get("diverged") else "")
        if r["status"] == "failed":
            status += f": {r.get('error', '')}"
        out.append(f"| {r['cell']} | {status} | {f('best_valid_bleu')} | {f('test_bleu')} | "
                   f"{f('best_valid_loss', '{:.3f}')} | {f('avg_staleness')} | {f('wps', '{:,.0f}')} | "
                   f"{f('updates', '{}')} | {f('epochs')} | {r.get('stopped_because') or '–'} |")
    return out + [""]


# -- figures --------------------------------------------------------------------------------------------
def figures(rows, study_dir: str) -> list[str]:
    """Per block at its reference learning rate (the first seed): the curves (dev BLEU by update and
    by time, training loss by tokens) and the staleness histograms. Needs matplotlib (MissingExtra)."""
    plt = pyplot()
    ref = reference_lr(rows)
    blocks = defaultdict(list)
    for r in rows:
        key = (r["pair"], _variant_key(r))
        if r["status"] == "done" and r["lr"] == ref[key]:
            blocks[key].append(r)
    written = []
    for n, ((pair, variant), rs) in enumerate(sorted(blocks.items()), 1):
        seed = min(r["seed"] for r in rs)
        rs = [r for r in rs if r["seed"] == seed]
        methods = _methods_in_order(rs)
        first = {m: next(r for r in rs if r["method"] == m) for m in methods}
        runs = [Curves(m, first[m]["_valid"], read_metrics(first[m]["run_dir"])[1]) for m in methods]
        fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
        metric = dev_metric(runs) or "bleu"
        for a, (y, x) in zip(ax, ((metric, "update"), (metric, "time"), ("train_loss", "tokens"))):
            panel(a, runs, y, x)
        ax[0].legend(fontsize=8)
        fig.suptitle(f"{_block_title(pair, variant)}, lr {ref[(pair, variant)]:g}, seed {seed}")
        fig.tight_layout()
        name = f"fig-curves-{n}.png"
        fig.savefig(os.path.join(study_dir, name), dpi=90)
        plt.close(fig)
        written.append((name, f"Dev BLEU and training loss, {_block_title(pair, variant)}"))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            hist = {int(k): v for k, v in (first[m].get("staleness_hist") or {}).items()}
            total = sum(hist.values()) or 1
            ks = sorted(hist)[:16]
            ax.bar([k + j * width for k in ks], [hist[k] / total for k in ks], width=width, label=m)
        ax.set(xlabel="staleness (server updates)", ylabel="fraction of gradients",
               title=f"staleness, {_block_title(pair, variant)}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"fig-staleness-{n}.png"
        fig.savefig(os.path.join(study_dir, name), dpi=90)
        plt.close(fig)
        written.append((name, f"Staleness histograms, {_block_title(pair, variant)}"))
    return written


def write_report(study_dir: str, targets: list[float] | None = None) -> str:
    if not os.path.isdir(study_dir):
        from pyasgd.errors import ConfigError

        raise ConfigError(f"{study_dir}: no such study directory")
    rows = collect(study_dir)
    if not rows:
        from pyasgd.errors import ConfigError

        raise ConfigError(f"{study_dir}: no cell directories (with {CELL}) to report; run pyasgd-study run first")
    rundir.write_json(os.path.join(study_dir, "report.json"),
                      [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    files = list(dict.fromkeys(os.path.basename(s["study_file"]) for s in studies_run(study_dir) if s.get("study_file")))
    title = " + ".join(files) or os.path.basename(os.path.abspath(study_dir))
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    lines = [f"# Study report: {title}", "",
             "Cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ". "
             "Generated by `pyasgd-study report` from the run directories.", ""]
    lines += table_lr(rows) + methods_table(rows, targets) + pairs_table(rows)
    figs = []
    try:
        figs = figures(rows, study_dir) if any(r["status"] == "done" for r in rows) else []
    except MissingExtra as e:  # the tables need nothing more; say once why there are no figures
        lines += [f"No figures: {e}.", ""]
        print(f"pyasgd-study: report without figures: {e}", file=sys.stderr)
    for name, caption in figs:
        lines += [f"![{caption}]({name})", ""]
    lines += table_cells(rows)
    path = os.path.join(study_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path
