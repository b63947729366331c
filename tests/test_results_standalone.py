"""Results that stand alone: results.md and every figure name the model, the dataset, n per split, the
settings with their parameters and the date; p-values at the bootstrap's floor print as <0.001; a sweep
gets each metric against its parameter; labels of coinciding points do not overprint; one ETA over the
whole run; several runs in one table."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

from conftest import cli_error
from conftest import cli_run as _run
from lvlm_fix import report
from lvlm_fix.cli.main import main
from lvlm_fix.evals.bench import p_cell
from lvlm_fix.evals.stats import p_text

METHODS = ["none", "vhr:alpha=1.5", "vhr:alpha=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A POPE sweep of VHR's alpha on the embedded testbed (6 questions of the random split)."""
    out = tmp_path_factory.mktemp("standalone") / "run"
    main(["eval", "--bench", "pope", "--split", "random", "--limit", "6", "--batch-size", "3", "--n-boot", "50",
          "--methods", ",".join(METHODS), "--out", str(out)])
    return out


@pytest.fixture
def drawn(monkeypatch):
    """The figures report draws, kept (they are saved as usual)."""
    figures = []
    real = report.save_figure

    def keep(fig, path):
        figures.append((path.name, fig))
        real(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    return figures


def _facts(run):
    summary = json.loads((run / "summary.json").read_text())
    prov = summary["provenance"]
    return summary, [prov["model"], prov["dataset"]["id"], prov["dataset"]["sha256"][:19], "random 6",
                     prov["finished"], "vhr(alpha=1.5, layers=null, outlier_filter=true)"]


def test_results_md_names_model_dataset_n_settings_and_date(run):
    _, facts = _facts(run)
    head = (run / "results.md").read_text().split("| method |")[0]  # above the table
    for fact in facts:
        assert fact in head, fact


def test_every_figure_names_model_dataset_n_settings_and_date(capsys, run, drawn):
    code, _, err = _run(capsys, "report", str(run))
    assert code == 0, err
    _, facts = _facts(run)
    assert {name for name, _ in drawn} >= {"metrics_random.png", "precision_vs_recall_random.png", "cost.png",
                                           "sweep_vhr_alpha.png"}
    for name, fig in drawn:
        fig.canvas.draw()
        words = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
        for fact in facts:
            assert fact in words, (name, fact)
        inside = fig.bbox.padded(1)
        for t in fig.texts:  # the footer is on the figure, not cut off at its edge
            box = t.get_window_extent()
            assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), (name, t.get_text())


def test_p_values_at_the_bootstraps_floor_print_as_less_than():
    assert p_text(1 / 1001) == "<0.001" and p_text(0.001) == "0.001" and p_text(0.0629) == "0.063"
    assert p_text(1 / 10001, 10000) == "<0.0001" and p_text(0.0005, 10000) == "0.0005"
    assert p_text(1 / 51, 50) == "<0.02"
    row = {"vs_baseline": {"accuracy": {"p_value": 1 / 1001, "n_boot": 1000}}}
    assert p_cell(row, "accuracy") == "<0.001"


