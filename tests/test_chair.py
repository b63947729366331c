"""CHAIR in lvlm-fix mode (object extraction and metrics) on hand-written captions and a tiny COCO
annotation; original mode has its own file, test_chair_original.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lvlm_fix.evals import chair, stats
from lvlm_fix.evals.chair import ChairEvaluator, SynonymTable, caption_to_objects
from lvlm_fix.errors import DataError

# Real COCO category ids, for flavour; only the names matter.
CATEGORIES = {
    1: "person", 17: "cat", 18: "dog", 11: "fire hydrant", 58: "hot dog", 70: "toilet", 22: "elephant"
}
# image id -> (instance categories, reference captions)
IMAGES = {
    101: ([18, 18, 11], ["Two dogs sit by a red hydrant.", "A puppy near a fire hydrant."]),
    102: ([1, 58], ["A man eats a hot dog."]),
    103: ([70], ["A white toilet in a small bathroom."]),
    104: ([22], ["A baby elephant walks through tall grass."]),
    105: ([17], ["A cat sleeping on a bed."]),  # "bed" is ground truth only via the captions
}


def write_coco(root: Path, images: dict[int, tuple[list[int], list[str]]] = IMAGES) -> tuple[Path, Path]:
    """Write minimal COCO instances/captions files; return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    image_entries = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in images]
    instances = {
        "images": image_entries,
        "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c}
            for n, (i, c) in enumerate((i, c) for i, (cats, _) in images.items() for c in cats)
        ],
    }
    captions = {
        "images": image_entries,
        "annotations": [
            {"id": n, "image_id": i, "caption": text}
            for n, (i, text) in enumerate((i, t) for i, (_, caps) in images.items() for t in caps)
        ],
    }
    inst_path, cap_path = root / "instances_val2014.json", root / "captions_val2014.json"
    inst_path.write_text(json.dumps(instances))
    cap_path.write_text(json.dumps(captions))
    return inst_path, cap_path


@pytest.fixture
def evaluator(tmp_path: Path) -> ChairEvaluator:
    return ChairEvaluator.from_coco(*write_coco(tmp_path), mode="lvlm-fix")


@pytest.mark.parametrize(
    ("caption", "nodes"),
    [
        ("Two dogs on the grass.", ["dog"]),  # plural
        ("A puppy.", ["dog"]),  # synonym
        ("A fire hydrant on the sidewalk.", ["fire hydrant"]),  # two-word term
        ("He ate three hot dogs.", ["hot dog"]),  # two-word term, plural; not a dog
        ("A teddy bear.", ["teddy bear"]),  # not a bear
        ("A baby elephant.", ["elephant"]),  # baby + animal -> animal, no person
        ("An adult giraffe and its baby.", ["giraffe", "person"]),  # rule needs adjacency
        ("A bear with a baby cub.", ["bear"]),  # cub and animal are animals too: no person
        ("Two adult animals.", []),
        ("A toilet seat.", ["toilet"]),
        ("A toilet with the seat up.", ["toilet"]),  # seat dropped when a toilet is mentioned
        ("A seat by the window.", ["chair"]),
        ("A man wearing a bow tie.", ["person", "tie"]),
        ("A passenger train on the train tracks.", ["train"]),  # train track is no train
        ("A passenger jet.", ["airplane"]),
        ("A bus and two buses.", ["bus", "bus"]),  # inflect alone would turn "bus" into "bu"
        ("Men holding tennis rackets.", ["person", "tennis racket"]),
        ("Two wine glasses.", ["wine glass"]),
        ("A wine glas.", ["wine glass"]),  # pattern.en's singular of "wine glasses"
        ("Stop signs and traffic lights.", ["stop sign", "traffic light"]),
        ("A hair dryer and cell-phones.", ["hair drier", "cell phone"]),
        ("People riding a motor bike past parking meters.", ["person", "motorcycle", "parking meter"]),
        ("A clear blue sky.", []),
    ],
)
def test_caption_to_objects(caption: str, nodes: list[str]) -> None:
    assert [m.node for m in caption_to_objects(caption, "lvlm-fix")] == nodes


