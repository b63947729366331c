"""Train the testbed LVLM on the synthetic world, on CPU, in a fixed number of steps.

Recipe (two stages, deterministic for a given config, seed, device and thread count):

1. **Vision warm-up** (``vision_steps``, cheap: no decoder pass). The CLIP tower, the
   projector and four linear heads learn per-patch classification ("which category covers
   this patch, or background", and "which colour is that object") plus image-level presence,
   read from the patch tokens and from the CLS token. One category head reads the tower's
   features; the other scores the *projected* image tokens against the decoder's word
   embeddings of the category names, so an image token showing a dog starts out looking
   like the word "dog" to the decoder. The CLS head is the analogue of CLIP's image-level
   objective: it keeps the CLS token (which the LLM never sees, but PAINT-style methods read
   the CLS row of the tower's attention) looking at the objects. The patch embedding starts
   from the principal directions of the world's image patches. Without some such vision loss
   a CPU-sized run learns only the language prior (it answers "no" to everything), and in
   pilots the decoder never found the image without the word alignment.
2. **Joint training** (``steps``): the whole LLaVA on packed multi-turn conversations about
   one image, drawn from the tasks of :mod:`lvlm_fix.testbed.prompts` (captions, existence,
   colour, number, contact, MVP's caption-in-context questions, CARVE's one-word general
   description) in varied phrasings, with the answer-format suffixes and system prefixes the
   product sends; next-token loss on the answers only (each turn weighted equally, a
   caption ``caption_weight`` times), plus the vision losses. The first turn always has
   exactly the single-turn inference format. Yes/no questions are balanced, but existence
   negatives rarely name an object that *goes with* the scene (one of its theme's members,
   or the partner of an object shown): each such category is drawn
   ``cooccurring_negative_weight`` times as often as an unrelated one. Real instruction
   data leans the same way (it asks mostly about objects that are there, which is why
   LRV-Instruction added negative instructions), and this skew is what makes the model say
   "yes" to absent co-occurring objects, the hallucination POPE's adversarial split
   measures. Adversarial false-yes rate minus random's (1,000 synthetic POPE questions per
   split, the recipe otherwise the same): 4.0 points with negatives drawn uniformly
   (weight 1), 10.4 at 0.25, 16.8 at 0.1 (shipped).

Every ``region_every``-th training scene is a region-task scene (small target among
clutter, :meth:`World.region_scene`), drawn at twice the input side and downsampled with the
processor's own filter, exactly as the region benchmark's images reach the model.

Example:
    >>> from lvlm_fix.testbed.dev.train import TrainConfig, train
    >>> train("/tmp/testbed-ckpt", steps=2000, seed=0)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import prompts as P
from ..model import ModelConfig, build_model, build_processor, build_tokenizer, encode_pair, save_testbed
from ..world import (
    CATEGORIES,
    CATEGORY_INDEX,
    CATEGORY_NAMES,
    COLOUR_NAMES,
    PARTNER,
    REGION_IMAGE_SIZE,
    THEME_MEMBERS,
    Scene,
    World,
)

Log = Callable[[str], None]
MIN_COVER = 0.08  # a patch belongs to an object that covers at least this much of it

# How often each task is drawn for a turn (normalised). Existence dominates because POPE and
# CHAIR are the headline numbers; every other task is there so that its prompts are answered
# as intended.
TASK_WEIGHTS: dict[str, float] = {
    "caption": 0.22, "existence": 0.36, "colour_check": 0.08, "colour_query": 0.07,
    "number": 0.06, "relation": 0.07, "in_context": 0.10, "general": 0.04,
}

# The curriculum's plain turns: captions and existence only. In a pilot with the full mix from
# the start, an 8-layer decoder learned to caption from the image but answered yes/no
# questions from the language prior alone for 800 steps; with captions and existence only,
# but every wording and suffix, still for 250.
WARM_TASK_WEIGHTS: dict[str, float] = {"caption": 0.35, "existence": 0.65}


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        steps: joint (stage 2) optimisation steps.
        vision_steps: vision warm-up (stage 1) steps.
        batch_size: conversations (= images) per joint step.
        vision_batch_size: images per warm-up step.
        turns: at most this many turns are packed into one conversation about an image.
        max_tokens: ... and no more turns than fit in this many tokens (image included).
        task_weights: how often each task is drawn for a turn (see ``TASK_WEIGHTS``).
        warm_steps: the first this many joint steps draw only *plain* turns: tasks from
            ``warm_task_weights``, existence questions in POPE's or AMBER's wording without
            a suffix, no system prefix (a curriculum: ground captions and existence first).
        ramp_steps: over the next this many steps the share of turns (and system
            prefixes) drawn from the full mix rises linearly from 0 to 1.
        warm_task_weights: the tasks of plain turns.
        caption_weight: loss weight of a caption turn relative to a one-word turn.
        system_prob: chance that a conversation starts with a system prefix (the vicuna
            prompt half of the time, one of ICD's instructions otherwise).
        suffix_prob: chance that a question carries an answer-format suffix.
        cooccurring_negative_weight: how often, relative to an unrelated absent category,
            an existence negative names an absent category that goes with the scene (its
            theme's members, the partners of the objects shown). 1.0 draws negatives
            uniformly; below 1 the co-occurrence prior is what answers such questions.
        region_every: every this many-th training scene is a region-task scene (0: none).
        lr / vision_lr: peak AdamW learning rates (linear warm-up, cosine decay to 5%).
        warmup: warm-up steps of each stage.
        weight_decay: AdamW weight decay.
        aux_weight: weight of the vision losses during joint training.
        seed: torch seed and training-scene stream.
        world_seed: the world (fixed, so that the priors do not change with ``seed``).
        log_every: log a line every this many steps.
        bf16: bf16 autocast for forward passes (weights and optimiser stay float32).
        pool_size: training scenes are rendered once and revisited (scene index modulo
            pool_size), which saves most of the drawing time; None draws fresh scenes.
        threads: torch CPU threads (None: leave torch's default). On a shared 2-core
            machine 1 thread was 2-3x faster than 2; results depend on it, so the shipped
            recipe fixes it.
        vision_cache: a file for the stage-1 result: loaded (instead of training stage 1)
            when it was written by a run whose stage-1 settings were identical, else
            written after stage 1. Only saves time when iterating on stage 2.
        snapshot_every: also save the model every this many joint steps, to
            ``{out_dir}-step{N}`` (for watching a long run; training is unaffected).
        model: model sizes.
    """

    steps: int = 2800
    vision_steps: int = 1500
    batch_size: int = 32
    vision_batch_size: int = 32
    turns: int = 6
    max_tokens: int = 160
    task_weights: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))
    warm_steps: int = 300
    ramp_steps: int = 500
    warm_task_weights: dict[str, float] = field(default_factory=lambda: dict(WARM_TASK_WEIGHTS))
    caption_weight: float = 2.0
    system_prob: float = 0.35
    suffix_prob: float = 0.55
    cooccurring_negative_weight: float = 0.1
    region_every: int = 7
    lr: float = 1.5e-3
    vision_lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 0.5
    seed: int = 0
    world_seed: int = 0
    log_every: int = 50
    bf16: bool = True
    pool_size: int | None = 16384
    threads: int | None = 1
    vision_cache: str | None = None
    snapshot_every: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

