"""MemVR: the entropy and the retracing by hand; generate() against a transcription of the release's
patched LlamaModel.forward and LlamaMLP (recomputed without a cache, forward by forward), greedy, sampling
and beams; a left-padded batch against each row alone; the identities; composition and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS, cli_error
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions import memvr
from lvlm_fix.interventions.memvr import MemVR, MemVRConfig, default_window, retrace, top_k_entropy

# The tiny random LLaVA's top-10 entropies all lie in [0.998, 1.0]: this threshold makes some layers
# trigger and others not, and a strong ratio makes the retracing show in the logits.
TINY = dict(starting_layer=-1, ending_layer=3, entropy_threshold=0.9996, retracing_ratio=0.9)
# The testbed's lie in [0.15, 0.45]; its window spans every layer that has a next one.
TESTBED = dict(starting_layer=0, ending_layer=7, entropy_threshold=0.3, retracing_ratio=0.5)


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load()


def test_entropy_by_hand():
    # top-2 of [ln 3, 0, -5]: p = [3/4, 1/4], H = -(3/4 ln 3/4 + 1/4 ln 1/4) / ln 2 = 0.811278...; the third is not read
    logits = torch.tensor([[math.log(3.0), 0.0, -5.0], [1.0, 1.0, 1.0]])
    h = top_k_entropy(logits, 2)
    assert abs(h[0].item() - 0.8112781) < 1e-6 and abs(h[1].item() - 1.0) < 1e-6
    assert top_k_entropy(torch.tensor([[0.0, -1e4, -1e4]]), 2).item() == 0.0  # 0 log 0 = 0, not NaN


def test_retrace_by_hand():
    # V = [[1, 0]]; position 0: x = [2, 3] -> M = (x V^T) V = [2, 0], F = [1, -3]: mean|F| = 2, mean|M| = 1.
    # Position 1 is padding: edited, but left out of the means (else they would be 51.5 / 50.5).
    memory = torch.tensor([[[1.0, 0.0]]])
    x = torch.tensor([[[2.0, 3.0], [100.0, 100.0]]])
    f = torch.tensor([[[1.0, -3.0], [50.0, 50.0]]])
    valid = torch.tensor([[True, False]])
    out = retrace(f, x, memory, valid, 0.5)
    # 0.5 F + 0.5 * (2 / 1) M
    assert out[0].tolist() == [[2.5, -1.5], [125.0, 25.0]]
    padded = torch.cat([memory, torch.zeros(1, 3, 2)], 1)  # zero rows of V (a row with fewer image tokens) add nothing
    assert torch.equal(retrace(f, x, padded, valid, 0.5), out)
    # SiLU variant: M = silu(c1 x V^T) V with c1 = 0.5: silu(1) V = [0.731059, 0]; scale 2 / 0.731059
    out = retrace(f, x, memory, valid, 0.5, in_scale=torch.tensor([0.5]))
    assert torch.allclose(out[0, 0], torch.tensor([0.5 + 2.0, -1.5]))
    assert torch.equal(retrace(f, x, torch.zeros(1, 1, 2), valid, 0.0), f)  # M = 0 adds nothing (no 0/0)


def test_default_window_keeps_the_releases_proportions():
    assert default_window(32) == (5, 16)
    assert default_window(8) == (1, 4) and default_window(4) == (0, 2) and default_window(40) == (6, 20)
    assert MemVRConfig().window(28) == (4, 14) and MemVRConfig(ending_layer=9).window(32) == (5, 9)


# -- the release, transcribed ------------------------------------------------------------------------
def release_forward(lvlm, ids, pixel_values, done, start, *, starting_layer, ending_layer, entropy_threshold,
                    retracing_ratio, constants=True, silu=False):
    """One forward of the whole sequence ``ids`` ([1, T]) without a cache, MemVR as the release runs it.

    After each decoder layer, ``lm_head(norm(h))`` at the last position, top-10 entropy; the first layer ``l``
    with ``s < l < e`` above the threshold sets the adapter of layer ``l + 1``: ``W1 = c1 V``, ``W2 = c2 V^T``
    (``c1 = mean|W_up| / mean|V|``, ``c2 = mean|W_down| / mean|V|``), output ``(1 - a) F + a mean|F| /
    mean|A| A`` with ``A = (x W1^T) W2^T`` (``silu``: ``A = silu(x W1^T) W2^T``, the Qwen port, whose
    ``W_up`` lvlm-fix takes as the gate and up projections together), means over the positions it edits.
    Positions before ``start`` were decided by earlier forwards: ``done`` lists ``(a, b, layer)``, each
    group edited with its own means, as the KV cache holds them. Returns the entropies by layer, the
    trigger layer (or None), the last position's logits and this forward's retraced MLP output."""
    layers = lvlm.text_layers
    image = ids[0] == lvlm.image_token_id
    st = {"H": {}, "event": False, "armed": None, "new": None}
    memory = {}

    def keep(module, args, kwargs):
        memory["v"] = (args[0] if args else kwargs["hidden_states"])[0, image].float()

    def after(i):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            logits = lvlm.lm_head(lvlm.final_norm(h))[:, -1].float()
            p = logits.topk(10).values.softmax(-1)
            st["H"][i] = (-(p * p.log()).sum() / math.log(10)).item()
            if st["H"][i] > entropy_threshold and not st["event"] and starting_layer < i < ending_layer:
                st["event"], st["armed"] = True, i + 1
        return hook

    def mlp(j):
        def hook(module, args, out):
            groups = [(a, b) for a, b, layer in done if layer == j]
            if st["armed"] == j:
                groups.append((start, ids.shape[1]))
            if not groups:
                return None
            v = memory["v"]
            ins = [module.up_proj.weight] + ([module.gate_proj.weight] if silu else [])
            c1 = torch.cat([w.flatten() for w in ins]).abs().mean() / v.abs().mean() if constants or silu else 1.0
            c2 = module.down_proj.weight.abs().mean() / v.abs().mean() if constants else 1.0
            w1, w2 = c1 * v, c2 * v.T
            out = out.clone()
            for a, b in groups:
                f, x = out[0, a:b].float(), args[0][0, a:b].float()
                inner = x @ w1.T
                adapter = (torch.nn.functional.silu(inner) if silu else inner) @ w2.T
                scale = f.abs().mean() / adapter.abs().mean()
                out[0, a:b] = f * (1 - retracing_ratio) + scale * adapter * retracing_ratio
                if a == start:
                    st["new"] = out[0, a:b].clone()
            return out
        return hook

    handles = [layers[0].register_forward_pre_hook(keep, with_kwargs=True)]
    handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    handles += [lvlm.mlp(j).register_forward_hook(mlp(j)) for j in range(len(layers))]
    try:
        with torch.inference_mode():
            logits = lvlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                use_cache=False).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    trigger = None if st["armed"] is None else st["armed"] - 1
    return st["H"], trigger, logits, st["new"]


def release_chain(lvlm, inputs, tokens, **params):
    """The release's forwards of a generation that produced ``tokens`` (teacher-forced): per forward
    (entropies, trigger, logits, retraced MLP output)."""
    ids, prompt = inputs["input_ids"], inputs["input_ids"].shape[1]
    done, out = [], []
    for k in range(len(tokens)):
        seq = torch.cat([ids, torch.tensor([tokens[:k]], dtype=ids.dtype)], 1)
        start = 0 if k == 0 else prompt + k - 1
        h, trigger, logits, new = release_forward(lvlm, seq, inputs["pixel_values"], done, start, **params)
        if trigger is not None:
            done.append((start, seq.shape[1], trigger + 1))
        out.append((h, trigger, logits, new))
    return out


@pytest.fixture
def spy(monkeypatch):
    """What the port computed: entropies by (step, row-set, layer read), and the retraced outputs by (step, layer)."""
    seen = {"H": [], "edits": {}}
    at = {}
    residual, mlp_output, entropy = MemVR.residual, MemVR.mlp_output, memvr.top_k_entropy

    def spy_residual(self, hidden, ctx):
        at["where"] = (ctx.step, ctx.layer)
        residual(self, hidden, ctx)

    def spy_entropy(logits, k):
        h = entropy(logits, k)
        step, read = at["where"]
        seen["H"].append((step, read - 1, h.clone()))  # the layer read at read - 1's output
        return h

    def spy_mlp(self, out, x, ctx):
        rows = None if self._armed is None else self._armed[1].tolist()
        new = mlp_output(self, out, x, ctx)
        if new is not None:
            seen["edits"][(ctx.step, ctx.layer)] = (rows, new.clone())
        return new

    monkeypatch.setattr(MemVR, "residual", spy_residual)
    monkeypatch.setattr(MemVR, "mlp_output", spy_mlp)
    monkeypatch.setattr(memvr, "top_k_entropy", spy_entropy)
    return seen


def _triggers(seen, steps):
    by_step = {step: layer - 1 for (step, layer) in seen["edits"]}
    return [by_step.get(k) for k in range(steps)]


@pytest.mark.parametrize("model, params, silu",
                         [("tiny", TINY, False), ("tiny", TINY, True), ("testbed", TESTBED, False)])
def test_greedy_generation_is_the_releases_forward_by_forward(model, params, silu, tiny, testbed, images, spy):
    """Prefill and 5 decode steps: the entropies of every layer the port measures (1e-5), the trigger of
    each forward (exact), the retraced MLP output of every position (1e-5), the logits (1e-5), the tokens; the
    port stops measuring at the trigger. The triggers must differ across forwards (some forward without one)."""
    lvlm = tiny("llava") if model == "tiny" else testbed
    params = {**params, "memory_activation": "silu" if silu else "none"}
    inputs = dict(lvlm.encode(images[:1], PROMPTS[1:2]))
    new = 6
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "memvr", **params):
        out = lvlm.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    plain = {k: v for k, v in params.items() if k != "memory_activation"}
    ref = release_chain(lvlm, inputs, tokens, **plain, silu=silu)
    triggers = [r[1] for r in ref]
    assert _triggers(spy, new) == triggers
    assert len(set(triggers)) > 1, triggers  # the test needs forwards that trigger at different layers (or none)
    s, e = params["starting_layer"], params["ending_layer"]
    for k, (h, trigger, logits, retraced) in enumerate(ref):
        measured = [(layer, value.item()) for step, layer, value in spy["H"] if step == k]
        last = e - 1 if trigger is None else trigger
        assert [layer for layer, _ in measured] == list(range(max(s + 1, 0), last + 1))  # none after the trigger
        assert all(abs(value - h[layer]) < 1e-5 for layer, value in measured)
        if trigger is not None:
            port = spy["edits"][(k, trigger + 1)][1][0]
            assert torch.allclose(port, retraced, atol=1e-5, rtol=1e-5), k
        assert torch.allclose(out.logits[k][0], logits[0], atol=1e-5), k
        assert int(logits.argmax()) == tokens[k]
    vanilla = release_chain(lvlm, inputs, tokens, **{**plain, "entropy_threshold": 2.0})
    assert max((a[2] - b[2]).abs().max().item() for a, b in zip(ref, vanilla)) > 1e-3  # the edit shows


def test_the_releases_scaling_constants_cancel(tiny, images):
    """c1 = mean|W_up|/mean|V| and c2 = mean|W_down|/mean|V| scale W1, W2 and cancel in the normalisation:
    the release with and without them gives the same logits in fp32 (the port leaves them out)."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    with_c = release_forward(lvlm, inputs["input_ids"], inputs["pixel_values"], [], 0, **TINY)
    without = release_forward(lvlm, inputs["input_ids"], inputs["pixel_values"], [], 0, **TINY, constants=False)
    assert with_c[1] is not None and with_c[1] == without[1]
    assert torch.allclose(with_c[2], without[2], atol=1e-6, rtol=1e-6)
    assert torch.allclose(with_c[3], without[3], atol=1e-6, rtol=1e-5)


