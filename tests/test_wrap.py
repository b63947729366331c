"""wrap(): the handle of a model the user loaded; derived adapters; refusals that say why."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import lvlm_fix
from conftest import PROMPTS, cli_error, no_plan_left
from lvlm_fix.errors import InputError, LvlmFixError, UnsupportedModelError
from lvlm_fix.processors import load_processor


def _loaded(path):
    """A model loaded the user's way: plain from_pretrained, nothing from lvlm-fix."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_wrap_gives_the_handle_load_gives(family, tiny, tiny_dirs, images):
    loaded = tiny(family)
    wrapped = lvlm_fix.wrap(_loaded(tiny_dirs(family)), load_processor(tiny_dirs(family)))
    assert wrapped.adapter == loaded.adapter
    assert (wrapped.num_layers, wrapped.num_heads, wrapped.image_token_ids) == (
        loaded.num_layers, loaded.num_heads, loaded.image_token_ids)
    out_loaded = lvlm_fix.generate(loaded, images[:2], PROMPTS[:2], "vhr+var", max_new_tokens=4, tau=2.5)
    out_wrapped = lvlm_fix.generate(wrapped, images[:2], PROMPTS[:2], "vhr+var", max_new_tokens=4, tau=2.5)
    assert out_wrapped.texts == out_loaded.texts and out_wrapped.report == out_loaded.report


def test_the_adapter_is_read_from_the_model(tiny):
    a = tiny("idefics3").adapter
    assert (a.text_layers, a.attention, a.out_proj) == ("model.text_model.layers", "self_attn", "o_proj")
    assert a.image_token_ids == (tiny("idefics3").model.config.image_token_id,)
    assert a.nested_images  # an override: nothing in the model says so


def test_without_a_processor_methods_run_and_input_building_says_what_it_needs(tiny, tiny_dirs, images):
    processor = load_processor(tiny_dirs("llava"))
    bare = lvlm_fix.wrap(_loaded(tiny_dirs("llava")))  # no processor
    batch = tiny("llava").encode(images[:2], PROMPTS[:2])  # inputs built elsewhere
    with torch.inference_mode(), lvlm_fix.apply(bare, "vhr") as plan:
        ids = bare.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert ids.shape[0] == 2 and plan.report()["vhr"]["selected_heads"]
    assert bare.text_only(batch)["input_ids"].shape[0] == 2  # the pad id comes from the config
    for call in (lambda: bare.encode(images[:1], PROMPTS[:1]),
                 lambda: lvlm_fix.generate(bare, images[:1], PROMPTS[:1], "carve"),
                 lambda: bare.decode(ids, 1)):
        with pytest.raises(LvlmFixError, match=r"needs the model's processor; pass it: lvlm_fix.wrap\(model, processor\)"):
            call()
    assert processor is not None and no_plan_left(bare.model)


def test_wrap_takes_a_prompt_template_for_a_processor_without_chat_template(tiny_dirs, images):
    processor = load_processor(tiny_dirs("llava_next"))
    processor.chat_template = None
    handle = lvlm_fix.wrap(_loaded(tiny_dirs("llava_next")), processor, prompt_template="Q: <image>{prompt} A:")
    assert handle.build_prompt("Why?") == "Q: <image>Why? A:"
    with pytest.raises(InputError, match=r"has no \{prompt\}"):
        lvlm_fix.wrap(handle.model, processor, prompt_template="Q: <image> A:")


def test_wrap_rejects_what_is_not_a_transformers_model():
    with pytest.raises(InputError, match="wrap\\(\\) takes a transformers model, got Linear"):
        lvlm_fix.wrap(torch.nn.Linear(2, 2))


def test_an_unsupported_family_is_refused_with_why():
    from lvlm_fix.testing.families import tiny_model

    with pytest.raises(UnsupportedModelError) as e:
        lvlm_fix.wrap(tiny_model("mllama"))
    message = str(e.value)
    assert "'mllama' is not supported: the image enters the text decoder through cross-attention layers" in message
    assert "llava, qwen2_vl, gemma3" in message and "docs/supported-models.md" in message


def test_load_refuses_from_the_config_before_any_weight(tmp_path, capsys):
    from transformers import CONFIG_MAPPING

    CONFIG_MAPPING["florence2"]().save_pretrained(tmp_path)  # a config, and no weights at all
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        lvlm_fix.load(tmp_path)
    image = tmp_path / "i.png"
    from lvlm_fix.testing.tiny import build_image

    build_image(0).save(image)
    line = cli_error(capsys, "run", "--model", str(tmp_path), "--image", str(image), "--prompt", "Hi")
    assert "'florence2' is not supported" in line and "encoder-decoder" in line
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "florence2"


def test_the_image_token_comes_from_the_processor_when_the_config_names_none(tiny_dirs):
    processor = load_processor(tiny_dirs("llava"))
    model = _loaded(tiny_dirs("llava"))
    expected = model.config.image_token_id
    model.config.image_token_id = None
    assert lvlm_fix.wrap(model, processor).image_token_ids == (expected,)
    with pytest.raises(UnsupportedModelError, match="neither its config .* nor its processor"):
        lvlm_fix.wrap(model)
