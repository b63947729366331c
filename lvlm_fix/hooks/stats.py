"""Head statistics, reduced on the fly: no full attention map is ever kept.

Pure functions (unit-tested on constructed tensors) and :class:`HeadStatistics`, the
participant behind ``lvlm-fix heads``. Definitions follow ``methods.md``:

* VHD (§2, Eq. 4): per head, the L2 distance between the head's output at the last prompt
  position with the image and with the image tokens removed; the outlier filter (Eq. 6)
  zeroes heads whose VHD *and* text-only norm both exceed mean + std over the layer's heads.
* Massive activations (§3 step 1): ``phi(x_j) = max_{d in D} |x_j[d]| / rms(x_j)`` with an
  RMS norm without learned weight; tokens with ``phi > tau`` are sinks.
* Entropy of a head's attention row (natural log), over all keys and over image keys only
  (renormalised); image-attention mass = the row's total weight on image keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .plan import AttnContext, Participant, TokenState

if TYPE_CHECKING:
    from ..model import LVLM

# VAR's threshold on RMS-normalised sink-dimension activations (methods.md §3). |x_d|/rms(x) is at
# most sqrt(D), so 20 presumes a wide backbone (D = 4096 in LLaVA-1.5); narrow models need less.
SINK_TAU = 20.0
_RMS_EPS = 1e-6


# -- pure reductions --------------------------------------------------------------------------
def head_divergence(with_image: Tensor, text_only: Tensor) -> Tensor:
    """VHD: ``||a_h - b_h||_2`` per head, in fp32. Inputs ``[..., h, d]`` -> ``[..., h]``."""
    return (with_image.float() - text_only.float()).norm(dim=-1)


def outlier_filter(vhd: Tensor, text_norm_sq: Tensor) -> Tensor:
    """Zero the VHD of heads that are outliers in both VHD and text-only norm (Eq. 6).

    Args:
        vhd: ``[..., h]`` head divergences.
        text_norm_sq: ``[..., h]`` squared norm of the text-only head output (``TA``).

    The threshold is mean + std over the heads of the layer; std is torch's default
    (Bessel-corrected), the convention of torch code such as the official release.
    """
    hi_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
    hi_ta = text_norm_sq > text_norm_sq.mean(-1, keepdim=True) + text_norm_sq.std(-1, keepdim=True)
    return vhd.masked_fill(hi_vhd & hi_ta, 0.0)


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


def normalized_activations(hidden: Tensor) -> Tensor:
    """``|x_j[d]| / rms(x_j)`` in fp32, RMS norm without learned weight: ``[..., t, D]``."""
    x = hidden.float()
    return x.abs() / (x.pow(2).mean(-1, keepdim=True) + _RMS_EPS).sqrt()


def sink_scores(hidden: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``phi(x_j) = max_{d in dims} |x_j[d]| / rms(x_j)``: ``[b, t, D]`` -> ``[b, t]``."""
    x = hidden.float()
    rms = (x.pow(2).mean(-1) + _RMS_EPS).sqrt()
    return x[..., list(dims)].abs().amax(-1) / rms


def sink_votes(hidden: Tensor, tau: float = SINK_TAU) -> Tensor:
    """Per dimension, how many tokens of ``hidden`` ``[b, t, D]`` exceed ``tau`` there: ``[D]``."""
    return (normalized_activations(hidden) > tau).flatten(0, -2).sum(0)


def dims_from_votes(votes: Tensor, max_dims: int = 4) -> tuple[int, ...]:
    """The dims with at least a tenth of the top vote count, most votes first (at most ``max_dims``).

    Massive activations sit in a few fixed dims of a backbone, so votes concentrate there; an
    empty tuple means no entry crossed the threshold.
    """
    if int(votes.max()) == 0:
        return ()
    order = votes.argsort(descending=True)[:max_dims]
    return tuple(int(d) for d in order if votes[d] * 10 >= votes[order[0]])


def discover_sink_dims(hidden: Tensor, tau: float = SINK_TAU, max_dims: int = 4) -> tuple[int, ...]:
    """Dimensions that carry massive activations in ``hidden`` ``[b, t, D]`` (see :func:`dims_from_votes`)."""
    return dims_from_votes(sink_votes(hidden, tau), max_dims)


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
            "entropy_all": table(self.entropy_all),
            "entropy_image": table(self.entropy_image),
            "image_mass": table(self.image_mass),
            "sink_tau": self.tau,
            "sink_dims": list(self.sink_dims or ()),
            "sink_dims_source": self.sink_dims_source,
            "n_image_tokens": [int(x) for x in img.sum(1)],
            "visual_sinks": {str(k): v for k, v in sinks.items()},  # image-token offsets per row
        }
