"""lvlm_fix.generate() with generate()'s own output object (return_dict_in_generate=True): the texts as
without it, and the scores kept, for the vanilla model, a method inside generate() and one wrapping it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import lvlm_fix


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load()


@pytest.mark.parametrize("method", [None, "vhr", "carve"])
def test_return_dict_in_generate_keeps_the_output_and_the_texts(testbed, method):
    image = Image.new("RGB", (96, 96), (100, 120, 140))
    rows = [image, image], ["Is there a cup in the image?", "Describe this image."]
    plain = lvlm_fix.generate(testbed, *rows, method=method, max_new_tokens=4)
    full = lvlm_fix.generate(testbed, *rows, method=method, max_new_tokens=4,
                             generate_kwargs={"return_dict_in_generate": True, "output_scores": True})
    assert plain.output is None
    assert full.texts == plain.texts and full.tokens == plain.tokens
    assert full.output.sequences.shape[0] == 2
    assert len(full.output.scores) == max(plain.tokens) and all(torch.isfinite(s).any() for s in full.output.scores)
