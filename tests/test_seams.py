"""The seams that methods beyond attention build on: MLP-output edits, layer-output reads and the in-forward
logits edit, and the handle's lm_head / final_norm / mlp accessors. Each is checked against the same computation
done by hand with plain torch hooks on the model, on every family of the matrix where it matters."""

from __future__ import annotations

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS, no_plan_left
from lvlm_fix.errors import InputError, LvlmFixError
from lvlm_fix.hooks.plan import Participant, Plan


class _Scale(Participant):
    """Multiplies chosen layers' MLP outputs by ``factor`` and records what it was given."""

    name = "scale"

    def __init__(self, layers, factor):
        self.mlp_layers, self.factor, self.seen = frozenset(layers), factor, []

    def mlp_output(self, out, x, ctx):
        self.seen.append((ctx.layer, ctx.phase, x.detach().clone(), out.detach().clone()))
        return None if self.factor == 1 else out * self.factor


class _Read(Participant):
    name = "read"

    def __init__(self, entering, leaving):
        self.residual_layers, self.layer_output_layers = frozenset(entering), frozenset(leaving)
        self.entering, self.leaving = {}, {}

    def residual(self, hidden, ctx):
        self.entering[ctx.layer] = hidden.detach().clone()

    def layer_output(self, hidden, ctx):
        self.leaving[ctx.layer] = hidden.detach().clone()


class _Shift(Participant):
    """Adds ``bonus`` to one token's next-token logit, and records the logits it was handed."""

    def __init__(self, name, token, bonus):
        self.name, self.token, self.bonus, self.seen = name, token, bonus, []

    def bind(self, lvlm):
        self.edits_logits = True

    def logits(self, last, ctx):
        self.seen.append(last.clone())
        out = last.clone()
        out[:, self.token] += self.bonus
        return out


def _batch(lvlm, images, n=2):
    return lvlm.encode(images[:n], PROMPTS[:n])


def test_mlp_output_edit_equals_a_hand_hook_on_every_family(family, tiny, images):
    lvlm = tiny(family)
    batch = _batch(lvlm, images)
    layers = (0, lvlm.num_layers - 1)
    with torch.inference_mode():
        handles = [lvlm.mlp(i).register_forward_hook(lambda m, a, o: o * 0.5) for i in layers]
        try:
            want = lvlm.model(**batch).logits
        finally:
            for h in handles:
                h.remove()
        vanilla = lvlm.model(**batch).logits
        with Plan(lvlm, [_Scale(layers, 0.5)]).active():
            got = lvlm.model(**batch).logits
        with Plan(lvlm, [_Scale(layers, 1.0)]).active():  # the callback runs and returns None: untouched
            same = lvlm.model(**batch).logits
    assert not torch.allclose(want, vanilla)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(same, vanilla)
    assert no_plan_left(lvlm.model)


def test_mlp_output_sees_the_mlp_input_and_every_decode_step(tiny, images):
    lvlm = tiny("llava")
    batch = _batch(lvlm, images)
    inputs = []
    handle = lvlm.mlp(1).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    spy = _Scale([1], 1.0)
    try:
        with torch.inference_mode(), Plan(lvlm, [spy]).active():
            lvlm.model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert [(layer, phase) for layer, phase, _, _ in spy.seen] == [(1, "prefill"), (1, "decode"), (1, "decode")]
    with torch.inference_mode():
        for (_, _, x, out), want in zip(spy.seen, inputs, strict=True):
            assert torch.equal(x, want)
            assert torch.equal(out, lvlm.mlp(1)(want))


def test_two_mlp_edits_of_one_layer_compose_in_order(tiny, images):
    lvlm = tiny("llava")
    batch = _batch(lvlm, images)
    first, second = _Scale([2], 0.5), _Scale([2], 3.0)
    with torch.inference_mode():
        with Plan(lvlm, [first, second]).active():
            both = lvlm.model(**batch).logits
        with Plan(lvlm, [_Scale([2], 1.5)]).active():
            product = lvlm.model(**batch).logits
    torch.testing.assert_close(second.seen[0][3], first.seen[0][3] * 0.5)  # the second saw the first's edit
    torch.testing.assert_close(both, product)


def test_layer_outputs_are_the_streams_entering_the_next_layer_and_the_final_norms_input(family, tiny, images):
    lvlm = tiny(family)
    batch = _batch(lvlm, images)
    last = lvlm.num_layers - 1
    reader = _Read(entering=range(1, lvlm.num_layers), leaving=range(lvlm.num_layers))
    with torch.inference_mode(), Plan(lvlm, [reader]).active():
        logits = lvlm.model(**batch).logits
    for i in range(last):
        assert torch.equal(reader.leaving[i], reader.entering[i + 1]), i
    if lvlm.text_config.model_type.startswith("gemma"):
        return  # Gemma softcaps its final logits: lm_head(norm(h)) is not the model's logits there
    with torch.inference_mode():
        by_hand = lvlm.lm_head(lvlm.final_norm(reader.leaving[last]))
    torch.testing.assert_close(by_hand[:, -1], logits[:, -1], rtol=1e-5, atol=1e-5)


