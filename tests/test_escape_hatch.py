"""The escape hatch for families: load(..., adapter=...) / wrap(..., adapter=...) serve a model that
derivation cannot read, checked against the model before any work, and act on it exactly as on the
model it was made from (identity: the same weights, the layers only moved one level down)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from transformers import AutoModelForImageTextToText

import lvlm_fix
from conftest import PROMPTS, no_plan_left
from lvlm_fix import adapters
from lvlm_fix.errors import InputError, LvlmFixError, UnsupportedModelError
from lvlm_fix.layout import TokenGrid, image_token_grids
from lvlm_fix.processors import load_processor

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "nested_layers.py"


@pytest.fixture(scope="module")
def example():
    """docs/examples/nested_layers.py, the guide's example, imported as a module."""
    spec = importlib.util.spec_from_file_location("nested_layers", EXAMPLE)
    module = sys.modules["nested_layers"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(example, tiny_dirs):
    """(handle of the unmodified tiny LLaVA, handle of the same weights with nested layers, served by the hatch)."""
    path = tiny_dirs("llava")
    plain = lvlm_fix.wrap(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
                          load_processor(path))
    nested = lvlm_fix.wrap(example.nested_model(path), load_processor(path), adapter=example.ADAPTER)
    return plain, nested


def _hooks(model) -> int:
    """lvlm-fix's forward hooks on the model (transformers installs output-capturing ones of its own on first use)."""
    return sum(getattr(fn, "__module__", "").startswith("lvlm_fix") for m in model.modules()
               for fn in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def test_derivation_refuses_the_nested_model_and_names_the_field_to_pass(example, tiny_dirs):
    model = example.nested_model(tiny_dirs("llava"))
    with pytest.raises(UnsupportedModelError) as e:
        lvlm_fix.wrap(model, load_processor(tiny_dirs("llava")))
    line = str(e.value)
    assert "\n" not in line and "no self-attention module with an output projection" in line
    assert "adapter={'attention': 'block.self_attn'}" in line  # the hatch, with the path found one level down


def test_the_hatch_fills_the_adapter_as_given_and_derives_the_rest(pair, example):
    plain, nested = pair
    assert (nested.adapter.text_layers, nested.adapter.attention, nested.adapter.out_proj) == (
        "model.language_model.layers", "block.self_attn", "o_proj")
    assert nested.image_token_ids == plain.image_token_ids  # "<image>" read through the tokenizer
    assert nested.adapter.prompt_template == plain.adapter.prompt_template  # OVERRIDES of the family still apply
    assert [m is n.block.self_attn for m, n in zip(nested.attention_modules, nested.text_layers)] == [True] * 4
    only = lvlm_fix.wrap(nested.model, nested.processor, adapter={"attention": "block.self_attn"})
    assert only.adapter == nested.adapter  # one field is enough: the others are derived


@pytest.mark.parametrize("method", ["vhr+var", "vcd", "m3id"])
def test_served_through_the_hatch_as_the_unmodified_model(pair, images, method):
    """Identity: VHR/VAR (head outputs, attention edits) and contrast methods (their own forwards)
    give bit-identical sequences, scores and reports on the nested model and on the model it was made from."""
    plain, nested = pair
    outs = []
    for handle in (plain, nested):
        outs.append(lvlm_fix.generate(handle, images[:2], PROMPTS[:2], method, max_new_tokens=4, seed=0,  # VCD's noise
                                      generate_kwargs={"return_dict_in_generate": True, "output_scores": True}))
        assert no_plan_left(handle.model) and _hooks(handle.model) == 0  # hooks cleaned up
    a, b = outs
    assert torch.equal(a.output.sequences, b.output.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.output.scores, b.output.scores))
    assert a.texts == b.texts and a.report == b.report
    if "vhr" in method:
        assert a.report["vhr"]["selected_heads"]  # it acted, on both


def test_apply_around_the_models_own_generate_on_the_hatched_model(pair, images):
    plain, nested = pair
    batch = plain.encode(images[:2], PROMPTS[:2])
    ids = []
    for handle in (plain, nested):
        with torch.inference_mode(), lvlm_fix.apply(handle, "vhr", alpha=3.0):
            assert _hooks(handle.model) > 0
            ids.append(handle.model.generate(**batch, max_new_tokens=4, do_sample=False))
        assert no_plan_left(handle.model) and _hooks(handle.model) == 0
    with torch.inference_mode():
        stock = plain.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], stock)  # VHR acted, the same on both


