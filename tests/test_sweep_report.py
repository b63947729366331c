"""Sweeps against one baseline, what each setting cost, provenance, the report's figures, and the
main job's demo (the scene's objects and the hallucinated ones marked)."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error
from lvlm_fix.interventions.vhr import default_layers
from conftest import cli_run as _run
from lvlm_fix.cli.main import main




@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A POPE sweep on the embedded testbed: VHR at two alphas and VAR, against one baseline."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    main(["eval", "--bench", "pope", "--split", "random", "--limit", "6", "--batch-size", "3", "--n-boot", "50",
          "--methods", "none,vhr:alpha=1.5,vhr:alpha=2,var:tau=3.5", "--out", str(out)])
    return out


def test_each_setting_has_its_folder_row_and_resolved_config(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    assert list(summary["methods"]) == ["none", "vhr:alpha=1.5", "vhr:alpha=2", "var:tau=3.5"]
    for folder in ("none", "vhr,alpha=1.5", "vhr,alpha=2", "var,tau=3.5"):
        assert (sweep / folder / "samples.jsonl").is_file() and (sweep / folder / "cost.json").is_file()
    vhr = summary["provenance"]["methods"]["vhr:alpha=1.5"][0]
    assert vhr["config"]["alpha"] == 1.5 and vhr["on_model"]["head_output_layers"] == default_layers(8)  # as used (8 layers)
    table = (sweep / "results.md").read_text()
    assert "| vhr:alpha=2 | random |" in table


def test_cost_per_setting_is_measured_and_tabled(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    cost = summary["cost"]
    assert set(cost) == set(summary["methods"])
    for name, c in cost.items():
        assert c["samples"] == 6 and c["seconds_per_sample"] > 0 and c["generated_tokens"] > 0
        assert c["time_ratio"] > 0 and c["forwards_per_batch"] >= 1
    assert cost["none"]["time_ratio"] == 1.0
    assert cost["vhr:alpha=2"]["extra_forwards_per_batch"] == 1.0  # VHR's text-only stream: one prefill per batch
    assert cost["var:tau=3.5"]["extra_forwards_per_batch"] == 0.0
    assert "## Cost" in (sweep / "results.md").read_text()


def test_provenance_names_the_run(sweep):
    prov = json.loads((sweep / "summary.json").read_text())["provenance"]
    assert prov["batch_size"] == 3 and prov["device"] == "cpu" and "lvlm-fix" in prov["versions"]
    assert "--methods" in prov["command"] and prov["started"] <= prov["finished"]
    assert prov["elapsed_seconds"] >= 0 and "lvlm_fix_commit" in prov


def test_identical_settings_are_refused(capsys, tmp_path):
    line = cli_error(capsys, "eval", "--methods", "none,vhr,vhr:alpha=2", "--out", str(tmp_path / "x"))
    assert "are the same methods with the same parameters" in line


def test_report_draws_the_figures_and_links_them(capsys, sweep):
    code, out, err = _run(capsys, "report", str(sweep))
    assert code == 0, err
    figures = sorted(p.name for p in (sweep / "figures").iterdir())
    # vhr at two alphas is a sweep: its metrics against alpha too
    assert figures == ["cost.png", "metrics_random.png", "precision_vs_recall_random.png", "sweep_vhr_alpha.png"]
    md = (sweep / "results.md").read_text()
    assert md.count("## Figures") == 1 and "(figures/precision_vs_recall_random.png)" in md
    _run(capsys, "report", str(sweep))  # again: the section is replaced, not added twice
    assert (sweep / "results.md").read_text().count("## Figures") == 1


def test_report_of_a_folder_without_summary_is_one_line(capsys, tmp_path):
    assert "summary.json not found" in cli_error(capsys, "report", str(tmp_path))


def test_main_job_shows_the_scene_and_marks_absent_objects(capsys, tmp_path):
    code, out, err = _run(capsys, "run", "--method", "vhr", "--compare", "--max-new-tokens", "24",
                          "--out", str(tmp_path / "o"))
    assert code == 0, err
    lines = out.splitlines()
    scene = lines[0].split(": ", 1)[1].split(", ")
    assert lines[0].startswith("scene") and scene
    assert lines[1].startswith("[baseline] ") and lines[2].startswith("[vhr] ")
    from lvlm_fix.evals.chair import make_extractor

    extract = make_extractor("lvlm-fix")
    for line in lines[1:3]:
        text = line.split("] ", 1)[1]
        for mention in extract(text.replace("*", "")):
            marked = f"*{mention.word}" in text
            assert marked == (mention.node not in scene), (line, mention)
    assert "[vhr touched] heads x2 by layer" in err and "{" not in err.split("[vhr touched]")[1].splitlines()[0]
    report = json.loads((tmp_path / "o" / "reports.jsonl").read_text().splitlines()[0])
    assert "selected_heads" in report["report"]["vhr"]


def test_loading_and_decoding_options_reach_the_model(capsys, tiny_dirs, images, tmp_path):
    image = tmp_path / "i.png"
    images[0].save(image)
    code, out, err = _run(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(image), "--prompt", "Hi?",
                          "--model-args", "attn_implementation=eager", "--do-sample", "--temperature", "0.7",
                          "--top-p", "0.9", "--repetition-penalty", "1.2", "--system-prompt", "Be brief.",
                          "--max-new-tokens", "3", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "answers.jsonl").read_text())["prompt"] == "Hi?"
