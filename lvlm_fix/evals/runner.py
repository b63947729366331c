"""Batched, resumable evaluation over the bench registry: baseline and methods on identical samples.

Layout of a run folder (``--out``)::

    run.json                  what the run is (bench and its settings, model, data hash, prompts); fixed
    <method>/config.json      the method's resolved config (or, for ``score``, the scored file); fixed
    <method>/samples.jsonl    append-only, one scored record per sample, flushed and fsynced per batch
    <method>/cache/<m>.jsonl  what a method that asks for a run cache keeps between batches and resumes (MVP's captions)
    summary.json              metrics with bootstrap CIs, paired tests vs the baseline, n per split, provenance
    results.md                what was run (model, dataset, n per split, settings, date) and the comparison table
    .lock                     while a run writes: its pid and host (a second run is refused)

Resuming: the same command again reads each ``samples.jsonl`` (unreadable lines are set aside, every
valid record kept), skips the samples already there, and continues; a folder made with other
settings is refused rather than mixed. The summary covers every method whose records in the folder
are complete, not only the ones of the last command. Under ``accelerate launch`` every process
takes every k-th sample and writes its own ``samples.rank<r>.jsonl``; the main process merges them.

``lvlm-fix score`` (:func:`score_outputs`) runs the same scoring and summary on answers that were
generated elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from ..files import atomic_write
from . import store
from .bench import BENCHES, Bench, Prompting, Sample, make_bench
from .data import dataset_fingerprint
from .pope import check_template
from .stats import bootstrap_ci, paired_bootstrap

BASELINE = "none"


def list_benches() -> dict[str, str]:
    """Registered benches (built-ins and plugins): name -> one-line description."""
    return {name: BENCHES.get(name).description for name in BENCHES.names()}


# -- the method seam: the only place the runner touches the method kit ------------------------------
class MethodSeam:
    """Validates and describes the method settings, and generates with one of them.

    A setting is a method spec (``"none"``, ``"vhr"``, ``"vhr:alpha=1.5+var"``) plus parameters
    from flags (``params``); it is named by its canonical spec, which is also its results folder
    (``:`` written as ``,``) and its table row. Two settings that resolve to the same methods and
    parameters are refused. ``build_methods`` and ``api.generate`` are the whole interface.
    """

    def __init__(self, methods: Sequence[str], params: dict[str, dict[str, Any]]) -> None:
        from ..interventions import build_methods, format_spec, parse_spec

        self.names = [format_spec(parse_spec(m)) for m in methods]
        self.params = {name: params.get(m, {}) for name, m in zip(self.names, methods)}
        built = {name: build_methods(name, **self.params[name]) for name in self.names}
        self.configs = {name: [x.describe() for x in ms] for name, ms in built.items()}
        self.classes = {name: [type(x) for x in ms] for name, ms in built.items()}
        seen: dict[str, str] = {}
        for name in self.names:
            key = json.dumps(self.configs[name], sort_keys=True, default=str)
            if key in seen and seen[key] != name:
                raise ConfigError(f"settings {seen[key]!r} and {name!r} are the same methods with the same parameters; "
                                  "list each setting once")
            seen[key] = name

    def resolved(self, lvlm: Any) -> dict[str, list[dict[str, Any]]]:
        """Each setting's methods described on ``lvlm``: config plus the layers they use there."""
        from ..interventions import build_methods

        return {name: [x.describe(lvlm) for x in build_methods(name, **self.params[name])] for name in self.names}

    def generate(self, lvlm: Any, images: list[Any], prompts: list[str], method: str, generation: dict[str, Any],
                 seed: int, system_prompt: str | None) -> Any:
        """The :class:`~lvlm_fix.interventions.Generation` of one batch (texts, generated tokens)."""
        from ..api import generate

        known = {k: generation[k] for k in ("max_new_tokens", "do_sample", "num_beams") if k in generation}
        extra = {k: v for k, v in generation.items() if k not in known}
        return generate(lvlm, images, prompts, None if method == BASELINE else method, seed=seed,
                        system_prompt=system_prompt, generate_kwargs=extra or None, **known, **self.params[method])


    @contextlib.contextmanager
    def run_caches(self, method: str, folder: Path | None, shard: str = "") -> Iterator[None]:
        """While the runner generates with setting ``method``, each of its methods that declares ``run_cache``
        (a ``ContextVar`` class attribute) sees a :class:`~lvlm_fix.evals.store.RunCache`: in memory across
        the setting's batches and, with a results folder, in ``<folder>/cache/<name><shard>.jsonl``, which a
        resumed run reads back. The method builds its own keys (see its docstring)."""
        tokens = []
        for cls in self.classes[method]:
            var = cls.run_cache
            if var is not None:
                path = None if folder is None else folder / "cache" / f"{cls.name}{shard}.jsonl"
                tokens.append((var, var.set(store.RunCache(path))))
        try:
            yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    def warm_up(self, lvlm: Any, image: Any, prompt: str, system_prompt: str | None) -> None:
        """A two-token vanilla generation, untimed, so the first setting's cost has no first-call overheads."""
        from ..api import generate

        generate(lvlm, [image], [prompt], None, max_new_tokens=2, system_prompt=system_prompt)


