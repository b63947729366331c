"""Batched, resumable evaluation: baseline and methods on identical samples, in one run.

Layout of a run folder (``--out``)::

    run.json                  what the run is (model, bench, splits, data hash, generation); fixed
    <method>/config.json      the method's resolved config; fixed
    <method>/samples.jsonl    append-only, one record per sample, flushed and fsynced per batch
    summary.json              metrics with bootstrap CIs, paired tests vs the baseline, provenance
    results.md                the comparison table

Resuming: the same command again reads each ``samples.jsonl``, drops a torn last line, skips the
samples already there, and continues; a run folder made with other settings is refused rather
than mixed. Under ``accelerate launch`` every process takes every k-th sample and writes its own
``samples.rank<r>.jsonl``; the main process merges the shards into ``samples.jsonl``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from . import chair as chair_mod
from . import pope as pope_mod
from .data import (
    DataError,
    dataset_fingerprint,
    load_coco_captions_for_chair,
    load_pope_hf,
    load_pope_jsonl,
)
from .stats import bootstrap_ci, paired_bootstrap

BENCHES = {
    "pope": "POPE object probing (yes/no): random / popular / adversarial splits",
    "chair": "CHAIR caption hallucination on COCO-format instances + captions",
}
POPE_MAX_NEW_TOKENS = 32  # answers are a word or a sentence; the parser reads the first sentence
BASELINE = "none"


@dataclass(frozen=True)
class DataSpec:
    """Where samples come from; all None -> the synthetic benchmark of the embedded testbed.

    Attributes:
        pope_questions: a POPE question file (one split) or a folder of ``*_<split>.json[l]``.
        image_dir: images referenced by the question / caption files.
        hf_dataset: a ``datasets`` id or local copy with the lmms-lab/POPE schema.
        coco_annotations: folder with ``instances_val2014.json`` and ``captions_val2014.json``.
    """

    pope_questions: str | None = None
    image_dir: str | None = None
    hf_dataset: str | None = None
    coco_annotations: str | None = None

    @property
    def synthetic(self) -> bool:
        return not (self.pope_questions or self.hf_dataset or self.coco_annotations)


# -- samples --------------------------------------------------------------------------------------
def _splits(split: str) -> list[str]:
    if split == "all":
        return list(pope_mod.SPLITS)
    if split not in pope_mod.SPLITS:
        from ..errors import UnknownNameError

        raise UnknownNameError("POPE split", split, [*pope_mod.SPLITS, "all"])
    return [split]


def _pope_file(questions: Path, split: str) -> Path:
    if questions.is_file():
        return questions
    if not questions.is_dir():
        raise DataError(f"POPE question file or folder not found: {questions}; pass e.g. coco_pope_{split}.json")
    found = sorted(p for p in questions.iterdir() if p.stem.endswith(f"_{split}") and p.suffix in (".json", ".jsonl"))
    if not found:
        raise DataError(f"no *_{split}.json file in {questions}; name the question files like coco_pope_{split}.json")
    return found[0]


def load_samples(bench: str, split: str, data: DataSpec, limit: int | None, seed: int) -> tuple[list[Any], dict[str, Any], Any]:
    """The samples to evaluate, a description of the dataset, and (CHAIR) the evaluator."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} selects no sample; pass a positive number or leave it out")
    if bench == "pope":
        samples: list[Any] = []
        files: list[Path] = []
        if data.synthetic:
            from ..testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            bench_dir = SyntheticBenchmark(ensure_benchmark())
            for s in _splits(split):
                files.append(bench_dir.pope_file(s))
                samples += load_pope_jsonl(files[-1], bench_dir.images_dir, s)[:limit]
            dataset = {"id": "lvlm-fix synthetic POPE", "path": str(bench_dir.root)}
        elif data.hf_dataset:
            for s in _splits(split):
                samples += load_pope_hf(data.hf_dataset, s)[:limit]
            dataset = {"id": data.hf_dataset}
        else:
            if not data.image_dir:
                raise ConfigError("--image-dir is required with --pope-questions; pass the COCO val2014 image folder")
            for s in _splits(split):
                files.append(_pope_file(Path(data.pope_questions), s))
                samples += load_pope_jsonl(files[-1], data.image_dir, s)[:limit]
            dataset = {"id": str(data.pope_questions), "image_dir": str(data.image_dir)}
        dataset["sha256"] = dataset_fingerprint(files if files else samples)
        dataset["n"] = len(samples)
        return samples, dataset, None
    if bench == "chair":
        if split not in ("all", "val", "default"):
            raise ConfigError(f"CHAIR has no split {split!r}; leave --split out")
        n = limit or chair_mod.DEFAULT_NUM_IMAGES
        if data.synthetic:
            from ..testbed.benchmark import SyntheticBenchmark, ensure_benchmark

            b = SyntheticBenchmark(ensure_benchmark())
            samples, evaluator = load_coco_captions_for_chair(
                None, b.images_dir, n=n, seed=seed, instances_paths=b.instances_file, captions_paths=b.captions_file)
            files = [b.instances_file, b.captions_file]
            dataset = {"id": "lvlm-fix synthetic COCO-format captions", "path": str(b.root)}
        else:
            if not data.coco_annotations or not data.image_dir:
                raise ConfigError("CHAIR needs --coco-annotations DIR and --image-dir DIR (COCO 2014 val)")
            samples, evaluator = load_coco_captions_for_chair(data.coco_annotations, data.image_dir, n=n, seed=seed)
            files = [Path(data.coco_annotations) / "instances_val2014.json"]
            dataset = {"id": str(data.coco_annotations), "image_dir": str(data.image_dir)}
        dataset.update(sha256=dataset_fingerprint(files), n=len(samples),
                       image_ids=[s.image_id for s in samples], sampling=f"random.Random({seed}).sample(ids, {n})")
        return samples, dataset, evaluator
    from ..errors import UnknownNameError

    raise UnknownNameError("bench", bench, BENCHES)


