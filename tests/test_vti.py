"""VTI: the steering formula, the calibration against a transcription of the release, generate() paths, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lvlm_fix
from conftest import PROMPTS, cli_error, cli_run
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.interventions.vti import VtiConfig
from lvlm_fix.interventions.vti_calibration import calibrate_vti, load_demos, pca_direction, steer, write_directions
from lvlm_fix.testbed.caption_pairs import caption_pairs

DEMOS = str(Path(__file__).with_name("vti_demos") / "demos.jsonl")  # 8 testbed caption pairs and their images
SMALL = {"demos": DEMOS, "num_demos": 4, "num_trials": 3}  # an in-memory calibration that costs little here


# -- (a) hand-computed cases ------------------------------------------------------------------------
def test_steer_by_hand():
    m = torch.tensor([[3.0, 4.0]])  # norm 5, direction (0.6, 0.8)
    out = steer(m, torch.tensor([0.0, 2.0]), 0.5)  # unit d = (0, 1): (0.6, 1.3) renormalised, times 5
    expect = 5 * torch.tensor([0.6, 1.3]) / (0.6**2 + 1.3**2) ** 0.5
    assert torch.allclose(out[0], expect, atol=1e-6)
    assert torch.allclose(out.norm(), torch.tensor(5.0))  # the norm is kept
    assert torch.allclose(steer(m, torch.tensor([0.0, 2.0]), 0.0), m)  # strength 0: m itself


def test_pca_direction_by_hand():
    deltas = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 0.0]])  # mean (3, 0); centred first axis -2, -1, 3
    mean, u1 = pca_direction(deltas)
    assert mean.tolist() == [3.0, 0.0]
    # svd_flip: the left vector's largest entry (the third sample's +3) positive, so u_1 points along +x
    assert torch.allclose(u1, torch.tensor([1.0, 0.0]), atol=1e-6)
    mean2, u2 = pca_direction(-deltas)
    assert torch.allclose(u2, torch.tensor([-1.0, 0.0]), atol=1e-6)  # the sign follows the data, not a fixed axis


# -- a transcription of the release (vti_utils/pca.py, utils.py, llm_layers.py), for the oracle ----------
def release_pca(x):
    x = x.unsqueeze(0) if x.ndim == 2 else x
    mean = x.mean(1, keepdim=True)
    u, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    cols = torch.argmax(torch.abs(u), 1).unsqueeze(-1)
    signs = torch.sign(torch.gather(u, 1, cols))
    vt = vt * signs.view(vt.shape[0], -1, 1)
    return mean, vt[:, :1]


def release_mask(tensor, indices, patch):
    new = tensor.clone()
    mean = tensor.mean(dim=(1, 2), keepdim=True)
    per_row = tensor.shape[2] // patch
    for index in indices:
        r, c = int(index) // per_row, int(index) % per_row
        new[:, r * patch:r * patch + patch, c * patch:c * patch + patch] = mean.expand(-1, patch, patch)
    return new


class ReleaseLayer(torch.nn.Module):
    """llm_layers.py VTILayer, fp32 (the release's .half() left out)."""

    def __init__(self, direction, lam):
        super().__init__()
        self.direction, self.lam = direction, lam

    def forward(self, x):
        norm = torch.norm(x.float(), dim=-1).unsqueeze(-1)
        y = self.lam * F.normalize(self.direction, dim=-1)
        return F.normalize(F.normalize(x.float(), dim=-1) + 0.1 * y, dim=-1) * norm


class wrapped:
    """The release's add_vti_layers: layer.mlp = Sequential(mlp, VTILayer) on each layer, undone on exit."""

    def __init__(self, layers, directions, lam):
        self.layers, self.directions, self.lam = layers, directions, lam

    def __enter__(self):
        self.saved = [layer.mlp for layer in self.layers]
        for layer, d in zip(self.layers, self.directions):
            layer.mlp = torch.nn.Sequential(layer.mlp, ReleaseLayer(d, self.lam))

    def __exit__(self, *exc):
        for layer, mlp in zip(self.layers, self.saved):
            layer.mlp = mlp


def release_rows(lvlm, demo):
    text = lvlm.build_prompt(demo["question"], 1) + " "
    return [lvlm.processor(images=[demo["image"]], text=[text + demo[k]], return_tensors="pt") for k in ("h_value", "value")]


def release_text(lvlm, demos):
    deltas = []
    with torch.no_grad():
        for demo in demos:
            neg, pos = (torch.cat([h[:, -1] for h in lvlm.model(**row, output_hidden_states=True, use_cache=False)
                                   .hidden_states]) for row in release_rows(lvlm, demo))
            deltas.append(pos.view(-1) - neg.view(-1))
    mean, comp = release_pca(torch.stack(deltas).float())
    return (comp.sum(dim=1, keepdim=True) + mean).mean(0).view(lvlm.num_layers + 1, -1)[1:]


def release_vision(lvlm, demos, masks, patch, grouping="release"):
    tower = lvlm.vision_tower
    deltas = []
    with torch.no_grad():
        for demo, idx in zip(demos, masks):
            p = release_rows(lvlm, demo)[1]["pixel_values"][0]
            trials = [tower(release_mask(p, i, patch)[None], output_hidden_states=True).hidden_states for i in idx]
            masked = torch.cat([torch.stack([t[k] for t in trials]).mean(0) for k in range(len(trials[0]))])
            clean = torch.cat(tower(p[None], output_hidden_states=True).hidden_states)
            if grouping == "release":
                deltas.append(masked.reshape(masked.shape[1], -1) - clean.reshape(clean.shape[1], -1))
            else:  # the fix: one token's vectors of every layer
                deltas.append((masked - clean).transpose(0, 1).reshape(masked.shape[1], -1))
    depth, tokens = clean.shape[0], clean.shape[1]
    mean, comp = release_pca(torch.stack(deltas, dim=1).float())
    direction = (comp.sum(dim=1, keepdim=True) + mean).mean(1)
    if grouping == "release":
        return direction.view(depth, tokens, -1)[:-1]
    return direction.view(tokens, depth, -1).transpose(0, 1)[1:]


@pytest.fixture(scope="module")
def llava(tiny):
    return tiny("llava")


@pytest.fixture(scope="module")
def demos():
    return caption_pairs(3)[0]


def _masks(n_demos, trials, grid, count, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randperm(grid, generator=g)[:count] for _ in range(trials)] for _ in range(n_demos)]


