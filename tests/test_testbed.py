"""The testbed: synthetic world, synthetic POPE/CHAIR benchmark, trainer, shipped checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
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
from lvlm_fix.testbed.dev.train import Batcher, Example, TrainConfig, train
from lvlm_fix.testbed.world import CATEGORY_INDEX, THEME_MEMBERS, World


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_benchmark_is_byte_for_byte_deterministic(tmp_path):
    a = write_benchmark(tmp_path / "a", seed=3, n_images=6)
    b = write_benchmark(tmp_path / "b", seed=3, n_images=6)
    c = write_benchmark(tmp_path / "c", seed=4, n_images=6)
    # images (POPE + region), POPE and region files, COCO/objects/meta, AMBER images + 6 queries + 3 files
    assert len(_digest(a.root)) == 6 + 6 + 3 + 2 + 4 + 6 + 6 + 3
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
    from lvlm_fix.testbed.dev.quality import _images, image_attention

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


# -- v2: prompts, world notions, region task, AMBER set -----------------------------------------

# Every prompt the product sends to the testbed (one place for now; to be collected from the
# method and eval registries later).
PRODUCT_CAPTION_PROMPTS = [
    "Please describe this image in detail.",
    "Please help me describe the image in detail.",
    "Describe this image.",
    "Describe this image",
    "Describe this image in details.",
    "Write a general description of the image.",
    "Through a systematic examination of the image at the pixel level and by analyzing various visual features, "
    "such as shape, color, and texture, along with employing object detection techniques, describe this image in "
    "details.",
    "Given the overall scene depicted in the image, taking into account the context, environmental factors, and "
    "any relevant visual cues, describe this image in details.",
]
PRODUCT_SUFFIXES = [
    "\nAnswer the question using a single word or phrase.",
    " Answer the question using a single word or phrase.",
    " Please answer this question with one word.",
    " Please only answer yes or no.",
]
PRODUCT_SYSTEMS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
    "You are a confused object detector to provide a fuzzy overview or impression of the image.",
]


def _product_prompts() -> list[str]:
    from lvlm_fix.testbed.world import CATEGORIES, COLOUR_NAMES

    def a(noun: str) -> str:
        return ("an " if noun[0] in "aeiou" else "a ") + noun

    questions = []
    for c in CATEGORIES:
        questions += [f"Is there {a(c.name)} in the image?", f"Is there {a(c.name)} in this image?",
                      f"What color is the {c.name}?"]
        questions += [f"Is the {c.name} {colour} in this image?" for colour in COLOUR_NAMES]
        questions += [f"Are there {n} {c.plural} in this image?" for n in ("two", "three", "four", "five")]
        questions += [f"Is there direct contact between the {c.name} and the {d.name}?" for d in CATEGORIES]
    suffixed = [q + s for q in questions for s in PRODUCT_SUFFIXES]
    carve_general = ["Write a general description of the image. Answer the question using a single word or phrase."]
    mvp = [f"Here is the caption of the image:\na red dog , two blue cups and a kite .\nQuestion: {q.lower()}"
           for q in questions + suffixed]
    systems = [f"{s} USER: <image>\n{p} ASSISTANT:" for s in PRODUCT_SYSTEMS
               for p in PRODUCT_CAPTION_PROMPTS + questions[:3] + suffixed[:4]]
    return PRODUCT_CAPTION_PROMPTS + questions + suffixed + carve_general + mvp + systems


def test_every_product_prompt_and_world_word_is_in_the_vocabulary():
    world = World()
    tokenizer = build_tokenizer(world)
    unk = tokenizer.unk_token_id
    for text in _product_prompts() + world.vocabulary():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, (text, tokenizer.convert_ids_to_tokens(ids))


def _prompts_from_the_registries() -> list[str]:
    """What the product itself says it sends: every method's own texts, every POPE preset's template
    (with a question) and system prompt, CHAIR's caption prompt."""
    from lvlm_fix.evals.chair import DEFAULT_PROMPT
    from lvlm_fix.evals.pope import PRESETS
    from lvlm_fix.interventions.registry import METHODS

    texts = [t for name in METHODS.names() for t in METHODS.get(name).prompts()]
    texts += [p.template.format(question="Is there a dog in the image?") for p in PRESETS.values()]
    texts += [p.system_prompt for p in PRESETS.values() if p.system_prompt]
    return texts + [DEFAULT_PROMPT]


