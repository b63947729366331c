"""The testbed: a synthetic world with language priors and a small LLaVA trained on it.

``world`` draws scenes (and region-task scenes: a small object among clutter), ``prompts``
holds every prompt phrasing the model is trained to follow, ``benchmark`` writes POPE /
CHAIR / AMBER-format / region-task files from held-out scenes (the benches' default data),
``model`` builds and loads the LVLM, and ``checkpoint/`` is the shipped one.
The development tools live in :mod:`lvlm_fix.testbed.dev`, loaded only by ``lvlm-fix testbed
train`` (``dev.train``) and ``python -m lvlm_fix.testbed.dev.quality`` (``dev.quality``, the
checkpoint's quality report, whose bench numbers come from the runner).
Submodules are imported lazily so that ``import lvlm_fix.testbed`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"

__all__ = ["CHECKPOINT_DIR"]
