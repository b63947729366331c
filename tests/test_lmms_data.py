"""`lvlm-fix lmms-data`: POPE in lmms-eval's local layout from files the user has, with the shipped
pope_local task (tests/test_lmms_eval.py runs lmms-eval itself on that task)."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error, cli_run

COLUMNS = ["question_id", "question", "answer", "image", "category", "image_source"]  # lmms-lab/POPE's


def test_lmms_data_writes_the_users_pope_files_in_lmms_labs_schema_and_the_task(capsys, coco, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "lmms"
    code, stdout, err = cli_run(capsys, "lmms-data", "--pope-questions", str(coco), "--image-dir", str(coco / "images"),
                                "--split", "adversarial", "--out", str(out))
    assert code == 0, err
    table = datasets.load_from_disk(str(out / "pope_local_data"))["test"]
    questions = [json.loads(line) for line in next(coco.glob("*_adversarial.json*")).read_text().splitlines() if line]
    assert table.column_names == COLUMNS and len(table) == len(questions)
    first = table[0]
    assert first["question_id"] == f"adversarial-{questions[0]['question_id']}" and first["category"] == "adversarial"
    assert (first["question"], first["answer"]) == (questions[0]["text"], questions[0]["label"])
    assert first["image"].size == (64, 64) and first["image_source"] == questions[0]["image"].rsplit(".", 1)[0]
    task = out / "tasks" / "pope_local"
    assert "dataset_path: pope_local_data" in (task / "pope_local.yaml").read_text() and (task / "utils.py").is_file()
    assert "--tasks pope_local --include_path tasks" in stdout


def test_lmms_data_defaults_to_the_testbeds_pope_and_refuses_to_overwrite(capsys, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "lmms"
    code, _, err = cli_run(capsys, "lmms-data", "--limit", "2", "--out", str(out))
    assert code == 0, err
    table = datasets.load_from_disk(str(out / "pope_local_data"))["test"]
    assert len(table) == 6 and sorted(set(table["category"])) == ["adversarial", "popular", "random"]
    assert "already exists" in cli_error(capsys, "lmms-data", "--limit", "2", "--out", str(out))


def test_lmms_data_needs_the_image_folder_of_the_question_files(capsys, coco, tmp_path):
    assert "--image-dir" in cli_error(capsys, "lmms-data", "--pope-questions", str(coco), "--out", str(tmp_path / "x"))