def test_a_sweep_draws_each_metric_against_its_parameter_with_the_baseline_band(capsys, run, drawn):
    _run(capsys, "report", str(run))
    fig = dict(drawn)["sweep_vhr_alpha.png"]
    summary = json.loads((run / "summary.json").read_text())
    metrics = list(summary["methods"]["none"]["splits"]["random"]["ci"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [f"{m} (random)" for m in metrics]
    for ax, metric in zip(axes, metrics):
        assert ax.get_xlabel() == "alpha"
        curve = next(line for line in ax.lines if list(line.get_xdata()) != [0, 1])  # not the baseline's line
        assert list(curve.get_xdata()) == [1.5, 2.0]
        assert list(curve.get_ydata()) == [100 * summary["methods"][m]["splits"]["random"][metric]
                                           for m in ("vhr:alpha=1.5", "vhr:alpha=2")]
        base = summary["methods"]["none"]["splits"]["random"]
        assert any(list(line.get_ydata()) == [100 * base[metric]] * 2 for line in ax.lines)  # the baseline line
        assert ax.patches or ax.collections  # its CI band and the error bars


def test_labels_of_coinciding_and_close_points_do_not_overprint(tmp_path, drawn):
    require = pytest.importorskip("matplotlib")
    require.use("Agg")

    def row(p, r):
        return {"precision": p, "recall": r, "ci": {"precision": {"low": p - 0.05, "high": p + 0.05},
                                                      "recall": {"low": r - 0.05, "high": r + 0.05}}}

    # vhr and var at one point; pai, vcd and icd a few pixels off it, too far to merge, close enough to collide
    rows = {"none": row(0.80, 0.70), "vhr": row(0.85, 0.75), "var": row(0.85, 0.75), "pai": row(0.855, 0.752),
            "vcd": row(0.846, 0.757), "icd:alpha=1": row(0.853, 0.744)}
    report._frontier(rows, "recall", "precision", "none", "pope random", tmp_path / "f.png")
    (_, fig), = drawn
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    words = [t.get_text().replace("\n", " ") for t in labels]
    assert any("vhr, var" in w for w in words)  # one point, one label naming both
    assert sorted(n for w in words for n in w.split(", ")) == sorted(n.rstrip(",") for n in rows)
    boxes = [t.get_window_extent() for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


def test_eval_shows_one_overall_bar_across_settings(tiny, coco, tmp_path, capsys):
    from lvlm_fix.evals.runner import evaluate

    evaluate(tiny("llava"), bench="pope", split="random", methods=["none", "vhr", "var"], out_dir=tmp_path / "r",
             pope_questions=str(coco), image_dir=str(coco / "images"), batch_size=2, max_new_tokens=2, n_boot=20,
             limit=4, progress=True)
    err = capsys.readouterr().err
    assert "pope all 3 settings" in err and "12/12" in err  # 4 samples x 3 settings, with its ETA
    # resumed with one setting more: the overall total counts only what is left (4 samples of icd)
    evaluate(tiny("llava"), bench="pope", split="random", methods=["none", "vhr", "var", "icd"],
             out_dir=tmp_path / "r", pope_questions=str(coco), image_dir=str(coco / "images"), batch_size=2,
             max_new_tokens=2, n_boot=20, limit=4, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err.split("pope all 4 settings")[-1] and "16/16" not in err


def test_several_runs_in_one_table(capsys, run, tmp_path):
    other = tmp_path / "other"
    main(["eval", "--bench", "pope", "--split", "random", "--limit", "4", "--batch-size", "4", "--n-boot", "20",
          "--methods", "none,var:tau=3.5", "--out", str(other)])
    capsys.readouterr()
    code, out, err = _run(capsys, "report", str(run), str(other))
    assert code == 0, err
    written = run / report.COMBINED
    assert out.startswith(written.read_text()) and f"wrote {written}" in out
    rows = [line.split(" | ") for line in written.read_text().splitlines() if line.startswith(f"| {run}")
            or line.startswith(f"| {other}")]
    header = next(line for line in written.read_text().splitlines() if line.startswith("| run |"))
    assert header.startswith("| run | model | date | method | split | n |")
    assert [(r[0].lstrip("| "), r[3], r[5]) for r in rows] == [
        (str(run), m, "6") for m in METHODS] + [(str(other), m, "4") for m in ("none", "var:tau=3.5")]
    assert all(r[1] == "testbed" and r[2].startswith("20") for r in rows)  # model and date of each run
    assert "var(tau=3.5, rho=0.5" in written.read_text()  # each run's settings with their parameters
    code, out, _ = _run(capsys, "report", str(run), str(other), "--out", str(tmp_path / "both.md"))
    assert code == 0 and (tmp_path / "both.md").read_text() == written.read_text()


def test_one_folder_keeps_its_report_and_refuses_out(capsys, run, tmp_path):
    line = cli_error(capsys, "report", str(run), "--out", str(tmp_path / "x.md"))
    assert "--out" in line and not (tmp_path / "x.md").exists()


def test_bad_folders_in_a_combined_report_are_one_line_and_nothing_is_written(capsys, run, tmp_path):
    first = tmp_path / "first"
    shutil.copytree(run, first)
    (first / report.COMBINED).unlink(missing_ok=True)
    line = cli_error(capsys, "report", str(first), str(tmp_path / "nothing"))
    assert "nothing" in line and "summary.json not found" in line
    chair = tmp_path / "chair"
    chair.mkdir()
    summary = json.loads((run / "summary.json").read_text())
    (chair / "summary.json").write_text(json.dumps({**summary, "bench": "chair"}))
    line = cli_error(capsys, "report", str(first), str(chair))
    assert str(chair) in line and "chair" in line and "one bench" in line
    line = cli_error(capsys, "report", str(first), str(first))
    assert "twice" in line
    assert not (first / report.COMBINED).exists()


def test_a_summary_without_provenance_or_n_is_still_reported(capsys, run, tmp_path, drawn):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["provenance"], summary["n"]  # as written by hand, or by an older lvlm-fix
    (old / "summary.json").write_text(json.dumps(summary))
    code, _, err = _run(capsys, "report", str(old))
    assert code == 0, err
    words = " ".join(t.get_text() for _, fig in drawn for t in fig.texts)
    assert "Model not recorded" in words and "random 6" in words  # n from the bench's own rows
    assert "sweep_vhr_alpha.png" not in {name for name, _ in drawn}  # no resolved parameters, no sweep
