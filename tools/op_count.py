"""Count the aten ops of one decode step, per method, on the embedded testbed (or any saved model).

A decode step on the testbed is per-op dispatch (a few microseconds per tiny op), so the op count is
what an edited layer costs there. Every aten op dispatched during one forward is counted with a
``TorchDispatchMode``; the method's count minus vanilla's, divided by the layers the method touches
(eager, residual or head-output layers), is its cost per edited layer and step.

    python tools/op_count.py                        # var, act, vhr on the testbed, batch 1, decode step 3
    python tools/op_count.py --methods var --ops    # and which ops differ from vanilla
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PROMPT = "Describe the image in detail."


class _Count(TorchDispatchMode):
    """Counts every aten op into the ``Counter`` of the forward in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.per_forward: list[collections.Counter] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.per_forward:
            self.per_forward[-1][str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def step_ops(lvlm: Any, batch: dict[str, Any], method: str | None, steps: int) -> tuple[list[collections.Counter], Any]:
    """The op counts of every forward of a ``steps``-token greedy generate (index 0: the prefill)."""
    import contextlib

    import lvlm_fix

    counter = _Count()
    # The model's own pre-hook opens a new forward's count before the plan's hooks run (registered first).
    handle = lvlm.model.register_forward_pre_hook(lambda *_: counter.per_forward.append(collections.Counter()))
    plan = None
    try:
        with (lvlm_fix.apply(lvlm, method) if method else contextlib.nullcontext()) as plan, counter:
            lvlm.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1)
    finally:
        handle.remove()
    return counter.per_forward, plan


def touched_layers(plan: Any) -> set[int]:
    """The layers where the plan's participants do per-step work."""
    out: set[int] = set()
    for p in plan.participants:
        out |= set(p.eager_layers) | set(p.observed_layers) | set(p.head_output_layers) | set(p.residual_layers)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="saved model directory (default: the embedded testbed)")
    ap.add_argument("--methods", nargs="+", default=["var", "act", "vhr"])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--step", type=int, default=3, help="which decode step to count (1 = the first after the prefill)")
    ap.add_argument("--ops", action="store_true", help="also list the ops whose counts differ from vanilla's")
    args = ap.parse_args(argv)

    import lvlm_fix
    from lvlm_fix.testing.tiny import build_image

    torch.set_num_threads(1)
    lvlm = lvlm_fix.load(args.model)
    size = lvlm.image_size if hasattr(lvlm, "image_size") else 96
    images = [build_image(seed, size) for seed in range(args.batch_size)]
    batch = lvlm.encode(images, [PROMPT] * args.batch_size)
    steps = args.step + 1
    results: dict[str, Any] = {}
    with torch.inference_mode():
        base, _ = step_ops(lvlm, batch, None, steps)
        vanilla = base[args.step]
        n0 = sum(vanilla.values())
        print(f"decode step {args.step}, batch {args.batch_size}: vanilla {n0} ops")
        for method in args.methods:
            counts, plan = step_ops(lvlm, batch, method, steps)
            ops = counts[args.step]
            n = sum(ops.values())
            layers = touched_layers(plan)
            per_layer = (n - n0) / max(1, len(layers))
            results[method] = {"ops": n, "extra": n - n0, "layers": len(layers), "per_layer": per_layer}
            print(f"{method}: {n} ops, +{n - n0} over vanilla, {len(layers)} layers touched: "
                  f"{per_layer:.1f} ops per layer and step")
            if args.ops:
                diff = {k: ops[k] - vanilla[k] for k in set(ops) | set(vanilla) if ops[k] != vanilla[k]}
                print("   ", ", ".join(f"{k} {v:+d}" for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
