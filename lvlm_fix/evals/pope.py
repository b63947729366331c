"""POPE (Li et al., 2023): yes/no object-existence questions, parsed and scored without a model.

Everything here is pure: the prompt presets, the answer parsers, the confusion matrix, the metrics
and the vectorised statistics for :mod:`lvlm_fix.evals.stats`. All metrics are **fractions in
[0, 1]** (papers usually print them x100). "Positive" means *yes*, so precision and recall are
those of the "yes, the object is there" answers.

POPE numbers move by several points with the prompt, the decoding and the parser, and each
paper family uses its own (:data:`PRESETS`, :data:`PARSERS`). Every result names its preset and
parser; compare numbers only between runs that share both.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from lvlm_fix.errors import ConfigError, InputError, UnknownNameError
from lvlm_fix.prompts import LLAVA_V1_SYSTEM_PROMPT, VICUNA_SYSTEM_PROMPT

Answer = Literal["yes", "no"]

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
"""The three POPE negative-sampling splits (3,000 questions each for COCO)."""

DEFAULT_QUESTION_TEMPLATE = "{question}"
"""The raw question, as the VHR-family Hugging Face evaluations send it (no answer-format suffix)."""

LLAVA_QUESTION_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's ``llava_pope_test.jsonl`` prompt (also lmms-eval's and CARVE's)."""

# ---- prompt templates -------------------------------------------------------------------------


def check_template(template: str, flag: str = "--prompt-template") -> str:
    """Validate a ``str.format`` template whose only field is ``{question}``.

    Raises:
        ConfigError: Naming an unknown field (``{oops}``), a malformed brace, or a template
            without ``{question}``.
    """
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{flag} {template!r} is not a valid template ({err}); write {{{{ and }}}} for literal "
                          "braces") from None
    unknown = [n for n in names if n != "question"]
    if unknown:
        raise ConfigError(f"{flag} {template!r} has the unknown field {{{unknown[0]}}}; only {{question}} is filled "
                          "in (write {{ and }} for literal braces)")
    if "question" not in names:
        raise ConfigError(f"{flag} {template!r} has no '{{question}}' field; add it where the question should go")
    return template


def build_prompt(question: str, template: str = DEFAULT_QUESTION_TEMPLATE) -> str:
    """Render the user text for one POPE question.

    Args:
        question: The POPE question, e.g. ``"Is there a dog in the image?"``.
        template: A ``str.format`` template with a ``{question}`` field and no other.

    Returns:
        The text that goes where the chat template puts the user turn.
    """
    return check_template(template).format(question=question)


# ---- parsers ------------------------------------------------------------------------------------


def _llava_words(text: str) -> list[str]:
    return text.strip().split(".", 1)[0].replace(",", "").split(" ")


def _opera_words(text: str) -> list[str]:
    return text.strip().replace(".", "").replace(",", "").split(" ")


def _opera_no(words: list[str]) -> bool:
    return any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)


@dataclass(frozen=True)
class Parser:
    """A POPE answer parser: how a free-form answer becomes yes / no, and when it cannot.

    ``read(answer, label)`` returns ``"yes"``, ``"no"`` or None (neither; only ``lmms-exact``);
    ``unreadable(answer)`` is True when the parser found neither word and fell back on its default,
    using the parser's own tokenisation and case rule (so the count matches what was scored).
    """

    name: str
    rule: str
    source: str
    read: Callable[[str, str], Answer | None] = field(repr=False)
    unreadable: Callable[[str], bool] = field(repr=False)


