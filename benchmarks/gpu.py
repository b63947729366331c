"""The GPU table of BENCHMARKS.md in one command: a 7B-sized LLaVA, every method, within ten minutes.

The model is LLaVA-1.5-7B's shape built from its config in code (``overhead.real_size_config``:
Vicuna-7B text 32 x 4096, CLIP ViT-L/14 at 336 px -> 576 image tokens), random weights, bf16, on
``cuda``, nothing downloaded. For each prompt length (256 and 3,072 text tokens beside the image's
576: a filler text before the instruction) and batch size (1, 8, 16), every method is timed as
``benchmarks/overhead.py`` times it (the same configurations: ``apply()`` around ``generate()``,
CARVE against ``lvlm_fix.generate(method=None)``, MVP against a plain answer to the same question),
greedy with ``min_new_tokens = max_new_tokens``: one warm-up call of each, then interleaved rounds
(the order rotates), median of the per-round ratios. Peak memory is ``torch.cuda.max_memory_allocated``
of the timed calls (reset before each; no ``empty_cache``, which would slow the next call), as a
ratio to the baseline's. Then POPE throughput (``eval_throughput.measure``, synthetic POPE) at
batch 16 vs 1. A cell that runs out of GPU memory is recorded as ``OOM`` and the run goes on.

Compiled vs eager (issue 30): vanilla, VHR, VAR, VCD, ACT and PAINT at batch 1 and 8, the 256-token
prompt, 64 new tokens forced: decode ms per step with the default dynamic cache (eager) against
``cache_implementation="static"`` with ``generate()``'s own compilation of the decode forward
(``compile_config``: inductor, ``--compile-mode``, by default transformers' "reduce-overhead"; on
the CPU, ``--tiny``, dynamo's eager backend). A step is ``(T(64) - T(1)) / 63`` (``generate()``
never compiles the prefill); the compiling call is a warm-up, its excess reported as compile time;
the last compiled and eager runs' tokens are compared, and a mismatch is reported (rows, first
token). A method that refuses static caches (VCD, ICD, M3ID, PAI) gives its one line, untimed. A
cell that fails otherwise records the error's first line and the run goes on.

Time budget: the run (model build included) must end within ten minutes on an H100 or H200, so
before every call the script checks that the elapsed time plus that call's estimate (its own
warm-up time; for a cell's first call, the previous cell's vanilla call scaled by rows x tokens)
stays within ``--budget-s``; whatever does not fit is skipped with a note in the results. The
compiled-vs-eager table runs last with its own share (``--compile-share-s``, 240 s): the other
tables stop that much before the end, and it has the rest (a compiling call is estimated at 60 s
until one is measured, then as the last one).

Results: ``gpu.json`` (everything) and ``gpu.md`` (the tables) in ``--out`` (default
``benchmarks/results/``); ``--update-doc BENCHMARKS.md`` also replaces the block between the
``gpu-table`` markers there. ``--render gpu.json`` redoes the markdown (and the doc) from a saved
JSON without running anything: results from a lent machine are rendered here.

Usage::

    python benchmarks/gpu.py --update-doc BENCHMARKS.md          # on a GPU (H100 80GB / H200)
    python benchmarks/gpu.py --render benchmarks/results/gpu.json --update-doc BENCHMARKS.md
    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny           # CPU, toy widths, 2 tokens (the test)

``main(argv)`` returns the results dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in overhead.py

import eval_throughput  # noqa: E402
import overhead  # noqa: E402
import torch  # noqa: E402

MODEL = "llava-1.5-7b"
# The method list; "none" is left out (it is a no-op plan, measured on the CPU).
METHODS = ("vhr", "var", "act", "carve", "paint", "pai", "vcd", "icd", "m3id", "mvp")
FILLER = "The room has a table, two chairs and a lamp. "  # text before the instruction, repeated
MARK_START, MARK_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
# Targets shown beside the ratios: overhead.targets (the long-context ones from LONG_TEXT_TOKENS
# text tokens on), except the contrast methods', which issue 29 sets at 1.3 on a GPU up to batch 8
# (their contrast rows ride in the main forward there).
CONTRAST, GPU_CONTRAST_TARGET, GPU_CONTRAST_MAX_BATCH = ("vcd", "icd", "m3id", "pai"), 1.3, 8
LONG_TEXT_TOKENS = 2048
# The compiled-vs-eager table (issue 30). VCD is in it for its refusal line: the contrast methods
# keep their second stream in a dynamic cache and refuse static caches, hence compilation.
COMPILED_METHODS = ("vanilla", "vhr", "var", "vcd", "act", "paint")  # the four first
FULL = dict(prompt_tokens=[256, 3072], batch_sizes=[1, 8, 16], new_tokens=32, reps=2, pope_limit=64,
            pope_new_tokens=8, budget_s=520.0, compile_text_tokens=256, compile_batch_sizes=[1, 8],
            compile_new_tokens=64, compile_reps=2, compile_share_s=240.0, compile_guess_s=60.0)
TINY = dict(prompt_tokens=[8, 40], batch_sizes=[1, 2], new_tokens=2, reps=1, pope_limit=2,
            pope_new_tokens=2, budget_s=600.0, compile_text_tokens=8, compile_batch_sizes=[1],
            compile_new_tokens=3, compile_reps=1, compile_share_s=300.0, compile_guess_s=0.0)


# -- prompts --------------------------------------------------------------------------------------
def padded_prompts(lvlm: Any, image: Any, text_tokens: int) -> tuple[str, str, int]:
    """``(description prompt, yes/no question, prompt length)``: filler before each, so the
    description prompt has about ``text_tokens`` tokens besides the image's."""

    def text_len(prompt: str) -> int:
        ids = lvlm.encode([image], [prompt])["input_ids"][0]
        return int((ids != lvlm.image_token_id).sum())

    base, one = text_len(overhead.PROMPT), text_len(FILLER + overhead.PROMPT)
    per = max(one - base, 1)
    filler = FILLER * max(round((text_tokens - base) / per), 0)
    prompt = filler + overhead.PROMPT
    return prompt, filler + overhead.YES_NO_PROMPT, int(lvlm.encode([image], [prompt])["input_ids"].shape[1])


