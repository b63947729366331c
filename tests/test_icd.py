"""ICD: the disturbed rows (tokens and M-RoPE positions) and decode steps against two plain forwards."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.icd import DISTURBANCES, ICD, apply_edit, disturbance_edit

DISTURBANCE = DISTURBANCES[3]


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load(None)


def test_prompts_are_the_release_disturbances():
    assert ICD.prompts() == list(DISTURBANCES) and len(DISTURBANCES) == 5
    assert ICD.config_cls().disturbance == DISTURBANCE
    with pytest.raises(ConfigError, match="disturbance is empty"):
        ICD.config_cls(disturbance=" ")


def _release_contrast_prompt(disturbance: str, question: str) -> str:
    """The release's contrast prompt for LLaVA: conversation ``llava_custom`` (system "", roles USER/ASSISTANT,
    SeparatorStyle.TWO, sep " ") with ``conv.system = disturbance`` whatever the main prompt's system message was
    (p1k0pan/ICD 2fa44c5 experiments/gen_scripts/icd_llava_pope.py L58-62; get_prompt, experiments/llava/
    conversation.py L51-60: system + sep, then "USER: " + "<image>\\n" + question + sep, then "ASSISTANT:")."""
    return f"{disturbance} USER: <image>\n{question} ASSISTANT:"


def _rows(lvlm, batch, edited=None):
    out = edited if edited is not None else batch
    return [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["attention_mask"])]


@pytest.mark.parametrize("preset", [None, "llava", "vcd", "opera"])
def test_disturbed_rows_are_the_releases_contrast_prompt_whatever_the_system_message(testbed, images, preset):
    """The testbed (llava-hf's template, which takes a system message): with no system message and with
    the POPE presets' (which all set one), the disturbed row is, token for token, the release's contrast
    prompt: the disturbance replaces the system message, it is not put before it."""
    from lvlm_fix.evals.pope import PRESETS

    system = None if preset is None else PRESETS[preset].system_prompt
    template = "{question}" if preset is None else PRESETS[preset].template
    prompts = [template.format(question=q) for q in ("Is there a dog in the image?", "Is there a cup?")]
    edit = disturbance_edit(testbed, DISTURBANCE)
    assert edit.placement == "system"
    batch = testbed.encode(images[:2], prompts, system_prompt=system)
    got = _rows(testbed, batch, apply_edit(edit, dict(batch), testbed.image_token_id))
    for i, prompt in enumerate(prompts):
        want = testbed.processor(images=[images[i]], text=[_release_contrast_prompt(DISTURBANCE, prompt)],
                                 return_tensors="pt")["input_ids"][0].tolist()
        assert got[i] == want
    out = lvlm_fix.generate(testbed, images[:1], prompts[:1], "icd", max_new_tokens=1, system_prompt=system)
    assert out.report["icd"]["contrast_prompt_row0"].startswith(f"<s> {DISTURBANCE.split()[0]}")
    assert (system or "curious") not in out.report["icd"]["contrast_prompt_row0"]


def test_without_a_chat_template_the_system_message_is_the_prompts_prefix(tiny, images):
    """No chat template: lvlm-fix puts a system message before the prompt (LLaVA's USER/ASSISTANT format), so
    the release's string comes out exactly, with or without a system message in the main rows."""
    lvlm = tiny("llava")
    edit = disturbance_edit(lvlm, DISTURBANCE)
    assert edit.placement == "system"
    for system in (None, "A chat between a curious user and an artificial intelligence assistant."):
        batch = lvlm.encode(images[:2], PROMPTS[:2], system_prompt=system)
        got = _rows(lvlm, batch, apply_edit(edit, dict(batch), lvlm.image_token_id))
        want = _rows(lvlm, lvlm.encode(images[:2], PROMPTS[:2], system_prompt=DISTURBANCE))
        assert got == want
        text = lvlm.tokenizer.decode(got[1])
        assert text.startswith(f"<s>{DISTURBANCE} USER:") and f"<image>\n{PROMPTS[1]} ASSISTANT:" in text


CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
          "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
          "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_templates_default_system_message_is_replaced_too(tiny_dirs, images):
    """Qwen's ChatML template writes a default system message when none is given: the disturbance replaces
    it, or the one given; the M-RoPE positions are those the model computes for the disturbed rows."""
    lvlm = lvlm_fix.load(tiny_dirs("qwen2_vl"), dtype="float32")  # its own handle: the template is changed
    lvlm.processor.chat_template = CHATML
    edit = disturbance_edit(lvlm, DISTURBANCE)
    assert edit.placement == "system"
    want = _rows(lvlm, lvlm.encode(images[:2], PROMPTS[1:3], system_prompt=DISTURBANCE))
    for system in (None, "Answer in one word."):
        batch = dict(lvlm.encode(images[:2], PROMPTS[1:3], system_prompt=system))
        batch["position_ids"] = lvlm.model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
        rows = apply_edit(edit, batch, lvlm.image_token_id)
        assert _rows(lvlm, batch, rows) == want
        positions = lvlm.model._prepare_position_ids_for_generation(
            rows["input_ids"], {k: v for k, v in rows.items() if k != "position_ids"})
        assert torch.equal(rows["position_ids"], positions)
    assert edit.bare is None  # the row without a system message has the default one in its place


def test_user_placement_puts_the_disturbance_before_the_users_text(tiny, images):
    lvlm = tiny("llava")
    edit = disturbance_edit(lvlm, DISTURBANCE, "user")
    assert edit.placement == "user"
    batch = lvlm.encode(images[:2], PROMPTS[:2], system_prompt="Be brief.")
    got = apply_edit(edit, dict(batch), lvlm.image_token_id)
    text = lvlm.tokenizer.decode(got["input_ids"][1][got["attention_mask"][1].bool()])
    assert text.startswith("<s>Be brief. USER:") and f"<image>\n{DISTURBANCE} {PROMPTS[1]} ASSISTANT:" in text


def test_a_template_that_drops_the_system_message_takes_the_user_placement(tiny_dirs):
    lvlm = lvlm_fix.load(tiny_dirs("llava"), dtype="float32")
    lvlm.processor.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n"
                                    "{{ m['content'][-1]['text'] }} {% endif %}{% endfor %}ASSISTANT:")
    assert disturbance_edit(lvlm, DISTURBANCE).placement == "user"
    with pytest.raises(ConfigError, match="no system message"):
        disturbance_edit(lvlm, DISTURBANCE, "system")


@pytest.mark.parametrize("where", ["before the image", "after the image"])
def test_edited_positions_are_those_the_model_computes_for_the_edited_prompt(where, tiny, images):
    """Qwen2-VL's M-RoPE: inserted text before or after the image; the spliced position ids equal
    generate()'s own, computed from scratch (image grid included) for the edited rows."""
    lvlm = tiny("qwen2_vl")
    model = lvlm.model
    batch = dict(lvlm.encode(images[:2], PROMPTS[1:3]))  # rows of different lengths: left padding
    batch["position_ids"] = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    text = "You are confused."
    edit = disturbance_edit(lvlm, text, "system" if where == "before the image" else "user")
    rows = apply_edit(edit, batch, lvlm.image_token_id)
    want = model._prepare_position_ids_for_generation(
        rows["input_ids"], {k: v for k, v in rows.items() if k != "position_ids"})
    if where == "before the image":  # no chat template: the system message is the prompt's prefix
        assert _rows(lvlm, batch, rows) == _rows(lvlm, lvlm.encode(images[:2], PROMPTS[1:3], system_prompt=text))
    else:
        assert rows["input_ids"].shape[1] == batch["input_ids"].shape[1] + len(edit.new)
    assert torch.equal(rows["position_ids"], want)


def test_a_row_not_in_the_models_prompt_format_is_refused(tiny, images):
    lvlm = tiny("llava")
    raw = lvlm.processor(images=[images[0]], text=["<image>\nUSER: Is there a cat? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(LvlmFixError, match="row 0 of the batch is not in this model's prompt format") as e:
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "icd"):
            lvlm.model.generate(**raw, max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_rows_with_system_messages_of_different_lengths_are_refused(tiny, images):
    lvlm = tiny("llava")
    lvlm.tokenizer.padding_side = "left"
    texts = [lvlm.build_prompt(PROMPTS[0], system_prompt=s) for s in ("Be brief.", "Be brief and polite.")]
    batch = lvlm.processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    with pytest.raises(LvlmFixError, match="system messages of different lengths") as e:
        apply_edit(disturbance_edit(lvlm, DISTURBANCE), dict(batch), lvlm.image_token_id)
    assert "\n" not in str(e.value)


def _last_logits(lvlm, inputs):
    pos = lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    with torch.inference_mode():
        return lvlm.model(**inputs, position_ids=pos).logits[:, -1].float()


def _grown(inputs, tokens):
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
        out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


def _hand(main, contrast, alpha, beta):
    out = (1 + alpha) * main - alpha * contrast
    return out.masked_fill(main < main.amax(-1, keepdim=True) + math.log(beta), -math.inf)


def _same(a, b):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=1e-4)


def test_two_decode_steps_equal_two_plain_forwards(tiny, images):
    """Qwen2-VL (M-RoPE, image at another offset in the disturbed rows): (1 + a) l - a l_d with the
    cut, l_d from a plain forward of the disturbed prompt (the model computes its own positions)."""
    lvlm = tiny("qwen2_vl")
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    disturbed = {k: v for k, v in apply_edit(disturbance_edit(lvlm, DISTURBANCE), batch, lvlm.image_token_id).items()}
    alpha, beta = 1.0, 0.7  # nearly uniform tiny models: a high beta makes the cut cut
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "icd", beta=beta) as plan:
        out = lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    main, contrast = _last_logits(lvlm, batch), _last_logits(lvlm, disturbed)
    assert (main - contrast).abs().max() > 1e-3
    assert _same(out.logits[0], _hand(main, contrast, alpha, beta))
    first = out.sequences[:, -2]
    assert _same(out.logits[1], _hand(_last_logits(lvlm, _grown(batch, first)),
                                      _last_logits(lvlm, _grown(disturbed, first)), alpha, beta))
    assert DISTURBANCE in plan.report()["icd"]["contrast_prompt_row0"]
