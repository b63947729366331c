"""``lvlm-fix heads``: the prompt forwards that record head statistics, and their figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .hooks.plan import Plan
from .hooks.stats import SINK_TAU, HeadStatistics, LastPositionHeads
from .model import LVLM


def head_statistics(lvlm: LVLM, image: Image.Image, prompt: str, *, tau: float = SINK_TAU) -> dict[str, Any]:
    """VHD, visual sinks, attention entropy and image mass for one (image, prompt).

    Two prompt-only forwards: first the text-only stream (image tokens removed, at its own
    length), which keeps only each layer's head outputs at the last position; then the image
    prompt, whose statistics are reduced inside the hooks, so no attention map is kept and the
    peak memory is about that of the prompt forward alone.

    Returns:
        A JSON-serialisable dict: per-layer x head tables (``vhd``, ``vhd_filtered``,
        ``entropy_all``, ``entropy_image``, ``image_mass``), ``sink_dims`` (with their source:
        adapter table or discovered), and ``visual_sinks`` (image-token offsets per layer).
    """
    report = record_head_statistics(lvlm, lvlm.encode([image], [prompt]), tau=tau).report()
    report.update(model=lvlm.name, model_type=lvlm.adapter.model_type, prompt=prompt,
                  num_layers=lvlm.num_layers, num_heads=lvlm.num_heads)
    return report


def record_head_statistics(lvlm: LVLM, batch: Any, *, tau: float = SINK_TAU) -> HeadStatistics:
    """The two forwards of :func:`head_statistics` on an encoded batch; the filled recorder."""
    text = LastPositionHeads()
    with torch.inference_mode():  # prefill only, each as generate() prepares it
        with Plan(lvlm, [text]).active():
            lvlm.model.generate(**lvlm.text_only(batch), max_new_tokens=1, do_sample=False)
        recorder = HeadStatistics(text.heads, tau=tau)
        with Plan(lvlm, [recorder]).active():
            lvlm.model.generate(**batch, max_new_tokens=1, do_sample=False)
    return recorder


def _grid(n: int) -> tuple[int, int]:
    """A near-square (rows, cols) grid for n image tokens (exact when n is a square)."""
    rows = int(math.isqrt(n))
    while rows > 1 and n % rows:
        rows -= 1
    return rows, n // rows


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``stats.json`` and the PNG figures; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "stats.json"]
    written[0].write_text(json.dumps(report, indent=1))
    layers = report["layers"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "vhd", "VHD"), (axes[1], "vhd_filtered", "VHD after outlier filter")):
        im = ax.imshow(report[key], aspect="auto", cmap="viridis")
        ax.set(title=title, xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(out_dir / "vhd_heatmap.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    n_img = report["n_image_tokens"][0]
    counts = torch.zeros(max(n_img, 1))
    for offsets in report["visual_sinks"].values():
        for j in offsets[0]:
            if 0 <= j < n_img:
                counts[j] += 1
    rows, cols = _grid(max(n_img, 1))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(counts.view(rows, cols).numpy(), cmap="magma")
    ax.set(title=f"visual sinks: layers flagging each image token\n(dims {report['sink_dims']}, {report['sink_dims_source']})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(out_dir / "visual_sinks.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    mean = lambda table: [sum(r) / len(r) for r in table]  # noqa: E731 - mean over heads
    axes[0].plot(layers, mean(report["entropy_all"]), marker="o", label="all keys")
    axes[0].plot(layers, mean(report["entropy_image"]), marker="s", label="image keys")
    axes[0].set(title="attention entropy (mean over heads)", xlabel="layer", ylabel="nats")
    axes[0].legend()
    axes[1].plot(layers, mean(report["image_mass"]), marker="o")
    axes[1].set(title="attention mass on image tokens", xlabel="layer", ylim=(0, 1))
    fig.tight_layout()
    written.append(out_dir / "entropy_image_mass.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
