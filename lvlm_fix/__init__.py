"""lvlm-fix: make vision-language models hallucinate less at inference time, without training.

Public API::

    handle = lvlm_fix.load("llava-hf/llava-1.5-7b-hf")        # or a local dir; None = embedded testbed
    handle = lvlm_fix.wrap(model, processor)                  # a model you loaded yourself (quantised, sharded)
    handle = lvlm_fix.wrap(model, processor, adapter={"text_layers": "..."})  # where derivation cannot read it
    with lvlm_fix.apply(handle, "vhr", alpha=2.0):            # around the real generate()
        ids = handle.model.generate(**handle.encode([image], [prompt]), max_new_tokens=64)
    out = lvlm_fix.generate(handle, [image], [prompt], method="vhr+var")   # one call
    stats = lvlm_fix.head_statistics(handle, image, prompt)    # VHD, sinks, entropy, image mass
    lvlm_fix.register_method(MyMethod)                         # a method of your own (docs/adding-a-method.md)
    lvlm_fix.register_bench(MyBench)                           # a benchmark of your own (docs: adding a benchmark)
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["Adapter", "Generation", "Intervention", "MethodConfig", "Stage", "__version__", "apply", "evaluate", "generate",
           "head_statistics", "list_methods", "load", "load_image", "param", "register_bench", "register_method", "wrap"]


def __getattr__(name: str) -> Any:
    # Lazy: `import lvlm_fix` (and `lvlm-fix --help`) must not pay for importing torch/transformers.
    if name in ("apply", "generate", "Generation"):
        from . import api

        return getattr(api, name)
    if name == "Adapter":  # load(..., adapter=) / wrap(..., adapter=): the escape hatch for a family derivation misses
        from .adapters import Adapter

        return Adapter
    if name in ("load", "wrap"):
        from . import model

        return getattr(model, name)
    if name == "load_image":
        from .images import load_image

        return load_image
    if name == "head_statistics":
        from .diagnostics import head_statistics

        return head_statistics
    if name == "register_bench":
        from .evals.bench import register_bench

        return register_bench
    if name == "evaluate":
        from .evals.runner import evaluate

        return evaluate
    if name == "list_methods":
        from .interventions import METHODS

        return METHODS.names
    if name in ("register_method", "Intervention", "MethodConfig", "Stage", "param"):
        from . import interventions

        return getattr(interventions, name)
    raise AttributeError(f"module 'lvlm_fix' has no attribute {name!r}")
