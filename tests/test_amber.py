"""AMBER scoring on a hand-made 7-item set: nouns, generative and discriminative metrics (exact and
compat), the loader's checks, and the bench through `score` and `eval`."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

from lvlm_fix.errors import ConfigError, DataError
from lvlm_fix.evals import amber, wordnet
from lvlm_fix.evals.runner import evaluate, score_outputs

RELATION = {"dog": ["puppy"], "car": ["vehicle", "tire"], "cup": [], "tree": ["leaf"], "cat": ["kitten"],
            "grass": [], "mouse": []}
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "tree"], "hallu": ["cat", "car"]},
    {"id": 2, "type": "generative", "truth": ["cup"], "hallu": ["dog"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 5, "type": "discriminative-relation", "truth": "yes"},
    {"id": 6, "type": "relation", "truth": "no"},
    {"id": 7, "type": "discriminative-attribute-number", "truth": "no"},
]
QUERIES = ["Describe this image.", "Describe this image.", "Is there a cat in this image?",
           "Is the sky sunny in this image?", "Is there direct contact between the dog and grass?",
           "Is there direct contact between the cup and tree?", "Are there two cups in this image?"]
RESPONSES = [
    # puppy, tree, leaf (leaves), grass (a safe word), kitten, car (cars); "Dogs" is capitalised: dropped
    "A puppy sits under a tree with leaves on the grass. Dogs and a kitten play near cars.",
    "A cup of coffee.",
    "No", "Yes", "yes", "No", "Yes",
]


@pytest.fixture
def amber_dir(tmp_path: Path) -> Path:
    root = tmp_path / "amber"
    (root / "query").mkdir(parents=True)
    (root / "images").mkdir()
    for k in (1, 2):
        Image.new("RGB", (32, 32), (40 * k, 90, 160)).save(root / "images" / f"AMBER_{k}.png")
    rows = [{"id": i + 1, "image": f"AMBER_{1 if i % 2 == 0 else 2}.png", "query": q} for i, q in enumerate(QUERIES)]
    (root / "query" / "query_generative.json").write_text(json.dumps(rows[:2]))
    (root / "query" / "query_discriminative.json").write_text(json.dumps(rows[2:]))
    (root / "annotations.json").write_text(json.dumps(ANNOTATIONS))
    (root / "relation.json").write_text(json.dumps(RELATION))
    (root / "safe_words.txt").write_text("grass\nphoto")  # no final newline, as AMBER's
    return root


def _records(amber_dir: Path, answers: str = "exact") -> list[dict]:
    data = amber.AmberData(amber_dir)
    recs = []
    for i, text in enumerate(RESPONSES, 1):
        item = data.item(i)
        if item.split == amber.GENERATIVE:
            nouns = amber.extract_nouns(text, data.vocabulary)
            recs.append({"split": item.split, **amber.score_generative(nouns, item.truth, item.hallu, data.relation,
                                                                        data.safe_words)})
        else:
            recs.append({"split": item.split, "dimension": item.dimension, "label": item.truth,
                         "answer": amber.read_answer(text, answers)})
    return recs


def test_nouns_and_lemmas() -> None:
    vocab = frozenset(RELATION) | {"puppy", "vehicle", "tire", "kitten", "leaf"}
    assert amber.extract_nouns(RESPONSES[0], vocab) == ["puppy", "tree", "leaf", "grass", "kitten", "car"]
    assert amber.extract_nouns("Two mice and a Dog.", vocab) == ["mouse"]  # noun.exc; capitals are not lower-cased
    assert amber.extract_nouns("glasses", frozenset({"glass", "glasses"})) == ["glass"]  # the shortest lemma


# Words of AMBER's own relation.json (junyangwang0410/AMBER data/relation.json): plurals such as
# "sunglasses" are H words there, but WordNet lemmatises them to a singular that is not.
AMBER_WORDS = frozenset({"man", "people", "vase", "potato", "tomato", "sunglasses", "slippers", "chopsticks",
                         "earrings", "glass", "TV"})


def test_nouns_are_wordnets_as_inference_py() -> None:
    """inference.py keeps lemmatize(token) when it is in H. Expected lemmas from NLTK 3.8.1 on WordNet 3.0:
    men -> men, vases -> vas, sunglasses -> sunglass, slippers -> slipper, chopsticks -> chopstick,
    earrings -> earring (none in H); potatoes -> potato, tomatoes -> tomato, people and TV unchanged (in H).
    The old lemmatiser, with H as its dictionary, kept men, vases and the plurals and lost potatoes."""
    text = ("Two men hold vases, potatoes and tomatoes; a man in sunglasses and slippers eats with chopsticks, "
            "people watch TV, a woman wears earrings.")
    assert amber.extract_nouns(text, AMBER_WORDS) == ["potato", "tomato", "man", "people", "TV"]


OFFICIAL = Path(__file__).parent / "amber_official"


def test_equals_amber_inference_py(tmp_path: Path) -> None:
    """AMBER's own inference.py on AMBER's own vocabulary and 60 of its annotations (tests/amber_official/
    README.md): the printed CHAIR, Cover, Hal and Cog, and the nouns of every response, are lvlm-fix's
    under --amber-compat. The script ran with its tagger and spaCy similarity neutralised, as lvlm-fix
    lacks them."""
    expected = json.loads((OFFICIAL / "expected.json").read_text())
    summary = score_outputs("amber", OFFICIAL / "responses.json", out_dir=tmp_path, amber_dir=str(OFFICIAL),
                            amber_compat=True, amber_tagger="noun", n_boot=1)
    gen = summary["methods"]["responses"]["splits"]["generative"]
    assert {k: round(gen[k] * 100, 1) for k in ("chair", "cover", "hal", "cog")} == expected["printed"]
    rows = [json.loads(x) for x in (tmp_path / "responses" / "samples.jsonl").read_text().splitlines()]
    assert {r["id"]: r["nouns"] for r in rows} == expected["nouns"]


def test_object_missing_from_relation_json_fails_at_load(amber_dir: Path) -> None:
    bad = [dict(a) for a in ANNOTATIONS]
    bad[0]["hallu"] = ["cat", "unicorn"]
    (amber_dir / "annotations.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"id 1: object 'unicorn' is not a key of relation.json.*\"unicorn\": \[\]"):
        amber.AmberData(amber_dir).queries(amber.GENERATIVE)


def test_compat_attribute_denominators_pool_three_counters() -> None:
    """inference.py's attribute block adds the state, number and action counters, each started at 0.001:
    precision 3 / (4 + 0.003) = 74.9 (with one 0.001 it would print 75.0), recall 3 / 3.003 = 99.9,
    accuracy 3 / 4.003 = 74.9; a single dimension keeps one 0.001 (state: 1 / 2.001 = 50.0)."""
    recs = [{"dimension": d, "label": label, "answer": "no"} for d, label in
            (("state", "no"), ("state", "yes"), ("number", "no"), ("action", "no"))]
    blocks = amber.discriminative_metrics(recs, compat=True)
    attribute = blocks["attribute"]
    assert (attribute["precision"], attribute["recall"], attribute["accuracy"]) == pytest.approx((0.749, 0.999, 0.749))
    assert blocks["state"]["precision"] == pytest.approx(0.5) and blocks["overall"]["precision"] == pytest.approx(0.75)


def test_generative_per_response(amber_dir: Path) -> None:
    first, second = (r for r in _records(amber_dir) if r["split"] == amber.GENERATIVE)
    assert first["hallucinated"] == ["kitten", "car"] and first["covered"] == ["dog", "tree"]
    assert first["named_targets"] == ["cat", "car"] and len(first["nouns"]) == 6  # grass counted, not judged
    assert second["nouns"] == ["cup"] and second["hallucinated"] == [] and second["covered"] == ["cup"]


def test_generative_metrics_exact_and_compat(amber_dir: Path) -> None:
    gen = [r for r in _records(amber_dir) if r["split"] == amber.GENERATIVE]
    m = amber.generative_metrics(gen)
    assert (m["chair"], m["cover"], m["hal"], m["cog"]) == pytest.approx((2 / 7, 1.0, 0.5, 2 / 3))
    c = amber.generative_metrics(gen, compat=True)  # 2/7.001, 3/3.001, 1 - 1/2.001, 2/3.001, x100 rounded
    assert (c["chair"], c["cover"], c["hal"], c["cog"]) == pytest.approx((0.286, 1.0, 0.5, 0.666))
    assert amber.generative_metrics([])["chair"] is None and amber.generative_metrics([], compat=True)["chair"] == 0


def test_discriminative_blocks(amber_dir: Path) -> None:
    blocks = amber.discriminative_metrics([r for r in _records(amber_dir) if r["split"] != amber.GENERATIVE])
    overall = blocks["overall"]  # correct: 3, 4, 6; answered No: 3, 6; label no: 3, 6, 7
    assert (overall["accuracy"], overall["precision"], overall["recall"], overall["f1"]) == pytest.approx(
        (0.6, 1.0, 2 / 3, 0.8))
    assert blocks["existence"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "n": 1}
    assert blocks["attribute"]["accuracy"] == 0.5 and blocks["attribute"]["precision"] is None  # no 'No' answer
    assert blocks["attribute"]["recall"] == 0.0 and blocks["attribute"]["f1"] is None
    assert blocks["relation"] == {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "n": 2}
    assert blocks["action"]["n"] == 0 and blocks["action"]["accuracy"] is None


def test_discriminative_compat_reproduces_the_0001_denominators(amber_dir: Path) -> None:
    blocks = amber.discriminative_metrics([r for r in _records(amber_dir) if r["split"] != amber.GENERATIVE],
                                          compat=True)
    overall = blocks["overall"]  # 3/5.001, 2/2.001, 2/3.001 -> 60.0, 100.0, 66.6; F1 from those: 79.9
    assert (overall["accuracy"], overall["precision"], overall["recall"], overall["f1"]) == pytest.approx(
        (0.6, 1.0, 0.666, 0.799))
    assert blocks["action"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 0}


def test_answers_must_be_exact_unless_asked(amber_dir: Path) -> None:
    assert amber.read_answer("yes") is None and amber.read_answer("Yes") == "yes"
    assert amber.read_answer("Yes, there is.", "llava") == "yes"
    recs = [r for r in _records(amber_dir, "llava") if r["split"] != amber.GENERATIVE]
    assert amber.discriminative_metrics(recs)["overall"]["accuracy"] == pytest.approx(0.8)  # "yes" now counts


def test_amber_score() -> None:
    assert amber.amber_score(2 / 7, 0.8) == pytest.approx(((1 - 2 / 7) + 0.8) / 2)
    assert amber.amber_score(None, 0.8) is None


def test_loader_checks_positional_annotations(amber_dir: Path) -> None:
    bad = [dict(a) for a in ANNOTATIONS]
    bad[1]["id"] = 5
    (amber_dir / "annotations.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="positional"):
        amber.AmberData(amber_dir).queries(amber.GENERATIVE)
    with pytest.raises(DataError, match="AMBER folder not found"):
        amber.AmberData(amber_dir / "nope")


def test_score_amber_responses(amber_dir: Path, tmp_path: Path) -> None:
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps([{"id": i, "response": r} for i, r in enumerate(RESPONSES, 1)]))
    summary = score_outputs("amber", responses, out_dir=tmp_path / "s", amber_dir=str(amber_dir), n_boot=50,
                            amber_tagger="noun")
    res = summary["methods"]["responses"]
    assert res["splits"]["generative"]["chair"] == pytest.approx(2 / 7)
    assert res["splits"]["discriminative"]["f1"] == pytest.approx(0.8)
    assert res["amber_score"] == pytest.approx(((1 - 2 / 7) + 0.8) / 2)
    rows = [json.loads(x) for x in (tmp_path / "s" / "responses" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["hallucinated"] == ["kitten", "car"] and rows[2]["answer"] == "no"
    assert "AMBER score" in (tmp_path / "s" / "results.md").read_text()
    # the tokens depend on NLTK's version and the nouns on the WordNet data: both are recorded
    nltk_version = metadata.version("nltk")
    assert summary["provenance"]["versions"]["nltk"] == nltk_version
    assert summary["settings"]["tokenizer"].startswith(f"nltk {nltk_version} ")
    assert summary["settings"]["wordnet_sha256"] == wordnet.describe()["wordnet_sha256"]
    assert summary["settings"]["tagger"] == "none: every token a noun"


def test_tagger_keeps_nn_tags_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NLTK's tagger data (absent here: a stand-in tagger), only NN* tokens are nouns, as in inference.py;
    without it the default falls back on every token with a warning, and asking for the tagger fails."""
    from types import SimpleNamespace

    from lvlm_fix.evals import chair_opera

    vocab = frozenset({"car", "park", "dog"})
    text = "Cars park near the dog park."
    monkeypatch.setattr(chair_opera, "perceptron_available", lambda: False)
    with pytest.warns(UserWarning, match="every token is taken as a noun"):
        assert amber.resolve_tagger(None) == "noun"
    with pytest.raises(ConfigError, match="--amber-tagger perceptron needs NLTK's tagger data"):
        amber.resolve_tagger("perceptron")
    with pytest.raises(ConfigError, match="--amber-tagger 'spacy' is not one of perceptron, noun"):
        amber.resolve_tagger("spacy")
    assert amber.extract_nouns(text, vocab) == ["park", "dog", "park"]  # a verb spelled like a noun counts

    tags = {"Cars": "NNS", "park": "VBP", "near": "IN", "the": "DT", "dog": "NN", ".": "."}
    tagger = SimpleNamespace(tag=lambda tokens: [(t, "NN" if i == len(tokens) - 2 else tags[t])
                                                 for i, t in enumerate(tokens)])  # the last "park" a noun
    monkeypatch.setattr(chair_opera, "_perceptron", lambda: tagger)
    monkeypatch.setattr(chair_opera, "perceptron_available", lambda: True)
    assert amber.resolve_tagger(None) == "perceptron"
    assert amber.extract_nouns(text, vocab, "perceptron") == ["dog", "park"]  # "Cars" stays capitalised: no H noun


def test_eval_amber_on_a_tiny_model(tiny, amber_dir: Path, tmp_path: Path) -> None:
    summary = evaluate(tiny("llava"), "amber", methods=["none"], amber_dir=str(amber_dir), amber_tagger="noun",
                       max_new_tokens=3, batch_size=4, n_boot=20, progress=False, out_dir=tmp_path / "e")
    splits = summary["methods"]["none"]["splits"]
    assert splits["generative"]["n"] == 2 and splits["discriminative"]["n"] == 5
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["splits"]["generative"]["generation"]["max_new_tokens"] == 3
    assert "Describe this image." in run["splits"]["generative"]["prompt_example"]