@contextlib.contextmanager
def prompts_of(prompt: str, question: str):
    """overhead's configurations read its module prompts when built and run; swap them for a cell."""
    before = overhead.PROMPT, overhead.YES_NO_PROMPT
    overhead.PROMPT, overhead.YES_NO_PROMPT = prompt, question
    try:
        yield
    finally:
        overhead.PROMPT, overhead.YES_NO_PROMPT = before


# -- the clock ------------------------------------------------------------------------------------
class Budget:
    """Seconds left of the run's budget; ``fits(estimate)`` says whether a call may start."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds, self.start = seconds, time.perf_counter() if start is None else start
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds

    def skip(self, what: str) -> None:
        self.skipped.append(f"{what} (at {self.elapsed():.0f} s of {self.seconds:.0f})")


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def timed_call(c: overhead.Config, device: torch.device) -> tuple[float | None, int | None, int | None]:
    """``(seconds, peak bytes, peak bytes minus those allocated before)`` of one call; None on OOM."""
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        t = overhead.time_call(c.fn, device, c.context)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the failed call's blocks back before the next configuration
        return None, None, None
    if not _cuda(device):
        return t, None, None
    peak = torch.cuda.max_memory_allocated(device)
    return t, peak, peak - before


# -- one cell: a prompt length x a batch size ------------------------------------------------------
def measure_cell(s: overhead.Subject, batch: int, text_tokens: int, prompt: str, question: str, prompt_len: int,
                 new_tokens: int, reps: int, budget: Budget, first_estimate: float,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Warm up every configuration, then up to ``reps`` interleaved rounds, within the budget."""
    device = s.lvlm.device
    where = f"{prompt_len} tokens, b={batch}"
    with prompts_of(prompt, question):
        configs = overhead.build_configs(s, batch, new_tokens, METHODS)
        warm: dict[str, float] = {}
        failed: set[str] = set()
        for c in configs:  # warm-up: also each call's cost estimate
            # Unmeasured yet: vanilla's time times a generous bound of the method's passes (MVP: three
            # captions, a scoring forward and the answer; CARVE: two statistics passes and the final one).
            estimate = warm.get("vanilla", first_estimate) * (6 if c.name == "mvp" else 4 if c.name == "carve" else 2)
            if not budget.fits(estimate if c.name != "vanilla" else first_estimate):
                budget.skip(f"{where}: {c.name} and after")
                break
            t, _, _ = timed_call(c, device)
            if t is None:
                failed.add(c.name)
                log(f"  {where} {c.name}: out of GPU memory")
                continue
            warm[c.name] = t
        ready = [c for c in configs if c.name in warm]
        times: dict[str, list[float]] = {c.name: [] for c in ready}
        peaks: dict[str, tuple[int, int]] = {}
        for r in range(reps):
            if not budget.fits(sum(warm[c.name] for c in ready)):
                budget.skip(f"{where}: rounds {r + 1}-{reps}")
                break
            k = r % max(len(ready), 1)
            for c in ready[k:] + ready[:k]:
                t, peak, extra = timed_call(c, device)
                if t is None:
                    failed.add(c.name)
                    continue
                times[c.name].append(t)
                if peak is not None:
                    peaks[c.name] = max(peaks.get(c.name, (0, 0)), (peak, extra))
            log(f"  {where} round {r + 1}/{reps} at {budget.elapsed():.0f} s: "
                + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items() if v))
    rows = []
    for c in configs:
        mine, base = times.get(c.name, []), times.get(c.baseline, [])
        status = ("OOM" if c.name in failed else "baseline OOM" if c.baseline in failed
                  else "skipped (budget)" if not (mine and base) else "ok")
        row: dict[str, Any] = {"prompt_text_tokens": text_tokens, "prompt_len": prompt_len, "batch": batch,
                               "config": c.name, "baseline": c.baseline, "times_s": mine, "status": status}
        if status == "ok":
            ratios = [t / b for t, b in zip(mine, base)]
            row.update(time_s=statistics.median(mine), time_ratio=statistics.median(ratios),
                       time_ratio_min=min(ratios), time_ratio_max=max(ratios))
            if c.name in peaks and c.baseline in peaks:
                row.update(peak_bytes=peaks[c.name][0], peak_extra_bytes=peaks[c.name][1],
                           mem_ratio=peaks[c.name][0] / peaks[c.baseline][0])
            add_target(row)
        rows.append(row)
    return rows


