"""ACT: sink detection and redistribution on hand-computed tensors, decode safety, exact no-op,
batching, the head-list file and the calibration search."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import lvlm_fix
import lvlm_fix.interventions.act  # noqa: F401  (registers "act")
from conftest import PROMPTS
from lvlm_fix.interventions.act import answer_token_ids, calibrate_act, write_head_file
from lvlm_fix.errors import ConfigError
from lvlm_fix.hooks.plan import AttnContext, Plan, TokenState
from lvlm_fix.interventions.act import Act, ActConfig, act_redistribute, act_sinks, default_act_layers, parse_heads

NEG = torch.finfo(torch.float32).min
T = torch.tensor


# -- hand-computed cases --------------------------------------------------------------------------
# Row 0: 4 valid tokens.  score = [1.8/4, 1.6/3, 0.3/2, 0.3/1] = [.45, .533, .15, .3]
A0 = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.5, 0.1, 0.3]]
# thres 0.4 -> {0, 1}, minus BOS (0) -> S = {1}; beta 0.4 moves 0.6 of key 1's weight to the others.
A0_ACT = [[1.0, 0.0, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0], [0.38, 0.24, 0.38, 0.0], [0.16, 0.2, 0.16, 0.48]]
# Row 1: one left pad, then 3 tokens (a, b, c). Valid part: score = [1.5/3, 1.3/2, .2] -> {a, b} - {a} = {b}.
A1_VALID = [[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.2, 0.6, 0.2]]
A1_ACT_VALID = [[1.0, 0.0, 0.0], [0.72, 0.28, 0.0], [0.38, 0.24, 0.38]]


def _act(heads: str = "0:0", **kw) -> Act:
    act = Act(ActConfig(heads=heads, **kw))
    act.bind(SimpleNamespace(num_layers=4, num_heads=2))
    return act


def _prefill_inputs():
    """Scores [2 rows, 2 heads, 4, 4] whose softmax is A0 / A1 (head 1 = head 0), with the mask applied."""
    a1 = torch.zeros(4, 4)
    a1[1:, 1:] = T(A1_VALID)
    probs = torch.stack([T(A0), a1])[:, None].repeat(1, 2, 1, 1)  # [2, 2, 4, 4]
    key_valid = T([[True] * 4, [False, True, True, True]])
    causal = torch.ones(4, 4).tril().bool()
    allowed = causal[None] & key_valid[:, None, :] & key_valid[:, :, None]  # [2, q, k]
    logits = probs.clamp_min(1e-30).log().masked_fill(~allowed[:, None], 0.0)
    scores = logits + torch.where(allowed, 0.0, NEG)[:, None]  # what the eager path hands pre_softmax
    ctx = AttnContext(layer=0, phase="prefill", step=0, query_positions=torch.arange(4), image_end=T([0, 0]),
                      key_positions=torch.arange(4), key_start=0, image_keys=torch.zeros(2, 4, dtype=torch.bool),
                      key_valid=key_valid)
    return scores, ctx


def _prefill(act, scores, ctx):
    """The eager path's calls at an unchunked prefill: begin, accumulate, then post_softmax."""
    act.begin(TokenState(image_mask=ctx.image_keys, valid=ctx.key_valid, prompt_len=4, q_len=4))
    probs = act.pre_softmax(scores, ctx).softmax(-1)
    act.accumulate(scores, probs, ctx)
    return probs, act.post_softmax(probs, ctx)


def test_pure_sink_set_and_redistribution():
    probs = T(A0)[None, None]
    visible = torch.ones(4, 4).tril().bool()[None, None]
    sinks = act_sinks(probs, visible, 0.4, keep=T([0]))
    assert sinks[0, 0].tolist() == [False, True, False, False]
    assert act_sinks(probs, visible, 0.4)[0, 0].tolist() == [True, True, False, False]  # without sparing BOS
    out = act_redistribute(probs, sinks, 0.4)
    assert torch.allclose(out[0, 0], T(A0_ACT), atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(1, 1, 4), atol=1e-6)
    assert torch.equal(act_redistribute(probs, sinks, 1.0), probs)  # beta = 1 moves nothing
    # A row whose whole weight sits on sinks has nothing to redistribute onto: left as is.
    lonely = T([[[[0.0, 1.0, 0.0, 0.0]]]])
    assert torch.equal(act_redistribute(lonely, sinks, 0.4), lonely)


