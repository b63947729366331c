"""ONLY: the hand-computed core, and generate() against a transcription of the release's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lvlm_fix
import lvlm_fix.interventions.only as only_module
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.only import key_segments, only_combine, segment_entropy, select_heads

GEN = {"output_logits": True, "return_dict_in_generate": True}


# -- (a) the core formulas, worked out by hand ---------------------------------------------------------
def test_head_selection_by_hand():
    """Keys: 0 the BOS, 1-2 text, 3-5 image. Head 0: text [.2, .2] has std 0 (nothing above the mean);
    image [.1, .1, .3]: mean .1667, unbiased std .1155, so .3 > .2821 is filtered; both segments then
    spread evenly over two keys: TVER = ln 2 / ln 2 = 1. Head 1: text [.3, .1] (threshold .3414) and
    image [.2, .2, .1] (threshold .2244) keep everything: H_text = 0.5623, H_image = 1.0549,
    TVER = 0.533 < mean 0.767: removed (zeroed). The BOS weight is never filtered."""
    probs = torch.tensor([[[0.1, 0.2, 0.2, 0.1, 0.1, 0.3], [0.1, 0.3, 0.1, 0.2, 0.2, 0.1]]])
    image = torch.tensor([[False, False, False, True, True, True]])
    segments = key_segments(torch.ones_like(image), image, exclude_first=True)
    assert segments[0].tolist() == [[False, True, True, False, False, False], image[0].tolist()]
    kept, removed = select_heads(probs, segments)
    assert removed.tolist() == [[False, True]]
    assert kept[0, 0].tolist() == pytest.approx([0.1, 0.2, 0.2, 0.1, 0.1, 0.0])
    assert kept[0, 1].tolist() == [0.0] * 6
    # A row without image: H_image = +inf, every TVER is 0, none below the mean: no head removed.
    kept, removed = select_heads(probs, key_segments(torch.ones_like(image), torch.zeros_like(image), True))
    assert not removed.any()
    # Nothing left in a segment: H_text = 0 (TVER 0, removed beside a head with TVER > 0), H_image = +inf (TVER 0).
    for empty in ([1, 2], [3, 4, 5]):
        zeroed = probs.clone()
        zeroed[0, 0, empty] = 0.0
        assert select_heads(zeroed, segments)[1].tolist() == [[True, False]], empty
    # The entropy of the release: -sum p log(p + 1e-6), unnormalised zeros included (float64 here).
    h = segment_entropy(torch.tensor([[[0.1, 0.3, 0.3, 0.0]]], dtype=torch.float64), segments[:, :, :4])[0, 0]
    assert h[0].item() == pytest.approx(-math.log(0.5 + 1e-6), abs=1e-12) and h[1].isnan()  # image: all zero
    # Left padding: the first valid key is the BOS, padding is in no segment.
    valid = torch.tensor([[False, True, True, True]])
    assert key_segments(valid, torch.tensor([[False, False, True, False]]), True)[0].tolist() == [
        [False, False, False, True], [False, False, True, False]]


def test_gated_combination_by_hand():
    """main [2, 1, 0], side [0, 1, 2]: d = 2 |0.665 - 0.090| = 1.151. gamma 2: collaborative
    main + 3 side = [2, 4, 6]; gamma 1: contrastive 2 main - side = [4, 1, -2]; beta 0.3 cuts the tokens
    with main < 2 + ln 0.3 = 0.796 (token 2). Rows gate independently."""
    main = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    side = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # row 1: d = 0
    out, collaborative = only_combine(main, side, alpha_pos=3.0, alpha_neg=1.0, gamma=1.0, beta=0.3)
    assert collaborative.tolist() == [False, True]
    assert out.tolist() == [[4.0, 1.0, -math.inf], [8.0, 4.0, -math.inf]]
    out, collaborative = only_combine(main[:1], side[:1], alpha_pos=3.0, alpha_neg=1.0, gamma=2.0, beta=0.3)
    assert collaborative.tolist() == [True] and out.tolist() == [[2.0, 4.0, -math.inf]]
    # the gate is strict: d = 0 is not below gamma = 0, so identical rows take the contrastive branch
    out, collaborative = only_combine(main[1:], side[1:], alpha_pos=3.0, alpha_neg=1.0, gamma=0.0, beta=0.0)
    assert collaborative.tolist() == [False] and torch.equal(out, main[1:])
    # beta 0 cuts nothing; zero weights return main exactly
    out, _ = only_combine(main, side, alpha_pos=0.0, alpha_neg=0.0, gamma=1.0, beta=0.0)
    assert torch.equal(out, main)
    # a token masked in either input stays -inf in both branches (not NaN, not +inf), even without a cut
    inf = math.inf
    main, side = torch.tensor([[1.0, -inf, 0.0]]), torch.tensor([[-inf, -inf, 0.5]])
    for gamma in (0.0, 2.0):
        out, _ = only_combine(main, side, alpha_pos=3.0, alpha_neg=1.0, gamma=gamma, beta=0.0)
        assert out[0, :2].tolist() == [-inf, -inf] and out[0, 2].isfinite()


# -- (b) the release's formulas, transcribed here, on plain forwards ---------------------------------------
# A plain eager attention that, at layer REF["layer"], also builds the release's side attention output
# (modeling_llama.py of the ONLY release, written from its description, batch 1, LLaVA layout read from
# the prompt): text keys [1, s) + [e, k), image keys [s, e), filtered per segment over every query row,
# entropies of the last row, heads below the mean TVER zeroed, then o_proj.
REF: dict = {"layer": -1, "span": None}


def release_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query.float() @ key.float().transpose(-1, -2) * scaling
    q, k = scores.shape[-2:]
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q) if attention_mask is None else attention_mask[..., :k]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = scores.softmax(-1)
    if module.layer_idx == REF["layer"]:
        s, e = REF["span"]
        a = probs.to(query.dtype).clone()
        text = torch.cat([a[..., 1:s], a[..., e:]], dim=-1)
        text = torch.where(text > text.mean(-1, keepdim=True) + text.std(-1, keepdim=True), 0.0, text)
        a[..., 1:s], a[..., e:] = text[..., : s - 1], text[..., s - 1:]
        text_p = (text / text.sum(-1, keepdim=True))[:, :, -1]
        img = a[..., s:e]
        img = torch.where(img > img.mean(-1, keepdim=True) + img.std(-1, keepdim=True), 0.0, img)
        a[..., s:e] = img
        img_p = (img / img.sum(-1, keepdim=True))[:, :, -1]
        h_text = torch.nan_to_num(-(text_p * torch.log(text_p + 1e-6)).sum(-1), nan=0.0)
        h_img = torch.nan_to_num(-(img_p * torch.log(img_p + 1e-6)).sum(-1), nan=float("inf"))
        ratio = (h_text / h_img).squeeze(0)
        removed = torch.where(ratio < ratio.mean())[0]
        a[:, removed] = 0
        side = (a @ value).transpose(1, 2).reshape(1, q, -1)
        REF.update(a_cd=module.o_proj(side), removed=sorted(removed.tolist()))
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


AttentionInterface.register("only_release", release_attention)
AttentionMaskInterface.register("only_release", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def release_step(lvlm, inputs, layers, alpha_pos, alpha_neg, gamma, beta):
    """The release's next-token logits for one forward of batch-1 ``inputs``: ``(combined, main, removed, d)``."""
    image = (inputs["input_ids"][0] == lvlm.image_token_id).nonzero()[:, 0]
    REF.update(layer=layers[0], span=(int(image[0]), int(image[-1]) + 1))
    last = lvlm.text_layers[-1]
    seen = {}
    handles = [last.register_forward_pre_hook(lambda m, a, kw: seen.update(h_in=a[0] if a else kw["hidden_states"]),
                                              with_kwargs=True),
               last.register_forward_hook(lambda m, a, o: seen.update(h_out=o[0] if isinstance(o, tuple) else o))]
    pos = lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    try:
        with torch.inference_mode(), lvlm.attention_implementation("only_release"):
            main = lvlm.model(**inputs, position_ids=pos).logits[:, -1].float()
            # modeling_llama.py (last layer) and llava_llama.py: the recipe on every position
            r = 0.2 * seen["h_in"] + last.input_layernorm(REF["a_cd"])
            h_cd = r + last.mlp(last.post_attention_layernorm(r))
            norm = lvlm.model.model.language_model.norm
            side = lvlm.model.lm_head(norm(h_cd) + 0.5 * norm(seen["h_out"]))[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    # only_sample.py: d summed over batch and vocabulary, one branch, the cut on the main logits
    d = (main.softmax(-1) - side.softmax(-1)).abs().sum()
    diffs = main + alpha_pos * side if d < gamma else (1 + alpha_neg) * main - alpha_neg * side
    out = diffs.masked_fill(main < torch.log(torch.tensor(beta)) + main.amax(-1, keepdim=True), -math.inf)
    return out, main, REF["removed"], float(d)


def _grown(inputs, token):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], token.view(1, 1)], 1)
    if "attention_mask" in inputs:
        out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(out["input_ids"][:, :1])], 1)
    return out


