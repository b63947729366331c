"""MVP: certainty and fusion on constructed probabilities, the whole pipeline on a scripted model
(yes/no and free-form, by hand), the release's rules and their fixes, per-row sampling and the
caption cache, composition through ``inner``, and the CLI (run --compare, eval)."""

from __future__ import annotations

import json

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, InputError
from lvlm_fix.interventions import Generation
from lvlm_fix.interventions.mvp import (
    ANSWER_TEMPLATE,
    MVP,
    VIEW_PROMPTS,
    MVPConfig,
    _run,
    certainty,
    first_yes_no,
    fuse,
    is_yes_no_question,
    normalize_answer,
    yes_no_token,
)
from lvlm_fix.testing.tiny import build_image

SHORT = dict(caption_max_new_tokens=3, path_max_new_tokens=3, top_k=1)  # fast: short texts, one path per view


# -- the math, by hand ------------------------------------------------------------------------------
def test_certainty_is_top1_minus_top2():
    p = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    assert torch.allclose(certainty(p), torch.tensor([0.2, 0.85]))


def test_fusion_weights_the_views():
    views = [{"yes": 0.6, "no": 0.1}, {"yes": 0.2, "no": 0.7}, {"yes": 0.5}]
    fused = fuse(views, [0.4, 0.4, 0.2])  # yes .24 + .08 + .10, no .04 + .28
    assert fused == pytest.approx({"yes": 0.42, "no": 0.32})


@pytest.mark.parametrize("text, word", [("Yes", "yes"), (" yes", "yes"), ("No.", "no"), (" no,", "no"),
                                        ("Not", None), ("Yesterday", None), ("YES!", "yes"), ("nope", None)])
def test_yes_no_tokens_any_case(text, word):
    # A decoded top-k token ("▁Yes" decodes to "Yes"); the release compared "Yes" / "No" exactly.
    assert yes_no_token(text) == word


@pytest.mark.parametrize("text, found", [
    ("Well, yes it is", ("yes", 6)), ("There is no dog", ("no", 9)), ("Yes, there is; no doubt", ("yes", 0)),
    ("Nothing here, not now", None), ("no. Yes.", ("no", 0)), ("It says NO", ("no", 8)),
])
def test_first_yes_no_word_in_text_order(text, found):
    # The release looks for "yes" anywhere before "no", and only whole space-separated words ("Yes," is missed).
    assert first_yes_no(text) == found


def test_question_kinds_and_answer_normalisation():
    assert is_yes_no_question("Is there a dog in the image?") and is_yes_no_question("does it rain")
    assert not is_yes_no_question("What colour is the car?") and not is_yes_no_question("Describe the image.")
    assert normalize_answer("  A   Red car. ") == "a red car"


@pytest.mark.parametrize("params, needle", [
    ({"top_k": 0}, "top_k=0 is out of range"), ({"w_normal": -1.0}, "w_normal"), ({"path_top_p": 0.0}, "path_top_p"),
    ({"answer": "multiple"}, "answer="), ({"threshold": float("inf")}, "not a finite number"),
])
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError, match=needle):
        MVPConfig(**params)


# -- the pipeline on a scripted model ------------------------------------------------------------------
class Scripted:
    """Stands in for ``inner``: per (prompt, words so far) a next-word distribution, decoded greedily through
    the pipeline's own logits processors, as generate() does. Unscripted prefixes end the text."""

    def __init__(self, lvlm, script):
        self.tok, self.script, self.calls = lvlm.tokenizer, script, []
        self.vocab = len(self.tok)

    def probs(self, prompt, words):
        spec = self.script.get((prompt, tuple(words)), {"</s>": 0.9})
        p = torch.full((self.vocab,), (1 - sum(spec.values())) / (self.vocab - len(spec)))
        for word, v in spec.items():
            p[self.tok.convert_tokens_to_ids(word)] = v
        return p

    def __call__(self, images, prompts, gen):
        self.calls.append(list(prompts))
        procs, rows = gen["logits_processor"], len(prompts)
        ids, words, done = torch.ones(rows, 3, dtype=torch.long), [[] for _ in prompts], [False] * rows
        for _ in range(gen["max_new_tokens"]):
            logits = torch.stack([self.probs(prompts[r], words[r]).log() for r in range(rows)])
            nxt = procs(ids, logits).argmax(-1)
            for r in range(rows):
                if not done[r]:
                    words[r].append(self.tok.convert_ids_to_tokens(int(nxt[r])))
                    done[r] = words[r][-1] == "</s>"
            ids = torch.cat([ids, nxt[:, None]], 1)
            if all(done):
                break
        texts = [" ".join(w for w in ws if w != "</s>") for ws in words]
        return Generation(texts=texts, report={"scripted": {"rows": rows}})


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load(None)