def test_prefill_callbacks_respect_padding_bos_and_unselected_heads():
    act = _act(thres=0.4, beta=0.4)
    probs, out = _prefill(act, *_prefill_inputs())
    ctx = _prefill_inputs()[1]
    assert torch.allclose(out[0, 0], T(A0_ACT), atol=1e-6)
    assert torch.allclose(out[1, 0, 1:, 1:], T(A1_ACT_VALID), atol=1e-6)
    assert torch.equal(out[1, 0, 0], probs[1, 0, 0])  # the padding query row is untouched (uniform garbage)
    assert torch.equal(out[:, 1], probs[:, 1])  # head 1 is not selected
    assert torch.allclose(out[:, 0, :, :].sum(-1)[ctx.key_valid], torch.ones(7), atol=1e-6)
    _, sinks = act._sinks[0]
    assert sinks[:, 0].tolist() == [[False, True, False, False], [False, False, True, False]]  # BOS kept, pad never
    json.dumps(act.report())


def test_decode_step_uses_prefill_sinks_and_rows_sum_to_one():
    act = _act(thres=0.4, beta=0.4)
    _prefill(act, *_prefill_inputs())
    # One new token (position 4); rows: [BOS, s, ., ., new] and [pad, a, s, c, new].
    probs = T([[0.1, 0.4, 0.2, 0.1, 0.2], [0.0, 0.1, 0.5, 0.2, 0.2]])[:, None, None].repeat(1, 2, 1, 1)
    dec = AttnContext(layer=0, phase="decode", step=1, query_positions=T([4]), image_end=T([0, 0]),
                      key_positions=torch.arange(5), image_keys=torch.zeros(2, 5, dtype=torch.bool),
                      key_valid=T([[True] * 5, [False] + [True] * 4]))
    out = act.post_softmax(probs, dec)
    assert torch.allclose(out[0, 0, 0], T([0.14, 0.16, 0.28, 0.14, 0.28]), atol=1e-6)
    assert torch.allclose(out[1, 0, 0], T([0.0, 0.16, 0.2, 0.32, 0.32]), atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(2, 2, 1), atol=1e-6)  # no A'[0, 0] = 1 (the release's decode bug)
    assert torch.equal(out[:, 1], probs[:, 1])
    # A sliding-window cache holding only positions 2..4: the sinks (position 1 / 2) map by position.
    slide = AttnContext(layer=0, phase="decode", step=2, query_positions=T([4]), image_end=T([0, 0]),
                        key_positions=T([2, 3, 4]), image_keys=torch.zeros(2, 3, dtype=torch.bool),
                        key_valid=torch.ones(2, 3, dtype=torch.bool))
    p3 = T([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])[:, None, None].repeat(1, 2, 1, 1)
    out3 = act.post_softmax(p3, slide)
    assert torch.equal(out3[0], p3[0])  # row 0's sink (position 1) left the window
    assert torch.allclose(out3[1, 0, 0], T([0.2, 0.4, 0.4]), atol=1e-6)  # row 1's sink is position 2


