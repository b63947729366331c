"""Testing utilities for lvlm-fix and for authors of methods of their own.

* :func:`check_method` (``conformance``): the conformance checks every built-in method passes
  (no-op bit identity, math identity, batched = per-row, hook hygiene, chunked = unchunked), in
  one call on a tiny model built offline;
* :func:`build_tiny`, :func:`build_image` (``tiny``): tiny random-weight LVLMs of the tested
  families, saved to a folder for :func:`lvlm_fix.load`, and drawn test images;
* ``families``: the matrix of every image-text-to-text family of the installed transformers;
  ``generate_features``: the ``generate()`` feature matrix; ``layers``: the package's declared layering.

Names load on first use: ``python -m lvlm_fix.testing.layers`` and the tests that import one
module pay for no other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .conformance import CHECKS, CheckResult, check_method
    from .tiny import build_image, build_tiny

__all__ = ["CHECKS", "CheckResult", "build_image", "build_tiny", "check_method"]

_HOME = {"CHECKS": "conformance", "CheckResult": "conformance", "check_method": "conformance",
         "build_image": "tiny", "build_tiny": "tiny"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lvlm_fix.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value
