"""ICD: the disturbed rows (tokens and M-RoPE positions) and decode steps against two plain forwards."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.icd import DISTURBANCES, ICD, DisturbanceEdit, apply_edit, disturbance_edit

DISTURBANCE = DISTURBANCES[3]


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load(None)


def test_prompts_are_the_release_disturbances():
    assert ICD.prompts() == list(DISTURBANCES) and len(DISTURBANCES) == 5
    assert ICD.config_cls().disturbance == DISTURBANCE
    with pytest.raises(ConfigError, match="disturbance is empty"):
        ICD.config_cls(disturbance=" ")


def test_system_placement_is_the_chat_template_with_the_disturbance_as_system_message(testbed, images):
    """The testbed's template has a system message: the edited rows are exactly the processor's
    tokens of the conversation with the disturbance as its system message (left padding kept)."""
    edit = disturbance_edit(testbed, DISTURBANCE)
    assert edit.placement == "system"
    prompts = ["Is there a dog in the image?", "Please describe this image in detail."]
    batch = testbed.encode(images[:2], prompts)
    got = apply_edit(edit, dict(batch), testbed.image_token_id)
    for i, prompt in enumerate(prompts):
        messages = [{"role": "system", "content": [{"type": "text", "text": DISTURBANCE}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = testbed.processor.apply_chat_template(messages, add_generation_prompt=True)
        want = testbed.processor(images=[images[i]], text=[text], return_tensors="pt")["input_ids"][0]
        assert got["input_ids"][i][got["attention_mask"][i].bool()].tolist() == want.tolist()


def test_user_placement_puts_the_disturbance_before_the_users_text(tiny, images):
    lvlm = tiny("llava")  # no chat template: no system message
    with pytest.raises(ConfigError, match="no system message"):
        disturbance_edit(lvlm, DISTURBANCE, "system")
    edit = disturbance_edit(lvlm, DISTURBANCE)
    assert edit.placement == "user"
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    got = apply_edit(edit, dict(batch), lvlm.image_token_id)
    text = lvlm.tokenizer.decode(got["input_ids"][1][got["attention_mask"][1].bool()])
    assert f"<image>\n{DISTURBANCE} {PROMPTS[1]} ASSISTANT:" in text


@pytest.mark.parametrize("where", ["before the image", "after the image"])
def test_edited_positions_are_those_the_model_computes_for_the_edited_prompt(where, tiny, images):
    """Qwen2-VL's M-RoPE: inserted text before or after the image; the spliced position ids equal
    generate()'s own, computed from scratch (image grid included) for the edited rows."""
    lvlm = tiny("qwen2_vl")
    model = lvlm.model
    batch = dict(lvlm.encode(images[:2], PROMPTS[1:3]))  # rows of different lengths: left padding
    batch["position_ids"] = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    words = tuple(lvlm.tokenizer("You are confused. ", add_special_tokens=False)["input_ids"])
    if where == "before the image":  # after "<|im_start|>", as a system block would be
        edit = DisturbanceEdit("system", new=words, head=(int(batch["input_ids"][1, 0]),))
    else:
        edit = disturbance_edit(lvlm, "You are confused.", "user")
    rows = apply_edit(edit, batch, lvlm.image_token_id)
    want = model._prepare_position_ids_for_generation(
        rows["input_ids"], {k: v for k, v in rows.items() if k != "position_ids"})
    assert rows["input_ids"].shape[1] == batch["input_ids"].shape[1] + len(words)
    assert torch.equal(rows["position_ids"], want)


def test_a_row_not_in_the_models_prompt_format_is_refused(tiny, images):
    lvlm = tiny("llava")
    raw = lvlm.processor(images=[images[0]], text=["USER: <image>Is there a cat? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(LvlmFixError, match="row 0 of the batch is not in this model's prompt format") as e:
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "icd"):
            lvlm.model.generate(**raw, max_new_tokens=2)
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
