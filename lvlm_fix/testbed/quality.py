"""Measure a testbed checkpoint on the synthetic benchmark: POPE, CHAIR, image attention.

Run ``python -m lvlm_fix.testbed.quality --checkpoint DIR`` to print a markdown table.
Decoding is greedy; POPE answers are parsed with the canonical rule
(:func:`lvlm_fix.evals.pope.parse_answer`) and captions are scored with the COCO CHAIR
code path (:class:`lvlm_fix.evals.chair.ChairEvaluator`) on the benchmark's COCO files.
The benchmark scenes are held out: they come from the world's "val" stream, training
uses the "train" stream.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..evals.chair import ChairEvaluator
from ..evals.pope import score
from ..hooks.plan import AttnContext, Participant, Plan
from ..diagnostics import entropy, image_mass
from ..images import load_image
from .benchmark import POPE_SPLITS, SyntheticBenchmark, ensure_benchmark, read_jsonl
from .model import CHECKPOINT_DIR, format_prompt, load_testbed
from .world import CAPTION_PROMPT


@torch.no_grad()
def generate(model: Any, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
             max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy answers for (image, prompt) pairs, batched with left padding.

    Args:
        model: a loaded testbed (or any LLaVA-template) model.
        processor: its processor.
        images: one image per prompt.
        prompts: user prompts (the template is applied here).
        max_new_tokens: generation length limit.
        batch_size: pairs per ``generate`` call.

    Returns:
        Decoded answers without special tokens.
    """
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = processor(images=list(images[i:i + batch_size]),
                          text=[format_prompt(p) for p in prompts[i:i + batch_size]],
                          padding=True, return_tensors="pt").to(model.device)
        ids = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [s.strip() for s in out]


def _images(bench: SyntheticBenchmark, names: Sequence[str]) -> list[Image.Image]:
    cache: dict[str, Image.Image] = {}
    for name in dict.fromkeys(names):
        cache[name] = load_image(bench.images_dir / name)
    return [cache[n] for n in names]


