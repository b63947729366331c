"""AvisC: the blind-token selection by hand, the whole method against a transcription of the release's
formulas on the tiny LLaVA, identities, decoding modes, batches, composition and refusals."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.avisc import AvisC, AvisCConfig, select_blind_tokens
from lvlm_fix.testing import check_method

GEN = {"output_logits": True, "return_dict_in_generate": True}


def test_selection_by_hand():
    """Three layers, one text key then four image keys (row 0); row 1 is left padded, image at keys 2..4."""
    maps = torch.tensor([
        [[0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 0.5, 0.3, 0.1, 0.1]],
        [[0.2, 0.5, 0.1, 0.1, 0.1], [0.0, 0.2, 0.2, 0.2, 0.4]],
        [[0.2, 0.1, 0.1, 0.1, 0.5], [0.0, 0.3, 0.1, 0.5, 0.1]],
    ])  # [L, b, k]
    image = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    sel = select_blind_tokens(maps, image, layer_gamma=0.5, lamb=0.5)
    # Row 0: image mass per layer 0.4, 0.8, 0.8 -> w = 0.2, 0.4, 0.4; sorted cumsum 0.4, 0.8, 1.0: one below
    # 0.5, so K = 2, layers 1 and 2. a = (0.3, 0.1, 0.1, 0.3); mean 0.2, unbiased std sqrt(0.04 / 3).
    assert torch.allclose(sel.weights[0], torch.tensor([0.2, 0.4, 0.4]))
    assert sorted(sel.layers[0]) == [1, 2]
    assert torch.allclose(sel.scores[0], torch.tensor([0.3, 0.1, 0.1, 0.3]))
    assert sel.tau[0] == pytest.approx(0.2 + 0.5 * math.sqrt(0.04 / 3))
    # The contrast erases the tokens below tau (the release's mask_idx): it keeps only the blind ones.
    assert sel.masked[0].tolist() == [False, False, True, True, False]
    # Row 1 on its own: image mass 0.5, 0.8, 0.7 (w = 0.25, 0.4, 0.35; cumsum 0.4, 0.75: K = 2, layers 1, 2);
    # a = (0.15, 0.35, 0.25): mean 0.25, std 0.1, tau 0.3 -> only key 3 is blind.
    assert torch.allclose(sel.weights[1], torch.tensor([0.25, 0.4, 0.35]))
    assert sel.layers[1] == [1, 2]
    assert torch.allclose(sel.scores[1], torch.tensor([0.15, 0.35, 0.25]))
    assert sel.tau[1] == pytest.approx(0.3)
    assert sel.masked[1].tolist() == [False, False, True, False, True]
    assert sel.blind == [2, 1]
    # gamma 0.9: every layer counts for row 0; lamb 1: tau above every token, nothing is blind.
    every = select_blind_tokens(maps, image, layer_gamma=0.9, lamb=1.0)
    assert sorted(every.layers[0]) == [0, 1, 2] and every.masked[0].tolist() == [False, True, True, True, True]
    # gamma 1: the cumulative share never passes it; K stops at the number of layers.
    assert len(select_blind_tokens(maps, image, layer_gamma=1.0, lamb=0.5).layers[0]) == 3
    # A row without image: nothing selected, nothing erased.
    none = select_blind_tokens(maps[:, :1], torch.zeros(1, 5, dtype=torch.bool), 0.5, 0.5)
    assert none.layers == [[]] and not none.masked.any()


def test_combine_and_release_nan_guard():
    main = torch.tensor([[2.0, 1.0, -3.0], [0.0, 1.0, 2.0]])
    contrast = torch.tensor([[1.0, 2.0, 0.0], [float("nan"), 0.0, 0.0]])
    m = AvisC(AvisCConfig(alpha=2.0, beta=0.1, release_compat=True))
    out = m.combine(main, contrast, 1)
    # Row 0: 3 l - 2 l' = (4, -1, -9); cut below log(0.1) + 2: key 2 (-3 < -0.30).
    assert out[0].tolist() == [4.0, -1.0, -math.inf]
    assert out[1].tolist() == [0.0, 1.0, 2.0]  # the NaN row falls back to its main logits (3 l - 2 l); none below -0.30
    assert torch.isnan(AvisC(AvisCConfig(alpha=2.0, beta=0.1)).combine(main, contrast, 1)[1, 0])


def _record_layer0_input(lvlm, into):
    """Record what the first decoder layer computes on (its input norm's input: after any pre-hook of the layer)."""
    return lvlm.text_layers[0].input_layernorm.register_forward_pre_hook(lambda mod, args: into.append(args[0].clone()))


# -- the release, transcribed (avisc_sample.py's prefill analysis and contrast, llava_llama.py's edit) -------
def _release_prefill(lvlm, inputs, gamma, lamb):
    """Batch 1, no padding: the release's layer weights, K, layers, per-token scores, tau, mask_idx and the
    edited input embeddings (the layer-0 input of a plain forward, non-blind image rows zeroed)."""
    seen = []
    handle = lvlm.text_layers[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append((args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        out = lvlm.model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    img_idx = (inputs["input_ids"][0] == lvlm.image_token_id).nonzero()[:, 0]
    portion = torch.stack([att.mean(dim=1)[:, -1, img_idx].sum() for att in out.attentions])
    portion = portion / portion.sum()
    norm = portion / portion.sum()  # count_top_p renormalises
    k = int((torch.cumsum(torch.sort(norm, descending=True)[0], 0) < gamma).sum()) + 1
    _, top = torch.topk(portion.float(), k)
    img_att = torch.stack([out.attentions[i].mean(dim=1)[:, -1, img_idx] for i in top], dim=1).mean(dim=1)
    mask_idx = torch.where(img_att < img_att.mean() + img_att.std() * lamb)[1]
    embeds = seen[0].clone()
    embeds[0, img_idx[mask_idx]] = 0.0
    return {"w": portion, "k": k, "layers": top.tolist(), "a": img_att[0], "tau": float(img_att.mean() + img_att.std() * lamb),
            "masked": img_idx[mask_idx], "embeds": embeds, "main_embeds": seen[0]}


def _release_logits(lvlm, inputs, embeds, tokens, alpha, beta):
    """Combined logits of the prefill and each forced token after it: (1 + a) l - a l_method, cut on l."""
    out = []
    embed = lvlm.model.get_input_embeddings()
    for t in range(len(tokens) + 1):
        ids = torch.cat([inputs["input_ids"], tokens[None, :t]], 1)
        main = lvlm.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[:, -1]
        grown = torch.cat([embeds, embed(tokens[None, :t])], 1)
        method = lvlm.model(inputs_embeds=grown).logits[:, -1]
        cutoff = math.log(beta) + main.max(dim=-1, keepdim=True).values
        out.append(((1 + alpha) * main - alpha * method).masked_fill(main < cutoff, -math.inf))
    return out


def _same(a, b, atol=1e-5):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=atol)


@pytest.mark.parametrize("sample", [False, True])
def test_against_the_release_transcription(tiny, images, sample):
    """Prefill selection, the contrast prefill's embeddings (zeros at the non-blind image rows, the rest
    untouched), and 6 steps of combined logits on the tokens the port chose, greedy and sampled."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    gamma, lamb, alpha, beta = 0.5, 1.0, 1.0, 0.7  # beta 0.7: the tiny model's flat logits get cut
    layer0 = []
    hook = _record_layer0_input(lvlm, layer0)
    try:
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "avisc", beta=beta) as plan:
            out = lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=sample, **GEN)
    finally:
        hook.remove()
    method = plan.participants[0]
    sel = method.selection
    with torch.inference_mode():
        ref = _release_prefill(lvlm, inputs, gamma, lamb)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
        expected = _release_logits(lvlm, inputs, ref["embeds"], tokens[:-1], alpha, beta)
    assert torch.allclose(sel.weights[0], ref["w"], atol=1e-6)
    assert len(sel.layers[0]) == ref["k"] and sel.layers[0] == ref["layers"]
    assert torch.allclose(sel.scores[0], ref["a"], atol=1e-6) and sel.tau[0] == pytest.approx(ref["tau"], abs=1e-6)
    assert sel.masked[0].nonzero()[:, 0].tolist() == ref["masked"].tolist()
    assert 0 < len(ref["masked"]) < 16  # some tokens are blind, some are not: the direction is tested
    # layer 0 saw: the main prefill, then the contrast prefill (its edit), then single-token steps.
    assert torch.equal(layer0[0], ref["main_embeds"]) and torch.equal(layer0[1], ref["embeds"])
    assert all(x.shape[1] == 1 for x in layer0[2:])
    image = inputs["input_ids"][0] == lvlm.image_token_id
    blind = image.clone()
    blind[ref["masked"]] = False
    assert blind.sum() == sel.blind[0] and torch.equal(layer0[1][0, blind], layer0[0][0, blind])
    assert (layer0[1][0, ref["masked"]] == 0).all() and torch.equal(layer0[1][0, ~image], layer0[0][0, ~image])
    assert any(torch.isinf(e).any() for e in expected)
    for got, want in zip(out.logits, expected):
        assert _same(got, want)


def _gen(lvlm, inputs, n=4, **kw):
    with torch.inference_mode():
        return lvlm.model.generate(**inputs, max_new_tokens=n, **{"do_sample": False, **GEN, **kw})


def test_noop_bits_and_math_identity(tiny, images):
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    vanilla = _gen(lvlm, inputs)
    with lvlm_fix.apply(lvlm, "avisc", **AvisCConfig.noop().to_dict()) as plan:
        noop = _gen(lvlm, inputs)
    assert plan.participants[0].observed_layers == frozenset()
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.logits, vanilla.logits))
    with lvlm_fix.apply(lvlm, "avisc", **AvisCConfig.math_identity().to_dict()) as plan:
        same = _gen(lvlm, inputs)
    report = plan.report()["avisc"]
    assert report["stream_ran"] and report["steps"] == 4 and len(report["blind_tokens"]) == 2  # the edit ran
    assert torch.equal(same.sequences, vanilla.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(same.logits, vanilla.logits))
    with lvlm_fix.apply(lvlm, "avisc", alpha=1.0, beta=0.0):  # zeros: the same settings do change the logits
        zeros = _gen(lvlm, inputs)
    assert (zeros.logits[0] - vanilla.logits[0]).abs().max() > 1e-3


def test_beams_sampling_and_padded_batch_per_row(tiny, images):
    lvlm = tiny("llava")
    prompts = [PROMPTS[0], PROMPTS[2]]  # different lengths: row 0 is left padded
    inputs = dict(lvlm.encode(images[:2], prompts))
    assert not inputs["attention_mask"].all()
    with lvlm_fix.apply(lvlm, "avisc") as plan:
        both = _gen(lvlm, inputs)
        sel_both = plan.participants[0].selection
        beams = _gen(lvlm, inputs, n=3, num_beams=3)
        sel_beams = plan.participants[0].selection
    for r in range(2):
        alone = dict(lvlm.encode(images[r : r + 1], prompts[r : r + 1]))
        with lvlm_fix.apply(lvlm, "avisc") as plan:
            one = _gen(lvlm, alone)
        sel = plan.participants[0].selection
        assert sel.layers[0] == sel_both.layers[r] and sel.blind[0] == sel_both.blind[r]
        assert torch.equal(one.sequences[0, -4:], both.sequences[r, -4:])
        assert all(_same(a[0], b[r], atol=1e-4) for a, b in zip(one.logits, both.logits))
    # Beams: rows expanded in order, each copy with its row's selection; the first step's logits per beam.
    assert sel_beams.blind == [b for b in sel_both.blind for _ in range(3)]
    assert _same(beams.logits[0], both.logits[0].repeat_interleave(3, 0), atol=1e-4)
    # Sampling: the same first-step logits; every sampled token is one the cut keeps.
    with lvlm_fix.apply(lvlm, "avisc", beta=0.7):
        torch.manual_seed(0)
        sampled = _gen(lvlm, inputs, n=3, do_sample=True)
        cut = _gen(lvlm, inputs, n=1)
    assert _same(sampled.logits[0], cut.logits[0], atol=1e-4)
    for t, logits in enumerate(sampled.logits):
        chosen = sampled.sequences[:, inputs["input_ids"].shape[1] + t]
        assert torch.isfinite(logits.gather(1, chosen[:, None])).all()
    assert torch.isinf(sampled.logits[0]).any()


def _contrast_embeds(lvlm, inputs, **params):
    """The contrast prefill's input embeddings (layer 0's second call) and the method's selection."""
    seen = []
    hook = _record_layer0_input(lvlm, seen)
    try:
        with lvlm_fix.apply(lvlm, "avisc", **params) as plan:
            _gen(lvlm, inputs, n=1)
    finally:
        hook.remove()
    return seen[0], seen[1], plan.participants[0].selection


def test_masking_schemes_and_seeded_noise(tiny, images):
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    main, ones, sel = _contrast_embeds(lvlm, inputs, masking_scheme="ones")
    assert (ones[sel.masked] == 1).all() and torch.equal(ones[~sel.masked], main[~sel.masked])
    rng = torch.get_rng_state()
    _, noise, _ = _contrast_embeds(lvlm, inputs, masking_scheme="noise", noise_seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling's global RNG is untouched
    assert torch.equal(noise[~sel.masked], main[~sel.masked])
    drawn = noise[sel.masked]
    assert abs(drawn.mean().item()) < 0.2 and abs(drawn.std().item() - 1) < 0.2
    # The same image gets the same noise alone as in the batch; another seed gives another noise.
    alone = dict(lvlm.encode(images[1:2], PROMPTS[1:2]))
    _, one, sel1 = _contrast_embeds(lvlm, alone, masking_scheme="noise", noise_seed=3)
    width = one.shape[1]
    assert torch.equal(sel1.masked[0], sel.masked[1, -width:])
    assert torch.allclose(one[0][sel1.masked[0]], noise[1, -width:][sel1.masked[0]])
    _, other, _ = _contrast_embeds(lvlm, alone, masking_scheme="noise", noise_seed=4)
    assert not torch.allclose(other[0][sel1.masked[0]], one[0][sel1.masked[0]])
    # null_contrast: the stream runs on the main rows' own input; no attention is read, no edit made.
    _, null, nsel = _contrast_embeds(lvlm, inputs, null_contrast=True)
    assert nsel is None and torch.equal(null, main)


def test_composition_and_refusals(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "vhr+avisc", max_new_tokens=2)
    assert out.report["avisc"]["stream_ran"] and "vhr" in out.report
    for bad, match in [("vcd+avisc", "each decode a contrast stream"), ("avisc+m3id", "each decode a contrast stream")]:
        with pytest.raises(ConfigError, match=match) as e:
            lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], bad, max_new_tokens=2)
        assert "\n" not in str(e.value)
    for params, match in [({"masking_scheme": "blur"}, "masking_scheme"), ({"layer_gamma": 1.5}, "layer_gamma"),
                          ({"lamb": float("nan")}, "lamb")]:
        with pytest.raises(ConfigError, match=match) as e:
            AvisCConfig(**params)
        assert "\n" not in str(e.value)
    inputs = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    with pytest.raises(LvlmFixError, match="use_cache=False") as e, lvlm_fix.apply(lvlm, "avisc"):
        lvlm.model.generate(**inputs, max_new_tokens=2, use_cache=False)
    assert "\n" not in str(e.value)


def test_conforms():
    check_method(AvisC)


def test_query_chunks_give_the_same_selection_and_logits(tiny, images):
    """Composed with an eager attention method (VAR at its identity, on every layer), the attention row is read
    from the last query chunk when the plan splits the prefill into chunks: the same selection and logits."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    runs = []
    for block in (None, 1):
        with lvlm_fix.apply(lvlm, {"var": {"p": 1.0, "tau": 2.5}, "avisc": {}}) as plan:
            plan.block_bytes = block
            assert plan.eager_layers  # VAR's layers run the eager path: chunked at block 1
            runs.append((_gen(lvlm, inputs, n=2), plan.participants[-1].selection))
    (whole, a), (chunked, b) = runs
    assert torch.equal(a.masked, b.masked) and a.layers == b.layers and 0 < sum(a.blind) < sum(map(len, a.scores))
    assert all(_same(x, y, atol=1e-5) for x, y in zip(whole.logits, chunked.logits))


def test_decode_steps_read_no_attention(tiny, images):
    """The selection needs the prefill only: at decode steps the plan reads no layer for AvisC (its cost)."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    steps = []
    with lvlm_fix.apply(lvlm, "avisc") as plan:
        method = plan.participants[0]
        own = method.observe
        method.observe = lambda probs, ctx: (steps.append(ctx.step), own(probs, ctx))
        _gen(lvlm, inputs, n=3)
        assert plan.observed_layers == frozenset()  # the last forward was a decode step
    assert steps == [0] * lvlm.num_layers and method.selection is not None
