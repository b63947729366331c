"""OPERA: the over-trust score and the scorer by hand, the search against a cache-free transcription of
the release's loop (rollbacks forced), identities, batching, composition and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.hooks.decoding import BeamScorer
from lvlm_fix.interventions.opera import over_trust

# Settings that force both regimes and several rollbacks on the tiny LLaVA: with sigma = 2000 every
# scaled weight of its nearly uniform attention exceeds 1, so the oldest column always has the largest
# product (loc = 0 at every step), and a low threshold and no minimum location let it roll back.
FORCED = {"num_attn_candidates": 3, "threshold": 2, "bonus_tokens": 2, "min_rollback_loc": 0,
          "scale_factor": 2000.0}


# -- by hand ----------------------------------------------------------------------------------------
def test_column_scores_by_hand():
    window = torch.tensor([[[0.5, 0.0], [0.25, 0.5]]])  # response tokens 0 and 1 (row i over columns 0..1)
    cand = torch.tensor([[[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]]])  # two candidates' rows over columns 0..2
    phi, loc = over_trust(window, cand, 4.0)
    # candidate 0: phi_0 = 1e-7 (4*.5)(4*.25)(4*.1) = 0.8e-7, phi_1 = 1e-7 (4*.5)(4*.2) = 1.6e-7, phi_2 = 1.2e-7
    # candidate 1: phi_0 = 1e-7 * 2 * 1 * 1.2 = 2.4e-7, phi_1 = 1e-7 * 2 * 0.4 = 0.8e-7, phi_2 = 0.8e-7
    assert torch.allclose(phi, torch.tensor([[1.6e-7, 2.4e-7]]), rtol=1e-6)
    assert loc.tolist() == [[1, 0]]


def test_the_release_fp16_buffer_is_a_step_function():
    window = torch.full((1, 3, 3), 0.5).tril()
    cand = torch.full((1, 1, 4), 0.5)
    fp32, _ = over_trust(window, cand, 200.0)  # 100^4 * 1e-7 = 10: a penalty of 10
    fp16, _ = over_trust(window, cand, 200.0, fp16=True)  # the product overflows fp16 first: inf
    assert fp32.item() == pytest.approx(10.0, rel=1e-5) and fp16.item() == float("inf")
    small, _ = over_trust(window, cand, 20.0, fp16=True)  # 1e-7 * 10^4 = 1e-3, below fp16's reach of 1e-7 * 65504
    assert 0 < small.item() < 6.6e-3


def test_beam_scorer_by_hand():
    scorer = BeamScorer(2, length_penalty=1.0, early_stopping=False, keep=1, max_length=10)
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    scores = torch.tensor([-0.3, -0.6, -0.9, -1.2])
    tokens = torch.tensor([9, 5, 9, 6])  # 9 is EOS: at rank 0 it finishes beam 0; at rank 2 (>= beams) it is skipped
    beams = torch.tensor([0, 1, 1, 0])
    s, t, b = scorer.process(ids, scores, tokens, beams, {9}, pad=0)
    assert t.tolist() == [5, 6] and b.tolist() == [1, 0] and s.tolist() == pytest.approx([-0.6, -1.2])
    assert [(round(sc, 6), h.tolist()) for sc, h in scorer.hyps] == [(-0.1, [1, 2, 3])]  # -0.3 / 3: the prompt counts
    out, best = scorer.finalize(torch.tensor([[1, 2, 4, 5], [1, 2, 3, 6]]), s, [9], pad=0)
    # running beams: -0.6/4 = -0.15 and -1.2/4 = -0.3; the finished one (-0.1) wins and gets its EOS back
    assert out.tolist() == [[1, 2, 3, 9]] and best.tolist() == pytest.approx([-0.1])


# -- a cache-free transcription of the release's loop ----------------------------------------------
class ReleaseScorer:
    """transformers 4.29 BeamSearchScorer for one sample (beam_search.py:215-330, 861-929)."""

    def __init__(self, beams, max_length):
        self.beams, self.max_length, self.hyps, self.worst, self.done = beams, max_length, [], 1e9, False

    def add(self, hyp, s):
        score = s / hyp.shape[-1]
        if len(self.hyps) < self.beams or score > self.worst:
            self.hyps.append((score, hyp))
            if len(self.hyps) > self.beams:
                order = sorted((sc, i) for i, (sc, _) in enumerate(self.hyps))
                del self.hyps[order[0][1]]
                self.worst = order[1][0]
            else:
                self.worst = min(score, self.worst)

    def process(self, ids, scores, tokens, idx, eos):
        nxt = [], [], []
        for rank in range(len(tokens)):
            if int(tokens[rank]) in eos:
                if rank < self.beams:
                    self.add(ids[idx[rank]].clone(), float(scores[rank]))
            else:
                for lst, v in zip(nxt, (scores[rank], tokens[rank], idx[rank])):
                    lst.append(v)
            if len(nxt[0]) == self.beams:
                break
        cur_len = ids.shape[-1] + 1
        self.done = self.done or (len(self.hyps) >= self.beams and self.worst >= float(scores.max()) / cur_len)
        return torch.stack(nxt[0]), torch.stack(nxt[1]), torch.stack(nxt[2])

    def finalize(self, ids, beam_scores):
        if not self.done:
            for b in range(self.beams):
                self.add(ids[b], float(beam_scores[b]))
        return sorted(self.hyps, key=lambda h: h[0])[-1]


def _prompt_embeds(lvlm, inputs):
    """The prompt's input embeddings with its image features merged in, as the language model receives them."""
    seen = {}
    lm = lvlm.model.model.language_model

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            lvlm.model(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]


