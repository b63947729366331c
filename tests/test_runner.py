"""The eval runner end to end on a tiny model, resume after a crash or a damaged file, the folder
lock, and bad inputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from conftest import cli_error
from lvlm_fix.errors import LvlmFixWarning, RunFolderBusyError
from lvlm_fix.evals import runner
from lvlm_fix.evals.pope import VICUNA_SYSTEM_PROMPT
from lvlm_fix.evals.runner import evaluate


def _pope(coco, **kw):
    return dict(bench="pope", pope_questions=str(coco), image_dir=str(coco / "images"), batch_size=3,
                max_new_tokens=3, n_boot=100, progress=False, **kw)


def _counting(monkeypatch):
    """Count generated samples (the runner's only call into the method kit)."""
    real, calls = runner.MethodSeam.generate, []

    def counted(self, lvlm, images, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(self, lvlm, images, prompts, *args, **kwargs)

    monkeypatch.setattr(runner.MethodSeam, "generate", counted)
    return calls


def test_pope_end_to_end_writes_summary_and_table(tiny, coco, tmp_path):
    lvlm = tiny("llava")
    summary = evaluate(lvlm, split="random", methods=["none"], out_dir=tmp_path / "r", **_pope(coco))
    assert set(summary["methods"]) == {"none"}
    row = summary["methods"]["none"]["splits"]["random"]
    assert row["n"] == 8 and row["tp"] + row["fp"] + row["tn"] + row["fn"] == 8
    assert row["ci"]["accuracy"]["low"] <= row["accuracy"] <= row["ci"]["accuracy"]["high"]
    prov = json.loads((tmp_path / "r" / "summary.json").read_text())["provenance"]
    assert prov["dataset"]["sha256"].startswith("sha256:") and prov["versions"]["transformers"].startswith("5.")
    split = prov["splits"]["random"]
    assert split["generation"]["max_new_tokens"] == 3 and "Is there a" in split["prompt_example"]
    assert summary["settings"]["prompt_preset"] == "raw" and summary["settings"]["pope_parser"] == "llava"
    table = (tmp_path / "r" / "results.md").read_text()
    assert "| none | random |" in table and "| precision | recall |" in table
    assert "preset `raw` and parser `llava`" in table and "compare these numbers only with" in table


def test_pope_preset_sets_prompt_system_turn_and_parser(tiny, coco, tmp_path):
    summary = evaluate(tiny("llava"), split="random", out_dir=tmp_path / "r", **_pope(coco, prompt_preset="llava",
                                                                                     pope_parser="opera"))
    split = summary["provenance"]["splits"]["random"]
    assert split["template"].endswith("\nAnswer the question using a single word or phrase.")
    assert split["system_prompt"] == VICUNA_SYSTEM_PROMPT and VICUNA_SYSTEM_PROMPT in split["prompt_example"]
    row = summary["methods"]["none"]["splits"]["random"]
    assert row["parser"] == "opera" and 0 <= row["n_unparseable_llava"] <= row["n"]
    assert "The preset's own parser is `llava`" in (tmp_path / "r" / "results.md").read_text()


def test_stop_strings_cut_the_answer():
    assert runner._cut("Yes\n\nBecause the dog is there.", ["\n\n"]) == "Yes"
    assert runner._cut(" No ", []) == " No "


@pytest.mark.filterwarnings("ignore:CHAIR_I is undefined")  # a random tiny model names no object
def test_chair_end_to_end(tiny, coco, tmp_path):
    lvlm = tiny("qwen2_vl")
    summary = evaluate(lvlm, bench="chair", methods=["none"], limit=3, batch_size=2, max_new_tokens=4,
                       coco_annotations=str(coco / "annotations"), image_dir=str(coco / "images"),
                       out_dir=tmp_path / "c", n_boot=50, progress=False)
    row = summary["methods"]["none"]["splits"]["val"]
    assert row["n"] == 3 and 0 <= row["chair_i"] <= 1
    assert summary["settings"]["chair_mode"] == "opera" and summary["settings"]["singularizer"] == "wordnet"
    assert len(summary["settings"]["synonyms_sha256"]) == 64
    assert len(summary["provenance"]["dataset"]["image_ids"]) == 3
    rec = json.loads((tmp_path / "c" / "none" / "samples.jsonl").read_text().splitlines()[0])
    assert {"image_id", "caption", "mentioned", "hallucinated", "words", "gt"} <= set(rec)


def test_a_killed_run_resumes_to_the_same_results(tiny, coco, tmp_path, monkeypatch):
    lvlm = tiny("llava")
    full = evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "full", **_pope(coco))

    real, calls = runner.MethodSeam.generate, {"n": 0}

    def dies_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner.MethodSeam, "generate", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "resumed", **_pope(coco))
    partial = (tmp_path / "resumed" / "none" / "samples.jsonl").read_text().splitlines()
    assert len(partial) == 6
    with open(tmp_path / "resumed" / "none" / "samples.jsonl", "a") as f:
        f.write('{"id": "random/3", "ans')  # a write torn by the kill
    monkeypatch.setattr(runner.MethodSeam, "generate", real)
    with pytest.warns(LvlmFixWarning, match="set aside 1"):
        resumed = evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "resumed", **_pope(coco))

    lines = (tmp_path / "resumed" / "none" / "samples.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert len(ids) == len(set(ids)) == 24
    full_lines = (tmp_path / "full" / "none" / "samples.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted(full_lines)
    assert resumed["methods"] == full["methods"]


def test_damaged_lines_in_the_middle_cost_only_their_samples(tiny, coco, tmp_path, monkeypatch):
    """A torn line in the middle and a `{}` line: every valid record stays, only the torn one is redone."""
    lvlm = tiny("llava")
    evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "r", **_pope(coco))
    path = tmp_path / "r" / "none" / "samples.jsonl"
    lines = path.read_text().splitlines()
    torn_id = json.loads(lines[2])["id"]
    damaged = lines[:2] + [lines[2][:25], "{}"] + lines[3:]
    path.write_text("\n".join(damaged) + "\n")
    calls = _counting(monkeypatch)
    with pytest.warns(LvlmFixWarning, match="set aside 2"):
        evaluate(lvlm, split="all", methods=["none"], out_dir=tmp_path / "r", **_pope(coco))
    assert sum(calls) == 1  # 23 of 24 records kept
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(after) == len({r["id"] for r in after}) == 24 and after[-1]["id"] == torn_id
    assert [r["id"] for r in after[:23]] == [json.loads(x)["id"] for x in lines if json.loads(x)["id"] != torn_id]
    assert (tmp_path / "r" / "none" / "samples.jsonl.dropped").read_text().splitlines() == [lines[2][:25], "{}"]


def test_a_second_run_into_the_same_folder_is_refused(tiny, coco, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    parent = os.getppid()  # a live process on this host that is not us
    (out / ".lock").write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "since": "earlier"}))
    with pytest.raises(RunFolderBusyError, match=f"in use by process {parent}"):
        evaluate(tiny("llava"), split="random", out_dir=out, **_pope(coco))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny, coco, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    with pytest.warns(LvlmFixWarning, match="stale lock"):
        evaluate(tiny("llava"), split="random", out_dir=out, **_pope(coco))
    assert (out / "summary.json").is_file() and not (out / ".lock").exists()


