"""POPE evaluation throughput (samples/s) of ``lvlm_fix.evaluate`` at several batch sizes.

Each measurement is one call of::

    evaluate(lvlm, bench="pope", split="random", methods=["none"], limit=N, batch_size=b,
             out_dir=None, progress=False)

on the synthetic POPE benchmark of the embedded testbed (no data flags), timed end to end: image
loading, processor, batched greedy ``generate()`` (stopping when every row has its EOS, at most 32
new tokens), answer parsing and the summary with its bootstrap CIs. After one warm-up call per batch
size, the batch sizes are timed in interleaved rounds (the order rotates every round) and the median
is reported, with the throughput ratio of each batch size to batch 1.

Targets (the issue): batch 16 >= 8x batch 1 on a GPU, >= 2x on a CPU.

Usage::

    python benchmarks/eval_throughput.py                      # testbed, batch 1 4 16, 256 questions, 3 rounds
    python benchmarks/eval_throughput.py --sized-llava --model none
    python benchmarks/eval_throughput.py --gpu-configs llava-1.5-7b   # needs CUDA
    python benchmarks/eval_throughput.py --smoke              # CI: tiny model, 4 questions, batch 1 and 2

``main(argv)`` returns the results dict (``rows``: one per model x batch size).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in overhead.py

import overhead  # noqa: E402
import torch  # noqa: E402

SPLIT = "random"
TARGET_GPU, TARGET_CPU = 8.0, 2.0  # throughput at batch 16 / batch 1


def run_eval(lvlm: Any, limit: int, batch_size: int, max_new_tokens: int | None) -> dict[str, Any]:
    from lvlm_fix.evals.runner import evaluate

    return evaluate(lvlm, bench="pope", split=SPLIT, methods=["none"], limit=limit, batch_size=batch_size,
                    out_dir=None, progress=False, max_new_tokens=max_new_tokens)


def measure(s: overhead.Subject, batch_sizes: Sequence[int], limit: int, reps: int, max_new_tokens: int | None,
            log: Any = print) -> list[dict[str, Any]]:
    device = s.lvlm.device
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    accuracy: dict[int, float] = {}
    for b in batch_sizes:  # warm-up (also writes the synthetic benchmark on first use)
        run_eval(s.lvlm, min(limit, 2 * b), b, max_new_tokens)
    for r in range(reps):
        k = r % len(batch_sizes)
        for b in list(batch_sizes[k:]) + list(batch_sizes[:k]):
            overhead._sync(device)
            t0 = time.perf_counter()
            summary = run_eval(s.lvlm, limit, b, max_new_tokens)
            overhead._sync(device)
            times[b].append(time.perf_counter() - t0)
            accuracy[b] = summary["methods"]["none"]["splits"][SPLIT]["accuracy"]
        log(f"  {s.label} round {r + 1}/{reps}: " + ", ".join(f"b={b} {t[-1]:.2f}s" for b, t in times.items()))
    base = batch_sizes[0]
    gpu = device.type == "cuda"
    rows = []
    for b in batch_sizes:
        sps = limit / statistics.median(times[b])
        rows.append({"model": s.label, "batch": b, "samples": limit, "time_s": statistics.median(times[b]),
                     "times_s": times[b], "samples_per_s": sps, "accuracy": accuracy[b]})
    base_sps = next(r["samples_per_s"] for r in rows if r["batch"] == base)
    for row in rows:
        row["speedup_vs_batch_%d" % base] = row["samples_per_s"] / base_sps
        row["speedup"] = row["samples_per_s"] / base_sps
        if row["batch"] == 16 and base == 1:
            row["target"] = f">= {TARGET_GPU if gpu else TARGET_CPU}x batch 1 ({'GPU' if gpu else 'CPU'})"
            row["meets_target"] = row["speedup"] >= (TARGET_GPU if gpu else TARGET_CPU)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | batch | questions | time (s) | samples/s | vs batch 1 | POPE acc | target |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tgt = ""
        if "target" in r:
            tgt = r["target"] + (": **yes**" if r["meets_target"] else ": **NO**")
        lines.append(f"| {r['model']} | {r['batch']} | {r['samples']} | {r['time_s']:.2f} | {r['samples_per_s']:.2f} "
                     f"| {r['speedup']:.2f} | {r['accuracy']:.3f} | {tgt} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = overhead.common_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 16 (smoke: 1 2)")
    p.add_argument("--limit", type=int, default=None, help="POPE questions per measurement (default 256; smoke 4)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds after the warm-up (default 3; smoke 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length cap (default: the runner's 32 for POPE; smoke 4)")
    args = overhead.parse(argv, p)
    with overhead.torch_threads(args.threads or (1 if args.smoke else None)):
        return _run(args, argv)


def _run(args: Any, argv: Sequence[str] | None) -> dict[str, Any]:
    batch_sizes = args.batch_sizes or ([1, 2] if args.smoke else [1, 4, 16])
    limit = args.limit or (4 if args.smoke else 256)
    reps = args.reps or (1 if args.smoke else 3)
    max_new_tokens = args.max_new_tokens or (4 if args.smoke else None)
    quiet = args.smoke
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results: dict[str, Any] = {
        "machine": overhead.machine_info(),
        "settings": {"bench": "pope (synthetic)", "split": SPLIT, "limit": limit, "batch_sizes": batch_sizes,
                     "reps": reps, "max_new_tokens": max_new_tokens or 32, "warmup_runs": 1,
                     "argv": list(argv or sys.argv[1:])},
        "models": {}, "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="lvlm-fix-bench-") as tmp:
        for s in overhead.subjects_from_args(args, Path(args.workdir or tmp)):
            results["models"][s.label] = s.info
            log(f"{s.label}: {s.info}")
            results["rows"] += measure(s, batch_sizes, limit, reps, max_new_tokens, log)
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["table"] = format_table(results["rows"])
    if not quiet:
        print(results["table"])
        print(f"\nload average at start {results['machine'].get('loadavg_start')}, "
              f"at end {results['machine'].get('loadavg_end')}; torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
