"""Development tool (not run by the suite): builds lvlm-fix's WordNet data and its test table.

    # the data file, from Debian's WordNet 3.0 files (apt-get download wordnet-base; dpkg -x ... root)
    python tests/wordnet_dev.py build root/usr/share/wordnet
    # the expected lemmas, from the real NLTK with the real WordNet 3.0 corpus (NLTK_DATA set); run it once
    # with NLTK >= 3.9 and once with NLTK 3.8.1 (--legacy), then merge
    python tests/wordnet_dev.py table AMBER/data/relation.json > new.tsv
    python tests/wordnet_dev.py table AMBER/data/relation.json --legacy > legacy.tsv
    python tests/wordnet_dev.py merge new.tsv legacy.tsv > tests/wordnet_lemmas.tsv
    # every lemma, exception form and one-rule inflection of WordNet, against the installed NLTK
    python tests/wordnet_dev.py check [--legacy]

NLTK's wordnet corpus can be assembled from the same Debian files: copy ``root/usr/share/wordnet/*``
and ``index.sense`` (package ``wordnet-sense-index``) into ``$NLTK_DATA/corpora/wordnet/`` and add the
``lexnames`` table of ``man 5 lexnames`` (``NN<TAB>name<TAB>pos-number``), which NLTK reads at start.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvlm_fix.evals import wordnet  # noqa: E402

FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS = tuple(FILES)
HEADER = """\
# lvlm-fix: WordNet 3.0 lemma names (first field of index.noun, index.verb, index.adj, index.adv)
# and exception lists (noun.exc, verb.exc, adj.exc, adv.exc, lines as in the files), taken from
# Debian's wordnet-base 1:3.0-37, which carries Princeton's WordNet 3.0 database. Read by
# lvlm_fix/evals/wordnet.py. Licence (WordNet 3.0), as it must appear on all copies:
#
"""


def build(source: Path) -> bytes:
    licence = (ROOT / "lvlm_fix/evals/resources/wordnet-3.0-LICENSE.txt").read_text().splitlines()
    out = [HEADER.rstrip("\n"), *(f"# {line}".rstrip() for line in licence)]
    for pos, name in FILES.items():
        out.append(f"@index {pos}")
        for line in (source / f"index.{name}").read_text(encoding="ascii").splitlines():
            if not line.startswith(" "):  # the licence header lines start with two spaces
                lemma = line.split()[0]
                assert lemma[0] not in "#@", lemma
                out.append(lemma)
    for pos, name in FILES.items():
        out.append(f"@exc {pos}")
        out += [" ".join(line.split()) for line in (source / f"{name}.exc").read_text(encoding="ascii").splitlines()]
    return gzip.compress(("\n".join(out) + "\n").encode("ascii"), compresslevel=9, mtime=0)


def inflections(base: str) -> set[str]:
    """The forms one detachment rule of any part of speech takes back to ``base`` (rules inverted),
    and the exception-list forms that list ``base``."""
    forms = {base[: len(base) - len(new)] + old for rules in wordnet.RULES.values() for old, new in rules
             if base.endswith(new)}
    _, exceptions = wordnet._data()
    return forms | {form for table in exceptions.values() for form, bases in table.items() if base in bases}


def table_forms(relation_json: Path) -> list[str]:
    """Forms that matter: AMBER's vocabulary (every key and value of its relation.json) and CHAIR's
    synonym words, as given and lower-cased with every one-rule inflection and exception form, and
    capitalised with ``s``; for AMBER's words also two-rule noun forms (``dogss``), where NLTK < 3.9 differs."""
    relation = json.loads(relation_json.read_text())
    amber = set(relation) | {w for words in relation.values() for w in words}
    synonyms = (ROOT / "lvlm_fix/evals/resources/chair_synonyms_original.txt").read_text().replace(",", " ").split()
    issue = "men leaves vases potatoes tomatoes slippers earrings sunglasses chopsticks us bus ties skiing seated"
    forms: set[str] = set(issue.split())
    for base in amber | set(synonyms):
        for word in {base, base.lower()}:
            forms |= {word} | inflections(word)
        forms |= {base.capitalize(), base.capitalize() + "s"}  # NLTK does not lower-case: these stay
    for base in amber:
        once = {base[: len(base) - len(new)] + old for old, new in wordnet.RULES["n"] if base.endswith(new)}
        forms |= {w[: len(w) - len(new)] + old for w in once for old, new in wordnet.RULES["n"] if w.endswith(new)}
    return sorted(forms)


def table(relation_json: Path) -> None:
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    for form in table_forms(relation_json):
        print("\t".join([form, *(lemmatizer.lemmatize(form, pos) for pos in POS)]))


def merge(new: Path, legacy: Path) -> None:
    """One line per form: the form, then per part of speech its lemma (empty: the form itself), and
    ``|`` + NLTK 3.8.1's lemma where that differs."""
    import nltk

    print("# Expected WordNetLemmatizer().lemmatize(form, pos) on WordNet 3.0, pos n v a r; written by")
    print(f"# tests/wordnet_dev.py from NLTK {nltk.__version__} and NLTK 3.8.1 (after '|' where it differs).")
    old = {line.split("\t")[0]: line.split("\t")[1:] for line in legacy.read_text().splitlines()}
    for line in new.read_text().splitlines():
        form, *lemmas = line.split("\t")
        cells = [("" if lemma == form else lemma) + (f"|{was}" if was != lemma else "")
                 for lemma, was in zip(lemmas, old[form])]
        print("\t".join([form, *cells]).rstrip("\t"))


def check(legacy: bool) -> None:
    """Every index lemma, exception form and one-rule inflection of a lemma, under every part of
    speech: lvlm-fix's lemmatize against the installed NLTK's."""
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    index, exceptions = wordnet._data()
    words = set().union(*index.values(), *(t.keys() for t in exceptions.values()))
    words |= {w for base in list(words) for w in inflections(base)}
    bad = [(w, p) for w in sorted(words) for p in (*POS, "s")
           if wordnet.lemmatize(w, p, repeat_rules=legacy) != lemmatizer.lemmatize(w, p)]
    print(f"{len(words)} words x 5 parts of speech: {len(bad)} differ {bad[:20]}")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "build":
        data = build(Path(args[0]))
        (ROOT / "lvlm_fix/evals/resources" / wordnet.DATA_FILE).write_bytes(data)
        print(len(data), "bytes")
    elif cmd == "table":
        table(Path(args[0]))
    elif cmd == "merge":
        merge(Path(args[0]), Path(args[1]))
    elif cmd == "check":
        check("--legacy" in args)
