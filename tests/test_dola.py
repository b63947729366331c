"""DoLa: the divergence and contrast by hand, and generate() against a transcription of the release's loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import RepetitionPenaltyLogitsProcessor

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions import dola as dola_mod
from lvlm_fix.interventions.dola import candidate_layers, dola_contrast, dola_divergence

# --- (a) by hand ---------------------------------------------------------------------------------


def test_divergence_is_the_releases_mean_kl_of_m_against_each_distribution():
    mature = torch.tensor([[0.0, 0.0]])  # q_N = (1/2, 1/2)
    early = torch.tensor([[[math.log(3.0), 0.0]]])  # q_j = (3/4, 1/4)
    m = (0.625, 0.375)
    kl1 = (m[0] * math.log(m[0] / 0.5) + m[1] * math.log(m[1] / 0.5)) / 2  # mean over the 2 tokens
    kl2 = (m[0] * math.log(m[0] / 0.75) + m[1] * math.log(m[1] / 0.25)) / 2
    assert dola_divergence(mature, early).item() == pytest.approx(0.5 * (kl1 + kl2), abs=1e-7)
    # not the textbook JSD 1/2 [KL(q_N||M) + KL(q_j||M)]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]) + 0.75 * math.log(0.75 / m[0])
                 + 0.25 * math.log(0.25 / m[1]))
    assert abs(dola_divergence(mature, early).item() - jsd) > 1e-3


def test_contrast_on_the_head_set_and_the_raw_branch():
    mature = torch.tensor([[0.5, 0.3, 0.2]]).log() + 7.0  # q_N = (.5, .3, .2), shifted: the log-softmax undoes it
    premature = torch.tensor([[0.25, 0.25, 0.5]]).log() - 3.0
    out = dola_contrast(mature, premature, relative_top=0.5)  # keep q >= 0.25: the first two
    assert out[0, :2].tolist() == pytest.approx([math.log(0.5 / 0.25), math.log(0.3 / 0.25)], abs=1e-6)
    assert out[0, 2].item() == -math.inf
    half = dola_contrast(mature, premature, relative_top=0.5, scale=0.5)
    assert half[0, 0].item() == pytest.approx(math.log(0.5) - 0.5 * math.log(0.25), abs=1e-6)
    raw = dola_contrast(mature, premature, relative_top=0.0)  # the release's branch: raw logits, every token
    assert torch.equal(raw, mature - premature)
    assert torch.equal(dola_contrast(mature, premature, 0.0, scale=0.0), mature)


def test_candidate_layers_for_any_depth():
    assert candidate_layers(32) == list(range(0, 32, 2))  # HALC's LLaVA-1.5 setting
    assert candidate_layers(32, tied=True)[0] == 2
    assert candidate_layers(32, "low") == list(range(0, 16, 2)) and candidate_layers(32, "high") == list(range(16, 32, 2))
    assert candidate_layers(48, "low") == list(range(0, 20, 2)) and candidate_layers(48, "high") == list(range(28, 48, 2))
    assert candidate_layers(2, tied=True) == [0]


# --- (b) against a transcription of the release's dola_greedy_decode ------------------------------


def _grown(inputs, tokens):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


def _exits(lvlm, inputs):
    """A plain forward of the whole sequence: the last position's final logits and every ``hidden_states[j]``."""
    pos = lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    with torch.no_grad():
        out = lvlm.model(**inputs, position_ids=pos, output_hidden_states=True)
    return out.logits[:, -1].float(), [h[:, -1] for h in out.hidden_states]


def _release_step(lvlm, inputs, layers, relative_top, *, static=None, norm=False):
    """One step of the release's dola_greedy_decode (voidism/DoLa utils.py 2657-2706), written from its
    formulas: the batch-mean "JS" over the candidates, the relative-top filter, the log-prob contrast."""
    mature, hidden = _exits(lvlm, inputs)
    with torch.no_grad():
        early = {j: lvlm.lm_head(lvlm.final_norm(hidden[j]) if norm else hidden[j]).float() for j in layers}
    js = None
    if static is None:
        stacked = torch.stack([early[j] for j in layers])
        m = 0.5 * (F.softmax(mature, -1)[None] + F.softmax(stacked, -1))
        kl1 = F.kl_div(F.log_softmax(mature, -1)[None], m, reduction="none").mean(-1)
        kl2 = F.kl_div(F.log_softmax(stacked, -1), m, reduction="none").mean(-1)
        js = 0.5 * (kl1 + kl2)
        chosen = layers[int(js.mean(-1).argmax())]  # one layer for the batch
    else:
        chosen = static
    final, base = mature, early[chosen]
    if relative_top > 0:
        final = final.log_softmax(-1)
        thresh = torch.minimum(final.sort(-1, descending=True).values[..., 0], final.amax(-1) + math.log(relative_top))
        final = final.masked_fill(final < thresh[:, None], -math.inf)
        base = base.log_softmax(-1)
        base[0][final[0] < -1e3] = -1e3  # row 0 only, as released (no effect: final is -inf there)
    return final - base, chosen, js, early