def test_mentions_keep_surface_words_and_multiplicity() -> None:
    mentions = caption_to_objects("A dog chases another dog and a puppy.", "lvlm-fix")
    assert [(m.word, m.node) for m in mentions] == [("dog", "dog"), ("dog", "dog"), ("puppy", "dog")]


def test_packaged_table_has_the_80_coco_categories() -> None:
    table = chair.default_synonyms()
    assert len(table.nodes) == len(set(table.nodes)) == 80
    assert table.nodes[0] == "person" and table.nodes[-1] == "toothbrush"
    pairs = [("girl", "person"), ("motorbike", "motorcycle"), ("sofa", "couch"), ("tv", "tv")]
    assert [table.node_of[synonym] for synonym, _ in pairs] == [node for _, node in pairs]
    assert chair.SINGULARIZER.startswith("inflect ")


def test_synonym_table_rejects_duplicates_and_skips_comments() -> None:
    table = SynonymTable.from_lines(["# comment", "", "dog, puppy", "cat, Kitten "])
    assert table.nodes == ("dog", "cat") and table.node_of["kitten"] == "cat"
    with pytest.raises(DataError, match="'puppy' already maps to 'dog'"):
        SynonymTable.from_lines(["dog, puppy", "cat, puppy"])


RECORDS = [
    # dog, dog, fire hydrant present; car hallucinated -> 4 mentions, 1 hallucinated
    {"image_id": 101, "caption": "Two dogs and a puppy play near a fire hydrant and a car."},
    # person, hot dog present; cat hallucinated -> 3 mentions, 1 hallucinated
    {"image_id": 102, "caption": "A man is eating hot dogs next to a cat."},
    # toilet (the seat is dropped) -> 1 mention
    {"image_id": 103, "caption": "A toilet with its seat up in a clean bathroom."},
    # elephant; "baby" is no person -> 1 mention
    {"image_id": 104, "caption": "A baby elephant walking in the grass."},
    # cat, bed; bed comes from the reference captions -> 2 mentions
    {"image_id": "105", "caption": "A cat lying on a bed."},
    # no objects at all
    {"image_id": 101, "caption": "The picture is blurry."},
]


def test_evaluate_hand_computed(evaluator: ChairEvaluator) -> None:
    result = evaluator.evaluate(RECORDS)
    assert result.n == 6
    assert result.chair_s == pytest.approx(2 / 6)  # captions 1 and 2 hallucinate
    assert result.chair_i == pytest.approx(2 / 11)  # mentions: 4 + 3 + 1 + 1 + 2 + 0
    assert (result.n_mentions, result.n_hallucinated, result.chair_i_defined) == (11, 2, True)
    # recall: covered / gt per caption = 2/2, 2/2, 1/1, 1/1, 2/2, 0/2 -> 8/10
    assert result.recall == pytest.approx(0.8)
    assert result.mean_length == pytest.approx((13 + 10 + 10 + 7 + 6 + 4) / 6)
    first = result.details[0]
    assert first.mentioned == ["dog", "dog", "fire hydrant", "car"]
    assert first.words == ["dog", "puppy", "fire hydrant", "car"]
    assert first.hallucinated == ["car"]
    assert first.gt == ["dog", "fire hydrant"]
    assert result.details[4].gt == ["bed", "cat"] and result.details[4].image_id == 105
    summary = result.as_dict(include_details=False)
    assert summary["settings"]["singularizer_version"] == chair.SINGULARIZER and "details" not in summary
    assert summary["settings"]["chair_mode"] == "lvlm-fix"
    json.dumps(result.as_dict())  # JSON-ready


def test_no_mentions_gives_defined_zero_and_warns(evaluator: ChairEvaluator) -> None:
    with pytest.warns(RuntimeWarning, match="CHAIR_I is undefined"):
        result = evaluator.evaluate([RECORDS[-1]])
    assert (result.chair_s, result.chair_i, result.chair_i_defined) == (0.0, 0.0, False)
    assert result.recall == 0.0  # 0 of the 2 ground-truth objects


