"""AMBER (Wang et al., 2023): generative and discriminative hallucination, scored offline.

Data (the ``data/`` folder of junyangwang0410/AMBER, or the testbed's synthetic set in the same
format): ``query/query_generative.json`` and ``query/query_discriminative.json`` (lists of
``{"id", "image", "query"}``), ``annotations.json`` (a list: item *k* is id *k*+1; generative items
``{"type": "generative", "truth": [...], "hallu": [...]}``, discriminative ones ``{"type", "truth":
"yes"|"no"}``), ``relation.json`` (object word -> associated words) and ``safe_words.txt``.

Generative metrics, per response: its nouns that are in the hallucination vocabulary H (every key
and value of relation.json), in order. A noun that is a global safe word is skipped (but counted);
one that is a truth object or associated with one covers that object; otherwise it marks the
hallucination-target object it names or is associated with (if any) and is hallucinated.

* CHAIR = hallucinated nouns / nouns (pooled), Cover = covered truth objects / truth objects,
  Hal = share of responses with >= 1 hallucinated noun, Cog = named hallucination targets /
  hallucination targets.

Discriminative: only the exact answers ``Yes`` and ``No`` count (anything else is wrong whatever
the label); the positive class is **no**. Precision = answered-No-and-label-no / answered-No,
recall = that / label-no; accuracy = correct / items; blocks: overall, existence, attribute (state
+ number + action pooled), state, number, action, relation.

Nouns are found as ``inference.py`` finds them: NLTK's word tokenizer, NLTK's tagger (where its
data is installed, below), then WordNet 3.0's noun lemma of each token exactly as NLTK's
``WordNetLemmatizer().lemmatize(token)`` gives it (:mod:`.wordnet`, data shipped: ``men`` stays
``men``, ``vases -> vas``, ``leaves -> leaf``, capitalised tokens are not lower-cased), kept when
the lemma is in H. The lemmatiser is NLTK 3.8.1's (``repeat_rules=True``), the NLTK of 2023 when
AMBER was published and scored; NLTK 3.9 and later differ from it only on non-words that one rule
does not take to a lemma (``cupss`` is ``cup`` here, ``cupss`` there).

What still differs from AMBER's ``inference.py`` (its NLTK tagger data and spaCy's ``en_core_web_lg``
vectors are downloads that cannot be made offline, and that lvlm-fix does not ship):

* **The POS tagger is downloaded data**: the original keeps only the tokens ``nltk.pos_tag`` tags
  ``NN*``; so does lvlm-fix where NLTK's tagger data is installed (``tagger="perceptron"``, the
  default then). Without it every token is taken as a noun (``noun``, with a warning unless chosen):
  a verb or adjective spelled like an H noun ("cars *park*"), or a noun the tagger mis-tags, counts
  here and not there.
* **No similarity**: the original also links a noun to a truth or hallucination-target word whose
  spaCy ``en_core_web_lg`` similarity exceeds 0.8 (``--similarity_score``); here only exact matches
  and relation.json links count. On the same nouns this can only make CHAIR and Hal higher and Cover
  and Cog lower than the original's; without the tagger the nouns themselves differ, so no bound
  holds on a whole set of responses.
* **Tokenizer**: punkt is untrained here (the abbreviation difference of :mod:`.chair_original`),
  and the installed NLTK's word tokenizer runs. NLTK 3.9.3 and later split an em or en dash between
  two words (``dog—cat``), 3.10.1 and later an opening single quote from its word (``a 'dog'``);
  the NLTK of 2023 kept both inside one token, which is then no H noun. The run records the NLTK
  version.
* Denominators are exact (empty blocks give None); ``compat=True`` reproduces the original's
  0.001 at the start of every counter (so 0.003 in each attribute denominator, which pools the
  state, number and action counters) and its F1 computed from rounded percentages.
* Every truth and hallucination-target object must be a key of relation.json: the original stops
  with a ``KeyError`` on one that is not, lvlm-fix with a one-line :class:`DataError` when the data
  are loaded (before any generation).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .chair_opera import TAGGERS, pos_tags  # TAGGERS: the --amber-tagger choices, as CHAIR's
from .chair_opera import resolve_tagger as resolve_any_tagger

GENERATIVE = "generative"
DISCRIMINATIVE = "discriminative"
DIMENSION_OF_TYPE = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
    "discriminative-relation": "relation",
    "relation": "relation",
}
BLOCKS: dict[str, tuple[str, ...]] = {
    "overall": ("existence", "state", "number", "action", "relation"),
    "existence": ("existence",),
    "attribute": ("state", "number", "action"),
    "state": ("state",),
    "number": ("number",),
    "action": ("action",),
    "relation": ("relation",),
}
QUERY_FILES = {GENERATIVE: "query_generative.json", DISCRIMINATIVE: "query_discriminative.json"}

COMPAT_START = 0.001
"""``data/metrics.txt``: every counter of ``inference.py`` starts at 0.001."""
POOLED_COUNTERS = {"attribute": 3}
"""Blocks whose denominators the original adds up from several counters (state + number + action),
each starting at :data:`COMPAT_START`; every other block reads one counter."""


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AmberItem:
    """One query with its annotation. ``dimension`` is ``generative`` or a discriminative dimension."""

    id: int
    image: str
    query: str
    dimension: str
    truth: Any
    hallu: tuple[str, ...] = ()
    image_path: Path | None = field(default=None, compare=False)

    @property
    def split(self) -> str:
        return GENERATIVE if self.dimension == GENERATIVE else DISCRIMINATIVE

    def load_image(self) -> Any:
        from ..images import load_image

        if self.image_path is None:
            raise DataError(f"AMBER item {self.id} has no image")
        return load_image(self.image_path)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"AMBER {what} not found: {path}; pass the data/ folder of the AMBER repository as --amber-dir")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte at offset {err.start}); restore the AMBER file") from None


class AmberData:
    """An AMBER data folder: annotations, relation.json, safe words, and the query files."""

    def __init__(self, root: str | Path, image_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"AMBER folder not found: {self.root}; pass the data/ folder of the AMBER repository")
        self.image_dir = Path(image_dir) if image_dir else self.root / "images"
        self.annotations = _read_json(self.root / "annotations.json", "annotations.json")
        self.relation = _read_json(self.root / "relation.json", "relation.json")
        if not isinstance(self.annotations, list) or not isinstance(self.relation, dict):
            raise DataError(f"{self.root}: annotations.json must be a list and relation.json an object")
        safe = self.root / "safe_words.txt"
        if not safe.is_file():
            raise DataError(f"AMBER safe_words.txt not found: {safe}")
        self.safe_words = frozenset(line.rstrip("\r\n") for line in safe.read_text(encoding="utf-8").splitlines())

    @property
    def files(self) -> list[Path]:
        return [self.root / "annotations.json", self.root / "relation.json", self.root / "safe_words.txt"]

    def annotation(self, item_id: int) -> dict[str, Any]:
        """The annotation of a query id (annotations.json is positional: item k is id k+1)."""
        if not 1 <= item_id <= len(self.annotations):
            raise DataError(f"AMBER id {item_id} has no annotation (annotations.json holds ids 1-{len(self.annotations)})")
        ann = self.annotations[item_id - 1]
        if not isinstance(ann, dict) or ann.get("id", item_id) != item_id:
            raise DataError(f"annotations.json item {item_id - 1} should describe id {item_id} (the file is "
                            f"positional); it holds {str(ann)[:80]}")
        return ann

    def item(self, item_id: int, image: str = "", query: str = "") -> AmberItem:
        ann = self.annotation(item_id)
        kind = ann.get("type")
        if kind == GENERATIVE:
            truth, hallu = tuple(ann.get("truth", ())), tuple(ann.get("hallu", ()))
            missing = next((obj for obj in truth + hallu if obj not in self.relation), None)
            if missing is not None:  # inference.py reads association[obj] and stops with a KeyError
                raise DataError(f"annotations.json id {item_id}: object {missing!r} is not a key of relation.json "
                                f"(AMBER's inference.py fails on it too); add \"{missing}\": [] to relation.json")
            return AmberItem(item_id, image, query, GENERATIVE, truth, hallu, self.image_dir / image if image else None)
        if kind not in DIMENSION_OF_TYPE or ann.get("truth") not in ("yes", "no"):
            raise DataError(f"annotations.json id {item_id}: type {kind!r} / truth {ann.get('truth')!r} is not an "
                            "AMBER annotation")
        return AmberItem(item_id, image, query, DIMENSION_OF_TYPE[kind], ann["truth"],
                         image_path=self.image_dir / image if image else None)

    def queries(self, split: str) -> list[AmberItem]:
        """The items of ``query/query_<split>.json`` in file order, with their annotations."""
        path = self.root / "query" / QUERY_FILES[split]
        rows = _read_json(path, QUERY_FILES[split])
        if not isinstance(rows, list) or not rows:
            raise DataError(f"{path} holds no queries; it must be a non-empty list of {{\"id\", \"image\", \"query\"}}")
        items = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not {"id", "image", "query"} <= set(row):
                raise DataError(f"{path}: item {i + 1} is not {{\"id\", \"image\", \"query\"}}")
            item = self.item(int(row["id"]), str(row["image"]), str(row["query"]))
            if item.split != split:
                raise DataError(f"{path}: id {item.id} is annotated as {item.dimension}, not {split}")
            items.append(item)
        return items

    @functools.cached_property
    def vocabulary(self) -> frozenset[str]:
        """H: every key and every associated word of relation.json."""
        return frozenset(self.relation) | frozenset(w for words in self.relation.values() for w in words)


# ---- nouns --------------------------------------------------------------------------------------
def resolve_tagger(tagger: str | None) -> str:
    """``perceptron`` (NLTK's ``pos_tag``, as inference.py; needs its data) or ``noun`` (every token a
    noun); None: perceptron where its data is installed, else noun with a warning."""
    return resolve_any_tagger(tagger, "--amber-tagger", "AMBER",
                              "taken as a noun (a verb spelled like a vocabulary noun counts)")


def extract_nouns(text: str, vocabulary: frozenset[str], tagger: str = "noun") -> list[str]:
    """The WordNet noun lemmas of the response's nouns that are in H, in order (module docstring);
    nouns: the tokens ``nltk.pos_tag`` tags ``NN*`` (``tagger="perceptron"``) or every token."""
    from . import wordnet
    from .chair_original import word_tokenize

    tokens = word_tokenize(text)
    if tagger == "perceptron":
        tokens = [token for token, tag in zip(tokens, pos_tags(tokens)) if tag.startswith("NN")]
    lemmas = (wordnet.lemmatize(token, "n", repeat_rules=True) for token in tokens)
    return [lemma for lemma in lemmas if lemma in vocabulary]


# ---- per-item scoring ---------------------------------------------------------------------------
def score_generative(nouns: Sequence[str], truth: Sequence[str], hallu: Sequence[str],
                     relation: Mapping[str, Sequence[str]], safe_words: frozenset[str]) -> dict[str, Any]:
    """One response's nouns against its annotation: hallucinated nouns, covered truth objects,
    named hallucination targets (exact match and relation.json links only)."""
    def links(objects: Sequence[str]) -> dict[str, int]:
        order = [(w, i) for i, obj in enumerate(objects) for w in relation.get(obj, ())]
        order += [(obj, i) for i, obj in enumerate(objects)]
        first: dict[str, int] = {}
        for word, i in order:
            first.setdefault(word, i)  # the first match in the original's scan order
        return first

    safe, targets = links(truth), links(hallu)
    covered, named, hallucinated = set(), set(), []
    for noun in nouns:
        if noun in safe_words:
            continue
        if noun in safe:
            covered.add(safe[noun])
            continue
        if noun in targets:
            named.add(targets[noun])
        hallucinated.append(noun)
    return {"nouns": list(nouns), "hallucinated": hallucinated, "covered": [truth[i] for i in sorted(covered)],
            "named_targets": [hallu[i] for i in sorted(named)], "truth": list(truth), "hallu": list(hallu)}


def read_answer(response: str, answers: str = "exact") -> str | None:
    """``"yes"``/``"no"`` for the exact ``Yes``/``No`` (``answers="exact"``, the original), or the POPE
    ``llava`` parse of any answer (``answers="llava"``); None for anything else."""
    if answers == "llava":
        from .pope import parse_answer

        return parse_answer(response, "llava")
    return {"Yes": "yes", "No": "no"}.get(response)


# ---- metrics --------------------------------------------------------------------------------------
def _div(num: float, den: float, compat: bool, counters: int = 1) -> float | None:
    """``num / den``; compat: ``den`` plus the 0.001 start of each of the ``counters`` it adds up."""
    if compat:
        return num / (den + counters * COMPAT_START)
    return num / den if den else None


def _pct(x: float | None, compat: bool) -> float | None:
    """Fractions as stored; compat rounds them the way inference.py prints (x100, one decimal)."""
    return None if x is None else (round(x * 100, 1) / 100 if compat else x)


GENERATIVE_COLUMNS = ("hallucinated", "nouns", "covered", "truth", "any_hallucinated", "named", "hallu")


def generative_values(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per-response counts, shape ``(n, 7)``, columns :data:`GENERATIVE_COLUMNS`."""
    rows = [[len(r["hallucinated"]), len(r["nouns"]), len(r["covered"]), len(r["truth"]), bool(r["hallucinated"]),
             len(r["named_targets"]), len(r["hallu"])] for r in records]
    return np.array(rows, dtype=np.int64).reshape(-1, len(GENERATIVE_COLUMNS))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