def sample_id(sample: Any) -> str:
    return f"{sample.split}/{sample.question_id}" if hasattr(sample, "question_id") else str(sample.image_id)


# -- the append-only store ----------------------------------------------------------------------------
def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by id; a torn last line (a run killed mid-write) is dropped from the file."""
    if not path.exists():
        return {}
    records: dict[str, dict[str, Any]] = {}
    lines = path.read_bytes().split(b"\n")
    good = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # only the last line can be torn: everything before was fsynced whole
        records.setdefault(rec["id"], rec)
        good.append(line)
    if len(good) != len([x for x in lines if x.strip()]):
        path.write_bytes(b"".join(x + b"\n" for x in good))
    return records


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _merge_shards(mdir: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Fold every process's shard into ``samples.jsonl`` (sample order), then drop the shards."""
    shards = sorted(mdir.glob("samples.rank*.jsonl"))
    merged: dict[str, dict[str, Any]] = {}
    for path in [mdir / "samples.jsonl", *shards]:
        for k, v in read_records(path).items():
            merged.setdefault(k, v)
    tmp = mdir / "samples.jsonl.tmp"
    tmp.unlink(missing_ok=True)
    append_records(tmp, [merged[i] for i in ids if i in merged])
    os.replace(tmp, mdir / "samples.jsonl")  # the shards stay until the merged file is complete
    for path in shards:
        path.unlink()
    return merged


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _fixed_json(path: Path, data: dict[str, Any], what: str) -> None:
    """Write ``data`` once; later runs in the same folder must match it."""
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(data, default=str)):
            diff = sorted(k for k in set(old) | set(data) if old.get(k) != json.loads(json.dumps(data, default=str)).get(k))
            raise InputError(f"{path.parent} holds results of a different {what} (differs in {', '.join(diff)}); "
                             "use a new --out folder or the original settings")
        return
    _write_json(path, data)