def _same(a, b, atol=1e-4):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=atol)


@pytest.fixture
def spy(monkeypatch):
    """What the method selected and combined, each forward: its removed heads, its d and branch, its main logits."""
    seen = {"removed": [], "main": [], "collaborative": []}
    select, combine = only_module.select_heads, only_module.only_combine

    def select_spy(probs, segments):
        kept, removed = select(probs, segments)
        seen["removed"].append([sorted(r.nonzero()[:, 0].tolist()) for r in removed])
        return kept, removed

    def combine_spy(main, side, *args):
        out, collaborative = combine(main, side, *args)
        seen["main"].append(main.clone())
        seen["collaborative"].append(collaborative.tolist())
        return out, collaborative

    monkeypatch.setattr(only_module, "select_heads", select_spy)
    monkeypatch.setattr(only_module, "only_combine", combine_spy)
    return seen


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_decode_steps_equal_the_release(mode, gamma, tiny, images, spy):
    """Prefill and 5 decode steps of one row, through generate(): the removed heads exactly, the branch,
    the main logits untouched (vanilla's), and the combined logits after the cut (-inf pattern exact)
    equal the transcription's on plain forwards of the growing sequence. gamma 0: every step contrastive;
    gamma 2: collaborative. layer 1, beta 0.5 so that the cut cuts on these flat distributions."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    params = dict(layers=[1], alpha_pos=3.0, alpha_neg=1.0, gamma=gamma, beta=0.5)
    gen = {"do_sample": True, "top_k": 0} if mode == "sampling" else {"do_sample": False}
    torch.manual_seed(1)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "only", **params) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=6, **gen, **GEN)
    inputs, cut = batch, 0
    for step in range(6):
        ref, main, removed, d = release_step(lvlm, inputs, **params)
        assert spy["removed"][step] == [removed], step
        assert spy["collaborative"][step] == [d < gamma], step
        assert torch.allclose(spy["main"][step], main, atol=1e-5), step  # the main stream is vanilla's
        assert _same(out.logits[step], ref), step
        cut += int(ref.isinf().sum())
        inputs = _grown(inputs, out.sequences[0, batch["input_ids"].shape[1] + step])
    assert cut > 0 and any(spy["removed"])  # the cut and the head removal both acted
    assert plan.report()["only"]["collaborative_share"] == (1.0 if gamma == 2.0 else 0.0)
    if mode == "greedy":
        assert torch.equal(out.sequences[0, -6:], torch.stack([lg[0].argmax() for lg in out.logits]))


# -- (c) no-op and math identity, (d) batches and beams through generate() ---------------------------------
def test_noop_is_bit_identical_and_math_identity_exact(tiny, images, spy):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
        with lvlm_fix.apply(lvlm, "only", layers=[]) as plan:
            noop = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
        assert plan.report()["only"] == {"layers": [], "alpha_pos": 3.0, "alpha_neg": 1.0, "gamma": 0.2, "beta": 0.1}
        with lvlm_fix.apply(lvlm, "only", alpha_pos=0.0, alpha_neg=0.0, beta=0.0):
            identity = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
        with lvlm_fix.apply(lvlm, "only"):
            active = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
    assert len(spy["main"]) == 8  # the identity run computed its side output at every step
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.logits, vanilla.logits))  # nothing installed
    assert torch.equal(identity.sequences, vanilla.sequences)
    # The main stream is untouched; its logits come from one product with the side row (the shared
    # unembedding), so they equal vanilla's within fp32 rounding rather than bit for bit.
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(identity.logits, vanilla.logits))
    assert max((a - b).abs().max() for a, b in zip(active.logits, vanilla.logits)) > 1e-2  # and the method acts


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_left_padded_batch_equals_each_row_alone(family, tiny, images):
    lvlm = tiny(family)
    params = dict(gamma=0.135, beta=0.3)  # d is 0.12..0.16 here: both branches within one batch
    exclude = {} if family == "llava" else {"exclude_first_key": False}  # Qwen2-VL's prompts start without a BOS
    batch = lvlm.encode(images, PROMPTS)
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "only", **params, **exclude) as plan:
        together = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
    for i in range(3):
        one = lvlm.encode(images[i:i + 1], PROMPTS[i:i + 1])
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "only", **params, **exclude):
            alone = lvlm.model.generate(**one, max_new_tokens=4, do_sample=False, **GEN)
        assert torch.equal(alone.sequences[0, -4:], together.sequences[i, -4:]), i
        for a, b in zip(alone.logits, together.logits):
            assert _same(a[0], b[i], atol=1e-4), i
    assert 0 < plan.report()["only"]["collaborative_share"] < 1


def test_beam_search_first_step_is_the_combination(tiny, images):
    """Beam search decodes the combination: the first step's scores of each beam are the log-softmax of
    the release's combined logits of the prompt (the release itself cannot run beams)."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    params = dict(layers=[0], alpha_pos=3.0, alpha_neg=1.0, gamma=0.0, beta=0.5)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "only", **params):
        out = lvlm.model.generate(**batch, max_new_tokens=3, num_beams=3, num_return_sequences=2, output_scores=True,
                                  return_dict_in_generate=True)
    ref = release_step(lvlm, batch, **params)[0].log_softmax(-1)
    assert out.sequences.shape[0] == 2
    for beam in range(3):
        assert _same(out.scores[0][beam], ref[0], atol=1e-4)


