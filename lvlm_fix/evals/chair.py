"""CHAIR (Rohrbach et al., 2018): how many COCO objects a caption mentions that are not there.

Three extraction modes (``--chair-mode``); every result names its mode, singulariser or
lemmatiser (with version), tagger (opera mode) and synonym table (with sha256):

* ``opera`` (the default, :data:`DEFAULT_MODE`): OPERA's ``chair.py`` rule for rule, the scorer
  behind the CHAIR numbers of OPERA, PAI, HALC, PAINT, ONLY, the middle-layers paper and the
  VCD-family follow-ups (NLTK's tagger and WordNet's lemmatiser; see :mod:`.chair_opera`).
  This is the mode whose numbers can be put beside theirs.
* ``original``: the original ``utils/chair.py`` of LisaAnne/Hallucination token for token,
  quirks included (``bus`` is lost to ``bu``, ``ties`` become ``ty``); see :mod:`.chair_original`.
  The older scorer (Rohrbach et al.'s own numbers and the papers that ran that code).
* ``lvlm-fix``: this project's reading, which fixes what the original gets wrong
  (:class:`ObjectExtractor`):

  1. lower-case and split into words with the regex ``[a-z]+`` (hyphens and apostrophes separate
     words, so "hot-dog" reads as "hot dog");
  2. singularise each word with ``inflect.engine().singular_noun(w) or w`` (recorded as
     :data:`SINGULARIZER`), except words of the vocabulary itself, which inflect would damage
     ("bus" -> "bu", "tennis" -> "tenni");
  3. merge multi-word terms, longest first ("fire hydrant", "hot dog", "toilet bowl", ...), plus
     :data:`NON_OBJECT_PHRASES` such as "train track", which merge into no object;
  4. special rules: "baby" / "adult" before an animal (a COCO animal, "animal" or "cub") and
     "passenger" before a vehicle are dropped (a baby cub is no person, a passenger train a
     train); "seat" is dropped when the caption mentions a toilet; "toilet seat" and "bow tie" are
     table phrases (toilet, tie); "wine glas" (pattern.en's "wine glasses") reads as "wine glass";
  5. keep vocabulary words only and map each to its node word (the COCO category name), with the
     project's own table ``resources/coco_synonyms.txt``.

Metrics (:meth:`ChairEvaluator.evaluate`), all **fractions in [0, 1]** (papers print x100):

* CHAIR_S = captions with >= 1 hallucinated object / captions;
* CHAIR_I = hallucinated object mentions / object mentions, with multiplicity ("a dog ... the
  dog" is two mentions);
* recall (OPERA's addition) = sum over captions of |distinct mentioned objects in the ground
  truth| / sum of |ground-truth objects| (pooled over captions);
* mean_length = mean number of whitespace-separated words per caption; mean_tokens = mean number
  of items the extractor saw after merging (OPERA's "Len" x 100, punctuation included in the
  opera and original modes).

The ground truth of an image is its instance-annotation categories plus the objects its
reference captions mention, extracted by the same mode; or, for scoring against a released
scorer's cache, a given mapping of image ids to objects (:meth:`ChairEvaluator.from_ground_truth`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata, resources
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from lvlm_fix.errors import DataError, UnknownNameError

from .inflection import engine, inflect_singular

DEFAULT_PROMPT = "Please describe this image in detail."
"""The VHR-protocol caption prompt (OPERA / PAI use "Please help me describe the image in detail.")."""

DEFAULT_MAX_NEW_TOKENS = 512
"""Generation budget of the VHR / OPERA protocol; CHAIR moves a lot with it, so report Len."""

DEFAULT_NUM_IMAGES = 500
"""Images per CHAIR run in the VHR / OPERA protocol."""

SYNONYMS_RESOURCE = "coco_synonyms.txt"

NON_OBJECT_PHRASES: tuple[str, ...] = (
    "train track",
    "train station",
    "train platform",
    "bus stop",
    "bus station",
    "ski slope",
    "ski lift",
    "ski pole",
    "ski resort",
    "ski boot",
    "flower bed",
)
"""Compounds whose object word names a place or part, not the object: they count as nothing."""

ANIMALS = frozenset(
    {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
)
VEHICLES = frozenset({"airplane", "bus", "train", "boat", "car", "truck"})
ANIMAL_WORDS = frozenset({"animal", "cub"})
"""Words that are no COCO object but still make "baby" / "adult" an animal's, not a person."""

