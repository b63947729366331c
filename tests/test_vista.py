"""VISTA: the steering and the augmentation by hand, and against a transcription of the release's code."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.vista import default_sla_layers, self_logits_augmentation, steer


# -- (a) the formulas by hand -------------------------------------------------------------------------
def test_steering_by_hand():
    out = torch.tensor([[[1.0, 1.0]]])  # ||m|| = sqrt 2
    v = torch.tensor([[-3.0, 0.0]])  # normalize(v) = [-1, 0]; cos(m, -v) = 1/sqrt 2
    # c = 1 + 1/sqrt2; normalize(m) + 1 * c * [-1, 0] = [-1, 1/sqrt2]; its norm sqrt(3/2); times sqrt 2
    want = torch.tensor([-1.0, 1 / math.sqrt(2)]) * math.sqrt(2) / math.sqrt(1.5)
    assert torch.allclose(steer(out, v, lam=1.0)[0, 0], want, atol=1e-6)
    # no adaptive factor: normalize(m) + [-1, 0] = [1/sqrt2 - 1, 1/sqrt2]
    raw = torch.tensor([1 / math.sqrt(2) - 1, 1 / math.sqrt(2)])
    assert torch.allclose(steer(out, v, lam=1.0, adaptive=False)[0, 0], raw / raw.norm() * math.sqrt(2), atol=1e-6)
    # m pointing along v: cos(m, -v) < 0 gives c = 1, and the norm is kept whatever lam
    along = torch.tensor([[[-2.0, 0.0]]])
    assert torch.allclose(steer(along, v, lam=5.0), along)
    assert steer(out.half(), v, lam=1.0).dtype == torch.float16  # the input dtype comes back (the release: .half())


def test_self_logits_augmentation_by_hand():
    final = torch.tensor([[1.0, 2.0]])
    early = torch.tensor([[[3.0, 0.0]], [[5.0, 4.0]]])  # two layers, mean [4, 2]
    assert self_logits_augmentation(final, early, 0.5).tolist() == [[2.5, 2.0]]
    assert torch.equal(self_logits_augmentation(final, early, 0.0), final)


def test_default_sla_layers_scale_the_release_range():
    assert default_sla_layers(32) == [25, 26, 27, 28, 29, 30]  # the release's '25,30', inclusive
    assert default_sla_layers(40) == list(range(31, 39))
    assert default_sla_layers(8) == [6] and default_sla_layers(4) == [2] and default_sla_layers(1) == [0]


# -- (b) against a transcription of the release (tiny random LLaVA, fp32) ----------------------------
class ReleaseVSV(torch.nn.Module):
    """llm_layers.py VSVLayer (non-simple mode, one vector): the MLP output rotated toward the vector.
    Only change: one vector per row (the release runs batch 1) and the input dtype back (the release: half)."""

    def __init__(self, vsv, lam):
        super().__init__()
        self.vsv, self.lam = vsv, lam  # [rows, D]

    def forward(self, x):
        dtype, x = x.dtype, x.float()
        original_norm = torch.norm(x, p=2, dim=-1, keepdim=True)
        vsv = self.vsv[:, None, :]
        lambda_sim = 1.0 + torch.max(torch.tensor([0.0]), F.cosine_similarity(x, -vsv, dim=-1)).unsqueeze(-1)
        y = self.lam * lambda_sim * F.normalize(vsv, dim=-1).repeat(1, x.shape[1], 1)
        x = F.normalize(F.normalize(x, p=2, dim=-1) + y, p=2, dim=-1) * original_norm
        return x.to(dtype)


def _release_vectors(lvlm, row):
    """steering_vector.py: hooks on every decoder layer, the prompt with and without its image tokens, batch 1,
    the output at [:, -1]; v = pos - neg (without the zero matrix's PCA component)."""
    ids = row["input_ids"]
    neg = {"input_ids": ids[ids != lvlm.image_token_id][None]}
    states = {"pos": [], "neg": []}
    for style, kwargs in (("neg", neg), ("pos", row)):
        hooks = [layer.register_forward_hook(
            lambda m, a, o, s=style: states[s].append((o[0] if isinstance(o, tuple) else o)[:, -1]))
            for layer in lvlm.text_layers]
        try:
            with torch.inference_mode():
                lvlm.model(**kwargs, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
    return torch.cat(states["pos"]) - torch.cat(states["neg"])  # [L, D]


class Release:
    """The release's model during generation: VSV layers in the MLPs, and llava_llama.py's logits augmentation
    (mean of lm_head of hidden_states[1:][s..e], no final norm) on the last position of every forward."""

    def __init__(self, lvlm, vectors=None, lam=0.0, sla=None, alpha=0.0, final_norm=False):
        self.lvlm, self.vectors, self.lam, self.sla, self.alpha, self.final_norm = lvlm, vectors, lam, sla, alpha, final_norm

    def __enter__(self):
        layers = self.lvlm.text_layers
        self.mlps = [layer.mlp for layer in layers]
        if self.vectors is not None:
            for i, layer in enumerate(layers):
                layer.mlp = torch.nn.Sequential(self.mlps[i], ReleaseVSV(self.vectors[:, i], self.lam))
        self.hook = self.lvlm.model.register_forward_hook(self._augment) if self.sla else None
        return self

    def _augment(self, module, args, output):
        hidden = output.hidden_states[1:]
        norm = self.lvlm.final_norm if self.final_norm else (lambda h: h)
        aug = torch.stack([self.lvlm.lm_head(norm(hidden[i])) for i in range(self.sla[0], self.sla[1] + 1)]).mean(0)
        output.logits = self.alpha * aug + (1 - self.alpha) * output.logits
        return output

    def __exit__(self, *exc):
        for layer, mlp in zip(self.lvlm.text_layers, self.mlps):
            layer.mlp = mlp
        if self.hook is not None:
            self.hook.remove()


def _vista_prefill(lvlm, batch, **params):
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vista", **params) as plan:
        (vista,) = plan.participants
        seen = {}
        real = vista.mlp_output
        vista.mlp_output = lambda out, x, ctx: (seen.setdefault(ctx.layer, vista._vectors[ctx.layer]), real(out, x, ctx))[1]
        logits = lvlm.model(**batch).logits[:, -1]
    return logits, seen


@pytest.fixture(scope="module")
def llava(tiny, images):
    lvlm = tiny("llava")
    rows = [lvlm.encode(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)]
    return lvlm, rows, [_release_vectors(lvlm, r) for r in rows]


def test_vectors_and_prefill_logits_match_the_release(llava):
    lvlm, rows, vectors = llava
    row, v = rows[0], vectors[0][None]  # [1, L, D]
    _, seen = _vista_prefill(lvlm, row)
    assert sorted(seen) == list(range(lvlm.num_layers))
    assert max((seen[i][0] - v[0, i]).abs().max().item() for i in seen) <= 1e-6
    for params, release in [
        ({"lam": 0.5, "sla_layers": []}, {"vectors": v, "lam": 0.5}),
        ({"layers": [], "sla_layers": [1, 2], "sla_alpha": 0.3}, {"sla": (1, 2), "alpha": 0.3}),
        ({"layers": [], "sla_layers": [1, 2], "sla_alpha": 0.3, "sla_final_norm": True},
         {"sla": (1, 2), "alpha": 0.3, "final_norm": True}),
        ({"lam": 0.5, "sla_layers": [1, 2], "sla_alpha": 0.3}, {"vectors": v, "lam": 0.5, "sla": (1, 2), "alpha": 0.3}),
    ]:
        ours, _ = _vista_prefill(lvlm, row, **params)
        with torch.inference_mode(), Release(lvlm, **release):
            theirs = lvlm.model(**row, output_hidden_states=True).logits[:, -1]
        with torch.inference_mode():
            vanilla = lvlm.model(**row).logits[:, -1]
        assert (ours - theirs).abs().max().item() <= 1e-4, params
        assert (ours - vanilla).abs().max().item() > 1e-3, params  # the setting does act


GEN = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
STRONG = {"lam": 0.5, "sla_layers": [1, 2], "sla_alpha": 0.3}


def test_greedy_steps_of_a_padded_batch_match_the_release_row_by_row(llava, images):
    lvlm, _, vectors = llava
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    assert not batch["attention_mask"].all()  # left padded
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vista", **STRONG):
        ours = lvlm.model.generate(**batch, **GEN)
    with torch.inference_mode(), Release(lvlm, torch.stack(vectors), 0.5, (1, 2), 0.3):
        theirs = lvlm.model.generate(**batch, **GEN, output_hidden_states=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **GEN)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.scores, theirs.scores)) <= 1e-4
    assert not torch.equal(ours.sequences, vanilla.sequences)


