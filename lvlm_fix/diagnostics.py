"""``lvlm-fix heads``: head statistics reduced on the fly, the prompt forwards that record them, and figures.

No full attention map is ever kept. Definitions:

* VHD (VHR's metric): per head, the L2 distance between the head's output at the last prompt
  position with the image and with the image tokens removed; the outlier filter zeroes heads whose
  VHD *and* text-only norm both exceed mean + std over the layer's heads
  (:func:`lvlm_fix.interventions.vhr.head_divergence`, :func:`~lvlm_fix.interventions.vhr.outlier_filter`);
* massive activations (VAR's sink test): ``phi(x_j) = max_{d in D} |x_j[d]| / rms(x_j)`` with an RMS
  norm without learned weight; tokens with ``phi > tau`` are sinks
  (:func:`lvlm_fix.interventions.var.sink_scores`);
* entropy of a head's attention row (natural log), over all keys and over image keys only
  (renormalised); image-attention mass = the row's total weight on image keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._lazy import torch
from .errors import InputError, LvlmFixError
from .extras import require
from .hooks.plan import AttnContext, Participant, Plan, TokenState
from .interventions.var import SINK_TAU, dims_from_votes, normalized_activations, sink_scores, sink_votes
from .interventions.vhr import default_layers, head_divergence, outlier_filter
from .layout import image_token_grids

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from .model import LVLM


# -- pure reductions --------------------------------------------------------------------------
def entropy(probs: Tensor, keep: Tensor | None = None) -> Tensor:
    """Entropy (nats) of attention rows ``[..., k]``, optionally over the keys in ``keep`` only.

    With ``keep``, the kept weights are renormalised first; a row that keeps no weight has
    entropy 0.
    """
    p = probs.float()
    if keep is not None:
        p = p * keep
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def image_mass(probs: Tensor, image_keys: Tensor) -> Tensor:
    """Total attention weight on image keys: ``[b, h, k]`` x ``[b, k]`` -> ``[b, h]``."""
    return (probs.float() * image_keys[:, None, :]).sum(-1)



# -- the recorders behind `lvlm-fix heads` ------------------------------------------------------
class LastPositionHeads(Participant):
    """Every layer's per-head outputs at the last prompt position: the text-only pass of VHD."""

    def __init__(self) -> None:
        self.heads: dict[int, Tensor] = {}  # layer -> [n, h, d]

    def bind(self, lvlm: LVLM) -> None:
        self.head_output_layers = frozenset(range(lvlm.num_layers))

    def head_output(self, heads: Tensor, ctx: AttnContext) -> None:
        if ctx.step == 0:
            self.heads[ctx.layer] = heads[:, -1].clone()  # a copy: a view would keep the whole layer input


