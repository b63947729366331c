"""The testbed: synthetic world, synthetic POPE/CHAIR benchmark, trainer, shipped checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlm_fix.evals.pope import parse_answer
from lvlm_fix.testbed.benchmark import POPE_SPLITS, read_jsonl, write_benchmark
from lvlm_fix.testbed.model import (
    CHECKPOINT_DIR,
    ModelConfig,
    build_processor,
    build_tokenizer,
    encode_pair,
    format_prompt,
)
from lvlm_fix.testbed.train import Batcher, TrainConfig, train
from lvlm_fix.testbed.world import CATEGORY_INDEX, World


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_benchmark_is_byte_for_byte_deterministic(tmp_path):
    a = write_benchmark(tmp_path / "a", seed=3, n_images=6)
    b = write_benchmark(tmp_path / "b", seed=3, n_images=6)
    c = write_benchmark(tmp_path / "c", seed=4, n_images=6)
    assert len(_digest(a.root)) == 6 + 3 + 4  # images, POPE splits, COCO/objects/meta files
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)


def test_pope_files_follow_pope_sampling(tmp_path):
    bench = write_benchmark(tmp_path, seed=0, n_images=20)
    freq, cooc = World().statistics()
    objects = {r["image"]: r["objects"] for r in read_jsonl(bench.objects_file)}
    for split in POPE_SPLITS:
        rows = read_jsonl(bench.pope_file(split))
        assert len(rows) == 6 * 20
        assert set(rows[0]) == {"question_id", "image", "text", "label"}
        assert [r["label"] for r in rows[:6]] == ["yes", "no"] * 3
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
    adversarial = read_jsonl(bench.pope_file("adversarial"))
    popular = read_jsonl(bench.pope_file("popular"))

    def name(row: dict) -> str:
        return re.fullmatch(r"Is there an? (.+) in the image\?", row["text"]).group(1)

    for start in range(0, len(adversarial), 6):
        image = adversarial[start]["image"]
        present, used = objects[image], []
        for k in range(3):
            pos, neg = name(adversarial[start + 2 * k]), name(adversarial[start + 2 * k + 1])
            assert pos == present[k] and neg not in present
            used.append(pos)
            # The adversarial negative is the absent, unused object that co-occurs most with
            # this positive in the world's co-occurrence table.
            allowed = [c for c in CATEGORY_INDEX if c not in present and c not in used]
            assert cooc[pos][neg] == max(cooc[pos][c] for c in allowed)
            used.append(neg)
        pop_negs = [name(popular[start + 2 * k + 1]) for k in range(3)]
        assert [freq[c] for c in pop_negs] == sorted((freq[c] for c in CATEGORY_INDEX if c not in present),
                                                     reverse=True)[:3]


def test_training_inputs_match_the_processor():
    world, config = World(), TrainConfig(turns=1)
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, config.model)
    image = world.render(world.scene("val", 0))
    question = "Is there a dog in the image?"
    batch = processor(images=[image], text=[format_prompt(question)], return_tensors="pt")
    ids, n_prompt = encode_pair(tokenizer, question, "Yes", config.model.num_image_tokens)
    assert batch["input_ids"][0].tolist() == ids[:n_prompt]
    assert tokenizer.decode(ids[n_prompt:], skip_special_tokens=True) == "Yes"
    batcher = Batcher(world, tokenizer, processor, config)
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255 - batcher.mean) / batcher.std
    torch.testing.assert_close(x, batch["pixel_values"])


def test_short_training_lowers_the_loss(tmp_path):
    tiny = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64,
                       text_layers=1, text_heads=2)
    config = TrainConfig(vision_steps=4, batch_size=8, vision_batch_size=8, warmup=2,
                         log_every=5, lr=3e-3, model=tiny)
    lines: list[str] = []
    out = train(tmp_path / "ckpt", steps=20, seed=0, config=config, log=lines.append)
    history = [h for h in json.loads((out / "testbed.json").read_text())["history"] if h["stage"] == "joint"]
    assert len(history) == 4 and len(lines) == 1 + 4
    assert history[-1]["lm_loss"] < 0.7 * history[0]["lm_loss"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.hidden_size == 64


def test_shipped_checkpoint_answers_pope(tmp_path):
    assert (CHECKPOINT_DIR / "model.safetensors").is_file(), "the trained testbed checkpoint is missing"
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    assert processor.tokenizer.padding_side == "left"
    bench = write_benchmark(tmp_path, seed=1, n_images=34)
    rows = read_jsonl(bench.pope_file("random"))[:200]  # held-out scenes (val stream)
    answers: list[str] = []
    for i in range(0, len(rows), 50):
        chunk = rows[i:i + 50]
        images = [Image.open(bench.images_dir / r["image"]).convert("RGB") for r in chunk]
        batch = processor(images=images, text=[format_prompt(r["text"]) for r in chunk],
                          padding=True, return_tensors="pt")
        assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=False, max_new_tokens=3)
        answers += processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    accuracy = np.mean([parse_answer(a) == r["label"] for a, r in zip(answers, rows)])
    assert accuracy >= 0.85, accuracy


def test_image_attention_profile_matches_eager_attention_weights(tmp_path):
    """The quality report's per-head image-attention profile, read through lvlm-fix's hook, equals
    what transformers' eager attention returns (the reference here; the product never asks for it)."""
    from lvlm_fix.testbed.model import load_testbed
    from lvlm_fix.testbed.quality import _images, image_attention

    bench = write_benchmark(tmp_path, seed=1, n_images=6)
    got = image_attention(CHECKPOINT_DIR, bench, n=5)
    model, processor = load_testbed(CHECKPOINT_DIR)
    rows = read_jsonl(bench.pope_file("random"))[:5]
    batch = processor(images=_images(bench, [r["image"] for r in rows]),
                      text=[format_prompt(r["text"]) for r in rows], padding=True, return_tensors="pt")
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    is_image = batch["input_ids"] == model.config.image_token_id
    assert len(got) == len(attentions) * attentions[0].shape[1]
    for row in got:
        last = attentions[row["layer"]][:, row["head"], -1] * is_image  # [b, k] on image keys
        mass = last.sum(-1)
        p = last / mass[:, None]
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
        assert abs(row["image_mass"] - float(mass.mean())) < 1e-4
        assert abs(row["effective_tokens"] - float(ent.exp().mean())) < 1e-3
        assert abs(row["top1_share"] - float(p.amax(-1).mean())) < 1e-4
