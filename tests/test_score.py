"""`lvlm-fix score`: captions and answers generated elsewhere, in the formats papers release them."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error
from lvlm_fix.errors import InputError
from lvlm_fix.evals.runner import score_outputs

# PAINT's released CHAIR files (results/chair/llava-1.5/*.jsonl in hasanar1f/PAINT): one
# {"image_id", "caption"} object per line, captions with blank lines inside.
PAINT_CHAIR = [
    {"image_id": 0, "caption": "The image features a dog and a cup.\n\n\nThe dog is brown."},  # cup: GT {dog}
    {"image_id": 1, "caption": "A cup on a table."},  # table -> dining table: GT {cup}
    {"image_id": 2, "caption": "A car next to a bus."},  # bus is lost to 'bu' in original mode
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(capsys, *argv):
    from lvlm_fix.cli.main import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr()


def test_score_a_paint_chair_file_from_the_cli(capsys, coco, tmp_path):
    captions = _jsonl(tmp_path / "chair_eval_layers_2-32_tokens_512.jsonl", PAINT_CHAIR)
    code, out = _run(capsys, "score", "--bench", "chair", "--chair-mode", "original", "--coco-annotations",
                     str(coco / "annotations"), "--captions", str(captions), "--out", str(tmp_path / "s"),
                     "--n-boot", "50")
    assert code == 0, out.err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    row = summary["methods"]["chair_eval_layers_2-32_tokens_512"]["splits"]["val"]
    assert row["chair_s"] == pytest.approx(2 / 3) and row["chair_i"] == pytest.approx(2 / 6)
    assert row["recall"] == pytest.approx(1.0)
    assert summary["settings"]["chair_mode"] == "original" and summary["settings"]["singularizer"] == "pattern"
    recs = [json.loads(x) for x in (tmp_path / "s" / "chair_eval_layers_2-32_tokens_512" / "samples.jsonl")
            .read_text().splitlines()]
    assert [(r["image_id"], r["mentioned"], r["hallucinated"]) for r in recs] == [
        (0, ["dog", "cup", "dog"], ["cup"]), (1, ["cup", "dining table"], ["dining table"]), (2, ["car"], [])]
    assert "CHAIR in `original` mode" in out.out


def test_two_files_in_one_folder_are_compared(coco, tmp_path):
    base = _jsonl(tmp_path / "base.jsonl", [{"image_id": r["image_id"], "caption": "A dog."} for r in PAINT_CHAIR])
    paint = _jsonl(tmp_path / "paint.jsonl", PAINT_CHAIR)
    kw = dict(out_dir=tmp_path / "s", coco_annotations=str(coco / "annotations"), n_boot=50)
    score_outputs("chair", base, name="none", **kw)
    summary = score_outputs("chair", paint, **kw)
    assert list(summary["methods"]) == ["none", "paint"] and summary["baseline"] == "none"
    assert "vs_baseline" in summary["methods"]["paint"]["splits"]["val"]
    other = _jsonl(tmp_path / "other.jsonl", PAINT_CHAIR[:2])  # other samples: not comparable
    with pytest.raises(InputError, match="different scoring run"):
        score_outputs("chair", other, **kw)
    changed = _jsonl(tmp_path / "paint2.jsonl", PAINT_CHAIR[::-1])
    with pytest.raises(InputError, match="different scored file for 'paint'"):
        score_outputs("chair", changed, name="paint", **kw)


def test_json_list_with_custom_keys_and_lvlm_fix_mode(coco, tmp_path):
    rows = [{"img": r["image_id"], "out": r["caption"]} for r in PAINT_CHAIR]
    path = tmp_path / "opera_style.json"
    path.write_text(json.dumps(rows))
    summary = score_outputs("chair", path, out_dir=tmp_path / "s", id_key="img", text_key="out",
                            coco_annotations=str(coco / "annotations"), chair_mode="lvlm-fix", n_boot=20)
    row = summary["methods"]["opera_style"]["splits"]["val"]
    assert row["n_mentions"] == 7  # lvlm-fix mode keeps 'bus' (hallucinated on image 2)
    assert row["n_hallucinated"] == 3
    assert summary["settings"]["chair_mode"] == "lvlm-fix"


def test_pope_answers_with_their_own_labels_paint_format(tmp_path):
    rows = [{"query": "Is there a dog in the image?", "label": 1, "ans": "Yes, there is a dog."},
            {"query": "Is there a car in the image?", "label": 0, "ans": "No, there is no car."},
            {"query": "Is there a cat in the image?", "label": 0, "ans": "Yes, there is a cat."},
            {"query": "Is there a cup in the image?", "label": 1, "ans": "No"}]
    path = _jsonl(tmp_path / "pope_eval_random.jsonl", rows)
    summary = score_outputs("pope", path, out_dir=tmp_path / "s", split="random", n_boot=20)
    row = summary["methods"]["pope_eval_random"]["splits"]["random"]
    assert (row["tp"], row["tn"], row["fp"], row["fn"]) == (1, 1, 1, 1) and row["accuracy"] == 0.5
    assert summary["settings"]["prompt_preset"].startswith("unknown")


def test_pope_answers_paired_with_question_files(coco, tmp_path):
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question_id": q, "text": "Yes" if q % 2 == 0 else "No"}
                                                  for q in range(8)])
    summary = score_outputs("pope", answers, out_dir=tmp_path / "s", split="random", pope_questions=str(coco),
                            image_dir=str(coco / "images"), n_boot=20)
    assert summary["methods"]["answers"]["splits"]["random"]["accuracy"] == 1.0
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question_id": 99, "text": "Yes"}])
    with pytest.raises(InputError, match="question 99"):
        score_outputs("pope", bad, out_dir=tmp_path / "t", split="random", pope_questions=str(coco),
                      image_dir=str(coco / "images"))


def test_score_errors_are_one_line(capsys, coco, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"image": 1, "caption": "A dog."}])
    line = cli_error(capsys, "score", "--bench", "chair", "--coco-annotations", str(coco / "annotations"),
                     "--captions", str(path), "--out", str(tmp_path / "s"))
    assert "no image id key 'image_id'" in line and "--id-key" in line
    unknown = _jsonl(tmp_path / "u.jsonl", [{"image_id": 12345, "caption": "A dog."}])
    assert "image_id 12345 is not in the COCO annotations" in cli_error(
        capsys, "score", "--bench", "chair", "--coco-annotations", str(coco / "annotations"), "--captions",
        str(unknown), "--out", str(tmp_path / "s2"))