PARSERS: dict[str, Parser] = {
    p.name: p
    for p in (
        Parser(
            "llava",
            "first sentence (text before the first '.'), commas removed, split on spaces; a word 'No', 'not' or "
            "'no' -> no, else yes (surrounding whitespace stripped first)",
            "LLaVA llava/eval/eval_pope.py = POPE evaluate.py",
            read=lambda a, _label: "no" if {"No", "not", "no"}.intersection(_llava_words(a)) else "yes",
            unreadable=lambda a: not {"No", "not", "no", "Yes", "yes"}.intersection(_llava_words(a)),
        ),
        Parser(
            "opera",
            "all '.' and ',' removed, split on spaces; a word 'No', 'not', 'no', 'NO' or ending in \"n't\" -> no, "
            "else yes",
            "OPERA pope_eval.py (recorder)",
            read=lambda a, _label: "no" if _opera_no(_opera_words(a)) else "yes",
            unreadable=lambda a: not (_opera_no(_opera_words(a))
                                      or {"Yes", "yes", "YES"}.intersection(_opera_words(a))),
        ),
        Parser(
            "vcd",
            "lower-cased and stripped; for a yes label the answer is yes iff it contains 'yes', for a no label it "
            "is no iff it contains 'no' (so 'not', 'nothing', 'know' count as no)",
            "VCD experiments/eval/eval_pope.py",
            read=lambda a, label: ("yes" if "yes" in a.lower().strip() else "no") if label == "yes"
            else ("no" if "no" in a.lower().strip() else "yes"),
            unreadable=lambda a: "yes" not in a.lower().strip() and "no" not in a.lower().strip(),
        ),
        Parser(
            "lmms-exact",
            "lower-cased and stripped; only exactly 'yes' or 'no' counts; anything else is wrong for accuracy and "
            "left out of precision and recall",
            "lmms-eval tasks/pope/utils.py",
            read=lambda a, _label: a.lower().strip() if a.lower().strip() in ("yes", "no") else None,  # type: ignore[return-value]
            unreadable=lambda a: a.lower().strip() not in ("yes", "no"),
        ),
    )
}
"""The answer parsers of the POPE reference scripts (``--pope-parser``)."""


def get_parser(name: str) -> Parser:
    """A parser by name, or :class:`UnknownNameError` listing them."""
    if name not in PARSERS:
        raise UnknownNameError("POPE parser", name, PARSERS)
    return PARSERS[name]


def parse_answer(text: str, parser: str = "llava", label: str = "yes") -> Answer | None:
    """Map a free-form answer to ``"yes"`` or ``"no"`` (or None, ``lmms-exact`` only).

    The default is the convention of POPE's ``evaluate.py`` and LLaVA's ``eval_pope.py``: keep the
    text before the first ``.``, delete commas, split on single spaces, and answer "no" if a word
    is exactly ``No``, ``not`` or ``no``, otherwise "yes" (surrounding whitespace is stripped first,
    as LLaVA's generation script does). Answers with no yes/no word (``"I cannot tell"``, ``"NO"``)
    therefore count as "yes"; :func:`is_unparseable` flags them.

    Args:
        text: The model's answer.
        parser: A name in :data:`PARSERS`.
        label: The question's label; only the ``vcd`` parser reads it.
    """
    return get_parser(parser).read(text, label)


def is_unparseable(text: str, parser: str = "llava") -> bool:
    """Whether ``parser`` found neither a yes nor a no word and fell back on its default."""
    return get_parser(parser).unreadable(text)


def normalize_label(label: Any) -> Answer:
    """Validate a ground-truth label: ``"yes"``/``"no"`` in any case and spacing, or 1/0 (PAINT's files).

    Raises:
        InputError: For any other value (a different value means the wrong column or file was read).
    """
    value = str(label).strip().lower()
    value = {"1": "yes", "0": "no", "true": "yes", "false": "no"}.get(value, value)
    if value not in ("yes", "no"):
        raise InputError(f"POPE label {label!r} is not 'yes' or 'no'; check the label column")
    return "yes" if value == "yes" else "no"


# ---- presets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """What one paper family sends and how it decodes and parses (``--prompt-preset``)."""

    name: str
    template: str
    system_prompt: str | None
    generation: Mapping[str, Any]
    parser: str
    used_by: str
    seed: int | None = None
    note: str = ""