GENERATIVE_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "chair": lambda v: _safe_div(v[..., 0].sum(-1), v[..., 1].sum(-1)),
    "cover": lambda v: _safe_div(v[..., 2].sum(-1), v[..., 3].sum(-1)),
    "hal": lambda v: _safe_div(v[..., 4].sum(-1), v.shape[-2]),
    "cog": lambda v: _safe_div(v[..., 5].sum(-1), v[..., 6].sum(-1)),
}
"""Bootstrap metric functions over :func:`generative_values` arrays (exact denominators)."""


def generative_metrics(records: Sequence[Mapping[str, Any]], compat: bool = False) -> dict[str, Any]:
    """CHAIR, Cover, Hal, Cog (fractions) and their counts."""
    v = generative_values(records).sum(0) if records else np.zeros(len(GENERATIVE_COLUMNS), dtype=np.int64)
    h, n, c, t, any_h, named, a = (int(x) for x in v)
    hal = None if not records and not compat else 1 - _div(len(records) - any_h, len(records), compat)  # type: ignore[operator]
    return {"chair": _pct(_div(h, n, compat), compat), "cover": _pct(_div(c, t, compat), compat),
            "hal": _pct(hal, compat), "cog": _pct(_div(named, a, compat), compat), "n": len(records),
            "n_nouns": n, "n_hallucinated": h}


