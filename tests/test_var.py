"""VAR: redistribution by hand, per-row sink detection, and generate() end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lvlm_fix
from lvlm_fix.errors import ConfigError
from lvlm_fix.hooks.plan import Participant, Plan
from lvlm_fix.interventions.var import discover_sink_dims
from lvlm_fix.interventions.var import VAR, VARConfig, default_layers, redistribute, row_sink_dims

FAMILIES = ("llava", "qwen2_vl", "gemma3")
ROWS = ["Describe the image.", "Is there a cat in the image?", "What colour is the large object on the left side?"]
# Random tiny models have no massive activations: every dim is a sink dim and tau is low, so
# the tokens with the largest normalised entries become sinks (Gemma's image tokens are flatter).
SINKS = {"sink_dims": tuple(range(64)), "tau": 3.0}


def _sinks(name: str) -> dict:
    return {**SINKS, "tau": 2.5} if name == "gemma3" else SINKS


def _gen(handle, batch, **kw):
    kw = {"max_new_tokens": 4, "do_sample": False, **kw}
    with torch.inference_mode():
        return handle.model.generate(**batch, output_scores=True, return_dict_in_generate=True, **kw)


# -- pure maths ------------------------------------------------------------------------------
# Keys: 0 = BOS (a text sink), 1..4 = image tokens with 1 a visual sink, 5 = a text token.
SINK = torch.tensor([[True, True, False, False, False, False]])
IMAGE = torch.tensor([[False, True, True, True, True, False]])


def test_redistribute_by_hand():
    rows = torch.tensor([
        [0.30, 0.10, 0.20, 0.20, 0.10, 0.10],  # s_img 0.6, r_sink 0.1/0.6 = 0.17: selected
        [0.10, 0.50, 0.10, 0.10, 0.10, 0.10],  # r_sink 0.5/0.8 = 0.625 > rho: kept
        [0.80, 0.05, 0.05, 0.00, 0.00, 0.10],  # s_img 0.1 < summ: kept
        [0.30, 0.10, 0.20, 0.20, 0.10, 0.10],  # as row 0, but the query is not eligible
    ], dtype=torch.float64)
    probs = rows.view(1, 2, 2, 6)  # [b, h, q, k]: head 0 = rows 0, 1; head 1 = rows 2, 3
    eligible = torch.tensor([[True, False]])  # query 1 precedes the image end (prefill)
    out, selected = redistribute(probs, SINK, IMAGE, eligible, rho=0.5, summ=0.2, p=0.6)
    # Row 0: sink mass 0.3 + 0.1 = 0.4, Omega = 0.4 * 0.4 = 0.16; sinks keep 60 %: 0.18, 0.06;
    # non-sink image mass 0.5: 0.2 + 0.16 * 0.2 / 0.5 = 0.264 (twice), 0.1 + 0.16 * 0.1 / 0.5 = 0.132.
    want = torch.tensor([0.18, 0.06, 0.264, 0.264, 0.132, 0.10], dtype=torch.float64)
    assert selected.tolist() == [[[True, False], [False, False]]]
    assert torch.allclose(out[0, 0, 0], want, atol=1e-12)
    assert torch.equal(out[0, 0, 1], probs[0, 0, 1]) and torch.equal(out[0, 1], probs[0, 1])
    assert torch.allclose(out.sum(-1), torch.ones(1, 2, 2, dtype=torch.float64), atol=1e-12)


def test_r_sink_denominator_has_eps_per_image_key():
    # sum_{S_v} A / sum_I A = 0.3000001 / 0.6 = 0.50000017 > 0.5, but with the release's
    # denominator sum_I (A + 1e-6) = 0.600004 the share is 0.4999968 <= 0.5 (methods.md §3, pitfall 10).
    probs = torch.tensor([0.0999999, 0.3000001, 0.1, 0.1, 0.1, 0.3], dtype=torch.float64).view(1, 1, 1, 6)
    _, selected = redistribute(probs, SINK, IMAGE, rho=0.5, summ=0.2, p=0.6)
    assert selected.item()


def test_redistribute_edge_cases():
    probs = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.1, 0.1]).view(1, 1, 1, 6)
    # no visual sink in the layer: untouched even though text sinks exist
    out, sel = redistribute(probs, torch.tensor([[True] + [False] * 5]), IMAGE, rho=0.5, summ=0.2, p=0.6)
    assert not sel.any() and torch.equal(out, probs)
    # every image key is a sink (nothing to receive the mass): untouched, no NaN
    out, sel = redistribute(probs, IMAGE | SINK, IMAGE, rho=1.0, summ=0.0, p=0.6)
    assert not sel.any() and torch.equal(out, probs)
    # p = 1 keeps everything
    out, sel = redistribute(probs, SINK, IMAGE, rho=0.5, summ=0.2, p=1.0)
    assert sel.all() and torch.allclose(out, probs)
    # batch rows are independent: row 1 has no image
    two = torch.cat([probs, probs])
    out, sel = redistribute(two, SINK.repeat(2, 1), torch.cat([IMAGE, torch.zeros_like(IMAGE)]),
                            rho=0.5, summ=0.2, p=0.6)
    assert sel.flatten().tolist() == [True, False] and torch.equal(out[1], two[1])


def test_row_sink_dims_match_discover_sink_dims():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 32)
    hidden[0, 2, 7] = hidden[0, 5, 7] = 200.0  # row 0: dim 7 (twice), dim 3 (once)
    hidden[0, 4, 3] = 200.0
    hidden[1, 0, 11] = -300.0  # row 1: dim 11, negative
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, :3] = False
    hidden[2, 1, 5] = 500.0  # row 2: only at a padding position, so no dim
    dims, found = row_sink_dims(hidden, valid, tau=5.0)
    got = [dims[r][found[r]].tolist() for r in range(3)]
    assert got == [[7, 3], [11], []]
    assert got[0] == list(discover_sink_dims(hidden[:1], tau=5.0))
    assert got[1] == list(discover_sink_dims(hidden[1:2], tau=5.0))


def test_default_layers_exclude_first_two_and_last():
    assert default_layers(32) == list(range(2, 31))
    assert default_layers(4) == [2]
    assert default_layers(3) == []


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, text", [
    ({"rho": 1.5}, r"rho=1.5 .*\[0, 1\]"), ({"p": -0.1}, "p=-0.1"), ({"summ": 2.0}, "summ=2.0"),
    ({"tau": -1.0}, "tau=-1.0"), ({"p": float("nan")}, "p=nan"), ({"sink_dims": ()}, "sink_dims=()"),
    ({"sink_dims": (-3,)}, "-3"), ({"layers": (2.5,)}, "layers="),
])
def test_bad_config_raises(kw, text):
    with pytest.raises(ConfigError, match=text):
        VARConfig(**kw)


def test_config_fields_document_default_and_source():
    cfg = VARConfig()
    assert (cfg.tau, cfg.rho, cfg.summ, cfg.p, cfg.layers, cfg.sink_dims) == (20.0, 0.5, 0.2, 0.6, None, None)
    for name, text in VARConfig.field_help().items():
        assert "Default" in text and "source" in text, name
    assert "non-sink" in VARConfig.field_help()["rho"].lower()
    assert VARConfig.noop() == VARConfig(layers=())
    assert VARConfig.math_identity() == VARConfig(p=1.0)


def test_bad_layers_and_dims_raise_at_bind(tiny):
    handle = tiny("llava")
    with pytest.raises(ConfigError, match="99"):
        with lvlm_fix.apply(handle, "var", layers=(99,)):
            pass
    with pytest.raises(ConfigError, match=str(handle.hidden_size + 1)):
        with lvlm_fix.apply(handle, "var", sink_dims=(handle.hidden_size + 1,)):
            pass


# -- on the tiny models --------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_noop_is_vanilla(tiny, images, name):
    handle = tiny(name)
    batch = handle.encode(images[:2], ROWS[:2])
    base = _gen(handle, batch, max_new_tokens=6)
    with lvlm_fix.apply(handle, "var", layers=(), **SINKS) as plan:
        out = _gen(handle, batch, max_new_tokens=6)
    (m,) = plan.participants
    assert not m.eager_layers and not m.residual_layers and not m.head_output_layers
    assert torch.equal(base.sequences, out.sequences)
    assert all(torch.equal(x, y) for x, y in zip(base.scores, out.scores))


class _RowSums(Participant):
    """Runs after VAR in the same plan: every valid attention row must still sum to 1."""

    def __init__(self, layers):
        self.eager_layers = frozenset(layers)
        self.worst = 0.0

    def post_softmax(self, probs, ctx):
        ok = ctx.key_valid.any(-1)  # rows with at least one valid key
        err = (probs.sum(-1) - 1).abs()[ok].max().item()
        self.worst = max(self.worst, err)
        return probs


@pytest.mark.parametrize("name", FAMILIES)
def test_default_layers_change_logits_and_rows_sum_to_one(tiny, images, name):
    handle = tiny(name)
    if handle.num_layers < 4:
        pytest.skip("VAR's default layers (2 .. L-2) need at least 4 layers")
    batch = handle.encode(images[:2], ROWS[:2])
    base = _gen(handle, batch)
    var = VAR(VARConfig(**_sinks(name)))
    checker = _RowSums(default_layers(handle.num_layers))
    with Plan(handle, [var, checker]).active():
        out = _gen(handle, batch)
    report = var.report()
    json.dumps(report)
    assert report["layers"] == default_layers(handle.num_layers)
    assert sum(report["redistributed_total"]) > 0
    assert not torch.allclose(base.scores[0], out.scores[0])
    assert checker.worst < 1e-5


def test_sliding_window_decode_uses_key_positions(tiny, images):
    """Gemma3's sliding layers hold a suffix of the keys at decode; sinks are indexed by position."""
    handle = tiny("gemma3")
    batch = handle.encode(images[:2], ROWS[:2])
    layers = list(range(handle.num_layers))
    var = VAR(VARConfig(layers=tuple(layers), sink_dims=tuple(range(64)), tau=2.0, summ=0.0, rho=1.0))
    checker = _RowSums(layers)
    with Plan(handle, [var, checker]).active():
        _gen(handle, batch, max_new_tokens=12)
    assert checker.worst < 1e-5
    assert sum(var.report()["redistributed_total"]) > 0


