"""PAI: the amplification, and decode steps against plain forwards through a reference attention."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.interventions.pai import amplify_image_attention

NEG = torch.finfo(torch.float32).min


def test_amplification_edits_the_last_query_row_on_image_keys():
    scores = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-1.0, -2.0, NEG, 0.5]]).reshape(1, 1, 2, 4)
    image = torch.tensor([[False, True, True, False]])
    out = amplify_image_attention(scores.clone(), image, alpha=2.0)
    assert torch.equal(out[0, 0, 0], scores[0, 0, 0])  # an earlier query row: untouched
    assert out[0, 0, 1].tolist() == [-1.0, 2.0, NEG, 0.5]  # z + 2|z| on the image key; a masked key stays masked


# A plain eager attention written for this test, with PAI's edit where REF says: on the image keys
# of every query row at or after column REF["from"] (the rows that predicted a token), in REF["layers"].
REF: dict = {"layers": (), "alpha": 0.0, "image": None, "from": 0}


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query.float() @ key.float().transpose(-1, -2) * scaling
    q, k = scores.shape[-2:]
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q) if attention_mask is None else attention_mask[..., :k]
    scores = scores.masked_fill(~allowed, NEG)
    if module.layer_idx in REF["layers"]:
        rows = torch.arange(k - q, k) >= REF["from"]
        where = REF["image"][:, None, None, :k] & rows[None, None, :, None] & allowed
        scores = scores + torch.where(where, REF["alpha"] * scores.abs(), 0.0)
    probs = scores.softmax(-1)
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


AttentionInterface.register("pai_reference", reference_attention)
AttentionMaskInterface.register("pai_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _last_logits(lvlm, inputs, **ref):
    pos = lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    REF.update({"layers": (), "alpha": 0.0, "image": inputs["input_ids"] == lvlm.image_token_id, **ref})
    with torch.inference_mode(), lvlm.attention_implementation("pai_reference"):
        return lvlm.model(**inputs, position_ids=pos).logits[:, -1].float()


def _grown(inputs, tokens):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


def _hand(main, text, gamma, beta, shift=True):
    """The release's CFGLogits on log-softmaxes; lvlm-fix adds main's log-sum-exp per row (shift)."""
    s, u = main.log_softmax(-1), text.log_softmax(-1)
    out = gamma * (s - u) + u + (main.logsumexp(-1, keepdim=True) if shift else 0.0)
    return out.masked_fill(s < s.amax(-1, keepdim=True) + math.log(beta), -math.inf)


def _same(a, b):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=1e-4)


@pytest.mark.parametrize("release_compat", [False, True])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_decode_steps_equal_plain_forwards(family, release_compat, tiny, images):
    """The guidance of l_amp by l_text with the cut: l_amp through the reference attention (layers 2..3,
    the last query row at the prefill and the new token's at each step), l_text a plain forward of the
    rows without image tokens (never amplified). release_compat: the prefill is not amplified."""
    lvlm = tiny(family)
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    text = lvlm.text_only(batch)
    # Nearly uniform tiny models: a strong alpha makes the edit show, a high beta makes the cut cut.
    alpha, gamma, beta = 4.0, 1.5, 0.7
    params = dict(alpha=alpha, gamma=gamma, beta=beta, release_compat=release_compat)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "pai", **params) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    length = batch["input_ids"].shape[1]
    amplified = dict(layers=(2, 3), alpha=alpha, **{"from": length if release_compat else length - 1})
    first = out.sequences[:, -2]
    for step, (main_in, text_in) in enumerate([(batch, text), (_grown(batch, first), _grown(text, first))]):
        main, plain = _last_logits(lvlm, main_in, **amplified), _last_logits(lvlm, main_in)
        assert (main - plain).abs().max() > 1e-3 or (release_compat and step == 0), step
        if release_compat and step == 0:
            assert torch.allclose(main, plain)
        assert _same(out.logits[step], _hand(main, _last_logits(lvlm, text_in), gamma, beta)), step
    assert plan.report()["pai"]["prefill_amplified"] is not release_compat


def test_amplification_alone_runs_no_stream(tiny, images):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "pai", alpha=4.0, gamma=1.0, release_compat=True) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    expected = _last_logits(lvlm, batch, layers=(2, 3), alpha=4.0, **{"from": batch["input_ids"].shape[1] - 1})
    assert not torch.allclose(expected, _last_logits(lvlm, batch), atol=1e-3)
    assert torch.allclose(out.logits[0], expected, atol=1e-4)  # no guidance: release_compat changes nothing
    report = plan.report()["pai"]
    assert not report["stream_ran"] and report["prefill_amplified"] and report["layers"] == [2, 3]


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_guidance_runs_after_generates_processors_as_in_the_release(mode, tiny, images):
    """The release's CFGLogits is a logits processor that generate() runs after its own: with a repetition
    penalty, each step's scores must be, up to a per-row constant, gamma s - (gamma - 1) u with
    s = log_softmax(penalty(l_image)) and u = log_softmax(l_text) (the text-only logits unpenalised), cut on
    s, then divided by the temperature when sampling. Guiding first and penalising after differs."""
    from transformers import RepetitionPenaltyLogitsProcessor

    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    text = lvlm.text_only(batch)
    gamma, beta, new = 3.0, 0.05, 3
    sampling = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    gen = dict(max_new_tokens=new, repetition_penalty=1.3, output_scores=True, return_dict_in_generate=True,
               **(sampling if mode == "sampling" else {"do_sample": False}))
    torch.manual_seed(0)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "pai", alpha=0.0, gamma=gamma, beta=beta):
        out = lvlm.model.generate(**batch, **gen)
    pads = (batch["attention_mask"] == 0).sum(1)  # generate() does not penalise the left padding
    penalty = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=pads)
    temperature = gen.get("temperature", 1.0)
    length = batch["input_ids"].shape[1]
    main_in, text_in, worst_old = batch, text, 0.0
    for step in range(new):
        seen = out.sequences[:, :length + step]
        main, plain_text = _last_logits(lvlm, main_in), _last_logits(lvlm, text_in)
        release = _hand(penalty(seen, main), plain_text, gamma, beta, shift=False) / temperature
        assert _same(out.scores[step].log_softmax(-1), release.log_softmax(-1)), step
        old = penalty(seen, _hand(main, plain_text, gamma, beta)) / temperature  # guidance first, then the penalty
        kept = ~release.isinf()
        worst_old = max(worst_old, (old.log_softmax(-1) - release.log_softmax(-1))[kept].abs().max().item())
        token = out.sequences[:, length + step]
        main_in, text_in = _grown(main_in, token), _grown(text_in, token)
    assert worst_old > 1e-3  # the other order is measurably different here


def test_beam_search_scores_are_the_releases_exactly(tiny, images):
    """Beam search adds the processed scores to the beams' totals, so there they must be the release's own
    (no per-row shift): gamma s - (gamma - 1) u, s = log_softmax(penalty(log_softmax(l_image))), at the
    first step, where every beam of a row still holds the prompt."""
    from transformers import RepetitionPenaltyLogitsProcessor

    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    gamma, beta, beams = 3.0, 0.05, 2
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "pai", alpha=0.0, gamma=gamma, beta=beta):
        out = lvlm.model.generate(**batch, max_new_tokens=2, num_beams=beams, repetition_penalty=1.3,
                                  output_scores=True, return_dict_in_generate=True)
    pads = (batch["attention_mask"] == 0).sum(1)
    penalty = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=pads)
    main = _last_logits(lvlm, batch).log_softmax(-1)  # beam search hands its processors log-probabilities
    release = _hand(penalty(batch["input_ids"], main), _last_logits(lvlm, lvlm.text_only(batch)), gamma, beta,
                    shift=False)
    assert _same(out.scores[0][::beams], release)