def test_the_docs_example_runs(example, capsys, monkeypatch, tiny_dirs):
    monkeypatch.setattr(example, "build_tiny", lambda family, path: tiny_dirs(family))  # the session's tiny LLaVA
    example.main()
    out = capsys.readouterr().out
    assert "without an adapter: model type 'llava' is not supported" in out and "with the adapter:" in out
    guide = EXAMPLE.parents[1] / "guides" / "adding-a-model-family.md"
    assert '--8<-- "docs/examples/nested_layers.py"' in guide.read_text()  # the guide shows this file, not a copy


@pytest.mark.parametrize(("adapter", "message"), [
    ({"text_layers": "model.language_model.blocks", "attention": "block.self_attn"},
     r"adapter text_layers='model.language_model.blocks' is not a module of this LlavaForConditionalGeneration; pass "
     r"the dotted path.*\(lists of 4 modules here: model.language_model.layers\)"),
    ({"text_layers": "model.vision_tower.encoder.layers", "attention": "block.self_attn"},
     r"adapter text_layers='model.vision_tower.encoder.layers' holds 2 modules, but the text config has "
     r"num_hidden_layers=4: it is not the text decoder's layer list"),
    ({"text_layers": "model.language_model.norm"}, r"is a LlamaRMSNorm, not a list of decoder layers"),
    ({"attention": "mixer"}, r"adapter attention='mixer' is not a module of decoder layer 0 \(Block\); pass the dotted "
                             r"path, from a decoder layer, of its self-attention module, e.g. 'block.self_attn'"),
    ({"attention": "block.self_attn", "out_proj": "proj"},
     r"adapter out_proj='proj' is not a module of the attention module of decoder layer 0 \(LlamaAttention\)"
     r".*e.g. 'o_proj'"),
    ({"attention": "block.self_attn", "image_token_ids": "<imag>"}, r"'<imag>' is not a token of this tokenizer"),
    ({"attention": "block.self_attn", "image_token_ids": 10**6}, r"1000000 is outside this model's vocabulary"),
    ({"atention": "block.self_attn"}, r"adapter key 'atention' is not an adapter field; did you mean 'attention'\?"),
    ({"attention": ""}, r"adapter attention='' is not a dotted module path"),
    ({"attention": "block.self_attn", "token_grid": (0, 3)}, r"adapter token_grid=\(0, 3\) is not \(rows, cols\)"),
    ("block.self_attn", r"adapter must be a lvlm_fix.adapters.Adapter or a dict of its fields, got str"),
])
def test_a_wrong_adapter_is_one_line_naming_the_value_and_the_fix(example, tiny_dirs, adapter, message):
    model = example.nested_model(tiny_dirs("llava"))
    impl = model.config.get_text_config()._attn_implementation
    with pytest.raises(InputError, match=message) as e:
        lvlm_fix.wrap(model, load_processor(tiny_dirs("llava")), adapter=adapter)
    assert "\n" not in str(e.value)
    assert model.config.get_text_config()._attn_implementation == impl  # refused before any work on the model


def test_load_checks_the_adapter_before_reading_any_file(tmp_path, tiny_dirs):
    with pytest.raises(InputError, match="adapter key 'layers' is not an adapter field"):
        lvlm_fix.load(tmp_path / "nothing-here", adapter={"layers": "model.layers"})  # the field, not the missing dir
    other = adapters.Adapter(model_type="qwen2_vl", text_layers="model.language_model.layers")
    with pytest.raises(InputError, match="adapter.model_type='qwen2_vl' is not this model's 'llava'"):
        lvlm_fix.load(tiny_dirs("llava"), adapter=other)


def test_load_takes_the_adapter(tiny_dirs, tiny):
    handle = lvlm_fix.load(tiny_dirs("llava"), dtype="float32", adapter={"image_token_ids": [3], "nested_images": True})
    assert handle.image_token_ids == (3,) and handle.adapter.nested_images
    assert handle.adapter.text_layers == tiny("llava").adapter.text_layers


