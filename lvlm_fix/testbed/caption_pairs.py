"""Synthetic caption pairs from the testbed's world: (image, question, faithful caption, hallucinated caption).

The calibration set of methods fitted on faithful/hallucinated pairs (VTI): scenes drawn from a stream of
their own (world seed 1, not the benchmark the evals score), each with its canonical caption and the same
caption naming one more object that the scene does not show, in a colour of the scene. Deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .world import CAPTION_PROMPT, CATEGORY_NAMES, World

__all__ = ["STREAM", "WORLD_SEED", "caption_pairs", "write_caption_pairs"]

WORLD_SEED = 1  # `calibrate`'s default data comes from the world of seed 1, not eval's (seed 0)
STREAM = 17  # the caption pairs' own stream of scenes in that world


def caption_pairs(n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``n`` pairs as dicts (``id``, ``image`` a PIL image, ``question``, ``value``, ``h_value``) and their description."""
    world = World(seed=WORLD_SEED)
    pairs = []
    for i in range(n):
        scene = world.scene("val", i, stream=STREAM)
        rng = np.random.default_rng([WORLD_SEED, STREAM, i])
        absent = [c for c in CATEGORY_NAMES if c not in scene.counts()]
        colours = sorted({o.colour for o in scene.objects})
        extra = (absent[int(rng.integers(len(absent)))], colours[int(rng.integers(len(colours)))])
        pairs.append({"id": f"synthetic-{i}", "image": world.render(scene), "question": CAPTION_PROMPT,
                      "value": world.caption(scene), "h_value": world.caption(scene, extra=[extra])})
    return pairs, {"id": f"lvlm-fix synthetic caption pairs (world seed {WORLD_SEED}, stream {STREAM})", "size": n}


def write_caption_pairs(n: int, folder: str | Path) -> Path:
    """Write ``n`` pairs as ``folder/demos.jsonl`` and its PNG images beside it; returns the jsonl's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pairs, _ = caption_pairs(n)
    lines = []
    for p in pairs:
        name = f"{p['id']}.png"
        p["image"].save(out / name)
        lines.append(json.dumps({"image": name, "question": p["question"], "value": p["value"], "h_value": p["h_value"]}))
    path = out / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
