"""M3ID: its weight and gate, and decode steps against two plain forwards (with and without the image)."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.interventions.m3id import m3id_logits, m3id_weight


def test_weight_grows_as_exp_lambda_t_minus_one():
    for t, w in {1: 0.0202, 50: 1.718, 100: 6.389, 200: 53.6}.items():
        assert m3id_weight(t, 0.02) == pytest.approx(w, rel=1e-3), t
    assert m3id_weight(200, 0.02, max_weight=5.0) == 5.0
    assert m3id_weight(7, 0.0) == 0.0


def test_the_gate_opens_only_for_unsure_rows():
    sure = torch.tensor([5.0, 0.0, 0.0])  # top-1 probability ~0.99
    unsure = torch.tensor([0.1, 0.0, 0.0])  # ~0.36
    main, contrast = torch.stack([sure, unsure]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    out, gate = m3id_logits(main, contrast, 50, alpha=0.5, lam=0.02)
    assert gate.tolist() == [False, True]
    assert torch.equal(out[0], sure)
    assert torch.allclose(out[1], unsure + math.expm1(1.0) * (unsure - contrast[1]))
    assert not m3id_logits(main, contrast, 50, alpha=0.0, lam=0.02)[1].any()  # alpha 0: never open


def _positions(lvlm, inputs):
    return lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))


def _last_logits(lvlm, inputs):
    with torch.inference_mode():
        return lvlm.model(**inputs, position_ids=_positions(lvlm, inputs)).logits[:, -1].float()


def _grown(inputs, tokens):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_decode_steps_equal_two_plain_forwards(family, tiny, images):
    """l_c + g w_t (l_c - l_u), l_u from a plain forward of the rows with their image tokens deleted;
    w_1 at the prefill, w_2 at the next step."""
    lvlm = tiny(family)
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    no_image = lvlm.text_only(batch)
    lam, alpha = 0.5, 0.3
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "m3id", lam=lam, alpha=alpha) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    first = out.sequences[:, -2]
    for t, (c_in, u_in) in enumerate([(batch, no_image), (_grown(batch, first), _grown(no_image, first))], start=1):
        c, u = _last_logits(lvlm, c_in), _last_logits(lvlm, u_in)
        gate = c.softmax(-1).amax(-1) < alpha
        assert gate.all() and (c - u).abs().max() > 1e-3  # the tiny models are unsure: the correction applies
        assert torch.allclose(out.logits[t - 1], c + math.expm1(lam * t) * (c - u), atol=1e-4), t
    assert plan.report()["m3id"]["gate_open_steps"] == [2, 2]
