"""VHR: head selection by hand, the layer-by-layer selection beside the text-only stream, and generate() end to end."""

from __future__ import annotations

import json

import pytest
import torch

import lvlm_fix
from lvlm_fix.errors import ConfigError
from lvlm_fix.hooks.plan import Plan
from lvlm_fix.interventions.vhr import VHR, VHRConfig, default_layers, select_heads

FAMILIES = ("llava", "qwen2_vl", "gemma3")
ROWS = ["Describe the image.", "Is there a cat in the image?", "What colour is the large object on the left side?"]


def _gen(handle, batch, **kw):
    kw = {"max_new_tokens": 4, "do_sample": False, **kw}
    with torch.inference_mode():
        return handle.model.generate(**batch, output_scores=True, return_dict_in_generate=True, **kw)


# -- pure maths ------------------------------------------------------------------------------
def _heads(vhd: list[float], ta: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """[h, 2] outputs with ||a_i - b_i|| = vhd_i and ||b_i||^2 = ta_i (b on axis 0, a - b on axis 1)."""
    b = torch.tensor([[t**0.5, 0.0] for t in ta])
    a = b + torch.tensor([[0.0, v] for v in vhd])
    return a, b


def test_select_heads_by_hand():
    # Row 0: head 5 is an outlier in VHD and in text-only norm, so the filter zeroes it.
    #   VHD = [0, 1, 2, 3, 4, 10]: mean 3.333, std (n-1) = sqrt(63.333/5) = 3.559 -> threshold 6.89: head 5.
    #   TA = [1, 1, 1, 1, 1, 100]: mean 17.5, std = sqrt(8167.5/5) = 40.42 -> threshold 57.9: head 5.
    #   Filtered VHD = [0, 1, 2, 3, 4, 0]: median 1 -> heads {2, 3, 4}.
    # Row 1: same VHD, TA all equal (std 0, nothing exceeds the mean): no filtering.
    #   median of [0, 1, 2, 3, 4, 10] = 2 (lower) or 2.5 (averaged) -> heads {3, 4, 5} either way.
    vhd = [0.0, 1.0, 2.0, 3.0, 4.0, 10.0]
    a0, b0 = _heads(vhd, [1, 1, 1, 1, 1, 100])
    a1, b1 = _heads(vhd, [4] * 6)
    with_image, text_only = torch.stack([a0, a1]), torch.stack([b0, b1])  # [rows, heads, dim]

    selected, filtered = select_heads(with_image, text_only, use_filter=True)
    assert [torch.nonzero(r).flatten().tolist() for r in selected] == [[2, 3, 4], [3, 4, 5]]
    assert torch.allclose(filtered[0], torch.tensor([0.0, 1, 2, 3, 4, 0]), atol=1e-5)
    assert torch.allclose(filtered[1], torch.tensor(vhd), atol=1e-5)

    unfiltered, _ = select_heads(with_image, text_only, use_filter=False)
    assert [torch.nonzero(r).flatten().tolist() for r in unfiltered] == [[3, 4, 5], [3, 4, 5]]


def test_select_heads_takes_the_top_half_and_uses_plain_l2():
    torch.manual_seed(0)
    a, b = torch.randn(3, 32, 16), torch.randn(3, 32, 16)
    selected, vhd = select_heads(a, b, use_filter=False)
    assert selected.sum(1).tolist() == [16, 16, 16]
    assert torch.allclose(vhd, (a - b).norm(dim=-1))
    top = vhd.topk(16, dim=-1).indices.sort(-1).values
    assert torch.equal(torch.nonzero(selected)[:, 1].view(3, 16), top)


def test_default_layers_scale_with_depth():
    assert default_layers(32) == [1, *range(18, 32)]  # the paper's {1} + last 14
    assert default_layers(40) == [1, *range(22, 40)]  # 17.5 rounds half up to 18
    assert default_layers(28) == [1, *range(16, 28)]  # 12.25 -> 12
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(2) == [1]


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, text", [({"alpha": -1.0}, "alpha=-1.0"), ({"alpha": float("nan")}, "alpha=nan"),
                                      ({"layers": (1, "x")}, "layers=")])
def test_bad_config_raises(kw, text):
    with pytest.raises(ConfigError, match=text):
        VHRConfig(**kw)


def test_config_fields_document_default_and_source():
    cfg = VHRConfig()
    assert (cfg.alpha, cfg.layers, cfg.outlier_filter) == (2.0, None, True)
    for name, text in VHRConfig.field_help().items():
        assert "Default" in text and "source" in text, name
    assert VHRConfig.noop() == VHRConfig(layers=())
    assert VHRConfig.math_identity() == VHRConfig(alpha=1.0)
    assert VHRConfig(layers=[1, -1]).layers == (1, -1)