def test_every_prompt_the_registries_name_encodes_without_an_unknown_token():
    """A method or preset added later with a word the testbed does not know fails here."""
    from lvlm_fix.interventions.registry import METHODS

    assert {"carve", "icd", "mvp"} <= {n for n in METHODS.names() if METHODS.get(n).prompts()}
    tokenizer = AutoProcessor.from_pretrained(CHECKPOINT_DIR).tokenizer
    for text in _prompts_from_the_registries():
        if text == LLAVA_V1_SYSTEM:
            # The one known gap: the vcd preset's system text was corrected to llava_v1's ("a curious
            # human") after the checkpoint was trained, and "human" is not in its vocabulary (README:
            # the testbed). Every other word of it must be known.
            text = text.replace("human", "user")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, (text, tokenizer.convert_ids_to_tokens(ids))


LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def test_every_product_prompt_is_a_trained_prompt():
    """The prompt module trains each product caption prompt, suffix and system prefix verbatim."""
    from lvlm_fix.testbed import prompts as P

    assert set(PRODUCT_CAPTION_PROMPTS) <= set(P.CAPTION_PROMPTS)
    assert set(PRODUCT_SUFFIXES) <= set(P.ONE_WORD_SUFFIXES + P.YES_NO_SUFFIXES)
    assert set(PRODUCT_SYSTEMS) == {P.VICUNA_SYSTEM, *P.ICD_INSTRUCTIONS}
    assert P.existence_question("umbrella") == "Is there an umbrella in the image?"
    assert P.existence_question("dog", P.EXISTENCE_TEMPLATES[1]) == "Is there a dog in this image?"
    assert P.colour_check_question("cup", "red") == "Is the cup red in this image?"
    assert P.number_question("cups", 2) == "Are there two cups in this image?"
    assert P.relation_question("cup", "spoon") == "Is there direct contact between the cup and the spoon?"
    assert P.in_context_prompt("a dog .", "Is there a cat?") == \
        "Here is the caption of the image:\na dog .\nQuestion: is there a cat?"


def test_contact_is_read_from_the_rendering():
    from lvlm_fix.testbed.world import Scene, SceneObject

    world = World()
    touching = SceneObject("cup", "red", (20, 20, 24)), SceneObject("spoon", "blue", (32, 20, 24))
    apart = SceneObject("dog", "black", (0, 70, 20)), SceneObject("kite", "green", (70, 0, 20))
    scene = Scene("kitchen", (150, 150, 150), (0.0, 0.0), 0, (*touching, *apart), ())
    masks = world.render_with_masks(scene)[1]
    assert world.contacts(scene, masks) == [("cup", "spoon")]
    # Scenes sometimes place objects in contact and counts reach three.
    contact, counts = 0, set()
    for i in range(120):
        s = world.scene("train", i)
        contact += bool(world.contacts(s, world.render_with_masks(s)[1]))
        counts |= set(s.counts().values())
    assert 10 <= contact <= 80 and {1, 2, 3} <= counts


def test_region_scenes_hide_a_small_visible_target_among_clutter():
    from lvlm_fix.testbed.world import REGION_IMAGE_SIZE

    world = World(image_size=REGION_IMAGE_SIZE)
    for i in range(8):
        scene = world.region_scene("region", i)
        target = scene.target_object
        assert target is not None and target.alpha == 1.0
        assert [o.category for o in scene.objects].count(target.category) == 1
        assert target.box[2] <= 10 * REGION_IMAGE_SIZE // 96 and len(scene.clutter) >= 26
        masks = world.render_with_masks(scene)[1]
        assert (masks[scene.target] > 0.5).sum() > 0  # drawn, not occluded away
        assert world.region_scene("region", i) == scene  # deterministic
    assert World().scene("val", 0).target_object is None


def test_captions_for_instructions_that_ask_for_less():
    world = World()
    scene = world.scene("val", 0)
    unnamed = world.unnamed_caption(scene)
    assert unnamed.endswith(" .") and not any(c in unnamed for c in CATEGORY_INDEX)
    assert world.overview(scene) == f"a picture of a {scene.theme} scene ."
    extra = world.caption(scene, extra=[("umbrella", "red")], drop=[scene.categories[0]])
    assert "a red umbrella" in extra and scene.categories[0] not in extra.split(" , ")[0]


def test_region_files(tmp_path):
    bench = write_benchmark(tmp_path, seed=0, n_images=5)
    existence = read_jsonl(bench.region_file("existence"))
    colour = read_jsonl(bench.region_file("colour"))
    assert len(existence) == 10 and len(colour) == 5
    assert [r["label"] for r in existence] == ["yes", "no"] * 5
    assert {"question_id", "image", "text", "label", "bbox"} == set(existence[0])
    assert re.fullmatch(r"What color is the .+\?", colour[0]["text"])
    with Image.open(bench.images_dir / colour[0]["image"]) as im:
        assert im.size == (192, 192)
    from lvlm_fix.evals.data import load_pope_jsonl  # the POPE loader reads the existence file

    assert len(load_pope_jsonl(bench.region_file("existence"), bench.images_dir, "random")) == 10