# -- evaluation ----------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("lvlm-fix", "torch", "transformers", "accelerate", "datasets", "numpy", "inflect"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _generate_batch(lvlm: Any, images: list[Any], prompts: list[str], method: str, gen: dict[str, Any],
                    params: dict[str, Any]) -> list[str]:
    from ..api import generate

    return generate(lvlm, images, prompts, None if method == BASELINE else method, **gen, **params).texts


def evaluate(
    lvlm: Any,
    bench: str = "pope",
    split: str = "adversarial",
    methods: Sequence[str] = (BASELINE,),
    *,
    data: DataSpec | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    max_new_tokens: int | None = None,
    prompt_template: str | None = None,
    seed: int = 0,
    method_params: dict[str, dict[str, Any]] | None = None,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the baseline and methods on the same samples; return (and write) the summary.

    Args:
        lvlm: the handle from :func:`lvlm_fix.load`.
        bench: ``"pope"`` or ``"chair"``.
        split: a POPE split or ``"all"`` (ignored for CHAIR).
        methods: method specs, e.g. ``["none", "vhr", "vhr+var"]``.
        data: where the samples come from (default: the synthetic benchmark).
        limit: POPE: questions per split; CHAIR: number of images (default 500).
        batch_size: rows per ``generate()`` call.
        out_dir: run folder (created); None keeps results in memory only.
        max_new_tokens: default 32 for POPE, 512 for CHAIR.
        prompt_template: POPE question template with ``{question}`` (default: the raw question).
        seed: CHAIR image sampling seed and generation seed.
        method_params: per method spec, its parameters.
        n_boot: bootstrap replicates for CIs and paired tests.
        progress: show a progress bar with ETA.

    Returns:
        The summary dict (also ``summary.json`` in ``out_dir``).
    """
    from accelerate import PartialState
    from tqdm import tqdm

    from ..interventions import build_methods

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    method_params = method_params or {}
    methods = list(dict.fromkeys(methods))
    configs = {m: [x.describe() for x in build_methods(None if m == BASELINE else m, **method_params.get(m, {}))]
               for m in methods}  # validates names and parameters before any generation
    data = data or DataSpec()
    samples, dataset, evaluator = load_samples(bench, split, data, limit, seed)
    if bench == "pope":
        template = prompt_template or pope_mod.DEFAULT_QUESTION_TEMPLATE
        prompt_of: Callable[[Any], str] = lambda s: pope_mod.build_prompt(s.question, template)  # noqa: E731
        tokens = max_new_tokens or POPE_MAX_NEW_TOKENS
    else:
        template = chair_mod.DEFAULT_PROMPT
        prompt_of = lambda s: chair_mod.DEFAULT_PROMPT  # noqa: E731
        tokens = max_new_tokens or chair_mod.DEFAULT_MAX_NEW_TOKENS
    gen = {"max_new_tokens": tokens, "do_sample": False, "num_beams": 1}
    run = {
        "bench": bench, "splits": _splits(split) if bench == "pope" else ["val"], "limit": limit,
        "model": lvlm.name, "revision": lvlm.revision, "model_type": lvlm.adapter.model_type,
        "dtype": str(lvlm.model.dtype), "dataset": dataset, "generation": gen, "prompt_template": template,
        "prompt_example": lvlm.build_prompt(prompt_of(samples[0])), "seed": seed,
    }
    # cpu=True lets torchrun / accelerate launch shard over CPU processes too (gloo); without it
    # accelerate sees one process per CPU worker, and every worker would write every sample.
    state = PartialState(cpu=lvlm.model.device.type == "cpu")
    rank, world = state.process_index, state.num_processes
    root = Path(out_dir) if out_dir is not None else None
    if root is not None and state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _fixed_json(root / "run.json", run, "run")
    state.wait_for_everyone()

    ids = [sample_id(s) for s in samples]
    answers: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        mdir = root / method if root is not None else None
        store = None
        done: dict[str, dict[str, Any]] = {}
        if mdir is not None:
            if state.is_main_process:
                mdir.mkdir(exist_ok=True)
                _fixed_json(mdir / "config.json", {"method": method, "config": configs[method]}, f"{method} config")
            state.wait_for_everyone()
            store = mdir / ("samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
            for shard in [mdir / "samples.jsonl", *sorted(mdir.glob("samples.rank*.jsonl"))]:
                for k, v in read_records(shard).items():
                    done.setdefault(k, v)
        mine = [s for i, s in enumerate(samples) if i % world == rank and ids[i] not in done]
        bar = tqdm(total=len(mine), desc=f"{bench} {method}", unit="sample", disable=not progress or not mine)
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            texts = _generate_batch(lvlm, [s.load_image() for s in batch], [prompt_of(s) for s in batch], method,
                                    {**gen, "seed": seed}, method_params.get(method, {}))
            recs = [_record(s, t, bench) for s, t in zip(batch, texts)]
            for r in recs:
                done[r["id"]] = r
            if store is not None:
                append_records(store, recs)
            bar.update(len(batch))
        bar.close()
        state.wait_for_everyone()
        if mdir is not None and world > 1 and state.is_main_process:
            done = _merge_shards(mdir, ids)
        answers[method] = done

    if not state.is_main_process:
        return {}
    summary = _summarise(bench, samples, ids, answers, evaluator, methods, n_boot, seed)
    summary["provenance"] = {**run, "methods": configs, "versions": _versions(), "platform": platform.platform(),
                             "n_boot": n_boot, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if root is not None:
        _write_json(root / "summary.json", summary)
        (root / "results.md").write_text(comparison_table(summary))
    return summary


def _record(sample: Any, text: str, bench: str) -> dict[str, Any]:
    if bench == "pope":
        return {"id": sample_id(sample), "split": sample.split, "question": sample.question, "label": sample.label,
                "answer": text, "pred": pope_mod.parse_answer(text), "unparseable": pope_mod.is_unparseable(text)}
    return {"id": sample_id(sample), "image_id": sample.image_id, "caption": text}


def _ci(values: np.ndarray, fn: Callable, n_boot: int, seed: int) -> dict[str, float]:
    ci = bootstrap_ci(values, fn, n_boot=n_boot, seed=seed, batched=True)
    return {"value": ci.estimate, "low": ci.low, "high": ci.high}


def _pope_arrays(recs: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[r["pred"] == "yes", r["label"] == "yes"] for r in recs], dtype=float)  # [n, 2]


_POPE_FNS = {
    "accuracy": lambda a: (a[..., 0] == a[..., 1]).mean(-1),
    "f1": lambda a: np.divide(2 * (a[..., 0] * a[..., 1]).sum(-1), (a[..., 0] + a[..., 1]).sum(-1),
                              out=np.zeros(a.shape[:-2]), where=(a[..., 0] + a[..., 1]).sum(-1) > 0),
    "yes_ratio": lambda a: a[..., 0].mean(-1),
}


def _summarise(bench: str, samples: list[Any], ids: list[str], answers: dict[str, dict[str, dict[str, Any]]],
               evaluator: Any, methods: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    baseline = BASELINE if BASELINE in methods else methods[0]
    out: dict[str, Any] = {"bench": bench, "baseline": baseline, "methods": {}}
    missing = {m: [i for i in ids if i not in answers[m]] for m in methods}
    for m, miss in missing.items():
        if miss:
            raise InputError(f"method {m!r} lacks {len(miss)} samples (first {miss[0]}); rerun the same command to resume")
    if bench == "pope":
        splits = list(dict.fromkeys(s.split for s in samples))
        arrays = {m: {sp: _pope_arrays([answers[m][i] for i, s in zip(ids, samples) if s.split == sp]) for sp in splits}
                  for m in methods}
        for m in methods:
            per_split = {}
            for sp in splits:
                recs = [answers[m][i] for i, s in zip(ids, samples) if s.split == sp]
                rep = pope_mod.score([r["answer"] for r in recs], [r["label"] for r in recs])
                row = rep.as_dict()
                row["ci"] = {k: _ci(arrays[m][sp], fn, n_boot, seed) for k, fn in _POPE_FNS.items()}
                if m != baseline:
                    row["vs_baseline"] = {k: paired_bootstrap(arrays[m][sp], arrays[baseline][sp], fn, n_boot=n_boot,
                                                              seed=seed, batched=True).as_dict()
                                          for k, fn in _POPE_FNS.items() if k != "yes_ratio"}
                per_split[sp] = row
            avg = {k: float(np.mean([per_split[sp][k] for sp in splits]))
                   for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
            out["methods"][m] = {"splits": per_split, "average": avg}
        return out
    for m in methods:
        recs = [answers[m][i] for i in ids]
        res = evaluator.evaluate(recs)
        counts = res.counts()
        row = res.as_dict(include_details=False)
        row["ci"] = {k: _ci(counts, fn, n_boot, seed) for k, fn in chair_mod.STATS.items()}
        if m != baseline:
            base_counts = evaluator.evaluate([answers[baseline][i] for i in ids]).counts()
            row["vs_baseline"] = {k: paired_bootstrap(counts, base_counts, fn, n_boot=n_boot, seed=seed,
                                                      batched=True).as_dict() for k, fn in chair_mod.STATS.items()}
        out["methods"][m] = row
    return out


def comparison_table(summary: dict[str, Any]) -> str:
    """The markdown table: each method's metrics with 95% CIs and the paired p-value vs baseline."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = []
    if summary["bench"] == "pope":
        lines += ["| method | split | accuracy [95% CI] | F1 [95% CI] | yes-ratio | unparseable | p (acc) | p (F1) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, res in summary["methods"].items():
            for sp, row in res["splits"].items():
                ci = row["ci"]
                vs = row.get("vs_baseline", {})
                p = lambda k: f"{vs[k]['p_value']:.3g}" if k in vs else "—"  # noqa: E731
                lines.append(f"| {m} | {sp} | {pct(row['accuracy'])} [{pct(ci['accuracy']['low'])}, {pct(ci['accuracy']['high'])}] "
                             f"| {pct(row['f1'])} [{pct(ci['f1']['low'])}, {pct(ci['f1']['high'])}] | {pct(row['yes_ratio'])} "
                             f"| {row['n_unparseable']} | {p('accuracy')} | {p('f1')} |")
            if len(res["splits"]) > 1:
                a = res["average"]
                lines.append(f"| {m} | average | {pct(a['accuracy'])} | {pct(a['f1'])} | {pct(a['yes_ratio'])} | | | |")
    else:
        lines += ["| method | CHAIR_S [95% CI] | CHAIR_I [95% CI] | recall [95% CI] | length | p (CHAIR_S) | p (CHAIR_I) |",
                  "|---|---|---|---|---|---|---|"]
        for m, row in summary["methods"].items():
            ci, vs = row["ci"], row.get("vs_baseline", {})
            cell = lambda k: f"{pct(row[k])} [{pct(ci[k]['low'])}, {pct(ci[k]['high'])}]"  # noqa: E731
            p = lambda k: f"{vs[k]['p_value']:.3g}" if k in vs else "—"  # noqa: E731
            lines.append(f"| {m} | {cell('chair_s')} | {cell('chair_i')} | {cell('recall')} | {row['mean_length']:.1f} "
                         f"| {p('chair_s')} | {p('chair_i')} |")
    return "\n".join(lines) + "\n\nValues in %; p: two-sided paired bootstrap vs the baseline on the same samples.\n"

