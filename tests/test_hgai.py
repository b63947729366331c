"""HGAI: the head-mean boost by hand, then generate() against a transcription of the release's patched
attention (one image span, the last query row after the mask), greedy, sampling and beams, a left-padded
batch against each row alone, the identities, composition (with ClearSight, against both releases' edits)
and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lvlm_fix
from conftest import PROMPTS, cli_error
from lvlm_fix.errors import ConfigError
from lvlm_fix.interventions.hgai import HGAIConfig, default_layers, guide_heads

NEG = torch.finfo(torch.float32).min
STRONG = {"alpha": 3.0, "layers": (1, 2)}  # the tiny model's attention is nearly flat: a visible edit


def test_hand_case_boosts_by_the_head_mean_of_absolute_logits():
    # 2 heads, last-row image logits [[1, -2], [3, 0]]: head-mean |z| = [2, 1], boost 0.5 x = [1, 0.5].
    scores = torch.tensor([[[7.0, 1.0, 1.0], [5.0, 1.0, -2.0]], [[8.0, 2.0, 2.0], [6.0, 3.0, 0.0]]])[None]  # [1, 2, 2, 3]
    image = torch.tensor([[False, True, True]])
    out = guide_heads(scores.clone(), image, alpha=0.5)
    assert out[0, :, 1, 1:].tolist() == [[2.0, -1.5], [4.0, 0.5]]  # the last query row
    assert torch.equal(out[:, :, 0], scores[:, :, 0]) and torch.equal(out[..., 0], scores[..., 0])  # other row, text key
    masked = torch.tensor([[[[1.0, NEG, 2.0]]], [[[1.0, NEG, -4.0]]]]).transpose(0, 1)  # [1, 2 heads, 1, 3]
    out = guide_heads(masked.clone(), torch.tensor([[True, True, True]]), alpha=1.0)
    assert out[0, :, 0].tolist() == [[2.0, NEG, 5.0], [2.0, NEG, -1.0]]  # a masked key: not averaged, not boosted


def test_default_layers_follow_the_scripts_loop_bounds():
    assert default_layers(32) == list(range(5, 19))  # --guide-range 5,18, end += 1: range(5, 19), not range(5, 18)
    assert default_layers(40) == list(range(6, 24))
    assert default_layers(8) == [1, 2, 3, 4] and default_layers(4) == [1] and default_layers(1) == [0]


# A transcription of the release's llama_new_forward for a batch of one with one image span
# [start, end): mask added and clamped to the minimum, then the last row's image logits boosted.
# With REF["clearsight"], ClearSight's release edit (scaled before the mask) runs first in its layers.
REF: dict = {"layers": (), "start": 0, "end": 0, "alpha": 0.0, "clearsight": None}


def release_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query.float() @ key.float().transpose(-1, -2) * scaling
    q, k = scores.shape[-2:]
    s, e = REF["start"], REF["end"]
    cs = REF["clearsight"]
    if cs and module.layer_idx in cs["layers"]:
        rows = slice(e, None) if q > e else slice(None)
        scores[:, :, rows, s:e] = cs["enh"] * scores[:, :, rows, s:e]
        scores[:, :, rows, :s] = cs["sup"] * scores[:, :, rows, :s]
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q) if attention_mask is None else attention_mask[..., :k]
    scores = scores.masked_fill(~allowed, NEG)
    if module.layer_idx in REF["layers"]:
        scores[:, :, -1, s:e] = scores[:, :, -1, s:e] + REF["alpha"] * scores[:, :, -1, s:e].abs().mean(1, keepdim=True)
    probs = scores.softmax(-1)
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


AttentionInterface.register("hgai_release", release_attention)
AttentionMaskInterface.register("hgai_release", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _release_generate(lvlm, batch, params, clearsight=None, **gen):
    image = (batch["input_ids"][0] == lvlm.image_token_id).nonzero()[:, 0]
    assert batch["input_ids"].shape[0] == 1 and image[-1] - image[0] + 1 == len(image)  # the one span it sets
    REF.update(layers=params["layers"], start=int(image[0]), end=int(image[-1]) + 1, alpha=params["alpha"],
               clearsight=clearsight)
    with torch.inference_mode(), lvlm.attention_implementation("hgai_release"):
        return lvlm.model.generate(**batch, **gen)


def _generate(lvlm, batch, spec, **gen):
    with torch.inference_mode(), lvlm_fix.apply(lvlm, spec) as plan:
        out = lvlm.model.generate(**batch, **gen)
    return out, plan.report()


GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("params", [{"alpha": 0.5, "layers": (1, 2)}, STRONG])
def test_generate_equals_the_release_transcription(params, tiny, images):
    """Prefill and 5 decode steps: every layer's attention within 1e-6, logits within 1e-5, tokens equal."""
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    gen = dict(GREEDY, output_attentions=True)
    ours, report = _generate(lvlm, batch, {"hgai": params}, **gen)
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
    assert report["hgai"]["layers"] == [1, 2] and report["hgai"]["image_keys"] == [16]
    assert report["hgai"]["calls"] == 2 * 6  # two layers, the prefill and 5 decode steps


