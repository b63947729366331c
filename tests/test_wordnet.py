"""lvlm-fix's WordNet morphology against the real NLTK on WordNet 3.0, word by word.

``wordnet_lemmas.tsv`` was written by ``tests/wordnet_dev.py`` from NLTK 3.10.4 and NLTK 3.8.1 running on
WordNet 3.0 (not from this code): every word of AMBER's vocabulary and of CHAIR's synonym table with
its one-rule inflections and exception forms, under the four parts of speech."""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from lvlm_fix.errors import ConfigError
from lvlm_fix.evals import wordnet

POS = ("n", "v", "a", "r")


def _table() -> list[tuple[str, list[str], list[str]]]:
    """``(form, lemma per pos under NLTK >= 3.9, lemma per pos under NLTK 3.8.1)`` (file format in its header)."""
    rows = []
    for line in (Path(__file__).parent / "wordnet_lemmas.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        form, *cells = line.split("\t")
        cells += [""] * (len(POS) - len(cells))
        new, old = [], []
        for cell in cells:
            now, _, was = cell.partition("|")
            new.append(now or form)
            old.append(was or now or form)
        rows.append((form, new, old))
    return rows


TABLE = _table()


def test_table_covers_the_forms_that_matter() -> None:
    forms = {form for form, _, _ in TABLE}
    assert len(TABLE) > 8000 and {"men", "vases", "sunglasses", "chopsticks", "TV", "dogss", "skiing"} <= forms


@pytest.mark.parametrize("pos", POS)
def test_every_form_as_nltk(pos: str) -> None:
    k = POS.index(pos)
    bad = [(form, wordnet.lemmatize(form, pos), new[k]) for form, new, _ in TABLE
           if wordnet.lemmatize(form, pos) != new[k]]
    assert bad == []
    legacy = [(form, old[k]) for form, _, old in TABLE if wordnet.lemmatize(form, pos, repeat_rules=True) != old[k]]
    assert legacy == []


def test_the_forms_that_made_amber_differ() -> None:
    """The issue's list, each with the rule that decides it (the old AMBER lemmatiser got all of these wrong)."""
    assert wordnet.lemmatize("men") == "men"  # exception men -> man, but men is a noun lemma too, as long
    assert wordnet.lemmatize("vases") == "vas"  # vase and vas are both lemmas: the shorter wins
    assert wordnet.lemmatize("leaves") == "leaf" and wordnet.lemmatize("leaves", "v") == "leave"
    assert [wordnet.lemmatize(w) for w in ("potatoes", "tomatoes", "slippers", "earrings", "sunglasses",
                                           "chopsticks")] == ["potato", "tomato", "slipper", "earring", "sunglass",
                                                              "chopstick"]
    assert wordnet.lemmatize("us") == "u" and wordnet.lemmatize("Dogs") == "Dogs"  # no lower-casing
    assert wordnet.lemmatize("skiing", "v") == "ski" and wordnet.lemmatize("skiing") == "skiing"
    assert wordnet.lemmatize("catss") == "catss" and wordnet.lemmatize("catss", repeat_rules=True) == "cat"
    assert wordnet.morphy("glasses") == ["glasses", "glass"] and wordnet.lemmatize("glasses") == "glass"
    assert wordnet.lemmatize("greener", "s") == wordnet.lemmatize("greener", "a") == "green"


def test_bad_part_of_speech_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"part of speech 'x' is not one of n, v, a, r, s"):
        wordnet.lemmatize("dogs", "x")


def test_shipped_data_is_what_its_sidecar_says() -> None:
    folder = resources.files("lvlm_fix.evals").joinpath("resources")
    sidecar = json.loads(folder.joinpath("wordnet-3.0-morphy.json").read_text())
    assert hashlib.sha256(wordnet._raw()).hexdigest() == sidecar["sha256"] == wordnet.describe()["wordnet_sha256"]
    index, exceptions = wordnet._data()
    assert {p: len(s) for p, s in index.items()} == sidecar["lemmas"]
    assert {p: len(t) for p, t in exceptions.items()} == sidecar["exception_forms"]
    assert exceptions["n"]["aurar"] == ("eyrir",)  # listed twice in noun.exc: the later line wins, as in NLTK
    licence = folder.joinpath("wordnet-3.0-LICENSE.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert "# WordNet 3.0 Copyright 2006 by Princeton University" in gzip.decompress(wordnet._raw()).decode()[:3000]


DEBIAN = Path("/usr/share/wordnet")


@pytest.mark.skipif(not (DEBIAN / "index.noun").is_file(), reason="Debian's wordnet-base is not installed")
def test_data_rebuilds_from_debian_files() -> None:
    from wordnet_dev import build

    assert build(DEBIAN) == wordnet._raw()


def _nltk_wordnet() -> object | None:
    try:
        from nltk.corpus import wordnet as wn

        return wn if wn.get_version() == "3.0" else None
    except (LookupError, OSError, ImportError):
        return None


def test_against_installed_nltk() -> None:
    """Where NLTK's own WordNet 3.0 corpus is installed (never in CI: its downloader needs the network)."""
    wn = _nltk_wordnet()
    if wn is None:
        pytest.skip("NLTK's wordnet corpus (WordNet 3.0) is not installed")
    import nltk
    from nltk.stem import WordNetLemmatizer

    legacy = tuple(int(x) for x in nltk.__version__.split(".")[:2]) < (3, 9)
    lemmatizer = WordNetLemmatizer()
    bad = [(form, pos) for form, _, _ in TABLE for pos in POS
           if wordnet.lemmatize(form, pos, repeat_rules=legacy) != lemmatizer.lemmatize(form, pos)]
    assert bad == []
