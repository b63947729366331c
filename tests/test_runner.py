"""The eval runner end to end on a tiny model, resume after a crash, and bad inputs."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error
from lvlm_fix.evals import runner
from lvlm_fix.evals.runner import DataSpec, evaluate

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


def test_bad_eval_inputs_are_one_line_errors(capsys, coco, tiny_dirs, tmp_path):
    model = str(tiny_dirs("llava"))
    empty = tmp_path / "ann"
    empty.mkdir()
    assert "instances_val2014.json" in cli_error(capsys, "eval", "--model", model, "--bench", "chair",
                                            "--coco-annotations", str(empty), "--image-dir", str(coco / "images"))
    few = tmp_path / "few"
    few.mkdir()
    (few / "COCO_val2014_000000000000.jpg").write_bytes((coco / "images" / "COCO_val2014_000000000000.jpg").read_bytes())
    assert "COCO_val2014_000000000001.jpg" in cli_error(capsys, "eval", "--model", model, "--split", "random",
                                                   "--pope-questions", str(coco), "--image-dir", str(few))
    assert "'randm'" in cli_error(capsys, "eval", "--model", model, "--split", "randm")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "coco_pope_random.json").write_text("")
    assert "no questions" in cli_error(capsys, "eval", "--model", model, "--split", "random",
                                  "--pope-questions", str(tmp_path / "q"), "--image-dir", str(coco / "images"))
    assert "--limit 0" in cli_error(capsys, "eval", "--model", model, "--limit", "0")


def test_two_processes_shard_the_samples_and_merge(tiny_dirs, coco, tmp_path):
    """torchrun with 2 CPU workers: each takes every other sample; the main process merges."""
    import os
    import subprocess
    import sys

    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lvlm_fix.cli", "eval",
           "--model", str(tiny_dirs("llava")), "--split", "random", "--pope-questions", str(coco),
           "--image-dir", str(coco / "images"), "--batch-size", "2", "--max-new-tokens", "2", "--n-boot", "20",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [json.loads(x)["id"] for x in (out / "none" / "samples.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"random/{i}" for i in range(8)) and len(ids) == len(set(ids))
    assert not list((out / "none").glob("samples.rank*.jsonl"))
    assert proc.stdout.count("| none | random |") == 1  # only the main process reports
