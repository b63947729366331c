"""PAINT: token selection on constructed CLS attention (IQR rule, local minus summary, spatial), the
margin edit by hand, the last-row edit with padding, offsets, query chunks and key windows, the
vision-tower read against the tower's own attention weights, decoding modes, release_compat, and
the families it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lvlm_fix
from conftest import PROMPTS, cli_error
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.hooks import hooks_on
from lvlm_fix.hooks.plan import AttnContext, TokenState
from lvlm_fix.interventions.paint import (
    Paint,
    PaintConfig,
    cls_attention_row,
    default_layers,
    iqr_outliers,
    margin_edit,
    select_tokens,
    spatial_scores,
    vision_cls_attention,
)


def test_the_cls_attention_code_is_paints_not_the_hooks_packages():
    import lvlm_fix.hooks.capture as capture

    assert not {"ClsAttention", "cls_attention_row", "vision_cls_attention"} & set(vars(capture))


# -- the math, by hand ------------------------------------------------------------------------------
def test_iqr_rule_by_hand_and_against_numpy():
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 100], [5.0, 5, 5, 5, 5, 5, 5, 5, 6]])
    mask, threshold = iqr_outliers(scores)
    # Row 0: 9 values, Q1 = 3 and Q3 = 7 (linear interpolation), IQR 4: threshold 7 + 6 = 13.
    # Row 1: Q1 = Q3 = 5: threshold 5, so the single 6 is an outlier and the fives are not.
    assert threshold.tolist() == [13.0, 5.0]
    assert mask.tolist() == [[False] * 8 + [True], [False] * 8 + [True]]
    for row, t in zip(scores.numpy(), threshold.tolist()):
        q1, q3 = np.percentile(row, [25, 75])  # the release's get_top_ratio
        assert np.isclose(q3 + 1.5 * (q3 - q1), t)


def test_token_sets_from_constructed_cls_attention_per_row():
    local_attn = torch.tensor([
        [0.30, 0.05, 0.20, 0.01, 0.15, 0.02, 0.12, 0.03],  # top 4: patches 0, 2, 4, 6
        [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.72],  # top 4: patches 4, 5, 6, 7
    ])
    summary_attn = torch.tensor([
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9],  # Q1 = Q3 = 0.1: only patch 7 is above 0.1
        [0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.05, 0.5],  # Q1 0.0575, Q3 0.0925: above 0.145 is patch 7
    ])
    local, summary, threshold = select_tokens(local_attn, summary_attn, local_ratio=0.5)
    assert [m.nonzero().flatten().tolist() for m in summary] == [[7], [7]]
    assert [m.nonzero().flatten().tolist() for m in local] == [[0, 2, 4, 6], [4, 5, 6]]  # minus the summary
    assert threshold.tolist() == pytest.approx([0.1, 0.145])
    assert not (local & summary).any()
    # The spatial stream adds its top int(8 * 0.25) = 2 patches to the local ones, before the summary is removed.
    spatial = torch.tensor([[0, 0, 0, 0.9, 0, 0, 0, 0.8], [0.9, 0.8, 0, 0, 0, 0, 0, 0]])
    local, _, _ = select_tokens(local_attn, summary_attn, 0.5, spatial, spatial_ratio=0.25)
    assert [m.nonzero().flatten().tolist() for m in local] == [[0, 2, 3, 4, 6], [0, 1, 4, 5, 6]]


def test_margin_edit_by_hand():
    z = torch.tensor([2.0, -1.0, 0.5, -4.0, torch.finfo(torch.float32).min])
    m = torch.tensor([0.7, 0.7, 0.0, 0.3, 0.0])
    # z + m|z|: 2 -> 3.4, -1 -> -0.3, untouched where m = 0 (a masked entry stays as it is), -4 -> -2.8.
    assert torch.allclose(margin_edit(z, m), torch.tensor([3.4, -0.3, 0.5, -2.8, z[-1]]))


def test_spatial_scores_are_received_attention_not_the_degenerate_row_sums():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # [b, 1 + 4 patches, 2 heads x 4]
    qh, kh = q.view(2, 5, 2, 4).transpose(1, 2), k.view(2, 5, 2, 4).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) * 0.5).softmax(-1)  # [b, heads, queries, keys]
    expected = probs.mean(1).mean(1)[:, 1:]  # column means over heads and queries, CLS column dropped
    assert torch.allclose(spatial_scores(q, k, head_dim=4, scale=0.5), expected)
    # The release sums each query's row instead: a softmax row sums to 1, so every score is 1.
    assert torch.allclose(probs.mean(1).sum(-1), torch.ones(2, 5))


def test_default_layers_skip_the_first_two():
    assert default_layers(32) == list(range(2, 32)) and default_layers(4) == [2, 3]


# -- the edit in the attention callback ---------------------------------------------------------------
def _state(offsets=(0, 0)):
    """Two rows of a left-padded prompt of 7 tokens, 4 image tokens each; per-row token sets."""
    p = Paint(PaintConfig(alpha=0.5, beta=0.25, layers=[0]))
    p.eager_layers = frozenset({0})
    image = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # row 1: one pad
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    local = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    summary = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    p._masks, p._fresh, p._offsets = (local, summary), True, list(offsets)
    tokens = TokenState(image_mask=image, valid=valid, prompt_len=7, q_len=7)
    p.begin(tokens)
    return p, tokens, image, valid


def _ctx(tokens, image, valid, queries, step=0, key_start=0, k=7):
    keys = torch.arange(key_start, key_start + k)
    total = image.shape[1]
    img = torch.cat([image, image.new_zeros(2, max(0, key_start + k - total))], 1)[:, keys]
    val = torch.cat([valid, valid.new_ones(2, max(0, key_start + k - total))], 1)[:, keys]
    q_len = tokens.q_len  # the forward's queries: positions tokens.past .. past + q_len - 1
    chunk = slice(int(queries[0]) - tokens.past, int(queries[-1]) + 1 - tokens.past)
    return AttnContext(layer=0, phase="prefill" if step == 0 else "decode", step=step, query_positions=queries,
                       image_end=torch.tensor([5, 6]), key_positions=keys, key_start=key_start, image_keys=img,
                       key_valid=val, q_len=q_len, k_len=k, chunk=chunk)


def test_the_last_row_is_edited_on_each_rows_own_tokens():
    p, tokens, image, valid = _state()
    scores = torch.randn(2, 3, 7, 7)
    out = p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.arange(7)))
    # Row 0: image tokens at positions 1..4 are patches 0..3: local {0, 2} -> keys 1, 3; summary {1} -> key 2.
    # Row 1: image tokens at 2..5: local {1} -> key 3; summary {3} -> key 5.
    margin = torch.zeros(2, 7)
    margin[0, [1, 3]], margin[0, 2] = 0.5, 0.25
    margin[1, 3], margin[1, 5] = 0.5, 0.25
    expected = scores.clone()
    last = scores[:, :, 6]
    expected[:, :, 6] = last + margin[:, None] * last.abs()
    assert torch.allclose(out, expected) and torch.equal(out[:, :, :6], scores[:, :, :6])
    assert p.report()["edited_forwards"] == 1 and p.report()["prefill_edited"]


def test_cls_kept_as_an_image_token_shifts_the_patches():
    p, tokens, image, valid = _state(offsets=(1, 1))  # image token 0 is CLS, image token j + 1 is patch j
    scores = torch.randn(2, 1, 7, 7)
    out = p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.arange(7)))
    changed = (out != scores)[:, 0, 6]
    # Row 0 (image tokens 1..4): patches 0..2 are keys 2..4; local {0, 2} -> 2, 4, summary {1} -> 3.
    assert changed[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert changed[1].nonzero().flatten().tolist() == [4]  # row 1: local {1} -> key 4; patch 3 has no token


def test_query_chunks_decode_steps_and_key_windows():
    p, tokens, image, valid = _state()
    # A chunk of the prefill's queries (the chunked eager path): only the chunk holding position 6 is edited.
    scores = torch.randn(2, 2, 3, 7)
    assert torch.equal(p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.arange(0, 3))), scores)
    edited = p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.arange(4, 7)))
    assert torch.equal(edited[:, :, :2], scores[:, :, :2]) and not torch.equal(edited[:, :, 2], scores[:, :, 2])
    # A decode step: one query at position 7, keys 0..7; the generated key 7 is never edited.
    tokens.past, tokens.q_len, tokens.step = 7, 1, 1
    scores = torch.randn(2, 2, 1, 8)
    out = p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.tensor([7]), step=1, k=8))
    assert out[0, 0, 0, 7] == scores[0, 0, 0, 7] and (out != scores)[0, 0, 0].nonzero().flatten().tolist() == [1, 2, 3]
    # A key window starting at position 2 (a sliding cache): keys map back by position.
    scores = torch.randn(2, 2, 1, 6)
    out = p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.tensor([7]), step=1, key_start=2, k=6))
    assert (out != scores)[0, 0, 0].nonzero().flatten().tolist() == [0, 1]  # positions 2 and 3


def test_release_compat_skips_the_prefill_only():
    p, tokens, image, valid = _state()
    p.config = PaintConfig(alpha=0.5, beta=0.25, layers=[0], release_compat=True)
    scores = torch.randn(2, 2, 7, 7)
    assert torch.equal(p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.arange(7))), scores)
    tokens.past, tokens.q_len = 7, 1
    scores = torch.randn(2, 2, 1, 8)
    assert not torch.equal(p.pre_softmax(scores.clone(), _ctx(tokens, image, valid, torch.tensor([7]), 1, k=8)), scores)


def test_head_modulation_by_image_attention_mass():
    probs = torch.tensor([[[0.4, 0.3, 0.3], [0.8, 0.1, 0.1]]])  # [b, h, k]; keys 1, 2 are image tokens
    ctx = AttnContext(layer=0, phase="decode", step=1, query_positions=torch.tensor([2]), image_end=torch.tensor([3]),
                      image_keys=torch.tensor([[False, True, True]]))
    # Image masses 0.6 and 0.2, mean 0.4: the heads' margins are scaled by 1.5 and 0.5.
    assert torch.allclose(Paint._head_factors(probs.log(), ctx), torch.tensor([[1.5, 0.5]]))


# -- through the model --------------------------------------------------------------------------------
def test_cls_row_from_projections_equals_the_towers_attention_weights(tiny, images):
    lvlm = tiny("llava")
    vision = vision_cls_attention(lvlm.model)
    assert len(vision.attentions) == 2 and vision.num_patches == 16  # the tiny CLIP: 2 layers, 64 px / 16
    tower = lvlm.model.model.vision_tower
    pixels = lvlm.encode(images, PROMPTS)["pixel_values"]
    seen = {}
    handles = [vision.attentions[1].q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
               vision.attentions[1].k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            weights = tower(pixels, output_attentions=True).attentions[1]  # [b, heads, 17, 17]
    finally:
        tower.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    assert torch.allclose(cls_attention_row(vision.attentions[1], seen["q"], seen["k"]), weights[:, :, 0], atol=1e-6)

    # The selection inside generate() is select_tokens on those weights, per image.
    out = lvlm_fix.generate(lvlm, images, PROMPTS, "paint", max_new_tokens=2, local_layer=1, summary_layer=1)
    with torch.inference_mode():
        local, summary, _ = select_tokens(weights[:, :, 0, 1:].sum(1), weights[:, :, 0, 1:].sum(1), 0.25)
    got = out.report["paint"]["images"]
    assert [g["summary_patches"] for g in got] == [s.nonzero().flatten().tolist() for s in summary]
    assert [g["local"] for g in got] == local.sum(1).tolist()


def test_greedy_sampling_and_beams_through_generate(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images, PROMPTS)
    gen = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        with lvlm_fix.apply(lvlm, "paint", alpha=5.0, beta=5.0) as plan:
            greedy = lvlm.model.generate(**batch, **gen)
        for a, b in zip(greedy.scores, vanilla.scores):  # every step is edited, the prefill included
            assert (a - b).abs().max() > 1e-4
        rep = plan.report()["paint"]
        assert rep["prefill_edited"] and rep["edited_forwards"] == 2 * 4  # layers 2 and 3, 4 forwards
        with lvlm_fix.apply(lvlm, "paint") as plan:
            beams = lvlm.model.generate(**batch, max_new_tokens=4, num_beams=3)
        assert len(plan.report()["paint"]["images"]) == 3  # the tower ran once on the 3 images, rows are 9
    assert beams.shape[0] == 3
    a = lvlm_fix.generate(lvlm, images, PROMPTS, "paint", max_new_tokens=4, do_sample=True, seed=5)
    b = lvlm_fix.generate(lvlm, images, PROMPTS, "paint", max_new_tokens=4, do_sample=True, seed=5)
    assert a.texts == b.texts


def test_release_compat_leaves_the_first_token_unedited(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    gen = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        with lvlm_fix.apply(lvlm, "paint", alpha=5.0, beta=5.0, release_compat=True) as plan:
            compat = lvlm.model.generate(**batch, **gen)
    assert torch.allclose(compat.scores[0], vanilla.scores[0], atol=1e-5)
    assert not plan.report()["paint"]["prefill_edited"] and plan.report()["paint"]["edited_forwards"] == 2 * 2


def test_hooks_exist_only_inside_the_plan(tiny, images):
    lvlm = tiny("llava")
    before = hooks_on(lvlm.model)
    with lvlm_fix.apply(lvlm, None):
        plan_only = hooks_on(lvlm.model)
    with lvlm_fix.apply(lvlm, "paint", layers=[]):
        assert hooks_on(lvlm.model) == plan_only  # noop: no vision hook
    with lvlm_fix.apply(lvlm, "paint"):
        assert hooks_on(lvlm.model) == plan_only + 2  # q and k of ViT layer 0 (local = summary = 0 of 2)
    with lvlm_fix.apply(lvlm, "paint", summary_layer=1, spatial_ratio=0.1):
        assert hooks_on(lvlm.model) == plan_only + 4
    assert hooks_on(lvlm.model) == before


@pytest.mark.parametrize("family, needle", [
    ("qwen2_vl", "has no CLS token"), ("gemma3", "has no CLS token"), ("idefics3", "has no CLS token"),
    ("llava_next", "row 0 has .* image tokens \\(llava_next\\)"),
])
def test_families_without_a_patch_mapping_are_refused_in_one_line(family, needle, tiny, images):
    with pytest.raises(LvlmFixError, match=needle) as e:
        lvlm_fix.generate(tiny(family), images[:1], PROMPTS[:1], "paint", max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_cli_refuses_an_unsupported_family_in_one_line(capsys, tiny_dirs, images, tmp_path):
    image = tmp_path / "i.png"
    images[0].save(image)
    line = cli_error(capsys, "run", "--model", str(tiny_dirs("qwen2_vl")), "--image", str(image), "--method", "paint")
    assert "no CLS token" in line


@pytest.mark.parametrize("params, needle", [
    ({"alpha": -0.1}, "alpha=-0.1 is out of range"), ({"local_ratio": 1.5}, "local_ratio"),
    ({"head_modulation": "vhd"}, "head_modulation"), ({"spatial_ratio": float("nan")}, "not a finite number"),
])
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError, match=needle):
        PaintConfig(**params)


def test_vit_layer_beyond_the_towers_depth(tiny, images):
    with pytest.raises(ConfigError, match="summary_layer=5 is beyond the vision tower's depth; valid ViT layers are 0"):
        lvlm_fix.generate(tiny("llava"), images[:1], PROMPTS[:1], "paint", summary_layer=5)