def test_beams_give_each_expanded_row_its_own_vector(llava, images):
    lvlm, _, vectors = llava
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    gen = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vista", **STRONG):
        ours = lvlm.model.generate(**batch, **gen)
    expanded = torch.stack(vectors).repeat_interleave(3, 0)  # generate() repeats each row num_beams times
    with torch.inference_mode(), Release(lvlm, expanded, 0.5, (1, 2), 0.3):
        theirs = lvlm.model.generate(**batch, **gen, output_hidden_states=True)
    assert torch.equal(ours, theirs)
    with torch.inference_mode(), Release(lvlm, expanded.flip(0), 0.5, (1, 2), 0.3):  # the rows' vectors swapped
        swapped = lvlm.model.generate(**batch, **gen, output_hidden_states=True)
    assert not torch.equal(ours, swapped)


# -- (c) no-op and math identity through generate() ---------------------------------------------------
def test_noop_is_bit_identical_and_math_identity_runs_every_callback(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images, PROMPTS)
    gen = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
        with lvlm_fix.apply(lvlm, "vista", layers=[], sla_layers=[]) as plan:
            noop = lvlm.model.generate(**batch, **gen)
        assert not plan.participants[0].edits_logits
        with lvlm_fix.apply(lvlm, "vista", lam=0.0, sla_alpha=0.0) as plan:
            same = lvlm.model.generate(**batch, **gen)
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.scores, vanilla.scores))
    assert torch.equal(same.sequences, vanilla.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(same.scores, vanilla.scores)) <= 1e-5
    report = plan.report()["vista"]
    assert report["steered_forwards"] == report["augmented_forwards"] == 5
    assert len(report["vector_norm"]) == 3 and min(report["vector_norm"]) > 0


