"""The CLI end to end on a tiny model, and its one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest
from transformers import BertConfig

from conftest import cli_error
from conftest import cli_run as run


def test_list_names_every_method_and_eval(capsys):
    from lvlm_fix.evals.bench import BENCHES
    from lvlm_fix.interventions import METHODS

    code, out, _ = run(capsys, "list")
    assert code == 0 and "none" in out
    for name in METHODS.names():
        assert f"  {name} " in out
    evals = out.split("evals:")[1]
    assert {"pope", "chair", "amber"} <= set(BENCHES.names())
    for name in BENCHES.names():
        assert f"  {name} " in evals


def test_run_prints_an_answer_and_jsonl_runs_batched(capsys, tiny_dirs, image_file, tmp_path):
    model = str(tiny_dirs("llava"))
    code, out, err = run(capsys, "run", "--model", model, "--image", str(image_file), "--prompt", "Is there a cat?",
                         "--max-new-tokens", "3")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"image": str(image_file), "prompt": p}) for p in ["A?", "Longer prompt here?", "B"]))
    code, out, err = run(capsys, "run", "--model", model, "--jsonl", str(rows), "--batch-size", "2",
                         "--max-new-tokens", "3", "--out", str(tmp_path / "o"))
    assert code == 0, err
    written = [json.loads(x) for x in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in written] == ["A?", "Longer prompt here?", "B"]


def test_run_records_the_image_as_the_user_gave_it_and_resolved(capsys, tiny_dirs, image_file, tmp_path,
                                                                  monkeypatch):
    """answers.jsonl names the user's image: the path as given and its absolute path (--image relative to the
    working folder, a --jsonl row's relative to the file); only the testbed's own scene is "<testbed scene>"."""
    import shutil

    model = str(tiny_dirs("llava"))
    monkeypatch.chdir(image_file.parent)
    code, _, err = run(capsys, "run", "--model", model, "--image", image_file.name, "--max-new-tokens", "2",
                       "--out", str(tmp_path / "one"))
    assert code == 0, err
    row = json.loads((tmp_path / "one" / "answers.jsonl").read_text())
    assert row["image"] == image_file.name and row["image_resolved"] == str(image_file.resolve())

    (tmp_path / "data").mkdir()
    shutil.copy(image_file, tmp_path / "data" / "a.png")
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "A?"}))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "run", "--model", model, "--jsonl", "data/rows.jsonl", "--max-new-tokens", "2",
                       "--out", "batch")
    assert code == 0, err
    row = json.loads((tmp_path / "batch" / "answers.jsonl").read_text())
    assert row["image"] == "a.png" and row["image_resolved"] == str((tmp_path / "data" / "a.png").resolve())

    code, _, err = run(capsys, "run", "--model", "testbed", "--max-new-tokens", "2", "--out", "scene")
    assert code == 0, err
    row = json.loads((tmp_path / "scene" / "answers.jsonl").read_text())
    assert row["image"] == "<testbed scene>" and "image_resolved" not in row


def test_heads_writes_stats_and_figures(capsys, tiny_dirs, image_file, tmp_path):
    code, out, err = run(capsys, "heads", "--model", str(tiny_dirs("qwen2_vl")), "--image", str(image_file),
                         "--prompt", "Describe it.", "--out", str(tmp_path / "h"))
    assert code == 0, err
    stats = json.loads((tmp_path / "h" / "stats.json").read_text())
    assert len(stats["vhd"]) == stats["num_layers"]
    for name in ("vhd_heatmap.png", "visual_sinks.png", "entropy_image_mass.png"):
        assert (tmp_path / "h" / name).stat().st_size > 1000


def test_heads_tau_reaches_the_report_and_marks_vhr_heads(capsys, tiny_dirs, image_file, tmp_path):
    """--tau is the sink threshold of the report; a threshold nothing reaches draws the "no sink" text
    instead of an empty map; the heads VHR would scale with its defaults are in the report."""
    from unittest import mock

    from matplotlib.axes import Axes

    from lvlm_fix.interventions.vhr import default_layers

    with mock.patch.object(Axes, "text", autospec=True, side_effect=Axes.text) as text:  # drawn, and recorded
        code, out, err = run(capsys, "heads", "--model", str(tiny_dirs("llava")), "--image", str(image_file),
                             "--tau", "1e6", "--out", str(tmp_path / "h"))
    assert code == 0, err
    stats = json.loads((tmp_path / "h" / "stats.json").read_text())
    assert stats["sink_tau"] == 1e6 and not any(rows[0] for rows in stats["visual_sinks"].values())
    assert any(call.args[3] == "no sink found at tau = 1e+06" for call in text.call_args_list)
    assert "tau = 1e+06" in out and (tmp_path / "h" / "visual_sinks.png").stat().st_size > 1000
    selected = stats["vhr_selected_heads"]
    assert [int(k) for k in selected] == default_layers(stats["num_layers"])
    for layer, rows in selected.items():  # VHR's rule: filtered VHD above the layer's median
        vhd = stats["vhd_filtered"][stats["layers"].index(int(layer))]
        median = sorted(vhd)[(len(vhd) - 1) // 2]
        assert rows[0] == [h for h, v in enumerate(vhd) if v > median]


@pytest.mark.parametrize("tau", ["0", "-1", "nan", "inf", "x"])
def test_heads_refuses_a_bad_tau(capsys, tmp_path, tau):
    line = cli_error(capsys, "heads", "--tau", tau, "--out", str(tmp_path / "h"))
    assert "--tau" in line and not (tmp_path / "h").exists()


def test_missing_image(capsys, tiny_dirs, tmp_path):
    assert "nope.png" in cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(tmp_path / "nope.png"))


def test_unreadable_image(capsys, tiny_dirs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "bad.png" in cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(bad))


def test_unknown_model_type(capsys, tmp_path, image_file):
    BertConfig().save_pretrained(tmp_path / "bert")
    line = cli_error(capsys, "run", "--model", str(tmp_path / "bert"), "--image", str(image_file))
    assert "'bert'" in line and "llava" in line and "qwen2_vl" in line


def test_unknown_method_suggests_the_close_name(capsys, image_file):
    line = cli_error(capsys, "run", "--method", "vhrr", "--image", str(image_file))
    assert "'vhrr'" in line and "Did you mean 'vhr'" in line


@pytest.mark.parametrize("content, needle", [
    ('{"image": "a.png"}', "rows.jsonl:1"),
    ('{"image": "a.png", "prompt": "ok"}\nnot json', "rows.jsonl:2"),
])
def test_malformed_jsonl_row(capsys, tiny_dirs, tmp_path, images, content, needle):
    images[0].save(tmp_path / "a.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(content)
    assert needle in cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--jsonl", str(rows))


def test_unknown_option_is_one_line(capsys):
    assert "--no-such-flag" in cli_error(capsys, "run", "--no-such-flag")


def test_calibrate_writes_a_head_file_act_then_loads(capsys, tiny_dirs, coco, image_file, tmp_path):
    heads = tmp_path / "act_heads.json"
    code, out, err = run(capsys, "calibrate", "--method", "act", "--model", str(tiny_dirs("llava")), "--split", "random",
                         "--pope-questions", str(coco), "--image-dir", str(coco / "images"), "--limit", "4",
                         "--out", str(heads))
    assert code == 0, err
    written = json.loads(heads.read_text())
    assert written["calibration"]["samples"] == 4 and 0 <= written["calibration"]["baseline_acc"] <= 1
    assert isinstance(written["heads"], dict)
    code, out, err = run(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(image_file),
                         "--method", "act", "--heads-file", str(heads), "--max-new-tokens", "2")
    assert code == 0, err


def test_compare_prints_both_answers_and_saves_carve_masks(capsys, tiny_dirs, image_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "run", "--model", str(tiny_dirs("qwen2_vl")), "--image", str(image_file),
                         "--prompt", "Is there a cat?", "--method", "carve", "--compare", "--max-new-tokens", "2",
                         "--stat-tokens", "2")
    assert code == 0, err
    assert "[baseline]" in out and "[carve]" in out and "[carve touched]" in err
    assert (tmp_path / "lvlm-fix-out" / "carve_masks_0.png").is_file()