def test_layers_beyond_depth_raise(tiny, images):
    handle = tiny("llava")
    depth = handle.num_layers
    with pytest.raises(ConfigError, match=str(depth + 5)):
        with lvlm_fix.apply(handle, "vhr", layers=(depth + 5,)):
            pass
    with pytest.raises(ConfigError, match="alpha=-2"):
        lvlm_fix.generate(handle, images[:1], ROWS[:1], method="vhr", alpha=-2.0)
    m = VHR(VHRConfig(layers=(-1, 1)))
    Plan(handle, [m])
    assert m.layers == {depth - 1, 1}


# -- on the tiny models --------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_noop_is_vanilla(tiny, images, name):
    handle = tiny(name)
    batch = handle.encode(images[:2], ROWS[:2])
    base = _gen(handle, batch, max_new_tokens=6)
    with lvlm_fix.apply(handle, "vhr", layers=()) as plan:
        out = _gen(handle, batch, max_new_tokens=6)
    (m,) = plan.participants
    assert not m.head_output_layers and not m.eager_layers and not m.residual_layers
    assert torch.equal(base.sequences, out.sequences)
    assert all(torch.equal(x, y) for x, y in zip(base.scores, out.scores))
    assert plan.report()["vhr"]["selected_heads"] == {}


@pytest.mark.parametrize("name", FAMILIES)
def test_selection_machinery_alone_changes_nothing(tiny, images, name):
    """At alpha=1 the full machinery (text-only stream, selection, hooks) leaves generation bit-identical."""
    handle = tiny(name)
    batch = handle.encode(images[:2], ROWS[:2])
    base = _gen(handle, batch)
    m = VHR(VHRConfig.math_identity())
    with Plan(handle, [m]).active():
        out = _gen(handle, batch)
    assert m.selected  # the selection did run
    assert torch.equal(base.sequences, out.sequences)
    assert all(torch.equal(x, y) for x, y in zip(base.scores, out.scores))
    # sampling: the pass consumes no random numbers
    torch.manual_seed(3)
    base = _gen(handle, batch, do_sample=True, top_k=0)
    torch.manual_seed(3)
    with Plan(handle, [VHR(VHRConfig.math_identity())]).active():
        out = _gen(handle, batch, do_sample=True, top_k=0)
    assert torch.equal(base.sequences, out.sequences)


@pytest.mark.parametrize("name", FAMILIES)
def test_default_changes_logits_and_reports(tiny, images, name):
    handle = tiny(name)
    batch = handle.encode(images[:2], ROWS[:2])
    base = _gen(handle, batch)
    with lvlm_fix.apply(handle, "vhr") as plan:
        out = _gen(handle, batch)
    assert not torch.allclose(base.scores[0], out.scores[0])
    report = plan.report()["vhr"]
    json.dumps(report)
    layers = default_layers(handle.num_layers)
    assert report["layers"] == layers and report["alpha"] == 2.0 and report["outlier_filter"] is True
    assert list(report["selected_heads"]) == [str(i) for i in layers]
    for rows in report["selected_heads"].values():
        assert len(rows) == 2
        for heads in rows:
            assert 1 <= len(heads) <= handle.num_heads // 2
            assert all(0 <= h < handle.num_heads for h in heads)


def _reference_selection(handle, batch, layers, alpha, use_filter=True):
    """The paper's layer-by-layer selection, two plain forwards per layer with raw torch hooks.

    Layer l's VHD is read on the model already reinforced at the layers before it, with both
    streams (the image rows, and the text-only rows at their own length) reinforced the same way.
    """
    o_projs = [layer.self_attn.o_proj for layer in handle.text_layers]
    h = handle.num_heads
    chosen: dict[int, torch.Tensor] = {}

    def last_heads(inputs, target):
        """One stream's head outputs at ``target``'s last position, ``chosen`` heads scaled."""
        seen = {}

        def scale(selected):
            def hook(module, args):
                x = args[0]
                s = torch.where(selected, alpha, 1.0)[:, None, :, None]
                return ((x.view(*x.shape[:2], h, -1) * s).view_as(x),)
            return hook

        def grab(module, args):
            seen["x"] = args[0].view(*args[0].shape[:2], h, -1)[:, -1]

        mask = inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        handles = [o_projs[i].register_forward_pre_hook(scale(m)) for i, m in chosen.items()]
        handles.append(o_projs[target].register_forward_pre_hook(grab))
        try:
            with torch.inference_mode():
                handle.model(**inputs, position_ids=pos)
        finally:
            for x in handles:
                x.remove()
        return seen["x"]

    text = handle.text_only(batch)
    for target in sorted(layers):
        chosen[target], _ = select_heads(last_heads(batch, target), last_heads(text, target), use_filter)
    return {i: [torch.nonzero(row).flatten().tolist() for row in m] for i, m in chosen.items()}


