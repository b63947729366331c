"""ACT's offline head search on an LVLM calibration set.

ACT keeps only the heads for which damping attention sinks *alone* beats the vanilla model on a
calibration set. The release (GATECH-EIC/ACT, scripts/calibration.sh) runs one evaluation per
(layer, head) with ``CALIBRATION=1`` and leaves the picking to a human reading ``cal.log``;
here the whole search is one call:

1. score every sample by a single forward, as ACT's own classification evaluation does: at the
   answer position, the next-token logits of the "Yes"/"yes" tokens against the "No"/"no" tokens
   (the larger of each set); ties count as "no";
2. the vanilla accuracy is the baseline;
3. ACT is applied to each single (layer, head) of the searched layers and the accuracy measured;
4. the heads whose accuracy beats the baseline are kept, and one last pass measures ACT with all
   of them together (what the search gained).

Samples are :class:`lvlm_fix.evals.data.PopeSample`-like objects (``.question``, ``.label`` and
``.load_image()`` or ``.image``) or ``(image, question, label)`` tuples; use a split you do not
evaluate on. Cost: ``1 + |layers| x heads + 1`` batched single-token passes over the samples.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._lazy import torch
from ...errors import InputError, LvlmFixWarning
from ...hooks.plan import Plan
from ..base import resolve_layers
from ..calibration import Calibration
from .method import HEAD_FILE_FORMAT, Act, ActConfig, default_act_layers

if TYPE_CHECKING:
    from PIL import Image

    from ...model import LVLM

__all__ = ["CALIBRATION", "answer_token_ids", "calibrate_act", "summarize_head_file", "write_head_file"]


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Ids of the single tokens that spell ``word`` in any casing, with or without a leading space.

    Every token of the encodings of ``Word``, ``word``, `` Word`` and `` word`` whose decoded text,
    stripped and lowercased, equals ``word`` counts (e.g. Llama's ``▁Yes``, Qwen's ``Yes`` and ``ĠYes``).
    Falls back to the first token of ``Word`` when no single token spells it.
    """
    target = word.strip().lower()
    ids: set[int] = set()
    for variant in (target.capitalize(), target, " " + target.capitalize(), " " + target):
        for tok in tokenizer.encode(variant, add_special_tokens=False):
            if tokenizer.decode([tok]).strip().lower() == target:
                ids.add(int(tok))
    if not ids:
        first = tokenizer.encode(target.capitalize(), add_special_tokens=False)
        if not first:
            raise InputError(f"the tokenizer cannot encode {word!r}")
        ids.add(int(first[0]))
    return sorted(ids)


def _unpack(sample: Any, index: int) -> tuple[Image.Image, str, bool]:
    """``(image, question, label is yes)`` from a PopeSample-like object or an (image, question, label) tuple."""
    from ...images import load_image

    if isinstance(sample, (tuple, list)):
        if len(sample) != 3:
            raise InputError(f"calibration sample {index} has {len(sample)} items; give (image, question, label)")
        image, question, label = sample
    else:
        try:
            question, label = sample.question, sample.label
        except AttributeError:
            raise InputError(f"calibration sample {index} has no .question/.label; give PopeSample-like objects "
                             "or (image, question, label) tuples") from None
        image = sample.load_image() if hasattr(sample, "load_image") else getattr(sample, "image", None)
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if image is None:
        raise InputError(f"calibration sample {index} has no image")
    lab = str(label).strip().lower()
    if lab not in ("yes", "no"):
        raise InputError(f"calibration sample {index}: label {label!r} is not 'yes' or 'no'")
    return image, str(question), lab == "yes"


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)


