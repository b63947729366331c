"""check_method: every built-in passes it; a plugin from this module passes it in one call; a broken
plugin fails the check it breaks, with the check and the method named."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ACTIVE
from lvlm_fix.errors import ConfigError
from lvlm_fix.interventions import METHODS, ContrastiveMethod, Generation, Intervention, MethodConfig, Stage, param, resolve_layers
from lvlm_fix.testing import CHECKS, build_image, build_tiny, check_method

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "scale_image_attention.py"
# The matrix's settings (tests/conftest.py), with CARVE's statistics passes cut to 3 tokens and VTI's vision
# part on: the tiny LLaVA has one image per row.
ACTIVE = {**ACTIVE, "carve": {"stat_tokens": 3},
          "vti": {k: v for k, v in ACTIVE["vti"].items() if k != "alpha_image"}}
# The methods that edit attention on the eager path: the only ones with query chunks to compare.
CHUNKED = {"var", "act", "pai", "paint", "clearsight", "hgai", "opera"}


def _statuses(results) -> dict[str, str]:
    return {r.check: r.status for r in results}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_builtin_passes_check_method(name):
    assert name in ACTIVE, f"add {name!r} to ACTIVE in tests/conftest.py (the settings under which it acts on the tiny models)"
    results = check_method(METHODS.get(name), params=ACTIVE.get(name), identity_params=ACTIVE.get(name))
    assert [r.check for r in results] == list(CHECKS)
    want = {c: "passed" for c in CHECKS} | ({} if name in CHUNKED else {"chunked": "skipped"})
    assert _statuses(results) == want
    assert all(r.reason for r in results if r.status == "skipped")


# -- a plugin of this module ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RescaleConfig(MethodConfig):
    factor: float = param(1.0, "Multiplies the attention weights on image tokens, then rows are renormalised. "
                               "Default 1.0, the identity (source: this test).", lo=0.0)
    layers: tuple[int, ...] = param((1, 2), "Decoder layers to edit. Default [1, 2] (source: this test).")

    @classmethod
    def noop(cls) -> RescaleConfig:
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> RescaleConfig:
        return cls(factor=1.0)


class Rescale(Intervention):
    """Rescale every head's attention on image tokens by ``factor``, each row renormalised."""

    name = "test_rescale"
    stage = Stage.ATTENTION_WEIGHTS
    config_cls = RescaleConfig

    def bind(self, lvlm):
        self.eager_layers = resolve_layers(self.config.layers, (), lvlm.num_layers)

    def post_softmax(self, probs, ctx):
        scale = 1 + (self.config.factor - 1) * ctx.image_keys[:, None, None, :].to(probs.dtype)
        edited = probs * scale
        return edited / edited.sum(-1, keepdim=True)


def test_a_plugin_passes_in_one_call():
    results = check_method(Rescale, params={"factor": 3.0})
    assert _statuses(results) == {c: "passed" for c in CHECKS}


class BlankImageContrast(ContrastiveMethod):
    """A contrastive plugin: next-token logits contrasted with those of a blank (all-zero) image."""

    name = "test_blank_contrast"
    contrast_kind = "blank image"
    changes_images = True

    def contrast_pixels(self, pixel_values, image_inputs):
        return torch.zeros_like(pixel_values)


def test_a_contrastive_plugin_passes_in_one_call():
    results = check_method(BlankImageContrast)  # the linear contrast at its defaults, alpha 1 and beta 0.1
    assert _statuses(results) == {c: "passed" for c in CHECKS} | {"chunked": "skipped"}
    assert "no edited attention layer" in results[CHECKS.index("chunked")].reason


