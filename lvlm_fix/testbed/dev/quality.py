"""Measure a testbed checkpoint on the synthetic benchmark: POPE, CHAIR, AMBER, region task.

Run ``python -m lvlm_fix.testbed.dev.quality --checkpoint DIR`` to print a markdown report.

Every number a bench computes comes from the runner (:func:`lvlm_fix.evals.runner.evaluate` over
the registered benches, ``lvlm-fix list``), on the benches' default data, the cached
synthetic benchmark (:func:`~lvlm_fix.testbed.benchmark.ensure_benchmark`), one run of the
vanilla checkpoint per setting, so the report measures what ``lvlm-fix eval`` measures:

* POPE (random / popular / adversarial) under every answer-format preset the product sends
  (:data:`POPE_PRESETS`): the ``pope`` bench with the preset's template, no system prompt, 4 new
  tokens and the ``llava`` parser (:func:`lvlm_fix.evals.pope.parse_answer`'s canonical rule);
* CHAIR of greedy captions: the ``chair`` bench in ``original`` mode (the COCO CHAIR code
  path), its caption prompt, 64 new tokens;
* AMBER discriminative: the ``amber`` bench's ``discriminative`` split with exact answers
  (accuracy, precision, recall and F1 with **"no" as the positive class**, as AMBER computes
  them), per question type and overall, 4 new tokens.

Two shares no bench reports are read from the runs' stored records (``samples.jsonl``): how often
an answer is *exactly* ``Yes`` / ``No``, and for AMBER the share of exact "Yes"; POPE's false-yes
rate (FP / negatives) comes from the bench's confusion counts.

What no bench measures keeps its own greedy loop (:func:`generate`), because no bench poses it:

* the region task (small object among clutter): existence and colour accuracy on the image as
  given, and with an *oracle zoom* (the image cropped around the target and magnified), which
  bounds what looking closer can gain;
* prompt following: for every prompt family the product sends (suffixes, system prefixes,
  MVP's caption-in-context prompt, CARVE's one-word general description, a reworded question),
  how often the answer has the intended form, and its accuracy where one is defined, on the
  first ``n`` images (it reuses the benches' scorers, :func:`lvlm_fix.evals.pope.score` and
  :class:`lvlm_fix.evals.chair.ChairEvaluator`);
* the per-head image-attention profile of the decoder.

Limits follow the benches' rules: ``--pope-limit`` takes the first questions of each split,
``--chair-limit`` the chair bench's seeded sample of images (``random.Random(0).sample``; the
default, all 500, is every image), ``--amber-limit`` the first questions of the discriminative
set in file order (not per type).

Decoding is greedy everywhere. Every scene is held out: the benchmark draws from the world's
"val", "amber" and "region" streams; training uses "train".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ...diagnostics import entropy, image_mass
from ...errors import ConfigError
from ...evals import runner, store
from ...evals.amber import DIMENSION_OF_TYPE
from ...evals.chair import ChairEvaluator
from ...evals.pope import PRESETS, score
from ...hooks.plan import AttnContext, Participant, Plan
from ...images import load_image
from ...interventions.carve import ANSWER_SUFFIX
from ...model import load
from .. import prompts as P
from ..benchmark import SyntheticBenchmark, ensure_benchmark, read_jsonl
from ..model import CHECKPOINT_DIR, format_prompt
from ..world import CAPTION_PROMPT, CATEGORY_NAMES, COLOUR_NAMES, THEMES

# The POPE prompt formats the product sends: the eval presets' templates (raw: VHR-family
# evaluations; llava: LLaVA-1.5 and lmms-eval; vcd: VCD's scripts), CARVE's answer suffix after a
# space, and ICD's POPE instruction.
POPE_PRESETS: dict[str, str] = {
    "plain": PRESETS["raw"].template,
    "llava": PRESETS["llava"].template,
    "carve": "{question} " + ANSWER_SUFFIX.strip(),
    "vcd": PRESETS["vcd"].template,
    "icd": "{question} Please only answer yes or no.",
}
AMBER_TYPES: tuple[str, ...] = ("discriminative-hallucination", "discriminative-attribute-state",
                                "discriminative-attribute-number", "discriminative-attribute-action",
                                "discriminative-relation")
# Greedy whatever the bench's default (the vcd preset samples): every number here is of greedy answers.
GREEDY = {"do_sample": False, "num_beams": 1}


@torch.no_grad()
def generate(model: Any, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
             max_new_tokens: int, batch_size: int = 64, system: str | None = None) -> list[str]:
    """Greedy answers for (image, prompt) pairs, batched with left padding.

    Args:
        model: a loaded testbed (or any LLaVA-template) model.
        processor: its processor.
        images: one image per prompt.
        prompts: user prompts (the template is applied here).
        max_new_tokens: generation length limit.
        batch_size: pairs per ``generate`` call.
        system: an optional system message, prepended as the chat template does.

    Returns:
        Decoded answers without special tokens, stripped.
    """
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = processor(images=list(images[i:i + batch_size]),
                          text=[format_prompt(p, system) for p in prompts[i:i + batch_size]],
                          padding=True, return_tensors="pt").to(model.device)
        ids = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [s.strip() for s in out]


def _images(bench: SyntheticBenchmark, names: Sequence[str], root: Path | None = None) -> list[Image.Image]:
    root = root or bench.images_dir
    cache: dict[str, Image.Image] = {}
    for name in dict.fromkeys(names):
        cache[name] = load_image(root / name)
    return [cache[n] for n in names]


def _exact_rate(answers: Sequence[str]) -> float:
    return sum(a in ("Yes", "No") for a in answers) / max(1, len(answers))


def bench_run(lvlm: Any, runs: Path, name: str, bench: str, limit: int | None, batch_size: int,
              **settings: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One runner evaluation of the vanilla model: the bench's metrics per split and its stored records.

    Args:
        runs: the folder of the run folders; this run is ``runs/name``.
        bench: a registered bench; ``limit`` and ``batch_size`` as for the runner.
        **settings: the runner's and the bench's settings (split, template, options).

    Returns:
        ``({split: metrics}, records in sample order)``.
    """
    out = runs / name
    # n_boot=1: the report prints point estimates only; the bootstrap's intervals would go unread.
    summary = runner.evaluate(lvlm, bench, methods=[runner.BASELINE], limit=limit, batch_size=batch_size,
                              out_dir=out, n_boot=1, progress=False, **settings)
    records = store.read_records(runner.setting_folder(out, runner.BASELINE) / "samples.jsonl")
    return summary["methods"][runner.BASELINE]["splits"], list(records.values())


