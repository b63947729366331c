"""ClearSight (VAF): the signed multiplication by hand, then generate() against a transcription of the
release's attention (hard-coded system and image spans, scaled before the mask), greedy, sampling and
beams, a left-padded batch against each row alone, the identities, composition and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lvlm_fix
from conftest import PROMPTS, cli_error
from lvlm_fix.errors import ConfigError
from lvlm_fix.hooks.plan import AttnContext
from lvlm_fix.interventions.clearsight import ClearSight, ClearSightConfig, default_layers, scale_logits

NEG = torch.finfo(torch.float32).min
STRONG = {"enh": 3.0, "sup": 0.5, "layers": (1, 2)}  # the tiny model's attention is nearly flat: a visible edit


def test_hand_case_multiplies_signed_logits():
    scores = torch.tensor([[-2.0, 1.0, 3.0], [-2.0, 1.0, 3.0], [-2.0, NEG, 3.0]]).reshape(1, 1, 3, 3)
    image = torch.tensor([[False, True, False]])
    system = torch.tensor([[True, False, False]])
    queries = torch.tensor([[True, False, True]])
    out = scale_logits(scores, image, system, queries, enh=1.15, sup=0.95)
    assert torch.allclose(out[0, 0, 0], torch.tensor([-1.9, 1.15, 3.0]))  # the spec's case: a multiplication
    assert torch.equal(out[0, 0, 1], scores[0, 0, 1])  # a query before the image end: untouched
    assert out[0, 0, 2, 1] == NEG and out[0, 0, 2, 0] == pytest.approx(-1.9)  # a masked key stays the minimum
    # enh > 1 makes a negative image logit more negative: not an additive bias (which would raise it).
    assert scale_logits(torch.tensor([[[[-2.0]]]]), torch.tensor([[True]]), torch.tensor([[False]]), None,
                        enh=1.15, sup=1.0).item() == pytest.approx(-2.3)


def test_rows_without_an_image_and_keys_by_position():
    """System keys are the valid keys before the row's own first image token, read by position; a row
    without image tokens is not edited."""
    method = ClearSight(ClearSightConfig(enh=2.0, sup=0.5))
    method._first_image = torch.tensor([2, 0])
    scores = torch.arange(1.0, 7.0).repeat(2, 1, 1, 1)  # [2, 1, 1, 6]
    image = torch.tensor([[False, False, True, True, False, False], [False] * 6])
    valid = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    ctx = AttnContext(layer=0, phase="decode", step=3, query_positions=torch.tensor([5]), image_end=torch.tensor([4, 0]),
                      key_positions=torch.arange(6), key_start=0, image_keys=image, key_valid=valid, q_len=1, k_len=6)
    out = method.pre_softmax(scores, ctx)
    assert out[0, 0, 0].tolist() == [1.0, 1.0, 6.0, 8.0, 5.0, 6.0]  # padding key 0 kept; key 1 system; 2-3 image
    assert torch.equal(out[1], scores[1])
    # A window that dropped the first 2 keys: key 0 of the tensor is position 2, an image key, not system.
    ctx.key_positions, ctx.key_start = torch.arange(2, 8), 2
    ctx.image_keys, ctx.key_valid = torch.tensor([[True, True, False, False, False, False], [False] * 6]), valid | True
    assert method.pre_softmax(scores, ctx)[0, 0, 0].tolist() == [2.0, 4.0, 3.0, 4.0, 5.0, 6.0]


def test_default_layers_are_the_releases_band_scaled_to_depth():
    assert default_layers(32) == list(range(9, 15))  # infer_pope.py: i > 8 and i < 15
    assert default_layers(40) == list(range(11, 19))
    assert default_layers(8) == [2, 3] and default_layers(4) == [1] and default_layers(1) == [0]


# A transcription of the release's AttnAdapter.forward for a batch of one, whose prompt is laid out as
# [S system tokens][N image tokens][text]: the scores are scaled on hard-coded spans, before the mask is added.
REF: dict = {"layers": (), "sys": 0, "img": 0, "enh": 1.0, "sup": 1.0}


def release_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query.float() @ key.float().transpose(-1, -2) * scaling
    q, k = scores.shape[-2:]
    if module.layer_idx in REF["layers"]:
        s, n, enh, sup = REF["sys"], REF["img"], REF["enh"], REF["sup"]
        if q > s + n:  # the prefill: queries after the image
            scores[:, :, s + n:, s:s + n] = enh * scores[:, :, s + n:, s:s + n]
            scores[:, :, s + n:, :s] = sup * scores[:, :, s + n:, :s]
        else:  # a decode step
            scores[:, :, :, s:s + n] = enh * scores[:, :, :, s:s + n]
            scores[:, :, :, :s] = sup * scores[:, :, :, :s]
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q) if attention_mask is None else attention_mask[..., :k]
    probs = scores.masked_fill(~allowed, NEG).softmax(-1)
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


AttentionInterface.register("clearsight_release", release_attention)
AttentionMaskInterface.register("clearsight_release", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _release_generate(lvlm, batch, params, **gen):
    image = (batch["input_ids"][0] == lvlm.image_token_id).nonzero()[:, 0]
    assert batch["input_ids"].shape[0] == 1 and image[-1] - image[0] + 1 == len(image)  # the layout it hard-codes
    REF.update(layers=params["layers"], sys=int(image[0]), img=len(image), enh=params["enh"], sup=params["sup"])
    with torch.inference_mode(), lvlm.attention_implementation("clearsight_release"):
        return lvlm.model.generate(**batch, **gen)


def _generate(lvlm, batch, params, **gen):
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "clearsight", **params) as plan:
        out = lvlm.model.generate(**batch, **gen)
    return out, plan.report()["clearsight"]


GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("params", [{"enh": 1.15, "sup": 0.95, "layers": (1, 2)}, STRONG])
def test_generate_equals_the_release_transcription(params, tiny, images):
    """Prefill and 3 decode steps: every layer's attention within 1e-6, logits within 1e-5, tokens equal."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    gen = dict(GREEDY, output_attentions=True)
    ours, report = _generate(lvlm, batch, params, **gen)
    release = _release_generate(lvlm, batch, params, **gen)
    assert torch.equal(ours.sequences, release.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, release.logits)):
        assert (a - b).abs().max() <= 1e-5, step
    for step, (mine, theirs) in enumerate(zip(ours.attentions, release.attentions)):
        for layer, (a, b) in enumerate(zip(mine, theirs)):
            assert (a.float() - b.float()).abs().max() <= 1e-6, (step, layer)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **GREEDY)
    assert max((a - b).abs().max() for a, b in zip(ours.logits, vanilla.logits)) > 1e-4  # the edit shows
    assert report["layers"] == [1, 2] and report["system_keys"] == [4] and report["image_keys"] == [16]