def test_the_docs_example_passes():
    """docs/adding-a-method.md's example, imported from its file as a user would."""
    spec = importlib.util.spec_from_file_location("check_method_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        results = check_method(module.ScaleImageAttention)
    finally:
        METHODS._items.pop(module.ScaleImageAttention.name, None)  # its decorator registered it
        del sys.modules[spec.name]
    assert _statuses(results) == {c: "passed" for c in CHECKS}


def test_the_results_say_why_a_check_was_skipped():
    @dataclass(frozen=True, kw_only=True)
    class NoIdentity(RescaleConfig):
        @classmethod
        def math_identity(cls):
            return None

    class NoNoop(Rescale):
        name = "test_no_noop"
        config_cls = NoIdentity

    NoIdentity.noop = classmethod(MethodConfig.noop.__func__)  # the base's: not declared
    results = {r.check: r for r in check_method(NoNoop, params={"factor": 3.0})}
    assert results["noop"].status == "skipped" and "declares no noop()" in results["noop"].reason
    assert results["math_identity"].status == "skipped" and "math_identity()" in results["math_identity"].reason
    assert results["batched"].status == results["chunked"].status == "passed"


# -- broken plugins: each fails the check it breaks --------------------------------------------------
class LeavesAHook(Rescale):
    """Registers a forward hook of its own on the model and never removes it."""

    name = "test_leaves_a_hook"

    def install(self, plan, hooks):
        if self.eager_layers:
            plan.lvlm.model.register_forward_hook(lambda *args: None)


class LeavesAnAttribute(Rescale):
    name = "test_leaves_an_attribute"

    def bind(self, lvlm):
        super().bind(lvlm)
        if self.eager_layers:
            lvlm.text_layers[1].self_attn.__dict__["_test_rescale_state"] = 1


class SwitchesAttention(Rescale):
    """Switches the text decoder to eager attention and leaves it so."""

    name = "test_switches_attention"

    def bind(self, lvlm):
        super().bind(lvlm)
        if self.eager_layers:
            lvlm.model.set_attn_implementation("eager")


@dataclass(frozen=True, kw_only=True)
class EmptyIdentityConfig(RescaleConfig):
    @classmethod
    def math_identity(cls):
        return cls(layers=())  # an identity, but with no math in the path


class EmptyIdentity(Rescale):
    name = "test_empty_identity"
    config_cls = EmptyIdentityConfig


class BindsAnUnusedLayer(Rescale):
    """Declares layer 3 observed (it is then computed on the eager path) but has no observe() to run there."""

    name = "test_unused_layer"

    def bind(self, lvlm):
        super().bind(lvlm)
        if self.eager_layers:
            self.observed_layers = frozenset({3})


class NotIdentityAtOne(Rescale):
    """An off-by-one: the weights on image tokens are scaled by factor + 0.5, so 1 is not the identity."""

    name = "test_not_identity"

    def post_softmax(self, probs, ctx):
        scale = 1 + (self.config.factor - 0.5) * ctx.image_keys[:, None, None, :].to(probs.dtype)
        edited = probs * scale
        return edited / edited.sum(-1, keepdim=True)


class InstallsAtNoop(Rescale):
    """Edits every layer even at ``layers=()`` (its noop)."""

    name = "test_installs_at_noop"

    def bind(self, lvlm):
        self.eager_layers = frozenset(range(lvlm.num_layers))


class MixesRows(Rescale):
    """Scales by the batch's mean image attention: a row's answer depends on the other rows."""

    name = "test_mixes_rows"

    def post_softmax(self, probs, ctx):
        keys = ctx.image_keys[:, None, None, :].to(probs.dtype)  # [b, 1, 1, k]
        share = (probs * keys).sum(-1, keepdim=True).mean(0, keepdim=True)  # [1, h, q, 1]: the batch mean leaks
        edited = probs * (1 + (self.config.factor - 1) * share * keys)
        return edited / edited.sum(-1, keepdim=True)


class EditsEachChunksFirstQuery(Rescale):
    """Edits the first query row it is given: right for a whole prefill, wrong in query chunks."""

    name = "test_edits_chunk_start"

    def post_softmax(self, probs, ctx):
        probs = probs.clone()
        first = probs[:, :, :1] * (1 + (self.config.factor - 1) * ctx.image_keys[:, None, None, :].to(probs.dtype))
        probs[:, :, :1] = first / first.sum(-1, keepdim=True)
        return probs


class SwallowsInterrupts(Intervention):
    """A pipeline that catches everything its inner generate() raises and answers empty."""

    name = "test_swallows"
    stage = Stage.PIPELINE
    config_cls = RescaleConfig

    def generate(self, lvlm, images, prompts, gen, inner, *, system_prompt=None):
        try:
            return inner(images, prompts, gen)
        except BaseException:  # noqa: BLE001 - the bug under test
            return Generation(texts=[""] * len(prompts))


@pytest.mark.parametrize("cls, check, needle", [
    (LeavesAHook, "hygiene", "module '<model>' has 1 forward hook(s) more than before"),
    (LeavesAnAttribute, "hygiene", "gained attribute(s) ['_test_rescale_state']"),
    (SwitchesAttention, "hygiene", "attention implementation"),
    (EmptyIdentity, "math_identity", "no callback of the method ran"),
    (BindsAnUnusedLayer, "math_identity", "no callback ran at layer(s) [3] that the method binds"),
    (NotIdentityAtOne, "math_identity", "at math_identity() (factor=1.0, layers=(1, 2)): answers"),
    (InstallsAtNoop, "noop", "at noop() the method still binds layers {'eager_layers': [0, 1, 2, 3]}"),
    (MixesRows, "batched", "row 0 alone against row 0 of the batch"),
    (EditsEachChunksFirstQuery, "chunked", "in query chunks of 4 rows"),
    (SwallowsInterrupts, "hygiene", "did not reach the caller: the method swallowed it"),
])
def test_a_broken_plugin_fails_the_check_it_breaks(cls, check, needle):
    with pytest.raises(AssertionError) as e:
        check_method(cls, params={"factor": 3.0})
    message = str(e.value)
    assert message.startswith(f"check_method({cls.name}) {check}: "), message
    assert needle in message, message
    assert "\n" not in message


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match=r"check_method\('vhr'\): give a method class") as e:
        check_method("vhr")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="factor=-1.0 is out of range"):
        check_method(Rescale, params={"factor": -1.0})
    with pytest.raises(ConfigError, match=r"identity_params=...\): 'facter' is not a field of RescaleConfig; "
                                          "its fields are factor, layers"):
        check_method(Rescale, identity_params={"facter": 2.0})


def test_a_given_model_and_rows_are_used(tmp_path):
    import lvlm_fix

    lvlm = lvlm_fix.load(build_tiny("qwen2_vl", tmp_path / "qwen2_vl"), dtype="float32")
    images = [build_image(5), build_image(6)]
    results = check_method(Rescale, params={"factor": 3.0}, model=lvlm, images=images,
                           prompts=["Describe.", "What is in the picture, and where?"])
    assert _statuses(results) == {c: "passed" for c in CHECKS}
