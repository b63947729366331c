"""``lvlm-fix report RESULTS_DIR``: the figures of a results folder, linked from its results.md.

From ``summary.json`` (written by ``lvlm-fix eval`` or ``score``), per split:

* ``metrics_<split>.png``: every metric that has a bootstrap CI, per setting, the point estimate
  with its 95% interval, the baseline's value as a dashed line;
* ``<y>_vs_<x>_<split>.png``: the trade-offs the bench declares (``Bench.frontiers``: POPE
  precision vs recall, CHAIR_I vs recall, ...) across settings, with both intervals;
* ``sweep_<methods>_<parameter>.png``: for settings of the same methods that differ in a numeric
  parameter (a sweep), every metric against that parameter, one panel per metric and split, with
  95% CIs; the baseline as a horizontal line with its CI band;
* ``cost.png``: seconds per sample and its ratio to the baseline, per setting (when measured).

Every figure has a footer naming the model, the dataset (id and sha256 short form), n per split,
each setting with its parameters and the date of the run (:func:`lvlm_fix.evals.runner.run_facts`, as
in results.md). results.md gets (or has replaced) a "Figures" section with links to them.

``lvlm-fix report DIR1 DIR2 ...`` (:func:`write_combined`) instead puts several runs of one bench
(other models, other dates) in one Markdown table, a row per (run, setting, split).
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
    summary, frontiers = _load(root)
    bench, methods = summary["bench"], summary["methods"]
    results_md = root / "results.md"
    if results_md.exists() and not results_md.is_file():
        raise InputError(f"{results_md} is not a file; move it away so that the figures can be linked from it")
    out = root / FIGURES
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, where the figures go; move it away and run again")
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    footer = _footer(summary)
    splits = list(dict.fromkeys(sp for res in methods.values() for sp in res.get("splits", {})))
    baseline = summary.get("baseline")
    for split in splits:
        rows = {m: res["splits"][split] for m, res in methods.items() if split in res.get("splits", {})}
        metrics = list(dict.fromkeys(k for row in rows.values() for k in row.get("ci", {})))
        if metrics:
            written.append(_metric_panels(rows, metrics, baseline, f"{bench} {split}", out / f"metrics_{split}.png",
                                          footer))
        for x, y in frontiers:
            if all(k in row for row in rows.values() for k in (x, y)) and len(rows) > 0:
                written.append(_frontier(rows, x, y, baseline, f"{bench} {split}", out / f"{y}_vs_{x}_{split}.png",
                                         footer))
    for names, key, series in _sweeps(summary):
        written.append(_sweep(summary, names, key, series, out, footer))
    if summary.get("cost"):
        written.append(_cost(summary["cost"], baseline, out / "cost.png", footer))
    _link(root / "results.md", written, root)
    return written


def _load(root: Path) -> tuple[dict[str, Any], Any]:
    """A results folder's summary, checked (:func:`_check_summary`), and its bench's declared trade-offs."""
    summary_path = root / "summary.json"
    if not summary_path.is_file():
        raise InputError(f"{summary_path} not found; pass a folder written by `lvlm-fix eval` or `lvlm-fix score`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        bench = summary["bench"]
        summary["methods"]  # noqa: B018 (there, or not a summary)
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{summary_path} is not an lvlm-fix summary; pass a folder written by `lvlm-fix eval`") from None
    from .evals.bench import BENCHES

    frontiers = BENCHES.get(bench).frontiers if isinstance(bench, str) and bench in BENCHES else ()
    _check_summary(summary, summary_path, frontiers)
    return summary, frontiers


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
                   path: Path, footer: str = "") -> Path:
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
    return _save(fig, path, footer)


def _frontier(rows: dict[str, dict[str, Any]], x: str, y: str, baseline: str | None, title: str, path: Path,
              footer: str = "") -> Path:
    plt = require("matplotlib.pyplot", "lvlm-fix report")

    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    points = []
    for i, (name, row) in enumerate(rows.items()):
        xv, xl, xh = _interval(row, x)
        yv, yl, yh = _interval(row, y)
        colour = "black" if name == baseline else f"C{i % 10}"
        ax.errorbar(xv, yv, xerr=[[xv - xl], [xh - xv]], yerr=[[yv - yl], [yh - yv]], fmt="o", color=colour,
                    capsize=3, label=name)
        points.append((xv, yv, name))
    ax.set(xlabel=f"{x} (%)", ylabel=f"{y} (%)", title=f"{title}: {y} vs {x} across settings (95% CIs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, footer, lambda: _label_points(ax, points))


def _cost(cost: dict[str, dict[str, Any]], baseline: str | None, path: Path, footer: str = "") -> Path:
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
    return _save(fig, path, footer)


# -- several runs in one table ---------------------------------------------------------------------------
COMBINED = "combined.md"  # the table of several runs, in the first folder unless --out names a file


def write_combined(results_dirs: list[str | Path], out: str | Path | None = None) -> tuple[str, Path]:
    """Several runs of one bench (other models, other dates) in one Markdown table, a row per (run, setting,
    split) with the run's model and date; under it, each run's facts (:func:`~lvlm_fix.evals.runner.run_facts`).
    Written to ``out``, or to ``combined.md`` in the first folder; returns (the text, where it went). Every
    folder is checked before anything is written."""
    from .evals.bench import ci_cell
    from .evals.runner import run_facts, setting_text
    from .evals.stats import p_text

    roots = [Path(d) for d in results_dirs]
    twice = next((r for i, r in enumerate(roots) if r.resolve() in {x.resolve() for x in roots[:i]}), None)
    if twice is not None:
        raise InputError(f"{twice} is given twice; name each results folder once")
    runs = [(root, _load(root)[0]) for root in roots]
    bench = runs[0][1]["bench"]
    other = next(((root, s["bench"]) for root, s in runs if s["bench"] != bench), None)
    if other is not None:
        raise InputError(f"{other[0]} holds {other[1]} results and {roots[0]} {bench}; compare runs of one bench "
                         "(report each bench's folders in a command of its own)")
    target = Path(out) if out is not None else roots[0] / COMBINED
    if target.is_dir():
        raise InputError(f"--out {target} is a folder; give a file name, e.g. --out {target / COMBINED}")
    if not target.parent.is_dir():
        raise InputError(f"--out {target}: the folder {target.parent} does not exist; create it or choose another file")
    metrics = list(dict.fromkeys(k for _, s in runs for res in s["methods"].values()
                                 for row in res["splits"].values() for k in row.get("ci", {})))
    head = ["run", "model", "date", "method", "split", "n", *(f"{m} [95% CI] (p)" for m in metrics)]
    lines = [f"# {bench}: {len(runs)} runs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for root, summary in runs:
        prov = summary.get("provenance") if isinstance(summary.get("provenance"), dict) else {}
        model = str(prov.get("model") or ("scored outputs" if prov.get("command") == "score" else "not recorded"))
        finished = str(prov.get("finished") or "?")
        date = finished[:16].replace("T", " ") + finished[19:]  # to the minute, with the UTC offset
        n = summary.get("n") if isinstance(summary.get("n"), dict) else {}  # older summaries: the bench's row["n"]
        for method, res in summary["methods"].items():
            for split, row in res["splits"].items():
                cells = []
                for m in metrics:
                    if m not in row:
                        cells.append("—")
                        continue
                    vs = row.get("vs_baseline", {}).get(m)
                    p = f" (p {p_text(vs['p_value'], vs.get('n_boot', 1000))})" if vs else ""
                    cells.append(ci_cell(row, m) + p)
                size = str(n.get(split, row.get("n", "?")))
                lines.append("| " + " | ".join([str(root), model, date, method, split, size, *cells]) + " |")
    lines += ["", "Values in %; p: two-sided paired bootstrap vs the baseline of the same run, on its samples "
              "(runs on other data or other settings are not paired with each other).", "", "## Runs", ""]
    for root, summary in runs:
        facts = run_facts(summary)
        lines += [f"### {root}", "", *(f"- **{k}:** {v}" for k, v in facts.items() if k != "Methods"),
                  f"- **Baseline:** `{summary['baseline']}`",
                  "- **Bench settings:** " + (", ".join(f"{k}={v}" for k, v in summary.get("settings", {}).items()
                                                       if len(str(v)) <= 80) or "none"),
                  "- **Methods:**", *(f"  - `{setting_text(summary, m)}`" for m in summary["methods"]), ""]
    text = "\n".join(lines)
    atomic_write(target, text.encode())
    return text, target


# -- sweeps: each metric against the swept parameter ------------------------------------------------
def _sweeps(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, list[tuple[float, str]]]]]:
    """Every numeric parameter that takes two or more values among settings of the same methods, as
    ``(methods, parameter, {other parameters: [(value, setting), ...]})``: one figure each; settings that also
    differ in other parameters are other lines of it. Read from the resolved configs of the provenance, so a
    default counts with its value (``vhr`` beside ``vhr:alpha=1.5``); scored outputs have none, so no sweep."""
    from .evals.runner import described_settings

    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for name in summary["methods"]:
        described = described_settings(summary).get(name)
        if not described or not isinstance(described, list):
            continue  # the baseline, or no resolved config
        methods = "+".join(str(d.get("method")) for d in described)
        if not all(isinstance(d, dict) and isinstance(d.get("config", {}), dict) for d in described):
            continue
        params = {f"{d.get('method')}.{k}": v for d in described for k, v in (d.get("config") or {}).items()}
        groups.setdefault(methods, {})[name] = params
    out = []
    for methods, settings in groups.items():
        keys = list(dict.fromkeys(k for params in settings.values() for k in params))
        varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in settings.values()}) > 1]
        for key in varying:
            if not all(_number(p.get(key)) for p in settings.values()):
                continue
            series: dict[str, list[tuple[float, str]]] = {}
            for name, params in settings.items():
                rest = ", ".join(f"{k}={json.dumps(params.get(k))}" for k in varying if k != key)
                series.setdefault(rest, []).append((float(params[key]), name))
            out.append((methods, key, {k: sorted(v) for k, v in series.items()}))
    return out


def _sweep(summary: dict[str, Any], methods: str, key: str, series: dict[str, list[tuple[float, str]]], out: Path,
           footer: str) -> Path:
    """One panel per (split, metric with a CI): the metric against ``key`` with its 95% CI, a line per
    ``series``; the baseline as a dashed line with its CI as a band."""
    plt = require("matplotlib.pyplot", "lvlm-fix report")

    rows, baseline = summary["methods"], summary["baseline"]
    label = key.split(".", 1)[1] if "+" not in methods else key  # vhr.alpha is "alpha" in a sweep of vhr alone
    names = [n for points in series.values() for _, n in points]
    splits = list(dict.fromkeys(sp for n in names for sp in rows[n]["splits"]))
    metrics = {sp: list(dict.fromkeys(k for n in names for k in rows[n]["splits"].get(sp, {}).get("ci", {})))
               for sp in splits}
    ncols = max([1, *(len(m) for m in metrics.values())])
    fig, axes = plt.subplots(len(splits), ncols, figsize=(3.3 * ncols + 0.6, 2.7 * len(splits) + 0.8),
                             squeeze=False)
    for r, sp in enumerate(splits):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(metrics[sp]):
                ax.set_visible(False)
                continue
            metric = metrics[sp][c]
            base = rows.get(baseline, {}).get("splits", {}).get(sp)
            if base is not None and metric in base:
                value, low, high = _interval(base, metric)
                ax.axhspan(low, high, color="grey", alpha=0.15, linewidth=0)
                ax.axhline(value, color="black", linestyle="--", linewidth=0.9, label=f"{baseline} (95% CI band)")
            for i, (rest, points) in enumerate(series.items()):
                have = [(x, rows[n]["splits"][sp]) for x, n in points if metric in rows[n]["splits"].get(sp, {})]
                if not have:
                    continue
                xs = [x for x, _ in have]
                vals = [_interval(row, metric) for _, row in have]
                ax.errorbar(xs, [v for v, _, _ in vals],
                            yerr=[[v - lo for v, lo, _ in vals], [hi - v for v, _, hi in vals]], fmt="o-",
                            color=f"C{i % 10}", capsize=3, label=f"{methods} {rest}".strip())
            ax.set(title=f"{metric} ({sp})", xlabel=label, ylabel="%")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{summary['bench']}: each metric vs {methods} {label} (95% bootstrap CIs; baseline dashed, its CI "
                 "shaded)")
    name = re.sub(r"[^\w.+-]", "_", f"sweep_{methods}_{label}")
    return _save(fig, out / f"{name}.png", footer)


# -- what every figure says about its run ------------------------------------------------------------
_FOOTER_PT = 7  # footer font size; a line takes about 1.4 times it


def _footer(summary: dict[str, Any]) -> str:
    """The footer of every figure: model, dataset, n per split and date, then each setting with its
    parameters (the facts of results.md's head, :func:`~lvlm_fix.evals.runner.run_facts`)."""
    from .evals.runner import run_facts

    facts = run_facts(summary)
    head = " · ".join(f"{k} {facts[k]}" for k in ("Model", "Dataset", "n per split", "Date")).replace("`", "")
    return f"{head}\nsettings: {facts['Methods']}"


def _save(fig: Any, path: Path, footer: str, then: Any = None) -> Path:
    """Add the footer below the axes (the figure grows by its height), lay out, run ``then`` (what needs the
    final layout: label placement), save, close."""
    import textwrap

    plt = require("matplotlib.pyplot", "lvlm-fix report")
    width, height = fig.get_size_inches()
    chars = int(width * 72 / (0.62 * _FOOTER_PT))  # DejaVu Sans averages under 0.6 em a character
    lines = [line for part in footer.split("\n") if footer for line in textwrap.wrap(part, chars)]
    extra = len(lines) * _FOOTER_PT * 1.4 / 72 + (0.1 if lines else 0)
    fig.set_size_inches(width, height + extra)
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=_FOOTER_PT, ha="left", va="bottom", color="0.25")
    fig.tight_layout(rect=(0, extra / (height + extra), 1, 1))
    if then is not None:
        then()
    save_figure(fig, path)
    plt.close(fig)
    return path


