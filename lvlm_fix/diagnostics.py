"""``lvlm-fix heads``: the prompt forwards that record head statistics, and their figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import LvlmFixError
from .hooks.plan import Plan
from .hooks.stats import SINK_TAU, HeadStatistics, LastPositionHeads
from .layout import image_token_grids
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
    batch = lvlm.encode([image], [prompt])
    report = record_head_statistics(lvlm, batch, tau=tau).report()
    report.update(model=lvlm.name, model_type=lvlm.adapter.model_type, prompt=prompt,
                  num_layers=lvlm.num_layers, num_heads=lvlm.num_heads, **image_grid(lvlm, batch))
    return report


def image_grid(lvlm: LVLM, batch: Any) -> dict[str, Any]:
    """The first row's image-token grid as the processor laid it out (:mod:`lvlm_fix.layout`), for the report.

    ``image_grid`` is ``[rows, cols, offset]`` (offset among the row's image tokens), or None with
    ``image_grid_error`` saying why; ``image_token_positions`` maps each image token (in order) to
    its offset from the first one, so positional offsets can be turned into grid cells.
    """
    mask = lvlm.image_token_mask(batch["input_ids"][:1])[0]
    pos = torch.nonzero(mask).flatten()
    out: dict[str, Any] = {"image_token_positions": (pos - pos[0]).tolist() if len(pos) else []}
    try:
        g = image_token_grids(lvlm, batch)[0]
    except LvlmFixError as e:
        return {**out, "image_grid": None, "image_grid_error": str(e)}
    return {**out, "image_grid": [g.rows, g.cols, g.offset]}


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

    # Layers flagging each image token, placed on the image's patch grid as the processor laid it out.
    rank = {p: i for i, p in enumerate(report.get("image_token_positions", []))}  # offset -> image-token index
    counts = torch.zeros(max(len(rank), 1))
    for offsets in report["visual_sinks"].values():
        for j in offsets[0]:
            if j in rank:
                counts[rank[j]] += 1
    title = f"visual sinks: layers flagging each image token\n(dims {report['sink_dims']}, {report['sink_dims_source']})"
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if report.get("image_grid"):
        rows, cols, offset = report["image_grid"]
        im = ax.imshow(counts[offset: offset + rows * cols].view(rows, cols).numpy(), cmap="magma")
        outside = len(rank) - rows * cols
        if outside:
            title += f"\n{rows}x{cols} grid shown; {outside} other image tokens (tiles, newlines) not drawn"
    else:  # no grid can be read from the processor's output: the tokens in order, and why
        im = ax.imshow(counts[None, :].numpy(), cmap="magma", aspect="auto")
        ax.set_yticks([])
        ax.set_xlabel("image token (in sequence order)")
        title += "\n(no patch grid: " + report.get("image_grid_error", "unknown layout")[:60] + "...)"
    ax.set(title=title)
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
