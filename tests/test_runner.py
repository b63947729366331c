"""The eval runner end to end on a tiny model, resume after a crash, and bad inputs."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from lvlm_fix.cli.main import main
from lvlm_fix.evals import runner
from lvlm_fix.evals.runner import DataSpec, evaluate

OBJECTS = {1: "dog", 2: "cup", 3: "car"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A 4-image COCO-format fixture: drawn images, POPE question files, instances and captions."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    images, anns, caps, questions = [], [], [], {"random": [], "popular": [], "adversarial": []}
    for i in range(4):
        name = f"COCO_val2014_{i:012d}.jpg"
        im = Image.new("RGB", (64, 64), (30 * i, 80, 120))
        ImageDraw.Draw(im).ellipse((10 + 5 * i, 10, 40, 40), fill=(250, 200, 0))
        im.save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 64, "height": 64})
        present = [1 + i % 3]
        anns += [{"id": 10 * i + c, "image_id": i, "category_id": c, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}
                 for c in present]
        caps += [{"id": 100 + i, "image_id": i, "caption": f"a photo with a {OBJECTS[present[0]]} ."}]
        for split in questions:
            absent = [c for c in OBJECTS if c not in present][0 if split != "adversarial" else 1]
            questions[split] += [
                {"question_id": 2 * i, "image": name, "text": f"Is there a {OBJECTS[present[0]]} in the image?", "label": "yes"},
                {"question_id": 2 * i + 1, "image": name, "text": f"Is there a {OBJECTS[absent]} in the image?", "label": "no"},
            ]
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in OBJECTS.items()]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    for split, rows in questions.items():
        (root / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _pope(coco, **kw):
    return dict(bench="pope", data=DataSpec(pope_questions=str(coco), image_dir=str(coco / "images")),
                batch_size=3, max_new_tokens=3, n_boot=100, progress=False, **kw)


def test_pope_end_to_end_writes_summary_and_table(tiny, coco, tmp_path):
    lvlm = tiny("llava")
    summary = evaluate(lvlm, split="random", methods=["none", "none"], out_dir=tmp_path / "r", **_pope(coco))
    assert set(summary["methods"]) == {"none"}
    row = summary["methods"]["none"]["splits"]["random"]
    assert row["n"] == 8 and row["tp"] + row["fp"] + row["tn"] + row["fn"] == 8
    assert row["ci"]["accuracy"]["low"] <= row["accuracy"] <= row["ci"]["accuracy"]["high"]
    prov = json.loads((tmp_path / "r" / "summary.json").read_text())["provenance"]
    assert prov["dataset"]["sha256"].startswith("sha256:") and prov["versions"]["transformers"].startswith("5.")
    assert prov["generation"]["max_new_tokens"] == 3 and "Is there a" in prov["prompt_example"]
    assert "| none | random |" in (tmp_path / "r" / "results.md").read_text()


def test_chair_end_to_end(tiny, coco, tmp_path):
    lvlm = tiny("qwen2_vl")
    summary = evaluate(lvlm, bench="chair", split="all", methods=["none"], limit=3, batch_size=2, max_new_tokens=4,
                       data=DataSpec(coco_annotations=str(coco / "annotations"), image_dir=str(coco / "images")),
                       out_dir=tmp_path / "c", n_boot=50, progress=False)
    row = summary["methods"]["none"]
    assert row["n"] == 3 and 0 <= row["chair_i"] <= 1 and row["singularizer"].startswith("inflect")
    assert len(summary["provenance"]["dataset"]["image_ids"]) == 3


def test_a_killed_run_resumes_to_the_same_results(tiny, coco, tmp_path, monkeypatch):
    lvlm = tiny("llava")
    full = evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "full", **_pope(coco))

    real, calls = runner._generate_batch, {"n": 0}

    def dies_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_generate_batch", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "resumed", **_pope(coco))
    partial = (tmp_path / "resumed" / "none" / "samples.jsonl").read_text().splitlines()
    assert len(partial) == 6
    with open(tmp_path / "resumed" / "none" / "samples.jsonl", "a") as f:
        f.write('{"id": "random/3", "ans')  # a write torn by the kill
    monkeypatch.setattr(runner, "_generate_batch", real)
    resumed = evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "resumed", **_pope(coco))

    lines = (tmp_path / "resumed" / "none" / "samples.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert len(ids) == len(set(ids)) == 24
    full_lines = (tmp_path / "full" / "none" / "samples.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted(full_lines)
    assert resumed["methods"] == full["methods"]


def test_a_run_folder_with_other_settings_is_refused(tiny, coco, tmp_path):
    from lvlm_fix.errors import InputError

    lvlm = tiny("llava")
    evaluate(lvlm, split="random", methods=["none"], out_dir=tmp_path / "r", **_pope(coco))
    before = (tmp_path / "r" / "none" / "samples.jsonl").read_text()
    with pytest.raises(InputError, match="different run"):
        evaluate(lvlm, split="random", methods=["none"], out_dir=tmp_path / "r", **{**_pope(coco), "max_new_tokens": 5})
    assert (tmp_path / "r" / "none" / "samples.jsonl").read_text() == before


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_eval_inputs_are_one_line_errors(capsys, coco, tiny_dirs, tmp_path):
    model = str(tiny_dirs("llava"))
    empty = tmp_path / "ann"
    empty.mkdir()
    assert "instances_val2014.json" in _cli(capsys, "eval", "--model", model, "--bench", "chair",
                                            "--coco-annotations", str(empty), "--image-dir", str(coco / "images"))
    few = tmp_path / "few"
    few.mkdir()
    (few / "COCO_val2014_000000000000.jpg").write_bytes((coco / "images" / "COCO_val2014_000000000000.jpg").read_bytes())
    assert "COCO_val2014_000000000001.jpg" in _cli(capsys, "eval", "--model", model, "--split", "random",
                                                   "--pope-questions", str(coco), "--image-dir", str(few))
    assert "'randm'" in _cli(capsys, "eval", "--model", model, "--split", "randm")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "coco_pope_random.json").write_text("")
    assert "no questions" in _cli(capsys, "eval", "--model", model, "--split", "random",
                                  "--pope-questions", str(tmp_path / "q"), "--image-dir", str(coco / "images"))
    assert "--limit 0" in _cli(capsys, "eval", "--model", model, "--limit", "0")
