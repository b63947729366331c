"""Write the synthetic POPE + CHAIR + AMBER + region benchmark, built the way each original is.

Layout of a benchmark directory::

    images/synthetic_val_000000000001.png ...   the held-out scenes (never training scenes)
    images/synthetic_region_000000000001.png .. the region task's scenes (192 x 192)
    synthetic_pope_random.jsonl                 POPE questions, original format, one per line:
    synthetic_pope_popular.jsonl                  {"question_id", "image", "text", "label"}
    synthetic_pope_adversarial.jsonl
    synthetic_region_existence.jsonl            region task, POPE format (+ "bbox" of the target)
    synthetic_region_colour.jsonl               region task, "What color is the {obj}?" -> colour word
    objects.jsonl                               POPE's ground-truth file: {"image", "objects"}
    instances_val.json                          COCO instances (images, annotations, categories)
    captions_val.json                           COCO captions, 5 references per image
    amber/                                      an AMBER-format set (see below)
    meta.json                                   version, seeds, sizes, the statistics used

POPE sampling follows AoiDragon/POPE exactly: per image, the first three ground-truth
objects (in annotation order) are the positives; each is followed by one negative,
chosen at random (``random``), as the most frequent object not yet used and absent
(``popular``), or as the absent object that co-occurs most with that positive
(``adversarial``); "an" replaces "a" before vowels. Frequencies and co-occurrences come
from the world's statistics (``World.statistics``), the analogue of POPE's COCO counts.
Only images with at least three object categories are used, as in POPE.

The **region task** (``World.region_scene``): one small object among dense clutter and a
few ordinary objects, drawn at twice the model's input side, so that the processor's
downsampling blurs the small object and cropping + magnifying the right region recovers it.
Per image: "Is there a {target} in the image?" (yes), the same question for a uniformly
drawn absent category (no), and "What color is the {target}?". Each row also carries the
target's box ``[x, y, w, h]`` in image pixels, for analysis only (a method must not read it).

The **AMBER-format set** (``amber/``) follows AMBER's own files: ``images/AMBER_{k}.png``;
``query/query_generative.json`` (``{"id", "image", "query": "Describe this image."}``, ids
1..N); ``query/query_discriminative-{existence,attribute,relation}.json``, their union
``query_discriminative.json`` and ``query_all.json``, discriminative ids continuing after the
generative ones; ``annotations.json``, a list where item k has id k+1 (generative: ``truth``
objects and ``hallu``, the absent objects that co-occur most with the present ones;
discriminative: ``type`` and ``truth`` yes/no); ``relation.json`` (every object word ->
its synonyms) and ``safe_words.txt``. Existence questions are all "no" as in AMBER
(``discriminative-hallucination``: the most co-occurring absent object and a random absent
one); colour (``discriminative-attribute-state``), count
(``discriminative-attribute-number``) and contact (``discriminative-relation``, contact as
in ``World.contacts``) questions are balanced yes/no. The world has no actions, so there
are no ``discriminative-attribute-action`` items.

Files are byte-for-byte reproducible: fixed seeds, sorted JSON keys, fixed PNG settings,
no timestamps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import colour_check_question, colour_query, existence_question, number_question, relation_question
from .world import (
    CATEGORIES,
    CATEGORY_INDEX,
    CATEGORY_NAMES,
    COLOUR_NAMES,
    REFERENCE_SYNONYMS,
    REGION_IMAGE_SIZE,
    World,
    question_for,
)

BENCHMARK_VERSION = "synthetic-v2"
REGION_TASKS: tuple[str, ...] = ("existence", "colour")
AMBER_GENERATIVE_QUERY = "Describe this image."
AMBER_EXISTENCE_TEMPLATE = "Is there {a_obj} in this image?"
# AMBER's discriminative query files, by the part of the name after "query_discriminative-".
AMBER_QUERY_FILES: tuple[str, ...] = ("existence", "attribute", "relation")
AMBER_SAFE_WORDS: tuple[str, ...] = (
    "image", "picture", "photo", "scene", "view", "object", "objects", "thing", "things", "color",
    "colour", "background", "side", "front", "top", "bottom", "middle", "center", "left", "right",
)
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
QUESTIONS_PER_IMAGE = 3  # POPE: 3 positives + 3 negatives per image
DEFAULT_N_IMAGES = 500   # POPE and CHAIR both use 500 images


@dataclass(frozen=True)
class SyntheticBenchmark:
    """Paths of a written benchmark."""

    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def pope_file(self, split: str) -> Path:
        """The POPE question file of ``split`` (random, popular or adversarial)."""
        if split not in POPE_SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; choose one of {POPE_SPLITS}")
        return self.root / f"synthetic_pope_{split}.jsonl"

    @property
    def instances_file(self) -> Path:
        return self.root / "instances_val.json"

    @property
    def captions_file(self) -> Path:
        return self.root / "captions_val.json"

    @property
    def objects_file(self) -> Path:
        return self.root / "objects.jsonl"

    @property
    def meta_file(self) -> Path:
        return self.root / "meta.json"

    def region_file(self, task: str) -> Path:
        """The region task's question file: ``"existence"`` (POPE format) or ``"colour"``."""
        if task not in REGION_TASKS:
            raise ValueError(f"unknown region task {task!r}; choose one of {REGION_TASKS}")
        return self.root / f"synthetic_region_{task}.jsonl"

    @property
    def amber_dir(self) -> Path:
        """Root of the AMBER-format set (``images/``, ``query/``, ``annotations.json``, ...)."""
        return self.root / "amber"