def test_selection_is_layer_by_layer_on_the_reinforced_model(tiny, images):
    handle = tiny("llava")
    batch = handle.encode(images[:2], ROWS[:2])
    layers = default_layers(handle.num_layers)
    with lvlm_fix.apply(handle, "vhr", alpha=2.0) as plan:
        _gen(handle, batch, max_new_tokens=1)
    got = plan.report()["vhr"]["selected_heads"]
    want = _reference_selection(handle, batch, layers, 2.0)
    assert got == {str(i): want[i] for i in layers}


def test_frozen_heads_scale_every_position_at_every_step(tiny, images):
    """VHR == vanilla generate with the reported heads scaled by fixed hooks at every forward."""
    handle = tiny("llava")
    batch = handle.encode(images[:2], ROWS[:2])
    with lvlm_fix.apply(handle, "vhr") as plan:
        out = _gen(handle, batch, max_new_tokens=6)
    selected = plan.report()["vhr"]["selected_heads"]
    h = handle.num_heads
    hooks = []
    for layer, rows in selected.items():
        s = torch.ones(len(rows), 1, h, 1)
        for r, heads in enumerate(rows):
            s[r, 0, heads] = 2.0

        def hook(module, args, s=s):
            x = args[0]
            return ((x.view(*x.shape[:2], h, -1) * s).view_as(x),)

        hooks.append(handle.text_layers[int(layer)].self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        ref = _gen(handle, batch, max_new_tokens=6)
    finally:
        for x in hooks:
            x.remove()
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(out.scores, ref.scores))


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_equals_per_row(tiny, images, name):
    handle = tiny(name)
    res = lvlm_fix.generate(handle, images, ROWS, method="vhr", max_new_tokens=5)
    assert len({len(handle.encode([im], [p])["input_ids"][0]) for im, p in zip(images, ROWS)}) == 3
    for r in range(3):
        one = lvlm_fix.generate(handle, images[r : r + 1], ROWS[r : r + 1], method="vhr", max_new_tokens=5)
        assert one.texts[0] == res.texts[r]
        for layer, rows in res.report["vhr"]["selected_heads"].items():
            assert one.report["vhr"]["selected_heads"][layer][0] == rows[r]


def test_apply_around_generate_and_state_reset(tiny, images):
    handle = tiny("qwen2_vl")
    a, b = handle.encode(images[:1], ROWS[:1]), handle.encode(images[1:2], ROWS[1:2])
    with lvlm_fix.apply(handle, "vhr") as plan:
        ids_a = handle.model.generate(**a, max_new_tokens=4, do_sample=False)
        report_a = plan.report()["vhr"]
        handle.model.generate(**b, max_new_tokens=4, do_sample=False)
        report_b = plan.report()["vhr"]
    with lvlm_fix.apply(handle, "vhr") as plan:
        handle.model.generate(**b, max_new_tokens=4, do_sample=False)
    assert report_b == plan.report()["vhr"]  # nothing of sample a carried over
    res = lvlm_fix.generate(handle, images[:1], ROWS[:1], method="vhr", max_new_tokens=4)
    assert res.report["vhr"] == report_a
    assert handle.decode(ids_a, a["input_ids"].shape[1]) == res.texts


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_beam_search_and_sampling(tiny, images, name):
    handle = tiny(name)
    batch = handle.encode(images[:2], ROWS[:2])
    with lvlm_fix.apply(handle, "vhr") as plan:
        out = _gen(handle, batch, num_beams=2, num_return_sequences=2, max_new_tokens=4)
    rows = plan.report()["vhr"]["selected_heads"]
    for per_row in rows.values():  # rows are expanded per beam before the prefill
        assert len(per_row) == 4 and per_row[0] == per_row[1] and per_row[2] == per_row[3]
    assert out.sequences.shape[0] == 4
    with lvlm_fix.apply(handle, "vhr") as plan:
        plain = _gen(handle, batch, max_new_tokens=1)
    assert {k: [v[0], v[2]] for k, v in rows.items()} == plan.report()["vhr"]["selected_heads"]
    res = lvlm_fix.generate(handle, images[:2], ROWS[:2], method="vhr", do_sample=True, seed=1, max_new_tokens=4)
    res2 = lvlm_fix.generate(handle, images[:2], ROWS[:2], method="vhr", do_sample=True, seed=1, max_new_tokens=4)
    assert res.texts == res2.texts
    assert plain.sequences.shape[0] == 2


def test_no_hooks_left_after_apply(tiny, images):
    from lvlm_fix.hooks.capture import hooks_on

    handle = tiny("llava")
    before = hooks_on(handle.model)
    with lvlm_fix.apply(handle, "vhr"):
        _gen(handle, handle.encode(images[:1], ROWS[:1]), max_new_tokens=2)
    assert hooks_on(handle.model) == before
