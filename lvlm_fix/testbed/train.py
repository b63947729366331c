"""Train the testbed LVLM on the synthetic world, on CPU, in a fixed number of steps.

Recipe (two stages, deterministic for a given config, seed, device and thread count):

1. **Vision warm-up** (``vision_steps``, cheap: no decoder pass). The CLIP tower, the
   projector and two linear heads learn a per-patch classification ("which category covers
   this patch, or background") plus image-level presence. One head reads the tower's
   features; the other scores the *projected* image tokens against the decoder's word
   embeddings of the category names, so an image token showing a dog starts out looking
   like the word "dog" to the decoder. The patch embedding starts from the principal
   directions of the world's image patches. Without some such vision loss a CPU-sized run
   learns only the language prior (it answers "no" to everything; feasibility study §6),
   and in pilots the decoder never found the image without the word alignment.
2. **Joint training** (``steps``): the whole LLaVA on packed multi-turn conversations about
   one image: a caption for "Please describe this image in detail." and yes/no answers to
   "Is there a {object} in the image?", next-token loss on the answers only (each turn
   weighted equally, the caption ``caption_weight`` times), plus the vision losses. The
   first turn always has exactly the single-turn inference format. Yes/no questions are
   balanced; negatives are drawn uniformly from the absent categories, so co-occurring
   absent objects are asked about only at their natural rate and the prior survives.

Example:
    >>> from lvlm_fix.testbed.train import TrainConfig, train
    >>> train("/tmp/testbed-ckpt", steps=2000, seed=0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import ModelConfig, build_model, build_processor, build_tokenizer, encode_pair, save_testbed
from .world import CAPTION_PROMPT, CATEGORY_INDEX, CATEGORY_NAMES, World, question_for

Log = Callable[[str], None]
MIN_COVER = 0.08  # a patch belongs to an object that covers at least this much of it


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        steps: joint (stage 2) optimisation steps.
        vision_steps: vision warm-up (stage 1) steps.
        batch_size: conversations (= images) per joint step.
        vision_batch_size: images per warm-up step.
        turns: question/caption turns packed into one conversation about an image.
        caption_prob: chance that a conversation contains the caption turn.
        caption_weight: loss weight of a caption turn relative to a yes/no turn.
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
            machine 1 thread was 2-3x faster than 2.
        model: model sizes.
    """

    steps: int = 1700
    vision_steps: int = 900
    batch_size: int = 32
    vision_batch_size: int = 32
    turns: int = 3
    caption_prob: float = 0.5
    caption_weight: float = 2.0
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
    threads: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class Batcher:
    """Turns training-scene indices into model inputs, deterministically."""

    def __init__(self, world: World, tokenizer: Any, processor: Any, config: TrainConfig) -> None:
        self.world = world
        self.tok = tokenizer
        self.config = config
        self.n_image = config.model.num_image_tokens
        self.grid = config.model.image_size // config.model.patch_size
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._turn_cache: dict[str, list[int]] = {}
        self._pool: dict[int, tuple[Any, np.ndarray, np.ndarray]] = {}

    def _render(self, index: int) -> tuple[Any, np.ndarray, np.ndarray]:
        if self.config.pool_size:
            index %= self.config.pool_size
            if index in self._pool:
                return self._pool[index]
        scene = self.world.scene("train", index, stream=self.config.seed)
        image, masks = self.world.render_with_masks(scene)
        cover = self.world.patch_coverage(scene, masks, self.grid)
        item = (scene, np.asarray(image), (cover * 255).round().astype(np.uint8))
        if self.config.pool_size:
            self._pool[index] = item
        return item

    def images(self, indices: list[int]) -> tuple[list[Any], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scenes, pixel values ``[B,3,H,W]``, patch coverage ``[B,C,g,g]``, presence ``[B,C]``."""
        scenes, pix, cover = [], [], []
        for i in indices:
            scene, pixels, patch = self._render(i)
            scenes.append(scene)
            pix.append(pixels)
            cover.append(patch)
        # Same arithmetic as the CLIP image processor (rescale, then normalise); images are
        # already image_size square, so its resize and crop are identities.
        x = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).float() / 255.0
        pixel_values = (x - self.mean) / self.std
        coverage = torch.from_numpy(np.stack(cover)).float() / 255.0
        present = torch.zeros(len(scenes), len(CATEGORY_NAMES))
        for b, scene in enumerate(scenes):
            for c in scene.categories:
                present[b, CATEGORY_INDEX[c]] = 1.0
        return scenes, pixel_values, coverage, present

    def _later_turn(self, prompt: str) -> list[int]:
        # Later turns are "USER: {q} ASSISTANT:" after the previous "</s>" (llava-hf style).
        if prompt not in self._turn_cache:
            self._turn_cache[prompt] = self.tok(f"USER: {prompt} ASSISTANT:",
                                                add_special_tokens=False)["input_ids"]
        return self._turn_cache[prompt]

    def conversation(self, scene: Any, rng: np.random.Generator) -> tuple[list[int], list[int], list[float]]:
        """One packed conversation: input ids, labels (-100 off answers), token loss weights."""
        present = scene.categories
        absent = [c for c in CATEGORY_NAMES if c not in present]
        turns: list[tuple[str, str, float]] = []
        asked: set[str] = set()
        caption_turn = (int(rng.integers(self.config.turns))
                        if rng.random() < self.config.caption_prob else -1)
        for t in range(self.config.turns):
            if t == caption_turn:
                turns.append((CAPTION_PROMPT, self.world.caption(scene), self.config.caption_weight))
                continue
            # Balanced yes/no; a negative is any absent category, uniformly (natural rate).
            want_yes = rng.random() < 0.5
            pool = [c for c in (present if want_yes else absent) if c not in asked]
            pool = pool or [c for c in (absent if want_yes else present) if c not in asked]
            cat = pool[int(rng.integers(len(pool)))]
            asked.add(cat)
            turns.append((question_for(cat), "Yes" if cat in present else "No", 1.0))

        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        for t, (prompt, answer, weight) in enumerate(turns):
            if t == 0:
                full, n_prompt = encode_pair(self.tok, prompt, answer, self.n_image)
            else:
                head = self._later_turn(prompt)
                tail = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                full, n_prompt = head + tail, len(head)
            n_answer = len(full) - n_prompt
            ids += full
            labels += [-100] * n_prompt + full[n_prompt:]
            weights += [0.0] * n_prompt + [weight / n_answer] * n_answer
        return ids, labels, weights

    def batch(self, indices: list[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A joint-training batch (right-padded; positions of real tokens start at 0)."""
        scenes, pixel_values, coverage, present = self.images(indices)
        convs = [self.conversation(s, rng) for s in scenes]
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
                    pixel_values=pixel_values, coverage=coverage, present=present)


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
    start = time.time()

    world = World(config.world_seed, config.model.image_size)
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, config.model)
    model = build_model(tokenizer, config.model).to(device)
    probe = torch.nn.Linear(config.model.vision_hidden, 1 + len(CATEGORY_NAMES)).to(device)
    align = WordAlignment(tokenizer, config.model.text_hidden).to(device)
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

    # Stage 1: vision warm-up (tower, projector, heads; the decoder is not run) ------------
    model.train()
    init_patch_embedding(tower.embeddings.patch_embedding,
                         batcher.images(list(range(256)))[1].to(device))
    params = [*tower.parameters(), *projector.parameters(), *probe.parameters(),
              *align.parameters(), embeddings]
    opt, sched = optimiser(params, config.vision_lr, config.vision_steps)
    for step in range(1, config.vision_steps + 1):
        _, pixel_values, coverage, present = batcher.images(take(config.vision_batch_size))
        pixel_values, coverage, present = pixel_values.to(device), coverage.to(device), present.to(device)
        with autocast:
            features = tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
            probe_logits = probe(features)
            align_logits = align(projector(features), embeddings)
            loss_probe = patch_loss(probe_logits, coverage, present)
            loss_align = patch_loss(align_logits, coverage, present)
        update(opt, sched, params, loss_probe + loss_align)
        meter.add(probe_loss=loss_probe.item(), align_loss=loss_align.item(),
                  presence_f1=_presence_f1(align_logits[..., 1:].detach().amax(1), present))
        if step % config.log_every == 0 or step == config.vision_steps:
            meter.flush("vision", step, config.vision_steps)

    # Stage 2: joint training --------------------------------------------------------------
    captured: dict[str, torch.Tensor] = {}
    hook = projector.register_forward_hook(
        lambda _m, args, out: captured.update(features=args[0], tokens=out))
    params = [*model.parameters(), *probe.parameters(), *align.parameters()]
    opt, sched = optimiser(params, config.lr, config.steps)
    yes_no = torch.tensor(tokenizer.convert_tokens_to_ids(["Yes", "No"]), device=device)
    try:
        for step in range(1, config.steps + 1):
            batch = {k: v.to(device) for k, v in batcher.batch(take(config.batch_size), np_rng).items()}
            with autocast:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"])
                loss_lm = lm_loss(out.logits, batch["labels"], batch["weights"])
                loss_vision = (patch_loss(probe(captured["features"]), batch["coverage"], batch["present"])
                               + patch_loss(align(captured["tokens"], embeddings), batch["coverage"],
                                            batch["present"]))
            update(opt, sched, params, loss_lm + config.aux_weight * loss_vision)
            meter.add(lm_loss=loss_lm.item(), vision_loss=loss_vision.item(),
                      yes_no_acc=_yes_no_accuracy(out.logits.detach(), batch["labels"], yes_no))
            if step % config.log_every == 0 or step == config.steps:
                meter.flush("joint", step, config.steps)
    finally:
        hook.remove()

    model.eval()
    meta = dict(config=asdict(config), history=meter.history, wall_time_s=round(time.time() - start, 1),
                torch=torch.__version__, n_parameters=sum(p.numel() for p in model.parameters()))
    return save_testbed(model.cpu(), processor, out_dir, extra=meta)