# -- (e) composition, (f) bad input -------------------------------------------------------------------------
def test_composes_with_attention_methods_and_refuses_a_contrast_stream(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "vhr+only", max_new_tokens=3)
    assert set(out.report) == {"vhr", "only"} and out.report["only"]["forwards"] == 3
    with pytest.raises(LvlmFixError, match="'only' edits the next-token logits.*'vcd'") as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "vcd+only", max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_a_layer_of_another_shape_is_refused_in_one_line(tiny, images):
    lvlm = tiny("gemma3")
    with pytest.raises(LvlmFixError, match="not a pre-norm layer .*pre_feedforward_layernorm") as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "only", max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("params", "match"), [
    ({"layers": [4]}, "layers index 4 is beyond the model's depth; valid layers are 0..3"),
    ({"layers": [0, 1]}, r"layers=\[0, 1\]: ONLY intervenes at one layer"),
    ({"gamma": 2.5}, "gamma"),
    ({"beta": -0.1}, "beta"),
])
def test_bad_settings_get_one_line(params, match, tiny, images):
    lvlm = tiny("llava")
    with pytest.raises((ConfigError, LvlmFixError), match=match) as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "only", max_new_tokens=1, **params)
    assert "\n" not in str(e.value)


def test_several_tokens_in_one_decode_forward_are_refused(tiny, images):
    """Assisted decoding and prompt lookup verify several tokens per forward: only the last is rebuilt."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "only"):
        first = lvlm.model(**batch, use_cache=True)
        two = torch.tensor([[5, 6]])
        mask = torch.cat([batch["attention_mask"], torch.ones_like(two)], 1)
        with pytest.raises(LvlmFixError, match="fed 2 tokens") as e:
            lvlm.model(input_ids=two, attention_mask=mask, cache=first.past_key_values)
    assert "\n" not in str(e.value)


def test_without_cache_each_forward_rebuilds_the_same(tiny, images):
    """use_cache=False: every step is a full forward whose last position gives the same combination."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "only", gamma=0.135, beta=0.3):
        cached = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, **GEN)
        full = lvlm.model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, full.sequences)
    assert all(_same(a, b, atol=1e-4) for a, b in zip(cached.logits, full.logits))


def test_reads_the_row_an_attention_edit_at_its_layer_leaves_in_query_chunks_too(tiny, images, spy):
    """PAI amplifying layer l*'s image attention (eager path): ONLY reads the edited row, so its heads differ from
    ONLY alone; with the prefill forced into query chunks of one row the result is the unchunked one."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    methods = {"pai": {"alpha": 4.0, "gamma": 1.0, "layers": [0]}, "only": {"gamma": 0.135, "beta": 0.3}}

    def run(spec, block=None):
        with torch.inference_mode(), lvlm_fix.apply(lvlm, spec) as plan:
            plan.block_bytes = block
            out = lvlm.model.generate(**batch, max_new_tokens=3, do_sample=False, **GEN)
        removed = list(spy["removed"])
        spy["removed"].clear()
        return out, removed

    alone, heads_alone = run({"only": methods["only"]})
    together, heads = run(methods)
    chunked, heads_chunked = run(methods, block=1)
    assert heads != heads_alone and heads_chunked == heads
    assert torch.equal(chunked.sequences, together.sequences)
    assert all(_same(a, b, atol=1e-4) for a, b in zip(chunked.logits, together.logits))