# modifier word -> (node words it modifies, other words it modifies); "baby elephant" is one
# elephant, "baby cub" no object at all, never a person.
_MODIFIERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "baby": (ANIMALS, ANIMAL_WORDS), "adult": (ANIMALS, ANIMAL_WORDS), "passenger": (VEHICLES, frozenset())}

MODES = ("opera", "original", "lvlm-fix")
DEFAULT_MODE = "opera"
"""The CLI's and :class:`ChairEvaluator`'s default: the scorer the field reports with (module docstring)."""

# Extra phrases -> the table entry they stand for. pattern.en, the original CHAIR singulariser,
# strips the final "s" of "glass"; keeping its output readable keeps the two variants comparable.
_ALIASES = {"wine glas": "wine glass"}

_WORD = re.compile(r"[a-z]+")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


SINGULARIZER = f"inflect {_package_version('inflect')}"
"""Name and version of the singulariser; store it with every CHAIR result."""


# ---- vocabulary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynonymTable:
    """COCO vocabulary: every synonym (space-joined words) mapped to its node word."""

    node_of: Mapping[str, str]
    nodes: tuple[str, ...]
    sha256: str = ""
    """sha256 of the file it was read from (empty for tables built from lines)."""

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<lines>") -> SynonymTable:
        """Parse ``node, synonym, ...`` lines; ``#`` comments and blank lines are skipped.

        Raises:
            DataError: If a synonym appears twice (it could map to two objects) or no line
                remains.
        """
        node_of: dict[str, str] = {}
        nodes: list[str] = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            entries = [" ".join(e.split()) for e in line.lower().split(",")]
            entries = [e for e in entries if e]
            nodes.append(entries[0])
            for entry in entries:
                if entry in node_of:
                    raise DataError(
                        f"{source}:{lineno}: synonym {entry!r} already maps to "
                        f"{node_of[entry]!r}; list each synonym under one category only"
                    )
                node_of[entry] = entries[0]
        if not nodes:
            raise DataError(f"{source} holds no categories; expected one 'node, synonym, ...' line each")
        return cls(node_of=MappingProxyType(node_of), nodes=tuple(nodes))

    @classmethod
    def from_file(cls, path: str | PathLike[str] | None = None) -> SynonymTable:
        """Load a table file; ``None`` loads the packaged COCO table."""
        if path is None:
            packaged = resources.files("lvlm_fix.evals").joinpath("resources", SYNONYMS_RESOURCE)
            data = packaged.read_bytes()
            table = cls.from_lines(data.decode("utf-8").splitlines(), source=SYNONYMS_RESOURCE)
            return dataclasses.replace(table, sha256=hashlib.sha256(data).hexdigest())
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"synonym table not found: {p}; pass an existing file, or None for the packaged one"
            )
        data = p.read_bytes()
        table = cls.from_lines(data.decode("utf-8").splitlines(), source=str(p))
        return dataclasses.replace(table, sha256=hashlib.sha256(data).hexdigest())


@functools.cache
def default_synonyms() -> SynonymTable:
    """The packaged 80-category COCO table (parsed once)."""
    return SynonymTable.from_file()


class Mention(NamedTuple):
    """One object mention: the caption's (singularised) words and the node word they map to."""

    word: str
    node: str


