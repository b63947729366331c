"""A benchmark of one's own: does the answer name the object's colour? (docs: Adding a benchmark)

Reads JSON lines ``{"question_id", "image", "text", "label"}`` (``label``: the colour word) and an image
folder; without them, the testbed's region colour questions ("What color is the cup?"). Import this file
(or name it in ``LVLM_FIX_PLUGINS``, or in an entry point of the ``lvlm_fix.benches`` group), then
``lvlm-fix eval --bench colour`` or ``lvlm_fix.evaluate(handle, bench="colour", methods=["none", "vhr"])``.
tests/test_docs.py and tests/test_bench_plugins.py run it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lvlm_fix.errors import DataError
from lvlm_fix.evals.bench import Bench, Option, Prompting, Sample, ci_cell, p_cell, register_bench
from lvlm_fix.evals.data import dataset_fingerprint


@dataclass(frozen=True)
class ColourQuestion:
    image: Path
    label: str

    def load_image(self) -> Image.Image:
        return Image.open(self.image).convert("RGB")


def _accuracy(v: np.ndarray) -> np.ndarray:
    return v[..., 0].mean(-1)  # v: (..., n, 1), 1 where the answer names the colour


@register_bench
class ColourBench(Bench):
    name = "colour"
    description = "colour questions: does the answer name the object's colour"
    options = (
        Option("colour_file", "colour: JSON lines {question_id, image, text, label} (default: the testbed's)."),
        Option("image_dir", "folder of the images the data files name."),
    )
    record_keys = ("id", "label", "answer", "correct")

    def load(self, limit, seed):
        if self.opts["colour_file"]:
            path, images = Path(self.opts["colour_file"]), Path(self.opts["image_dir"] or ".")
        else:
            from lvlm_fix.testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            b = SyntheticBenchmark(ensure_benchmark())
            path, images = b.region_file("colour"), b.images_dir
        if not path.is_file():
            raise DataError(f"colour question file not found: {path}; pass --colour-file FILE")
        rows = [r for r in map(_json, path.read_text(encoding="utf-8").splitlines()) if r][:limit]
        samples = [Sample(str(r["question_id"]), "colour", r["text"], ColourQuestion(images / r["image"], r["label"]))
                   for r in rows]
        return samples, {"id": str(path), "sha256": dataset_fingerprint([path]), "n": len(samples)}

    def prompting(self, split):
        return Prompting(generation={"max_new_tokens": 8, "do_sample": False, "num_beams": 1})

    def record(self, sample, text):
        correct = sample.data.label in re.findall(r"[a-z]+", text.lower())
        return {"id": sample.id, "label": sample.data.label, "answer": text, "correct": correct}

    def values(self, split, records):
        return np.array([[float(r["correct"])] for r in records]).reshape(-1, 1)

    def stats(self, split):
        return {"accuracy": _accuracy}

    def aggregate(self, split, records):
        return {"accuracy": float(np.mean([r["correct"] for r in records])), "n": len(records)}

    def table(self, summary):
        lines = ["| method | accuracy [95% CI] | p |", "|---|---|---|"]
        for m, res in summary["methods"].items():
            for row in res["splits"].values():
                lines.append(f"| {m} | {ci_cell(row, 'accuracy')} | {p_cell(row, 'accuracy')} |")
        return lines


def _json(line: str):
    import json

    return json.loads(line) if line.strip() else None
