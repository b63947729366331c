"""``lvlm-fix report RESULTS_DIR``: the figures of a results folder, linked from its results.md.

From ``summary.json`` (written by ``lvlm-fix eval`` or ``score``), per split:

* ``metrics_<split>.png``: every metric that has a bootstrap CI, per setting, the point estimate
  with its 95% interval, the baseline's value as a dashed line;
* ``<y>_vs_<x>_<split>.png``: the trade-offs the bench declares (``Bench.frontiers``: POPE
  precision vs recall, CHAIR_I vs recall, ...) across settings, with both intervals;
* ``cost.png``: seconds per sample and its ratio to the baseline, per setting (when measured).

results.md gets (or has replaced) a "Figures" section with links to them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import InputError
from .extras import require
from .files import atomic_write, save_figure

FIGURES = "figures"
_SECTION = "## Figures"


def write_report(results_dir: str | Path) -> list[Path]:
    """Draw the figures of ``results_dir`` and link them from its results.md; return the written files."""
    require("matplotlib", "lvlm-fix report").use("Agg")  # files only, no window
    root = Path(results_dir)
    summary_path = root / "summary.json"
    if not summary_path.is_file():
        raise InputError(f"{summary_path} not found; pass a folder written by `lvlm-fix eval` or `lvlm-fix score`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        methods: dict[str, Any] = summary["methods"]
        bench = summary["bench"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{summary_path} is not an lvlm-fix summary; pass a folder written by `lvlm-fix eval`") from None
    from .evals.bench import registry

    frontiers = registry().get(bench).frontiers if isinstance(bench, str) and bench in registry() else ()
    _check_summary(summary, summary_path, frontiers)
    results_md = root / "results.md"
    if results_md.exists() and not results_md.is_file():
        raise InputError(f"{results_md} is not a file; move it away so that the figures can be linked from it")
    out = root / FIGURES
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, where the figures go; move it away and run again")
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    splits = list(dict.fromkeys(sp for res in methods.values() for sp in res.get("splits", {})))
    baseline = summary.get("baseline")
    for split in splits:
        rows = {m: res["splits"][split] for m, res in methods.items() if split in res.get("splits", {})}
        metrics = list(dict.fromkeys(k for row in rows.values() for k in row.get("ci", {})))
        if metrics:
            written.append(_metric_panels(rows, metrics, baseline, f"{bench} {split}", out / f"metrics_{split}.png"))
        for x, y in frontiers:
            if all(k in row for row in rows.values() for k in (x, y)) and len(rows) > 0:
                written.append(_frontier(rows, x, y, baseline, f"{bench} {split}", out / f"{y}_vs_{x}_{split}.png"))
    if summary.get("cost"):
        written.append(_cost(summary["cost"], baseline, out / "cost.png"))
    _link(root / "results.md", written, root)
    return written


def _number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_summary(summary: dict[str, Any], path: Path, frontiers: Any) -> None:
    """Every value a figure draws is there and a finite number, else one line naming it (a summary
    edited by hand would otherwise end in a traceback, or in figures of nothing)."""

    def bad(where: str, value: Any) -> InputError:
        return InputError(f"{path}: {where} is {value!r}, not a number; rewrite the summary with `lvlm-fix eval` "
                          "or `lvlm-fix score` (the same command resumes)")

    for key in ("bench", "baseline"):
        if not isinstance(summary.get(key), str):
            raise InputError(f"{path}: {key} is {summary.get(key)!r}, not a name; rewrite the summary with `lvlm-fix "
                             "eval` or `lvlm-fix score`")
    methods = summary["methods"]
    if not isinstance(methods, dict) or not methods:
        raise InputError(f"{path} lists no method, so there is nothing to draw; pass a folder written by `lvlm-fix "
                         "eval` or `lvlm-fix score`")
    for m, res in methods.items():
        splits = res.get("splits") if isinstance(res, dict) else None
        if not isinstance(splits, dict) or not splits or not all(isinstance(r, dict) for r in splits.values()):
            raise InputError(f"{path}: method {m!r} has no per-split results; rewrite the summary with `lvlm-fix eval`")
        for sp, row in splits.items():
            ci = row.get("ci", {})
            if not isinstance(ci, dict):
                raise bad(f"methods.{m}.splits.{sp}.ci", ci)
            for key, interval in ci.items():
                if not _number(row.get(key)):
                    raise bad(f"methods.{m}.splits.{sp}.{key}", row.get(key))
                for end in ("low", "high"):
                    value = interval.get(end) if isinstance(interval, dict) else interval
                    if not _number(value):
                        raise bad(f"methods.{m}.splits.{sp}.ci.{key}.{end}", value)
            for x, y in frontiers:
                for key in (x, y):
                    if key in row and not _number(row[key]):
                        raise bad(f"methods.{m}.splits.{sp}.{key}", row[key])
    cost = summary.get("cost") or {}
    if not isinstance(cost, dict):
        raise bad("cost", cost)
    for m, c in cost.items():
        if not isinstance(c, dict):
            raise bad(f"cost.{m}", c)
        value = c.get("seconds_per_sample")
        if not _number(value):
            raise bad(f"cost.{m}.seconds_per_sample", value)
        ratio = c.get("time_ratio")
        if ratio is not None and not _number(ratio):
            raise bad(f"cost.{m}.time_ratio", ratio)


def _interval(row: dict[str, Any], key: str) -> tuple[float, float, float]:
    """(value, low, high) in %, the interval collapsing to the value where there is no CI."""
    ci = row.get("ci", {}).get(key)
    value = 100 * row[key]
    return (value, 100 * ci["low"], 100 * ci["high"]) if ci else (value, value, value)


def _metric_panels(rows: dict[str, dict[str, Any]], metrics: list[str], baseline: str | None, title: str,
                   path: Path) -> Path:
    plt = require("matplotlib.pyplot", "lvlm-fix report")

    names = list(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.45 * len(names) + 1.6),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(names):
            value, low, high = _interval(rows[name], metric)
            colour = "black" if name == baseline else f"C{i % 10}"
            ax.errorbar(value, i, xerr=[[value - low], [high - value]], fmt="o", color=colour, capsize=3)
        if baseline in rows:
            ax.axvline(_interval(rows[baseline], metric)[0], color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=metric, xlabel="%")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{title}: point estimate and 95% bootstrap CI per setting")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _frontier(rows: dict[str, dict[str, Any]], x: str, y: str, baseline: str | None, title: str, path: Path) -> Path:
    plt = require("matplotlib.pyplot", "lvlm-fix report")

    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    for i, (name, row) in enumerate(rows.items()):
        xv, xl, xh = _interval(row, x)
        yv, yl, yh = _interval(row, y)
        colour = "black" if name == baseline else f"C{i % 10}"
        ax.errorbar(xv, yv, xerr=[[xv - xl], [xh - xv]], yerr=[[yv - yl], [yh - yv]], fmt="o", color=colour,
                    capsize=3, label=name)
        ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel=f"{x} (%)", ylabel=f"{y} (%)", title=f"{title}: {y} vs {x} across settings (95% CIs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _cost(cost: dict[str, dict[str, Any]], baseline: str | None, path: Path) -> Path:
    plt = require("matplotlib.pyplot", "lvlm-fix report")

    names = list(cost)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.6), sharey=True)
    secs = [cost[n]["seconds_per_sample"] for n in names]
    ratios = [cost[n].get("time_ratio") or 0.0 for n in names]
    colours = ["black" if n == baseline else f"C{i % 10}" for i, n in enumerate(names)]
    axes[0].barh(range(len(names)), secs, color=colours)
    axes[0].set(title="seconds per sample", xlabel="s")
    axes[1].barh(range(len(names)), ratios, color=colours)
    axes[1].axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    axes[1].set(title=f"time ratio to {baseline}", xlabel="×")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("cost per setting (wall-clock on the machine of the run)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _link(results_md: Path, figures: list[Path], root: Path) -> None:
    """Replace (or add) results.md's Figures section with links to ``figures``."""
    try:
        text = results_md.read_text(encoding="utf-8") if results_md.is_file() else ""
    except UnicodeDecodeError:
        raise InputError(f"{results_md} is not UTF-8 text; move it away (lvlm-fix eval writes it again)") from None
    text = re.sub(rf"\n{re.escape(_SECTION)}\n.*", "", text, flags=re.S).rstrip("\n")
    links = [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in figures]

    atomic_write(results_md, (text + f"\n\n{_SECTION}\n\nWritten by `lvlm-fix report`.\n\n" + "\n\n".join(links)
                               + "\n").encode())