def test_sampling_and_beams_equal_the_release_transcription(tiny, images):
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[1:2], PROMPTS[1:2]))
    for gen in (dict(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=0),
                dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)):
        torch.manual_seed(7)
        ours, _ = _generate(lvlm, batch, {"hgai": STRONG}, **gen)
        torch.manual_seed(7)
        assert torch.equal(ours, _release_generate(lvlm, batch, STRONG, **gen)), gen


def test_left_padded_batch_equals_each_row_alone(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    assert (batch["attention_mask"] == 0).any()  # row 1 is left-padded, its image later
    together, report = _generate(lvlm, batch, {"hgai": STRONG}, **GREEDY)
    assert report["hgai"]["image_keys"] == [16, 16]
    for i in range(2):
        alone, _ = _generate(lvlm, lvlm.encode(images[i:i + 1], PROMPTS[i:i + 1]), {"hgai": STRONG}, **GREEDY)
        assert torch.equal(alone.sequences[0, -6:], together.sequences[i, -6:]), i
        assert all(torch.allclose(a[0], b[i], atol=1e-5) for a, b in zip(alone.logits, together.logits)), i


def test_noop_math_identity_and_only_the_last_row(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images, PROMPTS)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **GREEDY)
    noop, report = _generate(lvlm, batch, {"hgai": {"layers": ()}}, **GREEDY)
    assert torch.equal(noop.sequences, vanilla.sequences) and report["hgai"]["layers"] == []
    assert all(torch.equal(a, b) for a, b in zip(noop.logits, vanilla.logits))  # bit for bit
    same, report = _generate(lvlm, batch, {"hgai": {"alpha": 0.0}}, **GREEDY)
    assert torch.equal(same.sequences, vanilla.sequences) and report["hgai"]["calls"] > 0
    assert max((a - b).abs().max() for a, b in zip(same.logits, vanilla.logits)) <= 1e-5
    # At the prefill only the last prompt position is edited: every earlier position is the model's own.
    with torch.inference_mode():
        plain = lvlm.model(**batch).logits
        with lvlm_fix.apply(lvlm, "hgai", **STRONG):
            edited = lvlm.model(**batch).logits
    earlier = batch["attention_mask"][:, :-1].bool()  # a padding position's output is not defined
    assert torch.allclose(edited[:, :-1][earlier], plain[:, :-1][earlier], atol=1e-5)
    assert (edited[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_composition_with_clearsight_equals_both_releases(tiny, images):
    from lvlm_fix.interventions import parse_spec

    assert [n for n, _ in parse_spec("hgai+pai")] == ["hgai", "pai"]  # same stage and order: by name
    lvlm = tiny("llava")
    batch = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    cs = {"enh": 2.0, "sup": 0.5, "layers": (2, 3)}
    ours, report = _generate(lvlm, batch, {"clearsight": cs, "hgai": STRONG}, **GREEDY)
    assert set(report) == {"clearsight", "hgai"}
    release = _release_generate(lvlm, batch, STRONG, clearsight=cs, **GREEDY)
    assert torch.equal(ours.sequences, release.sequences)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(ours.logits, release.logits))
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "hgai+vcd", max_new_tokens=3)
    assert set(out.report) == {"hgai", "vcd"} and out.report["hgai"]["calls"] > 0
    with pytest.raises(ConfigError, match="names 'hgai' twice") as e:
        lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], "hgai+hgai", max_new_tokens=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params, needle", [
    ({"alpha": -0.5}, "alpha=-0.5"), ({"alpha": float("inf")}, "not a finite number"), ({"layers": [1.5]}, "layers"),
])
def test_bad_parameters_raise_config_error(params, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        HGAIConfig(**params)
    assert "\n" not in str(e.value)


def test_layers_beyond_depth_and_cli_errors_are_one_line(capsys, tiny, tiny_dirs, images, tmp_path):
    with pytest.raises(ConfigError, match=r"layers index -5 is beyond the model's depth; valid layers are 0\.\.3"):
        lvlm_fix.generate(tiny("llava"), images[:1], PROMPTS[:1], "hgai", layers=[-5])
    image = tmp_path / "i.png"
    images[0].save(image)
    line = cli_error(capsys, "run", "--model", str(tiny_dirs("llava")), "--image", str(image),
                     "--method", "hgai", "--alpha", "-1")
    assert "alpha" in line and "-1" in line


def test_query_chunks_equal_the_whole_map(tiny, images):
    """A prefill split into one-query chunks: only the chunk with the last query is edited (the others go
    to sdpa), and the generation is the unchunked one."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    whole, report = _generate(lvlm, batch, {"hgai": STRONG}, **GREEDY)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "hgai", **STRONG) as plan:
        plan.block_bytes = 1
        chunked = lvlm.model.generate(**batch, **GREEDY)
    assert torch.equal(chunked.sequences, whole.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunked.logits, whole.logits))
    assert plan.report()["hgai"]["calls"] == report["hgai"]["calls"] == 2 * 6