class HeadStatistics(Participant):
    """Records VHD, visual sinks, entropy and image mass during one prompt forward of the image rows.

    Attention statistics are taken at the last prompt position. VHD compares each layer's head
    outputs there with ``text_heads``, the same rows' head outputs without image tokens
    (:class:`LastPositionHeads` on :meth:`LVLM.text_only`, run before).
    """

    def __init__(self, text_heads: dict[int, Tensor], sink_dims: tuple[int, ...] | None = None,
                 tau: float = SINK_TAU) -> None:
        self.text_heads = text_heads
        self.sink_dims = sink_dims
        self.tau = tau
        self.vhd: dict[int, Tensor] = {}
        self.text_norm_sq: dict[int, Tensor] = {}
        self.entropy_all: dict[int, Tensor] = {}
        self.entropy_image: dict[int, Tensor] = {}
        self.image_mass: dict[int, Tensor] = {}
        self.phi: dict[int, Tensor] = {}
        self._votes: Tensor | None = None
        self._top: dict[int, tuple[Tensor, Tensor]] = {}
        self.image_mask: Tensor | None = None

    def bind(self, lvlm: LVLM) -> None:
        every = frozenset(range(lvlm.num_layers))
        self.num_layers = lvlm.num_layers
        self.observed_layers = self.head_output_layers = self.residual_layers = every
        if self.sink_dims is None:
            self.sink_dims = lvlm.known_sink_dims
        self.sink_dims_source = "adapter" if self.sink_dims else "discovered"

    def begin(self, tokens: TokenState) -> None:
        self.image_mask = tokens.image_mask.cpu()

    def head_output(self, heads: Tensor, ctx: AttnContext) -> None:
        a, b = heads[:, -1], self.text_heads[ctx.layer].to(heads.device)  # [n, h, d]
        self.vhd[ctx.layer] = head_divergence(a, b).cpu()
        self.text_norm_sq[ctx.layer] = b.float().pow(2).sum(-1).cpu()

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:
        p, img, valid = probs_last, ctx.image_keys, ctx.key_valid  # [n, h, k], [n, k], [n, k]
        self.entropy_all[ctx.layer] = entropy(p, valid[:, None, :]).cpu()
        self.entropy_image[ctx.layer] = entropy(p, img[:, None, :]).cpu()
        self.image_mass[ctx.layer] = image_mass(p, img).cpu()

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:
        if self.sink_dims:
            self.phi[ctx.layer] = sink_scores(hidden, self.sink_dims).cpu()
            return
        # Dims unknown: keep per token only its largest normalised entry and that entry's dim,
        # plus this layer's votes; finish() picks the dims once every layer has voted.
        top, arg = normalized_activations(hidden).max(-1)  # [n, t]
        self._top[ctx.layer] = (top.cpu(), arg.cpu())
        if ctx.layer >= 1:  # the embedding layer's input carries no massive activations yet
            votes = sink_votes(hidden, self.tau).cpu()
            self._votes = votes if self._votes is None else self._votes + votes

    def finish(self) -> None:
        """Resolve the sink dims (discovering them if needed) and each token's sink score."""
        if self.sink_dims or not self._top:
            return
        self.sink_dims = dims_from_votes(self._votes) if self._votes is not None else ()
        dims = torch.tensor(self.sink_dims, dtype=torch.long)
        for layer, (top, arg) in self._top.items():
            self.phi[layer] = torch.where(torch.isin(arg, dims), top, torch.zeros_like(top))
        self._top.clear()

    def report(self) -> dict[str, Any]:
        self.finish()
        layers = sorted(self.vhd)

        def table(d: dict[int, Tensor]) -> list[list[float]]:
            return [d[layer].mean(0).tolist() for layer in layers]

        filtered = {layer: outlier_filter(self.vhd[layer], self.text_norm_sq[layer]) for layer in layers}
        # The heads VHR with its defaults would scale: its default layers, filtered VHD above the layer's median.
        selected = {}
        for layer in default_layers(self.num_layers):
            if layer in filtered:
                above = filtered[layer] > filtered[layer].median(-1, keepdim=True).values  # [n, h]
                selected[str(layer)] = [torch.nonzero(row).flatten().tolist() for row in above]
        img = self.image_mask
        sinks = {}
        for layer in sorted(self.phi):
            flagged = (self.phi[layer] > self.tau) & img  # [n, t] visual sinks only
            start = img.int().argmax(1)  # first image token per row
            sinks[layer] = [[int(j - start[r]) for j in torch.nonzero(flagged[r]).flatten()] for r in range(len(img))]
        return {
            "layers": layers,
            "vhd": table(self.vhd),
            "vhd_filtered": table(filtered),
            "vhr_selected_heads": selected,  # layer -> heads per row
            "entropy_all": table(self.entropy_all),
            "entropy_image": table(self.entropy_image),
            "image_mass": table(self.image_mass),
            "sink_tau": self.tau,
            "sink_dims": list(self.sink_dims or ()),
            "sink_dims_source": self.sink_dims_source,
            "n_image_tokens": [int(x) for x in img.sum(1)],
            "visual_sinks": {str(k): v for k, v in sinks.items()},  # image-token offsets per row
        }


def head_statistics(lvlm: LVLM, image: Image.Image, prompt: str, *, tau: float = SINK_TAU) -> dict[str, Any]:
    """VHD, visual sinks, attention entropy and image mass for one (image, prompt).

    Two prompt-only forwards: first the text-only stream (image tokens removed, at its own
    length), which keeps only each layer's head outputs at the last position; then the image
    prompt, whose statistics are reduced inside the hooks, so no attention map is kept and the
    peak memory is about that of the prompt forward alone.

    Returns:
        A JSON-serialisable dict: per-layer x head tables (``vhd``, ``vhd_filtered``,
        ``entropy_all``, ``entropy_image``, ``image_mass``), ``vhr_selected_heads`` (the heads VHR
        with its defaults would scale, per layer), ``sink_dims`` (with their source: adapter table
        or discovered), ``sink_tau`` and ``visual_sinks`` (image-token offsets per layer).
    """
    from .model import check_handle

    check_handle(lvlm)
    if isinstance(image, (list, tuple)):  # one image per call: a list would be read as several rows
        raise InputError(f"head_statistics takes one image, got a {type(image).__name__} of {len(image)}; call it "
                         "once per image")
    batch = lvlm.encode([image], [prompt])  # the image through the one loader, the prompt checked
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


