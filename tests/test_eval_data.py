"""Dataset loaders: POPE (original jsonl and lmms-lab/POPE schema), the CHAIR subset, fingerprints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from lvlm_fix.errors import ConfigError, LvlmFixError, UnknownNameError
from lvlm_fix.evals.data import (
    CocoImageSample,
    DataError,
    PopeSample,
    dataset_fingerprint,
    load_coco_captions_for_chair,
    load_pope_hf,
    load_pope_jsonl,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path, format="PNG")


def write_pope(tmp_path: Path, rows: list[dict], images: list[str]) -> tuple[Path, Path]:
    image_dir = tmp_path / "val2014"
    for name, colour in zip(images, COLOURS):
        write_image(image_dir / name, colour)
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions, image_dir


POPE_ROWS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
    {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
]


def test_load_pope_jsonl(tmp_path: Path) -> None:
    questions, image_dir = write_pope(tmp_path, POPE_ROWS, ["a.jpg", "b.jpg"])
    samples = load_pope_jsonl(questions, image_dir, "random")
    assert [(s.question_id, s.image_key, s.label, s.split) for s in samples] == [
        ("1", "a.jpg", "yes", "random"),
        ("2", "a.jpg", "no", "random"),
        ("3", "b.jpg", "yes", "random"),
    ]
    assert samples[1].question == "Is there a cat in the image?"
    image = samples[2].load_image()
    assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == COLOURS[1]


def test_load_pope_jsonl_names_first_missing_image(tmp_path: Path) -> None:
    rows = POPE_ROWS + [{"question_id": 4, "image": "c.jpg", "text": "?", "label": "no"},
                        {"question_id": 5, "image": "d.jpg", "text": "?", "label": "no"}]
    questions, image_dir = write_pope(tmp_path, rows, ["a.jpg", "b.jpg"])
    with pytest.raises(DataError, match=f"image 'c.jpg' not found in {image_dir}") as info:
        load_pope_jsonl(questions, image_dir, "random")
    assert isinstance(info.value, LvlmFixError) and "\n" not in str(info.value)


def test_load_pope_jsonl_rejects_bad_inputs(tmp_path: Path) -> None:
    questions, image_dir = write_pope(tmp_path, POPE_ROWS, ["a.jpg", "b.jpg"])
    with pytest.raises(UnknownNameError, match="Available: adversarial, popular, random"):
        load_pope_jsonl(questions, image_dir, "randm")
    with pytest.raises(DataError, match="question file not found"):
        load_pope_jsonl(tmp_path / "nope.json", image_dir, "random")
    with pytest.raises(DataError, match="image directory not found"):
        load_pope_jsonl(questions, tmp_path / "nowhere", "random")
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no questions"):
        load_pope_jsonl(empty, image_dir, "random")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**POPE_ROWS[0], "label": "maybe"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.json:1: label 'maybe'"):
        load_pope_jsonl(bad, image_dir, "random")
    bad.write_text(json.dumps(POPE_ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.json:2 is not valid JSON"):
        load_pope_jsonl(bad, image_dir, "random")
    bad.write_text(json.dumps(POPE_ROWS[0]) + "\n" + json.dumps(POPE_ROWS[0]) + "\n")
    with pytest.raises(DataError, match="duplicate question_id '1'"):
        load_pope_jsonl(bad, image_dir, "random")
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg"}) + "\n")
    with pytest.raises(DataError, match=r"lacks \['text', 'label'\]"):
        load_pope_jsonl(bad, image_dir, "random")


def make_hf_pope():  # -> datasets.Dataset in the lmms-lab/POPE schema
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_source": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "id": ["0", "1", "2", "3"],
            "question_id": ["1", "2", "3", "4"],
            "question": ["Is there a dog?", "Is there a cat?", "Is there a car?", "Is there a bus?"],
            "answer": ["yes", "no", "Yes", "no"],
            "image_source": ["COCO_val2014_a", "COCO_val2014_b", "COCO_val2014_c", "COCO_val2014_d"],
            "image": [Image.new("RGB", (2, 2), c) for c in COLOURS],
            "category": ["random", "adversarial", "adversarial", "popular"],
        },
        features=features,
    )


def check_adversarial(samples: list[PopeSample]) -> None:
    assert [(s.question_id, s.image_key, s.label, s.split) for s in samples] == [
        ("2", "COCO_val2014_b", "no", "adversarial"),
        ("3", "COCO_val2014_c", "yes", "adversarial"),
    ]
    # rows 1 and 2 of the table: the loader must keep the original row index for the image
    assert [s.load_image().getpixel((0, 0)) for s in samples] == [COLOURS[1], COLOURS[2]]


def test_load_pope_hf_from_saved_dataset(tmp_path: Path) -> None:
    make_hf_pope().save_to_disk(str(tmp_path / "pope_copy"))
    check_adversarial(load_pope_hf(str(tmp_path / "pope_copy"), "adversarial"))


def test_load_pope_hf_from_parquet(tmp_path: Path) -> None:
    # The hub layout: data/test-00000-of-00001.parquet, loaded with datasets.load_dataset.
    data_dir = tmp_path / "pope_hub" / "data"
    data_dir.mkdir(parents=True)
    make_hf_pope().to_parquet(str(data_dir / "test-00000-of-00001.parquet"))
    cache = str(tmp_path / "cache")
    check_adversarial(load_pope_hf(str(tmp_path / "pope_hub"), split="adversarial", cache_dir=cache))
    one_file = str(data_dir / "test-00000-of-00001.parquet")
    single = load_pope_hf(one_file, split="popular", cache_dir=cache)
    assert [s.question_id for s in single] == ["4"]


def test_load_pope_hf_errors(tmp_path: Path) -> None:
    table = make_hf_pope()
    table.save_to_disk(str(tmp_path / "full"))
    with pytest.raises(ConfigError, match="needs a split"):
        load_pope_hf(str(tmp_path / "full"))
    with pytest.raises(UnknownNameError, match="Did you mean 'popular'"):
        load_pope_hf(str(tmp_path / "full"), split="populr")
    table.remove_columns(["category"]).save_to_disk(str(tmp_path / "no_category"))
    with pytest.raises(DataError, match=r"lacks columns \['category'\]"):
        load_pope_hf(str(tmp_path / "no_category"), split="random")
    partial = table.filter(lambda c: c != "random", input_columns="category")
    partial.save_to_disk(str(tmp_path / "partial"))
    with pytest.raises(DataError, match="no questions in category 'random'"):
        load_pope_hf(str(tmp_path / "partial"), split="random")
    with pytest.raises(DataError, match="local dataset path not found"):  # no hub retries
        load_pope_hf(str(tmp_path / "no" / "such" / "copy"), split="random")


def write_chair_fixture(tmp_path: Path, with_images: set[int]) -> tuple[Path, Path, list[int]]:
    ids = [42, 7, 1000, 3, 99]
    ann_dir, image_dir = tmp_path / "annotations", tmp_path / "val2014"
    ann_dir.mkdir()
    image_dir.mkdir()
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in ids]
    (ann_dir / "instances_val2014.json").write_text(json.dumps({
        "images": images,
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 18}],
    }))
    (ann_dir / "captions_val2014.json").write_text(json.dumps({
        "images": images,
        "annotations": [{"id": n, "image_id": i, "caption": "A photo."} for n, i in enumerate(ids)],
    }))
    for i in with_images:
        write_image(image_dir / f"COCO_val2014_{i:012d}.jpg", COLOURS[0])
    return ann_dir, image_dir, ids


def test_load_coco_captions_for_chair(tmp_path: Path) -> None:
    ann_dir, image_dir, ids = write_chair_fixture(tmp_path, {42, 7, 1000, 3, 99})
    samples, evaluator = load_coco_captions_for_chair(ann_dir, image_dir, n=3, seed=5)
    expected = random.Random(5).sample(ids, 3)  # pool in captions-file order
    assert [s.image_id for s in samples] == expected
    assert samples[0].file_name == f"COCO_val2014_{expected[0]:012d}.jpg"
    assert isinstance(samples[0], CocoImageSample) and samples[0].load_image().size == (4, 3)
    assert evaluator.gt_objects(42) == {"dog"}
    result = evaluator.evaluate([{"image_id": 42, "caption": "A dog and a cat."}])
    assert result.chair_i == pytest.approx(0.5)


def test_load_coco_captions_for_chair_errors(tmp_path: Path) -> None:
    ann_dir, image_dir, ids = write_chair_fixture(tmp_path, set())
    drawn = random.Random(0).sample(ids, 2)
    with pytest.raises(DataError, match=f"image 'COCO_val2014_{drawn[0]:012d}.jpg' not found"):
        load_coco_captions_for_chair(ann_dir, image_dir, n=2, seed=0)
    (ann_dir / "instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances file not found: .*instances_val2014.json"):
        load_coco_captions_for_chair(ann_dir, image_dir, n=2)
    with pytest.raises(DataError, match="pass annotations_dir or both"):
        load_coco_captions_for_chair(None, image_dir, captions_paths=ann_dir / "captions_val2014.json")


def test_dataset_fingerprint(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_bytes(b'{"question_id": 1}\n')
    b.write_bytes(b'{"question_id": 1}\n')
    c.write_bytes(b'{"question_id": 2}\n')
    fp = dataset_fingerprint(a)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert dataset_fingerprint(str(b)) == fp  # content, not name
    assert dataset_fingerprint(c) != fp
    assert dataset_fingerprint([a, c]) != dataset_fingerprint([c, a])

    def sample(qid: str) -> PopeSample:
        return PopeSample(qid, "x.jpg", "Is there a dog?", "yes", "random", image_loader=lambda: None)

    records = [sample("1"), sample("2")]
    assert dataset_fingerprint(records) == dataset_fingerprint([sample("1"), sample("2")])
    assert dataset_fingerprint(records) != dataset_fingerprint(records[::-1])
    # non-plain values (loaders, images) are not part of a record's identity
    assert dataset_fingerprint([{"image_id": 1, "f": print}]) == dataset_fingerprint([{"image_id": 1}])
    with pytest.raises(DataError, match="file not found"):
        dataset_fingerprint(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="both paths and records"):
        dataset_fingerprint([a, records[0]])
    with pytest.raises(DataError, match="nothing to fingerprint"):
        dataset_fingerprint([])
