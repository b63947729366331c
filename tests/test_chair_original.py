"""Original-mode CHAIR against object lists derived by hand from the rules of LisaAnne/Hallucination's
chair.py and pattern 3.6's singularize (not by running this code), plus the packaged synonym file."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from lvlm_fix.evals import chair
from lvlm_fix.evals.chair import ChairEvaluator, caption_to_objects
from lvlm_fix.evals.chair_original import OriginalExtractor, word_tokenize
from lvlm_fix.evals.pattern_singular import singularize

# word -> pattern 3.6 singular, one per rule or quirk (bus -> bu, ties -> ty, doggies unchanged, ...).
SINGULARS = (
    "bus:bu buses:bus ties:ty glass:glas glasses:glass tennis:tenni canoes:cano knives:knife mice:mouse "
    "people:person children:child women:woman policemen:policeman puppies:puppy doggies:doggies cookies:cookies "
    "pies:py skis:ski scissors:scissors calves:calf shelves:shelve gloves:glove olives:olife slices:slice "
    "potatoes:potato toes:to ears:ears apes:apes benches:bench safari:safarus pasta:pastum four:fmy "
    "octopi:octopus leaves:leaf geese:goose feet:foot teeth:tooth oxen:ox hot-dogs:hot-dog "
    "mothers-in-law:mother-in-law sandwiches:sandwich horses:horse noses:nose bases:basis luggage:luggage "
    "rice:rice stoves:stove series:series news:news as:as is:is was:wa this:thi grass:gras lorries:lorry "
    "movies:movie zombies:zombie"
).split()


@pytest.mark.parametrize("pair", SINGULARS)
def test_pattern_singularize_golden(pair: str) -> None:
    word, singular = pair.split(":")
    assert singularize(word) == singular


# The specification's 20 captions (node words in caption order, with repeats).
SPEC = [
    ("A man riding a bus down the street.", ["person"]),  # bus -> bu
    ("Two buses parked next to a fire hydrant.", ["bus", "fire hydrant"]),
    ("A man wearing a bow tie and glasses.", ["person", "tie"]),
    ("Three men in ties standing by a toilet seat.", ["person", "toilet"]),  # ties -> ty
    ("The seat of the toilet is up and a chair is nearby.", ["toilet", "chair"]),  # toilet rule
    ("A baby elephant next to an adult giraffe.", ["elephant", "giraffe"]),
    ("A bear with a baby cub in the grass.", ["bear"]),  # baby cub -> cub, no object
    ("A passenger train on the train tracks.", ["train"]),  # train track blocks train
    ("Passengers waiting for a passenger bus.", ["person", "person"]),
    ("A dog eating a hot dog next to teddy bears.", ["dog", "hot dog", "teddy bear"]),
    ("Two wine glasses and a wine glass on a dining table.", ["wine glass", "wine glass", "dining table"]),
    ("A man riding a motor bike past a scooter.", ["person", "motorcycle"]),  # ' motor bike' never matches
    ("Slices of cheesecake and a cupcake on a plate.", ["cake"]),  # ' cheesecake' never matches
    ("A canoe and two canoes on the lake.", ["boat"]),  # canoes -> cano
    ("Knives, forks and a pair of scissors on a desk.", ["knife", "fork", "scissors", "dining table"]),
    ("Mice and a computer mouse next to a laptop computer.", ["mouse", "laptop", "mouse", "laptop"]),
    ("People and children watching a giraffe and some sheep near a bench.",
     ["person", "person", "giraffe", "sheep", "bench"]),
    ("Puppies and doggies playing with a frisbee on the grass.", ["dog", "frisbee"]),  # doggies unchanged
    ("A tennis player swinging a tennis racket near a street light and parking meters.",
     ["person", "tennis racket", "traffic light", "parking meter"]),
    ("A turkey sandwich, a bagel and a telephone next to an iPhone in a container on a stove top oven.",
     ["bird", "sandwich", "donut", "cell phone", "bowl", "oven", "oven"]),
]

# Ours, each derived by hand: tokenise -> singularise every token -> merge two-word terms -> toilet rule ->
# vocabulary lookup. The comment names the rule or quirk it exercises.
OURS = [
    ("A cat sleeping on a couch next to a tv.", ["cat", "couch", "tv"]),
    ("Two zebras and three giraffes.", ["zebra", "giraffe"]),  # final-s rule
    ("A woman holding an umbrella and a handbag.", ["person", "umbrella", "handbag"]),
    ("A stop sign near a traffic light.", ["stop sign", "traffic light"]),  # identity terms
    ("A sheep and a goat on the grass.", ["sheep", "sheep"]),  # goat -> sheep
    ("A bull and two cows in a field.", ["cow", "cow"]),  # bull -> cow
    ("The kid is eating a donut.", ["person", "donut"]),  # 'is' protected (debris)
    ("A computer monitor and a keyboard on a desk.", ["laptop", "tv", "keyboard", "dining table"]),
    ("Skis and a snowboard leaning on a bench.", ["skis", "snowboard", "bench"]),  # skis -> ski
    ("A hot-dog and some fries.", []),  # hyphenated token stays one word; fries -> fry
    ("A toilet bowl in a bathroom.", ["toilet", "bowl"]),  # no 'toilet bowl' term in the original
    ("A bus stop with a bench.", ["bench"]),  # bu stop
    ("Oranges and apples in a bowl.", ["orange", "apple", "bowl"]),
    ("A laptop computer and a cell phone.", ["laptop", "cell phone"]),
    ("A baby sitting next to a teddy bear.", ["person", "teddy bear"]),  # baby alone is a person
    ("Adult elephants and baby elephants.", ["elephant", "elephant"]),  # merged after singularising
    ("A passenger jet on the runway.", ["airplane"]),  # passenger jet -> jet
    ("A man in a suit holding a suitcase.", ["person", "suitcase"]),
    ("The knife is next to the forks and spoons.", ["knife", "fork", "spoon"]),
    ("Pizza on a table with a glass of wine.", ["pizza", "dining table"]),  # glass -> glas, no wine glass
    ("A dog's bowl.", ["dog", "bowl"]),  # contraction split off
    ("Buses, trucks and cars.", ["bus", "truck", "car"]),
    ("A man with a bow and arrow.", ["person", "tie"]),  # bow -> tie
    ("A refrigerator, a microwave and an oven in a kitchen.", ["refrigerator", "microwave", "oven"]),
    ("Several birds, including a duck and a goose.", ["bird", "bird", "bird"]),
    ("A giraffe eating leaves from a tree.", ["giraffe"]),  # leaves -> leaf
    ("Three teddy bears on a bed.", ["teddy bear", "bed"]),
    ("A child flying a kite.", ["person", "kite"]),
    ("Two people riding horses on the beach.", ["person", "horse"]),  # people -> person
    ("A toilet next to a sink and a seat.", ["toilet", "sink"]),  # toilet rule drops seat
    ("Cupcakes on a plate.", ["cake"]),
    ("A cow and an ox.", ["cow", "cow"]),
    ("A batter at home plate.", []),  # home plate merges into no object
    ("A parking meter and a fire hydrant on the street.", ["parking meter", "fire hydrant"]),
    ("A remote control and a mouse.", ["remote", "mouse"]),
    ("Two dogs; one cat!", ["dog", "cat"]),
]


@pytest.mark.parametrize(("caption", "nodes"), SPEC + OURS)
def test_original_mode_object_lists(caption: str, nodes: list[str]) -> None:
    assert [m.node for m in caption_to_objects(caption, "original")] == nodes


def test_matched_words_and_merged_tokens() -> None:
    mentions, tokens = OriginalExtractor().extract("Mice and a computer mouse next to a laptop computer.")
    assert mentions == [("mouse", "mouse"), ("computer", "laptop"), ("mouse", "mouse"),
                        ("laptop computer", "laptop")]
    assert tokens == ["mouse", "and", "a", "computer", "mouse", "next", "to", "a", "laptop computer", "."]


def test_tokenizer_splits_like_word_tokenize_without_punkt_data() -> None:
    assert word_tokenize("the dog's bone isn't here; a hot-dog... ok. a bus.") == [
        "the", "dog", "'s", "bone", "is", "n't", "here", ";", "a", "hot-dog", "...", "ok", ".", "a", "bus", "."]
    # The documented divergence: untrained punkt does not know abbreviations ("mr." is split).
    assert word_tokenize("mr. smith") == ["mr", ".", "smith"]


def test_inflect_singularizer_variant() -> None:
    # inflect also loses 'bus' but keeps 'ties' -> 'tie' and 'canoes' -> 'canoe'
    assert [m.node for m in caption_to_objects("Two ties, a bus and two canoes.", "original", "inflect")] == [
        "tie", "boat"]
    assert [m.node for m in caption_to_objects("Two ties, a bus and two canoes.", "original")] == []  # ty, bu, cano


def test_synonym_file_is_the_original_byte_for_byte() -> None:
    data = resources.files("lvlm_fix.evals").joinpath("resources", "chair_synonyms_original.txt").read_bytes()
    sidecar = json.loads(resources.files("lvlm_fix.evals").joinpath("resources", "chair_synonyms_original.json")
                         .read_text())
    assert hashlib.sha256(data).hexdigest() == sidecar["sha256"] == chair.make_extractor("original").describe()[
        "synonyms_sha256"]
    lines = data.decode().splitlines()
    assert len(lines) == 80 and lines[0].startswith("person, girl") and lines[-1] == "toothbrush"
    assert "scooter,  motor bike" in lines[3] and lines[55].startswith("cake,  cheesecake")  # double spaces
    assert lines[67].endswith("iPhone") and lines[19].endswith("bison ")  # trailing space kept in the file


def test_modes_differ_and_results_name_them() -> None:
    assert [m.node for m in caption_to_objects("A bus and a baby cub.", "lvlm-fix")] == ["bus"]  # no person for cub
    assert [m.node for m in caption_to_objects("A bus and a baby cub.", "original")] == []
    original, own = chair.make_extractor("original").describe(), chair.make_extractor("lvlm-fix").describe()
    assert original["chair_mode"] == "original" and original["singularizer"] == "pattern"
    assert own["chair_mode"] == "lvlm-fix" and own["singularizer_version"].startswith("inflect ")


def test_singularizer_is_original_mode_only() -> None:
    from lvlm_fix.errors import ConfigError

    with pytest.raises(ConfigError, match="original only"):
        chair.make_extractor("lvlm-fix", "pattern")


def test_image_level_golden() -> None:
    """GT {person, dog}: 'A man and a dog.' (2 mentions, 0 hallucinated) and 'A man, a dog and a
    frisbee on a bus.' (person, dog, frisbee; bus lost to 'bu'; 1 hallucinated)."""
    ev = ChairEvaluator({1: {"person", "dog"}}, {1: []}, mode="original")
    result = ev.evaluate([{"image_id": 1, "caption": "A man and a dog."},
                          {"image_id": 1, "caption": "A man, a dog and a frisbee on a bus."}])
    assert result.chair_s == pytest.approx(1 / 2)
    assert result.chair_i == pytest.approx(1 / 5)
    assert result.recall == pytest.approx(1.0)  # (2 + 2) / (2 + 2)
    assert result.details[1].mentioned == ["person", "dog", "frisbee"]
    assert result.details[1].hallucinated == ["frisbee"] and result.details[1].words == ["man", "dog", "frisbee"]
    assert result.settings["chair_mode"] == "original"