def test_logits_edit_reaches_generate_and_its_scores(tiny, images):
    lvlm = tiny("llava")
    batch = _batch(lvlm, images)
    token = int(lvlm.tokenizer.convert_tokens_to_ids(lvlm.tokenizer.tokenize("cat")[0]))
    with torch.inference_mode(), Plan(lvlm, [_Shift("shift", token, 1e4)]).active():
        out = lvlm.model.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    assert (new == token).all()  # greedy takes the boosted token at every step, in every row
    assert all(s.argmax(-1).eq(token).all() and s.dtype == torch.float32 for s in out.scores)


def test_logits_edits_apply_in_composition_order(tiny, images):
    lvlm = tiny("llava")
    batch = _batch(lvlm, images, n=1)
    a, b = _Shift("a", 5, 2.0), _Shift("b", 7, 3.0)
    with torch.inference_mode():
        vanilla = lvlm.model(**batch).logits[:, -1].float()
        with Plan(lvlm, [a, b]).active():
            both = lvlm.model(**batch).logits[:, -1]
    torch.testing.assert_close(a.seen[0], vanilla)
    torch.testing.assert_close(b.seen[0][:, 5], vanilla[:, 5] + 2.0)  # b is handed a's edit
    want = vanilla.clone()
    want[:, 5] += 2.0
    want[:, 7] += 3.0
    torch.testing.assert_close(both, want)


def test_logits_edit_with_a_contrast_stream_is_refused(tiny):
    lvlm = tiny("llava")
    from lvlm_fix.interventions import build_methods

    vcd = build_methods("vcd")[0]
    with pytest.raises(LvlmFixError, match="edits the next-token logits inside the forward and vcd") as e:
        Plan(lvlm, [_Shift("shift", 5, 1.0), vcd])
    assert "\n" not in str(e.value)


def test_accessors_and_the_escape_hatch_fields(tiny, tiny_dirs):
    lvlm = tiny("llava")
    assert lvlm.lm_head is lvlm.model.get_output_embeddings()
    assert lvlm.final_norm is lvlm.model.get_submodule(lvlm.adapter.text_layers.rpartition(".")[0]).norm
    assert lvlm.mlp(0) is lvlm.text_layers[0].mlp
    named = lvlm_fix.wrap(lvlm.model, lvlm.processor, adapter={"mlp": "mlp.down_proj",
                                                               "final_norm": "model.language_model.norm"})
    assert named.mlp(1) is lvlm.text_layers[1].mlp.down_proj
    assert named.final_norm is lvlm.final_norm
    with pytest.raises(InputError, match="adapter mlp='two words' is not a dotted module path"):
        lvlm_fix.wrap(lvlm.model, lvlm.processor, adapter={"mlp": "two words"})
    hidden = lvlm_fix.wrap(lvlm.model, lvlm.processor, adapter={"mlp": "nothing_here"})
    with pytest.raises(AttributeError):
        hidden.mlp(0)


def test_a_layer_without_a_known_mlp_name_is_refused_in_one_line(tiny):
    lvlm = tiny("llava")
    layer = lvlm.text_layers[0]
    mlp = layer.mlp
    del layer.mlp
    layer.add_module("block_ff", mlp)
    try:
        with pytest.raises(LvlmFixError, match=r"has no child named mlp / feed_forward / ffn; name its MLP.*'mlp'"):
            lvlm.mlp(0)
        assert lvlm_fix.wrap(lvlm.model, lvlm.processor, adapter={"mlp": "block_ff"}).mlp(0) is mlp
    finally:
        del layer.block_ff
        layer.add_module("mlp", mlp)


def test_a_logits_editing_method_beside_a_contrast_stream_is_refused_before_any_model(capsys):
    from conftest import cli_error
    from lvlm_fix.errors import ConfigError
    from lvlm_fix.interventions import METHODS, build_methods

    editors = [n for n in METHODS.names() if METHODS.get(n).logits is not Participant.logits]
    assert {"dola", "deco", "only", "vista"} <= set(editors)  # the built-ins that edit the logits in the forward
    with pytest.raises(ConfigError, match=f"'{editors[0]}' edits the next-token logits inside the forward and 'vcd'"):
        build_methods(f"{editors[0]}+vcd")
    line = cli_error(capsys, "run", "--model", "/nonexistent-model-dir", "--method", f"vcd+{editors[0]}")
    assert "separate calls" in line