# -- (b) the calibration against the transcription ------------------------------------------------------
@pytest.mark.parametrize("release_compat", [True, False])
def test_directions_match_the_release_transcription(llava, demos, release_compat):
    patch = llava.model.config.vision_config.patch_size
    grid = (llava.model.config.vision_config.image_size // patch) ** 2
    masks = _masks(3, 2, grid, int(0.75 * grid))
    ours = calibrate_vti(llava, demos, limit=3, num_trials=2, seed=42, alpha_image=0.9, release_compat=release_compat,
                         mask_indices=masks)
    order = random.Random(42).sample(demos, 3)  # the release's random.sample after set_seed(42)
    drawn = {d["id"]: m for d, m in zip(order, masks)}  # our masks go demo by demo in the drawn order
    vision = release_vision(llava, order, [drawn[d["id"]] for d in order], patch,
                            "release" if release_compat else "per token")
    assert ours["vision"].shape == vision.shape == (2, grid + 1, 32)
    assert torch.allclose(ours["vision"], vision, atol=1e-5)
    # the release's order: the text pairs run on the vision-steered tower
    with wrapped(llava.vision_layers, vision, 0.9):
        text = release_text(llava, order)
    assert torch.allclose(ours["text"], text, atol=1e-5)
    plain = calibrate_vti(llava, demos, limit=3, num_trials=2, alpha_image=0.0, release_compat=release_compat,
                          mask_indices=masks)
    assert not torch.allclose(plain["text"], ours["text"], atol=1e-6)  # the steering did reach the text pass


def test_fixed_grouping_differs_from_the_release_in_u1_only(llava, demos):
    patch = llava.model.config.vision_config.patch_size
    grid = (llava.model.config.vision_config.image_size // patch) ** 2
    masks = _masks(3, 2, grid, grid // 2)
    kw = dict(limit=3, num_trials=2, alpha_image=0.0, mask_indices=masks)
    fixed, release = calibrate_vti(llava, demos, **kw), calibrate_vti(llava, demos, release_compat=True, **kw)
    assert not torch.allclose(fixed["vision"], release["vision"], atol=1e-3)


# -- (c)-(d) generate(): the release's wrapped modules as the reference --------------------------------------
@pytest.fixture(scope="module")
def directions_file(llava, demos, tmp_path_factory):
    result = calibrate_vti(llava, demos, limit=3, num_trials=2)
    return write_directions(result, tmp_path_factory.mktemp("vti") / "vti.pt"), result


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_matches_the_release_wrapped_model_without_cache(llava, images, directions_file, beams):
    path, result = directions_file
    batch = llava.encode(images[:1], PROMPTS[1:2])
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=beams, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), wrapped(llava.vision_layers, result["vision"], 0.9), \
            wrapped(llava.text_layers, result["text"], 0.9):
        ref = llava.model.generate(**batch, use_cache=False, **gen)  # the release decodes without a cache
    with torch.no_grad(), lvlm_fix.apply(llava, "vti", directions_file=str(path)) as plan:
        ours = llava.model.generate(**batch, **gen)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-4)
    assert plan.report()["vti"]["edited_forwards"]["vision"] == 2  # both ViT layers, once (the prefill)
    vanilla = llava.model.generate(**batch, **gen)
    assert not torch.allclose(vanilla.scores[0], ours.scores[0], atol=1e-4)


def test_vision_features_are_steered_as_the_release(llava, images, directions_file):
    path, result = directions_file
    pixels = llava.encode(images[:1], PROMPTS[:1])["pixel_values"]
    with torch.no_grad():
        with wrapped(llava.vision_layers, result["vision"], 0.9):
            ref = llava.model.get_image_features(pixel_values=pixels)
        with lvlm_fix.apply(llava, "vti", directions_file=str(path), alpha_text=0.0):
            ours = llava.model.get_image_features(pixel_values=pixels)
        vanilla = llava.model.get_image_features(pixel_values=pixels)
    ref, ours, vanilla = (x.pooler_output if hasattr(x, "pooler_output") else x for x in (ref, ours, vanilla))
    ref, ours, vanilla = (torch.cat(list(x)) if isinstance(x, (tuple, list)) else x for x in (ref, ours, vanilla))
    assert torch.allclose(ours, ref, atol=1e-5) and not torch.allclose(ours, vanilla, atol=1e-4)


def test_noop_is_bit_identical_and_math_identity_within_rounding(llava, images):
    batch = llava.encode(images, PROMPTS)
    gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        vanilla = llava.model.generate(**batch, **gen)
        with lvlm_fix.apply(llava, "vti", alpha_text=0.0, alpha_image=0.0) as plan:
            noop = llava.model.generate(**batch, **gen)
        assert plan.report()["vti"]["edited_forwards"] == {"text": 0, "vision": 0}
        with lvlm_fix.apply(llava, "vti", step=0.0) as plan:
            ident = llava.model.generate(**batch, **gen)
        assert plan.report()["vti"]["edited_forwards"]["text"] > 0
    assert torch.equal(noop.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(noop.logits, vanilla.logits))
    assert torch.equal(ident.sequences, vanilla.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ident.logits, vanilla.logits))


