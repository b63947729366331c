"""Every registered method on every adapter family: identity, effect, batching, decoding modes, hygiene.

Method-specific exactness tests live in test_<method>.py; this file is the matrix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import lvlm_fix
from conftest import ACTIVE, PROMPTS, cli_error, no_plan_left
from lvlm_fix.hooks import hooks_on
from lvlm_fix.interventions import METHODS

NAMES = METHODS.names()
IN_PLAN = [n for n in NAMES if not METHODS.get(n).stage.wraps_generate]
# A method that owns the decoding loop (OPERA, a beam search) acts in generate() only, not on a plain forward,
# and its scores are beam log-probabilities: its identities are in its own test file.
IN_FORWARD = [n for n in IN_PLAN if not METHODS.get(n).stage.owns_decoding]
CONTRAST = ["vcd", "icd", "m3id", "pai", "avisc"]  # methods that decode a contrast stream
# Methods that work on some families only; elsewhere they must refuse with one clear error.
ONLY = {"paint": ({"llava"}, "CLS token|not the tower's patches in order"),
        "only": ({"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"}, "not a pre-norm layer")}


def _refused(name: str, family: str, run) -> bool:
    """True (after checking the error) when ``name`` does not support ``family``: ``run()`` must raise it."""
    if name not in ONLY or family in ONLY[name][0]:
        return False
    from lvlm_fix.errors import LvlmFixError

    with pytest.raises(LvlmFixError, match=ONLY[name][1]) as e:
        run()
    assert "\n" not in str(e.value)
    return True


def test_every_method_is_in_the_matrix():
    assert set(NAMES) == set(ACTIVE) == {
        "vhr", "var", "act", "carve", "paint", "mvp", "vcd", "icd", "m3id", "pai",
        "avisc",
        "clearsight", "hgai",
        "dola", "deco",
        "vista",
        "only",
        "memvr",
        "opera",
        "vti",
    }
    for name in NAMES:
        assert METHODS.get(name).config_cls.math_identity() is not None, name


def _config(name: str, which: str) -> dict:
    cfg = getattr(METHODS.get(name).config_cls, which)()
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


@pytest.mark.parametrize("name", NAMES)
def test_noop_is_vanilla_token_for_token(name, family, tiny, images):
    lvlm = tiny(family)
    gen = dict(max_new_tokens=6)
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, **gen)
    noop = lvlm_fix.generate(lvlm, images, PROMPTS, name, **gen, **_config(name, "noop"))
    assert noop.texts == vanilla.texts


@pytest.mark.parametrize("name", IN_PLAN)
def test_noop_installs_nothing(name, tiny):
    lvlm = tiny("llava")
    with lvlm_fix.apply(lvlm, None):
        empty_plan_hooks = hooks_on(lvlm.model)
    with lvlm_fix.apply(lvlm, name, **_config(name, "noop")) as plan:
        (m,) = plan.participants
        layer_sets = (m.eager_layers, m.observed_layers, m.head_output_layers, m.residual_layers)
        assert not any(layer_sets) and not plan.touches(0)
        # No forward hook, and no patched attribute (a contrast stream's beam reordering and image tap).
        assert hooks_on(lvlm.model) == empty_plan_hooks
        assert "_reorder_cache" not in vars(lvlm.model) and "get_image_features" not in vars(lvlm.model.base_model)


def _with_scores(lvlm, batch, method=None, **params):
    gen = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if method is None:
        with torch.inference_mode():
            return lvlm.model.generate(**batch, **gen), {}
    with torch.inference_mode(), lvlm_fix.apply(lvlm, method, **params) as plan:
        out = lvlm.model.generate(**batch, **gen)
    return out, plan.report()[method]


@pytest.mark.parametrize("name", IN_FORWARD)
def test_math_identity_runs_the_callbacks_and_matches_vanilla(name, family, tiny, images):
    """The identity with the math in the path: the method's callbacks run on every layer it edits
    (with thresholds low enough that they select rows here) and change nothing."""
    lvlm = tiny(family)
    batch = lvlm.encode(images, PROMPTS)
    params = {**_config(name, "math_identity"), **ACTIVE[name]}
    if _refused(name, family, lambda: _with_scores(lvlm, batch, name, **params)):
        return
    vanilla, _ = _with_scores(lvlm, batch)
    same, report = _with_scores(lvlm, batch, name, **params)
    assert torch.equal(same.sequences, vanilla.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(same.scores, vanilla.scores)) <= 1e-5
    streamed = lambda r: r["stream_ran"] and r["steps"] == len(same.scores) and r["rows"] == 3  # noqa: E731
    acted = {"vhr": lambda r: any(any(rows) for rows in r["selected_heads"].values()),
             "var": lambda r: sum(r["redistributed_total"]) > 0,
             "act": lambda r: any(v["max_per_head"] > 0 for v in r["sinks"].values()),
             "paint": lambda r: r["edited_forwards"] > 0 and sum(i["local"] + i["summary"] for i in r["images"]) > 0,
             "vcd": streamed, "icd": streamed, "pai": streamed,
             "avisc": lambda r: streamed(r) and len(r["blind_tokens"]) == 3 and all(r["image_tokens"]),
             "clearsight": lambda r: r["calls"] > 0 and all(r["system_keys"]) and all(r["image_keys"]),
             "hgai": lambda r: r["calls"] > 0 and all(r["image_keys"]),
             "dola": lambda r: r["steps"] == 5 and sum(r["premature_layer_counts"].values()) == 15,
             "deco": lambda r: r["steps"] == 5 and sum(r["selected_layer_counts"].values()) == 15,
             "vista": lambda r: r["steered_forwards"] == r["augmented_forwards"] == 5 and min(r["vector_norm"]) > 0,
             "only": lambda r: r["forwards"] == 5 and r["removed_heads_mean"] > 0,
             "memvr": lambda r: r["forwards"] == 15 and sum(r["retraced"].values()) == 15,
             "vti": lambda r: r["edited_forwards"]["text"] == 5 * len(r["text_layers"]) > 0,
             # the real no-image stream (not a null contrast), its gate closed
             "m3id": lambda r: streamed(r) and r["contrast_prompt_tokens"] < batch["input_ids"].shape[1]}[name]
    assert acted(report), report


def test_carve_math_identity_runs_both_passes_and_matches_vanilla(family, tiny, images):
    lvlm = tiny(family)
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, max_new_tokens=5)
    same = lvlm_fix.generate(lvlm, images, PROMPTS, "carve", max_new_tokens=5,
                             **{**_config("carve", "math_identity"), "stat_tokens": 3})
    assert same.texts == vanilla.texts
    rows = same.report["carve"]["rows"]
    assert len(rows) == len(images) and all(r["mask_fraction"] == 1.0 and r["steps"][0] >= 1 for r in rows)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(same.artifacts["carve"]["refined"], images))


def test_mvp_math_identity_runs_the_pipeline_and_matches_vanilla(family, tiny, images):
    """One view (the question as asked), top-1, a greedy free-form path: the scoring forward, the
    path, the certainty and the fusion all run, and the answer is the plain greedy one."""
    lvlm = tiny(family)
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, max_new_tokens=5)
    same = lvlm_fix.generate(lvlm, images, PROMPTS, "mvp", max_new_tokens=5, **_config("mvp", "math_identity"))
    assert same.texts == vanilla.texts
    report = same.report["mvp"]
    assert report["views"] == {"question": 1.0} and [r["paths"] for r in report["rows"]] == [1, 1, 1]
    assert report["cost"]["scoring"]["rows"] == 3 and report["cost"]["paths"]["forward_passes"] >= 1


def test_mvp_default_answers_yes_or_no_and_reports_its_cost(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images, PROMPTS, "mvp", max_new_tokens=4, **ACTIVE["mvp"])
    rows = out.report["mvp"]["rows"]
    assert [r["mode"] for r in rows] == ["yes_no", "free_form", "free_form"]
    assert out.texts[0] in ("Yes", "No") and rows[0]["answer"] == out.texts[0]
    assert set(rows[0]["views"]) == {"bottom_up", "top_down", "normal"}
    cost = out.report["mvp"]["cost"]
    assert cost["captions"]["rows"] == 9 and cost["scoring"]["rows"] == 9  # 3 images x 3 views
    assert cost["total"]["forward_passes"] == sum(cost[s]["forward_passes"] for s in ("captions", "scoring", "paths"))


@pytest.mark.parametrize("name", IN_FORWARD)
def test_default_changes_the_logits(name, family, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    valid = batch["attention_mask"].bool()

    def steer():
        with torch.inference_mode(), lvlm_fix.apply(lvlm, name, **ACTIVE[name]):
            return lvlm.model(**batch).logits[valid]

    if _refused(name, family, steer):
        return
    with torch.inference_mode():
        vanilla = lvlm.model(**batch).logits[valid]
        with lvlm_fix.apply(lvlm, name, **ACTIVE[name]):
            steered = lvlm.model(**batch).logits[valid]
        with lvlm_fix.apply(lvlm, name, **_config(name, "noop")):
            noop = lvlm.model(**batch).logits[valid]
    assert (steered - vanilla).abs().max() > 1e-4
    assert torch.equal(noop, vanilla)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_each_row_alone(name, family, tiny, images):
    lvlm = tiny(family)
    if _refused(name, family, lambda: lvlm_fix.generate(lvlm, images, PROMPTS, name, max_new_tokens=2)):
        return
    together = lvlm_fix.generate(lvlm, images, PROMPTS, name, max_new_tokens=5, **ACTIVE[name]).texts
    for i in range(3):
        alone = lvlm_fix.generate(lvlm, images[i : i + 1], PROMPTS[i : i + 1], name, max_new_tokens=5, **ACTIVE[name])
        assert alone.texts[0] == together[i], (name, i)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_sampling_and_beam_search_run(name, family, tiny, images):
    lvlm = tiny(family)
    args = (lvlm, images[:2], PROMPTS[:2], name)
    if _refused(name, family, lambda: lvlm_fix.generate(*args, max_new_tokens=2)):
        return
    if METHODS.get(name).stage.owns_decoding:  # a beam search (OPERA): sampling is refused in one line
        from lvlm_fix.errors import LvlmFixError

        with pytest.raises(LvlmFixError, match="do_sample=True"):
            lvlm_fix.generate(*args, max_new_tokens=4, do_sample=True, seed=3, **ACTIVE[name])
        assert len(lvlm_fix.generate(*args, max_new_tokens=4, num_beams=3, **ACTIVE[name]).texts) == 2
        return
    first = lvlm_fix.generate(*args, max_new_tokens=4, do_sample=True, seed=3, **ACTIVE[name])
    again = lvlm_fix.generate(*args, max_new_tokens=4, do_sample=True, seed=3, **ACTIVE[name])
    assert first.texts == again.texts  # seeded sampling is reproducible through the hooks
    if name == "mvp":  # its calls decode with its own settings: beams would not reach them
        from lvlm_fix.errors import ConfigError

        with pytest.raises(ConfigError, match="does not take num_beams"):
            lvlm_fix.generate(*args, max_new_tokens=4, num_beams=3, **ACTIVE[name])
        return
    beams = lvlm_fix.generate(*args, max_new_tokens=4, num_beams=3, **ACTIVE[name])
    assert len(beams.texts) == 2


def test_composition_applies_each_method_in_stage_order(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "var+vhr", max_new_tokens=3, **ACTIVE["var"])
    assert set(out.report) == {"vhr", "var"}
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "var+vhr+act", tau=2.5) as plan:
        both = lvlm.model(**batch).logits
        assert [p.name for p in plan.participants] == ["vhr", "act", "var"]  # stage, then name
        assert set(plan.report()) == {"vhr", "act", "var"}
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vhr"):
        vhr_only = lvlm.model(**batch).logits
    assert not torch.equal(both, vhr_only)


# Today's composition order of the built-ins (it was stage, then name): a method declaring where it acts
# (stage) and where it composes (order) separately must keep it.
TODAY = ["mvp", "carve", "vhr", "pai", "paint", "act", "var", "icd", "m3id", "vcd"]


def test_every_pair_of_builtins_composes_in_todays_order():
    from lvlm_fix.interventions import parse_spec

    assert set(TODAY) <= set(NAMES)  # a later method declares its own place
    for i, a in enumerate(TODAY):
        for b in TODAY[i + 1:]:
            for spec in (f"{a}+{b}", f"{b}+{a}"):
                assert [n for n, _ in parse_spec(spec)] == [a, b], spec


def test_stage_says_where_a_method_acts_and_order_where_it_composes():
    from dataclasses import dataclass

    from lvlm_fix.interventions import DEFAULT_ORDER, Intervention, MethodConfig, Stage, param, parse_spec
    from lvlm_fix.interventions import register_method

    with pytest.raises(TypeError):
        Stage.INPUT < Stage.LOGITS  # noqa: B015 (a stage is no place in a composition)
    assert {METHODS.get(n).composition_key()[1] for n in TODAY} <= set(DEFAULT_ORDER.values())

    @dataclass(frozen=True, kw_only=True)
    class Cfg(MethodConfig):
        k: float = param(1.0, "k. Default 1 (source: test).")

        @classmethod
        def noop(cls):
            return cls()

    class Early(Intervention):  # edits the weights, yet composes before VHR's head outputs
        name, stage, config_cls, order = "test_early_weights", Stage.ATTENTION_WEIGHTS, Cfg, 15

    class LateInput(Intervention):  # its order is last, but it runs generate(): it goes around the plan
        name, stage, config_cls, order = "test_late_input", Stage.INPUT, Cfg, 99

    class BadOrder(Intervention):
        name, stage, config_cls, order = "test_bad_order", Stage.LOGITS, Cfg, "first"

    with pytest.raises(TypeError, match="order='first' is not an int"):
        register_method(BadOrder)
    try:
        register_method(Early)
        register_method(LateInput)
        assert [n for n, _ in parse_spec("var+vhr+test_early_weights")] == ["test_early_weights", "vhr", "var"]
        assert [n for n, _ in parse_spec("vcd+test_late_input+mvp")] == ["mvp", "test_late_input", "vcd"]
    finally:
        METHODS._items.pop(Early.name, None)
        METHODS._items.pop(LateInput.name, None)


def test_one_list_of_layer_roles(tiny):
    """The plan's depth check and a method's layers_on read one list: ACT's column statistics were missing."""
    from lvlm_fix.hooks.plan import LAYER_ROLES, Participant

    assert set(LAYER_ROLES) == {n for n in vars(Participant) if n.endswith("_layers")}
    on = METHODS.get("act")().layers_on(tiny("llava"))
    assert on["column_stats_layers"] == on["eager_layers"] != []