class ObjectExtractor:
    """``--chair-mode lvlm-fix``: caption -> COCO object mentions (module docstring, steps 1-5)."""

    mode = "lvlm-fix"

    def __init__(self, table: SynonymTable | None = None) -> None:
        self.table = table if table is not None else default_synonyms()
        phrases: dict[tuple[str, ...], str | None] = {
            tuple(entry.split()): node for entry, node in self.table.node_of.items()
        }
        for alias, entry in _ALIASES.items():
            if entry in self.table.node_of:
                phrases.setdefault(tuple(alias.split()), self.table.node_of[entry])
        for phrase in NON_OBJECT_PHRASES:
            phrases.setdefault(tuple(phrase.split()), None)
        self._phrases = phrases
        self._longest = max(len(key) for key in phrases)
        # Vocabulary words are already in the table's form; singularising them only does harm.
        self._keep = frozenset(word for key in phrases for word in key)
        engine()  # inflect checked now, not at the first caption of a run

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node words (COCO category names)."""
        return self.table.nodes

    def describe(self) -> dict[str, str]:
        """What a result must name: mode, singulariser and version, synonym table and sha256."""
        mapping = "\n".join(f"{k} -> {v}" for k, v in sorted(self.table.node_of.items()))
        return {"chair_mode": self.mode, "singularizer": "inflect", "singularizer_version": SINGULARIZER,
                "tokenizer": "regex [a-z]+",
                "synonyms": SYNONYMS_RESOURCE if self.table == default_synonyms() else "custom table",
                "synonyms_sha256": self.table.sha256 or hashlib.sha256(mapping.encode()).hexdigest()}

    def category(self, name: str) -> str:
        """The node word of a COCO category name from an instances file."""
        key = " ".join(str(name).lower().split())
        if key not in self.table.node_of:
            raise DataError(f"category {name!r} is not in the synonym table; "
                            "use COCO 2014/2017 instance files or extend the table")
        return self.table.node_of[key]

    def singularize(self, word: str) -> str:
        """Singular form of one lower-case word (vocabulary words are returned unchanged)."""
        return word if word in self._keep else inflect_singular(word)

    def extract(self, caption: str) -> tuple[list[tuple[str, str]], list[str]]:
        """``([(matched words, category), ...] in caption order, merged words)``."""
        words = [self.singularize(w) for w in _WORD.findall(caption.lower())]
        merged = self._merge(words)
        kept = [item for item, nxt in zip(merged, merged[1:] + [("", None)]) if not _modifies(item[0], *nxt)]
        if any(node == "toilet" for _, node in kept):
            kept = [item for item in kept if item[0] != "seat"]
        return [(word, node) for word, node in kept if node is not None], [word for word, _ in merged]

    def __call__(self, caption: str) -> list[Mention]:
        """All object mentions in ``caption``, in order and with repeats."""
        return [Mention(w, n) for w, n in self.extract(caption)[0]]

    def _merge(self, words: list[str]) -> list[tuple[str, str | None]]:
        """Greedy longest-first phrase matching; unknown words stay, with node None."""
        merged: list[tuple[str, str | None]] = []
        i = 0
        while i < len(words):
            for size in range(min(self._longest, len(words) - i), 0, -1):
                key = tuple(words[i : i + size])
                if size == 1 or key in self._phrases:
                    merged.append((" ".join(key), self._phrases.get(key)))
                    i += size
                    break
        return merged


def _modifies(word: str, next_word: str, next_node: str | None) -> bool:
    """Whether ``word`` is a modifier ("baby", "passenger") of the next item, not an object."""
    if word not in _MODIFIERS:
        return False
    nodes, words = _MODIFIERS[word]
    return next_node in nodes or next_word in words


def make_extractor(mode: str = DEFAULT_MODE, singularizer: str | None = None,
                   synonyms: SynonymTable | None = None, tagger: str | None = None) -> Any:
    """The extractor of a CHAIR mode (``"opera"``, ``"original"`` or ``"lvlm-fix"``).

    Args:
        mode: see the module docstring.
        singularizer: original mode only: ``"pattern"`` (default) or ``"inflect"``.
        synonyms: lvlm-fix mode only: another synonym table.
        tagger: opera mode only: ``"perceptron"`` (NLTK's, needs its data), ``"noun"`` (every token a
            noun) or None (the perceptron where installed, else the noun fallback with a warning).
    """
    from ..errors import ConfigError

    if tagger is not None and mode != "opera":
        raise ConfigError(f"--chair-tagger {tagger} applies to --chair-mode opera only; {mode} mode tags nothing")
    if singularizer is not None and mode == "opera":
        raise ConfigError(f"--chair-singularizer {singularizer} applies to --chair-mode original only; opera mode "
                          "lemmatises with WordNet")
    if synonyms is not None and mode != "lvlm-fix":
        raise ConfigError(f"--chair-mode {mode} uses the original synonym file; a custom table needs lvlm-fix mode")
    if mode == "opera":
        from .chair_opera import OperaExtractor

        return OperaExtractor(tagger)
    if mode == "original":
        from .chair_original import OriginalExtractor

        return OriginalExtractor(singularizer or "pattern")
    if mode == "lvlm-fix":
        if singularizer not in (None, "inflect"):
            raise ConfigError(f"--chair-singularizer {singularizer} applies to --chair-mode original only; "
                              "lvlm-fix mode always uses inflect with vocabulary words protected")
        return ObjectExtractor(synonyms)
    raise UnknownNameError("CHAIR mode", mode, MODES)


@functools.cache
def _extractor(mode: str, singularizer: str | None, tagger: str | None) -> Any:
    return make_extractor(mode, singularizer, tagger=tagger)


def caption_to_objects(caption: str, mode: str = DEFAULT_MODE, singularizer: str | None = None,
                       tagger: str | None = None) -> list[Mention]:
    """Object mentions of a caption in a CHAIR mode, in order and with repeats."""
    return [Mention(w, n) for w, n in _extractor(mode, singularizer, tagger).extract(caption)[0]]


# ---- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionDetail:
    """Per-caption CHAIR breakdown. Object lists hold node words (COCO category names), in caption
    order with repeats; ``words`` are the matched caption words; ``gt`` is sorted."""

    image_id: int
    caption: str
    mentioned: list[str]
    words: list[str]
    hallucinated: list[str]
    gt: list[str]
    n_words: int
    n_tokens: int

    @property
    def covered(self) -> int:
        """Distinct mentioned objects that are in the ground truth (recall numerator)."""
        return len(set(self.mentioned).intersection(self.gt))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CaptionDetail:
        """Back from a stored per-sample record (``samples.jsonl``)."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


