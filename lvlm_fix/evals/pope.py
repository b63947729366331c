"""POPE (Li et al., 2023): yes/no object-existence questions, parsed and scored without a model.

Everything here is pure: the answer parser, the confusion matrix, the metrics and a few
vectorised statistics for :mod:`lvlm_fix.evals.stats`. All metrics are **fractions in [0, 1]**
(papers usually print them x100). "Positive" means *yes*, so precision and recall are those of the
"yes, the object is there" answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from lvlm_fix.errors import InputError

Answer = Literal["yes", "no"]

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
"""The three POPE negative-sampling splits (3,000 questions each for COCO)."""

DEFAULT_QUESTION_TEMPLATE = "{question}"
"""The raw question, as the VHR-family Hugging Face evaluations send it (no answer-format suffix)."""

LLAVA_QUESTION_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
"""LLaVA's ``llava_pope_test.jsonl`` prompt (also used by CARVE); pass it to compare with LLaVA."""

# The canonical parser looks for these exact, case-sensitive words (see parse_answer).
_NO_WORDS = frozenset({"No", "not", "no"})
# For the "unparseable" report we look anywhere in the answer, case-insensitively.
_YES_OR_NO = re.compile(r"\b(?:yes|no|not)\b", re.IGNORECASE)


def build_prompt(question: str, template: str = DEFAULT_QUESTION_TEMPLATE) -> str:
    """Render the user text for one POPE question.

    Args:
        question: The POPE question, e.g. ``"Is there a dog in the image?"``.
        template: A ``str.format`` template with a ``{question}`` field.

    Returns:
        The text that goes where the chat template puts the user turn.
    """
    if "{question}" not in template:
        raise InputError(
            f"POPE question template {template!r} has no '{{question}}' field; "
            "add it where the question should go"
        )
    return template.format(question=question)


def parse_answer(text: str) -> Answer:
    """Map a free-form answer to ``"yes"`` or ``"no"`` with the canonical POPE rule.

    This is the convention of POPE's ``evaluate.py`` and LLaVA's ``llava/eval/eval_pope.py``
    (also used by the VAR and ILVAD evaluations), kept exactly so numbers stay comparable:

    1. keep only the text before the first ``.``;
    2. delete every ``,``;
    3. split on single spaces;
    4. if any word is exactly ``No``, ``not`` or ``no`` the answer is "no", otherwise "yes".

    The one addition is stripping surrounding whitespace first (LLaVA's generation script strips
    its outputs before this rule sees them), so a trailing newline cannot turn "No" into "yes".
    Answers with no yes/no word at all (``"I cannot tell"``) therefore count as "yes";
    :func:`is_unparseable` flags them so the count can be reported.

    Args:
        text: The model's answer.

    Returns:
        ``"yes"`` or ``"no"``.
    """
    first_sentence = text.strip().split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def is_unparseable(text: str) -> bool:
    """Whether an answer contains no yes/no word anywhere.

    Looks for the whole words ``yes``, ``no`` or ``not`` in any case and anywhere in the text (not
    only the first sentence). Such answers are still scored by :func:`parse_answer` (as "yes"),
    but should be counted and reported: many of them mean the prompt or the parser does not fit
    the model.

    Args:
        text: The model's answer.

    Returns:
        True when none of the words occurs.
    """
    return _YES_OR_NO.search(text) is None


def normalize_label(label: str) -> Answer:
    """Validate a ground-truth label: ``"yes"`` or ``"no"``, in any case and spacing.

    Raises:
        InputError: For any other value (POPE labels are never anything else, so a different
            value means the wrong column or file was read).
    """
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise InputError(f"POPE label {label!r} is not 'yes' or 'no'; check the label column")
    return "yes" if value == "yes" else "no"


