"""CARVE: the mask on constructed maps, the fusion, the image-token layout, exact no-op,
batching, the early stop of the prefill-only pass, and 2-image prompts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.carve import (
    Carve,
    CarveConfig,
    carve_default_layers,
    carve_mask,
    fuse_saliency,
    grid_token_positions,
    refine_image,
    step_weights,
)
from lvlm_fix.layout import TokenGrid, image_token_grids

FAST = dict(stat_tokens=4)  # short statistics passes keep the model tests fast


# -- the mask, by hand ----------------------------------------------------------------------------
def _four_regions() -> np.ndarray:
    s = np.zeros((10, 10))
    s[0:2, 0:2] = 10  # A: sum 40
    s[2, 2] = 8  # C: sum 8, touches A only diagonally -> its own 4-connected component
    s[5, 5:8] = 9  # B: sum 27
    s[8:10, 0] = 7  # D: sum 14
    return s


def test_mask_threshold_components_and_kept_regions():
    s = _four_regions()
    # 10 of 100 pixels are non-zero; the 90th percentile interpolates 0.1 of the way from 0 to 7.
    assert np.isclose(np.percentile(s, 90), 0.7)
    mask, info = carve_mask(s, top_percent=0.1, min_regions=2)  # keep max(2, floor(0.1 * 4)) = 2
    assert info == {"components": 4, "kept": 2, "tau": pytest.approx(0.7)}
    expect = np.zeros((10, 10), np.uint8)
    expect[0:2, 0:2] = expect[5, 5:8] = 1  # A and B, the largest sums
    assert np.array_equal(mask, expect)
    mask3, info3 = carve_mask(s, top_percent=0.1, min_regions=3)
    assert info3["kept"] == 3 and mask3[8:10, 0].all() and not mask3[2, 2]  # D (14) beats C (8)

    img = Image.new("RGB", (10, 10), (200, 100, 50))
    refined, bbox = refine_image(img, mask)
    assert bbox == (0, 0, 8, 6)
    assert refined.size == (13, 10)  # s = max(10/8, 10/6): floor(8 s) = 13, floor(6 s) = 10


def test_region_count_is_at_least_k_and_at_least_p_times_components():
    s = np.zeros((4, 4))
    s[(np.indices((4, 4)).sum(0) % 2) == 0] = np.arange(1, 9)  # a checkerboard: 8 isolated pixels
    mask, info = carve_mask(s, top_percent=0.5, min_regions=3)
    assert info["components"] == 8 and info["kept"] == 4  # max(3, floor(0.5 * 8))
    assert sorted(s[mask == 1]) == [5, 6, 7, 8]
    assert carve_mask(s, top_percent=0.5, min_regions=5)[1]["kept"] == 5


def test_refined_image_is_black_outside_the_mask():
    rgb = np.random.default_rng(0).integers(1, 256, (6, 8, 3), dtype=np.uint8)
    mask = np.zeros((6, 8), np.uint8)
    mask[0, 0] = mask[5, 7] = mask[2, 3] = 1  # bbox = the whole frame: scale 1, no resampling
    refined, bbox = refine_image(Image.fromarray(rgb), mask)
    assert bbox == (0, 0, 8, 6) and refined.size == (8, 6)
    assert np.array_equal(np.asarray(refined), rgb * mask[..., None])


def test_fusion_weights_and_ratio():
    lam = 1e-8
    gen = torch.Generator().manual_seed(0)
    a_q, a_g = torch.rand(2, 3, 1, 4, generator=gen), torch.rand(2, 3, 1, 4, generator=gen)  # [l, t, n, G]
    t_q, t_g = torch.tensor([3]), torch.tensor([2])  # steps aligned by index: t < min(3, 2)
    assert step_weights(t_q, t_g, 3, "full")[:, 0].tolist() == [1.0, 2.0, 0.0]
    assert step_weights(t_q, t_g, 3, "first")[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert step_weights(t_q, t_g, 3, "last")[:, 0].tolist() == [0.0, 1.0, 0.0]
    ratio = (a_q.double() / (a_g.double() + lam))[:, :, 0]  # [l, t, G]
    grid = TokenGrid(2, 2)
    s = fuse_saliency(a_q, a_g, step_weights(t_q, t_g, 3, "full"), lam, [grid], [(2, 2)])[0]
    expect = (1 * ratio[:, 0] + 2 * ratio[:, 1]).sum(0).reshape(2, 2).numpy()
    assert np.allclose(s, expect, rtol=1e-6)
    # Fusing on the grid then resizing once equals the release's resize-each-map-then-sum.
    big = fuse_saliency(a_q, a_g, step_weights(t_q, t_g, 3, "full"), lam, [grid], [(7, 5)])[0]
    each = sum(w * np.asarray(Image.fromarray(ratio[l, t].reshape(2, 2).float().numpy()).resize((7, 5), Image.BILINEAR),
                              dtype=np.float64)
               for t, w in ((0, 1), (1, 2)) for l in range(2))
    assert big.shape == (5, 7) and np.allclose(big, each, rtol=1e-5)


def test_generated_lengths_stop_at_each_rows_eos():
    seq = torch.tensor([[9, 9, 5, 2, 0, 0], [9, 9, 5, 5, 5, 5], [9, 9, 2, 2, 2, 2]])
    from lvlm_fix.model import generated_lengths

    assert generated_lengths(seq, 2, {2}).tolist() == [2, 4, 1]  # the step that produced EOS counts


def test_default_layers_scale_the_release_range():
    assert carve_default_layers(32) == [20, 21, 22, 23, 24, 25]  # carve/attention.py DEFAULT_LAYERS
    assert carve_default_layers(28) == [18, 19, 20, 21, 22]
    assert carve_default_layers(4) == [3]
    assert all(0 <= carve_default_layers(n)[0] <= carve_default_layers(n)[-1] < n for n in range(1, 81))


# -- layout ---------------------------------------------------------------------------------------
def test_image_token_grid_per_family(family, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    grids = image_token_grids(lvlm, batch)
    counts = (batch["input_ids"] == lvlm.image_token_id).sum(1).tolist()
    assert [(g.rows, g.cols) for g in grids] == [(4, 4), (4, 4)]  # 64x64 tiny images: 16 tokens (LLaVA-NeXT: base view)
    assert all(g.offset + g.size <= n for g, n in zip(grids, counts))
    pos, valid = grid_token_positions(batch["input_ids"] == lvlm.image_token_id, grids)
    assert valid.all() and (batch["input_ids"].gather(1, pos) == lvlm.image_token_id).all()


def test_qwen_grid_follows_the_image_aspect(tiny, images):
    lvlm = tiny("qwen2_vl")
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 128, 3), dtype=np.uint8))
    batch = lvlm.encode([wide, images[0]], PROMPTS[:2])
    assert [(g.rows, g.cols) for g in image_token_grids(lvlm, batch)] == [(2, 8), (4, 4)]  # image_grid_thw [1, 4, 16] / merge 2


def test_grid_positions_with_offsets_and_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    pos, valid = grid_token_positions(mask, [TokenGrid(2, 2, offset=1), TokenGrid(1, 3, offset=0)])
    assert pos.tolist() == [[3, 4, 5, 6], [0, 1, 2, 0]] and valid.tolist() == [[True] * 4, [True] * 3 + [False]]


# -- on models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3"])
def test_noop_is_exactly_vanilla_and_runs_no_statistics_pass(fam, tiny, images, monkeypatch):
    lvlm = tiny(fam)
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, max_new_tokens=5)
    calls = []
    real = lvlm.model.generate
    monkeypatch.setattr(lvlm.model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    noop = lvlm_fix.generate(lvlm, images, PROMPTS, "carve", max_new_tokens=5, **CarveConfig.noop().to_dict())
    assert noop.texts == vanilla.texts
    assert len(calls) == 1  # only the final generation
    assert noop.report["carve"]["statistics_pass"].startswith("none")


def test_default_config_refines_the_image(tiny, images):
    lvlm = tiny("llava")
    carve = Carve(CarveConfig())
    new, art = carve.refine(lvlm, images, PROMPTS)
    rep = carve.report()
    json.dumps(rep)
    assert rep["layers"] == carve_default_layers(lvlm.num_layers) and rep["fusion"] == "full"
    for r, (img, orig) in enumerate(zip(new, images)):
        assert img.size != orig.size or not np.array_equal(np.asarray(img), np.asarray(orig))
        mask = np.asarray(art["masks"][r]) > 0
        assert art["masks"][r].mode == "L" and art["masks"][r].size == orig.size
        assert 0 < mask.mean() <= 0.2 + 1e-3  # at most the top 20 % of pixels
        x0, y0, x1, y1 = art["bboxes"][r]
        assert mask[y0:y1, x0:x1].any() and not mask[:y0].any() and not mask[:, x1:].any()
        # Magnified by s = max(W / cw, H / ch): one side is back to the original's, the other at least.
        assert min(img.size[0] / orig.size[0], img.size[1] / orig.size[1]) == pytest.approx(1.0, abs=0.02)
        row = rep["rows"][r]
        assert 1 <= min(row["steps"]) and max(row["steps"]) <= 32 and row["kept"] >= min(3, row["components"])


def test_batched_equals_each_row_alone(tiny, images):
    lvlm = tiny("llava")
    together = Carve(CarveConfig(**FAST))
    _, art = together.refine(lvlm, images, PROMPTS)
    for i in range(3):
        alone = Carve(CarveConfig(**FAST))
        _, art_i = alone.refine(lvlm, images[i : i + 1], PROMPTS[i : i + 1])
        assert alone.report()["rows"][0]["steps"] == together.report()["rows"][i]["steps"]
        assert np.allclose(art_i["saliency"][0], art["saliency"][i], rtol=1e-4)
        a, b = np.asarray(art_i["masks"][0]), np.asarray(art["masks"][i])
        assert (a == b).mean() > 0.999


def test_first_fusion_stops_after_the_deepest_read_layer(tiny, images):
    lvlm = tiny("llava")
    calls = {name: 0 for name in ("read", "after", "lm_head")}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [lvlm.text_layers[1].register_forward_pre_hook(count("read")),
               lvlm.text_layers[2].register_forward_pre_hook(count("after")),
               lvlm.model.lm_head.register_forward_pre_hook(count("lm_head"))]
    try:
        carve = Carve(CarveConfig(fusion="first", layers=(1,)))
        new, _ = carve.refine(lvlm, images[:2], PROMPTS[:2])
    finally:
        for h in handles:
            h.remove()
    assert calls == {"read": 1, "after": 0, "lm_head": 0}
    rep = carve.report()
    assert rep["statistics_pass"].startswith("prefill only") and all(r["steps"] == [1, 1] for r in rep["rows"])


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_two_image_prompt_original_and_refined(fam, tiny, images, monkeypatch):
    lvlm = tiny(fam)
    if lvlm.build_prompt("x", 2).count("<|vision_start|>") == 1:
        # The Qwen adapter's placeholder is the bare <|image_pad|>, so two images share one
        # <|vision_start|>...<|vision_end|> span and M-RoPE fails; the fix (reported) is to make the
        # placeholder the whole span. Patched here so the test checks CARVE's side of the 2-image path.
        span = "<|vision_start|><|image_pad|><|vision_end|>"
        monkeypatch.setattr(lvlm, "adapter", dataclasses.replace(lvlm.adapter, image_placeholder=span))
    carve = Carve(CarveConfig(inputs="both", **FAST))
    new, art = carve.refine(lvlm, images[:2], PROMPTS[:2])
    for i, row in enumerate(new):
        assert isinstance(row, list) and row[0] is images[i] and row[1] is art["refined"][i]
    one = lvlm.encode(images[:2], PROMPTS[:2])["input_ids"] == lvlm.image_token_id
    two = lvlm.encode(new, PROMPTS[:2])["input_ids"] == lvlm.image_token_id
    if fam == "llava":  # a fixed token count per image
        assert torch.equal(two.sum(1), 2 * one.sum(1))
    else:  # Qwen: the refined image has its own size, hence its own grid
        assert (two.sum(1) > one.sum(1)).all()
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "carve", inputs="both", max_new_tokens=3, **FAST)
    assert len(out.texts) == 2 and len(out.artifacts["carve"]["masks"]) == 2


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, needle",
    [
        (dict(top_percent=0.0), "top_percent=0.0 is out of range; valid range is (0, 1]"),
        (dict(top_percent=1.5), "top_percent=1.5"),
        (dict(lam=0.0), "lam=0.0 is out of range; valid range is (0, inf)"),
        (dict(min_regions=0), "min_regions=0 is out of range; valid range is [1, inf)"),
        (dict(stat_tokens=0), "stat_tokens=0 is out of range; valid range is [1, inf)"),
        (dict(fusion="middle"), "fusion='middle'"),
        (dict(inputs="original"), "inputs='original'"),
    ],
)
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError) as err:
        CarveConfig(**params)
    assert needle in str(err.value)


def test_layer_beyond_depth_raises_config_error(tiny, images):
    lvlm = tiny("llava")
    last = lvlm.num_layers - 1
    with pytest.raises(ConfigError, match=f"layers index 99 is beyond the model's depth; valid layers are 0..{last}"):
        Carve(CarveConfig(layers=(99,))).refine(lvlm, images[:1], PROMPTS[:1])


@pytest.mark.parametrize("later", ["vcd", "m3id"])
def test_what_a_later_method_refuses_is_refused_before_carves_passes(tiny, images, later):
    """carve+<contrast method> with a static cache: the contrast stream refuses it, and the refusal comes before
    CARVE's statistics passes run a single forward (it used to come after them, at the final generate())."""
    lvlm = tiny("llava")
    calls = []
    hook = lvlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LvlmFixError, match=f"^{later} does not support static caches"):
            lvlm_fix.generate(lvlm, images[:1], ["Describe the image."], method=f"carve+{later}", max_new_tokens=2,
                              generate_kwargs={"cache_implementation": "static"})
    finally:
        hook.remove()
    assert calls == []


def test_a_generation_config_passed_to_generate_is_checked_early_too(tiny, images):
    """generate_kwargs={"generation_config": ...} (generate()'s own first argument) reaches the early check."""
    import copy

    lvlm = tiny("llava")
    config = copy.deepcopy(lvlm.model.generation_config)
    config.cache_implementation = "static"
    with pytest.raises(LvlmFixError, match="^vcd does not support static caches"):
        lvlm_fix.generate(lvlm, images[:1], ["Describe the image."], method="carve+vcd", max_new_tokens=2,
                          generate_kwargs={"generation_config": config})
