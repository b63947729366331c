"""Model-free evaluation code: POPE, CHAIR and AMBER scoring, bootstrap statistics, dataset loaders.

The benchmarks themselves (data, prompts, records, metrics, tables) are :class:`Bench` classes in
:data:`BENCHES`: the built-ins of :mod:`lvlm_fix.evals.benches` and any plugin's (``register_bench``, the
``lvlm_fix.benches`` entry points, ``$LVLM_FIX_PLUGINS``); :mod:`lvlm_fix.evals.runner` runs any of them.

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
        "PRESETS",
        "PARSERS",
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
        "make_extractor",
        "sample_chair_image_ids",
        "SINGULARIZER",
        "MODES",
        "DEFAULT_MODE",
    ),
    "amber": ("AmberData", "extract_nouns", "generative_metrics", "discriminative_metrics", "amber_score"),
    "runner": ("evaluate", "score_outputs", "list_benches"),
    "bench": ("BENCHES", "Bench", "Option", "Prompting", "Sample", "make_bench", "register_bench"),
    "stats": (
        "BootstrapCI",
        "PairedBootstrap",
        "bootstrap_ci",
        "paired_bootstrap",
        "paired_bootstrap_p",
    ),
    "data": (
        "PopeSample",
        "CocoImageSample",
        "load_pope_jsonl",
        "load_pope_hf",
        "load_coco_captions_for_chair",
        "dataset_fingerprint",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
_MODULE_OF["DataError"] = "data"  # defined in lvlm_fix.errors, kept importable from here

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from lvlm_fix.errors import DataError
    from lvlm_fix.evals.amber import AmberData, amber_score, discriminative_metrics, extract_nouns, generative_metrics
    from lvlm_fix.evals.bench import BENCHES, Bench, Option, Prompting, Sample, make_bench, register_bench
    from lvlm_fix.evals.chair import (
        DEFAULT_MODE,
        MODES,
        SINGULARIZER,
        ChairEvaluator,
        ChairResult,
        SynonymTable,
        caption_to_objects,
        make_extractor,
        sample_chair_image_ids,
    )
    from lvlm_fix.evals.data import (
        CocoImageSample,
        PopeSample,
        dataset_fingerprint,
        load_coco_captions_for_chair,
        load_pope_hf,
        load_pope_jsonl,
    )
    from lvlm_fix.evals.pope import (
        DEFAULT_QUESTION_TEMPLATE,
        LLAVA_QUESTION_TEMPLATE,
        PARSERS,
        PRESETS,
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
    from lvlm_fix.evals.runner import evaluate, list_benches, score_outputs
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
