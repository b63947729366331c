"""``pattern.en.singularize`` (pattern 3.6) as the original CHAIR calls it, rewritten rule by rule.

The original CHAIR singularises *every* caption token with pattern's ``singularize(word)``. pattern
does not install on current Pythons, so this module restates its algorithm, including the
behaviour that makes original CHAIR what it is:

* ``bus -> bu``, ``glass -> glas``, ``tennis -> tenni``: any word ending in ``s`` that no earlier
  rule claims loses the ``s``, plural or not;
* ``ties -> ty``, ``pies -> py``: the "-ie" exceptions ``^tie`` / ``^pie`` are written with a
  literal caret and never match;
* ``doggies``, ``cookies`` come back unchanged (the "-ie" branch returns its input);
* ``ears``, ``apes``, ``is`` come back unchanged: the uninflected and uncountable lists protect
  every *tail* of their entries (``shears``, ``jackanapes``, ``debris``);
* two entries of each list lost a comma in the source and are single strings
  (``wildebeestcarp``, ``watercheese``, ``zombiebogie``).

Input is expected lower-case (CHAIR lower-cases the caption first). :data:`VERSION` names what
this reproduces; store it with every result.
"""

from __future__ import annotations

import functools
import re

VERSION = "pattern 3.6 singularize (rules restated by lvlm-fix)"

# pattern's plural_prepositions, all 40 of them ("beyond", "but" and "by" close its list).
PREPOSITIONS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides "
    "between betwixt beyond but by during except for from in into near of off on onto out over since "
    "till to under until unto upon with".split()
)

UNINFLECTED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn "
    "high-jinks proceedings whiting britches eland homework rabies wildebeestcarp elk innings salmon "
    "chassis flounder jackanapes scissors christmas gallows mackerel series clippers georgia measles "
    "shears cod graffiti mews species contretemps mumps swine corps news swiss"
).split()

UNCOUNTABLE = (
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research watercheese garbage knowledge meat "
    "rice electricity gravel love mustard sand"
).split()

IE_WORDS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie "
    "indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombiebogie goonie laddie pixie "
    "techie bombie groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie "
    "meanie rookie valkyrie"
).split()

# ending -> replacement, in source order; the first ending the word has wins.
IRREGULAR = dict(
    pair.split(":")
    for pair in (
        "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child "
        "corpora:corpus corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose "
        "genera:genus genii:genie graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf "
        "men:man mongooses:mongoose monies:money moves:move mythoi:mythos numena:numen "
        "occipita:occiput octopodes:octopus opera:opus opuses:opus our:my oxen:ox penes:penis "
        "penises:penis people:person sexes:sex soliloquies:soliloquy teeth:tooth testes:testis "
        "trilbys:trilby turves:turf zoa:zoon"
    ).split()
)

_I = re.IGNORECASE
# (pattern, replacement, flags), tried in order; the first that matches rewrites the word.
_RULES = [
    (r"(.)ae$", r"\1a", _I),
    (r"(.)itis$", r"\1itis", _I),
    (r"(.)eaux$", r"\1eau", _I),
    (r"(quiz)zes$", r"\1", _I),
    (r"(matr)ices$", r"\1ix", _I),
    (r"(ap|vert|ind)ices$", r"\1ex", _I),
    (r"^(ox)en", r"\1", _I),  # no "$": any word starting with "oxen"
    (r"(alias|status)es$", r"\1", _I),
    (r"([octop|vir])i$", r"\1us", _I),  # a character class, not an alternation
    (r"(cris|ax|test)es$", r"\1is", _I),
    (r"(shoe)s$", r"\1", _I),
    (r"(o)es$", r"\1", _I),
    (r"(bus)es$", r"\1", _I),
    (r"([m|l])ice$", r"\1ouse", _I),
    (r"(x|ch|ss|sh)es$", r"\1", _I),
    (r"(m)ovies$", r"\1ovie", _I),
    (r"(.)ombies$", r"\1ombie", _I),
    (r"(s)eries$", r"\1eries", _I),
    (r"([^aeiouy]|qu)ies$", r"\1y", _I),
    (r"([aeo]l)ves$", r"\1f", 0),
    (r"([^d]ea)ves$", r"\1f", 0),
    (r"arves$", r"arf", 0),
    (r"erves$", r"erve", 0),
    (r"([nlw]i)ves$", r"\1fe", 0),
    (r"([lr])ves$", r"\1f", _I),
    (r"([aeo])ves$", r"\1ve", 0),
    (r"(sive)s$", r"\1", _I),
    (r"(tive)s$", r"\1", _I),
    (r"(hive)s$", r"\1", _I),
    (r"([^f])ves$", r"\1fe", _I),
    (r"(^analy)ses$", r"\1sis", _I),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis", _I),
    (r"(.)opses$", r"\1opsis", _I),
    (r"(.)yses$", r"\1ysis", _I),
    (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose", _I),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose", _I),
    (r"(.)oses$", r"\1osis", _I),
    (r"([ti])a$", r"\1um", _I),
    (r"(n)ews$", r"\1ews", _I),
    (r"s$", r"", _I),
]
RULES = tuple((re.compile(pattern, flags), repl) for pattern, repl, flags in _RULES)


@functools.lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """The singular of a lower-case word, exactly as pattern 3.6 computes it (quirks included).

    Steps, the first that applies returns: a hyphenated word whose second part is a preposition
    singularises its first part (``mothers-in-law``); a trailing apostrophe becomes ``'s``; a word
    that is a tail of an uninflected or uncountable entry, or an "-ie" plural, is returned as is;
    an irregular ending is replaced (``policemen -> policeman``); then the first matching suffix
    rule of :data:`RULES` rewrites the word; otherwise it is returned unchanged.
    """
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    if any(entry.endswith(word) for entry in UNINFLECTED) or any(entry.endswith(word) for entry in UNCOUNTABLE):
        return word
    if any(word.endswith(entry + "s") for entry in IE_WORDS):
        return word
    for ending, replacement in IRREGULAR.items():
        if word.endswith(ending):
            return word[: len(word) - len(ending)] + replacement
    for pattern, replacement in RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word
