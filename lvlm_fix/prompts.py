"""The chat system messages the papers' evaluation code sends, in one place.

The POPE presets send them (:mod:`lvlm_fix.evals.pope`), the CLI's ``--system-prompt vicuna`` names
one, and the testbed is trained to follow them (:mod:`lvlm_fix.testbed.prompts`), so they sit below
all three.
"""

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA-1.5's ``vicuna_v1`` system message (llava/conversation.py L242-252; llava-hf's chat template has none by
default). LLaVA's POPE script runs it (scripts/v1_5/eval/pope.sh ``--conv-mode vicuna_v1``), OPERA too."""

LLAVA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""LLaVA's ``llava_v1`` system message (llava/conversation.py L325-335): "human" where vicuna_v1 says "user". The
default ``--conv-mode`` of VCD's POPE script (object_hallucination_vqa_llava.py L108; its shell script passes none)."""