def _tie(n: int, j: int, seed: int, mean: float) -> torch.Tensor | None:
    """A causal attention map ``[n, n]`` whose key ``j`` receives, summed as the release sums it
    (``sum(dim=0) / (n - j)``), a mean of exactly ``mean`` in fp32; None if no fp32 value hits it."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, n, generator=g) * 2).masked_fill(~torch.ones(n, n).tril().bool(), -math.inf).softmax(-1)
    a[j:, j] *= mean * (n - j) / a[j:, j].sum()
    target = torch.tensor(mean)
    for _ in range(1000):  # nudge the last query's weight on j by one ulp until the mean is exact
        got = a.sum(0)[j] / (n - j)
        if got == target:
            return a
        a[-1, j] = torch.nextafter(a[-1, j], torch.tensor(-1.0 if got > target else 2.0))
    return None


def test_exact_ties_at_thres_are_decided_as_the_release_decides_them():
    """Eight keys whose mean attention is exactly thres (the release: no sink) or one ulp above it
    (a sink), constructed with the release's reduction; lvlm-fix must decide every key alike, in the
    pure function and through the callbacks. A column sum in another order (a matmul) flips ties."""
    thres = 0.1
    above = torch.nextafter(torch.tensor(thres), torch.tensor(1.0)).item()
    cases = [(n, j, seed, mean) for (n, j, seed) in [(9, 2, 1), (23, 5, 2), (40, 3, 3), (64, 11, 4)]
             for mean in (thres, above)]
    for n, j, seed, mean in cases:
        a = _tie(n, j, seed, mean)
        assert a is not None, (n, j, seed, mean)
        release = a.sum(0) / torch.arange(n, 0, -1) > thres  # the release's test, every key
        assert bool(release[j]) == (mean > thres)
        causal = torch.ones(n, n).tril().bool()
        assert torch.equal(act_sinks(a[None, None], causal[None, None], thres)[0, 0], release), (n, j, seed, mean)
        act = Act(ActConfig(heads="0:0", thres=thres))
        act.bind(SimpleNamespace(num_layers=1, num_heads=1))
        ctx = AttnContext(layer=0, phase="prefill", step=0, query_positions=torch.arange(n), image_end=T([0]),
                          key_positions=torch.arange(n), key_start=0, image_keys=torch.zeros(1, n, dtype=torch.bool),
                          key_valid=torch.ones(1, n, dtype=torch.bool))
        act.begin(TokenState(image_mask=ctx.image_keys, valid=ctx.key_valid, prompt_len=n, q_len=n))
        scores = a.log().masked_fill(~causal, NEG)[None, None]
        act.accumulate(scores, a[None, None], ctx)
        act.post_softmax(a[None, None].clone(), ctx)
        expected = release.clone()
        expected[0] = False  # BOS is spared (the documented difference in which sink is spared)
        assert torch.equal(act._sinks[0][1][0, 0], expected), (n, j, seed, mean)


# -- on models ------------------------------------------------------------------------------------
def _sharpened(tiny_dirs, family: str):
    """A private copy with peaked attention (softmax temperature 1/200): random tiny models attend
    almost uniformly, so no key reaches ACT's 0.1 mean-attention threshold; real LVLMs have such sinks."""
    lvlm = lvlm_fix.load(tiny_dirs(family), dtype="float32")
    for layer in lvlm.text_layers:
        layer.self_attn.scaling *= 200.0
    return lvlm


@pytest.fixture(scope="module")
def sharp_llava(tiny_dirs):
    return _sharpened(tiny_dirs, "llava")


def _logits(lvlm, batch, method=None, **params):
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with lvlm_fix.apply(lvlm, method, **params) as plan, torch.inference_mode():
        out = lvlm.model.generate(**batch, **gen)
    return out, plan


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3"])
def test_noop_is_exactly_vanilla(fam, tiny, images):
    lvlm = tiny(fam)
    batch = lvlm.encode(images, PROMPTS)
    vanilla, _ = _logits(lvlm, batch)
    noop, plan = _logits(lvlm, batch, "act", **ActConfig.noop().to_dict())
    assert not plan.eager_layers and not plan.observed_layers
    assert torch.equal(vanilla.sequences, noop.sequences)
    assert all(torch.equal(a, b) for a, b in zip(vanilla.logits, noop.logits))
    base = lvlm_fix.generate(lvlm, images, PROMPTS, None, max_new_tokens=6)
    same = lvlm_fix.generate(lvlm, images, PROMPTS, "act", max_new_tokens=6, beta=1.0)
    assert base.texts == same.texts


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_default_config_changes_logits(fam, tiny_dirs, sharp_llava, images):
    lvlm = sharp_llava if fam == "llava" else _sharpened(tiny_dirs, fam)
    batch = lvlm.encode(images, PROMPTS)
    vanilla, _ = _logits(lvlm, batch)
    acted, plan = _logits(lvlm, batch, "act")
    rep = plan.report()["act"]
    assert rep["head_source"].startswith("default")
    assert sorted(map(int, rep["heads"])) == default_act_layers(lvlm.num_layers)
    assert any(v["max_per_head"] > 0 for v in rep["sinks"].values())
    assert rep["decode_steps"] == 3
    assert not torch.allclose(vanilla.logits[0], acted.logits[0], atol=1e-4)
    json.dumps(rep)


def test_batched_equals_each_row_alone(sharp_llava, images):
    lvlm = sharp_llava
    batch = lvlm.encode(images, PROMPTS)  # three prompt lengths -> left padding
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3
    together, plan = _logits(lvlm, batch, "act", thres=0.05)
    sinks = plan.report()["act"]["sinks"]
    for i in range(3):
        alone, plan_i = _logits(lvlm, lvlm.encode(images[i : i + 1], PROMPTS[i : i + 1]), "act", thres=0.05)
        assert torch.equal(alone.sequences[0, -4:], together.sequences[i, -4:])
        for a, b in zip(alone.logits, together.logits):
            assert torch.allclose(a[0], b[i], atol=1e-4), (a[0] - b[i]).abs().max()
        for layer, s in plan_i.report()["act"]["sinks"].items():
            assert s["positions"][0] == sinks[layer]["positions"][i]  # same sinks, counted from each row's BOS


