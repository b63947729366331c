"""DeCo: the correction by hand, and generate() against a transcription of the release's loops."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TopPLogitsWarper

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions import deco as deco_mod
from lvlm_fix.interventions import dola as dola_mod
from lvlm_fix.interventions.deco import deco_candidates, deco_correct, default_layers

# --- (a) by hand ---------------------------------------------------------------------------------


def test_correction_by_hand():
    mature = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log() + 2.0  # p^N; the shift changes no probability
    early = torch.stack([torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log(),   # on C = {0, 1}: .1, .2
                         torch.tensor([[0.6, 0.1, 0.1, 0.2]]).log()])  # on C: .6, .1 -> j* = 1, m = .6
    out, pick, m, size = deco_correct(mature, early, alpha=0.5, top_k=3, top_p=0.75)  # cum .5, .8: C = {0, 1}
    assert pick.tolist() == [1] and m.item() == pytest.approx(0.6, abs=1e-6) and size.tolist() == [2]
    expected = [math.log(0.5) + 2 + 0.5 * 0.6 * math.log(0.6), math.log(0.3) + 2 + 0.5 * 0.6 * math.log(0.1)]
    assert out[0, :2].tolist() == pytest.approx(expected, abs=1e-5)
    assert out[0, 2:].tolist() == [-math.inf, -math.inf]
    uncut, *_ = deco_correct(mature, early, alpha=0.0, top_k=3, top_p=0.75, cut=False)
    assert torch.equal(uncut, mature)  # the math identity


def test_candidates_keep_the_crossing_token_and_at_most_k():
    mature = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]).log()
    ids, in_set = deco_candidates(mature, top_k=3, top_p=0.6)
    assert ids[0].tolist() == [0, 1, 2] and in_set[0].tolist() == [True, True, False]  # .5 < .6 <= .8
    assert in_set[1].tolist() == [True, True, True]  # .25 .5 .75: the crossing is the third, k = 3
    ids, in_set = deco_candidates(mature, top_k=99, top_p=0.4)  # k past the vocabulary: the vocabulary
    assert ids.shape == (2, 4) and in_set[0].tolist() == [True, False, False, False]


def test_ties_go_to_the_first_layer_then_the_first_candidate():
    mature = torch.tensor([[0.6, 0.4]]).log()
    early = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]]).log()
    _, pick, m, _ = deco_correct(mature, early, alpha=1.0, top_k=2, top_p=1.0)
    assert pick.tolist() == [0] and m.item() == pytest.approx(0.5)


def test_default_layers_relative_to_depth():
    assert default_layers(32) == list(range(20, 29))  # the release's LLaVA-1.5-7B layers
    assert default_layers(40) == list(range(25, 36)) and default_layers(4) == [2, 3] and default_layers(8) == [5, 6, 7]


# --- (b) against a transcription of the release's deco_greedy_search -------------------------------


def _grown(inputs, tokens):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


def _row(batch, i):
    keep = batch["attention_mask"][i].bool()
    row = {k: (v[i:i + 1][:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
           for k, v in batch.items()}
    if "pixel_values" in batch and batch["pixel_values"].shape[0] == batch["input_ids"].shape[0]:
        row["pixel_values"] = batch["pixel_values"][i:i + 1]
    return row


def _release_step(lvlm, inputs, layers, alpha, top_k, top_p):
    """One step of the release's deco_greedy_search (zjunlp/Deco utils.py 2659-2682), batch 1, written from
    its formulas: candidates from the final layer, early exits through the final norm, the flattened argmax."""
    pos = lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    with torch.no_grad():
        out = lvlm.model(**inputs, position_ids=pos, output_hidden_states=True)
        early = {j: lvlm.lm_head(lvlm.final_norm(out.hidden_states[j][:, -1])).float() for j in layers}
    final = out.logits[0, -1].float()
    probs, ids = final.softmax(-1).topk(top_k)
    cutoff = min(int(torch.searchsorted(probs.cumsum(-1), top_p, right=False)) + 1, top_k)
    ids = ids[:cutoff]
    table = torch.stack([early[j][0].softmax(-1)[ids] for j in layers])  # [J, C]
    flat = int(table.argmax())
    chosen, m = layers[flat // table.shape[1]], table.max().item()
    corrected = final + alpha * m * early[chosen][0]
    drop = torch.ones_like(final, dtype=torch.bool)
    drop[ids] = False
    return corrected.masked_fill(drop, -math.inf)[None], ids, table, chosen, m, early


def _record(monkeypatch, name, module=None):
    """Records the outputs of ``name`` in ``module`` (default deco's; the early exits live in dola's)."""
    module = module or (dola_mod if name == "early_exit_logits" else deco_mod)
    seen = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return seen


def _same(a, b, atol=1e-5):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=atol)


@pytest.mark.parametrize("top_p", [0.9, 0.02])  # 0.9: k cuts on these flat tiny distributions; 0.02: top_p does
def test_generate_equals_the_release_loop_step_by_step(top_p, tiny, images, monkeypatch):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[1:2]))
    layers, alpha, top_k = [0, 1, 2, 3], 4.0, 20  # a strong alpha, so that the correction shows
    exits, candidates = _record(monkeypatch, "early_exit_logits"), _record(monkeypatch, "deco_candidates")
    corrections = _record(monkeypatch, "deco_correct")
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "deco", layers=layers, alpha=alpha, threshold_top_p=top_p) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=16, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    steps = len(out.scores)
    assert steps >= 8
    length, inputs, chosen_all, sizes = batch["input_ids"].shape[1], batch, [], []
    for step in range(steps):
        ref, ids, table, chosen, m, early = _release_step(lvlm, inputs, layers, alpha, top_k, top_p)
        for i, j in enumerate(layers):
            assert torch.allclose(exits[step][i], early[j], atol=1e-5), (step, j)
        got_ids, in_set = candidates[step]
        assert got_ids[0][in_set[0]].tolist() == ids.tolist(), step  # (a) C in order, exact
        _, pick, got_m, _ = corrections[step]
        got_table = torch.stack([exits[step][i][0].softmax(-1)[ids] for i in range(len(layers))])
        assert torch.allclose(got_table, table, atol=1e-6), step  # (b) the [J, C] matrix
        assert layers[pick.item()] == chosen and abs(got_m.item() - m) <= 1e-6, step  # (c) j*, m
        assert _same(out.scores[step], ref), step  # (d) l~ on C, -inf elsewhere
        token = out.sequences[:, length + step]
        assert token.item() == ref.argmax().item(), step  # (e) tokens
        chosen_all.append(chosen)
        sizes.append(len(ids))
        inputs = _grown(inputs, token)
    report = plan.report()["deco"]
    assert report["selected_layer_counts"] == {str(j): chosen_all.count(j) for j in sorted(set(chosen_all))}
    assert report["mean_candidates"] == pytest.approx(sum(sizes) / steps, abs=1e-4)
    assert max(sizes) == top_k if top_p == 0.9 else max(sizes) < top_k  # each cut was exercised


def _scores_under(lvlm, batch, gen, **params):
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "deco", **params) as plan:
        out = lvlm.model.generate(**batch, **gen, output_scores=True, return_dict_in_generate=True)
    return out, plan.report()["deco"]


def test_sampling_runs_the_warpers_once_on_the_correction(tiny, images):
    """The release's sampling path (T=1, top_p 0.9 as in its AMBER script): the warper acts on l~, and
    the recorded scores are the warped l~ (the release recorded the uncorrected logits)."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    torch.manual_seed(0)
    out, _ = _scores_under(lvlm, batch, dict(max_new_tokens=4, do_sample=True, temperature=1.0, top_p=0.9, top_k=0),
                           layers=[1, 3], alpha=4.0, threshold_top_p=0.05)
    warp = TopPLogitsWarper(0.9)
    length, inputs = batch["input_ids"].shape[1], batch
    for step in range(len(out.scores)):
        ref = _release_step(lvlm, inputs, [1, 3], 4.0, 20, 0.05)[0]
        assert _same(out.scores[step], warp(None, ref)), step
        inputs = _grown(inputs, out.sequences[:, length + step])