def add_target(row: dict[str, Any]) -> None:
    """``target`` (text) and ``meets_target`` (None where memory was not measured) of a timed row."""
    time_target, memory_target = overhead.targets(row["config"], row["prompt_text_tokens"] >= LONG_TEXT_TOKENS)
    if row["config"] in CONTRAST and row["batch"] <= GPU_CONTRAST_MAX_BATCH:
        time_target = GPU_CONTRAST_TARGET
    parts, met = [], []
    if time_target is not None:
        parts.append(f"time <= {time_target}")
        met.append(row["time_ratio"] <= time_target)
    if memory_target is not None:
        parts.append(f"peak <= {memory_target}")
        met.append(row["mem_ratio"] <= memory_target if "mem_ratio" in row else None)
    if parts:
        row["target"] = " and ".join(parts)
        row["meets_target"] = None if None in met else all(met)


def measure_pope(s: overhead.Subject, limit: int, new_tokens: int, reps: int, budget: Budget, estimate: float,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """POPE samples/s at batch 1 and 16 (eval_throughput's protocol), if ``estimate`` fits the budget."""
    if not budget.fits(estimate):
        budget.skip("POPE throughput")
        return []
    return eval_throughput.measure(s, [1, 16], limit, reps, new_tokens, log)


# -- compiled vs eager decode ---------------------------------------------------------------------
def compile_config(device: torch.device, mode: str) -> Any:
    """``generate()``'s ``compile_config``: inductor with ``mode`` on a GPU (transformers' defaults are
    inductor and "reduce-overhead"); dynamo's ``eager`` backend on a CPU, which transformers compiles
    only when asked (``_compile_all_devices``, as the generate() matrix's compile column does)."""
    from transformers import CompileConfig

    if _cuda(device):
        return CompileConfig(backend="inductor", mode=mode)
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    return config


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _token_mismatch(compiled: torch.Tensor, eager: torch.Tensor, prompt_len: int) -> str | None:
    """None when the two runs' tokens are equal, else which rows differ and from which new token."""
    if compiled.shape != eager.shape:
        return f"shapes {tuple(compiled.shape)} vs {tuple(eager.shape)}"
    differ = (compiled[:, prompt_len:] != eager[:, prompt_len:]).cpu()
    rows = differ.any(dim=1).nonzero().flatten().tolist()
    if not rows:
        return None
    first = int(differ[rows[0]].nonzero()[0])
    return f"{len(rows)} of {compiled.shape[0]} rows differ (row {rows[0]} from new token {first})"


def measure_compiled(s: overhead.Subject, method: str, batch: int, text_tokens: int, prompt: str, prompt_len: int,
                     new_tokens: int, reps: int, config: Any, budget: Budget, compile_estimate: float,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """One row of the compiled-vs-eager table: ``method`` at ``batch``, decode ms per step both ways.

    A step's time is ``(T(new_tokens) - T(1)) / (new_tokens - 1)`` of the same configuration: a
    ``generate()`` of one token is the prefill alone, which ``generate()`` never compiles. The
    compiled configuration's first call compiles (``compile_s``: that call less a timed one); dynamo
    is reset before it, since a compiled forward keeps the plan it was traced with and each cell
    would otherwise count against dynamo's recompile limit. One ``apply()`` holds every call of a
    method, so the timed calls run the graphs the warm-up compiled.
    """
    import lvlm_fix
    from lvlm_fix.errors import LvlmFixError

    lvlm, device = s.lvlm, s.lvlm.device
    row: dict[str, Any] = {"config": method, "batch": batch, "prompt_text_tokens": text_tokens,
                           "prompt_len": prompt_len, "new_tokens": new_tokens}
    if not budget.fits(compile_estimate):
        budget.skip(f"compiled vs eager, b={batch}: {method}")
        return {**row, "status": "skipped (budget)"}
    with prompts_of(prompt, prompt):
        _, _, enc = overhead.inputs(s, batch)
    static = {"cache_implementation": "static", "compile_config": config}

    def call(kwargs: dict[str, Any], n: int) -> tuple[float, torch.Tensor]:
        overhead._sync(device)
        t0 = time.perf_counter()
        out = lvlm.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, **kwargs)
        overhead._sync(device)
        return time.perf_counter() - t0, out

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    lvlm.model.__dict__.pop("_compiled_call", None)
    plan = contextlib.nullcontext() if method == "vanilla" else lvlm_fix.apply(lvlm, method)
    try:
        with plan:  # no inference_mode: generate() as a user calls it (it runs under no_grad)
            try:
                first, _ = call(static, new_tokens)  # compiles; a method that refuses does it before any forward
            except LvlmFixError as e:
                return {**row, "status": "refused", "note": str(e).strip().splitlines()[0]}
            row["warmup_s"] = first
            graphs = counters["stats"]["unique_graphs"]
            warm_eager = call({}, new_tokens)[0]
            ones = {"eager": call({}, 1)[0], "compiled": call(static, 1)[0]}
            times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
            outs: dict[str, torch.Tensor] = {}
            for r in range(reps):
                # A round: both configurations' full and one-token calls; the eager warm-up stands in
                # for the compiled call (whose warm-up includes the compilation).
                if not budget.fits(2 * warm_eager + sum(ones.values())):
                    budget.skip(f"compiled vs eager, b={batch}, {method}: rounds {r + 1}-{reps}")
                    break
                for mode in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):  # order alternates
                    kwargs = static if mode == "compiled" else {}
                    t_n, outs[mode] = call(kwargs, new_tokens)
                    times[mode].append((t_n, call(kwargs, 1)[0]))
            log(f"  compiled vs eager b={batch} {method} at {budget.elapsed():.0f} s: {times}")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "OOM"}
    except Exception as e:  # noqa: BLE001 -- one failed cell is a result (e.g. a backend error), not the end of the run
        return {**row, "status": "failed", "note": _one_line(e)}
    finally:
        lvlm.model.__dict__.pop("_compiled_call", None)
    row.update(graph_breaks=sum(counters["graph_break"].values()), graphs=graphs,
               recompiled=counters["stats"]["unique_graphs"] - graphs)
    if not (times["eager"] and times["compiled"]):
        return {**row, "status": "skipped (budget)"}
    steps = max(new_tokens - 1, 1)
    for mode, pairs in times.items():
        row[f"{mode}_ms"] = 1e3 * statistics.median((t_n - t_1) / steps for t_n, t_1 in pairs)
        row[f"{mode}_times_s"] = [list(p) for p in pairs]
    mismatch = _token_mismatch(outs["compiled"], outs["eager"], enc["input_ids"].shape[1])
    row.update(status="ok", speedup=row["eager_ms"] / row["compiled_ms"],
               compile_s=first - statistics.median(t_n for t_n, _ in times["compiled"]),
               tokens_equal=mismatch is None, mismatch=mismatch)
    return row