def _rest(script_entry, vocab):
    return (1 - sum(script_entry.values())) / (vocab - len(script_entry))


def test_yes_no_question_by_hand(testbed):
    q = "Is there a dog in the image?"
    normal = ANSWER_TEMPLATE.format(caption="a dog", question=q.lower())
    caption = VIEW_PROMPTS["normal"]
    script = {
        (caption, ()): {"a": 0.9}, (caption, ("a",)): {"dog": 0.9},  # the caption: "a dog"
        # normal view: Yes .5 and no .1 count at once; "there" (.3) starts a path, "there is no", whose
        # "no" is chosen from {no .6, a .3}: certainty .3.
        (normal, ()): {"Yes": 0.5, "there": 0.3, "no": 0.1},
        (normal, ("there",)): {"is": 0.8}, (normal, ("there", "is")): {"no": 0.6, "a": 0.3},
        # the question view (the question as asked): No .45, Yes .2; the path "dog" never says yes or no.
        (q, ()): {"No": 0.45, "Yes": 0.2, "dog": 0.3},
    }
    inner = Scripted(testbed, script)
    cfg = dict(w_bottom_up=0.0, w_top_down=0.0, w_normal=0.4, w_question=0.6, threshold=0.05, caption_temperature=0.0,
               path_temperature=0.0)
    image = build_image(0)
    out = MVP(MVPConfig(**cfg)).generate(testbed, [image], [q], {"max_new_tokens": 8}, inner)
    row = out.report["mvp"]["rows"][0]
    # S_normal: yes .5, no .1 + .3 * .3 = .19; S_question: no .45, yes .2 + .3 (unanswered -> Yes, the release's rule).
    assert row["views"]["normal"] == pytest.approx({"yes": 0.5, "no": 0.19})
    assert row["views"]["question"] == pytest.approx({"yes": 0.5, "no": 0.45})
    assert row["fused"] == pytest.approx({"yes": 0.4 * 0.5 + 0.6 * 0.5, "no": 0.4 * 0.19 + 0.6 * 0.45})
    assert out.texts == ["Yes"] and row["mode"] == "yes_no" and row["paths"] == 2
    assert out.artifacts["mvp"]["captions"] == [{"normal": "a dog"}]
    assert inner.calls[1] == [normal, q]  # the scoring prompts, (row, view) in view order
    cost = out.report["mvp"]["cost"]
    assert cost["captions"]["forward_passes"] == 3 and cost["captions"]["generated_tokens"] == 3  # a dog </s>
    assert cost["scoring"] == {"rows": 2, "forward_passes": 1, "prompt_tokens": 6, "generated_tokens": 2}
    assert cost["paths"]["rows"] == 2 and cost["paths"]["generated_tokens"] == 4 + 2  # there is no </s>; dog </s>
    assert cost["total"]["forward_passes"] == 3 + 1 + 4
    assert out.report["scripted"] == {"rows": 2}  # the composed methods' report, from the last inner call

    # A path that says neither adds nothing with unanswered=skip: yes .4 * .5 + .6 * .2 = .32 < no .346.
    skip = MVP(MVPConfig(**cfg, unanswered="skip")).generate(testbed, [image], [q], {"max_new_tokens": 8},
                                                            Scripted(testbed, script))
    assert skip.report["mvp"]["rows"][0]["fused"]["yes"] == pytest.approx(0.32) and skip.texts == ["No"]