def test_composed_methods_take_their_own_layers(tiny, images):
    """Two composed methods with different layers in one run, each reported under its own name."""
    lvlm = tiny("llava")
    spec = {"vhr": {"layers": [1]}, "var": {"layers": [2], "tau": 2.5}}
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], spec, max_new_tokens=3)
    assert out.report["vhr"]["layers"] == [1] and list(out.report["vhr"]["selected_heads"]) == ["1"]
    assert out.report["var"]["layers"] == [2] and list(out.report["var"]["sinks"]) == ["2"]
    same = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "vhr:layers=[1]+var:layers=[2]:tau=2.5", max_new_tokens=3)
    assert same.texts == out.texts and same.report == out.report
    with torch.inference_mode(), lvlm_fix.apply(lvlm, spec) as plan:
        lvlm.model(**lvlm.encode(images[:2], PROMPTS[:2]))
        assert plan.report()["vhr"]["layers"] == [1] and plan.report()["var"]["layers"] == [2]


def test_a_shared_flat_parameter_is_refused(tiny):
    from lvlm_fix.errors import ConfigError

    with pytest.raises(ConfigError, match=r"taken by both 'vhr' and 'var'.*--set vhr.layers"):
        with lvlm_fix.apply(tiny("llava"), "vhr+var", layers=[1]):
            pass


