"""CHAIR on the registry: COCO-format annotations, the three extraction modes, CHAIR_S / CHAIR_I / recall."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, DataError
from .. import chair, chair_opera
from ..bench import (Bench, Option, Prompting, Sample, ci_cell, p_cell, pick_key, read_rows, register_bench,
                     row_id)
from ..data import dataset_fingerprint, load_coco_captions_for_chair


@dataclass(frozen=True)
class _ScoredImage:
    image_id: int

    def load_image(self) -> Any:
        raise DataError("scored captions carry no image")


@register_bench
class ChairBench(Bench):
    """CHAIR caption hallucination on COCO-format instances + captions."""

    name = "chair"
    description = "CHAIR caption hallucination on COCO-format instances + captions (modes: opera, original, lvlm-fix)"
    options = (
        Option("coco_annotations", "CHAIR: folder with instances_val2014.json and captions_val2014.json "
                                   "(score also reads the train2014 files there for train image ids)."),
        Option("image_dir", "folder of the images the data files name (POPE/CHAIR: COCO val2014; AMBER: its images)."),
        Option("chair_mode", "CHAIR: object extraction: opera = OPERA's chair.py (NLTK tagger + WordNet; the "
                             "scorer of OPERA, PAI, PAINT, lmms-eval and most papers); original = LisaAnne/"
                             "Hallucination chair.py exactly (pattern's singulariser); lvlm-fix = this project's "
                             "fixed reading.", choices=chair.MODES, default=chair.DEFAULT_MODE),
        Option("chair_singularizer", "CHAIR original mode: pattern (the original) or inflect (the VHR family).",
               choices=("pattern", "inflect")),
        Option("chair_tagger", "CHAIR opera mode: perceptron (NLTK's; python -m nltk.downloader "
                               "averaged_perceptron_tagger_eng) or noun (every token a noun); default: perceptron "
                               "where installed, else noun with a warning.", choices=chair_opera.TAGGERS),
        Option("chair_ground_truth", "CHAIR score: a JSON file of image id -> ground-truth objects (a released "
                                     "chair.pkl converted by tools/chair_released.py), instead of "
                                     "--coco-annotations."),
    )
    record_keys = ("id", "image_id", "caption", "mentioned", "words", "hallucinated", "gt", "n_words", "n_tokens")
    id_keys = ("image_id",)
    text_keys = ("caption", "text", "answer", "response")
    frontiers = (("recall", "chair_i"), ("recall", "chair_s"))

    def __init__(self, split: str | None = None, **opts: Any) -> None:
        super().__init__(split, **opts)
        self.extractor = chair.make_extractor(**self._kw())  # validates
        self.evaluator: chair.ChairEvaluator | None = None

    def settings(self) -> dict[str, Any]:
        return self.extractor.describe()

    def caveat(self) -> str:
        s = self.settings()
        tagger = f", tagger: {s['tagger']}" if "tagger" in s else ""
        return (f"CHAIR in `{s['chair_mode']}` mode (singulariser {s['singularizer_version']}{tagger}, synonym file "
                f"sha256 {s['synonyms_sha256'][:12]}…). The modes disagree on many captions: compare only numbers of "
                "the same mode.")

    def _kw(self) -> dict[str, Any]:
        return {"mode": self.opts["chair_mode"], "singularizer": self.opts["chair_singularizer"],
                "tagger": self.opts["chair_tagger"]}

    # -- data ---------------------------------------------------------------------------------
    def load(self, limit: int | None, seed: int) -> tuple[list[Sample], dict[str, Any]]:
        n = limit or chair.DEFAULT_NUM_IMAGES
        if self.opts["chair_ground_truth"]:
            raise ConfigError("--chair-ground-truth applies to lvlm-fix score only; eval needs --coco-annotations "
                              "and --image-dir (or neither, for the synthetic benchmark)")
        if bool(self.opts["coco_annotations"]) != bool(self.opts["image_dir"]):
            raise ConfigError("CHAIR needs both --coco-annotations DIR and --image-dir DIR (COCO 2014 val), or neither "
                              "(the synthetic benchmark)")
        if self.opts["coco_annotations"]:
            raw, self.evaluator = load_coco_captions_for_chair(self.opts["coco_annotations"], self.opts["image_dir"],
                                                               n=n, seed=seed, **self._kw())
            files = [Path(self.opts["coco_annotations"]) / "instances_val2014.json"]
            dataset: dict[str, Any] = {"id": str(self.opts["coco_annotations"]), "image_dir": str(self.opts["image_dir"])}
        else:
            from ...testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            b = SyntheticBenchmark(ensure_benchmark())
            raw, self.evaluator = load_coco_captions_for_chair(
                None, b.images_dir, n=n, seed=seed, instances_paths=b.instances_file, captions_paths=b.captions_file,
                **self._kw())
            files = [b.instances_file, b.captions_file]
            dataset = {"id": "lvlm-fix synthetic COCO-format captions", "path": str(b.root)}
        dataset.update(sha256=dataset_fingerprint(files), n=len(raw), image_ids=[s.image_id for s in raw],
                       sampling=f"random.Random({seed}).sample(ids, {n})")
        return [Sample(str(s.image_id), "val", chair.DEFAULT_PROMPT, s) for s in raw], dataset

    def prompting(self, split: str) -> Prompting:
        return Prompting(generation={"max_new_tokens": chair.DEFAULT_MAX_NEW_TOKENS, "do_sample": False,
                                     "num_beams": 1})

    # -- scoring ------------------------------------------------------------------------------
    def record(self, sample: Sample, text: str) -> dict[str, Any]:
        assert self.evaluator is not None, "load() or read_outputs() first"
        return {"id": sample.id, **asdict(self.evaluator.score(sample.data.image_id, text))}

    def _details(self, records: Sequence[dict[str, Any]]) -> list[chair.CaptionDetail]:
        return [chair.CaptionDetail.from_record(r) for r in records]

    def values(self, split: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
        return chair.caption_counts(self._details(records))

    def stats(self, split: str) -> dict[str, Any]:
        return chair.STATS

    def aggregate(self, split: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        result = chair.ChairResult.from_details(self._details(records), {}).as_dict(include_details=False)
        del result["settings"]  # named once, in the summary's settings
        return result

    def table(self, summary: dict[str, Any]) -> list[str]:
        lines = ["| method | CHAIR_S [95% CI] | CHAIR_I [95% CI] | recall [95% CI] | words | tokens | p (CHAIR_S) "
                 "| p (CHAIR_I) |", "|---|---|---|---|---|---|---|---|"]
        for m, res in summary["methods"].items():
            for row in res["splits"].values():
                lines.append(f"| {m} | {ci_cell(row, 'chair_s')} | {ci_cell(row, 'chair_i')} | "
                             f"{ci_cell(row, 'recall')} | {row['mean_length']:.1f} | {row['mean_tokens']:.1f} | "
                             f"{p_cell(row, 'chair_s')} | {p_cell(row, 'chair_i')} |")
        lines += ["", "words: mean whitespace words per caption; tokens: mean items the extractor saw (OPERA's Len)."]
        return lines

    # -- lvlm-fix score -------------------------------------------------------------------------
    def read_outputs(self, path: Path, id_key: str | None, text_key: str | None,
                     label_key: str | None) -> tuple[list[Sample], dict[str, str], dict[str, Any]]:
        if label_key:
            raise ConfigError("--label-key applies to POPE answers only")
        rows = _scorer_sentences(path) or read_rows(path)
        id_key = pick_key(path, rows, id_key, self.id_keys, "image id", "--id-key")
        text_key = pick_key(path, rows, text_key, self.text_keys, "caption", "--text-key")
        ids = []
        for i, r in enumerate(rows):  # a float or boolean id is refused, not read as image 1
            text = row_id(path, i, r[id_key], id_key).strip()
            if not text.isdigit():
                raise DataError(f"{path}: image id {r[id_key]!r} is not an integer COCO image id")
            ids.append(int(text))
        self.evaluator, dataset = self._score_evaluator(ids)
        missing = next((i for i in ids if not self.evaluator.has_image(i)), None)
        if missing is not None:
            raise DataError(f"{path}: image_id {missing} is not in the COCO annotations {dataset['id']}; pass the "
                            "folder whose captions/instances files hold it with --coco-annotations")
        samples, texts = [], {}
        for i, (image_id, row) in enumerate(zip(ids, rows)):
            if not isinstance(row[text_key], str):
                raise DataError(f"{path}: row {i + 1} has {text_key}={row[text_key]!r}; captions must be strings")
            sid = str(image_id)
            if sid in texts:  # as POPE and AMBER: one output per sample (it would be scored twice)
                raise DataError(f"{path}: row {i + 1} captions image {image_id} a second time; keep one caption per "
                                "image (score other captions of it as another file)")
            samples.append(Sample(sid, "val", "", _ScoredImage(image_id)))
            texts[sid] = row[text_key]
        return samples, texts, dataset

    def _score_evaluator(self, ids: list[int]) -> tuple[chair.ChairEvaluator, dict[str, Any]]:
        """The evaluator for scored captions: a given ground truth, or val2014 files plus train2014 ones when
        ids need them."""
        if self.opts["chair_ground_truth"]:
            if self.opts["coco_annotations"]:
                raise ConfigError("pass --chair-ground-truth FILE or --coco-annotations DIR, not both")
            gt = Path(self.opts["chair_ground_truth"])
            evaluator = chair.ChairEvaluator.from_ground_truth(gt, **self._kw())
            return evaluator, {"id": str(gt), "sha256": dataset_fingerprint([gt])}
        if not self.opts["coco_annotations"]:
            from ...testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            b = SyntheticBenchmark(ensure_benchmark())
            inst, caps = [b.instances_file], [b.captions_file]
            dataset: dict[str, Any] = {"id": "lvlm-fix synthetic COCO-format captions"}
        else:
            root = Path(self.opts["coco_annotations"])
            if not root.is_dir():
                raise DataError(f"annotations directory not found: {root}; pass the annotations/ folder of COCO 2014")
            inst, caps = [root / "instances_val2014.json"], [root / "captions_val2014.json"]
            dataset = {"id": str(root)}
        evaluator = chair.ChairEvaluator.from_coco(inst, caps, **self._kw())
        train = [Path(p).with_name(Path(p).name.replace("val2014", "train2014")) for p in (*inst, *caps)]
        if any(not evaluator.has_image(i) for i in ids) and all(p.is_file() for p in train):
            inst, caps = inst + train[:1], caps + train[1:]
            evaluator = chair.ChairEvaluator.from_coco(inst, caps, **self._kw())
        dataset["sha256"] = dataset_fingerprint([*inst, *caps])
        return evaluator, dataset


def _scorer_sentences(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a CHAIR scorer's own output (OPERA's ``--save_path``: one JSON object whose
    ``sentences`` list holds ``{"image_id", "caption", ...}``), or None for any other file."""
    try:
        with path.open(encoding="utf-8") as fh:
            if fh.read(64).lstrip()[:1] != "{":
                return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    rows = data.get("sentences") if isinstance(data, dict) else None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return rows
    return None