# Each preset as its repository sends it (tests/test_presets.py pins every string with the file and line it is from).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("raw", DEFAULT_QUESTION_TEMPLATE, None, {"max_new_tokens": 32, "do_sample": False, "num_beams": 1},
               "llava", "VHR, SSL, ILVAD (Hugging Face evaluations)",
               note="SSL and ILVAD generate up to 512 tokens; 32 here, which holds a yes/no answer's first sentence "
                    "(the one the llava parser reads)"),
        Preset("llava", LLAVA_QUESTION_TEMPLATE, VICUNA_SYSTEM_PROMPT,
               {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}, "llava",
               "LLaVA-1.5 paper and scripts, CARVE, most 'POPE F1 85.9' tables"),
        Preset("lmms-eval", LLAVA_QUESTION_TEMPLATE, None,
               {"max_new_tokens": 128, "do_sample": False, "num_beams": 1, "stop": ["\n\n"]}, "lmms-exact",
               "numbers produced with lmms-eval",
               note="lmms-eval's llava_hf model renders the tokenizer's chat template (llava-hf's has no system "
                    "message); a tokenizer without one gets lmms-eval's own template with vicuna_v1's system text, "
                    "and its llava model (original checkpoints) sends vicuna_v1's too: pass --system-prompt vicuna "
                    "there"),
        # VCD passes top_k=None, which transformers takes as no top-k cut; left out, transformers 5 applies its
        # default of 50, so the preset says 0 (also no cut, on every version).
        Preset("vcd", "{question} Please answer this question with one word.", LLAVA_V1_SYSTEM_PROMPT,
               {"max_new_tokens": 1024, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "num_beams": 1},
               "vcd", "VCD and methods reusing its scripts (sampled, not greedy)", seed=55),
        Preset("opera", DEFAULT_QUESTION_TEMPLATE, VICUNA_SYSTEM_PROMPT,
               {"max_new_tokens": 10, "do_sample": False, "num_beams": 5}, "opera",
               "OPERA and methods evaluated with its pope_eval.py",
               note="OPERA joins the system text to 'USER:' without a separator and puts a space, not a newline, "
                    "after the image; lvlm-fix passes the system text to the model's own chat template"),
    )
}
"""``--prompt-preset`` choices: user-turn template, system prompt, decoding and parser."""

DEFAULT_PRESET = "raw"


def get_preset(name: str) -> Preset:
    """A preset by name, or :class:`UnknownNameError` listing them."""
    if name not in PRESETS:
        raise UnknownNameError("POPE prompt preset", name, PRESETS)
    return PRESETS[name]


# ---- confusion matrix and metrics -----------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """A 2x2 confusion matrix with *yes* as the positive class, plus the answers that are neither
    yes nor no (only the ``lmms-exact`` parser leaves any), by label: ``other_yes``, ``other_no``."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    other_yes: int = 0
    other_no: int = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str | None, str]]) -> Confusion:
        """Count ``(prediction, label)`` pairs; a None prediction counts as other."""
        counts = dict.fromkeys(("tp", "fp", "tn", "fn", "other_yes", "other_no"), 0)
        for pred, label in pairs:
            label_yes = normalize_label(label) == "yes"
            if pred is None:
                cell = "other_yes" if label_yes else "other_no"
            elif normalize_label(pred) == "yes":
                cell = "tp" if label_yes else "fp"
            else:
                cell = "fn" if label_yes else "tn"
            counts[cell] += 1
        return cls(**counts)

    @property
    def n(self) -> int:
        """Number of questions."""
        return self.tp + self.fp + self.tn + self.fn + self.other_yes + self.other_no

    def __add__(self, other: Confusion) -> Confusion:
        # Pooling splits (CARVE reports accuracy over all 9,000 questions) is a matrix sum.
        return Confusion(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


@dataclass(frozen=True)
class PopeMetrics:
    """POPE metrics as fractions; see :func:`metrics`."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int
    label_yes_ratio: float = 0.5

    def as_dict(self) -> dict[str, float | int]:
        """The metrics as a plain dict (JSON-ready)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def metrics(confusion: Confusion) -> PopeMetrics:
    """Accuracy, precision, recall, F1, yes-ratio and label yes-ratio from one confusion matrix.

    ``yes_ratio`` is the share of *predicted* "yes" (the model's bias); ``label_yes_ratio`` the
    share of "yes" labels (what lmms-eval calls yes_ratio). Accuracy counts ``other`` answers as
    wrong; precision and recall ignore them. A zero denominator gives 0.0 instead of an error (no
    +1e-5 smoothing as in the VHR scripts, so values are exact).
    """
    c = confusion
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn)
    return PopeMetrics(
        accuracy=_ratio(c.tp + c.tn, c.n),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        yes_ratio=_ratio(c.tp + c.fp, c.n),
        n=c.n,
        label_yes_ratio=_ratio(c.tp + c.fn + c.other_yes, c.n),
    )


