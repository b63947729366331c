"""POPE on the registry: question files, presets and parsers, per-split metrics with CIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, DataError
from .. import pope
from ..bench import (Bench, Option, Prompting, Sample, ci_cell, p_cell, pick_key, read_rows, register_bench,
                     row_id)
from ..data import PopeSample, dataset_fingerprint, load_pope_hf, load_pope_jsonl

_SYNTHETIC = "lvlm-fix synthetic POPE"


def _pope_file(questions: Path, split: str) -> Path:
    if questions.is_file():
        return questions
    if not questions.is_dir():
        raise DataError(f"POPE question file or folder not found: {questions}; pass e.g. coco_pope_{split}.json")
    found = sorted(p for p in questions.iterdir() if p.stem.endswith(f"_{split}") and p.suffix in (".json", ".jsonl"))
    if not found:
        raise DataError(f"no *_{split}.json file in {questions}; name the question files like coco_pope_{split}.json")
    return found[0]


def _no_image() -> Any:
    raise DataError("scored answers carry no image")


@register_bench
class PopeBench(Bench):
    """POPE object probing (yes/no): random / popular / adversarial splits."""

    name = "pope"
    description = "POPE object probing (yes/no): random / popular / adversarial splits"
    splits = pope.SPLITS
    default_split = "adversarial"
    options = (
        Option("pope_questions", "POPE: a question file (one split) or a folder of *_<split>.json[l]; with --image-dir."),
        Option("image_dir", "folder of the images the data files name (POPE/CHAIR: COCO val2014; AMBER: its images)."),
        Option("hf_dataset", "POPE from `datasets`: lmms-lab/POPE or a local copy."),
        Option("prompt_preset", "POPE: user-turn template, system prompt, decoding and parser of one paper family.",
               choices=tuple(pope.PRESETS), default=pope.DEFAULT_PRESET),
        Option("pope_parser", "POPE: answer parser (default: the preset's).", choices=tuple(pope.PARSERS)),
    )
    record_keys = ("id", "split", "label", "answer", "pred", "unparseable")
    id_keys = ("question_id", "id")
    text_keys = ("text", "answer", "ans", "response")
    frontiers = (("recall", "precision"),)

    def __init__(self, split: str | None = None, **opts: Any) -> None:
        super().__init__(split, **opts)
        self.preset = pope.get_preset(self.opts["prompt_preset"])
        self.parser = pope.get_parser(self.opts["pope_parser"] or self.preset.parser)
        if self.opts["pope_questions"] and self.opts["hf_dataset"]:
            raise ConfigError("pass either --pope-questions or --hf-dataset, not both")
        if self.opts["pope_questions"] and not self.opts["image_dir"]:
            raise ConfigError("--image-dir is required with --pope-questions; pass the COCO val2014 image folder")
        self._given_split = split

    @property
    def preset_name(self) -> str:
        if self.scoring and "prompt_preset" not in self.given:
            return "unknown (scored answers; pass --prompt-preset to record it)"
        return self.preset.name

    def settings(self) -> dict[str, Any]:
        out = {"prompt_preset": self.preset_name, "pope_parser": self.parser.name, "parser_rule": self.parser.rule}
        if self.preset_name == self.preset.name:
            out["preset_used_by"] = self.preset.used_by
            if self.preset.note:
                out["preset_note"] = self.preset.note
        return out

    def caveat(self) -> str:
        text = (f"POPE with prompt preset `{self.preset_name}` and parser `{self.parser.name}`. Prompt, decoding and "
                "parser each move POPE by points: compare these numbers only with runs that use the same preset and "
                "parser.")
        if self.parser.name != self.preset.parser and self.preset_name == self.preset.name:
            text += f" (The preset's own parser is `{self.preset.parser}`.)"
        return text

    # -- data ---------------------------------------------------------------------------------
    def load(self, limit: int | None, seed: int) -> tuple[list[Sample], dict[str, Any]]:
        raw, files = [], []
        if self.opts["hf_dataset"]:
            for s in self.split_names:
                raw += load_pope_hf(self.opts["hf_dataset"], s)[:limit]
            dataset: dict[str, Any] = {"id": self.opts["hf_dataset"]}
        elif self.opts["pope_questions"]:
            for s in self.split_names:
                files.append(_pope_file(Path(self.opts["pope_questions"]), s))
                raw += load_pope_jsonl(files[-1], self.opts["image_dir"], s)[:limit]
            dataset = {"id": str(self.opts["pope_questions"]), "image_dir": str(self.opts["image_dir"])}
        else:
            from ...testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            bench_dir = SyntheticBenchmark(ensure_benchmark())
            for s in self.split_names:
                files.append(bench_dir.pope_file(s))
                raw += load_pope_jsonl(files[-1], bench_dir.images_dir, s)[:limit]
            dataset = {"id": _SYNTHETIC, "path": str(bench_dir.root)}
        dataset.update(sha256=dataset_fingerprint(files if files else raw), n=len(raw))
        return [Sample(f"{s.split}/{s.question_id}", s.split, s.question, s) for s in raw], dataset

    def prompting(self, split: str) -> Prompting:
        p = self.preset
        return Prompting(p.template, p.system_prompt, dict(p.generation), p.seed if p.seed is not None else 0)

    # -- scoring ------------------------------------------------------------------------------
    def record(self, sample: Sample, text: str) -> dict[str, Any]:
        label = sample.data.label
        return {"id": sample.id, "split": sample.split, "question_id": sample.data.question_id,
                "question": sample.question, "label": label, "answer": text, "pred": self.parser.read(text, label),
                "unparseable": self.parser.unreadable(text)}

    def values(self, split: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
        return pope.per_sample_array([r["pred"] for r in records], [r["label"] for r in records])

    def stats(self, split: str) -> dict[str, Any]:
        return pope.STATS

    def aggregate(self, split: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        confusion = pope.Confusion.from_pairs((r["pred"], r["label"]) for r in records)
        row = {**pope.metrics(confusion).as_dict(), **asdict(confusion),
               "n_unparseable": sum(bool(r["unparseable"]) for r in records), "parser": self.parser.name}
        if self.parser.name != "llava":  # the common yardstick across presets
            row["n_unparseable_llava"] = sum(pope.is_unparseable(r["answer"]) for r in records)
        return row

    def overall(self, rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        if len(rows) < 2:
            return {}
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        return {"average": {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}}

    def table(self, summary: dict[str, Any]) -> list[str]:
        pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
        lines = ["| method | split | accuracy [95% CI] | precision | recall | F1 [95% CI] | yes-ratio | unparseable "
                 "| p (acc) | p (F1) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m, res in summary["methods"].items():
            for sp, row in res["splits"].items():
                lines.append(f"| {m} | {sp} | {ci_cell(row, 'accuracy')} | {pct(row['precision'])} | "
                             f"{pct(row['recall'])} | {ci_cell(row, 'f1')} | {pct(row['yes_ratio'])} | "
                             f"{row['n_unparseable']} | {p_cell(row, 'accuracy')} | {p_cell(row, 'f1')} |")
            if "average" in res:
                a = res["average"]
                lines.append(f"| {m} | average | {pct(a['accuracy'])} | {pct(a['precision'])} | {pct(a['recall'])} | "
                             f"{pct(a['f1'])} | {pct(a['yes_ratio'])} | | | |")
        lines.append("")
        lines.append(f"yes-ratio: share of *predicted* yes. unparseable: answers in which the `{self.parser.name}` "
                     "parser found neither a yes nor a no word (scored by its default).")
        return lines

    # -- lvlm-fix score -------------------------------------------------------------------------
    def read_outputs(self, path: Path, id_key: str | None, text_key: str | None,
                     label_key: str | None) -> tuple[list[Sample], dict[str, str], dict[str, Any]]:
        rows = read_rows(path)
        text_key = pick_key(path, rows, text_key, self.text_keys, "answer text", "--text-key")
        label_key = label_key or ("label" if "label" in rows[0] else None)

        def split_of(row: dict[str, Any]) -> str | None:
            value = row.get("category", row.get("split"))
            return value if value in pope.SPLITS else None

        samples, texts = [], {}
        if label_key is not None:  # labels in the answer file (e.g. PAINT's {"query", "label": 1/0, "ans"})
            pick_key(path, rows, label_key, (), "label", "--label-key")
            # an --id-key the rows lack is refused, not replaced by the row number
            qid_key = (pick_key(path, rows, id_key, (), "question id", "--id-key") if id_key
                       else next((k for k in self.id_keys if k in rows[0]), None))
            fallback = self._given_split if self._given_split not in (None, "all") else "all"
            for i, row in enumerate(rows):
                split = split_of(row) or fallback
                qid = row_id(path, i, row[qid_key], qid_key) if qid_key else str(i + 1)
                question = str(row.get("question_text", row.get("query", row.get("question", ""))))
                data = PopeSample(qid, str(row.get("image", "")), question, pope.normalize_label(row[label_key]),
                                  split, image_loader=_no_image)
                samples.append(Sample(f"{split}/{qid}", split, question, data))
            dataset = {"labels": f"inline ({label_key!r} of the scored file)"}
        else:  # pair with the question files by question id
            qid_key = pick_key(path, rows, id_key, self.id_keys, "question id", "--id-key")
            questions, dataset = self.load(None, 0)
            by_id = {s.id: s for s in questions}
            single = self.split_names[0] if len(self.split_names) == 1 else None
            for i, row in enumerate(rows):
                split = split_of(row) or single
                if split is None:
                    raise DataError(f"{path}: row {i + 1} names no POPE split ('category'); score one split at a time "
                                    "with --split random|popular|adversarial")
                sid = f"{split}/{row_id(path, i, row[qid_key], qid_key)}"
                if sid not in by_id:
                    raise DataError(f"{path}: row {i + 1} answers question {row[qid_key]!r} of split {split}, which is "
                                    "not in the question file; pass the matching --pope-questions and --split")
                samples.append(by_id[sid])
        for i, (sample, row) in enumerate(zip(samples, rows)):
            if sample.id in texts:
                raise DataError(f"{path}: row {i + 1} answers {sample.id} a second time; keep one answer per question")
            if not isinstance(row[text_key], str):
                raise DataError(f"{path}: row {i + 1} has {text_key}={row[text_key]!r}; answers must be strings")
            texts[sample.id] = row[text_key]
        dataset["sha256_questions"] = dataset_fingerprint([s.data for s in samples])
        return samples, texts, dataset

