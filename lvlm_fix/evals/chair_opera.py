"""OPERA's CHAIR object extraction (``--chair-mode opera``, the default), rule for rule.

This is the scorer behind the CHAIR numbers of OPERA, PAI, HALC, PAINT, ONLY, the middle-layers
paper ("Devils in Middle Layers") and the VCD-family follow-ups: shikiw/OPERA
``chair.py`` (Maxlinn's standalone CHAIR), a copy of the original LisaAnne/Hallucination scorer
(:mod:`.chair_original`) whose plural stripping (pattern's ``singularize`` on every token) is
replaced by a part-of-speech tagger plus WordNet's lemmatiser. For one caption:

1. lower-case it and tokenise it as ``nltk.word_tokenize`` does (:func:`.chair_original.word_tokenize`:
   the same tokenizer and the same untrained-punkt divergence as original mode);
2. tag the tokens, lower-cased, with NLTK's averaged perceptron tagger (what ``nltk.pos_tag`` runs);
3. lemmatise each token with WordNet 3.0's morphology as nltk 3.8.1 (OPERA's pin) applies it
   (``WordNetLemmatizer().lemmatize(token, pos)``; :mod:`.wordnet` with ``repeat_rules=True``: a
   token no lemma is one rule away from gets the rules again) for the part of speech of its tag: ``J*`` adjective, ``V*`` verb,
   ``N*`` noun, ``R*`` adverb, any other tag (punctuation, determiners, ...) noun. So ``bus``
   stays ``bus`` and ``ties`` becomes ``tie`` (both lost in original mode), ``men`` stays ``men``
   (no COCO word: WordNet lists "men" as a noun of its own), ``vases`` becomes ``vas``, a verb
   ``skiing`` becomes ``ski`` (COCO's skis) and a verb ``seated`` becomes ``seat`` (a chair);
4. merge two-word terms greedily left to right and drop ``seat`` when the caption has ``toilet``,
   with the original's table (:func:`.chair_original.double_words`);
5. keep the items that are exactly a synonym string of the synonym list (OPERA embeds the
   original ``synonyms.txt``; parsed the same way it is the packaged original file, so its
   quirks stay: `` motor bike`` and `` cheesecake`` never count, nor ``iPhone``).

Every mention is counted (a caption naming a dog twice has two dog mentions), as in OPERA.

**The tagger.** NLTK's perceptron tagger is downloaded data (``python -m nltk.downloader
averaged_perceptron_tagger_eng``; nltk < 3.9: ``averaged_perceptron_tagger``). Where it is not
installed the extractor falls back, with a warning, on tagging **every token a noun** (tagger
``noun``): step 3 then lemmatises every token as a noun. Checked on two repositories' released
LLaVA-1.5 captions scored by OPERA's code with the real tagger (1,000 captions), the fallback
gives the same hallucinated objects on every caption; what it loses is recall: a verb whose lemma
is a COCO word (``skiing``, ``seated``, ``tied``, ``skateboarding``) is not lemmatised to it, so
28 of the 1,000 captions miss a correctly mentioned object (and 6 gain one the tagger read as no
noun), recall 0.4-0.5 points lower. The tagger
that ran is named in every result (``tagger``), with the WordNet data (``singularizer_version``).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from importlib import metadata
from typing import Any

from ..errors import ConfigError, DataError, LvlmFixWarning
from ..extras import require
from .chair_original import SYNONYMS_FILE, double_words, synonym_table, synonyms_text, word_tokenize

TAGGERS = ("perceptron", "noun")
"""``perceptron``: NLTK's ``pos_tag`` (needs its data); ``noun``: every token a noun (the fallback)."""

INSTALL_TAGGER = "python -m nltk.downloader averaged_perceptron_tagger_eng"

# Penn Treebank tag initial -> WordNet part of speech, as OPERA's get_wordnet_pos; any other tag
# is lemmatised as a noun.
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}


def _nltk_version() -> str:
    try:
        return metadata.version("nltk")
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def _perceptron() -> Any:
    """NLTK's English perceptron tagger, loaded once: what ``nltk.pos_tag(tokens)`` tags with (nltk
    < 3.9 reloads the model on every call)."""
    return require("nltk.tag", "NLTK's perceptron tagger").PerceptronTagger()


@functools.cache
def perceptron_available() -> bool:
    """Whether NLTK's perceptron tagger can run here (its data is installed where nltk looks)."""
    try:
        _perceptron().tag(["dog"])
    except (LookupError, OSError, ImportError, ValueError):
        return False
    return True