def image_file_name(image_id: int) -> str:
    """COCO-style file name; CHAIR tools parse the id from the last ``_`` field."""
    return f"synthetic_val_{image_id:012d}.png"


def region_image_name(image_id: int) -> str:
    """File name of a region-task image (beside the POPE/CHAIR images)."""
    return f"synthetic_region_{image_id:012d}.png"


def pope_questions(objects: list[tuple[str, list[str]]], split: str, seed: int,
                   frequency: dict[str, int], cooccurrence: dict[str, dict[str, int]],
                   ) -> list[dict[str, Any]]:
    """POPE questions for images with known objects, sampled as in AoiDragon/POPE.

    Args:
        objects: ``(image file name, distinct objects in annotation order)`` per image;
            every image needs at least ``QUESTIONS_PER_IMAGE`` objects.
        split: ``"random"``, ``"popular"`` or ``"adversarial"``.
        seed: seeds the random choices (random negatives and fall-backs).
        frequency: images containing each category (ranks "popular" negatives).
        cooccurrence: ``cooccurrence[a][b]`` images with both (ranks "adversarial" ones).

    Returns:
        Question dicts in file order: positive, negative, positive, negative, ...
    """
    rng = random.Random(seed * 10 + POPE_SPLITS.index(split))
    # Ties broken by the world's category order, so the ranking is a fixed total order.
    popular = sorted(CATEGORY_NAMES, key=lambda c: (-frequency[c], CATEGORY_INDEX[c]))
    co_ranked = {a: sorted(cooccurrence[a], key=lambda b: (-cooccurrence[a][b], CATEGORY_INDEX[b]))
                 for a in CATEGORY_NAMES}
    questions: list[dict[str, Any]] = []

    def add(image: str, obj: str, label: str) -> None:
        questions.append({"question_id": len(questions) + 1, "image": image,
                          "text": question_for(obj), "label": label})

    for image, objs in objects:
        used: list[str] = []
        for pos in objs[:QUESTIONS_PER_IMAGE]:
            used.append(pos)
            add(image, pos, "yes")
            candidates = {"random": [], "popular": popular, "adversarial": co_ranked[pos]}[split]
            neg = next((c for c in candidates if c not in used and c not in objs), None)
            while neg is None or neg in used or neg in objs:  # POPE's random draw / fall-back
                neg = rng.choice(CATEGORY_NAMES)
            used.append(neg)
            add(image, neg, "no")
    return questions