def setting_folder(root: Path, name: str) -> Path:
    """The results folder of setting ``name``: its spec with ``:`` as ``,``, no quotes, and a path in a value
    (``vti:directions_file=/a/b.pt``) with its separators as ``_``, so that the folder is one level under
    ``root``; a name longer than a file name may be keeps its start and a digest of the whole."""
    folder = name.replace(":", ",").replace('"', "").replace("/", "_").replace("\\", "_")
    if len(folder.encode()) > 200:
        folder = folder[:150] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return root / folder


# -- provenance helpers -----------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("lvlm-fix", "torch", "transformers", "accelerate", "datasets", "numpy", "inflect", "nltk"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _checkout_commit() -> str | None:
    """The git commit of the lvlm-fix checkout this runs from (``+dirty`` with local changes), else None."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _command_line() -> str:
    """How this process was started (the Python API's caller, a script, or ``lvlm-fix``)."""
    import shlex
    import sys

    return shlex.join(sys.argv)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _lock(root: Path | None) -> Iterator[None]:
    if root is None or not _main_process():
        yield
    else:
        with store.run_lock(root):
            yield


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text up to the first stop string (lmms-eval's ``until``), stripped."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip() if stops else text


# -- evaluation -----------------------------------------------------------------------------------
@dataclass
class EvalJob:
    """A validated evaluation: the bench, methods, samples and prompts; :meth:`run` generates.

    Built by :func:`prepare_eval`, which checks everything a user can get wrong (names, flags,
    templates, data files) before any model is loaded or anything is written.
    """

    bench: Bench
    methods: list[str]
    seam: MethodSeam
    samples: list[Sample]
    dataset: dict[str, Any]
    prompting: dict[str, Prompting]
    out_dir: Path | None
    limit: int | None
    batch_size: int
    n_boot: int
    seed: int
    progress: bool
    command: str | None = None  # the CLI command line, recorded in the provenance

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the run folder for this process (see :func:`lvlm_fix.evals.store.run_lock`)."""
        return _lock(self.out_dir)

    def run(self, lvlm: Any) -> dict[str, Any]:
        """Generate what is missing, store it, and write (and return) the summary."""
        from accelerate import PartialState
        from tqdm import tqdm

        from .cost import CostMeter

        from ..model import check_handle

        check_handle(lvlm)
        started, started_clock = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
        b = self.bench
        first = {sp: next(s for s in self.samples if s.split == sp) for sp in self.prompting}
        run = {
            "bench": b.name, "settings": b.settings(), "limit": self.limit,
            "model": lvlm.name, "revision": lvlm.revision, "model_type": lvlm.adapter.model_type,
            "dtype": str(lvlm.model.dtype), "dataset": self.dataset,
            "splits": {sp: {"template": p.template, "system_prompt": p.system_prompt, "generation": dict(p.generation),
                            "seed": p.seed, "prompt_example": lvlm.build_prompt(
                                p.template.format(question=first[sp].question), system_prompt=p.system_prompt)}
                       for sp, p in self.prompting.items()},
        }
        # cpu=True lets torchrun / accelerate launch shard over CPU processes too (gloo); without it
        # accelerate sees one process per CPU worker, and every worker would write every sample.
        state = PartialState(cpu=lvlm.model.device.type == "cpu")
        rank, world = state.process_index, state.num_processes
        root = self.out_dir
        legacy_ok = True  # records without a settings digest (an older lvlm-fix): kept only under checked files
        if root is not None and state.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            legacy_ok = store.fixed_json(root / "run.json", run, "run")
        state.wait_for_everyone()

        ids = [s.id for s in self.samples]
        answers: dict[str, dict[str, dict[str, Any]]] = {}
        costs: dict[str, dict[str, Any]] = {}
        self._warm_up(lvlm, root)
        # One bar over every sample of every setting, for the ETA of the whole run (the per-setting bars
        # below it say where it is); its total drops by each setting's stored records as they are found.
        share = sum(1 for i in range(len(self.samples)) if i % world == rank)
        overall = tqdm(total=share * len(self.methods), desc=f"{b.name} all {len(self.methods)} settings",
                       unit="sample", position=0, disable=not self.progress or len(self.methods) < 2)
        with overall:  # its line ended also when a setting fails
            for method in self.methods:
                mdir = setting_folder(root, method) if root is not None else None
                meter = CostMeter(lvlm.model)
                done: dict[str, dict[str, Any]] = {}
                store_path = None
                config = {"method": method, "config": self.seam.configs[method]}
                digest = store.settings_digest(run, config)  # every record names the settings that made it
                if mdir is not None:
                    had_config = True
                    if state.is_main_process:
                        mdir.mkdir(exist_ok=True)
                        had_config = store.fixed_json(mdir / "config.json", config, f"{method} config")
                    state.wait_for_everyone()
                    store_path = mdir / ("samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
                    for shard in [mdir / "samples.jsonl", *sorted(mdir.glob("samples.rank*.jsonl"))]:
                        records = store.read_records(shard, b.valid)
                        store.check_settings(shard, records, digest, legacy_ok and had_config)
                        for k, v in records.items():
                            done.setdefault(k, v)
                mine = [s for i, s in enumerate(self.samples) if i % world == rank and s.id not in done]
                overall.total -= share - len(mine)
                overall.refresh()
                bar = tqdm(total=len(mine), desc=f"{b.name} {method}", unit="sample",
                           disable=not self.progress or not mine, position=1 if not overall.disable else None,
                           leave=overall.disable)
                caches = self.seam.run_caches(method, mdir, "" if world == 1 else f".rank{rank}")
                with bar, meter.setting(), caches:  # the bar closed (its line ended) also when a batch fails
                    for split, p in self.prompting.items():
                        todo = [s for s in mine if s.split == split]
                        gen = dict(p.generation)
                        stops = gen.pop("stop", [])
                        for start in range(0, len(todo), self.batch_size):
                            batch = todo[start : start + self.batch_size]
                            images = [s.load_image() for s in batch]
                            with meter.batch(len(batch)) as counted:
                                out = self.seam.generate(lvlm, images, [p.template.format(question=s.question) for s in batch],
                                                         method, gen, p.seed, p.system_prompt)
                                counted["generated_tokens"] = sum(out.tokens)
                            recs = [{**b.record(s, _cut(t, stops)), store.SETTINGS_KEY: digest}
                                    for s, t in zip(batch, out.texts)]
                            done.update((r["id"], r) for r in recs)
                            if store_path is not None:
                                store.append_records(store_path, recs)
                            bar.update(len(batch))
                            overall.update(len(batch))
                costs[method] = meter.save(mdir if state.is_main_process and world == 1 else None)
                state.wait_for_everyone()
                if mdir is not None and world > 1 and state.is_main_process:
                    done = store.merge_shards(mdir, ids, b.valid)
                answers[method] = done

        if not state.is_main_process:
            return {}
        provenance = {**run, "methods": self.seam.resolved(lvlm), "versions": _versions(),
                      "lvlm_fix_commit": _checkout_commit(), "platform": platform.platform(),
                      "device": str(lvlm.model.device), "batch_size": self.batch_size, "processes": world,
                      "command": self.command or _command_line(), "n_boot": self.n_boot, "started": started,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "elapsed_seconds": round(time.perf_counter() - started_clock, 1)}
        return _finish(b, self.samples, answers, self.methods, root, self.n_boot, self.seed, provenance, costs,
                       run=run, legacy_ok=legacy_ok)

    def _warm_up(self, lvlm: Any, root: Path | None) -> None:
        """One short untimed generation, so that the first setting's cost carries no first-call overheads."""
        pending = any(not (setting_folder(root, m) / "samples.jsonl").exists() for m in self.methods) if root else True
        if pending and self.samples:
            s, p = self.samples[0], self.prompting[self.samples[0].split]
            self.seam.warm_up(lvlm, s.load_image(), p.template.format(question=s.question), p.system_prompt)


def prepare_eval(
    bench: str = "pope",
    split: str | None = None,
    methods: Sequence[str] = (BASELINE,),
    *,
    limit: int | None = None,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    max_new_tokens: int | None = None,
    generation: dict[str, Any] | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    seed: int | None = None,
    method_params: dict[str, dict[str, Any]] | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    command: str | None = None,
    **options: Any,
) -> EvalJob:
    """Validate an evaluation and load its samples (no model, nothing written); see :func:`evaluate`."""
    if isinstance(methods, str):  # a bare spec, not a list of them
        methods = [methods]
    methods = [m.strip() for m in methods if m and m.strip()]
    if not methods:
        raise ConfigError("--methods names no method; pass e.g. --methods none,vhr")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:  # said once, meant once: a setting listed twice is a slip, not a request to dedupe
        raise ConfigError(f"--methods lists {twice[0]!r} twice; list each setting once")
    unused = sorted(set(method_params or {}) - set(methods))
    if unused:  # parameters of a setting that is not run would be dropped without a word
        raise ConfigError(f"method_params names {unused[0]!r}, which is not one of the methods {methods}")
    if seed is not None and not 0 <= seed < 2**32:  # numpy's and torch's seeds; checked before any sample is made
        raise ConfigError(f"--seed {seed} must be between 0 and 2**32 - 1")
    for value, flag in ((limit, "--limit"), (batch_size, "--batch-size"), (max_new_tokens, "--max-new-tokens"),
                        (n_boot, "--n-boot")):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1" + ("; leave it out for all samples"
                                                                        if flag == "--limit" else ""))
    if prompt_template is not None:
        check_template(prompt_template)
    b = make_bench(bench, split, **options)
    seam = MethodSeam(methods, method_params or {})  # validates names and parameters; names the settings
    methods = seam.names
    samples, dataset = b.load(limit, 0 if seed is None else seed)
    if not samples:
        raise InputError(f"--bench {bench} found no samples; check the data flags")
    prompting = {}
    for sp in dict.fromkeys(s.split for s in samples):
        p = b.prompting(sp)
        gen = {**p.generation, **(generation or {})}
        if max_new_tokens is not None:
            gen["max_new_tokens"] = max_new_tokens
        if not gen.get("do_sample"):  # sampling settings of a preset mean nothing when decoding greedily
            for key in ("temperature", "top_p", "top_k"):
                gen.pop(key, None)
        prompting[sp] = replace(p, template=prompt_template or p.template, generation=gen,
                                system_prompt=p.system_prompt if system_prompt is None else (system_prompt or None),
                                seed=p.seed if seed is None else seed)
    return EvalJob(b, methods, seam, samples, dataset, prompting, Path(out_dir) if out_dir is not None else None,
                   limit, batch_size, n_boot, 0 if seed is None else seed, progress, command)


