"""Development tool: writes ``expected.json`` by running AMBER's own ``inference.py`` on this folder.

    NLTK_DATA=... python tests/amber_official/run_official.py AMBER/inference.py > tests/amber_official/expected.json

Needs NLTK's wordnet corpus (WordNet 3.0; see tests/wordnet_dev.py for building it from Debian's
files). The two parts of the script that need downloads lvlm-fix does not make are neutralised, the
same way lvlm-fix lacks them: ``nltk.pos_tag`` tags every token ``NN`` and spaCy's similarity is 1
for identical words, 0 otherwise (an identical word is already matched exactly, so this adds no
link). ``nltk.word_tokenize`` is lvlm-fix's (NLTK's word tokenizer on untrained punkt sentences,
punkt's model being a download too). Everything else is the script's own code, run as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def main() -> None:
    import nltk

    from lvlm_fix.evals.chair_original import word_tokenize

    class Doc:
        def __init__(self, text: str) -> None:
            self.text = text

        def similarity(self, other: Doc) -> float:
            return 1.0 if self.text == other.text else 0.0

    spacy = types.ModuleType("spacy")
    spacy.load = lambda name: Doc  # type: ignore[attr-defined]
    sys.modules["spacy"] = spacy
    nltk.word_tokenize = word_tokenize
    nltk.pos_tag = lambda tokens: [(t, "NN") for t in tokens]

    script = Path(sys.argv[1])
    scope = {"__name__": "amber_inference"}
    exec(compile(script.read_text(), str(script), "exec"), scope)  # defines its functions, runs nothing
    metrics = script.parent / "data" / "metrics.txt"
    scope["args"] = argparse.Namespace(
        word_association=str(HERE / "relation.json"), safe_words=str(HERE / "safe_words.txt"),
        inference_data=str(HERE / "responses.json"), annotation=str(HERE / "annotations.json"),
        metrics=str(metrics), similarity_score=0.8, evaluation_type="g")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        scope["main"](scope["args"])
    numbers = {}
    for line in printed.getvalue().splitlines():
        name, _, value = line.partition(":")
        if value.strip():
            numbers[name.strip().lower()] = float(value)
    relation = json.loads((HERE / "relation.json").read_text())
    vocabulary = set(relation) | {w for words in relation.values() for w in words}
    responses = json.loads((HERE / "responses.json").read_text())
    nouns = {str(r["id"]): [n for n in scope["extract_nouns"](r["response"]) if n in vocabulary] for r in responses}
    print(json.dumps({"nltk": nltk.__version__, "printed": numbers, "nouns": nouns}, indent=0))


if __name__ == "__main__":
    main()