@dataclass(frozen=True)
class Confusion:
    """A 2x2 confusion matrix with *yes* as the positive class."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Confusion:
        """Count ``(prediction, label)`` pairs; both must be ``"yes"`` or ``"no"``.

        Pair predictions with labels by ``question_id`` (or keep file order identical): the
        reference scripts pair them by line order, which silently breaks on reordered files.
        """
        tp = fp = tn = fn = 0
        for pred, label in pairs:
            pred_yes = normalize_label(pred) == "yes"
            label_yes = normalize_label(label) == "yes"
            if pred_yes and label_yes:
                tp += 1
            elif pred_yes:
                fp += 1
            elif label_yes:
                fn += 1
            else:
                tn += 1
        return cls(tp=tp, fp=fp, tn=tn, fn=fn)

    @property
    def n(self) -> int:
        """Number of questions."""
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: Confusion) -> Confusion:
        # Pooling splits (CARVE reports accuracy over all 9,000 questions) is a matrix sum.
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )


@dataclass(frozen=True)
class PopeMetrics:
    """POPE metrics as fractions; see :func:`metrics`."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """The metrics as a plain dict (JSON-ready)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def metrics(confusion: Confusion) -> PopeMetrics:
    """Accuracy, precision, recall, F1 and yes-ratio from one confusion matrix.

    ``yes_ratio`` is the share of *predicted* "yes" (the model's bias), not of "yes" labels, which
    is what lmms-eval reports by mistake. A zero denominator gives 0.0 instead of an error (no
    +1e-5 smoothing as in the VHR scripts, so values are exact): precision is 0.0 when nothing
    was predicted "yes", recall 0.0 when no label is "yes", F1 0.0 when precision + recall is 0,
    and every metric 0.0 for an empty matrix.

    Args:
        confusion: Counts with *yes* as the positive class.

    Returns:
        The metrics as fractions in [0, 1] plus ``n``.
    """
    c = confusion
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn)
    return PopeMetrics(
        accuracy=_ratio(c.tp + c.tn, c.n),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=_ratio(c.tp + c.fp, c.n),
        n=c.n,
    )


@dataclass(frozen=True)
class PopeReport:
    """Scored answers of one POPE run: metrics, the matrix and the unparseable count."""

    metrics: PopeMetrics
    confusion: Confusion
    n_unparseable: int
    predictions: tuple[Answer, ...]

    def as_dict(self) -> dict[str, object]:
        """Metrics, counts and the unparseable answers' count (JSON-ready, no predictions)."""
        return {
            **self.metrics.as_dict(),
            **asdict(self.confusion),
            "n_unparseable": self.n_unparseable,
        }


def score(answers: Sequence[str], labels: Sequence[str]) -> PopeReport:
    """Parse raw answers and score them against labels given in the same order.

    Args:
        answers: Model outputs, one per question.
        labels: ``"yes"`` / ``"no"`` labels in the same order.

    Returns:
        A :class:`PopeReport`.

    Raises:
        InputError: If the two sequences differ in length or a label is not yes/no.
    """
    if len(answers) != len(labels):
        raise InputError(
            f"got {len(answers)} answers for {len(labels)} labels; "
            "pass one answer per question, in the same order"
        )
    preds = tuple(parse_answer(a) for a in answers)
    confusion = Confusion.from_pairs(zip(preds, labels))
    return PopeReport(
        metrics=metrics(confusion),
        confusion=confusion,
        n_unparseable=sum(is_unparseable(a) for a in answers),
        predictions=preds,
    )


def average_over_splits(per_split: Mapping[str, PopeMetrics]) -> dict[str, float]:
    """Unweighted mean of each metric over splits (the VHR / ILVAD "average" row).

    Args:
        per_split: Metrics keyed by split name.

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


def per_sample_array(predictions: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Encode paired predictions and labels as an ``(n, 2)`` int array ``[pred_yes, label_yes]``.

    This is the ``per_sample_values`` argument that :data:`STATS` functions and
    :func:`lvlm_fix.evals.stats.bootstrap_ci` expect.
    """
    if len(predictions) != len(labels):
        raise InputError(
            f"got {len(predictions)} predictions for {len(labels)} labels; pair them one to one"
        )
    rows = [
        [normalize_label(p) == "yes", normalize_label(y) == "yes"] for p, y in zip(predictions, labels)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pred, label = values[..., 0], values[..., 1]
    tp = (pred * label).sum(axis=-1)
    fp = (pred * (1 - label)).sum(axis=-1)
    fn = ((1 - pred) * label).sum(axis=-1)
    return tp, fp, fn, np.full(tp.shape, values.shape[-2])


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _accuracy(v: np.ndarray) -> np.ndarray:
    return (v[..., 0] == v[..., 1]).mean(axis=-1)


def _precision(v: np.ndarray) -> np.ndarray:
    tp, fp, _, _ = _counts(v)
    return _safe_div(tp, tp + fp)


def _recall(v: np.ndarray) -> np.ndarray:
    tp, _, fn, _ = _counts(v)
    return _safe_div(tp, tp + fn)


def _f1(v: np.ndarray) -> np.ndarray:
    # F1 = 2TP / (2TP + FP + FN), equal to 2PR/(P+R) and 0 where that is 0/0.
    tp, fp, fn, _ = _counts(v)
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def _yes_ratio(v: np.ndarray) -> np.ndarray:
    return v[..., 0].mean(axis=-1)


STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy,
    "precision": _precision,
    "recall": _recall,
    "f1": _f1,
    "yes_ratio": _yes_ratio,
}
"""Metric functions over arrays from :func:`per_sample_array`, shaped ``(..., n, 2)``.

They reduce the sample axis and keep leading axes, so they work both per replicate and with
``batched=True`` in :mod:`lvlm_fix.evals.stats`.
"""