def evaluate(lvlm: Any, bench: str = "pope", split: str | None = None, methods: Sequence[str] = (BASELINE,),
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate the baseline and methods on the same samples; return (and write) the summary.

    Args:
        lvlm: the handle from :func:`lvlm_fix.load`.
        bench: a registered bench (``lvlm-fix list``): ``"pope"``, ``"chair"``, ``"amber"``, or a plugin's.
        split: a split of the bench, ``"all"``, or None for its default (CHAIR takes none).
        methods: method specs, e.g. ``["none", "vhr", "vhr+var"]``.
        **kwargs: ``limit`` (per split; CHAIR: images, default 500), ``batch_size``, ``out_dir``
            (run folder; None keeps results in memory), ``max_new_tokens``, ``generation`` (other
            ``generate()`` arguments overriding the preset's, e.g. ``{"num_beams": 5}``), ``prompt_template``
            (with ``{question}``), ``system_prompt`` (``""`` for none), ``seed``, ``method_params``
            (per method spec, its parameters), ``n_boot``, ``progress``, and the bench's own
            options (e.g. ``pope_questions=``, ``image_dir=``, ``prompt_preset=``, ``chair_mode=``).

    Returns:
        The summary dict (also ``summary.json`` in ``out_dir``).
    """
    job = prepare_eval(bench, split, methods, **kwargs)
    with job.lock():
        return job.run(lvlm)


# -- scoring existing outputs -------------------------------------------------------------------------
def score_outputs(bench: str, path: str | Path, *, out_dir: str | Path, split: str | None = None,
                  name: str | None = None, id_key: str | None = None, text_key: str | None = None,
                  label_key: str | None = None, n_boot: int = 1000, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Score answers generated elsewhere with the same code as :func:`evaluate`.

    Args:
        bench: ``"chair"`` (rows with ``image_id`` and ``caption``), ``"pope"`` (``question_id`` and
            ``text``/``answer``/``ans``, paired with the question files, or with their own ``label``)
            or ``"amber"`` (``[{"id", "response"}]``).
        path: a JSON list or a JSON-lines file.
        out_dir: run folder; several files scored into one folder (each under its ``name``) are
            compared in one table, the first one named ``none`` (if any) being the baseline.
        name: the folder / table name of this file (default: the file name without extension).
        id_key, text_key, label_key: the keys of the rows, when not the usual ones.
        **options: the bench's options (e.g. ``coco_annotations=``, ``chair_mode=``, ``pope_parser=``).
    """
    path = Path(path)
    name = name or path.stem
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r} must be a plain folder name")
    if n_boot < 1:
        raise ConfigError(f"--n-boot {n_boot} must be at least 1")
    if not 0 <= seed < 2**32:  # the bootstrap's numpy seed: checked before the file is read
        raise ConfigError(f"--seed {seed} must be between 0 and 2**32 - 1")
    b = make_bench(bench, split, **options)
    b.scoring = True
    samples, texts, dataset = b.read_outputs(path, id_key, text_key, label_key)
    root = Path(out_dir)
    run = {"command": "score", "bench": b.name, "settings": b.settings(), "dataset": dataset,
           "samples": dataset_fingerprint(sorted(({"id": s.id, "split": s.split} for s in samples),
                                                 key=lambda r: (r["split"], r["id"])))}
    with _lock(root):
        root.mkdir(parents=True, exist_ok=True)
        legacy_ok = store.fixed_json(root / "run.json", run, "scoring run (other samples or settings)")
        mdir = root / name
        mdir.mkdir(exist_ok=True)
        config = {"method": name, "scored_file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        legacy_ok = store.fixed_json(mdir / "config.json", config, f"scored file for {name!r}") and legacy_ok
        digest = store.settings_digest(run, config)
        done = store.read_records(mdir / "samples.jsonl", b.valid)
        store.check_settings(mdir / "samples.jsonl", done, digest, legacy_ok)
        todo = [s for s in samples if s.id not in done]
        for start in range(0, len(todo), 1000):
            recs = [{**b.record(s, texts[s.id]), store.SETTINGS_KEY: digest} for s in todo[start : start + 1000]]
            done.update((r["id"], r) for r in recs)
            store.append_records(mdir / "samples.jsonl", recs)
        provenance = {**run, "versions": _versions(), "platform": platform.platform(), "n_boot": n_boot,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return _finish(b, samples, {name: done}, [name], root, n_boot, seed, provenance, run=run, legacy_ok=legacy_ok)


# -- summary ------------------------------------------------------------------------------------------
def _ci(values: np.ndarray, fn: Callable, n_boot: int, seed: int) -> dict[str, float]:
    ci = bootstrap_ci(values, fn, n_boot=n_boot, seed=seed, batched=True)
    return {"value": ci.estimate, "low": ci.low, "high": ci.high}


def _method_order(root: Path | None, current: list[str]) -> list[str]:
    """Methods of the summary: those already summarised in the folder (in their order), then this
    command's, then any other method folder."""
    if root is None:
        return current
    order: list[str] = []
    summary = root / "summary.json"
    if summary.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            order += list(json.loads(summary.read_text())["methods"])
    order += current
    order += sorted(_config_name(d) for d in root.iterdir() if (d / "config.json").is_file())
    return [m for m in dict.fromkeys(order) if (setting_folder(root, m) / "config.json").is_file() or m in current]


def _config_name(folder: Path) -> str:
    """The setting name a results folder holds (its config.json's ``method``; the folder name for old runs)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((folder / "config.json").read_text())["method"])
    return folder.name


def _finish(b: Bench, samples: list[Sample], answers: dict[str, dict[str, dict[str, Any]]], current: list[str],
            root: Path | None, n_boot: int, seed: int, provenance: dict[str, Any],
            costs: dict[str, dict[str, Any]] | None = None, *, run: dict[str, Any] | None = None,
            legacy_ok: bool = True) -> dict[str, Any]:
    """Summarise every complete method (this command's and those already in the folder), write
    ``summary.json`` and ``results.md``, return the summary. The records of a folder this command did
    not write are checked against ``run`` and their own config.json (see :func:`store.check_settings`)."""
    from . import cost

    order = _method_order(root, current)
    costs = dict(costs or {})
    for m in order:
        if m not in answers and root is not None:
            path = setting_folder(root, m) / "samples.jsonl"
            answers[m] = store.read_records(path, b.valid)
            config = store.read_fixed(setting_folder(root, m) / "config.json")
            if run is not None and config is not None:
                store.check_settings(path, answers[m], store.settings_digest(run, config), legacy_ok)
        if m not in costs and root is not None:
            costs[m] = cost.load(setting_folder(root, m))
    ids = [s.id for s in samples]
    complete = [m for m in order if all(i in answers[m] for i in ids)]
    incomplete = {m: f"{sum(i in answers[m] for i in ids)}/{len(ids)}" for m in order if m not in complete}
    if not complete:
        raise InputError(f"no method has all {len(ids)} samples; rerun the same command to resume")
    baseline = BASELINE if BASELINE in complete else complete[0]
    splits = {sp: [s.id for s in samples if s.split == sp] for sp in dict.fromkeys(s.split for s in samples)}
    summary: dict[str, Any] = {"bench": b.name, "settings": b.settings(), "baseline": baseline,
                               "n": {sp: len(sp_ids) for sp, sp_ids in splits.items()}, "methods": {}}
    for m in complete:
        rows = {}
        for sp, sp_ids in splits.items():
            recs = [answers[m][i] for i in sp_ids]
            row = b.aggregate(sp, recs)
            stats = b.stats(sp)
            if stats:
                values = b.values(sp, recs)
                row["ci"] = {k: _ci(values, fn, n_boot, seed) for k, fn in stats.items()}
                if m != baseline:
                    base = b.values(sp, [answers[baseline][i] for i in sp_ids])
                    row["vs_baseline"] = {k: paired_bootstrap(values, base, fn, n_boot=n_boot, seed=seed,
                                                              batched=True).as_dict() for k, fn in stats.items()}
            rows[sp] = row
        summary["methods"][m] = {"splits": rows, **b.overall(rows)}
    if incomplete:
        summary["incomplete"] = incomplete
    summary["cost"] = cost.summarise({m: costs[m] for m in complete if costs.get(m)}, baseline)
    summary["provenance"] = provenance
    if root is not None:
        store.write_json(root / "summary.json", summary)
        atomic_write(root / "results.md", comparison_table(b, summary).encode())
    return summary


def comparison_table(b: Bench, summary: dict[str, Any]) -> str:
    """results.md: what was run (:func:`run_facts`: model, dataset, n per split, every setting with its
    parameters, date), what was measured and how, the bench's table, and how to read it."""
    facts = run_facts(summary)
    lines = [f"# {b.name} results", "", *(f"- **{k}:** {v}" for k, v in facts.items() if k != "Methods"),
             "- **Methods** (every parameter, defaults included):",
             *(f"  - `{setting_text(summary, m)}`" for m in summary["methods"]), ""]
    if b.caveat():
        lines += [f"**Note:** {b.caveat()}", ""]
    settings = ", ".join(f"{k}={v}" for k, v in summary["settings"].items() if len(str(v)) <= 80)
    if settings:
        lines += [f"Settings: {settings}.", ""]
    lines += b.table(summary)
    for m, have in summary.get("incomplete", {}).items():
        lines.append(f"\n`{m}` is not in the table: it has {have} samples; rerun with --methods {m} to finish it.")
    lines += ["", f"Values in %; p: two-sided paired bootstrap vs the baseline (`{summary['baseline']}`) on the same "
                  "samples."]
    from .cost import table as cost_table

    lines += cost_table(summary.get("cost", {}), summary["baseline"])
    return "\n".join(lines) + "\n"


# -- what a result needs to stand alone ------------------------------------------------------------
def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def _provenance(summary: dict[str, Any]) -> dict[str, Any]:
    prov = summary.get("provenance")
    return prov if isinstance(prov, dict) else {}  # a summary edited by hand is read as far as it goes


def described_settings(summary: dict[str, Any]) -> dict[str, Any]:
    """Each setting's methods as run (``describe()``: method, config, on_model), from the provenance of an
    ``eval`` run; empty for scored outputs, which were generated elsewhere."""
    described = _provenance(summary).get("methods")
    return described if isinstance(described, dict) else {}


def setting_text(summary: dict[str, Any], name: str) -> str:
    """A setting with every parameter it ran with (defaults included): ``vhr:alpha=2 = vhr(alpha=2, layers=null,
    ...)``; the name alone where the summary has no resolved config (``score``: answers made elsewhere)."""
    described = described_settings(summary).get(name)
    if not isinstance(described, list):
        return name
    if not described:
        return f"{name} (no method)"
    parts = [f"{d.get('method', '?')}(" + ", ".join(f"{k}={_short(v)}" for k, v in d["config"].items()) + ")"
             for d in described if isinstance(d, dict) and isinstance(d.get("config"), dict)]
    return f"{name} = {' + '.join(parts)}"


def run_facts(summary: dict[str, Any]) -> dict[str, str]:
    """What places a result: model, dataset (id and sha256 short form), n per split, methods with their
    parameters, date; read from the summary (its provenance), so results.md, the figures and the combined
    table of several runs say the same. A fact the run did not record says so."""
    prov = _provenance(summary)
    model = prov.get("model")
    if model:
        extra = [f"revision {prov['revision']}" if prov.get("revision") else "", prov.get("model_type") or "",
                 str(prov.get("dtype") or "")]
        model = f"`{model}`" + (f" ({', '.join(x for x in extra if x)})" if any(extra) else "")
    elif prov.get("command") == "score":
        model = "not recorded (answers generated elsewhere, scored with `lvlm-fix score`)"
    else:
        model = "not recorded"
    data = prov.get("dataset") if isinstance(prov.get("dataset"), dict) else {}
    sha = str(data.get("sha256") or "")
    dataset = str(data.get("id") or data.get("labels") or "not recorded") + (f" ({sha[:19]})" if sha else "")
    n = summary.get("n")
    if not isinstance(n, dict):  # a summary of an older lvlm-fix: the bench's own count, where it has one
        base = summary["methods"].get(summary.get("baseline"), {})
        n = {sp: row.get("n") for sp, row in base.get("splits", {}).items()}
    started, finished = prov.get("started"), prov.get("finished")
    return {
        "Model": model,
        "Dataset": dataset,
        "n per split": ", ".join(f"{sp} {k if k is not None else '?'}" for sp, k in n.items()) or "not recorded",
        "Methods": "; ".join(setting_text(summary, m) for m in summary["methods"]),
        "Date": (f"{started} to {finished}" if started and finished else str(finished or "not recorded")),
    }