def test_sampling_and_beams_equal_the_release_transcription(tiny, images):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[1:2], PROMPTS[1:2]))
    for gen in (dict(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=0),
                dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)):
        torch.manual_seed(7)
        ours, _ = _generate(lvlm, batch, STRONG, **gen)
        torch.manual_seed(7)
        assert torch.equal(ours, _release_generate(lvlm, batch, STRONG, **gen)), gen


def test_left_padded_batch_equals_each_row_alone(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    assert (batch["attention_mask"] == 0).any()  # row 1 is left-padded, its image later
    together, report = _generate(lvlm, batch, STRONG, **GREEDY)
    assert report["system_keys"] == [4, 4] and report["image_keys"] == [16, 16]
    for i in range(2):
        alone, _ = _generate(lvlm, lvlm.encode(images[i:i + 1], PROMPTS[i:i + 1]), STRONG, **GREEDY)
        assert torch.equal(alone.sequences[0, -4:], together.sequences[i, -4:]), i
        assert all(torch.allclose(a[0], b[i], atol=1e-5) for a, b in zip(alone.logits, together.logits)), i


def test_noop_math_identity_and_untouched_prompt_rows(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images, PROMPTS)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **GREEDY)
    noop, report = _generate(lvlm, batch, {"layers": ()}, **GREEDY)
    assert torch.equal(noop.sequences, vanilla.sequences) and report["layers"] == []
    assert all(torch.equal(a, b) for a, b in zip(noop.logits, vanilla.logits))  # bit for bit
    same, report = _generate(lvlm, batch, {"enh": 1.0, "sup": 1.0}, **GREEDY)
    assert torch.equal(same.sequences, vanilla.sequences) and report["calls"] > 0
    assert max((a - b).abs().max() for a, b in zip(same.logits, vanilla.logits)) <= 1e-5
    # Queries up to the image end are never edited: at the prefill their outputs are the model's own.
    one = lvlm.encode(images[:1], PROMPTS[:1])
    end = int((one["input_ids"][0] == lvlm.image_token_id).nonzero().max()) + 1
    with torch.inference_mode():
        plain = lvlm.model(**one).logits[0]
        with lvlm_fix.apply(lvlm, "clearsight", **STRONG):
            edited = lvlm.model(**one).logits[0]
    assert torch.allclose(edited[:end], plain[:end], atol=1e-5)
    assert (edited[end:] - plain[end:]).abs().max() > 1e-3


def test_composition(tiny, images):
    from lvlm_fix.interventions import parse_spec

    assert [n for n, _ in parse_spec("pai+clearsight+hgai")] == ["clearsight", "hgai", "pai"]
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "vcd+clearsight+var", max_new_tokens=3, tau=2.5)
    assert set(out.report) == {"clearsight", "var", "vcd"} and out.report["clearsight"]["calls"] > 0
    with pytest.raises(ConfigError, match="names 'clearsight' twice") as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "clearsight+clearsight", max_new_tokens=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params, needle", [
    ({"enh": -1.0}, "enh=-1"), ({"sup": float("nan")}, "not a finite number"), ({"layers": [1.5]}, "layers"),
])
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        ClearSightConfig(**params)
    assert "\n" not in str(e.value)


def test_layers_beyond_depth_and_cli_errors_are_one_line(capsys, tiny, tiny_dirs, images, tmp_path):
    with pytest.raises(ConfigError, match=r"layers index 9 is beyond the model's depth; valid layers are 0\.\.3"):
        lvlm_fix.generate(tiny("llava"), images[:1], PROMPTS[:1], "clearsight", layers=[9])
    image = tmp_path / "i.png"
    images[0].save(image)
    line = cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(image),
                     "--method", "clearsight", "--enh", "-2")
    assert "enh" in line and "-2" in line


def test_query_chunks_equal_the_whole_map(tiny, images):
    """A prefill split into one-query chunks (the long-prompt path: chunks before the image end go to sdpa)
    gives the unchunked generation."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    whole, report = _generate(lvlm, batch, STRONG, **GREEDY)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "clearsight", **STRONG) as plan:
        plan.block_bytes = 1
        chunked = lvlm.model.generate(**batch, **GREEDY)
        calls = plan.report()["clearsight"]["calls"]
    assert torch.equal(chunked.sequences, whole.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunked.logits, whole.logits))
    image = batch["input_ids"] == lvlm.image_token_id
    first_end = int((image * torch.arange(1, image.shape[1] + 1)).amax(1).min())  # the earliest image end of a row
    after = batch["input_ids"].shape[1] - first_end  # prefill chunks with a query after some row's image
    assert calls == report["calls"] - 2 + 2 * after  # per layer: one call per edited chunk instead of one at the prefill
