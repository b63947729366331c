"""``lvlm-fix demo``: a hallucination of the embedded testbed, a method's answer beside it, the truth, and
what the method does over the testbed's whole benchmark.

The examples are chosen by a rule, not by hand: the testbed's own benchmark (the one ``lvlm-fix eval``
scores with no data flags) is walked in file order, and the first ``n`` samples where the baseline
contradicts the scene are shown —

* ``--task yes-no``: POPE's adversarial split (the absent object that co-occurs most with a present
  one, the question the testbed's language prior answers "yes"), asked with the default preset
  (``raw``) and read by its parser (``llava``); an error is a "yes" to an absent object or a "no" to
  a present one;
* ``--task caption``: CHAIR's caption prompt on the CHAIR images, in the order CHAIR samples them;
  an error is a caption that names an object the scene does not hold.

Every answer is printed with what contradicts the scene marked ``*like this*``
(:func:`mark_against_scene`), and the method's answer to the same sample beside the baseline's,
whatever it is: the method is not given a second chance and the examples are not filtered on it.
The closing line is the method's effect over the whole split, read from the shipped effect table
(``testbed/checkpoint/effects_<bench>.json``: the ``summary.json`` of the ``lvlm-fix eval`` run that
made the table of the testbed docs page, its command inside), so that one example is never taken
for evidence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Example", "EFFECTS", "MARK_LEGEND", "TASKS", "effect_line", "find_examples", "mark_against_scene", "run_demo"]

TASKS = {"yes-no": ("pope", "adversarial", "accuracy"), "caption": ("chair", None, "chair_s")}
"""Demo task -> (bench, split, metric of the closing line)."""

MARK_LEGEND = "contradicts the scene (an object it does not hold, or a wrong yes/no answer)"

EFFECTS = Path(__file__).resolve().parent / "testbed" / "checkpoint"
"""Where the effect tables live: ``effects_<bench>.json``, each a ``summary.json`` of ``lvlm-fix eval``."""

# A metric where lower is better reads "fewer"; the others "more". Values are shares, printed in %.
_LOWER_IS_BETTER = {"chair_s", "chair_i"}
_METRIC_NAMES = {"accuracy": "accuracy", "chair_s": "CHAIR_S (captions with a hallucinated object)"}


def _extractor(mode: str) -> Any:
    from .evals.chair import make_extractor

    return make_extractor(mode, tagger="noun" if mode == "opera" else None)


def mark_against_scene(text: str, objects: Sequence[str], question: str | None = None,
                       chair_mode: str = "lvlm-fix") -> str:
    """``text`` with what contradicts a scene holding ``objects`` marked ``*like this*``.

    Every object the text names that is not in the scene is marked (the objects found by CHAIR's
    extractor of ``chair_mode``; the caption demo uses its effect table's mode). When ``question`` asks about exactly one object (POPE's "Is there a knife in the
    image?"), a yes/no answer that contradicts the scene is marked too: its yes or no word, read by
    POPE's ``llava`` parser, the one the testbed's effect table uses.
    """
    from .evals.pope import get_parser

    extract = _extractor(chair_mode)
    present = set(objects)
    absent = {node for _, node in extract.extract(text)[0] if node not in present}
    if absent:  # whether the text contradicts the scene is the extractor's call; marking finds the words
        text = _mark_words(text, absent, extract)
    asked = {node for _, node in extract.extract(question)[0]} if question else set()
    if len(asked) == 1:
        truth = "yes" if asked <= present else "no"
        parser = get_parser("llava")
        if not parser.unreadable(text) and parser.read(text, truth) != truth:
            word = re.search(r"(?<![\w*])(yes|no)(?![\w*])", text, re.I)
            text = text[:word.start()] + f"*{word.group(0)}*" + text[word.end():] if word else f"*{text}*"
    return text


def _mark_words(text: str, nodes: set[str], extract: Any) -> str:
    """Mark each word, or two-word phrase ("traffic light"), that the extractor reads as one of ``nodes``.

    Word by word, since the extractor returns singular forms ("knife" for "knives"), not positions."""
    words = list(re.finditer(r"[A-Za-z]+", text))
    spans, i = [], 0
    while i < len(words):
        for size in (2, 1):
            if i + size > len(words):
                continue
            a, b = words[i].start(), words[i + size - 1].end()
            found = extract.extract(text[a:b])[0]
            if len(found) == 1 and found[0][1] in nodes and (size == 1 or " " in found[0][0]):
                spans.append((a, b))
                i += size
                break
        else:
            i += 1
    for a, b in reversed(spans):
        text = f"{text[:a]}*{text[a:b]}*{text[b:]}"
    return text


@dataclass(frozen=True)
class Example:
    """One sample where the baseline contradicts the scene, with the method's answer to it."""

    image: str  # file name in the testbed's benchmark
    objects: tuple[str, ...]  # what the scene holds
    prompt: str
    truth: str  # "yes" / "no" for a question; "" for a caption
    baseline: str
    answer: str  # the method's
    chair_mode: str  # the extractor that found the objects the texts name


def _load_objects() -> tuple[Path, dict[str, tuple[str, ...]]]:
    from .testbed.benchmark import SyntheticBenchmark, ensure_benchmark, read_jsonl

    bench = SyntheticBenchmark(ensure_benchmark())
    return bench.images_dir, {r["image"]: tuple(r["objects"]) for r in read_jsonl(bench.objects_file)}


def find_examples(lvlm: Any, method: str, task: str = "yes-no", n: int = 2, scan: int = 200,
                  batch_size: int = 16, **params: Any) -> tuple[list[Example], int]:
    """The first ``n`` samples (of the first ``scan``) where the baseline contradicts the scene, and how many
    samples were read to find them. See the module docstring for the rule."""
    from .api import generate
    from .evals.bench import make_bench
    from .evals.runner import _cut

    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not a demo task; choose one of {', '.join(TASKS)}")
    bench_name, split, _ = TASKS[task]
    from .evals.bench import BENCHES

    table = _effects(bench_name)
    # the bench as the effect table ran it (POPE's preset and parser, CHAIR's mode), on the same samples, in order
    names = {o.name for o in BENCHES.get(bench_name).options}
    b = make_bench(bench_name, split=split, **{k: v for k, v in table["settings"].items() if k in names})
    mode = table["settings"].get("chair_mode", "lvlm-fix")
    samples, _ = b.load(limit=table.get("limit"), seed=0)
    samples = samples[:scan]
    _, objects = _load_objects()
    found: list[Example] = []
    read = 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        p = b.prompting(batch[0].split)
        known = {k: p.generation[k] for k in ("max_new_tokens", "do_sample", "num_beams") if k in p.generation}
        extra = {k: v for k, v in p.generation.items() if k not in (*known, "stop")} or None
        stops = p.generation.get("stop", ())

        def ask(spec: str | None, rows: Sequence[Any], kw: dict[str, Any]) -> list[str]:
            out = generate(lvlm, [s.load_image() for s in rows], [p.template.format(question=s.question) for s in rows],
                           spec, seed=p.seed, system_prompt=p.system_prompt, generate_kwargs=extra, **known, **kw)
            return [_cut(t, stops) for t in out.texts]

        base = ask(None, batch, {})
        wrong = []
        for s, text in zip(batch, base):
            read += 1
            name = Path(getattr(s.data, "image_key", None) or s.data.file_name).name  # POPE / CHAIR sample
            truth = getattr(s.data, "label", "")
            if mark_against_scene(text, objects[name], s.question if truth else None, mode) != text:
                wrong.append((s, name, truth, text))
            if len(found) + len(wrong) == n:
                break
        if wrong:
            for (s, name, truth, text), answer in zip(wrong, ask(method, [w[0] for w in wrong], params)):
                found.append(Example(name, objects[name], s.question, truth, text, answer, mode))
        if len(found) == n:
            break
    return found, read


def _p_sentence(vs: dict[str, Any]) -> str:
    from .evals.stats import p_text

    return p_text(vs["p_value"], vs.get("n_boot", 1000)).replace("<", "< ")  # in a sentence: "p < 0.001"


def _effects(bench: str) -> dict[str, Any]:
    path = EFFECTS / f"effects_{bench}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def effect_line(method: str, task: str = "yes-no") -> str:
    """The method's effect over the whole split from the shipped effect table, with its CI and p-value."""
    bench, split, metric = TASKS[task]
    summary = _effects(bench)
    methods = summary["methods"]
    # a method measured with a parameter of its own (CARVE's captions: carve:suffix_in_answer=false) stands for it
    variants = [m for m in methods if m.split(":")[0] == method]
    method = method if method in methods or len(variants) != 1 else variants[0]
    if method not in methods:
        return (f"Over the testbed's benchmark: {method} is not in the shipped effect table "
                f"(methods: {', '.join(m for m in methods if m != summary['baseline'])}); "
                f"measure it with: lvlm-fix eval --bench {bench} --methods none,{method}")
    split = split or next(iter(methods[method]["splits"]))
    row, base = methods[method]["splits"][split], methods[summary["baseline"]]["splits"][split]
    ci, vs = row["ci"][metric], row["vs_baseline"][metric]
    bci = base["ci"][metric]
    change = vs["diff"] * 100
    better = (change < 0) == (metric in _LOWER_IS_BETTER) and change != 0
    verdict = "better" if better and vs["p_value"] < 0.05 else "worse" if not better and vs["p_value"] < 0.05 else \
        "no clear change"
    n = base.get("n", summary.get("limit"))
    what = f"{bench.upper()} {split} split, {n} questions" if TASKS[task][1] else f"{bench.upper()} set, {n} captions"
    return (f"Over the whole {what} (the effect table of the docs' testbed page):\n"
            f"  {_METRIC_NAMES.get(metric, metric)} {bci['value'] * 100:.1f}% [{bci['low'] * 100:.1f}, "
            f"{bci['high'] * 100:.1f}] without a method -> {ci['value'] * 100:.1f}% [{ci['low'] * 100:.1f}, "
            f"{ci['high'] * 100:.1f}] with {method}\n"
            f"  {change:+.1f} points, paired bootstrap p {_p_sentence(vs)} ({verdict}). "
            "One example is not evidence.")


def run_demo(lvlm: Any, method: str = "mvp", task: str = "yes-no", n: int = 2, scan: int = 200,
             **params: Any) -> list[str]:
    """The demo's lines: the rule, each example marked against its scene, the effect over the whole split."""
    bench, split, _ = TASKS[task]
    examples, read = find_examples(lvlm, method, task, n=n, scan=scan, **params)
    what = ("a yes to an absent object or a no to a present one" if task == "yes-no"
            else "a caption naming an object the scene does not hold")
    asked = "questions" if task == "yes-no" else "captions"
    lines = [f"The embedded testbed: the baseline and {method} on its {bench.upper()}{' ' + split if split else ''} "
             f"{asked}.",
             f"Examples: the first {n}, in the benchmark's order, where the baseline contradicts the scene",
             f"({what}); {read} {asked} read to find them.", ""]
    if not examples:
        lines.append(f"  none of the first {read} samples: the baseline contradicts no scene there")
    for i, ex in enumerate(examples, 1):
        lines.append(f"{i}. scene {ex.image} holds: {', '.join(ex.objects)}")
        lines.append(f"   {ex.prompt}" + (f"   truth: {ex.truth.capitalize()}" if ex.truth else ""))
        question = ex.prompt if ex.truth else None
        width = max(len("baseline"), len(method)) + 2
        for label, text in (("baseline", ex.baseline), (method, ex.answer)):
            marked = mark_against_scene(text, ex.objects, question, ex.chair_mode)
            verdict = "contradicts the scene" if marked != text else "agrees with the scene"
            lines.append(f"   {'[' + label + ']':{width}} {marked}   ({verdict})")
    lines += [f"   *word*: {MARK_LEGEND}", "", *effect_line(method, task).splitlines()]
    return lines