def test_an_adapter_instance_is_taken_whole(pair):
    plain, nested = pair
    again = lvlm_fix.wrap(nested.model, nested.processor, adapter=nested.adapter)
    assert again.adapter == nested.adapter


def test_layer_paths_in_overrides_replace_derivation(monkeypatch, tiny_dirs):
    """OVERRIDES may set any field, layer paths too (a family derivation misreads): it used to be a TypeError
    (the derived path and the table's went to Adapter() twice)."""
    paths = {"text_layers": "model.language_model.layers", "attention": "self_attn", "out_proj": "o_proj"}
    table = {**adapters.OVERRIDES, "llava": {**adapters.OVERRIDES["llava"], **paths}}
    monkeypatch.setattr(adapters, "OVERRIDES", MappingProxyType(table))
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs("llava"), dtype=torch.float32).eval()
    handle = lvlm_fix.wrap(model, load_processor(tiny_dirs("llava")))
    assert handle.adapter.text_layers == "model.language_model.layers" and handle.num_layers == 4
    user = lvlm_fix.wrap(model, load_processor(tiny_dirs("llava")),
                         adapter={"text_layers": "model.language_model.layers", "prompt_template": "Q: <image>{prompt}"})
    assert user.adapter.prompt_template == "Q: <image>{prompt}"  # the user's adapter over the table


def test_every_overrides_key_is_a_hatch_field():
    assert all(set(fields) <= set(adapters.HATCH_FIELDS) for fields in adapters.OVERRIDES.values())


def test_a_config_without_an_image_token_is_served_when_the_adapter_names_it(tiny_dirs):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs("llava"), dtype=torch.float32).eval()
    token = model.config.image_token_id
    model.config.image_token_id = None  # and no processor to ask
    with pytest.raises(UnsupportedModelError, match=r"names its image token.*adapter=\{'image_token_ids': \.\.\.\}"):
        lvlm_fix.wrap(model)
    assert lvlm_fix.wrap(model, adapter={"image_token_ids": token}).image_token_ids == (token,)


def test_a_declared_token_grid_is_the_layout(tiny, images):
    handle = tiny("llava")
    batch = handle.encode(images[:2], PROMPTS[:2])
    declared = lvlm_fix.wrap(handle.model, handle.processor, adapter={"token_grid": (2, 8)})
    assert image_token_grids(declared, batch) == [TokenGrid(2, 8, 0)] * 2  # the square rule would say 4 x 4
    tall = lvlm_fix.wrap(handle.model, handle.processor, adapter={"token_grid": (4, 4, 8)})
    with pytest.raises(LvlmFixError, match="a 4x4 image grid at offset 8 does not fit its 16 image tokens"):
        image_token_grids(tall, batch)


def test_a_config_naming_no_image_token_is_refused_unless_the_adapter_names_one():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2)  # no image_token_id / image_token_index at all
    assert "names no image token" in adapters.unsupported_reason(config)  # (blip, git, kosmos-2: none to name)
    assert adapters.unsupported_reason(config, image_token_given=True) is None


def test_attention_modules_the_switch_does_not_reach_are_refused_not_served_silently(example, tiny_dirs):
    """A remote-code attention that keeps its own copy of the config is not switched by set_attn_implementation:
    served, every method acting through the attention function would change nothing."""
    import copy

    model = example.nested_model(tiny_dirs("llava"))
    layer = model.model.language_model.layers[2].block
    layer.self_attn.config = copy.deepcopy(layer.self_attn.config)
    with pytest.raises(InputError, match=r"adapter attention='block.self_attn' of text_layers='model.language_model."
                                         r"layers': the attention module of text decoder layer 2 \(LlamaAttention\) "
                                         r"reads a config of its own \(attention implementation 'sdpa'\)"):
        lvlm_fix.wrap(model, load_processor(tiny_dirs("llava")), adapter=example.ADAPTER)
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the switch undone
    plain = AutoModelForImageTextToText.from_pretrained(tiny_dirs("llava"), dtype=torch.float32).eval()
    plain.model.language_model.layers[0].self_attn.config = copy.deepcopy(plain.config.get_text_config())
    with pytest.raises(UnsupportedModelError, match="layer 0 .* reads a config of its own"):
        lvlm_fix.wrap(plain)
