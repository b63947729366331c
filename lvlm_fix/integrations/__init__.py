"""Bridges to other tools. Each lives in its own module, which imports its tool; this package imports none."""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "lvlm_fix"


def lmms_eval_manifest() -> Any:
    """lmms-eval's entry point (group ``lmms_eval.models``, see ``pyproject.toml``): the model id and
    where its class is. lmms-eval calls it for every run; the class module is imported only when
    ``--model lvlm_fix`` is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=f"{__name__}.lmms_eval.LvlmFixLMMS")