def _record(monkeypatch, name):
    seen = []
    real = getattr(dola_mod, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(dola_mod, name, wrapper)
    return seen


def _same(a, b, atol=1e-5):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=atol)


@pytest.mark.parametrize("setting", [
    dict(relative_top=0.1),  # the default: every layer a candidate
    dict(relative_top=0.5, premature_norm=True),  # a head set that cuts on these flat tiny distributions
    dict(relative_top=0.5, premature_layer=1),  # static DoLa
])
def test_generate_equals_the_release_loop_step_by_step(setting, tiny, images, monkeypatch):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[1:2]))
    layers = [0, 1, 2, 3]
    params = {"layers": layers, **setting} if "premature_layer" not in setting else setting
    divergences, exits = _record(monkeypatch, "dola_divergence"), _record(monkeypatch, "early_exit_logits")
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "dola", **params) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=16, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    steps = len(out.scores)
    assert steps >= 8
    length, inputs, cut = batch["input_ids"].shape[1], batch, 0
    chosen_all = []
    for step in range(steps):
        ref, chosen, js, early = _release_step(lvlm, inputs, layers if "layers" in params else [1],
                                               setting["relative_top"], static=setting.get("premature_layer"),
                                               norm=setting.get("premature_norm", False))
        got_exits = exits[step]
        for i, j in enumerate(layers if "layers" in params else [1]):
            assert torch.allclose(got_exits[i], early[j], atol=1e-5), (step, j)  # (a) l^j
        if js is not None:
            assert torch.allclose(divergences[step], js, atol=1e-6), step  # (b) d_j
        chosen_all.append(chosen)
        assert _same(out.scores[step], ref), step  # (c) the head set, exact; (d) F on it
        cut += int(ref.isinf().sum())
        token = out.sequences[:, length + step]
        assert token.item() == ref.argmax(-1).item(), step  # (e) tokens
        inputs = _grown(inputs, token)
    report = plan.report()["dola"]
    counts = {str(j): chosen_all.count(j) for j in sorted(set(chosen_all))}
    assert report["premature_layer_counts"] == counts and report["steps"] == steps  # (b) j*, exact
    assert report["mode"] == ("static" if "premature_layer" in setting else "dynamic")
    if setting["relative_top"] == 0.5:
        assert cut > 0  # the head set did cut


def _scores_under(lvlm, batch, gen, **params):
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "dola", **params):
        return lvlm.model.generate(**batch, **gen, output_scores=True, return_dict_in_generate=True)


def test_sampling_and_the_papers_repetition_penalty_act_on_the_contrast(tiny, images):
    """Sampling: the warpers (temperature) and the LLM paper's repetition penalty 1.2 run on F, after it."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    torch.manual_seed(0)
    out = _scores_under(lvlm, batch, dict(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                                          repetition_penalty=1.2), layers=[0, 2], relative_top=0.5)
    penalty = RepetitionPenaltyLogitsProcessor(1.2)
    length, inputs = batch["input_ids"].shape[1], batch
    for step in range(4):
        ref = _release_step(lvlm, inputs, [0, 2], 0.5)[0]
        seen = out.sequences[:, :length + step]
        assert _same(out.scores[step], penalty(seen, ref) / 0.7), step
        inputs = _grown(inputs, out.sequences[:, length + step])


def test_beam_search_takes_the_log_softmax_of_the_contrast(tiny, images):
    """Beams are served (the release has none): the first step's processed scores are log_softmax(F)."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    beams = 3
    out = _scores_under(lvlm, batch, dict(max_new_tokens=3, num_beams=beams), layers=[0, 2], relative_top=0.5)
    rows = [_release_step(lvlm, _row(batch, i), [0, 2], 0.5)[0] for i in range(2)]
    assert _same(out.scores[0][::beams], torch.cat(rows).log_softmax(-1), atol=1e-4)