def test_ground_truth_uses_the_same_quirks(tmp_path) -> None:
    """Reference captions add their objects to the GT through the same extractor: 'a computer mouse'
    puts laptop in, 'a bus' puts nothing in."""
    inst = {"images": [{"id": 7, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1}]}
    caps = {"images": [{"id": 7, "file_name": "x.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "caption": "A computer mouse near a bus."}]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    (tmp_path / "c.json").write_text(json.dumps(caps))
    assert ChairEvaluator.from_coco(tmp_path / "i.json", tmp_path / "c.json", mode="original").gt_objects(7) == {
        "person", "laptop", "mouse"}
    assert ChairEvaluator.from_coco(tmp_path / "i.json", tmp_path / "c.json", mode="lvlm-fix").gt_objects(7) == {
        "person", "mouse", "bus"}


def test_pattern_prepositions_are_patterns_forty() -> None:
    """pattern 3.6's plural_prepositions, which decide whether a hyphenated word singularises its head
    (``passers-by -> passer-by``); "beyond", "but" and "by" were missing."""
    from lvlm_fix.evals.pattern_singular import PREPOSITIONS

    assert PREPOSITIONS == set(
        "about before during of till above behind except off to across below for on under after beneath from onto "
        "until among beside in out unto around besides into over upon at between near since with athwart betwixt "
        "beyond but by".split())
    assert singularize("passers-by") == "passer-by" and singularize("lookers-beyond") == "looker-beyond"
    assert singularize("hangers-on") == "hanger-on"


def test_results_name_the_nltk_whose_tokenizer_ran() -> None:
    from importlib import metadata

    assert chair.make_extractor("original").describe()["tokenizer"] == (
        f"nltk {metadata.version('nltk')} NLTKWordTokenizer on untrained punkt sentences")