COUNT_COLUMNS = ("hallucinated_caption", "hallucinated", "mentions", "covered", "gt")
"""Columns of :meth:`ChairResult.counts`, the per-caption input of :data:`STATS`."""


@dataclass(frozen=True)
class ChairResult:
    """CHAIR summary (fractions) with per-caption details.

    ``chair_i_defined`` is False when no caption mentions any object; CHAIR_I is then reported
    as 0.0 (and a ``RuntimeWarning`` is issued) instead of dividing by zero. ``settings`` names
    the mode, singulariser (with version) and synonym table (with sha256).
    """

    chair_s: float
    chair_i: float
    recall: float
    mean_length: float
    mean_tokens: float
    n: int
    n_mentions: int
    n_hallucinated: int
    chair_i_defined: bool
    settings: dict[str, str]
    details: list[CaptionDetail] = field(repr=False)

    @classmethod
    def from_details(cls, details: Sequence[CaptionDetail], settings: dict[str, str]) -> ChairResult:
        """Pool per-caption details into the metrics of the module docstring."""
        n = len(details)
        n_mentions = sum(len(d.mentioned) for d in details)
        n_hallucinated = sum(len(d.hallucinated) for d in details)
        n_gt = sum(len(d.gt) for d in details)
        if n_mentions == 0:
            warnings.warn("CHAIR_I is undefined: no caption mentions a COCO object; reporting 0.0 with "
                          "chair_i_defined=False", RuntimeWarning, stacklevel=3)
        return cls(
            chair_s=sum(bool(d.hallucinated) for d in details) / n if n else 0.0,
            chair_i=n_hallucinated / n_mentions if n_mentions else 0.0,
            recall=sum(d.covered for d in details) / n_gt if n_gt else 0.0,
            mean_length=sum(d.n_words for d in details) / n if n else 0.0,
            mean_tokens=sum(d.n_tokens for d in details) / n if n else 0.0,
            n=n, n_mentions=n_mentions, n_hallucinated=n_hallucinated, chair_i_defined=n_mentions > 0,
            settings=dict(settings), details=list(details),
        )

    def as_dict(self, include_details: bool = True) -> dict[str, Any]:
        """The summary as a plain dict (JSON-ready)."""
        out = asdict(self)
        if not include_details:
            del out["details"]
        return out

    def counts(self) -> np.ndarray:
        """Per-caption integer counts, shape ``(n, 5)``, columns :data:`COUNT_COLUMNS`."""
        return caption_counts(self.details)


