"""The contrast stream inside generate(): beams, sampling order, finished rows, composition, refusals.

Each method's own math is checked against hand computations in test_<method>.py; the identity of
every contrastive method on every family is in test_methods.py. Here: what the mechanism owes to
any method, mostly through VCD (its contrast rows have the main rows' tokens) and M3ID (its rows
are shorter and have no image).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS, cli_error, no_plan_left
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.hooks import hooks_on
from lvlm_fix.hooks.contrast import (
    ContrastStream,
    insert_tokens,
    linear_contrast,
    plausibility_cut,
    rows_without_images,
    text_positions,
)
from lvlm_fix.interventions import METHODS, ContrastConfig, ContrastiveMethod, build_methods, register_method

CONTRAST = ["vcd", "icd", "m3id", "pai"]
# The stream fed the main rows' own input, no cut: every decoding mode must equal vanilla generate().
NULL = {"vcd": {"alpha": 1.0, "beta": 0.0, "null_contrast": True}}


def _generate(lvlm, batch, method=None, **gen):
    gen = {"max_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True, **gen}
    seed = gen.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    if method is None:
        with torch.inference_mode():
            return lvlm.model.generate(**batch, **gen), None
    with torch.inference_mode(), lvlm_fix.apply(lvlm, method) as plan:
        out = lvlm.model.generate(**batch, **gen)
    return out, plan.report()


# Four new tokens: three decode steps after the prefill, enough for the beams to reorder the caches.
# Sampling runs with two sequences per row, which covers plain sampling and the expanded rows at once.
MODES = {"greedy": {"max_new_tokens": 4}, "beams": {"num_beams": 3, "max_new_tokens": 4},
         "sampling x2": {"do_sample": True, "num_return_sequences": 2, "seed": 5, "max_new_tokens": 4}}


# Vanilla generate() per (model, decoding mode), shared by the identity tests: it is deterministic
# (sampling is seeded), and recomputing it for each of the 4 methods x 2 settings was a third of their time.
_VANILLA: dict[tuple[int, str], object] = {}


def _vanilla(lvlm, batch, mode: str):
    key = (id(lvlm.model), mode)
    if key not in _VANILLA:
        _VANILLA[key] = _generate(lvlm, batch, **MODES[mode])[0]
    return _VANILLA[key]


@pytest.mark.parametrize("setting", ["noop", "math_identity"])
@pytest.mark.parametrize("name", CONTRAST)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_identity_settings_are_vanilla_in_every_decoding_mode(family, name, setting, tiny, images):
    """noop() installs nothing; math_identity() runs the stream (its own cache, reordered with the beams,
    combined before the warpers) and changes nothing: generate() must not see either, token for token.
    noop, with nothing in the path, is checked in two modes (greedy, sampling with two sequences per row)."""
    lvlm = tiny(family)
    batch = lvlm.encode(images, PROMPTS)
    config = getattr(METHODS.get(name).config_cls, setting)().to_dict()
    modes = MODES if setting == "math_identity" else ("greedy", "sampling x2")
    for mode in modes:
        gen = MODES[mode]
        vanilla = _vanilla(lvlm, batch, mode)
        same, report = _generate(lvlm, batch, {name: config}, **gen)
        assert torch.equal(same.sequences, vanilla.sequences), mode
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(same.scores, vanilla.scores)), mode
        assert report[name]["stream_ran"] == (setting == "math_identity"), mode
        if setting == "math_identity":
            assert report[name]["steps"] == len(vanilla.scores), mode


def test_beam_reordering_of_the_contrast_cache_matters(tiny, images, monkeypatch):
    """Without reordering the contrast cache with the beams, the null contrast no longer equals plain beam search."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    vanilla, _ = _generate(lvlm, batch, num_beams=3, max_new_tokens=8)
    permutations = []
    real = ContrastStream._reorder_cache

    def reorder_main_only(self, own, cache, beam_idx):
        permutations.append(beam_idx.tolist())
        cache.reorder_cache(beam_idx)  # the main cache only, as a stream that ignores beams would
        return cache

    monkeypatch.setattr(ContrastStream, "_reorder_cache", reorder_main_only)
    broken, _ = _generate(lvlm, batch, NULL, num_beams=3, max_new_tokens=8)
    assert any(p != sorted(p) for p in permutations)  # beams were really permuted
    assert not torch.equal(broken.sequences, vanilla.sequences)
    monkeypatch.setattr(ContrastStream, "_reorder_cache", real)
    fixed, _ = _generate(lvlm, batch, NULL, num_beams=3, max_new_tokens=8)
    assert torch.equal(fixed.sequences, vanilla.sequences)


