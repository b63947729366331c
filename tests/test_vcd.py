"""VCD: the noise against its closed form, seeding, and decode steps against two plain forwards."""

from __future__ import annotations

import math

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.interventions.vcd import _image_seed, add_diffusion_noise, noise_coefficients


def test_noise_schedule_closed_form():
    """sqrt(abar_t) and sqrt(1 - abar_t) of the release's schedule (1000 steps, sigmoid betas in [1e-5, 5e-3])."""
    for t, (a, s) in {500: (0.863, 0.505), 999: (0.285, 0.959), 0: (1.0, 0.005)}.items():
        got = noise_coefficients(t)
        assert got == pytest.approx((a, s), abs=6e-4), t
        assert got[0] ** 2 + got[1] ** 2 == pytest.approx(1.0)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    assert noise_coefficients(500)[0] == pytest.approx(math.sqrt(torch.prod(1 - betas[:501]).item()), rel=1e-12)


def _eps(image: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_image_seed(image, seed))
    return torch.randn(image.shape, generator=gen)


def test_noise_is_seeded_per_image_on_its_own_generator():
    torch.manual_seed(0)
    v = torch.randn(3, 3, 32, 32)
    v[2] = 0  # a processor's padding image
    rng = torch.get_rng_state()
    out = add_diffusion_noise(v, 500, noise_seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG (sampling's) is untouched
    a, s = noise_coefficients(500)
    for i in range(2):  # v' = 0.863 v + 0.505 eps, eps from the image's own generator
        assert torch.allclose(out[i], a * v[i] + s * _eps(v[i], 7), atol=1e-6)
    eps = (out[0] - a * v[0]) / s
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    assert torch.equal(out[2], v[2])
    # Batch-size and position independent; the seed matters; 5-D (images per row) and 2-D patches with a grid.
    assert torch.equal(add_diffusion_noise(v[1:2], 500, noise_seed=7), out[1:2])
    assert not torch.allclose(add_diffusion_noise(v[:1], 500, noise_seed=8), out[:1])
    assert torch.equal(add_diffusion_noise(v[None, :2], 500, noise_seed=7)[0], out[:2])
    patches = torch.randn(10, 6)
    grid = torch.tensor([[1, 2, 2], [1, 2, 3]])
    both = add_diffusion_noise(patches, 500, 7, image_grid=grid)
    assert torch.equal(add_diffusion_noise(patches[4:], 500, 7, image_grid=grid[1:]), both[4:])


def _positions(lvlm, inputs):
    """generate()'s own position ids for these rows (M-RoPE included)."""
    return lvlm.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))


def _last_logits(lvlm, inputs):
    with torch.inference_mode():
        return lvlm.model(**inputs, position_ids=_positions(lvlm, inputs)).logits[:, -1].float()


def _hand_vcd(main, contrast, alpha, beta):
    out = (1 + alpha) * main - alpha * contrast
    return out.masked_fill(main < main.amax(-1, keepdim=True) + math.log(beta), -math.inf)


def _grown(inputs, tokens):
    """The rows with one more token (the generated one): ids, mask and per-token types grown."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], 1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill[:, None].to(inputs[key].dtype)], 1)
    return out


def _same(a, b):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_decode_steps_equal_two_plain_forwards(family, tiny, images):
    """(1 + a) l - a l' with the cut, l' from a plain forward of the same rows with the noised pixels,
    at the prefill and at the next step (KV caches and positions of both streams)."""
    lvlm = tiny(family)
    batch = dict(lvlm.encode(images[:2], PROMPTS[:2]))
    noised = {**batch, "pixel_values": add_diffusion_noise(batch["pixel_values"], 500, 0,
                                                             batch.get("image_grid_thw"))}
    alpha, beta = 1.0, 0.7  # the tiny models are nearly uniform: a high beta makes the cut cut
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vcd", beta=beta):
        out = lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    main, contrast = _last_logits(lvlm, batch), _last_logits(lvlm, noised)
    assert (main - contrast).abs().max() > 1e-3  # the noise changes the logits
    expected = _hand_vcd(main, contrast, alpha, beta)
    assert expected.isinf().any() and not expected.isinf().all(-1).any()  # the cut cuts some, never all
    assert _same(out.logits[0], expected)
    first = out.sequences[:, -2]
    step2 = _hand_vcd(_last_logits(lvlm, _grown(batch, first)), _last_logits(lvlm, _grown(noised, first)), alpha, beta)
    assert _same(out.logits[1], step2)
    # Beams: the noised features are expanded like the main ones, every beam of a sample sees its noise.
    with torch.inference_mode(), lvlm_fix.apply(lvlm, "vcd", beta=beta):
        beams = lvlm.model.generate(**batch, max_new_tokens=1, num_beams=3, output_logits=True,
                                    return_dict_in_generate=True)
    assert _same(beams.logits[0], out.logits[0].repeat_interleave(3, 0))
