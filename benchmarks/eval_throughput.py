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

``--per-question mvp`` times a method against the plain answer instead, per POPE question, as POPE
poses them: ``--limit`` questions of the synthetic random split (6 per image, one image after the
other), batches of ``--batch-sizes`` questions, one ``evaluate`` call per setting and round
(``methods=["none"]`` then ``methods=["mvp"]``, alternating which goes first), ``n_boot=10`` for both.
MVP's captions of an image are then made once for its six questions (the runner's cache). Reported:
each setting's time per question and their ratio (median over rounds; issue 29's target: MVP <= 2x).
Use ``--clock cpu --threads 1`` on a shared machine.

Usage::

    python benchmarks/eval_throughput.py                      # testbed, batch 1 4 16, 256 questions, 3 rounds
    python benchmarks/eval_throughput.py --sized-llava --model none
    python benchmarks/eval_throughput.py --gpu-configs llava-1.5-7b   # needs CUDA
    python benchmarks/eval_throughput.py --smoke              # CI: tiny model, 4 questions, batch 1 and 2
    python benchmarks/eval_throughput.py --per-question mvp --limit 24 --batch-sizes 1 6 --clock cpu --threads 1

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


def per_question(s: overhead.Subject, method: str, batch_sizes: Sequence[int], limit: int, reps: int,
                 clock: str, log: Any = print) -> list[dict[str, Any]]:
    """Seconds per POPE question of ``method`` and of the plain answer (``none``), and their ratio."""
    from lvlm_fix.evals.runner import evaluate

    device, tick = s.lvlm.device, overhead.CLOCKS[clock]

    def once(setting: str, b: int) -> float:
        overhead._sync(device)
        t0 = tick()
        evaluate(s.lvlm, bench="pope", split=SPLIT, methods=[setting], limit=limit, batch_size=b, out_dir=None,
                 progress=False, n_boot=10)
        overhead._sync(device)
        return tick() - t0

    rows = []
    for b in batch_sizes:
        once("none", b), once(method, b)  # warm-up
        times: dict[str, list[float]] = {"none": [], method: []}
        for r in range(reps):
            for setting in (("none", method) if r % 2 == 0 else (method, "none")):
                times[setting].append(once(setting, b) / limit)
            log(f"  {s.label} b={b} round {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s/question"
                                                                        for k, v in times.items()))
        ratios = [m / n for m, n in zip(times[method], times["none"])]
        rows.append({"model": s.label, "batch": b, "questions": limit, "method": method, "clock": clock,
                     "plain_s_per_question": statistics.median(times["none"]),
                     "method_s_per_question": statistics.median(times[method]),
                     "ratio": statistics.median(ratios), "ratios": ratios, "times_s": times})
    return rows


def format_per_question(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | batch | questions | plain (s/question) | method (s/question) | ratio (min-max) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['questions']} | {r['plain_s_per_question']:.3f} | "
                     f"{r['method']} {r['method_s_per_question']:.3f} | **{r['ratio']:.2f}** "
                     f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) |")
    return "\n".join(lines)


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
    p.add_argument("--per-question", default=None, metavar="METHOD",
                   help="time METHOD against the plain answer per POPE question instead (see above)")
    p.add_argument("--clock", choices=sorted(overhead.CLOCKS), default="wall",
                   help="wall (default) or cpu (the process's CPU time; with --threads 1 on a shared machine)")
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
    if args.per_question:
        results["settings"].update(per_question=args.per_question, clock=args.clock, n_boot=10)
    with tempfile.TemporaryDirectory(prefix="lvlm-fix-bench-") as tmp:
        for s in overhead.subjects_from_args(args, Path(args.workdir or tmp)):
            results["models"][s.label] = s.info
            log(f"{s.label}: {s.info}")
            if args.per_question:
                results["rows"] += per_question(s, args.per_question, batch_sizes, limit, reps, args.clock, log)
            else:
                results["rows"] += measure(s, batch_sizes, limit, reps, max_new_tokens, log)
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["table"] = (format_per_question if args.per_question else format_table)(results["rows"])
    if not quiet:
        print(results["table"])
        print(f"\nload average at start {results['machine'].get('loadavg_start')}, "
              f"at end {results['machine'].get('loadavg_end')}; torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