def discriminative_values(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per-question ``[answered no, label no, correct]``, shape ``(n, 3)``."""
    rows = [[r["answer"] == "no", r["label"] == "no", r["answer"] == r["label"]] for r in records]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


DISCRIMINATIVE_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": lambda v: _safe_div(v[..., 2].sum(-1), v.shape[-2]),
    "precision": lambda v: _safe_div((v[..., 0] * v[..., 1]).sum(-1), v[..., 0].sum(-1)),
    "recall": lambda v: _safe_div((v[..., 0] * v[..., 1]).sum(-1), v[..., 1].sum(-1)),
    "f1": lambda v: _safe_div(2 * (v[..., 0] * v[..., 1]).sum(-1), v[..., 0].sum(-1) + v[..., 1].sum(-1)),
}
"""Bootstrap metric functions over :func:`discriminative_values` arrays (positive class: no)."""


def block_metrics(records: Sequence[Mapping[str, Any]], compat: bool = False, eps: float = 0.0001,
                  counters: int = 1) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 with "no" as the positive class, for one block (``counters``:
    how many of the original's counters each compat denominator adds up, :data:`POOLED_COUNTERS`)."""
    v = discriminative_values(records)
    tp, answered_no, label_no, correct = (int((v[:, 0] * v[:, 1]).sum()), int(v[:, 0].sum()), int(v[:, 1].sum()),
                                          int(v[:, 2].sum()))
    accuracy, precision, recall = (_div(correct, len(records), compat, counters),
                                   _div(tp, answered_no, compat, counters), _div(tp, label_no, compat, counters))
    if compat:  # inference.py: F1 from the rounded percentages, with eps in the denominator
        p, r = round(precision * 100, 1) / 100, round(recall * 100, 1) / 100  # type: ignore[operator]
        f1: float | None = round(2 * p * r / (p + r + eps) * 100, 1) / 100
    else:
        f1 = None if precision is None or recall is None else (
            2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"accuracy": _pct(accuracy, compat), "precision": _pct(precision, compat), "recall": _pct(recall, compat),
            "f1": f1, "n": len(records)}


def discriminative_metrics(records: Sequence[Mapping[str, Any]], compat: bool = False) -> dict[str, Any]:
    """Every block of :data:`BLOCKS` (in compat mode existence's F1 uses eps 0.001 and attribute's
    denominators 0.003, as the original)."""
    return {block: block_metrics([r for r in records if r["dimension"] in dims], compat,
                                 eps=0.001 if block == "existence" else 0.0001,
                                 counters=POOLED_COUNTERS.get(block, 1))
            for block, dims in BLOCKS.items()}


def amber_score(chair: float | None, f1: float | None) -> float | None:
    """The AMBER score of the paper: ((1 - CHAIR) + F1) / 2, with the generative CHAIR and the
    overall discriminative F1 (inference.py does not compute it)."""
    return None if chair is None or f1 is None else ((1 - chair) + f1) / 2