# -- output ---------------------------------------------------------------------------------------
def _commit() -> str | None:
    """The checkout's commit, with " + uncommitted changes" when the tree differs from it."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return (head + (" + uncommitted changes" if dirty else "")) or None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_markdown(res: dict[str, Any]) -> str:
    m, st = res["machine"], res["settings"]
    lines = [
        f"Measured by `python benchmarks/gpu.py{' ' + ' '.join(st['argv']) if st['argv'] else ''}` on "
        f"{m.get('gpu', 'no GPU (CPU)')}, torch {m['torch']}, transformers {m['transformers']}, commit "
        f"`{res.get('commit') or '?'}`, in {res['elapsed_s']:.0f} s. Model: {res['model']['label']}, "
        f"{res['model']['params'] / 1e9:.2f}B parameters, {res['model']['dtype']}. Greedy, "
        f"{st['new_tokens']} new tokens forced, {st['reps']} timed rounds after a warm-up; ratio = median of the "
        "per-round ratios to the baseline (`vs`); peak = `torch.cuda.max_memory_allocated` (weights included).",
        "",
        "| prompt tokens (text) | batch | method | vs | time (s) | time ratio (min-max) | peak GiB | peak ratio "
        "| target |",
        "|---:|---:|---|---|---:|---|---:|---:|---|",
    ]
    for r in res["rows"]:
        tokens = f"{r['prompt_len']} ({r['prompt_text_tokens']})"
        if r["status"] != "ok":
            lines.append(f"| {tokens} | {r['batch']} | {r['config']} | {r['baseline']} | {r['status']} | | | | |")
            continue
        ratio = "1 (baseline)" if r["config"] == r["baseline"] else \
            f"{r['time_ratio']:.3f} ({r['time_ratio_min']:.3f}-{r['time_ratio_max']:.3f})"
        peak = _gib(r["peak_bytes"]) if "peak_bytes" in r else "-"
        mem = f"{r['mem_ratio']:.3f}" if "mem_ratio" in r else "-"
        verdict = {True: ": **yes**", False: ": **NO**", None: ""}[r.get("meets_target")]
        lines.append(f"| {tokens} | {r['batch']} | {r['config']} | {r['baseline']} | {r['time_s']:.3f} "
                     f"| {ratio} | {peak} | {mem} | {r.get('target', '')}{verdict} |")
    if res["pope"]:
        lines += ["", f"POPE throughput (synthetic POPE, {st['pope_limit']} questions, answers capped at "
                  f"{st['pope_new_tokens']} tokens):", "", eval_throughput.format_table(res["pope"])]
    lines += ["", "Skipped to stay within the time budget: " + ("; ".join(res["skipped"]) or "nothing") + "."]
    if res.get("compiled"):
        lines += ["", format_compiled(res)]
    return "\n".join(lines)


def format_compiled(res: dict[str, Any]) -> str:
    """The compiled-vs-eager table and what it skipped."""
    st, first = res["settings"], res["compiled"][0]
    lines = [
        f"Compiled vs eager decode: {first['prompt_len']}-token prompt ({st['compile_text_tokens']} text tokens), "
        f"{st['compile_new_tokens']} new tokens forced, greedy. Eager: the default dynamic cache; compiled: "
        f"`cache_implementation=\"static\"` and `generate()`'s compile of the decode forward "
        f"({st['compile_mode']}). ms per decode step (one token per row) = (time of {st['compile_new_tokens']} "
        f"tokens - time of 1) / {st['compile_new_tokens'] - 1}, median of {st['compile_reps']} rounds; compile = the "
        "first compiled call less a timed one (not in the times); tokens: the compiled run's against the eager "
        "run's; graphs / breaks: dynamo's count over the method's calls.",
        "",
        "| batch | method | eager ms/step | compiled ms/step | speedup | compile (s) | tokens | graphs / breaks |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in res["compiled"]:
        if r["status"] != "ok":
            note = f": {r['note']}" if r.get("note") else ""
            lines.append(f"| {r['batch']} | {r['config']} | {r['status']}{note} | | | | | |")
            continue
        tokens = "equal" if r["tokens_equal"] else f"**differ**: {r['mismatch']}"
        again = f" (+{r['recompiled']} in timed calls)" if r["recompiled"] else ""
        lines.append(f"| {r['batch']} | {r['config']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['compile_s']:.1f} | {tokens} | {r['graphs']}{again} / "
                     f"{r['graph_breaks']} |")
    lines += ["", "Skipped to stay within the compiled table's time budget: "
              + ("; ".join(res["compiled_skipped"]) or "nothing") + "."]
    return "\n".join(lines)


def update_doc(doc: Path, markdown: str) -> None:
    """Replace the block between the gpu-table markers of ``doc`` with ``markdown``."""
    text = doc.read_text()
    if MARK_START not in text or MARK_END not in text:
        raise SystemExit(f"{doc} has no {MARK_START} ... {MARK_END} block; add the two markers where the table goes")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.write_text(f"{head}{MARK_START}\n{markdown}\n{MARK_END}{tail}")


def write(res: dict[str, Any], out: Path, doc: Path | None) -> str:
    markdown = format_markdown(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu.md").write_text(markdown + "\n")
    if doc is not None:
        update_doc(doc, markdown)
    return markdown


# -- main -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU, the same shape at toy widths (2 layers), 2 new tokens, batch 1 and 2: the CI check")
    p.add_argument("--prompt-tokens", type=int, nargs="+", help="text tokens beside the image (default 256 3072)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 16")
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (default 32)")
    p.add_argument("--reps", type=int, help="timed rounds after the warm-up (default 2)")
    p.add_argument("--pope-limit", type=int, help="POPE questions per batch size (default 64)")
    p.add_argument("--pope-new-tokens", type=int, help="POPE answer cap (default 8: random weights never stop)")
    p.add_argument("--budget-s", type=float,
                   help="seconds the run may take from main() on, model build included (default 520: imports and "
                        "the last call's overrun stay inside ten minutes)")
    p.add_argument("--compile-batch-sizes", type=int, nargs="+", help="the compiled-vs-eager table's (default 1 8)")
    p.add_argument("--compile-new-tokens", type=int, help="its tokens per call (default 64)")
    p.add_argument("--compile-reps", type=int, help="its timed rounds after the warm-up (default 2)")
    p.add_argument("--compile-share-s", type=float,
                   help="seconds of --budget-s kept for it: the other tables stop that much earlier (default 240)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the compiled-vs-eager table on a GPU (default reduce-overhead, "
                        "transformers' CompileConfig default: CUDA graphs); the CPU (--tiny) uses the eager backend")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for gpu.json and gpu.md (default benchmarks/results)")
    p.add_argument("--update-doc", default=None, help="also fill the gpu-table block of this file (BENCHMARKS.md)")
    p.add_argument("--render", default=None, help="a saved gpu.json: redo gpu.md (and --update-doc) without running")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    doc = Path(args.update_doc) if args.update_doc else None
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(write(res, Path(args.out), doc))
        return res
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--tiny runs the same script at toy sizes on the CPU")
    preset = TINY if args.tiny else FULL
    opt = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in preset.items()}
    # The compiled-vs-eager table runs last with its own share: the other tables stop that much
    # before the end, and it may use whatever they leave.
    budget = Budget(opt["budget_s"] - opt["compile_share_s"])
    compile_budget = Budget(opt["budget_s"], start=budget.start)
    log = (lambda _msg: None) if args.tiny else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with overhead.torch_threads(1 if args.tiny else None):
        res = _run(args, argv, opt, budget, compile_budget, log)
    markdown = write(res, Path(args.out), doc)
    if not args.tiny:
        print(markdown)
    return res


def _run(args: argparse.Namespace, argv: Sequence[str] | None, opt: dict[str, Any], budget: Budget,
         compile_budget: Budget, log: Callable[[str], None]) -> dict[str, Any]:
    from lvlm_fix.testing.tiny import build_image

    if args.tiny:
        s = overhead.real_size_subject(MODEL, "cpu", "float32", shrink=True)
    else:
        s = overhead.real_size_subject(MODEL, "cuda", "bfloat16")
    log(f"{s.label} built at {budget.elapsed():.0f} s: {s.info}")
    image = build_image(0, s.image_size)
    rows: list[dict[str, Any]] = []
    pope: list[dict[str, Any]] = []
    last: tuple[float, int] | None = None  # (vanilla seconds, rows x tokens) of the last cell measured
    pope_estimate = math.inf  # until the short prompt's vanilla b=1 is timed
    for i, text_tokens in enumerate(opt["prompt_tokens"]):
        prompt, question, prompt_len = padded_prompts(s.lvlm, image, text_tokens)
        for b in opt["batch_sizes"]:
            # A cell's first call: the last vanilla scaled by rows x tokens (prefill-bound, so an upper bound).
            first = 0.0 if last is None else last[0] * max(b * (prompt_len + opt["new_tokens"]) / last[1], 1.0)
            cell = measure_cell(s, b, text_tokens, prompt, question, prompt_len, opt["new_tokens"], opt["reps"],
                                budget, first, log)
            rows += cell
            van = next((r for r in cell if r["config"] == "vanilla" and r["status"] == "ok"), None)
            if van is not None:
                last = (van["time_s"], b * (prompt_len + opt["new_tokens"]))
                if i == 0 and b == 1:  # batch 1 dominates POPE: a prefill and a few steps per question, one by one
                    per = van["time_s"] * (1 + opt["pope_new_tokens"]) / (1 + opt["new_tokens"])
                    pope_estimate = 1.5 * per * opt["pope_limit"]  # 1.5: the warm-up calls and batch 16
        if i == 0:  # POPE after the short cells: the throughput target, before the long prompts
            pope = measure_pope(s, opt["pope_limit"], opt["pope_new_tokens"], 1, budget, pope_estimate, log)
    compiled = measure_compiled_table(s, image, opt, args.compile_mode, compile_budget, log)
    return {
        "machine": overhead.machine_info(), "commit": _commit(), "model": {"label": s.label, **s.info},
        "settings": {**opt, "methods": list(METHODS), "compiled_methods": list(COMPILED_METHODS),
                     "compile_mode": f"inductor, mode {args.compile_mode}" if _cuda(s.lvlm.device) else "dynamo's eager "
                                     "backend on the CPU",
                     "argv": list(argv if argv is not None else sys.argv[1:])},
        "rows": rows, "pope": pope, "skipped": budget.skipped, "compiled": compiled,
        "compiled_skipped": compile_budget.skipped, "elapsed_s": budget.elapsed(),
    }


def measure_compiled_table(s: overhead.Subject, image: Any, opt: dict[str, Any], mode: str, budget: Budget,
                           log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every row of the compiled-vs-eager table, batch by batch, within ``budget``."""
    prompt, _, prompt_len = padded_prompts(s.lvlm, image, opt["compile_text_tokens"])
    config = compile_config(s.lvlm.device, mode)
    estimate = opt["compile_guess_s"]  # a compiling call's cost until one is measured
    rows = []
    for b in opt["compile_batch_sizes"]:
        for method in COMPILED_METHODS:
            row = measure_compiled(s, method, b, opt["compile_text_tokens"], prompt, prompt_len,
                                   opt["compile_new_tokens"], opt["compile_reps"], config, budget, estimate, log)
            estimate = row.get("warmup_s", estimate)
            if row["status"] != "ok":
                log(f"  compiled vs eager b={b} {method}: {row['status']} {row.get('note', '')}")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
