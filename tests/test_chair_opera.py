"""Opera-mode CHAIR (the default) against object lists derived by hand from the rules of OPERA's chair.py
and WordNet 3.0's morphology (checked once against OPERA's own code, nltk 3.10 and Debian's WordNet 3.0
with every token tagged a noun), the tag -> WordNet part-of-speech mapping, the tagger fallback and the
errors. The released-captions check is test_chair_released.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvlm_fix.errors import ConfigError, DataError
from lvlm_fix.evals import chair, chair_opera
from lvlm_fix.evals.chair import ChairEvaluator, caption_to_objects
from lvlm_fix.evals.chair_opera import OperaExtractor


@pytest.fixture(autouse=True)
def _fresh_tagger_check():
    chair_opera.perceptron_available.cache_clear()
    yield
    chair_opera.perceptron_available.cache_clear()


# Every token a noun: node words in caption order, with repeats. The comment names the rule.
NOUN_TAGGED = [
    ("A man riding a bus down the street.", ["person", "bus"]),  # bus stays bus (original: bu)
    ("Three men in ties standing by a toilet seat.", ["tie", "toilet"]),  # men is a WordNet noun; ties -> tie
    ("Two vases of flowers on a table.", ["dining table"]),  # vases -> vas, no COCO word
    ("Two buses parked next to a fire hydrant.", ["bus", "fire hydrant"]),
    ("A woman wearing glasses holds two wine glasses.", ["person", "wine glass"]),  # glass alone is no object
    ("A tennis player swinging a tennis racket.", ["person", "tennis racket"]),  # tennis survives, merges
    ("A skier skiing down a slope with skis.", ["person", "skis"]),  # noun skiing stays; skis -> ski
    ("People and children watching giraffes.", ["person", "person", "giraffe"]),  # children: exception list
    ("Knives, forks and spoons in a drawer.", ["knife", "fork", "spoon"]),  # knives: -ves rule via exceptions
    ("Mice and a computer mouse next to a laptop computer.", ["mouse", "laptop", "mouse", "laptop"]),
    ("A canoe and two canoes on the lake.", ["boat", "boat"]),  # canoes -> canoe (original: cano)
    ("Puppies and doggies playing with a frisbee.", ["dog", "dog", "frisbee"]),  # doggies -> doggy
    ("A giraffe eating leaves from a tree.", ["giraffe"]),
    ("Cupcakes and cheesecake on a plate.", ["cake"]),  # ' cheesecake' of the synonym list never matches
    ("Three teddy bears on a bed.", ["teddy bear", "bed"]),
    ("Two hot dogs next to a dog.", ["hot dog", "dog"]),
    ("The seat of the toilet is up and a chair is nearby.", ["toilet", "chair"]),  # seat dropped with toilet
    ("Baby elephants next to an adult giraffe.", ["elephant", "giraffe"]),  # baby/adult + animal
    ("Passengers waiting for a passenger train on the train tracks.", ["person", "train"]),  # train track
    ("A man with an iPhone and a cell phone.", ["person", "cell phone"]),  # iPhone never matches (capital)
    ("Oxen and a cow in a field.", ["cow", "cow"]),
    ("A pair of scissors and a knife.", ["scissors", "knife"]),
    ("A dining table with chairs around it.", ["dining table", "chair"]),
    ("A man tied his tie while seated on a bench.", ["person", "tie", "bench"]),  # tied, seated: nouns, no match
    ("Two motorcycles and a motor bike.", ["motorcycle"]),  # ' motor bike' never matches
    ("Buses, trucks and cars.", ["bus", "truck", "car"]),
    ("The sheep and the lambs.", ["sheep", "sheep"]),
    ("Skateboarders skateboarding on skateboards.", ["person", "skateboard"]),
    ("A couple of benches and a stove top oven.", ["bench", "oven", "oven"]),  # 'stove top oven' never merges
]


@pytest.mark.parametrize(("caption", "nodes"), NOUN_TAGGED)
def test_opera_mode_object_lists_with_the_noun_tagger(caption: str, nodes: list[str]) -> None:
    assert [m.node for m in caption_to_objects(caption, "opera", tagger="noun")] == nodes


def test_modes_differ_where_the_issue_says() -> None:
    caption = "Two men in ties by a bus and two vases."
    assert [m.node for m in caption_to_objects(caption, "original")] == ["person", "vase"]  # men; ty, bu lost
    assert [m.node for m in caption_to_objects(caption, "opera", tagger="noun")] == ["tie", "bus"]  # men, vas lost


@pytest.mark.parametrize(("tag", "pos"), [("NN", "n"), ("NNS", "n"), ("VBG", "v"), ("VBN", "v"), ("JJ", "a"),
                                          ("JJR", "a"), ("RB", "r"), ("DT", "n"), (".", "n"), ("IN", "n")])
def test_tags_map_to_wordnet_parts_of_speech_as_opera(tag: str, pos: str) -> None:
    assert chair_opera.wordnet_pos(tag) == pos


def _with_tags(monkeypatch: pytest.MonkeyPatch, tags: dict[str, str]) -> OperaExtractor:
    """A perceptron-mode extractor whose tagger answers from ``tags`` (NN for other tokens)."""

    class Tagger:
        def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
            return [(t, tags.get(t, "NN")) for t in tokens]

    monkeypatch.setattr(chair_opera, "perceptron_available", lambda: True)
    monkeypatch.setattr(chair_opera, "_perceptron", Tagger)
    return OperaExtractor("perceptron")


def test_tagged_verbs_lemmatise_as_verbs(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the real tagger adds over the fallback: verbs whose WordNet verb lemma is a COCO word."""
    ex = _with_tags(monkeypatch, {"skiing": "VBG", "seated": "VBN", "tied": "VBD", "skateboarding": "VBG",
                                  "dining": "VBG", "is": "VBZ", "older": "JJR"})
    assert ex.lemmas("A man is skiing, seated and older.")[:4] == ["a", "man", "be", "ski"]
    assert [n for _, n in ex.extract("A man skiing, seated, tied and skateboarding.")[0]] == [
        "person", "skis", "chair", "tie", "skateboard"]
    # a verb "dining" is "din": "dining table" no longer merges, "table" alone is still a dining table
    assert ex.extract("A dining table.")[1] == ["a", "din", "table", "."]
    assert ex.describe()["tagger"].endswith("averaged perceptron (pos_tag)")


