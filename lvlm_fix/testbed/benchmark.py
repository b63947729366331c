"""Write the synthetic POPE + CHAIR benchmark, built the way POPE and CHAIR build theirs.

Layout of a benchmark directory::

    images/synthetic_val_000000000001.png ...   the held-out scenes (never training scenes)
    synthetic_pope_random.jsonl                 POPE questions, original format, one per line:
    synthetic_pope_popular.jsonl                  {"question_id", "image", "text", "label"}
    synthetic_pope_adversarial.jsonl
    objects.jsonl                               POPE's ground-truth file: {"image", "objects"}
    instances_val.json                          COCO instances (images, annotations, categories)
    captions_val.json                           COCO captions, 5 references per image
    meta.json                                   version, seeds, sizes, the statistics used

POPE sampling follows AoiDragon/POPE exactly: per image, the first three ground-truth
objects (in annotation order) are the positives; each is followed by one negative,
chosen at random (``random``), as the most frequent object not yet used and absent
(``popular``), or as the absent object that co-occurs most with that positive
(``adversarial``); "an" replaces "a" before vowels. Frequencies and co-occurrences come
from the world's statistics (``World.statistics``), the analogue of POPE's COCO counts.
Only images with at least three object categories are used, as in POPE.

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

from .world import CATEGORIES, CATEGORY_INDEX, CATEGORY_NAMES, World, question_for

BENCHMARK_VERSION = "synthetic-v1"
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


def image_file_name(image_id: int) -> str:
    """COCO-style file name; CHAIR tools parse the id from the last ``_`` field."""
    return f"synthetic_val_{image_id:012d}.png"


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


def write_benchmark(out_dir: str | Path, seed: int = 0, n_images: int = DEFAULT_N_IMAGES, *,
                    world: World | None = None) -> SyntheticBenchmark:
    """Write the synthetic benchmark (images, POPE files, COCO annotations) to ``out_dir``.

    Args:
        out_dir: target directory (created; existing files with the same names are replaced).
        seed: benchmark seed: picks the held-out scenes and POPE's random draws.
        n_images: images (POPE asks 6 questions about each; CHAIR captions each).
        world: the world to draw from (default ``World()``, the one the testbed learned).

    Returns:
        The paths of the written benchmark.
    """
    world = world or World()
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
    _write_json(bench.meta_file, {**info, "n_images": n_images, "image_size": world.image_size,
                                  "frequency": frequency, "cooccurrence": cooccurrence})
    return bench


def default_cache_root() -> Path:
    """``$LVLM_FIX_CACHE`` if set, else ``~/.cache/lvlm_fix``."""
    return Path(os.environ.get("LVLM_FIX_CACHE") or Path.home() / ".cache" / "lvlm_fix").expanduser()


def ensure_benchmark(cache_dir: str | Path | None = None, *, seed: int = 0,
                     n_images: int = DEFAULT_N_IMAGES) -> Path:
    """Write the benchmark once and reuse it afterwards.

    Args:
        cache_dir: the benchmark directory. Default: ``<cache root>/synthetic-v1`` for the
            default seed and size (``synthetic-v1-seed{seed}-n{n_images}`` otherwise), where
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