# -- (d) decoding modes and batches through generate() ------------------------------------------------
def test_sampling_is_seeded_and_a_batch_equals_its_rows(tiny, images):
    lvlm = tiny("llava")
    first = lvlm_fix.generate(lvlm, images, PROMPTS, "vista", max_new_tokens=5, do_sample=True, seed=4, **STRONG)
    again = lvlm_fix.generate(lvlm, images, PROMPTS, "vista", max_new_tokens=5, do_sample=True, seed=4, **STRONG)
    assert first.texts == again.texts
    together = lvlm_fix.generate(lvlm, images, PROMPTS, "vista", max_new_tokens=6, **STRONG).texts
    for i in range(3):
        alone = lvlm_fix.generate(lvlm, images[i : i + 1], PROMPTS[i : i + 1], "vista", max_new_tokens=6, **STRONG)
        assert alone.texts == [together[i]]


# -- (e) composition ----------------------------------------------------------------------------------
def test_composes_with_attention_methods_and_refuses_a_contrast_stream(tiny, images):
    lvlm = tiny("llava")
    out = lvlm_fix.generate(lvlm, images[:2], PROMPTS[:2], "vista+vhr", max_new_tokens=3)
    assert set(out.report) == {"vhr", "vista"} and out.report["vista"]["steered_forwards"] == 3
    for other in ("vcd", "m3id", "pai"):
        with pytest.raises(ConfigError, match=f"'vista' edits the next-token logits.*'{other}'") as e:
            lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], f"vista+{other}", max_new_tokens=2)
        assert "\n" not in str(e.value)


# -- (f) bad input: one line --------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "needle"), [
    ({"lam": -1.0}, "lam"),
    ({"sla_alpha": 1.5}, "sla_alpha"),
    ({"sla_layers": [99]}, "sla_layers index 99"),
    ({"layers": [-9]}, "layers index -9"),
])
def test_bad_parameters_are_one_line(tiny, images, params, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        lvlm_fix.generate(tiny("llava"), images[:1], PROMPTS[:1], "vista", max_new_tokens=2, **params)
    assert "\n" not in str(e.value)


def test_generate_without_a_cache_is_refused_before_any_forward(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match="drop use_cache=False") as e, torch.inference_mode():
        with lvlm_fix.apply(lvlm, "vista"):
            lvlm.model.generate(**batch, max_new_tokens=2, use_cache=False)
    assert "\n" not in str(e.value)


def test_a_layer_that_cannot_see_the_image_is_not_steered(tiny, images):
    """Gemma 3's first layer has a sliding window that does not reach the image from the last token: v is rounding
    noise there, whose direction would be random (and differ between a batch and its rows); it is zeroed."""
    lvlm = tiny("gemma3")
    assert lvlm.attention_modules[0].sliding_window and not lvlm.attention_modules[1].sliding_window
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    _, seen = _vista_prefill(lvlm, batch, sla_layers=[])
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    assert all(seen[i].norm(dim=-1).min() > 1e-2 for i in (1, 2, 3))
    text_only = {k: v for k, v in lvlm.text_only(batch).items()}  # rows without an image: nothing is steered
    _, seen = _vista_prefill(lvlm, text_only, sla_layers=[])
    assert all(not v.any() for v in seen.values())


def test_a_static_cache_is_refused_in_one_line(tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], ["Describe the image."])
    with pytest.raises(LvlmFixError, match=r"vista does not support static caches \(cache_implementation='static'\)"):
        with lvlm_fix.apply(lvlm, "vista"):
            lvlm.model.generate(**batch, max_new_tokens=2, cache_implementation="static")