def test_free_form_question_by_hand(testbed):
    q = "What is in the image?"
    normal = ANSWER_TEMPLATE.format(caption="a dog", question=q.lower())
    caption = VIEW_PROMPTS["normal"]
    script = {
        (caption, ()): {"a": 0.9}, (caption, ("a",)): {"dog": 0.9},
        (normal, ()): {"a": 0.6, "two": 0.3}, (normal, ("a",)): {"dog": 0.7, "cup": 0.2},
        (normal, ("two",)): {"dogs": 0.8},
        (q, ()): {"a": 0.5, "dog": 0.4}, (q, ("a",)): {"dog": 0.9},
    }
    inner = Scripted(testbed, script)
    cfg = MVPConfig(w_bottom_up=0.0, w_top_down=0.0, w_normal=0.4, w_question=0.6, top_k=2, caption_temperature=0.0,
                    path_temperature=0.0)
    out = MVP(cfg).generate(testbed, [build_image(0)], [q], {"max_new_tokens": 6}, inner)
    row = out.report["mvp"]["rows"][0]
    v = len(testbed.tokenizer)
    # Certainty of a path: the mean of p_top1 - p_top2 over its tokens (step 0 is the first-token distribution).
    dogs_second = _rest({"dogs": 0.8}, v)
    assert row["views"]["normal"] == pytest.approx({"a dog": 0.6 * (0.3 + 0.5) / 2,
                                                    "two dogs": 0.3 * (0.3 + 0.8 - dogs_second) / 2}, abs=1e-6)
    dog_second = _rest({"dog": 0.9}, v)
    assert row["views"]["question"] == pytest.approx({"a dog": 0.5 * (0.1 + 0.9 - dog_second) / 2, "dog": 0.4 * 0.1},
                                                     abs=1e-6)
    assert row["mode"] == "free_form" and out.texts == ["a dog"] and row["paths"] == 4


def test_warped_distribution_is_recorded_after_temperature(testbed):
    inner = Scripted(testbed, {("p", ()): {"a": 0.6, "dog": 0.3}})
    run = _run(testbed, inner, [None], ["p"], max_new_tokens=1, temperature=0.5, top_p=1.0, seeds=[1], first=[10])
    p = inner.probs("p", [])
    warped = (p.log() / 0.5).softmax(-1).topk(2).values
    assert torch.allclose(run.raw[0][0], torch.tensor([0.6, 0.3])) and torch.allclose(run.warped[0][0], warped)
    assert run.tokens == [[10]]  # the forced first token, whatever the sampling would have drawn


# -- through the model --------------------------------------------------------------------------------
def test_each_image_is_captioned_once_per_view(tiny, images):
    lvlm = tiny("llava")
    qs = ["Is there a cat in the image?", "Is there a dog in the image?", "Is there a car in the image?"]
    out = lvlm_fix.generate(lvlm, [images[0], images[0], images[1]], qs, "mvp", **SHORT)
    assert out.report["mvp"]["cost"]["captions"]["rows"] == 2 * 3  # two distinct images, three views
    caps = out.artifacts["mvp"]["captions"]
    assert caps[0] == caps[1] and set(caps[2]) == {"bottom_up", "top_down", "normal"}
    alone = lvlm_fix.generate(lvlm, [images[1]], qs[2:], "mvp", **SHORT)
    assert alone.artifacts["mvp"]["captions"][0] == caps[2]  # per-row sampling: the batch does not matter
    other_seed = lvlm_fix.generate(lvlm, [images[1]], qs[2:], "mvp", **SHORT, sample_seed=7)
    assert other_seed.artifacts["mvp"]["captions"][0] != caps[2]


def test_every_generation_goes_through_the_composed_methods(tiny, images, monkeypatch):
    import lvlm_fix.api

    lvlm = tiny("llava")
    plans = []
    real = lvlm_fix.api.Plan

    def recording(lvlm_, methods):  # the plans a generate() runs under (not the one that only checks the settings)
        plan = real(lvlm_, methods)
        enter = plan.active

        def active(*args, **kwargs):
            plans.append([m.name for m in methods])
            return enter(*args, **kwargs)

        plan.active = active
        return plan

    monkeypatch.setattr(lvlm_fix.api, "Plan", recording)
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "mvp+vhr", max_new_tokens=3, **SHORT)
    assert plans == [["vhr"]] * 3  # captions, scoring, paths: each one generate() with VHR applied
    assert set(out.report) == {"vhr", "mvp"} and out.report["vhr"]["selected_heads"]


def test_one_image_per_row(tiny, images):
    with pytest.raises(InputError, match="row 0 has 2"):
        lvlm_fix.generate(tiny("llava"), [[images[0], images[1]]], PROMPTS[:1], "mvp", **SHORT)