def test_plausibility_cut_comes_before_temperature(tiny, images):
    """The cut is defined on the unwarped distribution: generate's warpers run on the combined logits."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    beta, temperature = 0.6, 0.25
    with torch.inference_mode():
        main = lvlm.model(**batch).logits[:, -1].float()
    out, _ = _generate(lvlm, batch, {"vcd": {"beta": beta}}, do_sample=True, temperature=temperature, top_k=0,
                       top_p=1.0, max_new_tokens=1, output_logits=True, seed=0)
    raw, warped = out.logits[0], out.scores[0]
    cut_unwarped = main < main.amax(-1, keepdim=True) + torch.log(torch.tensor(beta))
    cut_warped = main / temperature < (main / temperature).amax(-1, keepdim=True) + torch.log(torch.tensor(beta))
    assert not torch.equal(cut_unwarped, cut_warped)  # the two orders would cut different sets here
    assert torch.equal(torch.isinf(raw), cut_unwarped) and torch.equal(torch.isinf(warped), cut_unwarped)
    kept = ~cut_unwarped
    assert torch.allclose(warped[kept], raw[kept] / temperature, atol=1e-5)


@pytest.mark.parametrize("method", ["vcd", "m3id"])
def test_finished_rows_and_left_padding_equal_each_row_alone(method, tiny, images):
    """Row 0 stops at an early EOS while the others go on (generate feeds it pad tokens, the contrast
    rows too); left-padded rows decode as they do alone."""
    lvlm = tiny("qwen2_vl")
    batch = lvlm.encode(images, PROMPTS)
    params = {"m3id": {"lam": 0.5}}.get(method, {})
    probe, _ = _generate(lvlm, batch, {method: params}, max_new_tokens=8)
    start = batch["input_ids"].shape[1]
    row0, others = probe.sequences[0, start:].tolist(), probe.sequences[1:, start:].flatten().tolist()
    # Row 0's end: a token it makes early, for the first time, and no other row ever makes.
    k = next(k for k in range(1, 6) if row0[k] not in row0[:k] and row0[k] not in others)
    gen = {"max_new_tokens": 8, "eos_token_id": row0[k], "pad_token_id": lvlm.tokenizer.pad_token_id}
    together, _ = _generate(lvlm, batch, {method: params}, **gen)
    texts = lvlm.decode(together.sequences, start)
    assert together.sequences.shape[1] == start + 8  # the other rows went on to the end
    assert together.sequences[0, start + k + 1:].eq(gen["pad_token_id"]).all()  # row 0 was fed pads after its end
    for i in range(3):
        alone_batch = lvlm.encode(images[i:i + 1], PROMPTS[i:i + 1])
        alone, _ = _generate(lvlm, alone_batch, {method: params}, **gen)
        assert lvlm.decode(alone.sequences, alone_batch["input_ids"].shape[1]) == [texts[i]], i


def test_sampling_draws_the_same_rng_stream_with_and_without_vcd(tiny, images):
    """The noise has a generator of its own: a sampled generation consumes the global RNG alike."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    gen = {"do_sample": True, "max_new_tokens": 4, "min_new_tokens": 4, "seed": 11}
    _generate(lvlm, batch, **gen)
    after_vanilla = torch.rand(4)
    out, _ = _generate(lvlm, batch, "vcd", **gen)
    after_vcd = torch.rand(4)
    assert torch.equal(after_vanilla, after_vcd)