def evaluate_pope(model: Any, processor: Any, bench: SyntheticBenchmark, split: str,
                  limit: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """POPE metrics of one split (first ``limit`` questions, in file order).

    Returns:
        accuracy, precision, recall, f1, yes_ratio, false_yes (FP / negatives), n, ...
    """
    rows = read_jsonl(bench.pope_file(split))[:limit]
    answers = generate(model, processor, _images(bench, [r["image"] for r in rows]),
                       [r["text"] for r in rows], max_new_tokens=4, batch_size=batch_size)
    report = score(answers, [r["label"] for r in rows]).as_dict()
    report["false_yes"] = report["fp"] / max(1, report["fp"] + report["tn"])
    return report


def evaluate_chair(model: Any, processor: Any, bench: SyntheticBenchmark, limit: int | None = None,
                   max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, Any]:
    """CHAIR of greedy captions for "Please describe this image in detail."

    Returns:
        chair_s, chair_i, recall (object coverage), mean_length, n, and example captions.
    """
    images_meta = json.loads(bench.captions_file.read_text())["images"][:limit]
    captions = generate(model, processor, _images(bench, [m["file_name"] for m in images_meta]),
                        [CAPTION_PROMPT] * len(images_meta), max_new_tokens, batch_size)
    evaluator = ChairEvaluator.from_coco(bench.instances_file, bench.captions_file)
    result = evaluator.evaluate([{"image_id": m["id"], "caption": c}
                                 for m, c in zip(images_meta, captions)])
    return dict(chair_s=result.chair_s, chair_i=result.chair_i, recall=result.recall,
                mean_length=result.mean_length, n=result.n, n_mentions=result.n_mentions,
                n_hallucinated=result.n_hallucinated, examples=captions[:5])


class _ImageAttention(Participant):
    """Per layer and head, at the last prompt position: image mass, entropy and top-1 share."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> ([b, h] x 3)

    def bind(self, lvlm: Any) -> None:
        self.observed_layers = frozenset(range(lvlm.num_layers))

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:  # [b, h, k]
        img = ctx.image_keys
        mass = image_mass(probs_last, img)
        p = probs_last * img[:, None, :] / mass.clamp_min(1e-12)[..., None]
        self.rows[ctx.layer] = (mass, entropy(probs_last, img[:, None, :]), p.amax(-1))


def image_attention(checkpoint: str | Path, bench: SyntheticBenchmark, n: int = 64) -> list[dict[str, float]]:
    """How graded each decoder head's attention over the image tokens is.

    For POPE questions, at the last prompt position (where the answer is decided), per
    layer and head: the attention mass on image tokens, and the effective number of image
    tokens attended (exp of the entropy of the attention renormalised over image tokens;
    1 = one-hot, 64 = uniform over 64 tokens). Read through lvlm-fix's own attention hook
    (the last query's row only), as ``lvlm-fix heads`` reads it.

    Returns:
        One dict per (layer, head): layer, head, image_mass, effective_tokens, top1_share.
    """
    from ..model import load

    lvlm = load(checkpoint, dtype="float32")
    rows = read_jsonl(bench.pope_file("random"))[:n]
    lvlm.tokenizer.padding_side = "left"  # the last position is every row's last prompt token
    batch = lvlm.processor(images=_images(bench, [r["image"] for r in rows]),
                           text=[format_prompt(r["text"]) for r in rows], padding=True, return_tensors="pt")
    recorder = _ImageAttention()
    with Plan(lvlm, [recorder]).active(), torch.inference_mode():
        lvlm.model(**batch)
    stats = []
    for layer, (mass, ent, top1) in sorted(recorder.rows.items()):
        for head in range(mass.shape[1]):
            stats.append(dict(layer=layer, head=head, image_mass=float(mass[:, head].mean()),
                              effective_tokens=float(ent[:, head].exp().mean()),
                              top1_share=float(top1[:, head].mean())))
    return stats


def evaluate(checkpoint: str | Path | None = None, bench_dir: str | Path | None = None,
             pope_limit: int | None = None, chair_limit: int | None = None,
             attention: bool = True, batch_size: int = 64) -> dict[str, Any]:
    """All quality numbers of a checkpoint on the (cached) synthetic benchmark.

    Args:
        checkpoint: checkpoint directory (default: the shipped one).
        bench_dir: benchmark directory (default: :func:`ensure_benchmark`'s cache).
        pope_limit: questions per POPE split (default all 3,000).
        chair_limit: images to caption (default all 500).
        attention: also compute the per-head image-attention profile.
        batch_size: generation batch size.

    Returns:
        ``{"pope": {split: metrics}, "chair": {...}, "attention": [...]}``.
    """
    torch.manual_seed(0)
    model, processor = load_testbed(checkpoint or CHECKPOINT_DIR)
    bench = SyntheticBenchmark(Path(bench_dir) if bench_dir else ensure_benchmark())
    result: dict[str, Any] = {
        "pope": {s: evaluate_pope(model, processor, bench, s, pope_limit, batch_size)
                 for s in POPE_SPLITS},
        "chair": evaluate_chair(model, processor, bench, chair_limit, batch_size=batch_size),
    }
    if attention:
        result["attention"] = image_attention(checkpoint or CHECKPOINT_DIR, bench)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The quality numbers as a small markdown report."""
    lines = ["| POPE split | accuracy | precision | recall | F1 | yes-ratio | false-yes rate | n |",
             "|---|---|---|---|---|---|---|---|"]
    for split, m in result["pope"].items():
        lines.append(f"| {split} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{m['f1']:.3f} | {m['yes_ratio']:.3f} | {m['false_yes']:.3f} | {m['n']} |")
    c = result["chair"]
    lines += ["", "| CHAIR_S | CHAIR_I | coverage (recall) | mean length | captions |",
              "|---|---|---|---|---|",
              f"| {c['chair_s']:.3f} | {c['chair_i']:.3f} | {c['recall']:.3f} | "
              f"{c['mean_length']:.1f} | {c['n']} |"]
    if "attention" in result:
        lines += ["", "| layer | image mass (mean over heads) | effective image tokens per head "
                  "(of 64) | top-1 share per head |", "|---|---|---|---|"]
        by_layer: dict[int, list[dict[str, float]]] = {}
        for s in result["attention"]:
            by_layer.setdefault(int(s["layer"]), []).append(s)
        for layer, heads in sorted(by_layer.items()):
            mass = sum(h["image_mass"] for h in heads) / len(heads)
            eff = ", ".join(f"{h['effective_tokens']:.1f}" for h in heads)
            top = ", ".join(f"{h['top1_share']:.2f}" for h in heads)
            lines.append(f"| {layer} | {mass:.2f} | {eff} | {top} |")
    lines += ["", "Example captions:"] + [f"- {e}" for e in c["examples"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m lvlm_fix.testbed.quality --checkpoint DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    parser.add_argument("--bench", default=None, help="benchmark dir (default: cached synthetic-v1)")
    parser.add_argument("--pope-limit", type=int, default=None, help="questions per split")
    parser.add_argument("--chair-limit", type=int, default=None, help="images to caption")
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.checkpoint, args.bench, args.pope_limit, args.chair_limit,
                      attention=not args.no_attention)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
