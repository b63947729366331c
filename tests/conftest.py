"""Shared fixtures: tiny random LVLMs of every supported family, built offline once per session.

Each model is built from a config, saved with ``save_pretrained`` and loaded back through
``lvlm_fix.load`` — the path users take with a real checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from lvlm_fix.testing.tiny import FAMILIES, build_image, build_tiny  # noqa: E402

PROMPTS = ["Is there a cat in the image?", "Describe the image.", "What colour is the large object on the left side?"]

# The smoke subset, `python -m pytest -m smoke`: one quick file per area (the evals' scorers and statistics,
# the image layout, POPE's presets, three methods of three stages, the CLI's help and the demo, the docs build),
# under 3 minutes on 2 cores; `python -m pytest` runs everything.
SMOKE_FILES = frozenset({
    "test_pope.py", "test_chair.py", "test_stats.py", "test_layout.py", "test_presets.py",
    "test_vhr.py", "test_var.py", "test_vcd.py", "test_cli_help.py", "test_demo.py", "test_docs.py",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SMOKE_FILES:
            item.add_marker(pytest.mark.smoke)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of its saved tiny model (built lazily, once)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny(family, root / family, seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_dirs):
    """family -> loaded LVLM handle (fp32, CPU), shared by the session's tests."""
    import lvlm_fix

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = lvlm_fix.load(tiny_dirs(family), dtype="float32")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def images():
    return [build_image(seed) for seed in range(3)]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# Settings under which each method acts on the tiny random models (tests/test_methods.py runs every
# family with them, tests/test_check_method.py the tiny LLaVA), whose attention is nearly
# uniform: VAR's tau = 20 presumes a 4096-wide backbone (|x_d|/rms(x) <= sqrt(D) = 8 here), and
# no key reaches ACT's mean-attention threshold 0.1, so both thresholds are lowered. The contrastive
# methods act at their defaults (their plausibility cuts keep almost every token of these flat
# distributions, and M3ID's gate is open). MVP's captions and yes/no paths are cut short (the
# defaults are 512 and 50 tokens), one path per view.
ACTIVE = {
    "vhr": {},
    "var": {"tau": 2.5},
    "act": {"thres": 0.03},
    "carve": {},
    "paint": {},
    "mvp": {"caption_max_new_tokens": 3, "path_max_new_tokens": 3, "top_k": 1},
    "vcd": {},
    "icd": {},
    "m3id": {},
    "pai": {},
    "avisc": {},
    "clearsight": {},
    "hgai": {},
    "dola": {},
    "deco": {},
    "vista": {},
    "only": {},
    "memvr": {},
    "opera": {},
    # VTI calibrates on the tests' 8 caption pairs; its vision part serves one image per row, so the matrix over
    # every family steers the text decoder only.
    "vti": {"demos": str(Path(__file__).resolve().parent / "vti_demos" / "demos.jsonl"), "alpha_image": 0.0,
            "num_trials": 4},
}


OBJECTS = {1: "dog", 2: "cup", 3: "car"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A 4-image COCO-format fixture: drawn images, POPE question files, instances and captions."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    images, anns, caps, questions = [], [], [], {"random": [], "popular": [], "adversarial": []}
    for i in range(4):
        name = f"COCO_val2014_{i:012d}.jpg"
        im = Image.new("RGB", (64, 64), (30 * i, 80, 120))
        ImageDraw.Draw(im).ellipse((10 + 5 * i, 10, 40, 40), fill=(250, 200, 0))
        im.save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 64, "height": 64})
        present = [1 + i % 3]
        anns += [{"id": 10 * i + c, "image_id": i, "category_id": c, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}
                 for c in present]
        caps += [{"id": 100 + i, "image_id": i, "caption": f"a photo with a {OBJECTS[present[0]]} ."}]
        for split in questions:
            absent = [c for c in OBJECTS if c not in present][0 if split != "adversarial" else 1]
            questions[split] += [
                {"question_id": 2 * i, "image": name, "text": f"Is there a {OBJECTS[present[0]]} in the image?", "label": "yes"},
                {"question_id": 2 * i + 1, "image": name, "text": f"Is there a {OBJECTS[absent]} in the image?", "label": "no"},
            ]
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in OBJECTS.items()]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    for split, rows in questions.items():
        (root / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def no_plan_left(model) -> bool:
    """No plan is active on ``model`` and none of its modules still carries a plan seat."""
    from lvlm_fix.hooks.attention import SEAT_ATTR, active_plan

    return active_plan(model) is None and not any(SEAT_ATTR in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, images):
    """A PNG of the first test image, for the CLI's --image."""
    path = tmp_path_factory.mktemp("img") / "scene.png"
    images[0].save(path)
    return path


def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: ``(exit code, stdout, stderr)``."""
    from lvlm_fix.cli.main import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI expecting a user error: exit code 2, exactly one ``error:`` line, no traceback."""
    from lvlm_fix.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