def test_attention_methods_edit_the_main_stream_only(tiny, images):
    """vhr+vcd with a null contrast: the contrast rows run outside the plan, so the prefill's logits are
    2 l(vhr) - l(vanilla), not l(vhr)."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():
        plain = lvlm.model(**batch).logits[:, -1]
        with lvlm_fix.apply(lvlm, "vhr"):
            vhr = lvlm.model(**batch).logits[:, -1]
    out, report = _generate(lvlm, batch, {"vhr": {}, **NULL}, max_new_tokens=1, output_logits=True)
    assert set(report) == {"vhr", "vcd"} and report["vhr"]["selected_heads"]
    assert torch.allclose(out.logits[0], 2 * vhr - plain, atol=1e-4)
    assert not torch.allclose(vhr, plain, atol=1e-3)


def test_plain_forward_without_generate(tiny, images):
    """A forward of the prompt on its own (no generate, no cache passed) gets the combined last position."""
    lvlm = tiny("gemma3")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():
        vanilla = lvlm.model(**batch).logits
        with lvlm_fix.apply(lvlm, NULL):
            same = lvlm.model(**batch).logits
    assert torch.allclose(same, vanilla, atol=1e-5)


@pytest.mark.parametrize(("gen", "needle"), [
    ({"cache_implementation": "static"}, "static caches"),
    ({"use_cache": False}, "use_cache=False"),
])
def test_what_the_stream_cannot_serve_is_refused_in_one_line(gen, needle, tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():  # vanilla serves it (and transformers may add hooks of its own on the way)
        lvlm.model.generate(**batch, max_new_tokens=3, **gen)
    before = hooks_on(lvlm.model)
    with pytest.raises(LvlmFixError, match=needle) as e, torch.inference_mode(), lvlm_fix.apply(lvlm, "vcd"):
        lvlm.model.generate(**batch, max_new_tokens=3, **gen)
    assert "\n" not in str(e.value)
    assert hooks_on(lvlm.model) == before and no_plan_left(lvlm.model) and "_reorder_cache" not in vars(lvlm.model)


def test_several_new_tokens_per_forward_are_refused(tiny, images):
    """What assisted or speculative decoding, prompt lookup and prefill chunking do after the prefill."""
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vcd"):
        out = lvlm.model(**batch, use_cache=True)
        two = out.logits[:, -1:].argmax(-1).repeat(1, 2)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(two)], 1)
        with pytest.raises(LvlmFixError, match="one new token per row and forward") as e:
            lvlm.model(input_ids=two, attention_mask=mask, cache=out.cache)
    assert "\n" not in str(e.value)


def test_two_contrast_streams_are_refused_before_any_work(capsys):
    with pytest.raises(ConfigError, match="at most one contrastive method"):
        lvlm_fix.interventions.build_methods("vcd+icd")
    lvlm_fix.interventions.build_methods("pai:gamma=1+vcd")  # PAI without guidance has no stream
    line = cli_error(capsys, "run", "--model", "/nonexistent-model-dir", "--method", "m3id+pai")
    assert "at most one contrastive method" in line


def test_the_one_stream_rule_asks_each_method_not_its_class(monkeypatch):
    """Any method that says it decodes a contrast stream counts, whatever its class."""
    monkeypatch.setattr(METHODS.get("vhr"), "contrast_active", lambda self: True, raising=False)
    with pytest.raises(ConfigError, match="'vhr' and 'vcd' each decode a contrast stream"):
        build_methods("vhr+vcd")


# -- the contrastive base: what a method of one's own writes -----------------------------------------
class _WithoutImage(ContrastiveMethod):
    """A plugin's contrastive method: its contrast input and its formula, nothing else."""

    name = "test_without_image"
    contrast_kind = "no image"

    def contrast_rows(self, lvlm, inputs):
        return rows_without_images(lvlm, inputs)

    def combine(self, main, contrast, step):
        return plausibility_cut(main + self.config.alpha * (main - contrast), main, self.config.beta)


@pytest.fixture()
def without_image():
    register_method(_WithoutImage)
    yield _WithoutImage
    METHODS._items.pop(_WithoutImage.name, None)