def _forward(lvlm, prompt, ids):
    """Logits of the last position and the last layer's attention maps, from scratch (no cache). The
    generated tokens are embedded as tokens, even a generated image token, as a cached decode step does."""
    start = prompt.shape[1]
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), lvlm.model.get_input_embeddings()(ids[:, start:])], 1)
    with torch.inference_mode(), lvlm.attention_implementation("eager"):
        out = lvlm.model(inputs_embeds=embeds, output_attentions=True)
    return out.logits[:, -1].float(), out.attentions[-1].float()


def release_opera(lvlm, inputs, *, beams, max_new, num_attn_candidates, threshold, bonus_tokens,
                  min_rollback_loc, scale_factor, penalty_weights=1.0, compat=True):
    """OPERA's opera_beam_search (utils.py:3300-3630) for one row, every query forwarded from scratch.

    compat=True transcribes the release as the paper ran it (fp16 penalty buffer, its history pops and
    rejection slots, locations not reordered); compat=False applies the fixes lvlm-fix documents.
    """
    n, eos = num_attn_candidates, set(lvlm_fix.model.eos_token_ids(lvlm))
    ids = inputs["input_ids"].expand(beams, -1).clone()
    start = ids.shape[1]
    image = inputs["input_ids"][0] == lvlm.image_token_id
    inputs = _prompt_embeds(lvlm, inputs)  # what _forward extends
    scorer = ReleaseScorer(beams, start + max_new)
    beam_scores = torch.zeros(beams)
    beam_scores[1:] = -1e9
    history, locs, rollbacks = [], [], []
    times, rejected = torch.zeros(512), [[] for _ in range(512)]
    fixed_rejected: dict = {}
    beam_idx = beam_next = None
    while True:
        state = {"ids": ids.clone(), "scorer": copy.deepcopy(scorer), "beam_scores": beam_scores.clone(),
                 "beam_idx": beam_idx, "beam_next": beam_next, "step": ids.shape[1] - start}
        logits, attn = _forward(lvlm, inputs, ids)
        previous = attn.amax(1)  # [beams, q, k]: every row of the current beams, from scratch
        cand_scores, cand = logits.topk(n, dim=-1)
        squares = []
        for k in range(n):
            _, a = _forward(lvlm, inputs, torch.cat([ids, cand[:, k:k + 1]], 1))
            sq = torch.cat([previous, previous.new_zeros(beams, previous.shape[1], 1)], -1)
            squares.append(torch.cat([sq, a.amax(1)[:, -1:]], -2))
        last = torch.stack(squares, 1)
        last = last / last.sum(-1, keepdim=True)
        local = last[:, :, start:, start:]
        local = scale_factor * (local.half() if compat else local)
        size = local.shape[-1]
        buf = torch.zeros(beams, n, size, dtype=torch.float16 if compat else torch.float32)
        for j in range(size):
            buf[..., j] = 1e-7 * local[..., j:, j].prod(-1)
        iota = (last[:, :, -1, :start] * image).sum(-1)
        roll_scores, roll_locs = buf.max(-1)
        loc_b = roll_locs.mode().values
        loc = int(loc_b.mode().values)
        penalty = -iota if size <= bonus_tokens else roll_scores.float()
        locs.append(loc_b)
        state["locs"] = list(locs)
        cand_scores = cand_scores - penalty_weights * penalty
        history.append(state)
        t = size - 1
        target = None
        gathers = torch.stack(locs, 1)  # [beams, steps]
        if all(int((g == loc).sum()) > threshold for g in gathers) and loc >= min_rollback_loc:
            pos = loc + 1
            if times[pos] >= n:
                pos -= 1
            if times[pos] < n and (compat or pos <= t - 1):
                times[pos] += 1
                target = pos
        if target is None:
            step_logits = torch.full_like(logits, -999.0).scatter_(-1, cand, cand_scores)
        elif compat:  # the release's pops (utils.py:3478-3553)
            for j in range(size - target - 2):
                history.pop(-1)
                locs.pop(-1)
                rejected[-(j + 1)] = []
            restored = history[-2]
            ids, scorer, beam_scores = restored["ids"], restored["scorer"], restored["beam_scores"]
            bad = history[-1]["beam_idx"] * logits.shape[-1] + history[-1]["beam_next"]
            step_logits, _ = _forward(lvlm, inputs, ids)
            history.pop(-1)
            locs.pop(-1)
            rejected[target + 1] = []
            step_logits = step_logits - (999.0 + step_logits.min(-1, keepdim=True).values)
            rejected[target] = torch.cat([rejected[target], bad]) if len(rejected[target]) else bad
            step_logits.view(-1)[rejected[target]] = -999.0
            rollbacks.append((t, restored["step"]))
        else:  # the fixes: restore the target's own state, clear the rejections after it, copy the scorer
            restored = history[target]
            after = history[target + 1]
            del history[target + 1:]
            ids, beam_scores = restored["ids"], restored["beam_scores"]
            scorer, locs = copy.deepcopy(restored["scorer"]), list(restored["locs"])
            bad = after["beam_idx"] * logits.shape[-1] + after["beam_next"]
            for p in [p for p in fixed_rejected if p > target]:
                del fixed_rejected[p]
            fixed_rejected[target] = torch.cat([fixed_rejected.get(target, bad[:0]), bad])
            step_logits, _ = _forward(lvlm, inputs, ids)
            step_logits = step_logits - (999.0 + step_logits.min(-1, keepdim=True).values)
            step_logits.view(-1)[fixed_rejected[target]] = -999.0
            rollbacks.append((t, target))
        vocab = step_logits.shape[-1]
        total = (torch.log_softmax(step_logits, -1) + beam_scores[:, None]).view(-1)
        top, flat = total.topk(2 * beams)
        beam_scores, beam_next, beam_idx = scorer.process(ids, top, flat % vocab, flat // vocab, eos)
        ids = torch.cat([ids[beam_idx], beam_next[:, None]], 1)
        if not compat:
            locs = [h[beam_idx] for h in locs]
        if scorer.done or ids.shape[1] >= start + max_new:
            break
    score, best = scorer.finalize(ids, beam_scores)
    return best[start:].tolist(), score, rollbacks


def _ours(lvlm, image, prompt, *, beams, max_new, compat, **params):
    with lvlm_fix.apply(lvlm, "opera", release_compat=compat, **params) as plan:
        batch = lvlm.encode([image], [prompt])
        with torch.inference_mode():
            out = lvlm.model.generate(**batch, max_new_tokens=max_new, num_beams=beams, do_sample=False,
                                      return_dict_in_generate=True, output_scores=True)
        stats = plan.participants[0]._stats
    tokens = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    return tokens, float(out.sequences_scores[0]), [(r["step"], r["to"]) for r in stats["rollbacks"]]


@pytest.mark.parametrize("compat, row", [(True, 0), (False, 1)])
def test_search_equals_a_cache_free_transcription_of_the_release(tiny, images, compat, row):
    lvlm = tiny("llava")
    eos = lvlm_fix.model.eos_token_ids(lvlm)
    batch = lvlm.encode([images[row]], [PROMPTS[row]])
    want, want_score, want_rollbacks = release_opera(lvlm, batch, beams=3, max_new=12, compat=compat, **FORCED)
    got, got_score, got_rollbacks = _ours(lvlm, images[row], PROMPTS[row], beams=3, max_new=12, compat=compat,
                                          **FORCED)
    assert want_rollbacks, "the settings must force a rollback"
    assert got_rollbacks == want_rollbacks
    # the best hypothesis, then (when it ended early) its EOS and padding
    assert got[:len(want)] == want and all(tok in eos or tok == lvlm.pad_token_id for tok in got[len(want):])
    assert got_score == pytest.approx(want_score, abs=1e-5)


def test_search_in_the_penalty_regime_equals_the_transcription(tiny, images):
    """The default scale and no forced location: the continuous fp32 penalty ranks the candidates."""
    lvlm = tiny("llava")
    params = {"num_attn_candidates": 3, "threshold": 15, "bonus_tokens": 2, "min_rollback_loc": 10,
              "scale_factor": 50.0, "penalty_weights": 5e6}  # 1e-7 * products of ~0.1: a weight that matters
    batch = lvlm.encode([images[2]], [PROMPTS[2]])
    want, want_score, _ = release_opera(lvlm, batch, beams=3, max_new=8, compat=False, **params)
    got, got_score, _ = _ours(lvlm, images[2], PROMPTS[2], beams=3, max_new=8, compat=False, **params)
    free, _, _ = _ours(lvlm, images[2], PROMPTS[2], beams=3, max_new=8, compat=False, **{**params, "penalty_weights": 0.0})
    assert got == want and got_score == pytest.approx(want_score, abs=1e-5)
    assert got != free  # the penalty changed the search


def test_branched_candidates_equal_one_forward_each(tiny, images):
    """Alone, OPERA forwards a beam's candidates as one branched forward (a 4D mask); composed, one forward
    each. A composed method that installs nothing (vhr without layers) switches the path: same search."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])

    def run(method, **params):
        with torch.inference_mode(), lvlm_fix.apply(lvlm, method, **params) as plan:
            out = lvlm.model.generate(**batch, max_new_tokens=8, num_beams=3, return_dict_in_generate=True,
                                      output_scores=True)
        return out, plan.report()["opera"]

    branched, one = run("opera", **FORCED)
    each, other = run({"opera": FORCED, "vhr": {"layers": []}})
    assert one["rollbacks"] > 0 and one["forwards"] < other["forwards"]  # fewer forwards for the same candidates
    assert one["candidates"] == other["candidates"] and one["rollback_targets"] == other["rollback_targets"]
    assert torch.equal(branched.sequences, each.sequences)
    # sigma = 2000 makes penalties of ~1e6 and more: compare relatively
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(branched.scores, each.scores))


# -- identities -------------------------------------------------------------------------------------
def test_noop_installs_nothing_and_is_vanilla_beam_search(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    gen = dict(max_new_tokens=5, num_beams=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    before = vars(lvlm.model).get("generate")  # another test's monkeypatch may leave the bound method behind
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        with lvlm_fix.apply(lvlm, "opera", num_attn_candidates=0):
            assert vars(lvlm.model).get("generate") is before  # nothing patched in
            same = lvlm.model.generate(**batch, **gen)
    assert torch.equal(same.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(same.scores, vanilla.scores))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    from lvlm_fix.testing.tiny import build_llava_sized

    path = build_llava_sized(tmp_path_factory.mktemp("opera") / "llava", text_layers=2, text_hidden=32, text_heads=2,
                             vision_layers=1, vision_hidden=32, image_size=32, patch_size=8, vocab_size=406)
    return lvlm_fix.load(path, dtype="float32")


def test_every_candidate_without_penalty_is_vanilla_beam_search(small_vocab, images):
    """N = V, no penalty, no rollback: every token is forwarded and read, and the search is
    generate()'s own beam search (tokens equal, sequence scores up to 4.29's length normalisation)."""
    lvlm = small_vocab
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    gen = dict(max_new_tokens=2, num_beams=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        with lvlm_fix.apply(lvlm, "opera", num_attn_candidates=10_000, penalty_weights=0.0, rollback=False) as plan:
            same = lvlm.model.generate(**batch, **gen)
    report = plan.report()["opera"]
    assert report["candidates"] == report["steps"] * 406 > 0
    assert torch.equal(same.sequences, vanilla.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(same.scores, vanilla.scores)) <= 1e-5
    length, prompt = same.sequences.shape[1], batch["input_ids"].shape[1]
    # 4.29 divides by the whole length, 5.x by the generated one
    assert same.sequences_scores.item() * length == pytest.approx(vanilla.sequences_scores.item() * (length - prompt),
                                                                 abs=1e-4)


def test_math_identity_is_greedy_with_one_beam(tiny, images):
    lvlm = tiny("llava")
    vanilla = lvlm_fix.generate(lvlm, images, PROMPTS, None, max_new_tokens=5)
    same = lvlm_fix.generate(lvlm, images, PROMPTS, "opera", max_new_tokens=5, penalty_weights=0.0, rollback=False,
                             num_attn_candidates=2)
    assert same.texts == vanilla.texts and same.report["opera"]["candidates"] > 0


# -- decoding modes, batches, hooks -----------------------------------------------------------------
def test_left_padded_batch_equals_each_row_alone(tiny, images):
    lvlm = tiny("llava")
    together = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "opera", max_new_tokens=6, num_beams=2, **FORCED)
    assert together.report["opera"]["rollbacks"] > 0 and together.report["opera"]["samples"] == 2
    for i in range(2):
        alone = lvlm_fix.generate(lvlm, images[i:i + 1], PROMPTS[i:i + 1], "opera", max_new_tokens=6, num_beams=2,
                                  **FORCED)
        assert alone.texts[0] == together.texts[i]


def test_batched_outputs_keep_the_padding_and_the_scores(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "opera"):
        out = lvlm.model.generate(**batch, max_new_tokens=4, num_beams=2, num_return_sequences=2,
                                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    prompt = batch["input_ids"].shape[1]
    assert out.sequences.shape[0] == 4 and torch.equal(out.sequences[:, :prompt], batch["input_ids"].repeat_interleave(2, 0))
    assert out.sequences_scores.shape == (4,) and out.scores[0].shape == (4, out.logits[0].shape[-1])


# Rollbacks for some samples only (threshold 2 at the default scale): images 0 and 1 roll back alone, image 2 never.
SOME = {"num_attn_candidates": 3, "threshold": 2, "bonus_tokens": 2, "min_rollback_loc": 0}


def _beam_run(lvlm, images, prompts, params, **gen):
    batch = lvlm.encode(images, prompts)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "opera", **params) as plan:
        out = lvlm.model.generate(**batch, do_sample=False, return_dict_in_generate=True, output_scores=True, **gen)
    return batch, out, plan.report()["opera"]


def _rows_alone(lvlm, images, params, **gen):
    """Generate the three prompts as one batch and each alone; check that every batched row is its search alone
    (left padding kept, right padding after, sequence score, processed scores while it ran, -inf rows after).
    Returns the batch's report and each row's alone."""
    batch, together, report = _beam_run(lvlm, images, PROMPTS, params, **gen)
    width, reports = batch["input_ids"].shape[1], []
    for i in range(len(images)):
        one, alone, alone_report = _beam_run(lvlm, images[i:i + 1], PROMPTS[i:i + 1], params, **gen)
        reports.append({**alone_report, "positions": len(alone.scores)})
        pad = width - one["input_ids"].shape[1]  # this row's left padding in the batch
        row, want = together.sequences[i], alone.sequences[0]
        assert torch.equal(row[:pad], batch["input_ids"][i, :pad]) and torch.equal(row[pad:pad + len(want)], want)
        assert bool((row[pad + len(want):] == lvlm.pad_token_id).all())
        assert together.sequences_scores[i].item() == pytest.approx(alone.sequences_scores[0].item(), abs=1e-5)
        beams = gen["num_beams"]
        for t, scores in enumerate(together.scores):
            mine = scores[i * beams:(i + 1) * beams]
            if t < len(alone.scores):
                assert torch.allclose(mine, alone.scores[t], rtol=1e-4, atol=1e-4)
            else:
                assert bool((mine == -math.inf).all())
    return report, reports


def test_a_batch_where_some_samples_roll_back_equals_each_row_alone(tiny, images):
    """The rolling samples are split off the lock-step batch (their rows, left padding included, into a decoder of
    their own) and the other goes on: every row's tokens and scores are its search alone."""
    report, alone = _rows_alone(tiny("llava"), images, SOME, max_new_tokens=8, num_beams=2)
    rollbacks = [r["rollbacks"] for r in alone]
    assert 0 in rollbacks and max(rollbacks) > 0  # some samples roll back, one does not
    assert report["rollbacks"] == sum(rollbacks) and report["samples"] == 3


