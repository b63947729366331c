"""POPE in lmms-eval's local layout, written from files you have: ``lvlm-fix lmms-data --out DIR``.

lmms-eval loads ``--tasks pope`` from the hub. Offline, or on POPE files of your own, it needs a local
task and a local copy of the data: this module writes both into ``DIR``::

    DIR/pope_local_data/          the questions as a DatasetDict saved with ``save_to_disk`` (split "test"),
                                  columns of lmms-lab/POPE: question_id, question, answer, image, category,
                                  image_source (images embedded)
    DIR/tasks/pope_local/         the task (shipped with lvlm-fix): lmms-eval's POPE prompt, generation and
                                  metrics, reading ./pope_local_data (its utils.py imports lmms-eval's own)

then ``cd DIR && python -m lmms_eval --model lvlm_fix ... --tasks pope_local --include_path tasks``. The
questions come from AoiDragon/POPE's question files and a COCO image folder (``--pope-questions``,
``--image-dir``), or, without them, from the testbed's synthetic POPE. A task may not reuse a built-in
task's name (a local ``pope`` would not replace lmms-eval's), hence ``pope_local``. lmms-lab/POPE itself
needs none of this: lmms-eval reads it (``--tasks pope``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["TASKS_DIR", "write_lmms_pope"]

TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"
"""The lmms-eval tasks lvlm-fix ships (``pope_local``)."""

DATA_NAME = "pope_local_data"  # the task's dataset_path, relative to lmms-eval's working directory


def write_lmms_pope(out: str | Path, split: str = "all", pope_questions: str | None = None,
                    image_dir: str | None = None, limit: int | None = None) -> Path:
    """Write POPE (``split``: random, popular, adversarial or all) and the ``pope_local`` task under ``out``.

    Rows follow lmms-lab/POPE: ``question_id`` ``"<split>-<id>"``, ``category`` the split, ``image_source`` the
    image's file stem; ``limit`` questions per split, in file order. Returns ``out``.
    """
    from ..evals.bench import make_bench
    from ..extras import require

    datasets = require("datasets", "the pope_local task's data")

    out = Path(out)
    data = out / DATA_NAME
    if data.exists():
        raise InputError(f"{data} already exists; choose a new --out folder or move it away")
    bench = make_bench("pope", split, pope_questions=pope_questions, image_dir=image_dir)
    samples, dataset = bench.load(limit, seed=0)
    # The images as file paths: datasets embeds them when it saves, one file at a time.
    images = Path(dataset["image_dir"]) if "image_dir" in dataset else Path(dataset["path"]) / "images"
    rows: dict[str, list[Any]] = {k: [] for k in ("question_id", "question", "answer", "image", "category",
                                                  "image_source")}
    for s in samples:
        p = s.data
        for key, value in (("question_id", f"{p.split}-{p.question_id}"), ("question", p.question),
                           ("answer", p.label), ("image", str(images / p.image_key)), ("category", p.split),
                           ("image_source", Path(p.image_key).stem)):
            rows[key].append(value)
    features = datasets.Features({k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    shutil.copytree(TASKS_DIR, out / "tasks", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return out