def caption_counts(details: Sequence[CaptionDetail]) -> np.ndarray:
    """Per-caption integer counts, shape ``(n, 5)``, columns :data:`COUNT_COLUMNS`."""
    rows = [[bool(d.hallucinated), len(d.hallucinated), len(d.mentioned), d.covered, len(d.gt)] for d in details]
    return np.array(rows, dtype=np.int64).reshape(-1, len(COUNT_COLUMNS))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


STATS = {
    "chair_s": lambda c: _safe_div(c[..., 0].sum(axis=-1), c.shape[-2]),
    "chair_i": lambda c: _safe_div(c[..., 1].sum(axis=-1), c[..., 2].sum(axis=-1)),
    "recall": lambda c: _safe_div(c[..., 3].sum(axis=-1), c[..., 4].sum(axis=-1)),
}
"""Metric functions over :meth:`ChairResult.counts` arrays shaped ``(..., n, 5)``, for
:mod:`lvlm_fix.evals.stats` (works per replicate and with ``batched=True``)."""


class ChairEvaluator:
    """Scores captions of COCO images against their ground-truth object sets.

    Ground truth for an image is computed on first use and cached, so building an evaluator
    for all of COCO val2014 costs only the JSON parsing.
    """

    def __init__(
        self,
        instance_objects: Mapping[int, Iterable[str]],
        reference_captions: Mapping[int, Sequence[str]],
        *,
        image_ids: Sequence[int] | None = None,
        file_names: Mapping[int, str] | None = None,
        mode: str = DEFAULT_MODE,
        singularizer: str | None = None,
        synonyms: SynonymTable | None = None,
        tagger: str | None = None,
    ) -> None:
        """Build from already-parsed annotations.

        Args:
            instance_objects: Image id -> node words of its instance annotations.
            reference_captions: Image id -> its ground-truth captions.
            image_ids: Known image ids in COCO order (the sampling pool); defaults to the
                caption images followed by instance-only images.
            file_names: Image id -> image file name.
            mode: ``"opera"``, ``"original"`` or ``"lvlm-fix"`` (module docstring).
            singularizer: original mode: ``"pattern"`` (default) or ``"inflect"``.
            synonyms: lvlm-fix mode: a vocabulary other than the packaged one.
            tagger: opera mode: ``"perceptron"``, ``"noun"`` or None (:func:`make_extractor`).

        Raises:
            DataError: If an instance object is not a node word of the vocabulary.
            ConfigError: For a mode / singulariser / tagger combination that does not exist.
        """
        self.extractor = make_extractor(mode, singularizer, synonyms, tagger)
        self.settings: dict[str, str] = self.extractor.describe()
        nodes = set(self.extractor.nodes)
        self._instances = {int(k): frozenset(v) for k, v in instance_objects.items()}
        for image_id, objects in self._instances.items():
            unknown = sorted(objects - nodes)
            if unknown:
                raise DataError(
                    f"image {image_id} has instance objects {unknown} that are not node words of "
                    "the synonym table; map categories through ChairEvaluator.from_coco"
                )
        self._captions = {int(k): list(v) for k, v in reference_captions.items()}
        if image_ids is None:
            image_ids = list(dict.fromkeys([*self._captions, *self._instances]))
        self.image_ids: tuple[int, ...] = tuple(int(i) for i in image_ids)
        self.file_names: dict[int, str] = {int(k): v for k, v in (file_names or {}).items()}
        self._gt: dict[int, frozenset[str]] = {}

    @classmethod
    def from_coco(
        cls,
        instances_paths: str | PathLike[str] | Sequence[str | PathLike[str]],
        captions_paths: str | PathLike[str] | Sequence[str | PathLike[str]],
        *,
        mode: str = DEFAULT_MODE,
        singularizer: str | None = None,
        synonyms: SynonymTable | None = None,
        tagger: str | None = None,
    ) -> ChairEvaluator:
        """Build from COCO ``instances_*.json`` and ``captions_*.json`` files.

        Several files of each kind are merged (the original CHAIR concatenates train2014 and
        val2014; val2014 alone suffices for val images, as ids do not overlap). The image order,
        used for sampling, is that of the ``images`` lists of the caption files, as in
        ``pycocotools.COCO(captions).getImgIds()``. Instance categories map to node words through
        the mode's synonym table.

        Raises:
            DataError: Naming a missing or malformed file, or a category that is not in the
                vocabulary.
        """
        extractor = make_extractor(mode, singularizer, synonyms, tagger)
        instance_objects: dict[int, set[str]] = {}
        for path in _as_paths(instances_paths):
            data = _read_coco_json(path, "instances", ("categories", "annotations"))
            with _malformed_entry(path, "instances"):
                _add_instances(data, extractor, instance_objects, path)
        captions: dict[int, list[str]] = {}
        file_names: dict[int, str] = {}
        for path in _as_paths(captions_paths):
            data = _read_coco_json(path, "captions", ("images", "annotations"))
            with _malformed_entry(path, "captions"):
                for image in data["images"]:
                    captions.setdefault(int(image["id"]), [])
                    file_names[int(image["id"])] = str(image["file_name"])
                for ann in data["annotations"]:
                    captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        return cls(instance_objects, captions, file_names=file_names, mode=mode, singularizer=singularizer,
                   synonyms=synonyms, tagger=tagger)

    @classmethod
    def from_ground_truth(
        cls, path: str | PathLike[str], *, mode: str = DEFAULT_MODE, singularizer: str | None = None,
        synonyms: SynonymTable | None = None, tagger: str | None = None,
    ) -> ChairEvaluator:
        """Build from a JSON file ``{"<image id>": [node word, ...], ...}``: each image's ground-truth
        objects as a CHAIR scorer's cache holds them (OPERA's ``chair.pkl``, converted to JSON by
        ``tools/chair_released.py``), used as they are: no reference caption is re-read.

        Raises:
            DataError: Naming a missing or malformed file, or an object that is not a node word.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(f"CHAIR ground-truth file not found: {p}; pass a JSON object of image id -> objects")
        try:
            data = json.loads(p.read_text("utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{p} is not valid JSON ({err.msg} at line {err.lineno}); pass a JSON object of "
                            "image id -> objects") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(o, str) for o in v)
                                                 for v in data.values()):
            raise DataError(f"{p} must be a JSON object of image id -> list of object names, e.g. "
                            '{"397133": ["person", "dog"]}')
        bad = next((k for k in data if not k.strip().isdigit()), None)
        if bad is not None:
            raise DataError(f"{p}: key {bad!r} is not an integer COCO image id; key each image by its id")
        objects = {int(k): v for k, v in data.items()}
        try:
            return cls(objects, {}, mode=mode, singularizer=singularizer, synonyms=synonyms, tagger=tagger)
        except DataError as err:
            raise DataError(f"{p}: {err}") from None

    def caption_objects(self, caption: str) -> list[Mention]:
        """Object mentions of a caption under this evaluator's mode."""
        return [Mention(w, n) for w, n in self.extractor.extract(caption)[0]]

    def has_image(self, image_id: int) -> bool:
        """Whether the loaded annotations know this image."""
        return int(image_id) in self._instances or int(image_id) in self._captions

    def gt_objects(self, image_id: int) -> frozenset[str]:
        """Node words present in an image: instance categories plus reference-caption objects.

        Raises:
            DataError: If the image is in neither annotation source.
        """
        image_id = int(image_id)
        if image_id not in self._gt:
            if not self.has_image(image_id):
                raise DataError(
                    f"image_id {image_id} is not in the loaded COCO annotations; evaluate only "
                    "images of the annotation files given to ChairEvaluator.from_coco"
                )
            objects = set(self._instances.get(image_id, ()))
            for caption in self._captions.get(image_id, ()):
                objects.update(n for _, n in self.extractor.extract(caption)[0])
            self._gt[image_id] = frozenset(objects)
        return self._gt[image_id]

    def score(self, image_id: int, caption: str) -> CaptionDetail:
        """The CHAIR breakdown of one caption of one image."""
        gt = self.gt_objects(image_id)
        mentions, tokens = self.extractor.extract(caption)
        return CaptionDetail(
            image_id=int(image_id),
            caption=caption,
            mentioned=[n for _, n in mentions],
            words=[w for w, _ in mentions],
            hallucinated=[n for _, n in mentions if n not in gt],
            gt=sorted(gt),
            n_words=len(caption.split()),
            n_tokens=len(tokens),
        )

    def evaluate(self, records: Iterable[Mapping[str, Any]]) -> ChairResult:
        """Score generated captions.

        Args:
            records: Mappings with ``"image_id"`` (int or digit string) and ``"caption"``.

        Returns:
            A :class:`ChairResult`; see the module docstring for the definitions.

        Raises:
            DataError: If a record lacks a key, its caption is not a string, or its image has
                no ground truth.
        """
        return ChairResult.from_details([self._detail(i, r) for i, r in enumerate(records)], self.settings)

    def _detail(self, index: int, record: Mapping[str, Any]) -> CaptionDetail:
        for key in ("image_id", "caption"):
            if key not in record:
                raise DataError(
                    f"CHAIR record {index} has no {key!r} key; pass {{'image_id', 'caption'}} mappings"
                )
        caption = record["caption"]
        if not isinstance(caption, str):
            raise DataError(f"CHAIR record {index} has caption {caption!r}; captions must be strings")
        try:
            image_id = int(record["image_id"])
        except (TypeError, ValueError):
            raise DataError(
                f"CHAIR record {index} has image_id {record['image_id']!r}; "
                "use the integer COCO image id"
            ) from None
        return self.score(image_id, caption)