class RaiseAtStep(LogitsProcessor):
    def __init__(self, step: int) -> None:
        self.calls, self.step = 0, step

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            raise KeyboardInterrupt("interrupted mid-generate")
        return scores


@pytest.mark.parametrize("name", IN_PLAN)
def test_no_hook_survives_an_exception_mid_generate(name, tiny, images):
    lvlm = tiny("gemma3" if name not in ONLY else min(ONLY[name][0]))
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    before = hooks_on(lvlm.model)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False)
    with pytest.raises(KeyboardInterrupt), lvlm_fix.apply(lvlm, name, **ACTIVE[name]):
        lvlm.model.generate(**batch, max_new_tokens=4, logits_processor=LogitsProcessorList([RaiseAtStep(2)]))
    assert hooks_on(lvlm.model) == before and no_plan_left(lvlm.model)
    assert "_reorder_cache" not in vars(lvlm.model) and "get_image_features" not in vars(lvlm.model.base_model)
    with torch.inference_mode():
        assert torch.equal(lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False), vanilla)


def test_methods_that_wrap_generate_refuse_to_wrap_a_plain_generate(tiny):
    from lvlm_fix.errors import ConfigError

    wrappers = [n for n in NAMES if METHODS.get(n).stage.wraps_generate]
    assert wrappers
    for name in wrappers:
        with pytest.raises(ConfigError, match="lvlm_fix.generate"):
            with lvlm_fix.apply(tiny("llava"), name):
                pass