def test_cli_run_compare_and_eval_on_the_testbed(capsys, tmp_path):
    from lvlm_fix.cli.main import main

    main(["run", "--method", "mvp", "--compare", "--prompt", "Is there a dog in the image?", "--max-new-tokens", "4",
          "--set", "mvp.caption_max_new_tokens=6", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("scene") and lines[1].startswith("[baseline] ")
    assert lines[2] in ("[mvp] Yes", "[mvp] No")
    assert "[mvp touched] 3 views" in captured.err and "forward passes" in captured.err
    row = json.loads((tmp_path / "run" / "answers.jsonl").read_text())
    assert row["answer"] == lines[2].removeprefix("[mvp] ") and "baseline" in row
    report = json.loads((tmp_path / "run" / "reports.jsonl").read_text())
    assert report["report"]["mvp"]["cost"]["total"]["forward_passes"] > 1
    main(["eval", "--bench", "pope", "--split", "random", "--limit", "2", "--batch-size", "2", "--n-boot", "10",
          "--methods", "none,paint,mvp:caption_max_new_tokens=6", "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"none", "paint", "mvp:caption_max_new_tokens=6"}


# -- captions kept beyond one call: an eval run's cache, in memory and in the run folder ----------------
def _count_captions(monkeypatch) -> list[str]:
    """The caption prompts MVP generates from now on (one per caption made)."""
    import lvlm_fix.interventions.mvp as mvp

    made: list[str] = []
    real = mvp._run

    def counting(lvlm, inner, images, prompts, **kw):
        made.extend(p for p in prompts if p in VIEW_PROMPTS.values())
        return real(lvlm, inner, images, prompts, **kw)

    monkeypatch.setattr(mvp, "_run", counting)
    return made


def test_a_run_cache_gives_the_same_answers_and_never_a_stale_caption(tiny, images, monkeypatch):
    from lvlm_fix.evals.store import RunCache

    lvlm = tiny("llava")
    qs = [f"Is there a {o} in the image?" for o in ("cat", "dog", "car", "cup", "bus")]
    rows = [images[0], images[1], images[0], images[2], images[1]]  # shared and distinct images
    plain = lvlm_fix.generate(lvlm, rows, qs, "mvp", **SHORT)  # no cache; captions and paths sampled, seeded
    made = _count_captions(monkeypatch)
    token = MVP.run_cache.set(RunCache())
    try:
        lvlm_fix.generate(lvlm, rows[:2], qs[:2], "mvp", **SHORT)
        assert len(made) == 2 * 3
        cached = lvlm_fix.generate(lvlm, rows, qs, "mvp", **SHORT)
        assert len(made) == 3 * 3  # only the third image's views are new
        assert cached.report["mvp"]["cost"]["captions"]["reused"] == 2 * 3
        assert cached.texts == plain.texts and cached.artifacts["mvp"] == plain.artifacts["mvp"]
        assert cached.report["mvp"]["rows"] == plain.report["mvp"]["rows"]

        # Whatever changes a caption is in its key: a new one is made for the same image.
        for params in ({"sample_seed": 7}, {"caption_top_p": 0.9}, {"caption_temperature": 0.5},
                       {"caption_max_new_tokens": 4}):
            before = len(made)
            lvlm_fix.generate(lvlm, rows[:1], qs[:1], "mvp", **{**SHORT, **params})
            assert len(made) == before + 3, params
        before = len(made)
        lvlm_fix.generate(lvlm, rows[:1], qs[:1], "mvp", **SHORT, system_prompt="Answer briefly.")
        assert len(made) == before + 3
        weight = next(lvlm.model.parameters())
        kept = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)  # other weights under the same name
        try:
            lvlm_fix.generate(lvlm, rows[:1], qs[:1], "mvp", **SHORT)
            assert len(made) == before + 6
        finally:
            with torch.no_grad():
                weight.copy_(kept)
        lvlm_fix.generate(lvlm, rows[:1], qs[:1], "mvp", **SHORT)  # the model as it was: its captions are kept
        assert len(made) == before + 6
        defaults = lvlm.model.generation_config
        defaults.repetition_penalty = 1.3  # reaches the caption calls without touching a weight
        try:
            lvlm_fix.generate(lvlm, rows[:1], qs[:1], "mvp", **SHORT)
            assert len(made) == before + 9
        finally:
            defaults.repetition_penalty = 1.0
    finally:
        MVP.run_cache.reset(token)


def test_an_eval_run_captions_each_image_once_per_view_and_a_resume_reads_them_back(tiny, tmp_path, monkeypatch):
    from lvlm_fix.evals.runner import evaluate

    lvlm = tiny("llava")
    made = _count_captions(monkeypatch)
    # 12 POPE questions, 6 per image, in batches of 4: the middle batch holds both images.
    run = dict(bench="pope", split="random", methods=["mvp"], limit=12, batch_size=4, out_dir=tmp_path,
               progress=False, n_boot=10, method_params={"mvp": dict(SHORT)})
    evaluate(lvlm, **run)
    assert len(made) == 2 * 3
    cache = tmp_path / "mvp" / "cache" / "mvp.jsonl"
    assert sum(json.loads(line)["id"].startswith("caption-") for line in cache.read_text().splitlines()) == 2 * 3
    samples = tmp_path / "mvp" / "samples.jsonl"
    records = samples.read_text().splitlines()
    samples.write_text("".join(line + "\n" for line in records[:4]))  # an interrupted run: 8 answers missing

    made.clear()
    evaluate(lvlm, **run)
    assert made == []  # both images' captions read back from the folder
    assert sorted(samples.read_text().splitlines()) == sorted(records)  # the same answers as the first run


def test_a_resume_sets_aside_corrupt_cache_lines_ignores_a_foreign_file_and_refuses_a_forged_entry(
        tiny, tmp_path, monkeypatch):
    from lvlm_fix.errors import LvlmFixWarning
    from lvlm_fix.evals.runner import evaluate

    lvlm = tiny("llava")
    made = _count_captions(monkeypatch)

    def run(out, **params):  # one image's six POPE questions in one batch
        return evaluate(lvlm, bench="pope", split="random", methods=["mvp"], limit=6, batch_size=6, out_dir=out,
                        progress=False, n_boot=10, method_params={"mvp": {**SHORT, **params}})

    run(tmp_path / "ours")
    run(tmp_path / "other", sample_seed=7)
    folder = tmp_path / "ours" / "mvp"
    samples, cache = folder / "samples.jsonl", folder / "cache" / "mvp.jsonl"
    answers, entries = samples.read_text(), cache.read_text().splitlines()
    captions = [i for i, line in enumerate(entries) if json.loads(line)["id"].startswith("caption-")]
    assert len(made) == 2 * 3 and len(captions) == 3

    def resume(cache_text: str) -> None:
        cache.write_text(cache_text)
        samples.unlink()  # every answer made again, its captions read from the cache where it has them
        made.clear()
        run(tmp_path / "ours")
        assert samples.read_text() == answers

    # A line torn by a kill and a line that is not JSON: set aside with one warning, their captions made again.
    torn = entries[captions[0]]
    damaged = [e for i, e in enumerate(entries) if i != captions[0]] + ["{not json", torn[: len(torn) // 2]]
    with pytest.warns(LvlmFixWarning, match="set aside 2 unreadable"):
        resume("\n".join(damaged))
    assert len(made) == 1
    # Another setting's file (another seed): none of its captions has this setting's key, so all are made anew.
    resume((tmp_path / "other" / "mvp" / "cache" / "mvp.jsonl").read_text())
    assert len(made) == 3
    # A well-formed entry whose value is not a caption is refused in one line, never put in a prompt.
    forged = json.loads(entries[captions[0]])
    others = [e for i, e in enumerate(entries) if i != captions[0]]
    with pytest.raises(InputError, match="holds int, not str; the file was edited"):
        resume("\n".join([json.dumps({"id": forged["id"], "value": 5}), *others]) + "\n")


def test_eval_throughput_times_mvp_per_pope_question():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))  # eval_throughput imports overhead
    try:
        spec = importlib.util.spec_from_file_location("eval_throughput", bench / "eval_throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = module.main(["--per-question", "mvp", "--limit", "2", "--batch-sizes", "1", "--reps", "1",
                           "--clock", "cpu", "--threads", "1"])
    finally:
        sys.path.remove(str(bench))
    (row,) = out["rows"]
    assert row["method"] == "mvp" and row["questions"] == 2 and row["ratio"] > 0
    assert "| testbed | 1 | 2 |" in out["table"]


def test_model_identity_reads_sampled_weights_and_skips_offloaded_ones():
    from types import SimpleNamespace

    from lvlm_fix.interventions.mvp import model_identity

    def handle(model):
        model.dtype = torch.float32  # as a transformers model has
        return SimpleNamespace(name="m", revision=None, adapter=SimpleNamespace(model_type="llava"), model=model,
                               processor=None)

    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    assert model_identity(handle(a)) != model_identity(handle(b))  # same names and shapes, other weights
    first = model_identity(handle(a))
    with torch.no_grad():
        a.weight[0, 0] += 1  # one of the 16 values read of 4096: the counter and the values both change
    assert model_identity(handle(a)) != first
    offloaded = torch.nn.Linear(64, 64, device="meta")
    assert model_identity(handle(offloaded)) == model_identity(handle(torch.nn.Linear(64, 64, device="meta")))