def _add_instances(data: Mapping[str, Any], extractor: Any, out: dict[int, set[str]], path: Path) -> None:
    """Add each image's instance categories, as node words of the extractor's table, to ``out``."""
    node_of_category: dict[int, str] = {}
    for cat in data["categories"]:
        try:
            node_of_category[int(cat["id"])] = extractor.category(str(cat["name"]))
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
    for image in data.get("images", []):
        out.setdefault(int(image["id"]), set())  # images without objects still have a GT
    for ann in data["annotations"]:
        out.setdefault(int(ann["image_id"]), set()).add(node_of_category[int(ann["category_id"])])


@contextlib.contextmanager
def _malformed_entry(path: Path, kind: str) -> Iterator[None]:
    """Turn a missing field or bad value inside a COCO file into a one-line DataError."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{path}: malformed COCO {kind} entry ({type(err).__name__}: {err}); "
            f"pass an unmodified COCO {kind}_*.json file"
        ) from None


def _as_paths(paths: str | PathLike[str] | Sequence[str | PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _read_coco_json(path: Path, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(
            f"COCO {kind} file not found: {path}; download annotations_trainval2014.zip from "
            "cocodataset.org and point to its annotations/ folder"
        )
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); re-download it"
        ) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path} lacks {missing}; pass a COCO {kind}_*.json file")
    return data


def sample_chair_image_ids(
    coco_image_ids: Sequence[int], n: int = DEFAULT_NUM_IMAGES, seed: int = 0
) -> list[int]:
    """Draw the CHAIR image subset the way the VHR scripts do.

    Equivalent to ``random.seed(seed); random.sample(ids, n)`` but on a private
    ``random.Random(seed)`` (the same stream, without touching the global generator). Pass the
    ids in ``COCO(captions_val2014).getImgIds()`` order (:attr:`ChairEvaluator.image_ids`), since
    the draw depends on the order.

    Args:
        coco_image_ids: The pool, in COCO order.
        n: How many images to draw.
        seed: The seed; the VHR protocol averages 5 seeds.

    Returns:
        ``n`` distinct image ids in draw order.

    Raises:
        DataError: If the pool has fewer than ``n`` images.
    """
    pool = list(coco_image_ids)
    if not 0 <= n <= len(pool):
        raise DataError(
            f"cannot sample n={n} images from a pool of {len(pool)}; lower n or load more annotations"
        )
    return random.Random(seed).sample(pool, n)