def test_sampling_follows_the_release_on_the_sampled_tokens(tiny, images, spy):
    """Seeded sampling: each step's raw logits are the release's forward on the tokens sampled so far."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[1:2], PROMPTS[:1]))
    torch.manual_seed(3)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "memvr", **TINY):
        out = lvlm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, temperature=0.7,
                                  top_k=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ref = release_chain(lvlm, inputs, tokens, **TINY)
    assert _triggers(spy, 4) == [r[1] for r in ref]
    for k, r in enumerate(ref):
        assert torch.allclose(out.logits[k][0], r[2][0], atol=1e-5), k


def test_each_beam_is_the_releases_run_of_its_own_tokens(tiny, images):
    """Beam search: each returned beam's score is the mean log-probability of its tokens under the release's
    forwards of that very sequence (so each beam row decided its triggers on its own)."""
    lvlm = tiny("llava")
    inputs = dict(lvlm.encode(images[:1], PROMPTS[:1]))
    new = 4
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "memvr", **TINY):
        out = lvlm.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, num_beams=3,
                                  num_return_sequences=2, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    for row in range(2):
        tokens = out.sequences[row, inputs["input_ids"].shape[1]:].tolist()
        ref = release_chain(lvlm, inputs, tokens, **TINY)
        total = sum(r[2][0].log_softmax(-1)[t].item() for r, t in zip(ref, tokens))
        assert abs(out.sequences_scores[row].item() - total / new) < 1e-4, row


def test_left_padded_batch_equals_each_row_alone(testbed, images, spy):
    """Three prompts of different lengths (left padding): each row's logits and tokens as alone, and rows
    of one forward retrace different layers (the release shares one trigger across the batch)."""
    prompts = ["Is there a dog in the image?", "Describe the image.", "Is there a cup in the image?"]
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = testbed.encode(images, prompts)
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode(), lvlm_fix.apply(testbed, "memvr", **TESTBED):
        together = testbed.model.generate(**batch, **gen)
    per_step = {}
    for (step, layer), (rows, _) in spy["edits"].items():
        per_step.setdefault(step, set()).add(layer)
    assert any(len(layers) > 1 for layers in per_step.values()), spy["edits"].keys()
    for i in range(3):
        with torch.inference_mode(), lvlm_fix.apply(testbed, "memvr", **TESTBED):
            alone = testbed.model.generate(**testbed.encode(images[i:i + 1], prompts[i:i + 1]), **gen)
        assert together.sequences[i, -4:].tolist() == alone.sequences[0, -4:].tolist(), i
        for k in range(4):
            assert torch.allclose(together.logits[k][i], alone.logits[k][0], atol=1e-4), (i, k)


# -- identities --------------------------------------------------------------------------------------
def test_noop_is_bit_identical_and_math_identity_retraces_without_change(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        for config in (MemVRConfig.noop(), MemVRConfig.math_identity()):
            with lvlm_fix.apply(lvlm, "memvr", **config.to_dict()) as plan:
                out = lvlm.model.generate(**batch, **gen)
            assert torch.equal(out.sequences, vanilla.sequences)
            assert all(torch.equal(a, b) for a, b in zip(out.logits, vanilla.logits))
            report = plan.report()["memvr"]
            if config == MemVRConfig.noop():
                assert report["edited_layers"] == [] and report["forwards"] == 0
            else:  # every forward of both rows retraced layer 2 (trigger at layer 1, the window's first)
                assert report["retraced"] == {"2": 8} and report["forwards"] == 8


def test_a_row_without_image_is_left_alone(tiny, images):
    lvlm = tiny("llava")
    text = lvlm.text_only(dict(lvlm.encode(images[:1], PROMPTS[:1])))
    with torch.inference_mode():
        vanilla = lvlm.model(**text).logits
        with lvlm_fix.apply(lvlm, "memvr", **TINY) as plan:
            out = lvlm.model(**text).logits
    assert torch.equal(out, vanilla) and plan.report()["memvr"]["forwards"] == 0


# -- composition and bad input ----------------------------------------------------------------------
def test_composes_with_attention_and_contrast_methods(tiny, images):
    """With VAR and VHR the plan runs every method; with VCD the contrast rows are not retraced (only the
    main rows' forwards are counted)."""
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], {"memvr": TINY, "var": {"tau": 2.5}, "vhr": {}},
                            max_new_tokens=3)
    assert set(out.report) == {"memvr", "var", "vhr"} and out.report["memvr"]["forwards"] == 6
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], {"memvr": TINY, "vcd": {}}, max_new_tokens=3)
    assert out.report["memvr"]["forwards"] == 6 and out.report["vcd"]["stream_ran"]


