"""AMBER on the registry: generative (CHAIR, Cover, Hal, Cog) and discriminative (positive class: no)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, DataError
from .. import amber
from ..bench import (Bench, Option, Prompting, Sample, ci_cell, p_cell, pick_key, read_rows, register_bench,
                     row_id)
from ..data import dataset_fingerprint

_GEN_KEYS = ("nouns", "hallucinated", "covered", "named_targets", "truth", "hallu")
_DISC_KEYS = ("dimension", "label", "answer")


def synthetic_amber_dir() -> Path:
    """The testbed's synthetic AMBER-format set (written with the synthetic benchmark)."""
    from ...testbed.benchmark import SyntheticBenchmark, ensure_benchmark

    bench = SyntheticBenchmark(ensure_benchmark())
    path = getattr(bench, "amber_dir", None)
    if path is None or not Path(path).is_dir():
        raise DataError(f"the synthetic AMBER set is missing from {bench.root} (this testbed does not write one); "
                        "pass --amber-dir with the data/ folder of the AMBER repository")
    return Path(path)


@register_bench
class AmberBench(Bench):
    """AMBER: generative description hallucination and discriminative yes/no questions."""

    name = "amber"
    description = "AMBER: generative (CHAIR, Cover, Hal, Cog) and discriminative (existence, attribute, relation)"
    splits = (amber.GENERATIVE, amber.DISCRIMINATIVE)
    default_split = "all"
    options = (
        Option("amber_dir", "AMBER: its data/ folder (query/, annotations.json, relation.json, safe_words.txt; "
                            "default: the testbed's synthetic AMBER-format set)."),
        Option("image_dir", "folder of the images the data files name (POPE/CHAIR: COCO val2014; AMBER: its images)."),
        Option("amber_answers", "AMBER discriminative answers: exact = only 'Yes'/'No' count (the original); llava = "
                                "read every answer with POPE's llava parser first.",
               choices=("exact", "llava"), default="exact"),
        Option("amber_compat", "AMBER: reproduce inference.py's 0.001 denominators and F1 from rounded percentages.",
               flag=True, default=False),
        Option("amber_tagger", "AMBER nouns: perceptron (NLTK's pos_tag, as inference.py; python -m nltk.downloader "
                               "averaged_perceptron_tagger_eng) or noun (every token a noun); default: perceptron "
                               "where installed, else noun with a warning.", choices=amber.TAGGERS),
    )
    record_keys = ("id", "split", "response")
    id_keys = ("id",)
    text_keys = ("response", "text", "answer", "caption")
    frontiers = (("cover", "chair"), ("recall", "precision"))

    def __init__(self, split: str | None = None, **opts: Any) -> None:
        super().__init__(split, **opts)
        self.data: amber.AmberData | None = None
        self.tagger = amber.resolve_tagger(self.opts["amber_tagger"])  # validates, warns once

    def valid(self, record: dict[str, Any]) -> bool:
        extra = _GEN_KEYS if record.get("split") == amber.GENERATIVE else _DISC_KEYS
        return super().valid(record) and all(k in record for k in extra)

    def settings(self) -> dict[str, Any]:
        from .. import wordnet
        from ..chair_original import tokenizer_description

        lemmas = wordnet.describe()
        return {"amber_answers": self.opts["amber_answers"], "amber_compat": bool(self.opts["amber_compat"]),
                "nouns": ("tokens nltk.pos_tag tags NN*" if self.tagger == "perceptron" else
                          "every token taken as a noun (no POS tagger)") + ", kept if the WordNet noun lemma is in "
                         "relation.json's vocabulary",
                "tagger": (f"nltk {metadata.version('nltk')} averaged perceptron (pos_tag)"
                           if self.tagger == "perceptron" else "none: every token a noun"),
                "tokenizer": tokenizer_description(),
                "lemmatizer": "WordNet 3.0 noun lemma as nltk 3.8.1's WordNetLemmatizer (rules repeated), "
                              f"lvlm-fix's shipped copy ({lemmas['wordnet_data']})",
                "wordnet_sha256": lemmas["wordnet_sha256"],
                "similarity": "none: exact match and relation.json links only (no spaCy en_core_web_lg vectors)"}

    def caveat(self) -> str:
        tagger = ("with NLTK's tagger" if self.tagger == "perceptron" else
                  "without its POS tagger (every token is taken as a noun)")
        return (f"AMBER scored offline with WordNet's lemmas as inference.py, {tagger}, and without spaCy's "
                "similarity > 0.8 (exact matches and relation.json links only). Discriminative answers: "
                f"`{self.opts['amber_answers']}`.")

    def _data(self) -> amber.AmberData:
        if self.data is None:
            root = Path(self.opts["amber_dir"]) if self.opts["amber_dir"] else synthetic_amber_dir()
            self.data = amber.AmberData(root, self.opts["image_dir"])
        return self.data

    # -- data ---------------------------------------------------------------------------------
    def load(self, limit: int | None, seed: int) -> tuple[list[Sample], dict[str, Any]]:
        data = self._data()
        items = [item for split in self.split_names for item in data.queries(split)[:limit]]
        missing = next((i for i in items if not (i.image_path and i.image_path.is_file())), None)
        if missing is not None:
            raise DataError(f"AMBER image {missing.image!r} not found in {data.image_dir}; pass the folder of the "
                            "AMBER images with --image-dir")
        files = [*data.files, *(data.root / "query" / amber.QUERY_FILES[s] for s in self.split_names)]
        dataset = {"id": str(data.root), "image_dir": str(data.image_dir), "sha256": dataset_fingerprint(files),
                   "n": len(items)}
        return [Sample(str(i.id), i.split, i.query, i) for i in items], dataset

    def prompting(self, split: str) -> Prompting:
        tokens = 512 if split == amber.GENERATIVE else 32
        return Prompting(generation={"max_new_tokens": tokens, "do_sample": False, "num_beams": 1})

    # -- scoring ------------------------------------------------------------------------------
    def record(self, sample: Sample, text: str) -> dict[str, Any]:
        item: amber.AmberItem = sample.data
        rec: dict[str, Any] = {"id": sample.id, "split": item.split, "response": text}
        if item.split == amber.GENERATIVE:
            data = self._data()
            nouns = amber.extract_nouns(text, data.vocabulary, self.tagger)
            return {**rec, **amber.score_generative(nouns, item.truth, item.hallu, data.relation, data.safe_words)}
        answer = amber.read_answer(text, self.opts["amber_answers"])
        return {**rec, "dimension": item.dimension, "label": item.truth, "answer": answer}

    def values(self, split: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
        if split == amber.GENERATIVE:
            return amber.generative_values(records)
        return amber.discriminative_values(records)

    def stats(self, split: str) -> dict[str, Any]:
        if self.opts["amber_compat"]:
            return {}  # the compat numbers are the original's point estimates; no CIs on them
        return amber.GENERATIVE_STATS if split == amber.GENERATIVE else amber.DISCRIMINATIVE_STATS

    def aggregate(self, split: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        compat = bool(self.opts["amber_compat"])
        if split == amber.GENERATIVE:
            return amber.generative_metrics(records, compat)
        blocks = amber.discriminative_metrics(records, compat)
        return {**blocks["overall"], "blocks": blocks, "n_not_yes_no": sum(r["answer"] is None for r in records)}

    def overall(self, rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        if amber.GENERATIVE in rows and amber.DISCRIMINATIVE in rows:
            return {"amber_score": amber.amber_score(rows[amber.GENERATIVE]["chair"], rows[amber.DISCRIMINATIVE]["f1"])}
        return {}

    def table(self, summary: dict[str, Any]) -> list[str]:
        def cell(row: dict[str, Any], key: str) -> str:
            return "—" if row.get(key) is None else ci_cell(row, key)

        lines: list[str] = []
        gen = {m: r["splits"][amber.GENERATIVE] for m, r in summary["methods"].items() if amber.GENERATIVE in r["splits"]}
        if gen:
            lines += ["| method | CHAIR [95% CI] | Cover | Hal [95% CI] | Cog | p (CHAIR) | p (Hal) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {m} | {cell(r, 'chair')} | {cell(r, 'cover')} | {cell(r, 'hal')} | {cell(r, 'cog')} | "
                      f"{p_cell(r, 'chair')} | {p_cell(r, 'hal')} |" for m, r in gen.items()]
            lines.append("")
        disc = {m: r["splits"][amber.DISCRIMINATIVE] for m, r in summary["methods"].items()
                if amber.DISCRIMINATIVE in r["splits"]}
        if disc:
            lines += ["| method | block | accuracy | precision | recall | F1 | n | p (acc) | p (F1) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
            for m, r in disc.items():
                for block, b in r["blocks"].items():
                    if b["n"] == 0 and block != "overall":
                        continue
                    acc, f1 = (cell(r, "accuracy"), cell(r, "f1")) if block == "overall" else (pct(b["accuracy"]),
                                                                                               pct(b["f1"]))
                    ps = (p_cell(r, "accuracy"), p_cell(r, "f1")) if block == "overall" else ("—", "—")
                    lines.append(f"| {m} | {block} | {acc} | {pct(b['precision'])} | {pct(b['recall'])} | {f1} | "
                                 f"{b['n']} | {ps[0]} | {ps[1]} |")
            lines += ["", "Positive class: no. Answers other than exactly 'Yes'/'No' count as wrong "
                          "(`--amber-answers llava` reads them with POPE's llava parser)."]
        scores = {m: r["amber_score"] for m, r in summary["methods"].items() if r.get("amber_score") is not None}
        if scores:
            lines += ["", "AMBER score ((100 - CHAIR) + F1) / 2: " + ", ".join(f"{m} {100 * s:.1f}"
                                                                           for m, s in scores.items())]
        return lines

    # -- lvlm-fix score -------------------------------------------------------------------------
    def read_outputs(self, path: Path, id_key: str | None, text_key: str | None,
                     label_key: str | None) -> tuple[list[Sample], dict[str, str], dict[str, Any]]:
        if label_key:
            raise ConfigError("--label-key applies to POPE answers only")
        rows = read_rows(path)
        id_key = pick_key(path, rows, id_key, self.id_keys, "AMBER id", "--id-key")
        text_key = pick_key(path, rows, text_key, self.text_keys, "response", "--text-key")
        data = self._data()
        samples, texts = [], {}
        for i, row in enumerate(rows):
            text = row_id(path, i, row[id_key], id_key).strip()  # 1.5 and true are refused, not read as id 1
            if not text.lstrip("-").isdigit():
                raise DataError(f"{path}: row {i + 1} has {id_key}={row[id_key]!r}; AMBER ids are integers")
            item = data.item(int(text))  # its errors name the id or annotations.json, not the responses file
            if self.split in amber.QUERY_FILES and item.split != self.split:
                continue  # --split generative|discriminative scores only that part
            if str(item.id) in texts:
                raise DataError(f"{path}: id {item.id} answered twice; keep one response per id")
            if not isinstance(row[text_key], str):
                raise DataError(f"{path}: row {i + 1} has {text_key}={row[text_key]!r}; responses must be strings")
            samples.append(Sample(str(item.id), item.split, item.query, item))
            texts[str(item.id)] = row[text_key]
        if not samples:
            raise DataError(f"{path} has no {self.split} responses")
        return samples, texts, {"id": str(data.root), "sha256": dataset_fingerprint(data.files)}