def test_a_contrastive_method_of_ones_own_works_through_generate(without_image, tiny, images):
    lvlm = tiny("llava")
    name = without_image.name
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():
        main = lvlm.model(**batch).logits[:, -1].float()
        text = lvlm.model(**rows_without_images(lvlm, dict(batch))).logits[:, -1].float()
        with lvlm_fix.apply(lvlm, {name: {"alpha": 0.5, "beta": 0.0}}) as plan:
            combined = lvlm.model(**batch).logits[:, -1]
    assert torch.allclose(combined, main + 0.5 * (main - text), atol=1e-4)
    assert plan.report()[name] == {"alpha": 0.5, "beta": 0.0, "contrast": "no image", "stream_ran": True, "rows": 2,
                                   "contrast_prompt_tokens": plan.report()[name]["contrast_prompt_tokens"], "steps": 1}
    # Through generate(), with the base's config (alpha, beta, null_contrast), identities and one-stream rule.
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], name, max_new_tokens=3)
    assert out.report[name]["steps"] == 3 and out.report[name]["contrast"] == "no image"
    vanilla = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "none", max_new_tokens=3)
    for config in (without_image.config_cls.noop(), without_image.config_cls.math_identity()):
        same = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], {name: config.to_dict()}, max_new_tokens=3)
        assert same.tokens == vanilla.tokens
    with pytest.raises(ConfigError, match="each decode a contrast stream"):
        build_methods(f"{name}+m3id")


def test_a_contrastive_method_of_ones_own_passes_check_method(without_image):
    from lvlm_fix.testing import check_method

    results = {r.check: r.status for r in check_method(without_image)}
    assert {k: v for k, v in results.items() if k != "chunked"} == dict.fromkeys(
        ["noop", "math_identity", "batched", "hygiene"], "passed")  # no attention edit: no chunk to compare


@pytest.mark.parametrize("name", CONTRAST)
def test_the_contrastive_builtins_share_one_base(name):
    cls = METHODS.get(name)
    assert issubclass(cls, ContrastiveMethod) and issubclass(cls.config_cls, ContrastConfig)
    assert "null_contrast" not in inspect.get_annotations(cls.config_cls)  # the base's field, written once


def test_cli_runs_an_attention_method_with_a_contrast_method(capsys, tiny_dirs, images, tmp_path):
    from lvlm_fix.cli.main import main

    image = tmp_path / "i.png"
    images[0].save(image)
    main(["run", "--model", str(tiny_dirs("llava")), "--image", str(image), "--prompt", "Is there a cat?",
          "--method", "vhr+vcd:alpha=0.5", "--max-new-tokens", "3", "--compare"])
    captured = capsys.readouterr()
    assert "[baseline]" in captured.out and "[vhr+vcd:alpha=0.5]" in captured.out
    assert "[vcd touched]" in captured.err and "alpha=0.5" in captured.err and "[vhr touched]" in captured.err


