"""The lmms-eval model ``lvlm_fix``: the real ``python -m lmms_eval`` on a local POPE task, and the
model's contract (arguments, batching, stop strings, log-likelihood, multi-round) in process.

The CLI runs use a local copy of the synthetic POPE in the lmms-lab/POPE schema (12 questions) and
the embedded testbed, offline. lmms-eval is an optional extra: without it these tests are skipped,
except under CI (``CI=true``), whose set-up installs it, where its absence is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI", "").lower() not in ("1", "true"):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (README: lmms-eval)")

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

import lvlm_fix  # noqa: E402
from lvlm_fix.errors import ConfigError, InputError, UnknownNameError  # noqa: E402
from lvlm_fix.integrations.lmms_eval import LvlmFixLMMS, method_spec  # noqa: E402
from lvlm_fix.interventions import format_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "lvlm_fix" / "integrations" / "lmms_tasks"  # pope_local, shipped: reads ./pope_local_data
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # lmms-eval's POPE post_prompt
METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
N_PER_SPLIT = 4


@pytest.fixture(scope="module")
def pope_rows(tmp_path_factory):
    """12 synthetic POPE questions (4 per split, one image) in the lmms-lab/POPE schema."""
    from lvlm_fix.testbed.benchmark import POPE_SPLITS, write_benchmark

    bench = write_benchmark(tmp_path_factory.mktemp("bench"), n_images=1)
    rows = []
    for split in POPE_SPLITS:
        questions = [json.loads(line) for line in bench.pope_file(split).read_text().splitlines()][:N_PER_SPLIT]
        for q in questions:
            rows.append({"question_id": f"{split}-{q['question_id']}", "question": q["text"], "answer": q["label"],
                         "image": Image.open(bench.images_dir / q["image"]).convert("RGB"), "category": split,
                         "image_source": Path(q["image"]).stem})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pope_rows):
    """A working directory holding ``pope_local_data``: the rows saved as a DatasetDict, split "test"."""
    import datasets

    root = tmp_path_factory.mktemp("lmms")
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string"), "image_source": datasets.Value("string")})
    table = datasets.Dataset.from_list(pope_rows, features=features)
    datasets.DatasetDict({"test": table}).save_to_disk(str(root / "pope_local_data"))
    return root


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load(None, dtype="float32")


CLI_METHODS = ("none", "vhr")
# VHR at alpha 8: the testbed is confident on these 12 questions, and the default alpha 2 changes none
# of its answers; at 8, 7 of 12 change, so the test sees that the method reached the model.
CLI_SPECS = {"none": "none", "vhr": "vhr:alpha=8"}


@pytest.fixture(scope="module")
def cli_runs(workdir):
    """``python -m lmms_eval`` on pope_local, baseline and VHR side by side (two processes, one thread each):
    per method, its results JSON, logged samples, report file and model_args."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    procs = {}
    for method in CLI_METHODS:
        extra = ",alpha=8" if method == "vhr" else ""
        model_args = f"method={method}{extra},report={workdir / f'report-{method}.jsonl'}"
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "lvlm_fix", "--model_args", model_args,
               "--tasks", "pope_local", "--include_path", str(TASKS), "--batch_size", "4", "--device", "cpu",
               "--output_path", str(workdir / method), "--log_samples"]
        procs[method] = (model_args, subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True))
    runs = {}
    for method, (model_args, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        # lmms-eval exits 0 even when the evaluation failed: the results file is the evidence.
        results = sorted((workdir / method).rglob("*_results.json"))
        samples = sorted((workdir / method).rglob("*_samples_pope_local.jsonl"))
        assert proc.returncode == 0 and results and samples, log[-8000:]
        runs[method] = {"results": json.loads(results[0].read_text()), "model_args": model_args,
                        "samples": [json.loads(line) for line in samples[0].read_text().splitlines()],
                        "report": [json.loads(line) for line in (workdir / f"report-{method}.jsonl").open()],
                        "log": log}
    return runs


@pytest.mark.parametrize("method", CLI_METHODS)
def test_cli_runs_pope_local_with_a_method(cli_runs, pope_rows, testbed, method):
    run = cli_runs[method]
    results, samples, lines = run["results"], run["samples"], run["report"]

    scores = results["results"]["pope_local"]
    assert all(0.0 <= scores[f"{m},none"] <= 1.0 for m in METRICS), scores
    assert results["n-samples"]["pope_local"] == {"original": 12, "effective": 12}
    assert results["config"]["model_args"] == run["model_args"]
    # The printed output names the method with every parameter it ran with, defaults included.
    resolved = format_spec(list((method_spec(method, {"alpha": "8"} if method == "vhr" else {})
                                 or {}).items()))
    assert f"lvlm_fix: {testbed.name}, method {resolved}\n" in run["log"]
    if method == "vhr":
        assert "alpha=8" in resolved and "layers=" in resolved  # a default (the layers) is there too
    # Every answer is what lvlm_fix.generate gives for the same prompt and method.
    by_doc = {s["doc_id"]: s for s in samples}
    assert sorted(by_doc) == list(range(12))
    expected = lvlm_fix.generate(testbed, [r["image"] for r in pope_rows], [r["question"] + POPE_SUFFIX for r in pope_rows],
                                 method=CLI_SPECS[method], max_new_tokens=128).texts
    assert [by_doc[i]["filtered_resps"] for i in range(12)] == expected
    assert [by_doc[i]["target"] for i in range(12)] == [r["answer"] for r in pope_rows]
    # The report file: one line per batch of 4, every document once, VHR's heads when VHR ran.
    assert sorted(d for line in lines for d in line["doc_ids"]) == list(range(12))
    assert all(line["method"].split(":")[0] == method and len(line["doc_ids"]) == 4 for line in lines)
    if method == "vhr":
        assert all(len(line["report"]["vhr"]["selected_heads"]["1"]) == 4 for line in lines)
    else:
        assert all(line["report"] == {} for line in lines)


def test_the_method_changes_lmms_eval_answers(cli_runs):
    """Baseline and VHR (alpha 8) differ on these 12 questions (else the method would not have reached the model)."""
    answers = {m: [s["filtered_resps"] for s in sorted(cli_runs[m]["samples"], key=lambda s: s["doc_id"])]
               for m in CLI_METHODS}
    assert answers["none"] != answers["vhr"]


# -- the model in process ---------------------------------------------------------------------------------
def test_model_args_become_one_checked_method_setting():
    assert method_spec("none", {}) is None
    assert method_spec("vhr", {"alpha": 3})["vhr"]["alpha"] == 3.0
    spec = method_spec("vhr+var", {"vhr.layers": 1, "var.layers": "[2,3]", "tau": 3.5})
    assert spec["vhr"]["layers"] == (1,) and spec["var"]["layers"] == (2, 3) and spec["var"]["tau"] == 3.5
    assert method_spec('"vhr:layers=1+var:tau=3.5"', {}) == method_spec("vhr+var", {"vhr.layers": 1, "tau": 3.5})
    unknown = r"'alpah' is neither an argument of the lvlm_fix model .*'vhr' \(alpha.*did you mean 'alpha'\?"
    with pytest.raises(ConfigError, match=unknown):
        method_spec("vhr", {"alpah": 2})
    with pytest.raises(ConfigError, match="'alpha' is neither .* method 'none'"):
        method_spec("none", {"alpha": 2})
    with pytest.raises(ConfigError, match="'layers' is taken by both"):
        method_spec("vhr+var", {"layers": 1})
    with pytest.raises(ConfigError, match="'bogus' is not a parameter of var"):
        method_spec("vhr+var", {"var.bogus": 1})
    with pytest.raises(ConfigError, match="alpha"):
        method_spec("vhr", {"alpha": -1.0})
    with pytest.raises(UnknownNameError, match="Did you mean 'vhr'"):
        method_spec("VHR", {})


def test_bad_model_args_are_refused_before_loading(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(lvlm_fix, "load", no_load)
    with pytest.raises(ConfigError, match="--batch_size 'auto'"):
        LvlmFixLMMS.create_from_arg_string("method=vhr", {"batch_size": "auto"})
    with pytest.raises(ConfigError, match="'alph' is neither"):
        LvlmFixLMMS.create_from_arg_string("method=vhr,alph=2", {"batch_size": "4"})


def test_model_args_reach_load_and_generation(monkeypatch, tmp_path, testbed):
    seen = {}

    def fake_load(name, **kwargs):
        seen.update(name=name, **kwargs)
        return testbed

    monkeypatch.setattr(lvlm_fix, "load", fake_load)
    (tmp_path / "system.txt").write_text("Answer briefly.\n")
    args = (f'pretrained=/models/llava,dtype=bfloat16,device_map=\'{{"": "cpu"}}\',revision=main,'
            f'system_prompt={tmp_path / "system.txt"},method="vhr:alpha=1.5"')
    lm = LvlmFixLMMS.create_from_arg_string(args, {"batch_size": "8", "max_batch_size": None, "device": "cpu"})
    assert seen == {"name": "/models/llava", "dtype": "bfloat16", "device": "cpu", "device_map": {"": "cpu"},
                    "revision": "main", "trust_remote_code": False}
    assert lm.batch_size == 8 and lm.system_prompt == "Answer briefly." and lm.spec["vhr"]["alpha"] == 1.5
    assert lm.device == testbed.device  # where lmms-eval's evaluator puts its gather tensors
    LvlmFixLMMS.create_from_arg_string("", {"batch_size": 1})
    assert seen["name"] is None  # no pretrained: the embedded testbed


@pytest.fixture(scope="module")
def model(testbed, pope_rows, monkeypatch_module):
    """The model built as lmms-eval builds it (batch size 2), on a task dict of the 12 rows."""
    monkeypatch_module.setattr(lvlm_fix, "load", lambda *a, **k: testbed)
    lm = LvlmFixLMMS.create_from_arg_string("method=vhr,alpha=2", {"batch_size": "2", "device": None})
    lm.task_dict["t"] = {"test": pope_rows}
    return lm


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def make_request(kind: str, args: tuple) -> Instance:
    """An lmms-eval request as the evaluator builds it (``args[-3:]`` is doc_id, task, split)."""
    return Instance(kind, args, idx=0, metadata={"task": args[-2], "doc_id": args[-3], "repeats": 1})


def visual(doc):
    return [doc["image"]]


def test_generate_until_batches_by_generation_args_and_keeps_request_order(model, testbed, pope_rows):
    greedy = {"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "do_sample": False, "until": ["\n\n"]}
    cut = {**greedy, "until": ["es"]}  # "Yes" -> "Y"
    kwargs = [greedy, cut, greedy, greedy, cut, greedy, cut]
    requests = [make_request("generate_until", (pope_rows[i]["question"], kw, visual, i, "t", "test"))
                for i, kw in enumerate(kwargs)]
    got = model.generate_until(requests)

    expected = lvlm_fix.generate(testbed, [r["image"] for r in pope_rows[:7]], [r["question"] for r in pope_rows[:7]],
                                 method="vhr", max_new_tokens=8).texts
    want = [t.split("es", 1)[0].strip() if kw is cut else t for t, kw in zip(expected, kwargs)]
    assert got == want and "Y" in got  # in order, each cut at its own stop strings


def test_generation_args_map_to_generate(model):
    gen, stops = model._generation({"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "until": "\n"})
    assert gen == {"max_new_tokens": 5, "do_sample": True, "num_beams": 1, "top_p": 0.9, "temperature": 0.7}
    assert stops == ["\n"]
    gen, _ = model._generation({"temperature": 0, "top_p": 1.0, "num_beams": 3})
    assert gen == {"max_new_tokens": 1024, "do_sample": False, "num_beams": 3}
    with pytest.raises(ConfigError, match=r"bogus_arg=1 of the task is not a generate\(\) argument"):
        model._generation({"bogus_arg": 1})


def test_a_document_without_image_is_refused(model):
    no_image = make_request("generate_until", ("Hi", {"max_new_tokens": 2}, lambda doc: [], 0, "t", "test"))
    with pytest.raises(InputError, match="task 't' gave no image for document 0"):
        model.generate_until([no_image])


def test_loglikelihood_is_a_teacher_forced_forward_with_the_method(model, testbed, pope_rows):
    doc = pope_rows[0]
    answer = lvlm_fix.generate(testbed, [doc["image"]], [doc["question"]], method="vhr", max_new_tokens=1).texts[0]
    other = "No" if answer == "Yes" else "Yes"
    requests = [make_request("loglikelihood", (doc["question"], target, visual, 0, "t", "test"))
                for target in (answer, other, lambda d: d["answer"])]
    (lp_greedy, is_greedy), (lp_other, other_greedy), (lp_label, _) = model.loglikelihood(requests)
    assert is_greedy and not other_greedy and lp_greedy > lp_other and lp_greedy <= 0.0
    (lp_label_text, _), = model.loglikelihood([make_request("loglikelihood", (doc["question"], doc["answer"], visual, 0,
                                                                          "t", "test"))])
    assert lp_label == lp_label_text < 0  # doc_to_target as a function of the document
    # The method acts on the forward: the same request scores differently without it.
    model.spec, spec = None, model.spec
    try:
        (lp_plain, _), = model.loglikelihood(requests[:1])
    finally:
        model.spec = spec
    assert lp_plain != pytest.approx(lp_greedy, abs=1e-6)
    # Same number as scoring by hand: log-softmax of the next-token logits at the answer position.
    with lvlm_fix.apply(testbed, "vhr"), torch.inference_mode():
        batch = testbed.encode([doc["image"]], [doc["question"]])
        logits = testbed.model(**batch).logits[0, -1].float().log_softmax(-1)
    (token,) = testbed.tokenizer(answer, add_special_tokens=False)["input_ids"]  # one token on the testbed
    assert lp_greedy == pytest.approx(float(logits[token]), abs=1e-4)


def test_loglikelihood_refuses_a_method_that_runs_generate_itself(model):
    model.spec, spec = method_spec("carve", {}), model.spec
    try:
        with pytest.raises(ConfigError, match="method 'carve' rewrites the input and runs generate"):
            model.loglikelihood([make_request("loglikelihood", ("q", "a", visual, 0, "t", "test"))])
    finally:
        model.spec = spec


def test_multi_round_asks_the_task_for_each_round(model, pope_rows):
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((round_idx, list(previous_output), previous_round_info))
        done = round_idx == 2
        return [doc["image"]], "Is there a dog in the image?", done, previous_output, {"round": round_idx}

    multi = make_request("generate_until_multi_round",
                         (pope_rows[0]["question"], {"max_new_tokens": 4}, visual, doc_to_text, 0, "t", "test"))
    (rounds,) = model.generate_until_multi_round([multi])
    assert len(rounds) == 2 and all(isinstance(r, str) and r for r in rounds)
    assert [c[0] for c in calls] == [1, 2] and calls[1][1] == rounds and calls[1][2] == {"round": 1}


def test_importing_lvlm_fix_does_not_import_lmms_eval():
    code = ("import sys, lvlm_fix, lvlm_fix.api, lvlm_fix.cli.main, lvlm_fix.evals.runner, lvlm_fix.integrations; "
            "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
