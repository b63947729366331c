"""WordNet 3.0's morphology, exactly as NLTK's ``WordNetLemmatizer().lemmatize(word, pos)`` applies it.

AMBER's ``inference.py`` and OPERA's ``chair.py`` lemmatise with NLTK's WordNet lemmatiser, which reads
the ``wordnet`` corpus that NLTK's downloader fetches. This module gives the same answers from data
shipped with lvlm-fix, so no download is needed. For a word and a part of speech (``n``, ``v``, ``a``,
``r``; ``s``, the satellite adjective, behaves as ``a``), as ``WordNetCorpusReader._morphy`` does in
NLTK 3.9 and later:

1. if the word is in that part of speech's exception list (``noun.exc`` ...), the candidates are the
   word and its listed base forms, and no rule is tried (``mice -> mouse``, ``men -> man``);
2. otherwise the candidates are the word and each detachment rule of :data:`RULES` applied once, in
   rule order (nouns: ``-s``, ``-ses -> -s``, ``-ves -> -f``, ``-xes``, ``-zes``, ``-ches``, ``-shes``,
   ``-men -> -man``, ``-ies -> -y``);
3. the candidates that are lemmas of that part of speech in WordNet's index are kept, in order, once
   each (:func:`morphy`).

:func:`lemmatize` returns the shortest kept candidate (the first among equals, as Python's ``min``),
or the word unchanged when none is kept. Nothing is lower-cased: ``Dogs`` stays ``Dogs``, as in NLTK.
Consequences worth knowing: ``men -> men`` (``men`` is itself a noun lemma, as long as ``man``),
``vases -> vas``, ``glasses -> glass``, ``us -> u``, ``leaves -> leaf`` but ``leaves -> leave`` as a verb.

NLTK before 3.9 had one more step: when step 3 keeps nothing and the word had no exception entry,
the rules are applied again to the candidates, pass after pass, until a pass finds a lemma
(``catss -> cat`` there, ``catss`` since 3.9). ``repeat_rules=True`` reproduces it; the papers'
scripts of 2023 ran on such an NLTK, so the two differ only on words no index lemma is one rule away
from (typing slips, mostly).

Data (``resources/wordnet-3.0-morphy.txt.gz``, 0.68 MB; provenance and checksums in the ``.json``
beside it, WordNet's licence in ``wordnet-3.0-LICENSE.txt``): the lemma names of WordNet 3.0's
``index.noun``, ``index.verb``, ``index.adj`` and ``index.adv`` (the first field of each line;
117,798 + 11,529 + 21,479 + 4,481) and the four exception lists, verbatim, from Debian's
``wordnet-base`` 1:3.0-37 (Princeton's WordNet 3.0 database). The whole index is shipped because a
word's lemma depends on whether the word itself and each of its candidates is a lemma: a subset
would make the answer exact only on a word list chosen in advance, and CHAIR's OPERA mode
lemmatises every caption token under four parts of speech.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from importlib import resources

from ..errors import ConfigError

VERSION = "WordNet 3.0, lemmatised as NLTK >= 3.9's WordNetLemmatizer (lvlm-fix's shipped copy)"
DATA_FILE = "wordnet-3.0-morphy.txt.gz"

RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
"""WordNet's detachment rules (suffix, replacement) per part of speech, in NLTK's order (the order
decides which of two equally long lemmas wins)."""

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb", "s": "satellite adjective"}


def _pos(pos: str) -> str:
    if pos not in POS_NAMES:
        raise ConfigError(f"WordNet part of speech {pos!r} is not one of n, v, a, r, s "
                          "(noun, verb, adjective, adverb, satellite adjective)")
    return "a" if pos == "s" else pos  # NLTK gives satellites the adjective rules, exceptions and index


@functools.cache
def _raw() -> bytes:
    return resources.files("lvlm_fix.evals").joinpath("resources", DATA_FILE).read_bytes()


@functools.cache
def _data() -> tuple[dict[str, frozenset[str]], dict[str, dict[str, tuple[str, ...]]]]:
    """``(lemmas per part of speech, exceptions per part of speech: form -> base forms)``.

    The file has ``#`` comment lines, then sections opened by ``@index <pos>`` (one lemma a line)
    and ``@exc <pos>`` (``form base...`` lines in the ``.exc`` file's order; a form listed twice
    keeps its last line, as NLTK's dictionary does)."""
    lemmas: dict[str, set[str]] = {}
    exceptions: dict[str, dict[str, tuple[str, ...]]] = {}
    kind, pos = "", ""
    for line in gzip.decompress(_raw()).decode("ascii").splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("@"):
            kind, pos = line[1:].split()
            (lemmas if kind == "index" else exceptions).setdefault(pos, set() if kind == "index" else {})
        elif kind == "index":
            lemmas[pos].add(line)
        else:
            form, *bases = line.split()
            exceptions[pos][form] = tuple(bases)
    return {p: frozenset(s) for p, s in lemmas.items()}, exceptions


def _detach(forms: list[str], rules: tuple[tuple[str, str], ...]) -> list[str]:
    return [form[: len(form) - len(old)] + new for form in forms for old, new in rules if form.endswith(old)]


def morphy(word: str, pos: str = "n", *, repeat_rules: bool = False) -> list[str]:
    """Every WordNet lemma ``word`` may be a form of, in NLTK's order (``WordNetLemmatizer()._morphy``);
    ``repeat_rules`` adds NLTK < 3.9's repeated passes (module docstring)."""
    pos = _pos(pos)
    index, exceptions = _data()
    lemmas = index[pos]

    def kept(forms: list[str]) -> list[str]:
        return list(dict.fromkeys(f for f in forms if f in lemmas))

    if word in exceptions[pos]:
        return kept([word, *exceptions[pos][word]])
    forms = _detach([word], RULES[pos])
    found = kept([word, *forms])
    while repeat_rules and not found and forms:
        # Each pass only shortens words, so this ends; duplicates are dropped (same result, no blow-up).
        forms = list(dict.fromkeys(_detach(forms, RULES[pos])))
        found = kept(forms)
    return found


@functools.lru_cache(maxsize=1 << 17)
def lemmatize(word: str, pos: str = "n", *, repeat_rules: bool = False) -> str:
    """``nltk.stem.WordNetLemmatizer().lemmatize(word, pos)`` on WordNet 3.0: the shortest lemma of
    :func:`morphy`, else ``word`` itself."""
    found = morphy(word, pos, repeat_rules=repeat_rules)
    return min(found, key=len) if found else word


def describe() -> dict[str, str]:
    """What a result must name: the WordNet version and rules, and the shipped data's sha256."""
    return {"lemmatizer": VERSION, "wordnet_data": DATA_FILE, "wordnet_sha256": hashlib.sha256(_raw()).hexdigest()}