def test_report_contents(tiny, images):
    handle = tiny("qwen2_vl")
    layers = (1, -1)
    res = lvlm_fix.generate(handle, images[:2], ROWS[:2], method="var", layers=layers, max_new_tokens=3, **SINKS)
    report = res.report["var"]
    json.dumps(report)
    depth = handle.num_layers
    assert report["layers"] == [1, depth - 1]
    assert report["sink_dims_source"] == "config" and report["sink_dims"] == [list(range(64))] * 2
    n_img = [int(x) for x in (handle.encode(images[:2], ROWS[:2])["input_ids"] == handle.image_token_id).sum(1)]
    for (start, end), n in zip(report["image_span"], n_img):
        assert end - start == n
    assert set(report["sinks"]) == {"1", str(depth - 1)}
    for per_row in report["sinks"].values():
        for r, row in enumerate(per_row):
            start, end = report["image_span"][r]
            assert all(start <= j < end for j in row["visual"])
            assert not any(start <= j < end for j in row["text"])
    assert set(report["redistributed"]) == {"1", str(depth - 1)}
    assert report["redistributed_total"] == [sum(v[r] for v in report["redistributed"].values()) for r in range(2)]
    # the same run through apply() around the real generate()
    batch = handle.encode(images[:2], ROWS[:2])
    with lvlm_fix.apply(handle, "var", layers=layers, **SINKS) as plan:
        ids = handle.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert plan.report()["var"] == report
    assert handle.decode(ids, batch["input_ids"].shape[1]) == res.texts