# -- the row edits and the combination, on their own --------------------------------------------------
def test_insert_tokens_edits_every_per_token_tensor_and_shifts_positions():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = torch.stack([text_positions(mask, mask), text_positions(mask, mask) * 10])  # a 2-component layout
    types = torch.ones_like(ids)
    out = insert_tokens({"input_ids": ids, "attention_mask": mask, "position_ids": pos, "token_type_ids": types,
                         "pixel_values": "kept"}, at=torch.tensor([3, 1]), tokens=torch.tensor([90, 91]), remove=1)
    assert out["input_ids"].tolist() == [[0, 0, 5, 90, 91, 7, 8], [1, 90, 91, 3, 4, 5, 6]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert out["token_type_ids"].tolist() == [[1, 1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1]]
    assert out["position_ids"][0].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    # each component continues from its own previous value, later ones shift by len(tokens) - remove
    assert out["position_ids"][1].tolist() == [[0, 0, 0, 1, 2, 21, 31], [0, 1, 2, 21, 31, 41, 51]]
    assert out["pixel_values"] == "kept"


def test_linear_contrast_and_its_cut():
    main = torch.tensor([[2.0, 1.0, -3.0]])
    contrast = torch.tensor([[1.0, 2.0, 0.0]])
    assert torch.equal(linear_contrast(main, contrast, 0.0, 0.0), main)
    assert torch.equal(linear_contrast(main, main, 1.0, 0.0), main)  # 2l - l is exact in floats
    out = linear_contrast(main, contrast, 1.0, 0.1)  # p(-3) / p(2) = e^-5 < 0.1: cut; e^-1 > 0.1: kept
    assert out.tolist() == [[3.0, 0.0, float("-inf")]]


# -- masked tokens: no NaN, and what the model forbids stays forbidden ---------------------------------
def _streams(dtype):
    """Main and contrast logits of one row in ``dtype``: token 1 masked in both by the dtype's minimum,
    token 2 by -inf in both, token 3 by the contrast stream only."""
    low = torch.finfo(dtype).min
    main = torch.tensor([[2.0, low, -math.inf, 1.0]], dtype=dtype)
    contrast = torch.tensor([[1.0, low, -math.inf, low]], dtype=dtype)
    return main, contrast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combinations_of_masked_tokens_are_masked_not_nan(dtype):
    """By hand, for each method's combination with a strong contrast and no cut: token 0 as the formula
    says, tokens 1-3 -inf. Without the rule, (1 + a) min - a min overflows to -inf + inf = NaN in fp32
    (bf16's minimum too), -inf - -inf is NaN, and a token only the contrast masks gets +inf or, with
    fp16's minimum, a logit of 196516: it would be emitted at every step."""
    main, contrast = _streams(dtype)
    lse = math.log(math.exp(2.0) + math.exp(1.0))  # main's log-sum-exp: masked tokens add nothing
    cases = {
        "vcd": ({"alpha": 3.0, "beta": 0.0}, 4 * 2.0 - 3 * 1.0),
        "icd": ({"alpha": 3.0, "beta": 0.0}, 4 * 2.0 - 3 * 1.0),
        # gate open (alpha 1: any top-1 probability below 1), w_1 = e^(ln 2) - 1 = 1: 2 l - l'
        "m3id": ({"alpha": 1.0, "lam": math.log(2.0)}, 2 * 2.0 - 1.0),
        # main + (gamma - 1) (log p - log p'), log p'(0) = 0: the contrast's only finite token
        "pai": ({"gamma": 3.0, "beta": 0.0}, 2.0 + 2 * (2.0 - lse)),
    }
    for name, (params, first) in cases.items():
        cls = METHODS.get(name)
        out = cls(cls.config_cls(**params)).combined(main, contrast, step=1)
        assert out.dtype == torch.float32 and not out.isnan().any(), (name, out)
        assert out[0, 0].item() == pytest.approx(first, abs=1e-5), name
        assert out[0, 1:].tolist() == [-math.inf] * 3, (name, out)


MASKED = [(torch.float32, "min"), (torch.float32, "-inf"), (torch.bfloat16, "min")]
STRONG = {"vcd": {"alpha": 3.0, "beta": 0.0}, "icd": {"alpha": 3.0, "beta": 0.0},
          "m3id": {"alpha": 1.0, "lam": 1.0}, "pai": {"alpha": 0.0, "gamma": 3.0, "beta": 0.0}}


@pytest.mark.parametrize(("dtype", "fill"), MASKED)
def test_generate_on_a_model_that_masks_tokens_never_scores_nan_nor_emits_them(dtype, fill, tiny_dirs, images):
    """A model whose forward sets a third of the vocabulary (among them what it would pick first) to its
    dtype's minimum or to -inf, as chameleon does for its image codes: with every contrastive method at a
    strong setting, no score is NaN and no masked token is ever emitted, greedy, sampled or in beams."""
    lvlm = lvlm_fix.load(tiny_dirs("llava"), dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    with torch.inference_mode():
        first = lvlm.model(**batch).logits[:, -1].argmax(-1)
    vocab = lvlm.model.get_output_embeddings().weight.shape[0]
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[::3] = True
    masked[first] = True
    for special in (lvlm.tokenizer.eos_token_id, lvlm.tokenizer.pad_token_id):  # rows may end and be padded
        if special is not None:
            masked[special] = False

    def mask_logits(module, args, kwargs, output):
        value = torch.finfo(output.logits.dtype).min if fill == "min" else -math.inf
        output.logits[..., masked] = value  # every forward: the main rows' and the contrast rows'

    handle = lvlm.model.register_forward_hook(mask_logits, with_kwargs=True)
    try:
        for name, params in STRONG.items():
            modes = {**MODES, "beams": {"num_beams": 2, "max_new_tokens": 4}}
            for mode, gen in modes.items():
                out, report = _generate(lvlm, batch, {name: params}, **gen)
                assert report[name]["stream_ran"], (name, mode)
                scores = torch.stack(out.scores)
                assert not scores.isnan().any(), (name, mode)
                assert scores[..., masked].eq(-math.inf).all(), (name, mode)
                new = out.sequences[:, batch["input_ids"].shape[1]:]
                assert not masked[new].any(), (name, mode, new.tolist())
    finally:
        handle.remove()
