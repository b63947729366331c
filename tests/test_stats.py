"""Head statistics on constructed cases, and through a real forward of a tiny model."""

from __future__ import annotations

import math

import torch

import lvlm_fix
from lvlm_fix.hooks.plan import AttnContext
from lvlm_fix.diagnostics import HeadStatistics, entropy, image_mass
from lvlm_fix.interventions.var import discover_sink_dims, sink_scores
from lvlm_fix.interventions.vhr import head_divergence, outlier_filter


def test_entropy_matches_hand_computed_values():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397 nats
    assert math.isclose(entropy(probs).item(), expected, rel_tol=1e-6)
    # Over keys 1 and 2 only: renormalised to [0.5, 0.5] -> ln 2.
    keep = torch.tensor([[False, True, True, False]])
    assert math.isclose(entropy(probs, keep).item(), math.log(2), rel_tol=1e-6)
    assert entropy(probs, torch.zeros_like(keep)).item() == 0.0


def test_image_mass_sums_image_keys_per_head():
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.0, 0.5]]])  # [b=1, h=2, k=3]
    keys = torch.tensor([[False, True, True]])
    assert torch.allclose(image_mass(probs, keys), torch.tensor([[0.9, 0.5]]))


def _recorder_with(a: torch.Tensor, b: torch.Tensor) -> HeadStatistics:
    rec = HeadStatistics(text_heads={0: b[None]}, sink_dims=(0,))  # [1 row, h, d] at the last position
    ctx = AttnContext(layer=0, phase="prefill", step=0, query_positions=torch.arange(3), image_end=torch.tensor([2]))
    rec.head_output(a[None, None].expand(1, 3, *a.shape), ctx)  # [1 row, 3 positions, h, d]
    return rec


def test_a_head_that_cannot_see_the_image_has_vhd_zero():
    with_image = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.5, 0.5]])  # [h=3, d=2]
    text_only = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])  # heads 0 and 2 ignore the image
    rec = _recorder_with(with_image, text_only)
    assert torch.equal(rec.vhd[0][0], torch.tensor([0.0, 5.0, 0.0]))
    assert torch.allclose(rec.text_norm_sq[0][0], torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(head_divergence(with_image, text_only), torch.tensor([0.0, 5.0, 0.0]))


def test_outlier_filter_zeroes_heads_high_in_both_vhd_and_text_norm():
    vhd = torch.tensor([1.0, 1.0, 1.0, 9.0, 9.5])
    ta = torch.tensor([1.0, 1.0, 1.0, 1.0, 20.0])
    # mean+std of vhd = 4.3 + 4.35 = 8.65 -> heads 3, 4 high; of ta = 4.8 + 8.50 -> only head 4 high.
    assert torch.equal(outlier_filter(vhd, ta), torch.tensor([1.0, 1.0, 1.0, 9.0, 0.0]))


def test_a_planted_massive_activation_is_a_sink_and_its_dimension_is_discovered():
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 1024)  # |x|/rms is at most sqrt(D): tau = 20 needs D > 400, as in real LVLMs
    hidden[0, 3, 7] = 1000.0
    assert discover_sink_dims(hidden) == (7,)
    phi = sink_scores(hidden, (7,))
    assert phi[0, 3] > 20 and (phi[0, torch.arange(10) != 3] < 20).all()


def test_planted_sink_found_through_a_real_forward(tiny, images):
    """Plant a massive activation on one image token after layer 0: `heads` finds token and dim.

    The tiny model is 64 wide, so |x|/rms <= 8: the threshold is lowered to 5 accordingly.
    """
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], ["Is there a cat in the image?"])
    image_pos = torch.nonzero(batch["input_ids"][0] == lvlm.image_token_id).flatten()
    target, dim = int(image_pos[5]), 11

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > target:  # the image row of the prefill (text-only rows are shorter-coded)
            hidden[0, target, dim] = 500.0
        return output

    handle = lvlm.text_layers[0].register_forward_hook(plant)
    try:
        report = lvlm_fix.head_statistics(lvlm, images[0], "Is there a cat in the image?", tau=5.0)
    finally:
        handle.remove()
    assert report["sink_dims"][0] == dim and report["sink_dims_source"] == "discovered"
    for layer in range(1, lvlm.num_layers):
        assert report["visual_sinks"][str(layer)][0] == [5]
    assert report["visual_sinks"]["0"][0] == []  # the residual entering layer 0 is untouched
    assert len(report["vhd"]) == lvlm.num_layers and len(report["vhd"][0]) == lvlm.num_heads
    for table in ("entropy_all", "entropy_image", "image_mass"):
        assert all(0 <= v for row in report[table] for v in row)