def test_carve_hygiene_when_generation_fails(tiny, images, monkeypatch):
    lvlm = tiny("llava")
    before = hooks_on(lvlm.model)
    real = lvlm.model.generate
    calls = {"n": 0}

    def fails_on_second_call(*a, **k):  # the statistics pass succeeds, the final answer fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(lvlm.model, "generate", fails_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "carve", max_new_tokens=3)
    monkeypatch.undo()
    assert hooks_on(lvlm.model) == before and no_plan_left(lvlm.model)


@pytest.mark.parametrize("argv, needles", [
    (["--method", "vhr", "--alpha", "-1"], ["alpha", "-1", "valid range"]),
    (["--method", "var", "--rho", "1.5"], ["rho", "1.5", "[0"]),
    (["--method", "vhr", "--layers", "1,99"], ["99", "0..3"]),
    (["--method", "act", "--heads-file", "missing-heads.json"], ["missing-heads.json"]),
])
def test_bad_parameters_are_one_line_errors(capsys, tiny_dirs, images, tmp_path, argv, needles):
    image = tmp_path / "i.png"
    images[0].save(image)
    line = cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(image), *argv)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("name", ["var", "act"])
def test_prompt_key_fast_path_equals_the_general_path(name, tiny, images, monkeypatch):
    """With keys starting at position 0, VAR and ACT work on the prompt's cached key sets; mapping
    every key back by position (the sliding-window path) must give the same generation."""
    from lvlm_fix.hooks.plan import Plan

    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])

    def run():
        with torch.inference_mode(), lvlm_fix.apply(lvlm, name, **ACTIVE[name]) as plan:
            out = lvlm.model.generate(**batch, max_new_tokens=6, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True)
        return out, plan.report()

    fast, fast_report = run()
    general_context = Plan.context

    def unknown_key_start(self, *args, **kwargs):
        ctx = general_context(self, *args, **kwargs)
        ctx.key_start = None
        return ctx

    monkeypatch.setattr(Plan, "context", unknown_key_start)
    general, general_report = run()
    assert torch.equal(fast.sequences, general.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast.scores, general.scores))
    assert fast_report == general_report
    vanilla = lvlm.model.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    assert not torch.allclose(vanilla.scores[0], fast.scores[0])  # the method did act