# -- labels that do not overprint ------------------------------------------------------------------------
_MERGE_PX = 6  # points closer than this (on screen, at the saved size) are one point with one label


def _label_points(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Name each point without overprinting: points within ``_MERGE_PX`` of each other get one label
    ("vhr, var"), and a label that would cover one already placed tries other sides, then further away."""
    renderer = ax.figure.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settles the autoscaled limits, which transData reads
    groups: list[dict[str, Any]] = []  # {"at": on screen, "xy": in data, "names": [...]}
    for xv, yv, name in points:
        at = ax.transData.transform((xv, yv))
        near = next((g for g in groups if max(abs(g["at"] - at)) < _MERGE_PX), None)
        if near is None:
            groups.append({"at": at, "xy": (xv, yv), "names": [name]})
        else:
            near["names"].append(name)
    # where a label may go, in points from its point: the four corners, then further up and down
    sides = [(5, 5), (5, -5), (-5, 5), (-5, -5)] + [(5, s * (5 + 9 * k)) for k in range(1, 40) for s in (1, -1)]
    Bbox = require("matplotlib.transforms", "lvlm-fix report").Bbox
    # the markers are taken too: a label beside a point, not over its neighbour's
    taken: list[Any] = [Bbox.from_bounds(*(g["at"] - 4), 8, 8) for g in groups]
    for g in groups:
        label = ", ".join(g["names"])
        label = label if len(label) <= 28 else ",\n".join(g["names"])  # many at one point: a name a line
        text = ax.annotate(label, g["xy"], xytext=sides[0], textcoords="offset points", fontsize=8)
        for dx, dy in sides:
            text.set_position((dx, dy))  # the offset, for an annotation in offset points
            text.set(ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box = text.get_window_extent(renderer).padded(1)
            inside = ax.figure.bbox.contains(box.x0, box.y0) and ax.figure.bbox.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                break
        taken.append(box)


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