def resolve_tagger(tagger: str | None, flag: str, who: str, fallback: str) -> str:
    """``tagger`` checked: ``perceptron`` (needs NLTK's data) or ``noun``; None takes the perceptron where its
    data is installed, else the noun fallback with a warning (``who``: NLTK's perceptron tagger is not
    installed, so every token is ``fallback``). ``flag`` is the option that sets it, for the messages.

    Raises:
        MissingExtraError: nltk is not installed (``who`` tokenises with it whatever the tagger).
    """
    # Before the tagger's own check, which would read a missing nltk as missing tagger data.
    require("nltk", who)
    if tagger is None:
        if perceptron_available():
            return "perceptron"
        warnings.warn(f"{who}: NLTK's perceptron tagger is not installed, so every token is {fallback}; install it "
                      f"with `{INSTALL_TAGGER}`, or pass {flag} noun to silence this", LvlmFixWarning, stacklevel=3)
        return "noun"
    if tagger not in TAGGERS:
        raise ConfigError(f"{flag} {tagger!r} is not one of {', '.join(TAGGERS)}")
    if tagger == "perceptron" and not perceptron_available():
        raise ConfigError(f"{flag} perceptron needs NLTK's tagger data, which is not installed; run "
                          f"`{INSTALL_TAGGER}`, or use {flag} noun")
    return tagger


def pos_tags(tokens: list[str]) -> list[str]:
    """Penn Treebank tags of ``tokens`` from NLTK's perceptron tagger, as ``nltk.pos_tag`` gives them."""
    return [tag for _, tag in _perceptron().tag(tokens)] if tokens else []


@functools.cache
def _wordnet() -> Any:
    from . import wordnet

    return wordnet


@functools.lru_cache(maxsize=1 << 16)
def _lemma(token: str, pos: str) -> str:
    # OPERA (and the repositories that copy its scorer) pin nltk 3.8.1, whose morphy repeats the
    # detachment rules when one pass finds no lemma; nltk >= 3.9 stops after one pass.
    return str(_wordnet().lemmatize(token, pos, repeat_rules=True))


def wordnet_pos(tag: str) -> str:
    """The WordNet part of speech OPERA lemmatises a token of Penn Treebank ``tag`` as."""
    return _WORDNET_POS.get(tag[:1], "n")


class OperaExtractor:
    """Caption -> COCO object mentions with OPERA's rules (module docstring)."""

    mode = "opera"

    def __init__(self, tagger: str | None = None) -> None:
        """Args:
            tagger: ``"perceptron"``, ``"noun"``, or None: the perceptron tagger where its data is
                installed, else the noun fallback with a warning.

        Raises:
            ConfigError: For an unknown tagger, or ``"perceptron"`` without its data.
        """
        tagger = resolve_tagger(tagger, "--chair-tagger", "CHAIR opera mode", "tagged a noun (same hallucinated "
                                "objects, lower recall than OPERA's)")
        self.tagger = tagger
        self.node_of, self.nodes = synonym_table()
        self._double = double_words()

    def describe(self) -> dict[str, str]:
        """What a result must name: mode, tagger, WordNet data, tokenizer, synonym file and sha256."""
        tagger = (f"nltk {_nltk_version()} averaged perceptron (pos_tag)" if self.tagger == "perceptron"
                  else "none: every token a noun (fallback)")
        wordnet = _wordnet().describe()
        return {"chair_mode": self.mode, "singularizer": "wordnet",
                "singularizer_version": "WordNet 3.0 morphy as nltk 3.8.1 applies it (rules repeated), lvlm-fix's "
                                        f"shipped copy ({wordnet['wordnet_data']})",
                "wordnet_sha256": wordnet["wordnet_sha256"], "tagger": tagger,
                "tokenizer": f"nltk {_nltk_version()} NLTKWordTokenizer on untrained punkt sentences",
                "synonyms": SYNONYMS_FILE, "synonyms_sha256": hashlib.sha256(synonyms_text()).hexdigest()}

    def category(self, name: str) -> str:
        """The node word of a COCO category name from an instances file."""
        if name not in self.node_of:
            raise DataError(f"COCO category {name!r} is not in the CHAIR synonym table; use COCO 2014/2017 "
                            "instance files")
        return self.node_of[name]

    def tags(self, tokens: list[str]) -> list[str]:
        """Penn Treebank tags of the tokens (all ``NN`` with the noun fallback)."""
        return ["NN"] * len(tokens) if self.tagger == "noun" else pos_tags(tokens)

    def lemmas(self, caption: str) -> list[str]:
        """Steps 1-3 of the module docstring: the caption's tokens, lemmatised by tag."""
        tokens = word_tokenize(caption.lower())
        return [_lemma(token, wordnet_pos(tag)) for token, tag in zip(tokens, self.tags(tokens))]

    def extract(self, caption: str) -> tuple[list[tuple[str, str]], list[str]]:
        """``([(matched word, category), ...] in caption order, merged tokens)``."""
        words = self.lemmas(caption)
        merged: list[str] = []
        i = 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            step = 2 if pair in self._double else 1
            merged.append(self._double[pair] if step == 2 else words[i])
            i += step
        kept = [w for w in merged if w != "seat"] if "toilet" in merged and "seat" in merged else merged
        return [(w, self.node_of[w]) for w in kept if w in self.node_of], merged