class _Exits(Participant):
    """Shares the unembedding: its rows are the last position of the streams entering ``layers``. With ``mid``
    it also projects one of them itself during the forward (an early exit as MemVR's), which must not take them."""

    name = "exits"

    def __init__(self, layers, mid=False):
        self.residual_layers, self.layers, self.mid = frozenset(layers), list(layers), mid
        self.read, self.asked, self.lasts, self.got = {}, [], [], []

    def bind(self, lvlm):
        self.lvlm, self.shares_unembedding = lvlm, True

    def residual(self, hidden, ctx):
        self.read[ctx.layer] = hidden[:, -1].clone()
        if self.mid:
            self.lvlm.lm_head(hidden[:, -1])

    def unembed_rows(self, last, ctx):
        self.lasts.append(last.clone())
        self.asked.append(torch.cat([self.read[i] for i in self.layers]))
        return self.asked[-1]

    def unembedded(self, logits, ctx):
        self.got.append(logits.clone())


def test_shared_unembedding_projects_the_rows_with_the_models_own_on_every_family(family, tiny, images):
    lvlm = tiny(family)
    batch = _batch(lvlm, images)
    head = lvlm.lm_head
    inputs = []
    with torch.inference_mode():
        handle = head.register_forward_pre_hook(lambda m, a: inputs.append(a[0][..., -1, :].clone()))
        try:
            vanilla = lvlm.model(**batch).logits
        finally:
            handle.remove()
        exits = _Exits((0, lvlm.num_layers - 1), mid=True)
        with Plan(lvlm, [exits]).active():
            got = lvlm.model(**batch).logits
            assert "forward" in vars(head)  # patched while the plan is active
        want = head(exits.asked[0]) if exits.asked else None
    assert "forward" not in vars(head)  # and restored after it
    assert len(exits.asked) == len(exits.got) == 1  # one forward, one request: the mid-forward exit took nothing
    assert exits.asked[0].shape[0] == 2 * batch["input_ids"].shape[0]
    torch.testing.assert_close(exits.lasts[0], inputs[0].reshape(exits.lasts[0].shape), rtol=0, atol=0)
    torch.testing.assert_close(exits.got[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, vanilla, rtol=1e-5, atol=1e-5)  # the model's own logits, as vanilla's


@pytest.mark.parametrize("method", ["dola", "deco", "only", "vista"])
def test_methods_give_the_same_through_the_shared_unembedding_as_through_their_own(method, tiny, images,
                                                                                    monkeypatch):
    from lvlm_fix.interventions import METHODS

    lvlm = tiny("llava")
    batch = _batch(lvlm, images)
    gen = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cls = METHODS.get(method)
    asked = []
    real = cls.unembed_rows
    monkeypatch.setattr(cls, "unembed_rows", lambda self, last, ctx: asked.append(1) or real(self, last, ctx))
    with torch.inference_mode():
        with lvlm_fix.apply(lvlm, method):
            shared = lvlm.model.generate(**batch, **gen)
        assert len(asked) == 4  # every forward's early exits rode on the model's own projection
        monkeypatch.setattr(cls, "unembed_rows", lambda self, last, ctx: None)  # each projects its own
        with lvlm_fix.apply(lvlm, method):
            own = lvlm.model.generate(**batch, **gen)
    assert torch.equal(shared.sequences, own.sequences)
    for a, b in zip(shared.scores, own.scores):
        assert torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a[~a.isinf()], b[~b.isinf()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_project_equals_the_module_at_every_row_count(bias):
    from lvlm_fix.hooks.unembed import project

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=bias)
    for m in (1, 2, 3, 5, 8, 9, 16):
        x = torch.randn(m, 64)
        torch.testing.assert_close(project(head, x), head(x), rtol=1e-5, atol=1e-5)
    calls = []
    assert project(head, torch.randn(3, 64), forward=lambda x: calls.append(x) or head(x)).shape == (3, 1000)
    assert not calls  # a few fp32 rows of a plain Linear: the weight-streaming product, not the module
    assert project(head, torch.randn(12, 64), forward=lambda x: calls.append(x) or head(x)).shape == (12, 1000)
    assert len(calls) == 1  # many rows: the module's own forward
    offloaded = torch.nn.Linear(64, 1000, device="meta")  # an offloaded head: its weight arrives in its forward
    assert project(offloaded, torch.randn(3, 64), forward=lambda x: calls.append(x) or head(x)).shape == (3, 1000)
    assert len(calls) == 2