Turn = tuple[str, str, float]  # (user prompt, answer, loss weight)


@dataclass(frozen=True)
class Example:
    """One rendered training scene: pixels, per-patch coverage and the contact pairs."""

    scene: Scene
    pixels: np.ndarray       # uint8 [H, W, 3] at the model's input size
    coverage: np.ndarray     # uint8 [C, g, g], visible fraction * 255
    contacts: tuple[tuple[str, str], ...]


class Batcher:
    """Turns training-scene indices into model inputs, deterministically."""

    def __init__(self, world: World, tokenizer: Any, processor: Any, config: TrainConfig) -> None:
        self.world = world
        self.region_world = World(world.seed, REGION_IMAGE_SIZE * world.image_size // 96)
        self.tok = tokenizer
        self.config = config
        self.n_image = config.model.num_image_tokens
        self.grid = config.model.image_size // config.model.patch_size
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.resample = Image.Resampling(ip.resample)
        self._turn_cache: dict[str, list[int]] = {}
        self._pool: dict[int, Example] = {}
        tasks = config.task_weights
        self.tasks = list(tasks)
        self.task_p = np.array([tasks[t] for t in self.tasks]) / sum(tasks.values())
        warm = {t: w for t, w in config.warm_task_weights.items() if t in tasks}
        self.warm_p = np.array([warm.get(t, 0.0) for t in self.tasks]) / sum(warm.values())
        # Share of turns drawn from the full mix (the rest: the curriculum's plain turns);
        # the trainer raises it from 0 to 1 (see TrainConfig.warm_steps / ramp_steps).
        self.breadth = 1.0

    def is_region(self, index: int) -> bool:
        """Whether training scene ``index`` (after the pool modulo) is a region-task scene."""
        every = self.config.region_every
        return bool(every) and index % every == every - 1

    def _render(self, index: int) -> Example:
        if self.config.pool_size:
            index %= self.config.pool_size
            if index in self._pool:
                return self._pool[index]
        world = self.world
        if self.is_region(index):
            world = self.region_world
            scene = world.region_scene("train", index, stream=self.config.seed)
        else:
            scene = world.scene("train", index, stream=self.config.seed)
        image, masks = world.render_with_masks(scene)
        if image.size[0] != self.world.image_size:  # as the processor resizes a large image
            image = image.resize((self.world.image_size,) * 2, self.resample)
        cover = world.patch_coverage(scene, masks, self.grid)
        item = Example(scene, np.asarray(image), (cover * 255).round().astype(np.uint8),
                       tuple(world.contacts(scene, masks)))
        if self.config.pool_size:
            self._pool[index] = item
        return item

    def examples(self, indices: list[int]) -> list[Example]:
        return [self._render(i) for i in indices]

    def images(self, indices: list[int]) -> tuple[list[Example], torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
        """Examples, pixel values ``[B,3,H,W]``, coverage ``[B,C,g,g]``, presence ``[B,C]``,
        and each category's colour index ``[B,C]`` (-1 where absent)."""
        examples = self.examples(indices)
        # Same arithmetic as the CLIP image processor (rescale, then normalise); images are
        # already image_size square, so its resize and crop are identities.
        x = torch.from_numpy(np.stack([e.pixels for e in examples])).permute(0, 3, 1, 2).float() / 255.0
        pixel_values = (x - self.mean) / self.std
        coverage = torch.from_numpy(np.stack([e.coverage for e in examples])).float() / 255.0
        present = torch.zeros(len(examples), len(CATEGORY_NAMES))
        colour = torch.full((len(examples), len(CATEGORY_NAMES)), -1, dtype=torch.long)
        for b, e in enumerate(examples):
            for o in e.scene.objects:
                present[b, CATEGORY_INDEX[o.category]] = 1.0
                colour[b, CATEGORY_INDEX[o.category]] = COLOUR_NAMES.index(o.colour)
        return examples, pixel_values, coverage, present, colour

    def _later_turn(self, prompt: str) -> list[int]:
        # Later turns are "USER: {q} ASSISTANT:" after the previous "</s>" (llava-hf style).
        if prompt not in self._turn_cache:
            self._turn_cache[prompt] = self.tok(f"USER: {prompt} ASSISTANT:",
                                                add_special_tokens=False)["input_ids"]
        return self._turn_cache[prompt]

    # -- tasks ----------------------------------------------------------------------------

    @staticmethod
    def _pick(rng: np.random.Generator, items: Any) -> Any:
        items = list(items)
        return items[int(rng.integers(len(items)))]

    def _suffix(self, rng: np.random.Generator, yes_no: bool) -> str:
        if rng.random() >= self.config.suffix_prob:
            return ""
        pool = P.ONE_WORD_SUFFIXES + (P.YES_NO_SUFFIXES if yes_no else ())
        return self._pick(rng, pool)

    def _existence(self, example: Example, rng: np.random.Generator, asked: set[str]
                   ) -> tuple[str, str]:
        """A balanced existence question: (category, "Yes"/"No").

        A negative that goes with the scene (a member of its theme or the partner of an
        object shown) is drawn ``cooccurring_negative_weight`` times as often as another.
        """
        scene = example.scene
        present = scene.categories
        absent = [c for c in CATEGORY_NAMES if c not in present]
        want_yes = rng.random() < 0.5
        target = scene.target_object
        if want_yes and target is not None and target.category not in asked and rng.random() < 0.6:
            cat = target.category  # the region task asks about its small object most often
        else:
            pool = [c for c in (present if want_yes else absent) if c not in asked]
            pool = pool or [c for c in (absent if want_yes else present) if c not in asked] or absent
            if pool[0] in present:
                cat = self._pick(rng, pool)
            else:
                related = set(THEME_MEMBERS[scene.theme]) | {PARTNER[c] for c in present if c in PARTNER}
                w = np.array([self.config.cooccurring_negative_weight if c in related else 1.0
                              for c in pool])
                if w.sum() == 0:  # weight 0 and only related categories left
                    w[:] = 1.0
                cat = pool[int(rng.choice(len(pool), p=w / w.sum()))]
        asked.add(cat)
        return cat, "Yes" if cat in present else "No"

    def _caption_answer(self, scene: Scene, system: str | None) -> str:
        if system in P.NO_NAMES_SYSTEMS:
            return self.world.unnamed_caption(scene)
        if system in P.FUZZY_SYSTEMS:
            return self.world.overview(scene)
        return self.world.caption(scene)

    def _in_context_caption(self, scene: Scene, rng: np.random.Generator) -> tuple[str, list[str]]:
        """A caption like the model's own: usually right, sometimes with a hallucinated
        co-occurring object or an omission (the answer must still follow the image)."""
        present = scene.categories
        extra, drop = [], []
        if rng.random() < 0.3:
            partners = [PARTNER[c] for c in present if PARTNER.get(c) and PARTNER[c] not in present]
            absent = [c for c in CATEGORY_NAMES if c not in present]
            extra = [(self._pick(rng, partners or absent), self._pick(rng, COLOUR_NAMES))]
        if rng.random() < 0.15 and len(present) > 1:
            drop = [self._pick(rng, present)]
        return self.world.caption(scene, extra=extra, drop=drop), [c for c, _ in extra]

    def turn(self, task: str, example: Example, system: str | None, rng: np.random.Generator,
             asked: set[str], plain: bool = False) -> Turn:
        """One (prompt, answer, weight) of ``task`` about ``example``'s scene.

        ``plain``: the curriculum's simple form of an existence question (POPE's or AMBER's
        wording, no suffix), so that the asked word sits at a fixed distance from the answer.
        """
        scene = example.scene
        present = scene.categories
        counts = scene.counts()
        if task == "caption":
            prompt = P.CAPTION_PROMPTS[0] if rng.random() < 0.3 else self._pick(rng, P.CAPTION_PROMPTS)
            return prompt, self._caption_answer(scene, system), self.config.caption_weight
        if task == "general":
            return P.GENERAL_INSTRUCTION + self._pick(rng, P.ONE_WORD_SUFFIXES), scene.theme, 1.0
        if task == "colour_check" and present:
            cat = self._pick(rng, present)
            colour = scene.colour_of(cat)
            if rng.random() < 0.5:
                colour = self._pick(rng, [c for c in COLOUR_NAMES if c != colour])
            q = P.colour_check_question(cat, colour, self._pick(rng, P.COLOUR_CHECK_TEMPLATES))
            return q + self._suffix(rng, True), "Yes" if colour == scene.colour_of(cat) else "No", 1.0
        if task == "colour_query" and present:
            target = scene.target_object
            cat = target.category if target is not None and rng.random() < 0.6 else self._pick(rng, present)
            q = P.colour_query(cat, self._pick(rng, P.COLOUR_QUERY_TEMPLATES))
            return q + self._suffix(rng, False), scene.colour_of(cat), 1.0
        if task == "number" and present:
            cat = self._pick(rng, present)
            many = [c for c in present if counts[c] > 1]
            if rng.random() < 0.5 and many:
                cat = self._pick(rng, many)
                n = counts[cat]
            else:
                n = self._pick(rng, [k for k in (2, 3) if k != counts[cat]])
            q = P.number_question(CATEGORIES[CATEGORY_INDEX[cat]].plural, n,
                                  self._pick(rng, P.NUMBER_TEMPLATES))
            return q + self._suffix(rng, True), "Yes" if counts[cat] == n else "No", 1.0
        if task == "relation" and len(present) > 1:
            pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
            touching = [p for p in pairs if tuple(sorted(p, key=CATEGORY_INDEX.__getitem__)) in example.contacts]
            apart = [p for p in pairs if p not in touching]
            pool = touching if (rng.random() < 0.5 and touching) or not apart else apart
            a, b = self._pick(rng, pool)
            if rng.random() < 0.5:
                a, b = b, a
            q = P.relation_question(a, b, self._pick(rng, P.RELATION_TEMPLATES))
            return q + self._suffix(rng, True), "Yes" if (a, b) in touching or (b, a) in touching else "No", 1.0
        if task == "in_context":
            caption, hallucinated = self._in_context_caption(scene, rng)
            if hallucinated and rng.random() < 0.5 and hallucinated[0] not in asked:
                cat, answer = hallucinated[0], "No"
                asked.add(cat)
            else:
                cat, answer = self._existence(example, rng, asked)
            q = P.existence_question(cat, self._pick(rng, P.EXISTENCE_TEMPLATES)) + self._suffix(rng, True)
            return P.in_context_prompt(caption, q), answer, 1.0
        # "existence", and the fall-back of a task that does not apply to this scene
        cat, answer = self._existence(example, rng, asked)
        if plain:
            return P.existence_question(cat, self._pick(rng, P.EXISTENCE_TEMPLATES[:2])), answer, 1.0
        q = P.existence_question(cat, self._pick(rng, P.EXISTENCE_TEMPLATES))
        return q + self._suffix(rng, True), answer, 1.0

    def conversation(self, example: Example, rng: np.random.Generator
                     ) -> tuple[list[int], list[int], list[float]]:
        """One packed conversation: input ids, labels (-100 off answers), token loss weights.

        Turns are drawn until the next one would pass ``config.max_tokens`` (the first is
        always kept), so rows have similar lengths and little of a batch is padding.
        """
        system = None
        if rng.random() < self.breadth * self.config.system_prob:
            system = P.VICUNA_SYSTEM if rng.random() < 0.5 else self._pick(rng, P.ICD_INSTRUCTIONS)
        asked: set[str] = set()
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        captioned = False
        for t in range(self.config.turns):
            plain = rng.random() >= self.breadth
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.warm_p if plain else self.task_p))]
            if task == "caption" and captioned:  # a second caption could be copied from the first
                task = "existence"
            captioned |= task == "caption"
            prompt, answer, weight = self.turn(task, example, system, rng, asked, plain)
            if t == 0:
                full, n_prompt = encode_pair(self.tok, prompt, answer, self.n_image, system)
            else:
                head = self._later_turn(prompt)
                tail = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                full, n_prompt = head + tail, len(head)
                if len(ids) + len(full) > self.config.max_tokens:
                    break
            n_answer = len(full) - n_prompt
            ids += full
            labels += [-100] * n_prompt + full[n_prompt:]
            weights += [0.0] * n_prompt + [weight / n_answer] * n_answer
        return ids, labels, weights

    def batch(self, indices: list[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A joint-training batch (right-padded; positions of real tokens start at 0)."""
        examples, pixel_values, coverage, present, colour = self.images(indices)
        convs = [self.conversation(e, rng) for e in examples]
        length = max(len(ids) for ids, _, _ in convs)
        input_ids = torch.full((len(convs), length), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(convs), length), -100, dtype=torch.long)
        weights = torch.zeros((len(convs), length))
        attention = torch.zeros((len(convs), length), dtype=torch.long)
        for b, (ids, lab, w) in enumerate(convs):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            weights[b, : len(w)] = torch.tensor(w)
            attention[b, : len(ids)] = 1
        return dict(input_ids=input_ids, attention_mask=attention, labels=labels, weights=weights,
                    pixel_values=pixel_values, coverage=coverage, present=present, colour=colour)


# --------------------------------------------------------------------------------------
# Losses, heads and schedule
# --------------------------------------------------------------------------------------


def patch_loss(logits: torch.Tensor, coverage: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-patch classification plus image-level presence.

    Each patch is classified (cross-entropy) as background or as the category covering most
    of it, which keeps object identity *in the object's own tokens*; presence is a BCE on
    the max over patches of each category's logit.

    Args:
        logits: ``[B, N, 1 + C]`` per-patch scores (index 0 is background), N = g*g.
        coverage: ``[B, C, g, g]`` visible fraction of each patch per category.
        present: ``[B, C]`` 0/1 image-level targets.
    """
    logits = logits.float()
    cover = coverage.flatten(2).transpose(1, 2)                  # [B, N, C]
    best, category = cover.max(dim=-1)
    target = torch.where(best >= MIN_COVER, category + 1, torch.zeros_like(category))
    per_patch = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    image_level = F.binary_cross_entropy_with_logits(logits[..., 1:].amax(dim=1), present)
    return per_patch + image_level


def colour_loss(logits: torch.Tensor, coverage: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Per-patch colour classification: the colour of the object covering most of the patch.

    Background patches are ignored. Without it the tower keeps identity but loses colour,
    and captions collapse to one colour per image.

    Args:
        logits: ``[B, N, K]`` per-patch colour scores (K colours), N = g*g.
        coverage: ``[B, C, g, g]`` visible fraction of each patch per category.
        colour: ``[B, C]`` colour index of each category in the image (-1 where absent).
    """
    cover = coverage.flatten(2).transpose(1, 2)                  # [B, N, C]
    best, category = cover.max(dim=-1)
    target = torch.gather(colour, 1, category)                   # [B, N]
    target = torch.where(best >= MIN_COVER, target, torch.full_like(target, -100))
    if not (target >= 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)


class VisionHeads(torch.nn.Module):
    """The linear heads of the vision losses (training only; not part of the checkpoint).

    ``category`` and ``colour`` read the tower's patch features, ``cls`` its pooled CLS
    output, ``align`` the projected image tokens (see :class:`WordAlignment`).
    """

    def __init__(self, tokenizer: Any, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.category = torch.nn.Linear(vision_hidden, 1 + len(CATEGORY_NAMES))
        self.colour = torch.nn.Linear(vision_hidden, len(COLOUR_NAMES))
        self.cls = torch.nn.Linear(vision_hidden, len(CATEGORY_NAMES))
        self.align = WordAlignment(tokenizer, text_hidden)

    def losses(self, features: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor,
               embeddings: torch.Tensor, coverage: torch.Tensor, present: torch.Tensor,
               colour: torch.Tensor) -> dict[str, torch.Tensor]:
        """All vision losses, plus the alignment logits (for the presence-F1 log line)."""
        align_logits = self.align(tokens, embeddings)
        return dict(
            probe=patch_loss(self.category(features), coverage, present),
            align=patch_loss(align_logits, coverage, present),
            colour=colour_loss(self.colour(features), coverage, colour),
            cls=F.binary_cross_entropy_with_logits(self.cls(pooled).float(), present),
            align_logits=align_logits,
        )


class WordAlignment(torch.nn.Module):
    """Scores projected image tokens against the decoder's embeddings of category names.

    ``logits[b, n, 1 + c] = tau * cos(image token, mean embedding of category c's words)``;
    index 0 compares with a learned background vector. Training :func:`patch_loss` on
    these logits pulls an image token showing a dog towards the word "dog".
    """

    def __init__(self, tokenizer: Any, hidden: int) -> None:
        super().__init__()
        ids = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in CATEGORY_NAMES]
        width = max(len(i) for i in ids)
        self.register_buffer("word_ids", torch.tensor([i + [i[-1]] * (width - len(i)) for i in ids]),
                             persistent=False)
        self.register_buffer("word_mask", torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i))
                                                        for i in ids]), persistent=False)
        self.background = torch.nn.Parameter(torch.randn(hidden) * 0.02)
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        words = embeddings[self.word_ids] * self.word_mask[..., None]         # [C, W, D]
        names = words.sum(1) / self.word_mask.sum(1, keepdim=True)            # [C, D]
        keys = F.normalize(torch.cat([self.background[None], names]).float(), dim=-1)
        return self.log_tau.exp() * F.normalize(tokens.float(), dim=-1) @ keys.T


@torch.no_grad()
def init_patch_embedding(conv: torch.nn.Conv2d, pixel_values: torch.Tensor) -> None:
    """Set the ViT patch embedding to the principal directions of real image patches.

    A data-dependent start (unit-norm PCA components of the world's patches) lets the
    tower tell glyphs apart sooner than a random projection: in pilots it reached the
    same per-patch accuracy in about two thirds of the steps.

    Args:
        conv: the patch-embedding convolution (kernel = stride = patch size).
        pixel_values: a few hundred normalised images ``[B, 3, H, W]``.
    """
    p = conv.kernel_size[0]
    patches = pixel_values.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
    patches = patches.reshape(-1, 3 * p * p)
    patches = patches - patches.mean(0)
    _, _, v = torch.pca_lowrank(patches, q=conv.out_channels, center=False)
    directions = v.T / v.T.norm(dim=1, keepdim=True)
    conv.weight.copy_(directions.view(conv.out_channels, 3, p, p))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy on answer tokens (labels aligned with inputs)."""
    target, w = labels[:, 1:], weights[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                         ignore_index=-100, reduction="none")
    return (ce * w.flatten()).sum() / w.sum().clamp_min(1e-8)


def _vision_key(config: TrainConfig) -> str:
    """Every setting stage 1 depends on (the vision cache is valid only for the same ones)."""
    keys = ("vision_steps", "vision_batch_size", "vision_lr", "warmup", "weight_decay", "seed",
            "world_seed", "bf16", "pool_size", "region_every", "threads", "model")
    return json.dumps({k: v for k, v in asdict(config).items() if k in keys}, sort_keys=True)


def _load_vision_cache(path: str | None, key: str) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    data = torch.load(path, weights_only=False)
    return data if data.get("key") == key else None


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _presence_f1(logits: torch.Tensor, present: torch.Tensor) -> float:
    pred = logits > 0
    tp = (pred & (present > 0)).sum().item()
    return 2 * tp / max(1, pred.sum().item() + (present > 0).sum().item())


def _yes_no_accuracy(logits: torch.Tensor, labels: torch.Tensor, yes_no: torch.Tensor) -> float:
    """Accuracy of the Yes/No answer tokens in a batch (argmax over the full vocabulary)."""
    target = labels[:, 1:]
    mask = torch.isin(target, yes_no)
    if not mask.any():
        return float("nan")
    pred = logits[:, :-1].argmax(-1)
    return (pred[mask] == target[mask]).float().mean().item()


class _Meter:
    """Running means between log lines, and the history written to ``testbed.json``."""

    def __init__(self, log: Log | None, start: float) -> None:
        self.log, self.start = log, start
        self.sums: dict[str, float] = {}
        self.count = 0
        self.history: list[dict[str, float]] = []

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, stage: str, step: int, total: int) -> None:
        rec = dict(stage=stage, step=step, time=round(time.time() - self.start, 1),
                   **{k: round(v / self.count, 5) for k, v in self.sums.items()})
        self.history.append(rec)
        self.sums, self.count = {}, 0
        if self.log is not None:
            values = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k not in ("stage", "step", "time"))
            self.log(f"[{stage} {step}/{total}] {values} t={rec['time']:.0f}s")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train(out_dir: str | Path, *, steps: int | None = None, seed: int = 0, device: str = "cpu",
          config: TrainConfig | None = None, log: Log | None = print) -> Path:
    """Train a testbed LVLM and save it where ``AutoModelForImageTextToText`` loads it.

    Args:
        out_dir: checkpoint directory to write (model, processor, ``testbed.json``).
        steps: joint-training steps; overrides ``config.steps`` when given. The vision
            warm-up adds ``config.vision_steps`` cheaper steps before them.
        seed: training seed (init and scene stream); overrides ``config.seed``.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        config: the full recipe; defaults to ``TrainConfig()``.
        log: receives one progress line every ``config.log_every`` steps (None: silent).

    Returns:
        ``out_dir`` as a Path. ``testbed.json`` in it records the config, the loss
        history and the wall time.
    """
    config = replace(config or TrainConfig(), seed=seed)
    if steps is not None:
        config = replace(config, steps=steps)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np_rng = np.random.default_rng([config.seed, 7])
    start, cpu_start = time.time(), time.process_time()

    world = World(config.world_seed, config.model.image_size)
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, config.model)
    model = build_model(tokenizer, config.model).to(device)
    heads = VisionHeads(tokenizer, config.model.vision_hidden, config.model.text_hidden).to(device)
    batcher = Batcher(world, tokenizer, processor, config)
    meter = _Meter(log, start)
    embeddings = model.get_input_embeddings().weight
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    # bf16 autocast: about 1.4x faster on CPUs with native bf16 (AVX512-BF16 / AMX).
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.bf16)
    next_scene = 0

    def take(n: int) -> list[int]:
        nonlocal next_scene
        next_scene += n
        return list(range(next_scene - n, next_scene))

    def optimiser(params: list[torch.nn.Parameter], lr: float, total: int
                  ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup, total))

    def update(opt: torch.optim.Optimizer, sched: Any, params: list[torch.nn.Parameter],
               loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    def vision_losses(batch: dict[str, torch.Tensor], features: torch.Tensor, pooled: torch.Tensor,
                      tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        parts = heads.losses(features, pooled, tokens, embeddings, batch["coverage"], batch["present"],
                             batch["colour"])
        align_logits = parts.pop("align_logits")
        logs = {f"{k}_loss": v.item() for k, v in parts.items()}
        logs["presence_f1"] = _presence_f1(align_logits[..., 1:].detach().amax(1), batch["present"])
        return sum(parts.values()), logs

    # Stage 1: vision warm-up (tower, projector, heads; the decoder is not run) ------------
    model.train()
    cache_key = _vision_key(config)
    cached = _load_vision_cache(config.vision_cache, cache_key)
    if cached is not None:
        model.load_state_dict(cached["model"])
        heads.load_state_dict(cached["heads"])
        meter.history += cached["history"]
        take(config.vision_steps * config.vision_batch_size)
        if log is not None:
            log(f"[vision] loaded the warm-up from {config.vision_cache}")
    else:
        init_patch_embedding(tower.embeddings.patch_embedding,
                             batcher.images(list(range(256)))[1].to(device))
        params = [*tower.parameters(), *projector.parameters(), *heads.parameters(), embeddings]
        opt, sched = optimiser(params, config.vision_lr, config.vision_steps)
        for step in range(1, config.vision_steps + 1):
            _, pixel_values, coverage, present, colour = batcher.images(take(config.vision_batch_size))
            batch = dict(coverage=coverage.to(device), present=present.to(device), colour=colour.to(device))
            with autocast:
                out = tower(pixel_values.to(device), output_hidden_states=True)
                features = out.hidden_states[-1][:, 1:]
                loss, logs = vision_losses(batch, features, out.pooler_output, projector(features))
            update(opt, sched, params, loss)
            meter.add(**logs)
            if step % config.log_every == 0 or step == config.vision_steps:
                meter.flush("vision", step, config.vision_steps)

        if config.vision_cache:
            torch.save({"key": cache_key, "model": model.state_dict(), "heads": heads.state_dict(),
                        "history": list(meter.history)}, config.vision_cache)

    # Stage 2: joint training --------------------------------------------------------------
    captured: dict[str, torch.Tensor] = {}
    hooks = [projector.register_forward_hook(
                 lambda _m, args, out: captured.update(features=args[0], tokens=out)),
             tower.register_forward_hook(
                 lambda _m, args, out: captured.update(pooled=out.pooler_output))]
    params = [*model.parameters(), *heads.parameters()]
    opt, sched = optimiser(params, config.lr, config.steps)
    yes_no = torch.tensor(tokenizer.convert_tokens_to_ids(["Yes", "No"]), device=device)
    try:
        for step in range(1, config.steps + 1):
            batcher.breadth = min(1.0, max(0.0, (step - config.warm_steps) / max(1, config.ramp_steps)))
            batch = {k: v.to(device) for k, v in batcher.batch(take(config.batch_size), np_rng).items()}
            with autocast:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"])
                loss_lm = lm_loss(out.logits, batch["labels"], batch["weights"])
                loss_vision, logs = vision_losses(batch, captured["features"], captured["pooled"],
                                                  captured["tokens"])
            update(opt, sched, params, loss_lm + config.aux_weight * loss_vision)
            meter.add(lm_loss=loss_lm.item(), vision_loss=loss_vision.item(),
                      yes_no_acc=_yes_no_accuracy(out.logits.detach(), batch["labels"], yes_no))
            if step % config.log_every == 0 or step == config.steps:
                meter.flush("joint", step, config.steps)
            if config.snapshot_every and step % config.snapshot_every == 0 and step < config.steps:
                model.eval()
                save_testbed(model, processor, f"{Path(out_dir)}-step{step}")
                model.train()
    finally:
        for h in hooks:
            h.remove()

    model.eval()
    meta = dict(config=asdict(config), history=meter.history, wall_time_s=round(time.time() - start, 1),
                cpu_time_s=round(time.process_time() - cpu_start, 1),
                torch=torch.__version__, n_parameters=sum(p.numel() for p in model.parameters()))
    return save_testbed(model.cpu(), processor, out_dir, extra=meta)