def evaluate_pope(lvlm: Any, runs: Path, preset: str, limit: int | None = None,
                  batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """POPE metrics of every split (first ``limit`` questions of each) under one of :data:`POPE_PRESETS`.

    Returns:
        ``{split: metrics}``: the pope bench's accuracy, precision, recall, f1, yes_ratio, n and
        confusion counts, plus false_yes (FP / negatives) and exact (share of answers that are
        exactly "Yes" or "No").
    """
    rows, records = bench_run(lvlm, runs, f"pope-{preset}", "pope", limit, batch_size, split="all",
                              prompt_template=POPE_PRESETS[preset], system_prompt="", max_new_tokens=4,
                              generation=GREEDY, pope_parser="llava")
    return {split: {**row, "false_yes": row["fp"] / max(1, row["fp"] + row["tn"]),
                    "exact": _exact_rate([r["answer"] for r in records if r["split"] == split])}
            for split, row in rows.items()}


def evaluate_chair(lvlm: Any, runs: Path, limit: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """CHAIR (original mode) of greedy captions for the chair bench's prompt, 64 new tokens.

    Returns:
        The chair bench's chair_s, chair_i, recall (object coverage), mean_length, n, ..., and the
        captions of the first five images of the captions file that were captioned (examples).
    """
    rows, records = bench_run(lvlm, runs, "chair", "chair", limit, batch_size, chair_mode="original",
                              max_new_tokens=64, generation=GREEDY)
    captions = {r["image_id"]: r["caption"] for r in records}
    order = [m["id"] for m in json.loads(SyntheticBenchmark(ensure_benchmark()).captions_file.read_text())["images"]]
    return {**rows["val"], "examples": [captions[i] for i in order if i in captions][:5]}


def _amber_row(block: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One AMBER block's metrics with undefined ratios as 0, plus the shares of exact and of "Yes" answers."""
    answers = [r["answer"] for r in records]  # "yes" / "no" for an exact Yes / No, else None
    return {**{k: 0.0 if v is None else v for k, v in block.items()},
            "exact": sum(a is not None for a in answers) / max(1, len(answers)),
            "yes_ratio": sum(a == "yes" for a in answers) / max(1, len(answers))}


def evaluate_amber(lvlm: Any, runs: Path, limit: int | None = None,
                   batch_size: int = 64) -> dict[str, dict[str, float]]:
    """AMBER discriminative metrics of the amber bench's set (first ``limit`` questions), per type and overall.

    Returns:
        ``{type: metrics, ..., "all": metrics}``: accuracy, precision, recall, f1 and n of the
        bench's block, plus exact and yes_ratio (see :func:`_amber_row`).
    """
    rows, records = bench_run(lvlm, runs, "amber", "amber", limit, batch_size, split="discriminative",
                              max_new_tokens=4, generation=GREEDY, amber_answers="exact",
                              amber_tagger="noun")  # the tagger reads generative answers only: none here
    blocks = rows["discriminative"]["blocks"]
    out: dict[str, dict[str, float]] = {}
    for t in AMBER_TYPES:
        dim = DIMENSION_OF_TYPE[t]
        mine = [r for r in records if r["dimension"] == dim]
        if mine:
            out[t] = _amber_row(blocks[dim], mine)
    out["all"] = _amber_row(blocks["overall"], records)
    return out


def zoom(image: Image.Image, bbox: Sequence[int], factor: float = 3.0, min_side: int = 48) -> Image.Image:
    """An oracle "look closer": a square window ``factor`` times the box, magnified to the image size."""
    x, y, w, h = bbox
    side = min(max(min_side, round(factor * max(w, h))), *image.size)
    cx, cy = x + w / 2, y + h / 2
    x0 = int(min(max(0, round(cx - side / 2)), image.size[0] - side))
    y0 = int(min(max(0, round(cy - side / 2)), image.size[1] - side))
    return image.crop((x0, y0, x0 + side, y0 + side)).resize(image.size, Image.Resampling.LANCZOS)


def _colour_answer(answer: str) -> str:
    words = answer.replace(".", " ").split()
    return words[0].lower() if words else ""


def evaluate_region(model: Any, processor: Any, bench: SyntheticBenchmark, limit: int | None = None,
                    batch_size: int = 64, oracle_zoom: bool = False, suffix: str = "") -> dict[str, float]:
    """Accuracy on the region task (small target among clutter).

    Args:
        limit: questions per file (existence, colour).
        oracle_zoom: answer on the image cropped around the target and magnified (uses the
            rows' ``bbox``: an upper reference for crop-and-zoom methods, not a method).
        suffix: appended to every question (e.g. CARVE's answer suffix).

    Returns:
        existence_accuracy (POPE parse), existence_false_yes, colour_accuracy (first word of
        the answer equals the colour), colour_form (the first word is a colour word), n.
    """
    result: dict[str, float] = {}
    for task in ("existence", "colour"):
        rows = read_jsonl(bench.region_file(task))[:limit]
        images = _images(bench, [r["image"] for r in rows])
        if oracle_zoom:
            images = [zoom(im, r["bbox"]) for im, r in zip(images, rows)]
        answers = generate(model, processor, images, [r["text"] + suffix for r in rows], max_new_tokens=4,
                           batch_size=batch_size)
        if task == "existence":
            rep = score(answers, [r["label"] for r in rows]).as_dict()
            result.update(existence_accuracy=rep["accuracy"], existence_n=len(rows),
                          existence_false_yes=rep["fp"] / max(1, rep["fp"] + rep["tn"]))
        else:
            got = [_colour_answer(a) for a in answers]
            result.update(colour_accuracy=sum(g == r["label"] for g, r in zip(got, rows)) / max(1, len(rows)),
                          colour_form=sum(g in COLOUR_NAMES for g in got) / max(1, len(rows)), colour_n=len(rows))
    return result


def _is_caption(text: str) -> bool:
    """Caption form: a sentence ending in "." that names objects (or says nothing is there)."""
    return text.endswith(".") and (any(c in text for c in CATEGORY_NAMES) or text.startswith("nothing"))


def evaluate_prompts(model: Any, processor: Any, bench: SyntheticBenchmark, n: int = 60,
                     batch_size: int = 64) -> list[dict[str, Any]]:
    """How every prompt family the product sends is answered, on ``n`` images each.

    Caption prompts: CHAIR on ``n`` images and the share of caption-form answers. Yes/no
    families (POPE questions from the random split, 6 per image, with each suffix, system
    prefix, AMBER's wording and MVP's caption-in-context prompt built from the model's own
    caption): accuracy and the share of exact "Yes"/"No". CARVE's one-word general
    description: the share of one-word answers and the share naming a theme.

    Returns:
        One row per family: family, prompt (abbreviated), n, form (share of intended-form
        answers), and accuracy / chair_i / recall where defined.
    """
    rows_out: list[dict[str, Any]] = []
    evaluator = ChairEvaluator.from_coco(bench.instances_file, bench.captions_file, mode="original")  # as above
    images_meta = json.loads(bench.captions_file.read_text())["images"][:n]
    caption_images = _images(bench, [m["file_name"] for m in images_meta])
    for prompt in P.CAPTION_PROMPTS[:8]:
        captions = generate(model, processor, caption_images, [prompt] * len(images_meta), 64, batch_size)
        res = evaluator.evaluate([{"image_id": m["id"], "caption": c} for m, c in zip(images_meta, captions)])
        rows_out.append(dict(family="caption", prompt=prompt, n=len(captions),
                             form=sum(map(_is_caption, captions)) / len(captions),
                             chair_i=res.chair_i, recall=res.recall))
    pope = read_jsonl(bench.pope_file("random"))[:6 * n]
    images = _images(bench, [r["image"] for r in pope])
    labels = [r["label"] for r in pope]

    def yes_no(family: str, label: str, prompts: list[str], system: str | None = None) -> None:
        answers = generate(model, processor, images, prompts, 4, batch_size, system=system)
        rows_out.append(dict(family=family, prompt=label, n=len(answers), form=_exact_rate(answers),
                             accuracy=score(answers, labels).metrics.accuracy))

    questions = [r["text"] for r in pope]
    yes_no("question", "POPE question", questions)
    for suffix in (*P.ONE_WORD_SUFFIXES[:3], P.YES_NO_SUFFIXES[0]):
        yes_no("question + suffix", "POPE question" + suffix.replace("\n", "\\n"), [q + suffix for q in questions])
    yes_no("question", "AMBER wording (in this image)", [q.replace("the image?", "this image?") for q in questions])
    for system in (P.VICUNA_SYSTEM, *P.ICD_INSTRUCTIONS):
        yes_no("system + question", system[:60] + ("..." if len(system) > 60 else ""), questions, system=system)
    names = list(dict.fromkeys(r["image"] for r in pope))
    own = dict(zip(names, generate(model, processor, _images(bench, names), [CAPTION_PROMPT] * len(names),
                                   64, batch_size)))
    yes_no("MVP in-context", "Here is the caption ... Question: {q.lower()}",
           [P.in_context_prompt(own[r["image"]], r["text"]) for r in pope])
    general = P.GENERAL_INSTRUCTION + P.ONE_WORD_SUFFIXES[1]
    answers = generate(model, processor, _images(bench, names[:n]), [general] * len(names[:n]), 8, batch_size)
    rows_out.append(dict(family="CARVE general", prompt=general, n=len(answers),
                         form=sum(len(a.split()) == 1 for a in answers) / max(1, len(answers)),
                         theme=sum(a in THEMES for a in answers) / max(1, len(answers)),
                         answers=dict(Counter(answers).most_common(4))))
    return rows_out


class _ImageAttention(Participant):
    """Per layer and head, at the last prompt position: image mass, entropy and top-1 share."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> ([b, h] x 3)

    def bind(self, lvlm: Any) -> None:
        self.observed_layers = frozenset(range(lvlm.num_layers))

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:  # [b, h, k]
        img = ctx.image_keys
        mass = image_mass(probs_last, img)
        p = probs_last * img[:, None, :] / mass.clamp_min(1e-12)[..., None]
        self.rows[ctx.layer] = (mass, entropy(probs_last, img[:, None, :]), p.amax(-1))


def image_attention(checkpoint: str | Path, bench: SyntheticBenchmark, n: int = 64) -> list[dict[str, float]]:
    """How graded each decoder head's attention over the image tokens is.

    For POPE questions, at the last prompt position (where the answer is decided), per
    layer and head: the attention mass on image tokens, and the effective number of image
    tokens attended (exp of the entropy of the attention renormalised over image tokens;
    1 = one-hot, 64 = uniform over 64 tokens). Read through lvlm-fix's own attention hook
    (the last query's row only), as ``lvlm-fix heads`` reads it.

    Returns:
        One dict per (layer, head): layer, head, image_mass, effective_tokens, top1_share.
    """
    lvlm = load(checkpoint, dtype="float32")
    rows = read_jsonl(bench.pope_file("random"))[:n]
    lvlm.tokenizer.padding_side = "left"  # the last position is every row's last prompt token
    batch = lvlm.processor(images=_images(bench, [r["image"] for r in rows]),
                           text=[format_prompt(r["text"]) for r in rows], padding=True, return_tensors="pt")
    recorder = _ImageAttention()
    with Plan(lvlm, [recorder]).active(), torch.inference_mode():
        lvlm.model(**batch)
    stats = []
    for layer, (mass, ent, top1) in sorted(recorder.rows.items()):
        for head in range(mass.shape[1]):
            stats.append(dict(layer=layer, head=head, image_mass=float(mass[:, head].mean()),
                              effective_tokens=float(ent[:, head].exp().mean()),
                              top1_share=float(top1[:, head].mean())))
    return stats




def evaluate(checkpoint: str | Path | None = None, pope_limit: int | None = None, chair_limit: int | None = None,
             attention: bool = True, batch_size: int = 64, amber_limit: int | None = None,
             region_limit: int | None = None, prompts_n: int = 60, presets: Sequence[str] | None = None,
             runs: str | Path | None = None) -> dict[str, Any]:
    """All quality numbers of a checkpoint on the cached synthetic benchmark.

    Args:
        checkpoint: checkpoint directory (default: the shipped one).
        pope_limit: questions per POPE split and preset (default all 3,000).
        chair_limit: images to caption (default all 500; fewer: the chair bench's seeded sample).
        attention: also compute the per-head image-attention profile.
        batch_size: generation batch size.
        amber_limit: AMBER discriminative questions, in file order (default all).
        region_limit: region questions per task (default all).
        prompts_n: images per prompt family in the prompt-following table (0: skip it).
        presets: POPE presets to run (default all of :data:`POPE_PRESETS`).
        runs: keep the runner's run folders (``run.json``, ``samples.jsonl``, ``results.md``) here
            (the runner's rules: a folder of the same settings is resumed, one of other settings
            refused); None writes them to a temporary folder that is removed.

    Returns:
        ``{"pope": {preset: {split: metrics}}, "chair": {...}, "amber": {...}, "region": {...},
        "prompts": [...], "attention": [...], "seconds": ...}``.
    """
    unknown = sorted(set(presets or ()) - set(POPE_PRESETS))
    if unknown:  # before the model loads
        raise ConfigError(f"--presets names {unknown[0]!r}; choose from {', '.join(POPE_PRESETS)}")
    start = time.time()
    torch.manual_seed(0)
    lvlm = load(checkpoint or CHECKPOINT_DIR, dtype="float32")
    model, processor = lvlm.model, lvlm.processor
    bench = SyntheticBenchmark(ensure_benchmark())  # the data the benches default to
    with tempfile.TemporaryDirectory(prefix="lvlm-fix-quality-") as tmp:
        root = Path(runs) if runs is not None else Path(tmp)
        result: dict[str, Any] = {
            "pope": {p: evaluate_pope(lvlm, root, p, pope_limit, batch_size) for p in (presets or POPE_PRESETS)},
            "chair": evaluate_chair(lvlm, root, chair_limit, batch_size),
            "amber": evaluate_amber(lvlm, root, amber_limit, batch_size),
        }
    result["region"] = {
        "as given": evaluate_region(model, processor, bench, region_limit, batch_size),
        "as given + CARVE suffix": evaluate_region(model, processor, bench, region_limit, batch_size,
                                                   suffix=POPE_PRESETS["carve"][len("{question}"):]),
        "oracle zoom": evaluate_region(model, processor, bench, region_limit, batch_size, oracle_zoom=True),
    }
    if prompts_n:
        result["prompts"] = evaluate_prompts(model, processor, bench, prompts_n, batch_size)
    if attention:
        result["attention"] = image_attention(checkpoint or CHECKPOINT_DIR, bench)
    result["seconds"] = round(time.time() - start, 1)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The quality numbers as a small markdown report."""
    lines = ["| POPE preset | split | accuracy | precision | recall | F1 | yes-ratio | false-yes rate | "
             "exact Yes/No | n |", "|---|---|---|---|---|---|---|---|---|---|"]
    for preset, splits in result["pope"].items():
        for split, m in splits.items():
            lines.append(f"| {preset} | {split} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"{m['f1']:.3f} | {m['yes_ratio']:.3f} | {m['false_yes']:.3f} | {m['exact']:.3f} | {m['n']} |")
    c = result["chair"]
    lines += ["", "| CHAIR_S | CHAIR_I | coverage (recall) | mean length | captions |",
              "|---|---|---|---|---|",
              f"| {c['chair_s']:.3f} | {c['chair_i']:.3f} | {c['recall']:.3f} | "
              f"{c['mean_length']:.1f} | {c['n']} |"]
    if "amber" in result:
        lines += ["", "AMBER discriminative (\"no\" is the positive class; only exact \"Yes\"/\"No\" count):", "",
                  "| type | accuracy | precision | recall | F1 | yes-ratio | exact Yes/No | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for t, m in result["amber"].items():
            lines.append(f"| {t} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                         f"{m['yes_ratio']:.3f} | {m['exact']:.3f} | {m['n']} |")
    if "region" in result:
        lines += ["", "Region task (small object among clutter, 192 px images):", "",
                  "| view | existence accuracy | existence false-yes | colour accuracy | colour-word answers | "
                  "n (existence / colour) |", "|---|---|---|---|---|---|"]
        for view, m in result["region"].items():
            lines.append(f"| {view} | {m['existence_accuracy']:.3f} | {m['existence_false_yes']:.3f} | "
                         f"{m['colour_accuracy']:.3f} | {m['colour_form']:.3f} | {m['existence_n']} / {m['colour_n']} |")
    if "prompts" in result:
        lines += ["", "Prompt following (form = caption-form caption / exactly \"Yes\"/\"No\" / one word):", "",
                  "| family | prompt | n | form | accuracy | CHAIR_I | recall |", "|---|---|---|---|---|---|---|"]
        for r in result["prompts"]:
            prompt = r["prompt"].replace("\n", "\\n").replace("|", "/")
            if len(prompt) > 90:
                prompt = prompt[:87] + "..."
            acc = f"{r['accuracy']:.3f}" if "accuracy" in r else (f"theme {r['theme']:.3f}" if "theme" in r else "")
            ci = f"{r['chair_i']:.3f}" if "chair_i" in r else ""
            rec = f"{r['recall']:.3f}" if "recall" in r else ""
            lines.append(f"| {r['family']} | {prompt} | {r['n']} | {r['form']:.3f} | {acc} | {ci} | {rec} |")
    if "attention" in result:
        lines += ["", "| layer | image mass (mean over heads) | effective image tokens per head "
                  "(of 64) | top-1 share per head |", "|---|---|---|---|"]
        by_layer: dict[int, list[dict[str, float]]] = {}
        for s in result["attention"]:
            by_layer.setdefault(int(s["layer"]), []).append(s)
        for layer, heads in sorted(by_layer.items()):
            mass = sum(h["image_mass"] for h in heads) / len(heads)
            eff = ", ".join(f"{h['effective_tokens']:.1f}" for h in heads)
            top = ", ".join(f"{h['top1_share']:.2f}" for h in heads)
            lines.append(f"| {layer} | {mass:.2f} | {eff} | {top} |")
    lines += ["", "Example captions:"] + [f"- {e}" for e in c["examples"]]
    return "\n".join(lines)


def report(result: dict[str, Any], checkpoint: str | Path, argv: Sequence[str] | None = None) -> str:
    """The quality tables under a header that says how the checkpoint was trained and measured.

    The header is read from the checkpoint's ``testbed.json`` (recipe, parameter count, wall and
    CPU time) and from this command's own arguments, so the report always states the command
    that produced it.
    """
    import shlex
    import sys

    meta_file = Path(checkpoint) / "testbed.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    cfg = meta.get("config", {})
    args = list(sys.argv[1:] if argv is None else argv)
    lines = ["# Testbed checkpoint quality", ""]
    if cfg:
        model = cfg.get("model", {})
        lines += [
            "Trained with `lvlm-fix testbed train --out DIR` (the defaults of "
            "`lvlm_fix.testbed.dev.train.TrainConfig`, seed 0, one torch thread): "
            f"{cfg.get('vision_steps')} vision warm-up steps + {cfg.get('steps')} joint steps "
            f"(the first {cfg.get('warm_steps')} plain, then a {cfg.get('ramp_steps')}-step ramp to the full task mix), "
            f"existence negatives that go with the scene drawn at weight {cfg.get('cooccurring_negative_weight', 1.0)}, "
            f"batch {cfg.get('batch_size')}, {meta.get('n_parameters', 0) / 1e6:.2f}M parameters "
            f"({model.get('text_layers')} decoder layers of width {model.get('text_hidden')}, "
            f"{model.get('vision_layers')}-layer CLIP tower with CLS token, "
            f"{(model.get('image_size', 96) // model.get('patch_size', 12)) ** 2} image tokens). "
            f"Training took {meta.get('cpu_time_s', 0) / 60:.0f} min of CPU time "
            f"({meta.get('wall_time_s', 0) / 60:.0f} min wall on a shared, oversubscribed 2-core machine)."
            + (f" {meta['timing_note']}" if meta.get("timing_note") else ""),
            "",
        ]
    lines += ["Measured with", "",
              "    python -m lvlm_fix.testbed.dev.quality " + " ".join(shlex.quote(a) for a in args), "",
              "on the cached synthetic benchmark (`ensure_benchmark()`: seed 0, 500 held-out scenes, 3,000 POPE "
              "questions per split; 500 region-task images; 500 AMBER-format images), greedy decoding; POPE, CHAIR "
              "(original mode) and AMBER through the runner's benches, as `lvlm-fix eval` scores them "
              f"({result.get('seconds', 0) / 60:.0f} min).", "",
              markdown(result), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m lvlm_fix.testbed.dev.quality --checkpoint DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    parser.add_argument("--pope-limit", type=int, default=None, help="questions per split and preset")
    parser.add_argument("--chair-limit", type=int, default=None, help="images to caption (the chair bench's sample)")
    parser.add_argument("--amber-limit", type=int, default=None, help="AMBER discriminative questions, in file order")
    parser.add_argument("--region-limit", type=int, default=None, help="region questions per task")
    parser.add_argument("--prompts-n", type=int, default=60, help="images per prompt family (0: skip)")
    parser.add_argument("--presets", default=None, help=f"comma-separated POPE presets of {list(POPE_PRESETS)}")
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--runs", default=None,
                        help="keep the runner's run folders here, resumed by the same settings "
                             "(default: a temporary folder, removed)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--markdown", default=None,
                        help="also write a report (recipe, commands, tables) to this file, e.g. CHECKPOINT/quality.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.checkpoint, args.pope_limit, args.chair_limit, attention=not args.no_attention,
                      amber_limit=args.amber_limit, region_limit=args.region_limit, prompts_n=args.prompts_n,
                      presets=args.presets.split(",") if args.presets else None, runs=args.runs)
    print(markdown(result))
    if args.markdown:
        Path(args.markdown).write_text(report(result, args.checkpoint, argv), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