def calibrate_act(
    lvlm: LVLM,
    samples: Iterable[Any],
    *,
    layers: Iterable[int] | None = None,
    limit: int | None = None,
    beta: float = 0.4,
    thres: float = 0.1,
    batch_size: int = 8,
    template: str = "{question}",
    bench: str = "pope",
    dataset: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """ACT's per-head search: which heads, damped alone, raise yes/no accuracy over the vanilla model.

    Args:
        lvlm: the model handle.
        samples: calibration samples (see the module docstring), used in the order given.
        layers: layers to search (negative counts from the end); default ACT's scaled layer range
            (2..30 of 32, :func:`~lvlm_fix.interventions.act.default_act_layers`).
        limit: use at most this many samples (the release uses 900 per dataset).
        beta, thres: ACT's parameters during the search (defaults 0.4 and 0.1, as the release).
        batch_size: rows per forward.
        template: the user text, with a ``{question}`` field.
        bench: name recorded in the result.
        dataset: the description of the samples' data (id, sha256, size), recorded in the result.
        progress: show a progress bar on stderr.

    Returns:
        A head-list document for :func:`write_head_file` / ``ActConfig(heads_file=...)``:
        ``heads`` (``{"<layer>": [h, ...]}``, the heads that beat the baseline) and ``calibration``
        (``samples``, ``baseline_acc``, ``per_head_acc`` and ``per_head_gain`` keyed ``"layer:head"``,
        ``selected``, ``combined_acc`` and ``combined_gain`` of ACT with all selected heads, ...).
    """
    from ..._version import __version__

    ActConfig(beta=beta, thres=thres)  # validates the ranges
    if "{question}" not in template:
        raise InputError(f"template {template!r} has no {{question}} field; add it where the question goes")
    n_layers, n_heads = lvlm.num_layers, lvlm.num_heads
    searched = sorted(resolve_layers(None if layers is None else list(layers), default_act_layers(n_layers), n_layers))
    rows = []
    for i, s in enumerate(samples):
        if limit is not None and i >= limit:
            break
        rows.append(_unpack(s, i))
    if not rows:
        raise InputError("no calibration samples; pass at least one (image, question, label)")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} is out of range; valid range is [1, inf]")
    yes_ids = answer_token_ids(lvlm.tokenizer, "yes")
    no_ids = answer_token_ids(lvlm.tokenizer, "no")
    if set(yes_ids) & set(no_ids):
        raise InputError(f"the tokenizer's yes tokens {yes_ids} and no tokens {no_ids} overlap; cannot score yes/no")
    labels = torch.tensor([r[2] for r in rows])
    # Encode once; batches wait on the CPU and move to the model for each pass.
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = lvlm.encode([r[0] for r in chunk], [template.replace("{question}", r[1]) for r in chunk])
        batches.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()})
    yes_t = torch.tensor(yes_ids)
    no_t = torch.tensor(no_ids)

    def accuracy(act: Act | None) -> float:
        preds = []
        for batch in batches:
            ctx = Plan(lvlm, [act]).active() if act is not None else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                inputs = {k: v.to(lvlm.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = lvlm.model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=1,
                                          output_logits=True, return_dict_in_generate=True)
            logits = out.logits[0].float().cpu()  # [b, vocab] at the answer position
            preds.append(logits[:, yes_t].amax(-1) > logits[:, no_t].amax(-1))
        return float((torch.cat(preds) == labels).float().mean())

    def act_on(heads: dict[int, list[int]]) -> Act:
        spec = ";".join(f"{layer}:{','.join(map(str, hs))}" for layer, hs in sorted(heads.items()))
        return Act(ActConfig(beta=beta, thres=thres, heads=spec))

    pairs = [(layer, h) for layer in searched for h in range(n_heads)]
    per_head: dict[str, float] = {}
    with _progress(len(pairs) + 2, progress, "ACT head search") as bar:
        baseline = accuracy(None)
        if bar is not None:
            bar.update()
        for layer, h in pairs:
            per_head[f"{layer}:{h}"] = accuracy(act_on({layer: [h]}))
            if bar is not None:
                bar.update()
        chosen: dict[int, list[int]] = {}
        for layer, h in pairs:
            if per_head[f"{layer}:{h}"] > baseline:
                chosen.setdefault(layer, []).append(h)
        combined = accuracy(act_on(chosen)) if chosen else baseline
        if bar is not None:
            bar.update()
    return {
        "format": HEAD_FILE_FORMAT,
        "model": lvlm.name,
        "model_type": lvlm.adapter.model_type,
        "num_layers": n_layers,
        "num_heads": n_heads,
        "heads": {str(layer): hs for layer, hs in sorted(chosen.items())},
        "calibration": {
            "bench": bench,
            "samples": len(rows),
            "yes_fraction": round(float(labels.float().mean()), 4),
            "template": template,
            "scoring": "single forward: max logit of the yes tokens vs the no tokens at the answer position",
            "yes_token_ids": yes_ids,
            "no_token_ids": no_ids,
            "beta": beta,
            "thres": thres,
            "layers": searched,
            "baseline_acc": baseline,
            "per_head_acc": per_head,
            "per_head_gain": {k: round(v - baseline, 6) for k, v in per_head.items()},
            "selected": sum(len(hs) for hs in chosen.values()),
            "combined_acc": combined,
            "combined_gain": round(combined - baseline, 6),
            "lvlm_fix_version": __version__,
            **({"dataset": dataset} if dataset is not None else {}),
        },
    }


def write_head_file(result: dict[str, Any], path: str | Path) -> Path:
    """Write a :func:`calibrate_act` result as the JSON head list ``ActConfig(heads_file=...)`` reads."""
    from ...files import atomic_write

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, (json.dumps(result, indent=1) + "\n").encode())  # whole or not at all (a full disk)
    return p


def summarize_head_file(result: dict[str, Any], path: str | Path) -> str:
    """The line to print after :func:`write_head_file`; a warning instead when the file lists no head."""
    import warnings

    cal = result.get("calibration", {})
    if not result["heads"]:
        warnings.warn(f"no head raised yes/no accuracy above the baseline's {cal['baseline_acc']:.3f} on these "
                      f"{cal['samples']} questions, so {path} lists no head and `--heads-file {path}` makes ACT change "
                      "nothing; calibrate on more questions (--limit) or run ACT without --heads-file (all heads of "
                      "its layers)", LvlmFixWarning, stacklevel=2)
        return ""
    return (f"{cal['selected']} heads raise yes/no accuracy over the baseline's {cal['baseline_acc']:.3f}; "
            f"with all of them ACT gives {cal['combined_acc']:.3f}")


CALIBRATION = Calibration(
    what="the heads ACT damps: each (layer, head) alone against the vanilla model's yes/no accuracy",
    run=calibrate_act, write=write_head_file, reads_back="heads_file", bench="pope", split="random",
    summary=summarize_head_file)
"""ACT's declaration (``Act.calibration``), which ``lvlm-fix calibrate --method act`` runs."""