@dataclass(frozen=True)
class PopeReport:
    """Scored answers of one POPE run: metrics, the matrix and the unparseable count."""

    metrics: PopeMetrics
    confusion: Confusion
    n_unparseable: int
    predictions: tuple[Answer | None, ...]
    parser: str = "llava"

    def as_dict(self) -> dict[str, object]:
        """Metrics, counts, the unparseable answers' count and the parser (JSON-ready, no predictions)."""
        return {**self.metrics.as_dict(), **asdict(self.confusion), "n_unparseable": self.n_unparseable,
                "parser": self.parser}


def score(answers: Sequence[str], labels: Sequence[str], parser: str = "llava") -> PopeReport:
    """Parse raw answers and score them against labels given in the same order.

    Raises:
        InputError: If the two sequences differ in length or a label is not yes/no.
    """
    if len(answers) != len(labels):
        raise InputError(
            f"got {len(answers)} answers for {len(labels)} labels; "
            "pass one answer per question, in the same order"
        )
    p = get_parser(parser)
    labels = [normalize_label(x) for x in labels]
    preds = tuple(p.read(a, y) for a, y in zip(answers, labels))
    confusion = Confusion.from_pairs(zip(preds, labels))
    return PopeReport(
        metrics=metrics(confusion),
        confusion=confusion,
        n_unparseable=sum(p.unreadable(a) for a in answers),
        predictions=preds,
        parser=parser,
    )


def average_over_splits(per_split: Mapping[str, PopeMetrics]) -> dict[str, float]:
    """Unweighted mean of each metric over splits (the VHR / ILVAD "average" row).

    Returns:
        The mean of every metric except ``n``; ``n`` is the total.
    """
    if not per_split:
        raise InputError("no split metrics to average; score at least one POPE split first")
    rows = [m.as_dict() for m in per_split.values()]
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "n"}
    out["n"] = sum(int(r["n"]) for r in rows)
    return out


# ---- vectorised statistics for bootstrap resampling ----------------------------------------


def per_sample_array(predictions: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Encode paired predictions and labels as an ``(n, 3)`` array ``[pred_yes, pred_no, label_yes]``.

    A None prediction (neither yes nor no) has both ``pred_yes`` and ``pred_no`` 0. This is the
    input of the :data:`STATS` functions and of :func:`lvlm_fix.evals.stats.bootstrap_ci`.
    """
    if len(predictions) != len(labels):
        raise InputError(f"got {len(predictions)} predictions for {len(labels)} labels; pair them one to one")
    rows = [[p == "yes", p == "no", normalize_label(y) == "yes"] for p, y in zip(predictions, labels)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _cells(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yes, no, label = v[..., 0], v[..., 1], v[..., 2]
    return ((yes * label).sum(-1), (yes * (1 - label)).sum(-1), (no * (1 - label)).sum(-1), (no * label).sum(-1))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _accuracy(v: np.ndarray) -> np.ndarray:
    tp, _, tn, _ = _cells(v)
    return _safe_div(tp + tn, v.shape[-2])


def _precision(v: np.ndarray) -> np.ndarray:
    tp, fp, _, _ = _cells(v)
    return _safe_div(tp, tp + fp)


def _recall(v: np.ndarray) -> np.ndarray:
    tp, _, _, fn = _cells(v)
    return _safe_div(tp, tp + fn)


def _f1(v: np.ndarray) -> np.ndarray:
    # F1 = 2TP / (2TP + FP + FN), equal to 2PR/(P+R) and 0 where that is 0/0.
    tp, fp, _, fn = _cells(v)
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def _yes_ratio(v: np.ndarray) -> np.ndarray:
    return _safe_div(v[..., 0].sum(-1), v.shape[-2])


STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy,
    "precision": _precision,
    "recall": _recall,
    "f1": _f1,
    "yes_ratio": _yes_ratio,
}
"""Metric functions over arrays from :func:`per_sample_array`, shaped ``(..., n, 3)``.

They reduce the sample axis and keep leading axes, so they work both per replicate and with
``batched=True`` in :mod:`lvlm_fix.evals.stats`.
"""