def test_gt_objects_union_instances_and_captions(evaluator: ChairEvaluator) -> None:
    assert evaluator.gt_objects(105) == {"cat", "bed"}
    assert evaluator.gt_objects(104) == {"elephant"}  # "baby elephant" in the caption adds no person
    assert evaluator.image_ids == (101, 102, 103, 104, 105)
    assert evaluator.file_names[103] == "COCO_val2014_000000000103.jpg"


def test_counts_feed_bootstrap(evaluator: ChairEvaluator) -> None:
    result = evaluator.evaluate(RECORDS)
    counts = result.counts()
    assert counts.shape == (6, 5)
    assert counts[0].tolist() == [1, 1, 4, 2, 2]
    assert float(chair.STATS["chair_i"](counts)) == pytest.approx(result.chair_i)
    assert float(chair.STATS["chair_s"](counts)) == pytest.approx(result.chair_s)
    assert float(chair.STATS["recall"](counts)) == pytest.approx(result.recall)
    ci = stats.bootstrap_ci(counts, chair.STATS["chair_i"], n_boot=200, batched=True)
    assert ci.estimate == pytest.approx(2 / 11) and 0.0 <= ci.low <= ci.estimate <= ci.high


def test_evaluate_errors_name_the_problem(evaluator: ChairEvaluator) -> None:
    with pytest.raises(DataError, match="image_id 999 is not in the loaded COCO annotations"):
        evaluator.evaluate([{"image_id": 999, "caption": "A dog."}])
    with pytest.raises(DataError, match="record 0 has no 'caption' key"):
        evaluator.evaluate([{"image_id": 101}])
    with pytest.raises(DataError, match="image_id 'abc'"):
        evaluator.evaluate([{"image_id": "abc", "caption": "A dog."}])


def test_from_coco_errors(tmp_path: Path) -> None:
    inst, cap = write_coco(tmp_path / "ok")
    with pytest.raises(DataError, match="COCO instances file not found: .*missing.json"):
        ChairEvaluator.from_coco(tmp_path / "missing.json", cap)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [{"id": 1, "name": "unicorn"}], "annotations": []}))
    with pytest.raises(DataError, match="category 'unicorn' is not in the synonym table"):
        ChairEvaluator.from_coco(bad, cap, mode="lvlm-fix")
    with pytest.raises(DataError, match="category 'unicorn' is not in the original CHAIR synonym table"):
        ChairEvaluator.from_coco(bad, cap, mode="original")
    with pytest.raises(DataError, match="category 'unicorn' is not in the CHAIR synonym table"):
        ChairEvaluator.from_coco(bad, cap, tagger="noun")  # the default, opera mode
    with pytest.raises(DataError, match=r"lacks \['categories'\]"):
        ChairEvaluator.from_coco(cap, cap)  # a captions file passed as instances
    with pytest.raises(DataError, match="malformed COCO captions entry"):
        ChairEvaluator.from_coco(inst, inst)  # instances have no "caption" fields


def test_sample_chair_image_ids_matches_global_random_protocol() -> None:
    ids = list(range(1000, 1100))
    state = random.getstate()
    try:
        random.seed(7)
        expected = random.sample(ids, 10)  # what the VHR scripts do
        random.seed(123)
        after = random.random()
        random.seed(123)
        assert chair.sample_chair_image_ids(ids, n=10, seed=7) == expected
        assert random.random() == after  # the global generator is left alone
    finally:
        random.setstate(state)
    with pytest.raises(DataError, match="n=11 images from a pool of 10"):
        chair.sample_chair_image_ids(ids[:10], n=11)


def test_protocol_constants() -> None:
    assert chair.DEFAULT_PROMPT == "Please describe this image in detail."
    assert chair.DEFAULT_MAX_NEW_TOKENS == 512
    assert chair.DEFAULT_NUM_IMAGES == 500