def test_sink_dims_from_adapter_or_discovered(tiny, images):
    handle = tiny("llava")  # tiny hidden size 64: no known dims
    batch = handle.encode(images[:1], ROWS[:1])
    with lvlm_fix.apply(handle, "var", layers=(1,)) as plan:  # tau 20: random weights have no sinks
        _gen(handle, batch)
    report = plan.report()["var"]
    assert report["sink_dims_source"] == "discovered"
    assert report["sink_dims"] == [[]] and report["rows_without_sink_dims"] == [0]
    assert report["redistributed_total"] == [0]
    with lvlm_fix.apply(handle, "var", layers=(1,), tau=2.0) as plan:
        _gen(handle, batch)
    report = plan.report()["var"]
    assert report["sink_dims_source"] == "discovered" and 1 <= len(report["sink_dims"][0]) <= 4
    adapter = dataclasses.replace(handle.adapter, sink_dims={handle.hidden_size: (3, 5)})
    known = dataclasses.replace(handle, adapter=adapter)
    with lvlm_fix.apply(known, "var", layers=(1,)) as plan:
        _gen(known, batch)
    report = plan.report()["var"]
    assert report["sink_dims_source"] == "adapter" and report["sink_dims"] == [[3, 5]]


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_equals_per_row(tiny, images, name):
    handle = tiny(name)
    layers = (1, 2) if handle.num_layers >= 4 else (1,)
    kw = dict(method="var", layers=layers, max_new_tokens=5, **_sinks(name))
    res = lvlm_fix.generate(handle, images, ROWS, **kw)
    assert sum(res.report["var"]["redistributed_total"]) > 0
    for r in range(3):
        one = lvlm_fix.generate(handle, images[r : r + 1], ROWS[r : r + 1], **kw)
        assert one.texts[0] == res.texts[r]
        for layer, rows in res.report["var"]["sinks"].items():
            assert one.report["var"]["sinks"][layer][0] == rows[r]
        assert one.report["var"]["image_span"][0] == res.report["var"]["image_span"][r]


def test_sinks_are_detected_per_sample(tiny, images):
    """The release reuses the first sample's sinks for every later one; lvlm-fix does not."""
    handle = tiny("llava")
    a, b = handle.encode(images[:1], ROWS[:1]), handle.encode(images[2:3], ROWS[2:3])
    with lvlm_fix.apply(handle, "var", layers=(1,), **SINKS) as plan:
        _gen(handle, a)
        first = plan.report()["var"]
        _gen(handle, b)
        second = plan.report()["var"]
    with lvlm_fix.apply(handle, "var", layers=(1,), **SINKS) as plan:
        _gen(handle, b)
    assert second == plan.report()["var"]
    assert first["sinks"] != second["sinks"]


def test_beam_search_and_sampling_run(tiny, images):
    handle = tiny("gemma3")
    kw = dict(method="var", layers=(1,), max_new_tokens=4, **_sinks("gemma3"))
    beams = lvlm_fix.generate(handle, images[:2], ROWS[:2], num_beams=2, **kw)
    spans = beams.report["var"]["image_span"]
    assert len(spans) == 4 and spans[0] == spans[1]
    s1 = lvlm_fix.generate(handle, images[:2], ROWS[:2], do_sample=True, seed=5, **kw)
    s2 = lvlm_fix.generate(handle, images[:2], ROWS[:2], do_sample=True, seed=5, **kw)
    assert s1.texts == s2.texts
