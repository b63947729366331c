"""Original CHAIR object extraction (``--chair-mode original``), reproduced token for token.

This is the extractor of Rohrbach et al. (2018), LisaAnne/Hallucination ``utils/chair.py``, the
code OPERA, PAI and the VHR family build on. For one caption:

1. lower-case it and tokenise it the way ``nltk.word_tokenize`` does: sentences from punkt, then
   NLTK's Treebank-style word tokenizer per sentence (punctuation becomes tokens, only the
   sentence-final period is split off, ``isn't -> is n't``, hyphenated words stay one token);
2. singularise **every** token with pattern's ``singularize`` (:mod:`.pattern_singular`; so
   ``bus -> bu``, ``ties -> ty``, ``glass -> glas``), or with inflect (``--chair-singularizer
   inflect``, the VHR-family variant: ``singular_noun(w) or w``);
3. merge two-word terms greedily left to right (:func:`double_words`): identity terms such as
   ``fire hydrant``; ``baby``/``adult`` + animal -> the animal (``baby cub`` -> ``cub``, which is
   no COCO word); ``passenger jet``/``passenger train`` -> ``jet``/``train``; ``bow tie`` -> ``tie``;
   ``toilet seat`` -> ``toilet``; ``wine glas`` -> ``wine glass``;
4. if the merged list holds both ``toilet`` and ``seat``, drop every ``seat``;
5. keep the items that are exactly a synonym string of the packaged table
   (``resources/chair_synonyms_original.txt``, byte-identical to the original ``synonyms.txt``)
   and map each to its line's first entry, the COCO category name.

Quirks kept on purpose: ``motor bike`` and ``cheesecake`` never count (their table entries carry a
leading space), ``iPhone`` never counts (capital letter), ``stove top oven`` is three words and
never merges, ``tennis racket`` never merges (``tennis -> tenni``) but ``racket`` alone counts,
``train track`` and ``home plate`` merge into non-objects and so hide ``train``.

Which NLTK: the tokens are the installed NLTK's word tokenizer's, as the original scorer's are, so
the two agree when they run on the same NLTK; the check against the original scorer was made on
NLTK 3.10.4, and every result records the NLTK version (``tokenizer`` here, ``versions`` in the
provenance). NLTK's tokenizer has changed over the years, so a number the original printed under
another NLTK can differ on the same captions:

* before 3.10.1 an opening single quote inside a sentence stays on its word (``a 'dog'`` gives
  ``'dog``: no dog);
* before 3.9.3 an em or en dash between two words without spaces stays inside one token
  (``dog—cat``: no dog, no cat);
* 3.2.5, the original repository's pin, has both of the above and also keeps a quote that opens a
  sentence on its word (``'a``).

The one known divergence on the same NLTK: punkt here is untrained (NLTK's punkt model is
downloaded data), so it does not know abbreviations. ``mr. smith`` is split after ``mr.`` (the
original keeps ``mr.`` as one token); neither form is a COCO word, so object lists only differ when
such a period is directly followed by an object word that would have merged with the word before it.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources
from typing import Any

from ..errors import ConfigError, DataError
from ..extras import require
from .inflection import engine, inflect_singular
from .pattern_singular import VERSION as PATTERN_VERSION
from .pattern_singular import singularize as pattern_singularize

SYNONYMS_FILE = "chair_synonyms_original.txt"
SINGULARIZERS = ("pattern", "inflect")

IDENTITY_TERMS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLE_WORDS = ("jet", "train")


def double_words() -> dict[str, str]:
    """The two-word table: ``"w1 w2"`` (singularised tokens) -> the item that replaces them."""
    table = {term: term for term in IDENTITY_TERMS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return table


@functools.cache
def tokenizers() -> tuple[Any, Any]:
    """NLTK's untrained punkt sentence splitter and its word tokenizer. The extractors that tokenise
    with them call this when they are made, so that a missing nltk is refused before a run starts."""
    why = "CHAIR's and AMBER's word tokenizer"
    punkt, words = require("nltk.tokenize.punkt", why), require("nltk.tokenize", why)
    return punkt.PunktSentenceTokenizer(), words.NLTKWordTokenizer()


def tokenizer_description() -> str:
    """The tokenizer as results name it, with the installed NLTK's version (the tokens depend on it)."""
    return f"nltk {_version('nltk')} NLTKWordTokenizer on untrained punkt sentences"


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` without downloaded data: untrained punkt sentences, then NLTK's
    word tokenizer on each (see the module docstring for the abbreviation divergence)."""
    sentences, words = tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


@functools.cache
def synonyms_text() -> bytes:
    """The packaged original synonym file, as bytes."""
    return resources.files("lvlm_fix.evals").joinpath("resources", SYNONYMS_FILE).read_bytes()


@functools.cache
def synonym_table() -> tuple[dict[str, str], tuple[str, ...]]:
    """``(synonym -> category, categories)`` parsed exactly as the original does: each line
    stripped, split on ``", "``; every item maps to the line's first item; later lines win."""
    node_of: dict[str, str] = {}
    nodes = []
    for line in synonyms_text().decode("utf-8").splitlines(keepends=True):
        items = line.strip().split(", ")
        nodes.append(items[0])
        for item in items:
            node_of[item] = items[0]
    return node_of, tuple(nodes)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class OriginalExtractor:
    """Caption -> COCO object mentions with the original CHAIR's rules (module docstring)."""

    mode = "original"

    def __init__(self, singularizer: str = "pattern") -> None:
        if singularizer not in SINGULARIZERS:
            raise ConfigError(f"--chair-singularizer {singularizer!r} is not one of {', '.join(SINGULARIZERS)}")
        self.singularizer = singularizer
        self.node_of, self.nodes = synonym_table()
        self._double = double_words()
        # nltk (and inflect) checked now, not at the first caption of a run
        tokenizers()
        if singularizer == "pattern":
            self._singular = pattern_singularize
        else:
            engine()
            self._singular = inflect_singular

    def describe(self) -> dict[str, str]:
        """What a result must name: mode, singulariser and version, synonym file and sha256."""
        version = PATTERN_VERSION if self.singularizer == "pattern" else f"inflect {_version('inflect')}"
        return {"chair_mode": self.mode, "singularizer": self.singularizer, "singularizer_version": version,
                "tokenizer": tokenizer_description(),
                "synonyms": SYNONYMS_FILE, "synonyms_sha256": hashlib.sha256(synonyms_text()).hexdigest()}

    def category(self, name: str) -> str:
        """The node word of a COCO category name from an instances file."""
        if name not in self.node_of:
            raise DataError(f"COCO category {name!r} is not in the original CHAIR synonym table; "
                            "use COCO 2014/2017 instance files")
        return self.node_of[name]

    def extract(self, caption: str) -> tuple[list[tuple[str, str]], list[str]]:
        """``([(matched word, category), ...] in caption order, merged tokens)``."""
        tokens = [self._singular(t) for t in word_tokenize(caption.lower())]
        merged = []
        i = 0
        while i < len(tokens):
            pair = " ".join(tokens[i : i + 2])
            if pair in self._double:
                merged.append(self._double[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        kept = merged
        if "toilet" in kept and "seat" in kept:
            kept = [w for w in kept if w != "seat"]
        return [(w, self.node_of[w]) for w in kept if w in self.node_of], merged