def test_resuming_with_fewer_methods_keeps_the_others_in_the_summary(tiny, coco, tmp_path, monkeypatch):
    lvlm = tiny("llava")
    kw = _pope(coco, method_params={"act": {"thres": 0.0}})
    evaluate(lvlm, split="random", methods=["none", "act"], out_dir=tmp_path / "r", **kw)
    calls = _counting(monkeypatch)
    summary = evaluate(lvlm, split="random", methods=["act"], out_dir=tmp_path / "r", **kw)
    assert calls == []  # everything was there
    assert list(summary["methods"]) == ["none", "act"] and summary["baseline"] == "none"
    assert "vs_baseline" in summary["methods"]["act"]["splits"]["random"]
    table = (tmp_path / "r" / "results.md").read_text()
    assert "| none | random |" in table and "| act | random |" in table


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


@pytest.mark.parametrize(("args", "needle"), [
    (["--methods", ""], "--methods '' names no method"),
    (["--methods", " , "], "names no method"),
    (["--prompt-template", "{question} {oops}"], "unknown field {oops}"),
    (["--bench", "chair", "--split", "adversarial"], "--bench chair takes no --split (got 'adversarial')"),
    (["--bench", "pope", "--chair-mode", "original"], "--chair-mode is not an option of --bench pope"),
    (["--bench", "chair", "--chair-mode", "original", "--chair-tagger", "noun"], "applies to --chair-mode opera only"),
    (["--bench", "chair", "--chair-mode", "lvlm-fix", "--chair-singularizer", "pattern"], "original only"),
    (["--bench", "chair", "--coco-annotations", "x"], "both --coco-annotations DIR and --image-dir DIR"),
    (["--pope-questions", "x"], "--image-dir is required with --pope-questions"),
])
def test_bad_flags_fail_before_any_work(capsys, tmp_path, args, needle):
    out = tmp_path / "never"
    assert needle in cli_error(capsys, "eval", *args, "--out", str(out))
    assert not out.exists()


def test_busy_folder_is_a_one_line_error(capsys, coco, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    line = cli_error(capsys, "eval", "--split", "random", "--pope-questions", str(coco), "--image-dir",
                     str(coco / "images"), "--out", str(out))
    assert "is in use by process" in line and str(out / ".lock") in line


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


def test_a_setting_with_a_path_in_a_value_gets_one_folder_under_the_run(tmp_path):
    from lvlm_fix.evals.runner import setting_folder

    folder = setting_folder(tmp_path, "vti:directions_file=/data/cal/vti.pt")
    assert folder.parent == tmp_path and folder.name == "vti,directions_file=_data_cal_vti.pt"
    assert setting_folder(tmp_path, "act:heads_file=C:\\h.json").parent == tmp_path
    long = setting_folder(tmp_path, "vti:directions_file=/" + "x" * 400 + ".pt")
    assert long.parent == tmp_path and len(long.name.encode()) <= 200
    assert long != setting_folder(tmp_path, "vti:directions_file=/" + "x" * 401 + ".pt")
    assert setting_folder(tmp_path, "var:tau=3.5").name == "var,tau=3.5"  # folders of earlier runs keep their names
