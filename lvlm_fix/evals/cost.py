"""What each setting of a run cost: wall time, generated tokens, forward passes and peak memory.

The runner meters every batch it generates (:class:`CostMeter`) and adds the figures to
``<setting>/cost.json``, so a resumed run accumulates them. The summary then reports per setting
seconds per sample, generated tokens per second, forward passes per batch (a method's extra
streams and passes included: VHR's text-only stream, CARVE's statistics passes, a contrast
stream) and their ratios to the baseline of the same run, plus the peak memory seen while the
setting ran:

* on CUDA: ``torch.cuda.max_memory_allocated`` (reset when the setting starts), i.e. tensors;
* on CPU (Linux): the process's resident-set peak (``VmHWM``), reset when the setting starts by
  writing 5 to ``/proc/self/clear_refs``; it includes the model and the Python heap, so read it
  as an upper bound of what the setting needed;
* elsewhere: not measured (None).

Times are wall-clock seconds on the machine of the run; ratios to the baseline are only
meaningful within one run (same machine, same load). ``benchmarks/`` measures overhead properly.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

COST_FILE = "cost.json"
_FIELDS = ("seconds", "samples", "batches", "generated_tokens", "forwards")


class CostMeter:
    """Accumulates one setting's cost over the batches generated in this process."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.totals = dict.fromkeys(_FIELDS, 0.0)
        self.peak_mb: float | None = None
        self.memory = _memory_kind(model)

    @contextlib.contextmanager
    def batch(self, samples: int) -> Iterator[dict[str, Any]]:
        """Meter one batch; the caller sets ``["generated_tokens"]`` on the yielded dict."""
        counter = {"forwards": 0, "generated_tokens": 0}

        def count(*_: Any, **__: Any) -> None:
            counter["forwards"] += 1

        handle = self.model.register_forward_pre_hook(count)
        start = time.perf_counter()
        try:
            yield counter
        finally:
            elapsed = time.perf_counter() - start
            handle.remove()
        self.totals["seconds"] += elapsed
        self.totals["samples"] += samples
        self.totals["batches"] += 1
        self.totals["forwards"] += counter["forwards"]
        self.totals["generated_tokens"] += counter["generated_tokens"]

    @contextlib.contextmanager
    def setting(self) -> Iterator[None]:
        """Around all the batches of one setting: resets and reads the peak memory."""
        _reset_peak(self.memory)
        try:
            yield
        finally:
            peak = _read_peak(self.memory)
            if peak is not None:
                self.peak_mb = peak if self.peak_mb is None else max(self.peak_mb, peak)

    def save(self, folder: Path | None) -> dict[str, Any]:
        """Add this process's figures to ``folder/cost.json`` (if any) and return the accumulated cost."""
        previous = load(folder)
        merged = {k: previous.get(k, 0) + self.totals[k] for k in _FIELDS}
        peaks = [x for x in (previous.get("peak_memory_mb"), self.peak_mb) if x is not None]
        merged.update(peak_memory_mb=max(peaks) if peaks else None, memory=self.memory or previous.get("memory"),
                      invocations=previous.get("invocations", 0) + (1 if self.totals["samples"] else 0))
        if folder is not None and self.totals["samples"]:
            from ..files import atomic_write

            atomic_write(folder / COST_FILE, json.dumps(merged, indent=1).encode())  # whole or not at all
        return merged


def load(folder: Path | None) -> dict[str, Any]:
    """A setting's accumulated cost ({} when none was measured); a damaged file is one line, not a traceback."""
    if folder is None or not (folder / COST_FILE).exists():
        return {}
    data: Any = None
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((folder / COST_FILE).read_text(encoding="utf-8"))
    numbers = isinstance(data, dict) and all(
        isinstance(data.get(k, 0), (int, float)) and not isinstance(data.get(k, 0), bool) for k in _FIELDS)
    if not numbers:
        raise InputError(f"{folder / COST_FILE} is damaged (not the JSON object of numbers lvlm-fix writes); delete it "
                         "(only the timing is lost) and run again")
    return data


def summarise(costs: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per setting: seconds/sample, tokens/s, forwards/sample, peak memory, and ratios to the baseline."""
    out: dict[str, dict[str, Any]] = {}
    for name, c in costs.items():
        n = c.get("samples") or 0
        if not n:
            continue
        secs = c["seconds"]
        out[name] = {
            "seconds": round(secs, 3), "samples": int(n),
            "seconds_per_sample": secs / n,
            "generated_tokens": int(c["generated_tokens"]),
            "tokens_per_second": c["generated_tokens"] / secs if secs else None,
            "forwards_per_batch": c["forwards"] / c["batches"] if c.get("batches") else None,
            "peak_memory_mb": c.get("peak_memory_mb"), "memory": c.get("memory"),
        }
    base = out.get(baseline)
    for name, row in out.items():
        if base and base["seconds_per_sample"]:
            row["time_ratio"] = row["seconds_per_sample"] / base["seconds_per_sample"]
            if row["forwards_per_batch"] is not None and base["forwards_per_batch"] is not None:
                row["extra_forwards_per_batch"] = row["forwards_per_batch"] - base["forwards_per_batch"]
    return out


def table(cost: dict[str, dict[str, Any]], baseline: str) -> list[str]:
    """The cost table of results.md."""
    if not cost:
        return []
    memory = next((c["memory"] for c in cost.values() if c.get("memory")), None)
    mem_head = {"cuda": "peak CUDA memory (MB)", "rss": "peak resident memory (MB)"}.get(memory, "peak memory")
    lines = ["", "## Cost", "",
             f"| method | s / sample | × {baseline} | generated tokens / s | forwards / batch | extra forwards "
             f"/ batch | {mem_head} |", "|---|---|---|---|---|---|---|"]
    fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
    for name, c in cost.items():
        lines.append(f"| {name} | {c['seconds_per_sample']:.3f} | {fmt(c.get('time_ratio'), '.2f')} | "
                     f"{fmt(c['tokens_per_second'], '.1f')} | {fmt(c['forwards_per_batch'], '.1f')} | "
                     f"{fmt(c.get('extra_forwards_per_batch'), '+.1f')} | {fmt(c['peak_memory_mb'], '.0f')} |")
    lines += ["", "Wall-clock on this run's machine, over the samples each setting generated (a resumed setting adds "
                  "up its runs); ratios are to the baseline of the same run, after one untimed warm-up generation. Forwards "
                  "count every model call per batch (a generate() step is one), a method's own streams and passes "
                  "included."
              + (" Peak resident memory includes the model and is an upper bound." if memory == "rss" else "")]
    return lines


def _memory_kind(model: Any) -> str | None:
    device = getattr(model, "device", None)
    if device is not None and device.type == "cuda":
        return "cuda"
    return "rss" if Path("/proc/self/clear_refs").exists() else None


def _reset_peak(kind: str | None) -> None:
    if kind == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    elif kind == "rss":
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _read_peak(kind: str | None) -> float | None:
    if kind == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    if kind == "rss":
        with contextlib.suppress(OSError, ValueError, StopIteration):
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
    return None