_FIGURES = "the head figures (lvlm-fix heads)"  # what needs matplotlib, for its missing-package message


def _integer_ticks(ax: Any, labels: list[int] | None = None) -> None:
    """Whole-number ticks on both axes (layers, heads, patches are counted, never fractional);
    ``labels``: the layer each heat-map row stands for."""
    ticker = require("matplotlib.ticker", _FIGURES)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if labels is not None:
        label = ticker.FuncFormatter(lambda v, _: str(labels[int(v)]) if 0 <= v < len(labels) else "")
        ax.yaxis.set_major_formatter(label)


def grid_matches_image(grid: tuple[int, int], image: Image.Image, tolerance: float = 0.05) -> bool:
    """Whether a ``(rows, cols)`` token grid has the image's aspect ratio, so that cell ``(r, c)`` covers the
    image's ``r``-th row and ``c``-th column band. A processor that center-crops (CLIP's, LLaVA-1.5's) lays its
    grid over the crop of a non-square image: drawn over the whole image, each cell would sit off its patch."""
    rows, cols = grid
    return abs((rows / cols) / (image.height / image.width) - 1) <= tolerance


def _draw_over_image(ax: Any, image: Image.Image, values: Any, cmap: str) -> Any:
    """The image, and ``values`` (a rows x cols grid) drawn over it, each cell on its band of the image;
    zero cells left clear. The image is shown at the axes' size, so a 96-pixel scene is as readable as a photo."""
    import numpy as np

    ax.imshow(image, interpolation="nearest")
    masked = np.ma.masked_equal(np.asarray(values, dtype=float), 0)
    im = ax.imshow(masked, cmap=cmap, alpha=0.6, interpolation="nearest",
                   extent=(-0.5, image.width - 0.5, image.height - 0.5, -0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def mask_overlay(image: Image.Image, mask: Any, box: tuple[int, int, int, int] | None = None,
                 min_side: int = 384) -> Image.Image:
    """``image`` with what a mask discards dimmed and the crop ``box`` outlined in red, magnified (nearest
    neighbour) so that its shorter side is at least ``min_side``: CARVE's mask and crop, readable on the image
    they were taken from (the testbed's scenes are 96 pixels)."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rgb = image.convert("RGB")
    keep = np.asarray(PILImage.fromarray(np.asarray(mask, dtype=np.uint8) * (255 if np.max(mask) <= 1 else 1))
                      .resize(rgb.size, PILImage.NEAREST)) > 127
    pixels = np.asarray(rgb, dtype=np.float32)
    pixels[~keep] *= 0.25  # discarded: dimmed, still visible, so the kept regions read in context
    out = PILImage.fromarray(pixels.astype(np.uint8))
    scale = max(1, -(-min_side // min(out.size)))
    out = out.resize((out.width * scale, out.height * scale), PILImage.NEAREST)
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(out).rectangle((x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1), outline=(255, 0, 0),
                                      width=max(2, scale // 2))
    return out


def write_outputs(report: dict[str, Any], out_dir: Path, image: Image.Image | None = None) -> list[Path]:
    """Write the PNG figures, then ``stats.json``; returns the written paths. Each file is written whole or
    not at all, and stats.json last: after a full disk no stats.json is left, so the same command runs again.

    With ``image`` (the one the statistics were recorded on), the visual-sink map is also drawn over it, where
    the patch grid has the image's aspect ratio (:func:`grid_matches_image`)."""
    require("matplotlib", _FIGURES).use("Agg")  # files only, no window
    plt = require("matplotlib.pyplot", _FIGURES)
    Rectangle = require("matplotlib.patches", _FIGURES).Rectangle
    MaxNLocator = require("matplotlib.ticker", _FIGURES).MaxNLocator

    from .files import atomic_write, save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "stats.json"]
    layers = report["layers"]
    row_of = {layer: i for i, layer in enumerate(layers)}
    selected = [(row_of[int(layer)], h) for layer, rows in report.get("vhr_selected_heads", {}).items()
                for h in rows[0] if int(layer) in row_of]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in ((axes[0], "vhd", "VHD"), (axes[1], "vhd_filtered", "VHD after outlier filter")):
        im = ax.imshow(report[key], aspect="auto", cmap="viridis")
        for r, h in selected:  # an outline, so the cell's colour stays readable
            ax.add_patch(Rectangle((h - 0.42, r - 0.42), 0.84, 0.84, fill=False, edgecolor="red", linewidth=1.5))
        ax.set(title=title, xlabel="head", ylabel="layer")
        _integer_ticks(ax, layers)
        fig.colorbar(im, ax=ax)
    if selected:
        fig.suptitle("red outline: the heads VHR would scale with its defaults (its layers; filtered VHD above "
                     "the layer's median)", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "vhd_heatmap.png")
    save_figure(fig, written[-1])
    plt.close(fig)

    # Layers flagging each image token, placed on the image's patch grid as the processor laid it out.
    rank = {p: i for i, p in enumerate(report.get("image_token_positions", []))}  # offset -> image-token index
    counts = torch.zeros(max(len(rank), 1))
    for offsets in report["visual_sinks"].values():
        for j in offsets[0]:
            if j in rank:
                counts[rank[j]] += 1
    tau = report.get("sink_tau", SINK_TAU)
    title = (f"visual sinks: layers flagging each image token\n(tau = {tau:g}, dims {report['sink_dims']}, "
             f"{report['sink_dims_source']})")
    grid = report.get("image_grid")
    over = image is not None and grid is not None and counts.any() and grid_matches_image(grid[:2], image)
    fig, axs = plt.subplots(1, 2 if over else 1, figsize=(11, 5.2) if over else (5.5, 4.5), squeeze=False)
    ax = axs[0][0]
    im = None
    if not counts.any():  # an all-zero map reads as a broken figure: say what was looked for
        rows, cols = (grid[0], grid[1]) if grid else (1, max(len(rank), 1))
        ax.set(xlim=(-0.5, cols - 0.5), ylim=(rows - 0.5, -0.5), xlabel="patch column" if grid else "image token",
               ylabel="patch row" if grid else "")
        ax.text(0.5, 0.5, f"no sink found at tau = {tau:g}", transform=ax.transAxes, ha="center", va="center",
                fontsize=12)
        _integer_ticks(ax)
    elif grid:
        rows, cols, offset = grid
        im = ax.imshow(counts[offset: offset + rows * cols].view(rows, cols).numpy(), cmap="magma")
        ax.set(xlabel="patch column", ylabel="patch row")
        _integer_ticks(ax)
        if over:
            _draw_over_image(axs[0][1], image, counts[offset: offset + rows * cols].view(rows, cols).numpy(), "magma")
            axs[0][1].set_title(f"over the image ({image.width}x{image.height}); clear: no layer flags the patch",
                                fontsize=10)
        elif image is not None:
            title += "\n(not drawn over the image: the grid's aspect differs from the image's, e.g. a center crop)"
        outside = len(rank) - rows * cols
        if outside:
            title += f"\n{rows}x{cols} grid shown; {outside} other image tokens (tiles, newlines) not drawn"
    else:  # no grid can be read from the processor's output: the tokens in order, and why
        im = ax.imshow(counts[None, :].numpy(), cmap="magma", aspect="auto")
        ax.set_yticks([])
        ax.set_xlabel("image token (in sequence order)")
        title += "\n(no patch grid: " + report.get("image_grid_error", "unknown layout")[:60] + "...)"
    ax.set_title(title, fontsize=10)
    if im is not None:
        bar = fig.colorbar(im, ax=ax, label="layers")
        bar.locator = MaxNLocator(integer=True)  # a count of layers
        bar.update_ticks()
    fig.tight_layout()
    written.append(out_dir / "visual_sinks.png")
    save_figure(fig, written[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    mean = lambda table: [sum(r) / len(r) for r in table]  # noqa: E731 - mean over heads
    axes[0].plot(layers, mean(report["entropy_all"]), marker="o", label="all keys")
    axes[0].plot(layers, mean(report["entropy_image"]), marker="s", label="image keys")
    axes[0].set(title="attention entropy (mean over heads)", xlabel="layer", ylabel="nats")
    axes[0].legend()
    axes[1].plot(layers, mean(report["image_mass"]), marker="o")
    axes[1].set(title="attention mass on image tokens", xlabel="layer", ylim=(0, 1))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    written.append(out_dir / "entropy_image_mass.png")
    save_figure(fig, written[-1])
    plt.close(fig)
    atomic_write(written[0], json.dumps(report, indent=1).encode())
    return written