def test_amber_files_follow_amber_format(tmp_path):
    bench = write_benchmark(tmp_path, seed=0, n_images=4, n_amber=30)
    root = bench.amber_dir
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(f"AMBER_{k}.png" for k in range(1, 31))
    q = {p.stem: json.loads(p.read_text()) for p in (root / "query").iterdir()}
    assert set(q) == {"query_generative", "query_discriminative-existence", "query_discriminative-attribute",
                      "query_discriminative-relation", "query_discriminative", "query_all"}
    assert [r["id"] for r in q["query_generative"]] == list(range(1, 31))
    assert all(r["query"] == "Describe this image." for r in q["query_generative"])
    disc = q["query_discriminative"]
    assert [r["id"] for r in disc] == list(range(31, 31 + len(disc)))
    assert disc == (q["query_discriminative-existence"] + q["query_discriminative-attribute"]
                    + q["query_discriminative-relation"])
    assert q["query_all"] == q["query_generative"] + disc
    annotations = json.loads((root / "annotations.json").read_text())
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))  # item k is id k+1
    assert len(annotations) == 30 + len(disc)
    relation = json.loads((root / "relation.json").read_text())
    by_type: dict[str, list[str]] = {}
    for a in annotations:
        if a["type"] == "generative":
            assert set(a) == {"id", "type", "truth", "hallu"} and a["truth"] and a["hallu"]
            assert not set(a["truth"]) & set(a["hallu"]) and set(a["truth"] + a["hallu"]) <= set(relation)
        else:
            assert set(a) == {"id", "type", "truth"} and a["truth"] in ("yes", "no")
            by_type.setdefault(a["type"], []).append(a["truth"])
    assert set(by_type["discriminative-hallucination"]) == {"no"}
    for t in ("discriminative-attribute-state", "discriminative-attribute-number", "discriminative-relation"):
        assert by_type[t].count("yes") == by_type[t].count("no") > 0, t
    queries = {r["id"]: r["query"] for r in disc}
    for a in annotations[30:]:
        pattern = {"discriminative-hallucination": r"Is there an? .+ in this image\?",
                   "discriminative-attribute-state": r"Is the .+ \w+ in this image\?",
                   "discriminative-attribute-number": r"Are there (two|three) .+ in this image\?",
                   "discriminative-relation": r"Is there direct contact between the .+ and the .+\?"}[a["type"]]
        assert re.fullmatch(pattern, queries[a["id"]])
    assert "image" in (root / "safe_words.txt").read_text().split()


def test_training_conversations_are_packed_and_known():
    world, config = World(), TrainConfig()
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, config.model)
    batcher = Batcher(world, tokenizer, processor, config)
    rng = np.random.default_rng(0)
    examples = batcher.examples(list(range(14)))  # index 6 and 13 are region scenes
    assert [batcher.is_region(i) for i in range(14)].count(True) == 2
    assert examples[6].scene.target_object is not None and examples[6].pixels.shape == (96, 96, 3)
    for e in examples:
        for _ in range(20):
            ids, labels, weights = batcher.conversation(e, rng)
            assert tokenizer.unk_token_id not in ids
            # Packed up to the token budget; only a single (long) first turn may pass it.
            assert len(ids) <= config.max_tokens or ids.count(tokenizer.eos_token_id) == 1
            assert all((w > 0) == (label != -100) for w, label in zip(weights, labels))


def test_system_message_is_rendered_as_the_chat_template_does():
    world, config = World(), TrainConfig()
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, config.model)
    system = PRODUCT_SYSTEMS[0]
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids, n_prompt = encode_pair(tokenizer, "Describe this image.", None, config.model.num_image_tokens, system)
    image = world.render(world.scene("val", 0))
    assert processor(images=[image], text=[rendered], return_tensors="pt")["input_ids"][0].tolist() == ids
    assert format_prompt("Describe this image.", system).split() == rendered.split()