def test_a_finished_sample_rides_along_as_padding(tiny, images):
    """With this EOS the first sample's search ends after 5 positions, the others run to 8: its rows stay in the
    lock-step batch as padding and change nothing, for it or the others."""
    report, alone = _rows_alone(tiny("llava"), images, {}, max_new_tokens=8, num_beams=2, eos_token_id=54)
    assert [r["positions"] for r in alone] == [5, 8, 8] and report["steps"] == 5 + 8 + 8


def test_a_lock_step_batch_is_one_generate_call(tiny, images, monkeypatch):
    lvlm = tiny("llava")
    calls = []
    original = lvlm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(lvlm.model, "generate", spy)
    _, out, report = _beam_run(lvlm, images, PROMPTS, {}, max_new_tokens=4, num_beams=2)
    assert calls == [3] and out.sequences.shape[0] == 3 and report["samples"] == 3
    # one branched forward per step for the whole batch (and the prefill), not one per sample
    assert report["forwards"] == report["steps"] // 3 + 1


def test_the_accepted_candidate_equals_a_step_of_its_own(tiny, images, monkeypatch):
    """Each step's chosen tokens reuse their branched forward (cache, logits, attention row) instead of a forward
    of their own; with that reuse switched off (a step per token), the same search, in the penalty regime where
    the rows read from the reused forward decide the ranking."""
    from lvlm_fix.hooks.decoding import Decoder

    lvlm = tiny("llava")
    params = {"num_attn_candidates": 3, "threshold": 15, "bonus_tokens": 2, "min_rollback_loc": 10,
              "scale_factor": 50.0, "penalty_weights": 5e6}
    gen = dict(max_new_tokens=8, num_beams=3, output_logits=True)
    _, reused, reused_report = _beam_run(lvlm, images[:2], PROMPTS[:2], params, **gen)
    monkeypatch.setattr(Decoder, "can_accept", property(lambda self: False))
    _, stepped, stepped_report = _beam_run(lvlm, images[:2], PROMPTS[:2], params, **gen)
    steps = reused_report["steps"] // 2
    assert reused_report["forwards"] == steps + 1 and stepped_report["forwards"] == 2 * steps  # no step forward
    assert torch.equal(reused.sequences, stepped.sequences)
    assert torch.allclose(reused.sequences_scores, stepped.sequences_scores, atol=1e-5)
    for a, b in [*zip(reused.scores, stepped.scores), *zip(reused.logits, stepped.logits)]:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_a_rollback_step_takes_the_fallback(tiny, images, monkeypatch):
    """A rollback chooses from the full vocabulary after a rewind: no branch to reuse, the chosen tokens get a
    forward of their own; the other steps reuse their branch."""
    from lvlm_fix.hooks.decoding import Decoder

    events = []
    for name in ("accept", "step", "rewind"):
        def spy(self, *args, _name=name, _real=getattr(Decoder, name)):
            events.append(_name)
            return _real(self, *args)
        monkeypatch.setattr(Decoder, name, spy)
    lvlm = tiny("llava")
    _, _, report = _beam_run(lvlm, images[:1], PROMPTS[:1], FORCED, max_new_tokens=12, num_beams=3)
    assert report["rollbacks"] > 0 and events.count("rewind") == report["rollbacks"] and "accept" in events
    after = [events[i + 1] for i, e in enumerate(events[:-1]) if e == "rewind"]
    assert after and set(after) == {"step"}