def _row(batch, i):
    """Row ``i`` of a left-padded batch, alone (its padding dropped)."""
    keep = batch["attention_mask"][i].bool()
    row = {k: (v[i:i + 1][:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
           for k, v in batch.items()}
    if "pixel_values" in batch and batch["pixel_values"].shape[0] == batch["input_ids"].shape[0]:
        row["pixel_values"] = batch["pixel_values"][i:i + 1]
    return row


# --- (c) identities, (d) batches ------------------------------------------------------------------


def test_noop_is_bit_identical_and_math_identity_runs_the_callbacks(tiny, images):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images, PROMPTS))
    gen = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
    noop = _scores_under(lvlm, batch, dict(max_new_tokens=5, do_sample=False), layers=[])
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.scores, vanilla.scores))
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "dola", contrast_scale=0.0, relative_top=0.0) as plan:
        same = lvlm.model.generate(**batch, **gen)
    assert torch.equal(same.sequences, vanilla.sequences)
    # l^N - 0 * l^j is l^N; l^N itself comes from one product with the early exits (the shared unembedding),
    # so it equals vanilla's within fp32 rounding rather than bit for bit
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(same.scores, vanilla.scores))
    report = plan.report()["dola"]
    assert report["steps"] == 5 and sum(report["premature_layer_counts"].values()) == 15
    changed = _scores_under(lvlm, batch, dict(max_new_tokens=5, do_sample=False), relative_top=0.0)
    assert not torch.allclose(changed.scores[0], vanilla.scores[0])  # the contrast itself does act


@pytest.mark.parametrize("release_compat", [False, True])
def test_left_padded_batch_and_the_releases_batch_mean(release_compat, tiny, images):
    """Per row (default), a left-padded batch gives each row's result alone; with release_compat the batch
    shares the layer of the rows' mean divergence, step by step as the release's transcription. Here the two
    rows choose different layers at the sixth step, which a batch mean cannot give."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    assert (batch["attention_mask"] == 0).any()  # left padding
    params = dict(layers=[0, 1, 2, 3], relative_top=0.5, premature_norm=True, release_compat=release_compat)
    gen = dict(max_new_tokens=6, do_sample=False)
    together = _scores_under(lvlm, batch, gen, **params)
    assert len(together.scores) == 6
    if release_compat:
        length, inputs = batch["input_ids"].shape[1], batch
        for step in range(6):
            ref = _release_step(lvlm, inputs, [0, 1, 2, 3], 0.5, norm=True)[0]
            assert _same(together.scores[step], ref, atol=1e-4), step
            inputs = _grown(inputs, together.sequences[:, length + step])
        return
    for i in range(2):
        alone = _scores_under(lvlm, _row(batch, i), gen, **params)
        assert torch.equal(alone.sequences[0, -6:], together.sequences[i, -6:]), i
        assert all(_same(a[0], t[i], atol=1e-4) for a, t in zip(alone.scores, together.scores)), i


# --- (e) composition, (f) bad input -----------------------------------------------------------------


def test_composition_with_attention_methods_and_refusal_of_a_contrast_stream(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "vhr+dola", max_new_tokens=3)
    assert set(out.report) == {"vhr", "dola"} and out.report["dola"]["steps"] == 3
    with pytest.raises(LvlmFixError, match="'dola' edits the next-token logits.*'vcd'") as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "dola+vcd", max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params, needle", [
    (dict(premature_layer=1, layers=[0, 2]), "premature_layer=1 (static DoLa) takes no candidates"),
    (dict(relative_top=1.5), "relative_top=1.5 is out of range"),
    (dict(contrast_scale=-1.0), "contrast_scale=-1.0 is out of range"),
    (dict(candidate_layers="middle"), "candidate_layers='middle' is not valid"),
])
def test_bad_settings_are_one_line(params, needle):
    with pytest.raises(ConfigError) as e:
        dola_mod.DoLaConfig(**params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_layers_and_prompt_lookup_are_one_line(tiny, images):
    lvlm = tiny("llava")
    with pytest.raises(ConfigError, match="premature_layer index 9 is beyond the model's depth; valid layers are 0..3"):
        with lvlm_fix.apply(lvlm, "dola", premature_layer=9):
            pass
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match="prompt_lookup_num_tokens=2: dola edits the last position") as e:
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "dola"):
            lvlm.model.generate(**batch, max_new_tokens=2, prompt_lookup_num_tokens=2)
    assert "\n" not in str(e.value)
