"""The declared layering (lvlm_fix/testing/layers.py): no upward import, no import cycle."""

from __future__ import annotations

from pathlib import Path

from lvlm_fix.testing import layers


def test_no_upward_import() -> None:
    assert layers.upward_edges() == []


def test_no_cycle_between_units_or_modules() -> None:
    assert layers.unit_cycles() == []
    assert layers.cycles(layers.module_edges()) == []


def test_every_unit_is_in_a_layer_and_every_layer_unit_exists() -> None:
    units = {layers.unit_of(m) for m in layers.module_edges()} | {layers.unit_of(m) for e in layers.module_edges().values() for m in e}
    declared = {u for _, group in layers.LAYERS for u in group}
    assert units <= declared
    assert declared - units == set()  # a stale entry (a unit that no longer exists) is a lie in the layering


def test_the_edges_are_the_real_ones() -> None:
    edges = layers.module_edges()
    assert "lvlm_fix.hooks.attention" in edges["lvlm_fix.model"]  # load() installs the seam
    assert "lvlm_fix.testbed.benchmark" in edges["lvlm_fix.evals.benches.pope"]  # a function-level import counts
    # hooks name LVLM only under TYPE_CHECKING: not an edge
    assert "lvlm_fix.model" not in edges.get("lvlm_fix.hooks.plan", set())


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lvlm_fix"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "model.py": "from .errors import X\n",
        "hooks/__init__.py": "",
        "hooks/plan.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..model import LVLM\n",
        "interventions/__init__.py": "def f():\n    from ..evals.store import write\n",  # upward, inside a function
        "evals/__init__.py": "",
        "evals/store.py": "from ..interventions import f\n",
        "evals/chair.py": "from . import chair_original\n",
        "evals/chair_original.py": "from .chair import Y\n",
    })
    assert layers.upward_edges(root) == ["lvlm_fix.interventions -> lvlm_fix.evals.store"]
    assert layers.unit_cycles(root) == [["evals", "interventions"]]
    loops = layers.cycles(layers.module_edges(root))
    assert ["lvlm_fix.evals.chair", "lvlm_fix.evals.chair_original"] in loops
    assert "lvlm_fix.model" not in layers.module_edges(root).get("lvlm_fix.hooks.plan", set())