def test_the_plan_sees_every_forward_of_the_loop(tiny, images):
    """A composed head method edits OPERA's forwards: its scaling moves the search's scores."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])

    def run(method):
        with torch.inference_mode(), lvlm_fix.apply(lvlm, method) as plan:
            out = lvlm.model.generate(**batch, max_new_tokens=4, num_beams=2, return_dict_in_generate=True,
                                      output_scores=True)
        return out, plan.report()

    alone, _ = run("opera")
    both, report = run("opera+vhr")
    assert set(report) == {"opera", "vhr"} and report["opera"]["candidates"] > 0
    assert any(any(rows) for rows in report["vhr"]["selected_heads"].values())
    assert (alone.scores[0] - both.scores[0]).abs().max() > 1e-4


# -- composition and refusals -----------------------------------------------------------------------
@pytest.mark.parametrize("other", ["vcd", "m3id"])
def test_a_contrast_stream_is_refused(tiny, other):
    with pytest.raises(ConfigError, match="owns the decoding loop") as e:
        with lvlm_fix.apply(tiny("llava"), f"opera+{other}"):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("gen, needle", [
    ({"do_sample": True}, "do_sample=True"),
    ({"use_cache": False}, "use_cache=False"),
    ({"cache_implementation": "static"}, "static"),
    ({"cache_implementation": "quantized"}, "quantized cache"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
])
def test_unserved_generate_features_are_one_line(tiny, images, gen, needle):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match=needle) as e, torch.inference_mode(), lvlm_fix.apply(lvlm, "opera"):
        lvlm.model.generate(**batch, max_new_tokens=2, num_beams=2, **gen)
    assert "\n" not in str(e.value)


def test_a_batch_that_cannot_be_split_runs_in_lock_step_until_a_rollback_is_refused(tiny, images):
    """Qwen2-VL keeps M-RoPE offsets for the whole batch: its batch runs in lock step (one search per sample, each
    its own), but a sample that must roll back cannot be split off: one line. Alone it rolls back."""
    lvlm = tiny("qwen2_vl")
    together = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "opera", max_new_tokens=3, num_beams=2)
    for i in range(2):
        alone = lvlm_fix.generate(lvlm, images[i:i + 1], PROMPTS[i:i + 1], "opera", max_new_tokens=3, num_beams=2)
        assert alone.texts[0] == together.texts[i]
    with pytest.raises(LvlmFixError, match="one row at a time") as e:
        lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "opera", max_new_tokens=6, num_beams=2, **FORCED)
    assert "\n" not in str(e.value)
    alone = lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "opera", max_new_tokens=6, num_beams=2, **FORCED)
    assert alone.report["opera"]["rollbacks"] > 0


def test_a_composed_batch_refuses_a_split_in_one_line(tiny, images):
    """Composed methods keep per-row state that a split would have to follow: a rollback in a batch is refused."""
    lvlm = tiny("llava")
    with pytest.raises(LvlmFixError, match="only method") as e:
        lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], {"opera": FORCED, "vhr": {"layers": []}}, max_new_tokens=6,
                          num_beams=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params, needle", [
    ({"scale_factor": 0.0}, "scale_factor"),
    ({"num_attn_candidates": -1}, "num_attn_candidates"),
    ({"threshold": 1.5}, "threshold"),
])
def test_bad_values_are_one_line(params, needle):
    from lvlm_fix.interventions import build_methods

    with pytest.raises(ConfigError, match=needle) as e:
        build_methods("opera", **params)
    assert "\n" not in str(e.value)


def test_positional_generate_arguments_reach_generate(tiny, images):
    """generate(input_ids, generation_config, ...) positionally: the patched generate() names them as generate() does."""
    from transformers import GenerationConfig

    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "opera") as plan:
        positional = lvlm.model.generate(batch["input_ids"], config, attention_mask=batch["attention_mask"],
                                         pixel_values=batch["pixel_values"])
        named = lvlm.model.generate(**batch, generation_config=config)
    assert torch.equal(positional, named) and plan.report()["opera"]["samples"] == 4



def test_stop_strings_are_refused_in_one_line(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match="stop_strings is not served") as e, torch.inference_mode(), \
            lvlm_fix.apply(lvlm, "opera"):
        lvlm.model.generate(**batch, max_new_tokens=4, num_beams=2, stop_strings=["a"], tokenizer=lvlm.tokenizer)
    assert "\n" not in str(e.value)
