"""Image layout read from the processor's output: the `heads` sink figure and any family's grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import PROMPTS
from lvlm_fix.diagnostics import head_statistics, image_grid, write_outputs
from lvlm_fix.errors import LvlmFixError
from lvlm_fix.layout import image_token_grids


def _portrait(seed: int = 0) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (128, 32, 3), generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.uint8).numpy())


def test_the_sink_figure_uses_the_processors_grid_for_a_portrait_qwen_image(tiny, tmp_path):
    lvlm = tiny("qwen2_vl")
    report = head_statistics(lvlm, _portrait(), PROMPTS[0], tau=2.5)
    thw = lvlm.encode([_portrait()], PROMPTS[:1])["image_grid_thw"][0].tolist()
    assert report["image_grid"] == [thw[1] // 2, thw[2] // 2, 0]  # rows follow the image's height
    assert report["image_grid"][0] > report["image_grid"][1]  # portrait: more rows than columns
    written = write_outputs(report, tmp_path)
    assert (tmp_path / "visual_sinks.png") in written and (tmp_path / "visual_sinks.png").stat().st_size > 0


def test_llava_next_anyres_draws_the_base_view_and_counts_the_tiles(tiny, images):
    lvlm = tiny("llava_next")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    info = image_grid(lvlm, batch)
    n_image = int(lvlm.image_token_mask(batch["input_ids"]).sum())
    assert info["image_grid"] == [4, 4, 0] and n_image > 16  # base view first; tiles and newlines after it
    assert len(info["image_token_positions"]) == n_image


def test_pixtral_grid_comes_from_image_sizes_not_a_square_guess():
    from lvlm_fix.testing.families import image_token_count, tiny_batch, tiny_model
    from lvlm_fix.model import wrap

    model = tiny_model("mistral3")
    lvlm = wrap(model)
    step = model.config.vision_config.patch_size * model.config.spatial_merge_size
    h, w = 2 * step, 4 * step  # a landscape image: 2 x 4 merged patches
    pixels = {"pixel_values": torch.randn(1, 3, h, w), "image_sizes": torch.tensor([[h, w]])}
    n = image_token_count(model, pixels)
    assert n == 8
    batch = tiny_batch(model, text_lengths=(3,))
    ids = batch["input_ids"]
    ids = torch.cat([ids[:, :3], torch.full((1, n), model.config.image_token_id), ids[:, -4:]], 1)
    grids = image_token_grids(lvlm, {"input_ids": ids, **pixels})
    assert (grids[0].rows, grids[0].cols) == (2, 4)


def test_a_family_whose_image_tokens_are_not_patches_says_so():
    from lvlm_fix.testing.families import tiny_batch, tiny_model
    from lvlm_fix.model import wrap

    model = tiny_model("aria")
    with pytest.raises(LvlmFixError, match="not a patch grid: they are the queries of a cross-attention projector"):
        image_token_grids(wrap(model), tiny_batch(model))


def test_no_grid_still_draws_the_tokens_in_order_and_says_why(tiny, tmp_path):
    lvlm = tiny("llava")
    report = head_statistics(lvlm, Image.new("RGB", (64, 64)), PROMPTS[0], tau=2.5)
    report["image_grid"], report["image_grid_error"] = None, "no grid in this test"
    assert (tmp_path / "visual_sinks.png") in write_outputs(report, tmp_path)