def test_beam_search_equals_the_releases_per_row_loop(tiny, images):
    """deco_beam_search corrects each row on its own and takes the log-softmax: the first step's scores."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    beams = 2
    out, _ = _scores_under(lvlm, batch, dict(max_new_tokens=3, num_beams=beams), layers=[1, 3], alpha=4.0,
                           threshold_top_p=0.05)
    rows = torch.cat([_release_step(lvlm, _row(batch, i), [1, 3], 4.0, 20, 0.05)[0] for i in range(2)])
    assert _same(out.scores[0][::beams], rows.log_softmax(-1), atol=1e-4)


# --- (c) identities, (d) batches ------------------------------------------------------------------


def test_noop_is_bit_identical_and_math_identity_runs_the_callbacks(tiny, images):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images, PROMPTS))
    gen = dict(max_new_tokens=5, do_sample=False)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen, output_scores=True, return_dict_in_generate=True)
    noop, _ = _scores_under(lvlm, batch, gen, layers=[])
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.scores, vanilla.scores))
    same, report = _scores_under(lvlm, batch, gen, alpha=0.0, candidate_cut=False)
    assert torch.equal(same.sequences, vanilla.sequences)
    # l^N + 0 m l^j is l^N; l^N itself comes from one product with the early exits (the shared unembedding),
    # so it equals vanilla's within fp32 rounding rather than bit for bit
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(same.scores, vanilla.scores))
    assert report["steps"] == 5 and sum(report["selected_layer_counts"].values()) == 15 and report["mean_m"] > 0
    changed, _ = _scores_under(lvlm, batch, gen)
    assert (~changed.scores[0].isinf()).sum(-1).tolist() == [20, 20, 20]  # the defaults do act: k = 20 candidates


def test_left_padded_batch_equals_each_row_alone(tiny, images):
    """Per row at any batch (the release's greedy and sampling loops are batch 1 only)."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[1:3]))
    assert (batch["attention_mask"] == 0).any()
    params = dict(layers=[0, 1, 2, 3], alpha=4.0, threshold_top_p=0.05)
    gen = dict(max_new_tokens=4, do_sample=False)
    together, _ = _scores_under(lvlm, batch, gen, **params)
    for i in range(2):
        alone, _ = _scores_under(lvlm, _row(batch, i), gen, **params)
        assert torch.equal(alone.sequences[0, -4:], together.sequences[i, -4:]), i
        assert all(_same(a[0], t[i], atol=1e-4) for a, t in zip(alone.scores, together.scores)), i


def test_release_compat_takes_the_early_softmax_in_the_models_dtype(tiny, images):
    """On an fp32 model release_compat changes nothing; the dtype it casts to is the model's."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    gen = dict(max_new_tokens=3, do_sample=False)
    a, _ = _scores_under(lvlm, batch, gen, release_compat=True)
    b, _ = _scores_under(lvlm, batch, gen)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    early = torch.randn(2, 1, 50) * 3
    out16, *_ = deco_correct(torch.randn(1, 50), early, 0.6, 20, 0.9, probs_dtype=torch.float16)
    out32, *_ = deco_correct(torch.randn(1, 50), early, 0.6, 20, 0.9)
    assert out16.dtype == out32.dtype == torch.float32


# --- (e) composition, (f) bad input -----------------------------------------------------------------


def test_dola_then_deco(tiny, images, monkeypatch):
    """dola+deco: DoLa contrasts the model's own logits first, DeCo corrects DoLa's contrast."""

    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    seen = []
    real = dola_mod.DoLa.logits

    def logits(self, last, ctx):
        out = real(self, last, ctx)
        seen.append((last.clone(), out.clone()))
        return out

    monkeypatch.setattr(dola_mod.DoLa, "logits", logits)
    exits = _record(monkeypatch, "early_exit_logits")
    spec = {"dola": {"layers": [0, 2], "relative_top": 0.5}, "deco": {"alpha": 4.0, "threshold_top_p": 0.05}}
    with torch.inference_mode(), lvlm_fix.apply(lvlm, spec) as plan:
        assert [p.name for p in plan.participants] == ["dola", "deco"]
        out = lvlm.model.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    with torch.inference_mode():
        plain = lvlm.model(**batch).logits[:, -1].float()
    assert torch.allclose(seen[0][0], plain, atol=1e-5)  # DoLa got the model's own logits
    # exits[0] is DoLa's (layers 0, 2), exits[1] DeCo's own (layers 2, 3), of the first forward
    expected, *_ = deco_correct(seen[0][1], exits[1], 4.0, 20, 0.05)
    assert _same(out.scores[0], expected)  # DeCo corrected DoLa's output
    assert seen[0][1].isinf().any() and not _same(out.scores[0], seen[0][1])


def test_refusals_are_one_line(tiny, images):
    lvlm = tiny("llava")
    with pytest.raises(ConfigError) as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "deco+icd", max_new_tokens=2)
    assert "'deco' edits the next-token logits" in str(e.value) and "\n" not in str(e.value)
    for params, needle in [(dict(threshold_top_p=0.0), "threshold_top_p=0.0 is out of range"),
                           (dict(threshold_top_k=0), "threshold_top_k=0 is out of range"),
                           (dict(alpha=-0.1), "alpha=-0.1 is out of range")]:
        with pytest.raises(ConfigError) as e:
            deco_mod.DeCoConfig(**params)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="layers index 7 is beyond the model's depth; valid layers are 0..3"):
        with lvlm_fix.apply(lvlm, "deco", layers=[2, 7]):
            pass
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match="prompt_lookup_num_tokens=3: deco edits the last position"):
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "deco"):
            lvlm.model.generate(**batch, max_new_tokens=2, prompt_lookup_num_tokens=3)