def test_fallback_warns_and_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chair_opera, "perceptron_available", lambda: False)
    with pytest.warns(UserWarning, match="every token is tagged a noun.*nltk.downloader averaged_perceptron_tagger"):
        ex = chair.make_extractor("opera")
    assert ex.tagger == "noun"
    settings = ex.describe()
    assert settings["chair_mode"] == "opera" and settings["tagger"] == "none: every token a noun (fallback)"
    assert settings["singularizer"] == "wordnet" and "3.0" in settings["singularizer_version"]
    assert settings["synonyms_sha256"] == chair.make_extractor("original").describe()["synonyms_sha256"]


def test_explicit_noun_tagger_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    OperaExtractor("noun")
    assert not [w for w in recwarn if "tagged a noun" in str(w.message)]


def test_missing_perceptron_data_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chair_opera, "perceptron_available", lambda: False)
    with pytest.raises(ConfigError, match="nltk.downloader averaged_perceptron_tagger_eng.*--chair-tagger noun"):
        chair.make_extractor("opera", tagger="perceptron")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"mode": "opera", "tagger": "brill"}, "--chair-tagger 'brill' is not one of perceptron, noun"),
    ({"mode": "original", "tagger": "noun"}, "--chair-tagger noun applies to --chair-mode opera only"),
    ({"mode": "opera", "singularizer": "pattern"}, "applies to --chair-mode original only"),
    ({"mode": "opera", "synonyms": chair.default_synonyms()}, "a custom table needs lvlm-fix mode"),
])
def test_bad_combinations_name_the_fix(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        chair.make_extractor(**kwargs)


def test_opera_is_the_default_mode() -> None:
    assert chair.DEFAULT_MODE == "opera" and chair.MODES[0] == "opera"
    ev = ChairEvaluator({1: {"person", "bus"}}, {1: []}, tagger="noun")
    result = ev.evaluate([{"image_id": 1, "caption": "A man and a dog near two buses."}])
    assert result.settings["chair_mode"] == "opera"
    assert result.details[0].mentioned == ["person", "dog", "bus"] and result.details[0].hallucinated == ["dog"]
    assert result.details[0].n_tokens == 9  # OPERA's Len counts punctuation tokens too


def test_ground_truth_of_reference_captions_uses_the_same_rules(tmp_path: Path) -> None:
    inst = {"images": [{"id": 7, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1}]}
    caps = {"images": [{"id": 7, "file_name": "x.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "caption": "Two buses and some vases."}]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    (tmp_path / "c.json").write_text(json.dumps(caps))
    ev = ChairEvaluator.from_coco(tmp_path / "i.json", tmp_path / "c.json", tagger="noun")
    assert ev.gt_objects(7) == {"person", "bus"}


def test_from_ground_truth(tmp_path: Path) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"5": ["dog", "person"], "6": []}))
    ev = ChairEvaluator.from_ground_truth(gt, tagger="noun")
    assert ev.gt_objects(5) == {"dog", "person"} and ev.gt_objects(6) == frozenset()
    result = ev.evaluate([{"image_id": 5, "caption": "A dog and a cat."}])
    assert result.details[0].hallucinated == ["cat"]
    with pytest.raises(DataError, match="CHAIR ground-truth file not found"):
        ChairEvaluator.from_ground_truth(tmp_path / "missing.json")
    for bad, needle in [("[1, 2]", "must be a JSON object of image id -> list"),
                        ('{"5": "dog"}', "must be a JSON object"),
                        ('{"x5": ["dog"]}', "key 'x5' is not an integer COCO image id"),
                        ('{"5": ["unicorn"]}', r"instance objects \['unicorn'\]"),
                        ("{", "is not valid JSON")]:
        gt.write_text(bad)
        with pytest.raises(DataError, match=needle):
            ChairEvaluator.from_ground_truth(gt, tagger="noun")
