"""The testbed: a synthetic world with language priors and a small LLaVA trained on it.

``world`` draws scenes (and region-task scenes: a small object among clutter), ``prompts``
holds every prompt phrasing the model is trained to follow, ``benchmark`` writes POPE /
CHAIR / AMBER-format / region-task files from held-out scenes, ``model`` and ``train`` build
and train the LVLM, ``quality`` measures the shipped checkpoint.
Submodules are imported lazily so that ``import lvlm_fix.testbed`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"

__all__ = ["CHECKPOINT_DIR"]
