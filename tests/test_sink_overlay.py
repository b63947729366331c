"""The `heads` sink map drawn over the image it was recorded on, where the patch grid has the image's shape."""

from __future__ import annotations

import pytest
from PIL import Image

from lvlm_fix.diagnostics import grid_matches_image, head_statistics, write_outputs


@pytest.fixture(scope="module")
def scene_report():
    import lvlm_fix
    from lvlm_fix.cli.main import _default_image

    image, _ = _default_image(None, None)
    # tau 3.5: the testbed's sink scale (VAR's 20 presumes a 4096-wide model), so the map is not empty
    return image, head_statistics(lvlm_fix.load(None), image, "Please describe this image in detail.", tau=3.5)


def test_the_sink_map_is_drawn_over_the_image_beside_the_grid(scene_report, tmp_path):
    image, report = scene_report
    write_outputs(report, tmp_path / "plain")
    write_outputs(report, tmp_path / "over", image=image)
    plain = Image.open(tmp_path / "plain" / "visual_sinks.png")
    over = Image.open(tmp_path / "over" / "visual_sinks.png")
    assert over.width > 1.8 * plain.width  # a second panel: the image at the size of the grid's panel
    assert over.height > 400  # a 96-pixel scene drawn large enough to read


def test_a_grid_of_another_shape_than_the_image_is_not_drawn_over_it(scene_report, tmp_path):
    image, report = scene_report
    wide = image.resize((image.width * 2, image.height))  # as a center-cropping processor would leave it
    assert grid_matches_image((8, 8), image) and not grid_matches_image((8, 8), wide)
    write_outputs(report, tmp_path, image=wide)
    assert Image.open(tmp_path / "visual_sinks.png").width < 700  # the grid alone, with a note in its title


def test_carves_mask_and_crop_are_drawn_over_the_image_at_a_readable_size():
    import numpy as np

    from lvlm_fix.diagnostics import mask_overlay

    image = Image.new("RGB", (96, 96), (200, 200, 200))
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[10:30, 40:60] = 1
    out = np.asarray(mask_overlay(image, mask, (40, 10, 60, 30)))
    assert out.shape[:2] == (384, 384)
    assert tuple(out[80, 200]) == (200, 200, 200)  # kept (row 20, column 50 of the scene): as it was
    assert tuple(out[300, 300]) == (50, 50, 50)  # discarded: dimmed to a quarter
    assert tuple(out[40, 200]) == (255, 0, 0)  # the crop's top edge, outlined


def test_run_and_heads_write_the_overlays(capsys, tmp_path):
    from conftest import cli_run

    code, _, err = cli_run(capsys, "run", "--method", "carve", "--compare", "--prompt", "Is there a cup in the image?",
                           "--max-new-tokens", "2", "--stat-tokens", "2", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert min(Image.open(tmp_path / "run" / "carve_overlay_0.png").size) >= 384
    code, _, err = cli_run(capsys, "heads", "--tau", "3.5", "--out", str(tmp_path / "heads"))
    assert code == 0, err
    assert Image.open(tmp_path / "heads" / "visual_sinks.png").width > 1000  # the grid and the map over the scene
