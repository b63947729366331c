"""Model-free evaluation code: POPE and CHAIR scoring, bootstrap statistics, dataset loaders.

Names are re-exported lazily, so ``import lvlm_fix.evals`` imports nothing heavy (not even numpy)
until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "pope": (
        "SPLITS",
        "DEFAULT_QUESTION_TEMPLATE",
        "LLAVA_QUESTION_TEMPLATE",
        "Confusion",
        "PopeMetrics",
        "PopeReport",
        "build_prompt",
        "parse_answer",
        "is_unparseable",
        "metrics",
        "score",
        "average_over_splits",
    ),
    "chair": (
        "ChairEvaluator",
        "ChairResult",
        "SynonymTable",
        "caption_to_objects",
        "sample_chair_image_ids",
        "SINGULARIZER",
    ),
    "stats": (
        "BootstrapCI",
        "PairedBootstrap",
        "bootstrap_ci",
        "paired_bootstrap",
        "paired_bootstrap_p",
    ),
    "data": (
        "DataError",
        "PopeSample",
        "CocoImageSample",
        "load_pope_jsonl",
        "load_pope_hf",
        "load_coco_captions_for_chair",
        "dataset_fingerprint",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from lvlm_fix.evals.chair import (
        SINGULARIZER,
        ChairEvaluator,
        ChairResult,
        SynonymTable,
        caption_to_objects,
        sample_chair_image_ids,
    )
    from lvlm_fix.evals.data import (
        CocoImageSample,
        DataError,
        PopeSample,
        dataset_fingerprint,
        load_coco_captions_for_chair,
        load_pope_hf,
        load_pope_jsonl,
    )
    from lvlm_fix.evals.pope import (
        DEFAULT_QUESTION_TEMPLATE,
        LLAVA_QUESTION_TEMPLATE,
        SPLITS,
        Confusion,
        PopeMetrics,
        PopeReport,
        average_over_splits,
        build_prompt,
        is_unparseable,
        metrics,
        parse_answer,
        score,
    )
    from lvlm_fix.evals.stats import (
        BootstrapCI,
        PairedBootstrap,
        bootstrap_ci,
        paired_bootstrap,
        paired_bootstrap_p,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lvlm_fix.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lvlm_fix.evals.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