def test_the_quality_report_takes_every_bench_number_from_the_runner(tmp_path, monkeypatch):
    """POPE, CHAIR and AMBER in the quality report come from the runner's benches (what `lvlm-fix eval`
    measures), and equal what a plain greedy loop over the same questions gives (the report's own
    eval loop, before issue 26: same prompts, 4 new tokens, the llava parse, exact AMBER answers)."""
    from lvlm_fix.evals import runner
    from lvlm_fix.evals.amber import read_answer
    from lvlm_fix.evals.pope import score
    from lvlm_fix.testbed import benchmark
    from lvlm_fix.testbed.dev import quality
    from lvlm_fix.testbed.model import load_testbed

    small = write_benchmark(tmp_path / "bench", seed=1, n_images=6)
    for module in (benchmark, quality):  # the benches' default data, small
        monkeypatch.setattr(module, "ensure_benchmark", lambda *a, **k: small.root)
    called, run = [], runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda lvlm, bench, **kw: called.append(bench) or run(lvlm, bench, **kw))
    result = quality.evaluate(pope_limit=5, chair_limit=4, amber_limit=6, region_limit=2, prompts_n=0,
                              attention=False, presets=["plain", "icd"], runs=tmp_path / "runs")
    assert called == ["pope", "pope", "chair", "amber"]
    assert (tmp_path / "runs" / "pope-icd" / "results.md").is_file()  # the runs, kept where asked

    model, processor = load_testbed(CHECKPOINT_DIR)

    def answers(names, prompts, root=None):
        return quality.generate(model, processor, quality._images(small, names, root), prompts, 4)

    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")
    for preset, splits in result["pope"].items():
        assert list(splits) == list(POPE_SPLITS)
        for split, got in splits.items():
            rows = read_jsonl(small.pope_file(split))[:5]
            said = answers([r["image"] for r in rows], [quality.POPE_PRESETS[preset].format(question=r["text"])
                                                        for r in rows])
            want = score(said, [r["label"] for r in rows]).as_dict()
            assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, (preset, split)
            assert got["exact"] == quality._exact_rate(said)
            assert got["false_yes"] == want["fp"] / max(1, want["fp"] + want["tn"])
    queries = json.loads((small.amber_dir / "query" / "query_discriminative.json").read_text())[:6]
    truth = {a["id"]: a["truth"] for a in json.loads((small.amber_dir / "annotations.json").read_text())}
    said = answers([q["image"] for q in queries], [q["query"] for q in queries], small.amber_dir / "images")
    amber = result["amber"]["all"]
    assert amber["n"] == 6 and amber["exact"] == quality._exact_rate(said)
    assert amber["accuracy"] == sum(read_answer(a) == truth[q["id"]] for a, q in zip(said, queries)) / 6
    assert result["chair"]["n"] == 4 and len(result["chair"]["examples"]) == 4


def test_the_quality_report_refuses_an_unknown_preset():
    from lvlm_fix.errors import ConfigError
    from lvlm_fix.testbed.dev.quality import evaluate, zoom

    with pytest.raises(ConfigError, match="--presets names 'plian'; choose from plain, llava"):
        evaluate(presets=["plian"])
    im = Image.new("RGB", (192, 192))
    assert zoom(im, [180, 180, 10, 10]).size == (192, 192)


def test_shipped_checkpoint_shape():
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] >= 8
    assert config["vision_feature_select_strategy"] == "default"  # the CLS token exists and is dropped
    size = sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir())
    assert size <= 25 * 2**20, size
    tokenizer = AutoProcessor.from_pretrained(CHECKPOINT_DIR).tokenizer
    assert tokenizer.unk_token_id not in tokenizer(" ".join(_product_prompts()))["input_ids"]


def test_existence_negatives_that_go_with_the_scene_are_drawn_at_their_weight():
    # A kitchen scene with a fork and no knife: its absent theme members and the fork's partner
    # (knife) are "related"; every other absent category is drawn 1/w times as often per category.
    world, weight = World(), 0.25
    config = TrainConfig(cooccurring_negative_weight=weight)
    tokenizer = build_tokenizer(world)
    batcher = Batcher(world, tokenizer, build_processor(tokenizer, config.model), config)
    scene = next(s for s in (world.scene("train", i) for i in range(500))
                 if s.theme == "kitchen" and "fork" in s.categories and "knife" not in s.categories)
    example = Example(scene, pixels=None, coverage=None, contacts=())  # only the scene is read
    present = set(example.scene.categories)
    related = (set(THEME_MEMBERS["kitchen"]) | {"knife"}) - present
    unrelated = set(CATEGORY_INDEX) - present - related
    rng = np.random.default_rng(0)

    def negatives() -> dict[str, int]:
        counts = {c: 0 for c in related | unrelated}
        for _ in range(20_000):
            cat, answer = batcher._existence(example, rng, set())
            if answer == "No":
                counts[cat] += 1
        return counts

    counts = negatives()
    per_related = sum(counts[c] for c in related) / len(related)
    per_unrelated = sum(counts[c] for c in unrelated) / len(unrelated)
    assert per_related / per_unrelated == pytest.approx(weight, rel=0.1)
    # Uniform at weight 1 (the drawing rule itself, not the data, decides the ratio).
    batcher.config = replace(config, cooccurring_negative_weight=1.0)
    counts = negatives()
    assert min(counts.values()) / max(counts.values()) > 0.85