@pytest.mark.parametrize("params, needle", [
    ({"retracing_ratio": 1.5}, r"retracing_ratio=1.5 is out of range; valid range is \[0, 1\]"),
    ({"memory_activation": "relu"}, "memory_activation='relu' is not valid; choose one of 'none', 'silu'"),
    ({"entropy_top_k": 1}, r"entropy_top_k=1 is out of range"),
    ({"entropy_threshold": float("nan")}, "entropy_threshold=nan is not a finite number"),
])
def test_bad_values_are_one_line(params, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        MemVRConfig(**params)
    assert "\n" not in str(e.value)


def test_what_the_model_cannot_serve_is_one_line(tiny, images, capsys):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(ConfigError, match=r"ending_layer=4: .* give ending_layer <= 3"):
        with lvlm_fix.apply(lvlm, "memvr", ending_layer=4):
            pass
    with pytest.raises(ConfigError, match="entropy_top_k=100000 is larger than the vocabulary"):
        with lvlm_fix.apply(lvlm, "memvr", entropy_top_k=100000):
            pass
    with pytest.raises(LvlmFixError, match="prompt_lookup_num_tokens=2 would feed several tokens") as e:
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "memvr"):
            lvlm.model.generate(**batch, max_new_tokens=2, prompt_lookup_num_tokens=2)
    assert "\n" not in str(e.value)
    line = cli_error(capsys, "run", "--method", "memvr", "--set", "memvr.ending_layer=8", "--prompt", "Describe.")
    assert "ending_layer=8" in line and "ending_layer <= 7" in line


def test_the_early_exit_takes_the_models_final_logit_cap(testbed, images, monkeypatch):
    """A model that caps its final logits (final_logit_softcapping) has the early exit capped too: on the testbed
    a POPE question's entropies stay under 0.75 (nothing retraced); a cap of 0.05 flattens every top-10 (H near 1)."""
    batch = testbed.encode(images[:1], ["Is there a dog in the image?"])
    counts = []
    for cap in (None, 0.05):
        if cap is not None:
            monkeypatch.setattr(testbed.text_config, "final_logit_softcapping", cap, raising=False)
        with torch.inference_mode(), lvlm_fix.apply(testbed, "memvr") as plan:
            testbed.model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        report = plan.report()["memvr"]
        counts.append((report["forwards"], sum(report["retraced"].values())))
    assert counts == [(2, 0), (2, 2)]
