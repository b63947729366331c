"""Every registered method on every adapter family: identity, effect, batching, decoding modes, hygiene.

Method-specific exactness tests live in test_<method>.py; this file is the matrix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import lvlm_fix
from conftest import PROMPTS, cli_error, no_plan_left
from lvlm_fix.hooks import hooks_on
from lvlm_fix.interventions import METHODS

NAMES = METHODS.names()
# Settings under which each method acts on the tiny random models, whose attention is nearly
# uniform: VAR's tau = 20 presumes a 4096-wide backbone (|x_d|/rms(x) <= sqrt(D) = 8 here), and
# no key reaches ACT's mean-attention threshold 0.1, so both thresholds are lowered.
ACTIVE = {"vhr": {}, "var": {"tau": 2.5}, "act": {"thres": 0.03}, "carve": {}}


def test_every_method_is_in_the_matrix():
    assert set(NAMES) == set(ACTIVE) == {"vhr", "var", "act", "carve"}


def _noop_params(name: str) -> dict:
    cfg = METHODS.get(name).config_cls.noop()
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


@pytest.mark.parametrize("name", NAMES)
def test_noop_is_vanilla_token_for_token(name, family, tiny, images):
    lvlm = tiny(family)
    gen = dict(max_new_tokens=6)
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, **gen)
    noop = lvlm_fix.generate(lvlm, images, PROMPTS, name, **gen, **_noop_params(name))
    assert noop.texts == vanilla.texts


@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS.get(n).refines_input])
def test_default_changes_the_logits(name, family, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    valid = batch["attention_mask"].bool()
    with torch.inference_mode():
        vanilla = lvlm.model(**batch).logits[valid]
        with lvlm_fix.apply(lvlm, name, **ACTIVE[name]):
            steered = lvlm.model(**batch).logits[valid]
        with lvlm_fix.apply(lvlm, name, **_noop_params(name)):
            noop = lvlm.model(**batch).logits[valid]
    assert (steered - vanilla).abs().max() > 1e-4
    assert torch.equal(noop, vanilla)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_each_row_alone(name, family, tiny, images):
    lvlm = tiny(family)
    together = lvlm_fix.generate(lvlm, images, PROMPTS, name, max_new_tokens=5, **ACTIVE[name]).texts
    for i in range(3):
        alone = lvlm_fix.generate(lvlm, images[i : i + 1], PROMPTS[i : i + 1], name, max_new_tokens=5, **ACTIVE[name])
        assert alone.texts[0] == together[i], (name, i)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_sampling_and_beam_search_run(name, family, tiny, images):
    lvlm = tiny(family)
    args = (lvlm, images[:2], PROMPTS[:2], name)
    first = lvlm_fix.generate(*args, max_new_tokens=4, do_sample=True, seed=3, **ACTIVE[name])
    again = lvlm_fix.generate(*args, max_new_tokens=4, do_sample=True, seed=3, **ACTIVE[name])
    assert first.texts == again.texts  # seeded sampling is reproducible through the hooks
    beams = lvlm_fix.generate(*args, max_new_tokens=4, num_beams=3, **ACTIVE[name])
    assert len(beams.texts) == 2


def test_composition_applies_each_method(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "var+vhr", max_new_tokens=3, **ACTIVE["var"])
    assert set(out.report) == {"vhr", "var"}
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vhr+var", tau=2.5) as plan:
        both = lvlm.model(**batch).logits
        assert [p.name for p in plan.participants] == ["vhr", "var"]  # documented order
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vhr") as plan:
        vhr_only = lvlm.model(**batch).logits
    assert not torch.equal(both, vhr_only)


class RaiseAtStep(LogitsProcessor):
    def __init__(self, step: int) -> None:
        self.calls, self.step = 0, step

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            raise KeyboardInterrupt("interrupted mid-generate")
        return scores


@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS.get(n).refines_input])
def test_no_hook_survives_an_exception_mid_generate(name, tiny, images):
    lvlm = tiny("gemma3")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    before = hooks_on(lvlm.model)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False)
    with pytest.raises(KeyboardInterrupt), lvlm_fix.apply(lvlm, name, **ACTIVE[name]):
        lvlm.model.generate(**batch, max_new_tokens=4, logits_processor=LogitsProcessorList([RaiseAtStep(2)]))
    assert hooks_on(lvlm.model) == before and no_plan_left(lvlm.model)
    with torch.inference_mode():
        assert torch.equal(lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False), vanilla)


def test_refining_methods_refuse_to_wrap_a_plain_generate(tiny):
    from lvlm_fix.errors import ConfigError

    refiners = [n for n in NAMES if METHODS.get(n).refines_input]
    for name in refiners:
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
