"""Shared fixtures: tiny random LVLMs of every supported family, built offline once per session.

Each model is built from a config, saved with ``save_pretrained`` and loaded back through
``lvlm_fix.load`` — the path users take with a real checkpoint.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from lvlm_fix.tiny import FAMILIES, build_image, build_tiny  # noqa: E402

PROMPTS = ["Is there a cat in the image?", "Describe the image.", "What colour is the large object on the left side?"]


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