def write_region(bench: SyntheticBenchmark, seed: int, n_images: int, world: World) -> None:
    """The region task's images and its two question files (see the module docstring)."""
    big = World(world.seed, REGION_IMAGE_SIZE * world.image_size // 96)
    rng = random.Random(seed * 10 + 7)
    existence: list[dict[str, Any]] = []
    colour: list[dict[str, Any]] = []
    for image_id in range(1, n_images + 1):
        scene = big.region_scene("region", image_id - 1, stream=seed)
        image, masks = big.render_with_masks(scene)
        name = region_image_name(image_id)
        image.save(bench.images_dir / name, format="PNG", compress_level=6, optimize=False)
        target = scene.target_object
        assert target is not None
        bbox = list(big.annotate(scene, masks)[scene.target].bbox)
        absent = [c for c in CATEGORY_NAMES if c not in scene.categories]
        for obj, label in ((target.category, "yes"), (rng.choice(absent), "no")):
            existence.append({"question_id": len(existence) + 1, "image": name, "text": question_for(obj),
                              "label": label, "bbox": bbox})
        colour.append({"question_id": len(colour) + 1, "image": name, "text": colour_query(target.category),
                       "label": target.colour, "bbox": bbox})
    _write_jsonl(bench.region_file("existence"), existence)
    _write_jsonl(bench.region_file("colour"), colour)


def write_amber(root: Path, seed: int, n_images: int, world: World,
                cooccurrence: dict[str, dict[str, int]]) -> None:
    """An AMBER-format set of ``n_images`` held-out scenes under ``root`` (module docstring).

    Args:
        root: the ``amber/`` directory to write.
        seed: benchmark seed (scene stream and random choices).
        n_images: images; each gets one generative query and several discriminative ones.
        world: the world to draw from.
        cooccurrence: the world's co-occurrence counts (rank the plausible absent objects).
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "query").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 10 + 8)
    generative: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    # Candidate discriminative questions, per kind: (image, query, type, truth).
    cands: dict[str, list[tuple[str, str, str, str]]] = {
        "existence": [], "state": [], "number_yes": [], "number_no": [], "relation_yes": [], "relation_no": []}
    for k in range(1, n_images + 1):
        scene = world.scene("amber", k - 1, stream=seed, min_categories=2)
        image, masks = world.render_with_masks(scene)
        name = f"AMBER_{k}.png"
        image.save(root / "images" / name, format="PNG", compress_level=6, optimize=False)
        present = sorted(scene.categories, key=CATEGORY_INDEX.__getitem__)
        absent = [c for c in CATEGORY_NAMES if c not in present]
        score = {c: sum(cooccurrence[p][c] for p in present) for c in absent}
        plausible = sorted(absent, key=lambda c: (-score[c], CATEGORY_INDEX[c]))
        generative.append({"id": k, "image": name, "query": AMBER_GENERATIVE_QUERY})
        annotations.append({"id": k, "type": "generative", "truth": present, "hallu": plausible[:3]})

        # Existence: all "no" (AMBER's hallucination probes): the most plausible absent object
        # and one drawn uniformly from the rest.
        others = plausible[1:]
        for obj in (plausible[0], rng.choice(others)):
            cands["existence"].append((name, existence_question(obj, AMBER_EXISTENCE_TEMPLATE),
                                       "discriminative-hallucination", "no"))
        # Colour: one true and one false statement about one present object.
        obj = rng.choice(present)
        wrong = rng.choice([c for c in COLOUR_NAMES if c != scene.colour_of(obj)])
        for colour, truth in ((scene.colour_of(obj), "yes"), (wrong, "no")):
            cands["state"].append((name, colour_check_question(obj, colour), "discriminative-attribute-state", truth))
        # Count: every repeated category gives a true question; one false question per image.
        counts = scene.counts()
        for obj in present:
            if counts[obj] > 1:
                cands["number_yes"].append((name, number_question(_plural(obj), counts[obj]),
                                            "discriminative-attribute-number", "yes"))
        obj = rng.choice(present)
        n = rng.choice([m for m in (2, 3) if m != counts[obj]])
        cands["number_no"].append((name, number_question(_plural(obj), n), "discriminative-attribute-number", "no"))
        # Contact: every touching pair is a yes candidate, one apart pair a no candidate.
        touching = world.contacts(scene, masks)
        for a, b in touching:
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            cands["relation_yes"].append((name, relation_question(a, b), "discriminative-relation", "yes"))
        apart = [(a, b) for i, a in enumerate(present) for b in present[i + 1:] if (a, b) not in touching]
        if apart:
            a, b = rng.choice(apart)
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            cands["relation_no"].append((name, relation_question(a, b), "discriminative-relation", "no"))

    # Balance count and contact questions: as many "no" as "yes" (a seeded subsample).
    def balanced(yes: list, no: list) -> list:
        m = min(len(yes), len(no))
        keep_yes = sorted(rng.sample(range(len(yes)), m))
        keep_no = sorted(rng.sample(range(len(no)), m))
        return [yes[i] for i in keep_yes] + [no[i] for i in keep_no]

    files = {
        "existence": cands["existence"],
        "attribute": cands["state"] + balanced(cands["number_yes"], cands["number_no"]),
        "relation": balanced(cands["relation_yes"], cands["relation_no"]),
    }
    queries: dict[str, list[dict[str, Any]]] = {}
    next_id = n_images + 1
    for kind in AMBER_QUERY_FILES:
        # Image order within a file, so that a file reads like AMBER's (by image, then kind).
        rows = sorted(files[kind], key=lambda r: (int(r[0][6:-4]), r[2]))
        queries[kind] = []
        for image, query, kind_type, truth in rows:
            queries[kind].append({"id": next_id, "image": image, "query": query})
            annotations.append({"id": next_id, "type": kind_type, "truth": truth})
            next_id += 1
    discriminative = [q for kind in AMBER_QUERY_FILES for q in queries[kind]]
    for kind in AMBER_QUERY_FILES:
        _write_json(root / "query" / f"query_discriminative-{kind}.json", queries[kind])
    _write_json(root / "query" / "query_discriminative.json", discriminative)
    _write_json(root / "query" / "query_generative.json", generative)
    _write_json(root / "query" / "query_all.json", generative + discriminative)
    _write_json(root / "annotations.json", annotations)
    relation = {c: [REFERENCE_SYNONYMS[c]] if c in REFERENCE_SYNONYMS else [] for c in CATEGORY_NAMES}
    _write_json(root / "relation.json", relation)
    (root / "safe_words.txt").write_text("".join(w + "\n" for w in AMBER_SAFE_WORDS), encoding="utf-8")


def _plural(category: str) -> str:
    return CATEGORIES[CATEGORY_INDEX[category]].plural


def write_benchmark(out_dir: str | Path, seed: int = 0, n_images: int = DEFAULT_N_IMAGES, *,
                    world: World | None = None, n_region: int | None = None,
                    n_amber: int | None = None) -> SyntheticBenchmark:
    """Write the synthetic benchmark (images, POPE files, COCO annotations, region task,
    AMBER-format set) to ``out_dir``.

    Args:
        out_dir: target directory (created; existing files with the same names are replaced).
        seed: benchmark seed: picks the held-out scenes and every random draw.
        n_images: images (POPE asks 6 questions about each; CHAIR captions each).
        world: the world to draw from (default ``World()``, the one the testbed learned).
        n_region: region-task images (3 questions each); default ``n_images``.
        n_amber: AMBER-format images; default ``n_images``.

    Returns:
        The paths of the written benchmark.
    """
    world = world or World()
    n_region = n_images if n_region is None else n_region
    n_amber = n_images if n_amber is None else n_amber
    bench = SyntheticBenchmark(Path(out_dir))
    bench.images_dir.mkdir(parents=True, exist_ok=True)
    frequency, cooccurrence = world.statistics()

    images, instances, captions, objects = [], [], [], []
    for image_id in range(1, n_images + 1):
        scene = world.scene("val", image_id - 1, stream=seed, min_categories=QUESTIONS_PER_IMAGE)
        image, masks = world.render_with_masks(scene)
        name = image_file_name(image_id)
        # Fixed zlib level and no optimisation pass: identical bytes on every run.
        image.save(bench.images_dir / name, format="PNG", compress_level=6, optimize=False)
        images.append({"id": image_id, "file_name": name, "width": world.image_size,
                       "height": world.image_size})
        for ann in world.annotate(scene, masks):
            x, y, w, h = ann.bbox
            instances.append({
                "id": len(instances) + 1, "image_id": image_id,
                "category_id": CATEGORIES[CATEGORY_INDEX[ann.category]].coco_id,
                "bbox": [x, y, w, h], "area": ann.area, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        for text in world.reference_captions(scene):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        objects.append((name, scene.categories))

    info = {"description": "lvlm-fix synthetic world benchmark", "version": BENCHMARK_VERSION,
            "benchmark_seed": seed, "world_seed": world.seed}
    categories = sorted(({"id": c.coco_id, "name": c.name, "supercategory": c.supercategory}
                         for c in CATEGORIES), key=lambda c: c["id"])
    _write_json(bench.instances_file, {"info": info, "licenses": [], "images": images,
                                       "annotations": instances, "categories": categories})
    _write_json(bench.captions_file, {"info": info, "licenses": [], "images": images,
                                      "annotations": captions})
    _write_jsonl(bench.objects_file, [{"image": name, "objects": objs} for name, objs in objects])
    for split in POPE_SPLITS:
        _write_jsonl(bench.pope_file(split),
                     pope_questions(objects, split, seed, frequency, cooccurrence))
    write_region(bench, seed, n_region, world)
    write_amber(bench.amber_dir, seed, n_amber, world, cooccurrence)
    # meta.json last: it marks the benchmark complete (see ensure_benchmark).
    _write_json(bench.meta_file, {**info, "n_images": n_images, "n_region": n_region, "n_amber": n_amber,
                                  "image_size": world.image_size, "region_image_size": REGION_IMAGE_SIZE,
                                  "frequency": frequency, "cooccurrence": cooccurrence})
    return bench


def default_cache_root() -> Path:
    """``$LVLM_FIX_CACHE`` if set, else ``~/.cache/lvlm_fix``."""
    return Path(os.environ.get("LVLM_FIX_CACHE") or Path.home() / ".cache" / "lvlm_fix").expanduser()


def ensure_benchmark(cache_dir: str | Path | None = None, *, seed: int = 0,
                     n_images: int = DEFAULT_N_IMAGES) -> Path:
    """Write the benchmark once and reuse it afterwards.

    Args:
        cache_dir: the benchmark directory. Default: ``<cache root>/{BENCHMARK_VERSION}`` for
            the default seed and size (``...-seed{seed}-n{n_images}`` otherwise), where
            the cache root is ``$LVLM_FIX_CACHE`` or ``~/.cache/lvlm_fix``.
        seed: benchmark seed.
        n_images: number of images.

    Returns:
        The benchmark directory (see :class:`SyntheticBenchmark` for its files).
    """
    if cache_dir is None:
        name = BENCHMARK_VERSION
        if (seed, n_images) != (0, DEFAULT_N_IMAGES):
            name += f"-seed{seed}-n{n_images}"
        cache_dir = default_cache_root() / name
    target = Path(cache_dir)
    if _is_complete(target, seed, n_images):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and move it into place, so a crash or a concurrent reader
    # never sees half a benchmark (meta.json, written last, marks completeness).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_benchmark(tmp, seed=seed, n_images=n_images)
        if target.exists():
            if _is_complete(target, seed, n_images):  # another process won the race
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_complete(root: Path, seed: int, n_images: int) -> bool:
    meta = SyntheticBenchmark(root).meta_file
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("version"), data.get("benchmark_seed"), data.get("n_images")) == (
        BENCHMARK_VERSION, seed, n_images)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