# -- config and head lists ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, needle",
    [
        (dict(beta=1.5), "beta=1.5 is out of range; valid range is [0, 1]"),
        (dict(beta=-0.1), "beta=-0.1"),
        (dict(thres=2.0), "thres=2.0 is out of range; valid range is [0, 1]"),
        (dict(heads="2-0"), "heads='2-0'"),
        (dict(heads="1:0", heads_file="x.json"), "either heads_file or heads"),
    ],
)
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError) as err:
        ActConfig(**params)
    assert needle in str(err.value)


def test_missing_or_bad_head_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "heads.json"
    with pytest.raises(ConfigError, match=str(missing)):
        ActConfig(heads_file=str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": []}')
    with pytest.raises(ConfigError, match=str(bad)):
        ActConfig(heads_file=str(bad))


def test_head_file_is_loaded_and_checked_against_the_model(tmp_path, tiny):
    lvlm = tiny("llava")
    n = lvlm.num_layers
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": {"1": [0, 2], str(n - 1): [3], "2": []}}))
    act = Act(ActConfig(heads_file=str(path)))
    act.bind(lvlm)
    assert act.heads == {1: [0, 2], n - 1: [3]} and act.eager_layers == {1, n - 1}
    act = Act(ActConfig(heads_file=str(path), layers=(1,)))
    act.bind(lvlm)
    assert act.heads == {1: [0, 2]}
    path.write_text(json.dumps({"heads": {str(n): [0]}}))
    with pytest.raises(ConfigError, match=f"layer {n} is beyond"):
        Plan(lvlm, [Act(ActConfig(heads_file=str(path)))])
    path.write_text(json.dumps({"num_layers": n + 1, "heads": {"1": [0]}}))
    with pytest.raises(ConfigError, match="calibrated for num_layers"):
        Act(ActConfig(heads_file=str(path))).bind(lvlm)
    with pytest.raises(ConfigError, match="head 9 of layer 1"):
        Act(ActConfig(heads="1:9")).bind(lvlm)
    assert parse_heads("2:0,5; 7:3;2:1") == {2: [0, 1, 5], 7: [3]}


def test_default_layers_scale_the_release_range():
    assert default_act_layers(32) == list(range(2, 31))  # models/llama_modelling_aug.py range(2, 31)
    assert default_act_layers(4) == [1, 2]
    assert all(0 < default_act_layers(n)[0] and default_act_layers(n)[-1] < n - 1 for n in range(4, 81))


# -- calibration ----------------------------------------------------------------------------------
class _Sample:
    """PopeSample-like: .question, .label and load_image()."""

    def __init__(self, image, question, label):
        self._image, self.question, self.label = image, question, label

    def load_image(self):
        return self._image


def test_calibration_writes_a_head_file_that_act_loads(tmp_path, tiny, images):
    lvlm = tiny("qwen2_vl")
    objects = ["cat", "dog", "car", "bus", "cup", "boat"]
    samples = [_Sample(images[i % 3], f"Is there a {o} in the image?", "yes" if i % 2 else "no")
               for i, o in enumerate(objects)]
    samples[1] = (images[1], "Is there a dog in the image?", "yes")  # tuples work too
    result = calibrate_act(lvlm, samples, layers=[-2], limit=4, beta=0.0, thres=0.0, batch_size=2, progress=False)
    cal = result["calibration"]
    n, h = lvlm.num_layers, lvlm.num_heads
    assert cal["samples"] == 4 and cal["layers"] == [n - 2]
    assert len(cal["per_head_acc"]) == h
    chosen = {f"{layer}:{x}" for layer, hs in result["heads"].items() for x in hs}
    assert chosen == {k for k, acc in cal["per_head_acc"].items() if acc > cal["baseline_acc"]}
    assert cal["selected"] == len(chosen)
    assert cal["yes_token_ids"] == answer_token_ids(lvlm.tokenizer, "yes")
    path = write_head_file(result, tmp_path / "out" / "act_heads.json")
    act = Act(ActConfig(heads_file=str(path)))
    act.bind(lvlm)
    assert {f"{layer}:{x}" for layer, hs in act.heads.items() for x in hs} == chosen
    assert act.eager_layers == {int(layer) for layer in result["heads"]}
    out = lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "act", heads_file=str(path), max_new_tokens=2)
    assert out.report["act"]["head_source"] == str(path)
