"""Every prompt preset, word for word, against the repository it names.

Each expected string is copied from the file and line in the comment beside it (commits: LLaVA
haotian-liu/LLaVA c121f04, VCD DAMO-NLP-SG/VCD d6568ff, OPERA shikiw/OPERA 61426ef, lmms-eval
EvolvingLMMs-Lab/lmms-eval 75571cf, SSL huazhenglin2003/SSL 23e8db0, ILVAD ytx-ML/ILVAD 2109091,
AMBER junyangwang0410/AMBER 534babf). A preset that drifts from its source fails here.
"""

from __future__ import annotations

import pytest

from lvlm_fix.evals import amber, chair, pope
from lvlm_fix.evals.bench import make_bench

Q = "Is there a dog in the image?"

# LLaVA llava/conversation.py L242-252 (conv_vicuna_v1.system).
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
# LLaVA llava/conversation.py L325-335 (conv_llava_v1.system): "human", not "user".
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")


def test_raw_is_the_hugging_face_evaluations_prompt():
    p = pope.PRESETS["raw"]
    # SSL utils.py L65 (= ILVAD utils.py L54, llava-hf's chat template): "USER: <image>\n{question} ASSISTANT:",
    # the question as the POPE file has it (SSL datasets.py L24: data['text']): no suffix, no system message.
    assert p.template.format(question=Q) == Q and p.system_prompt is None
    # SSL main.py L53-55: greedy, one beam. Its max_new_tokens is 512 (main.py L22, scripts/infer_pope.sh L3);
    # the preset keeps 32 and says so.
    assert p.generation == {"max_new_tokens": 32, "do_sample": False, "num_beams": 1} and "512" in p.note
    assert p.parser == "llava" and p.seed is None


def test_llava_is_llava_15s_pope_script():
    p = pope.PRESETS["llava"]
    # llava_pope_test.jsonl's text (the question, a newline, LLaVA docs/Evaluation.md L15-18's short-answer line).
    assert p.template.format(question=Q) == Q + "\nAnswer the question using a single word or phrase."
    # scripts/v1_5/eval/pope.sh L9: --conv-mode vicuna_v1.
    assert p.system_prompt == VICUNA_V1 == pope.VICUNA_SYSTEM_PROMPT
    # pope.sh L8 --temperature 0 -> model_vqa_loader.py L109 do_sample False; L140 num_beams 1; L141 128 tokens.
    assert p.generation == {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}
    assert p.parser == "llava" and p.seed is None


def test_lmms_eval_is_its_pope_task():
    p = pope.PRESETS["lmms-eval"]
    # lmms_eval/tasks/pope/pope.yaml L34-36: pre_prompt "", post_prompt "\nAnswer the question using a single word
    # or phrase."; utils.py L9-14 joins them around the stripped question.
    assert p.template.format(question=Q) == Q + "\nAnswer the question using a single word or phrase."
    # models/simple/llava_hf.py L330-331: the tokenizer's chat template (llava-hf's: no system message); L332-334
    # (a tokenizer without one: L31's template, vicuna_v1's system text) is named in the note.
    assert p.system_prompt is None and "vicuna_v1" in p.note
    # pope.yaml L10-15 (max_new_tokens 128, temperature 0, top_p 1.0, num_beams 1, do_sample false);
    # api/task.py L187-188 with L134: until = ["\n\n"] (the few-shot delimiter).
    assert p.generation == {"max_new_tokens": 128, "do_sample": False, "num_beams": 1, "stop": ["\n\n"]}
    assert p.parser == "lmms-exact" and p.seed is None


def test_vcd_is_vcds_pope_script():
    p = pope.PRESETS["vcd"]
    # experiments/eval/object_hallucination_vqa_llava.py L50: qs + " Please answer this question with one word.".
    assert p.template.format(question=Q) == Q + " Please answer this question with one word."
    # L108: --conv-mode default "llava_v1" (cd_scripts/llava1.5_pope.bash passes none): llava_v1's system text.
    assert p.system_prompt == LLAVA_V1 == pope.LLAVA_V1_SYSTEM_PROMPT
    # L75-79 do_sample=True, temperature/top_p/top_k from L111-113 (1.0, 1, None: no top-k cut, which is
    # top_k 0 here), max_new_tokens=1024; cd_scripts/llava1.5_pope.bash L1: seed 55.
    assert p.generation == {"max_new_tokens": 1024, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                            "num_beams": 1}
    assert p.seed == 55 and p.parser == "vcd"


def test_opera_is_operas_pope_eval():
    p = pope.PRESETS["opera"]
    # pope_eval.py L50: "USER: <ImageHere> <question> ASSISTANT:", the question as in the POPE file
    # (pope_loader.py L21); minigpt4/models/llava.py L172 puts the system message before it.
    assert p.template.format(question=Q) == Q
    # eval_configs/llava-1.5_eval.yaml L13: vicuna_v1's text.
    assert p.system_prompt == VICUNA_V1
    # pope_eval.py L200-204: max_new_tokens=10, num_beams from --beam (README L123: --beam 5), no sampling.
    assert p.generation == {"max_new_tokens": 10, "do_sample": False, "num_beams": 5}
    assert p.parser == "opera" and p.seed is None
    assert "without a separator" in p.note  # the one thing a chat template cannot reproduce, recorded


def test_every_pope_preset_is_pinned_here():
    assert set(pope.PRESETS) == {"raw", "llava", "lmms-eval", "vcd", "opera"}


def test_chair_asks_the_vhr_familys_caption_prompt():
    # SSL datasets.py L72 = ILVAD load_data.py L82 = OPERA chair_eval.py L166: "Please describe this image in detail."
    assert chair.DEFAULT_PROMPT == "Please describe this image in detail."
    p = make_bench("chair", chair_mode="original").prompting("val")
    # SSL main.py L22 / L53-55 and OPERA chair_eval.py L176: greedy, 512 new tokens; no system message
    # (SSL utils.py L65).
    assert p.template == "{question}" and p.system_prompt is None
    assert p.generation == {"max_new_tokens": 512, "do_sample": False, "num_beams": 1}


@pytest.mark.parametrize(("split", "tokens"), [(amber.GENERATIVE, 512), (amber.DISCRIMINATIVE, 32)])
def test_amber_asks_its_queries_as_written(split, tokens):
    """AMBER ships no generation script: each query goes as written (data/query/query_generative.json L4
    "Describe this image.", query_discriminative.json L5 "Is the sky sunny in this image?"), no system
    message; the token budgets are lvlm-fix's."""
    p = make_bench("amber").prompting(split)
    assert p.template == "{question}" and p.system_prompt is None
    assert p.generation == {"max_new_tokens": tokens, "do_sample": False, "num_beams": 1}