def test_left_padded_batch_equals_each_row_alone_greedy_and_beams_and_sampling_runs(llava, images, directions_file):
    path = str(directions_file[0])
    for gen in (dict(), dict(num_beams=2)):
        together = lvlm_fix.generate(llava, images, PROMPTS, "vti", directions_file=path, max_new_tokens=5, **gen)
        for i in range(len(PROMPTS)):
            alone = lvlm_fix.generate(llava, images[i:i + 1], PROMPTS[i:i + 1], "vti", directions_file=path,
                                      max_new_tokens=5, **gen)
            assert alone.texts == together.texts[i:i + 1], gen
    # sampling: the edit is deterministic, so a seed gives the same draw twice (batched rows draw from one RNG)
    first, again = (lvlm_fix.generate(llava, images, PROMPTS, "vti", directions_file=path, max_new_tokens=5,
                                      do_sample=True, seed=5) for _ in range(2))
    assert first.texts == again.texts and first.report["vti"]["edited_forwards"]["text"] > 0


def test_in_memory_calibration_is_made_once_and_used(llava, images, monkeypatch):
    import lvlm_fix.interventions.vti_calibration as cal

    calls = []
    real = cal.calibrate_vti
    import lvlm_fix.interventions.vti as vti

    monkeypatch.setattr(vti, "calibrate_vti", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", max_new_tokens=3, calibration_seed=3, **SMALL)
    again = lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", max_new_tokens=3, calibration_seed=3, **SMALL)
    assert len(calls) == 1 and calls[0]["num_trials"] == 3 and first.texts == again.texts
    assert first.report["vti"]["directions"]["num_demos"] == 4 and DEMOS in first.report["vti"]["directions"]["source"]


# -- (e) composition ----------------------------------------------------------------------------------
@pytest.mark.parametrize("other", ["vhr", "pai", "vcd"])
def test_composes_with_attention_and_contrast_methods(llava, images, directions_file, other):
    out = lvlm_fix.generate(llava, images[:2], PROMPTS[:2], {"vti": {"directions_file": str(directions_file[0])},
                                                             other: {}}, max_new_tokens=3)
    assert out.report["vti"]["edited_forwards"]["text"] > 0 and other in out.report


# -- (f) refusals in one line ------------------------------------------------------------------------------
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_refuses_a_missing_or_foreign_file(llava, images, tmp_path, directions_file):
    with pytest.raises(ConfigError) as e:
        VtiConfig(directions_file=str(tmp_path / "none.pt"))
    _one_line(e, "none.pt", "lvlm-fix calibrate --method vti")
    with pytest.raises(ConfigError) as e:
        VtiConfig(directions_file=str(directions_file[0]), demos=DEMOS)
    _one_line(e, "not both")
    with pytest.raises(ConfigError) as e:  # no directions at all
        lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", max_new_tokens=2)
    _one_line(e, "vti needs directions", "directions_file=FILE", "demos=")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor file")
    with pytest.raises(ConfigError) as e:
        lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", directions_file=str(junk), max_new_tokens=2)
    _one_line(e, "junk.pt", "not a directions file")
    result = dict(directions_file[1])
    for bad, words in ((dict(result, text=torch.zeros(3, 64)), ("3 layers", "calibrate for this model")),
                       (dict(result, vision=torch.zeros(2, 17, 48)), ("width 48", "calibrate for this model"))):
        path = write_directions(bad, tmp_path / "bad.pt")
        with pytest.raises(ConfigError) as e:
            lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", directions_file=str(path), max_new_tokens=2)
        _one_line(e, *words)


def test_refuses_a_tower_with_another_token_count(llava, images, directions_file, tmp_path):
    path = write_directions(dict(directions_file[1], vision=torch.ones(2, 10, 32)), tmp_path / "tokens.pt")
    with pytest.raises(LvlmFixError) as e:
        lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", directions_file=str(path), max_new_tokens=2)
    _one_line(e, "17 tokens", "hold 10", "alpha_image=0")
    out = lvlm_fix.generate(llava, images[:1], PROMPTS[:1], "vti", directions_file=str(path), alpha_image=0.0,
                            max_new_tokens=2)
    assert out.report["vti"]["vision_layers"] == []


def test_dynamic_resolution_towers_are_refused_for_vision_only(tiny, images):
    qwen = tiny("qwen2_vl")
    with pytest.raises(LvlmFixError) as e:
        lvlm_fix.generate(qwen, images[:1], PROMPTS[:1], "vti", max_new_tokens=2, **SMALL)
    _one_line(e, "one [3, H, W] image per row", "alpha_image=0")
    out = lvlm_fix.generate(qwen, images[:1], PROMPTS[:1], "vti", max_new_tokens=2, alpha_image=0.0, **SMALL)
    assert out.report["vti"]["edited_forwards"]["text"] > 0


def test_demo_file_errors_are_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "demos.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "question": "q", "value": "v"}) + "\n")
    with pytest.raises(Exception) as e:
        load_demos(bad, tmp_path)
    _one_line(e, "line 1", "h_value")
    bad.write_text(json.dumps({"image": "a.png", "question": "q", "value": "v", "h_value": "h"}) + "\n")
    demos, dataset = load_demos(bad, tmp_path)
    assert demos[0]["image"] == tmp_path / "a.png" and len(dataset["sha256"]) == 64


# -- the CLI: calibrate writes the directions a run then uses (the testbed) ---------------------------------
def test_calibrate_writes_directions_that_a_run_uses(capsys, tmp_path):
    out = tmp_path / "vti.pt"
    code, stdout, err = cli_run(capsys, "calibrate", "--method", "vti", "--limit", "2", "--option", "num_trials=2",
                                "--option", "mask_ratio=0.5", "--out", str(out))
    assert code == 0, err
    assert "synthetic caption pairs" in err and f"--method vti --directions-file {out}" in stdout
    doc = torch.load(out, weights_only=True)
    assert doc["meta"]["num_demos"] == 2 and doc["meta"]["num_trials"] == 2 and doc["meta"]["model"] == "testbed"
    assert doc["text"].shape == (8, 128) and doc["vision"].shape == (4, 65, 128)
    code, stdout, err = cli_run(capsys, "run", "--method", "vti", "--directions-file", str(out), "--out",
                                str(tmp_path / "run"))
    assert code == 0, err
    reports = [json.loads(line) for line in (tmp_path / "run" / "reports.jsonl").read_text().splitlines()]
    used = [r for r in reports if "vti" in json.dumps(r)]
    assert used and '"num_trials": 2' in json.dumps(used[-1]) and '"mask_ratio": 0.5' in json.dumps(used[-1])


def test_calibrate_refuses_bad_options_in_one_line(capsys, tmp_path):
    assert "num_trials" in cli_error(capsys, "calibrate", "--method", "vti", "--option", "trials=3", "--out",
                                     str(tmp_path / "v.pt"))
    assert "not a int" in cli_error(capsys, "calibrate", "--method", "vti", "--option", "num_trials=x", "--out",
                                    str(tmp_path / "v.pt"))
    assert "not a file" in cli_error(capsys, "calibrate", "--method", "vti", "--demos", str(tmp_path / "d.jsonl"),
                                     "--out", str(tmp_path / "v.pt"))
    assert "goes with --demos" in cli_error(capsys, "calibrate", "--method", "vti", "--image-dir", str(tmp_path),
                                            "--out", str(tmp_path / "v.pt"))
    assert "caption pairs" in cli_error(capsys, "calibrate", "--method", "act", "--demos", "x.jsonl", "--out",
                                        str(tmp_path / "h.json"))


def test_the_testbed_runs_without_a_file_on_its_own_caption_pairs(capsys):
    code, stdout, err = cli_run(capsys, "run", "--method", "vti", "--num-demos", "3", "--num-trials", "2", "--compare")
    assert code == 0, err
    assert "[baseline]" in stdout and "[vti]" in stdout
