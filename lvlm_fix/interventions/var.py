"""VAR: Visual Attention Redistribution, "See What You Are Told" (Kang et al., ICLR 2025).

Some tokens (BOS, punctuation, background image patches) carry massive activations in a few
fixed hidden dimensions of the backbone, the "sink dimensions", and soak up attention while
contributing little. VAR, per sample and per layer:

1. at the prefill, flags as sinks the tokens whose RMS-normalised activation in a sink dimension
   exceeds ``tau``, on the residual stream entering the layer; ``S_v`` = the sinks among the image
   tokens, ``S_t`` = the other sinks;
2. at every forward (prefill and decode), keeps the "image-centric" (head, query) pairs: total
   image attention ``>= summ`` and visual-sink share ``<= rho`` (at the prefill only queries after
   the row's image are eligible);
3. in those rows of the post-softmax attention, keeps a fraction ``p`` of the attention on every
   sink (visual and text) and hands the rest to the non-sink image tokens, in proportion to their
   attention. Rows still sum to 1.

Differences from the release (VisAttnSink ``98e62d6``), all on purpose:

* sinks are detected for every sample (the release reuses the first sample's for the whole run);
* the last layer is not edited, as the paper says (the release edits it through a shadowed flag);
* rows of a batch are independent (the release is batch size 1);
* a selected (head, query) row whose non-sink image attention is zero is left unchanged (the
  release divides by that zero and writes NaN into the attention);
* when the model's sink dimensions are not known (only LLaMA-2-7B/13B and Qwen2-VL-7B are), they
  are discovered per sample from the prompt's residual stream at the first VAR layer (the dims
  where most tokens exceed ``tau``), and reported.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import ConfigError
from ..hooks.plan import AttnContext, TokenState
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["SINK_TAU", "VAR", "KeySets", "VARConfig", "default_layers", "dims_from_votes", "discover_sink_dims",
           "normalized_activations", "redistribute", "redistribute_over", "row_sink_dims", "sink_scores", "sink_votes"]

# The sink threshold on RMS-normalised activations. |x_d|/rms(x) is at most sqrt(D), so 20 presumes
# a wide backbone (D = 4096 in LLaVA-1.5); narrow models need less.
SINK_TAU = 20.0
_RMS_EPS = 1e-6

_DENOM_EPS = 1e-6  # added to every image key's weight in r_sink's denominator, as the release does
_MAX_DIMS = 4  # discovered sink dims per row, as discover_sink_dims


# -- massive activations (sink detection) ------------------------------------------------------------
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


def dims_from_votes(votes: Tensor, max_dims: int = _MAX_DIMS) -> tuple[int, ...]:
    """The dims with at least a tenth of the top vote count, most votes first (at most ``max_dims``).

    Massive activations sit in a few fixed dims of a backbone, so votes concentrate there; an
    empty tuple means no entry crossed the threshold.
    """
    if int(votes.max()) == 0:
        return ()
    order = votes.argsort(descending=True)[:max_dims]
    return tuple(int(d) for d in order if votes[d] * 10 >= votes[order[0]])


def discover_sink_dims(hidden: Tensor, tau: float = SINK_TAU, max_dims: int = _MAX_DIMS) -> tuple[int, ...]:
    """Dimensions that carry massive activations in ``hidden`` ``[b, t, D]`` (see :func:`dims_from_votes`)."""
    return dims_from_votes(sink_votes(hidden, tau), max_dims)


def default_layers(n_layers: int) -> list[int]:
    """Layers ``2 .. L-2``: the first two and the last layer are excluded."""
    return list(range(2, n_layers - 1))


@dataclass(frozen=True)
class KeySets:
    """The key sets of VAR's redistribution, as matmul operands; they depend on the keys only.

    ``columns`` is ``[b, 1, k, 4]``: image keys, visual sinks, all sinks, non-sink image keys
    (which receive the freed attention), as 0/1 in the attention's dtype; ``spread`` is the last two
    transposed, ``[b, 1, 2, k]``. Built once per layer and sequence, they turn the per-step work into
    a few large ops instead of many tiny ones.
    """

    columns: Tensor
    image_eps: Tensor  # [b, 1, 1]: 1e-6 per image key, r_sink's denominator term
    has_visual_sink: Tensor  # [b, 1, 1] bool
    spread: Tensor | None = None  # [b, 1, 2, k]: sinks, non-sink image keys (None: taken from columns)
    any_visual_sink: bool = True  # some row has a visual sink (False: nothing can be selected)
    all_visual_sink: bool = False  # every row has one (the has_visual_sink test selects nothing away)

    @classmethod
    def of(cls, sink_keys: Tensor, image_keys: Tensor, dtype: torch.dtype) -> KeySets:
        img, sink = image_keys.bool(), sink_keys.bool()
        visual_sink = sink & img
        columns = torch.stack([img, visual_sink, sink, img & ~sink], dim=-1).to(dtype)[:, None]
        has = visual_sink.any(-1)
        return cls(columns, _DENOM_EPS * img.sum(-1).to(dtype)[:, None, None], has[:, None, None],
                   columns[..., 2:].transpose(-1, -2), bool(has.any()), bool(has.all()))

    def prefix(self, k: int) -> KeySets:
        """The first ``k`` keys, as a query chunk sees them. ``image_eps`` and ``has_visual_sink``
        stay those of every key: a query that may be selected (past the image) sees every image key."""
        if k >= self.columns.shape[2]:
            return self
        spread = None if self.spread is None else self.spread[..., :k]
        return dataclasses.replace(self, columns=self.columns[:, :, :k], spread=spread)


def redistribute(
    probs: Tensor,
    sink_keys: Tensor,
    image_keys: Tensor,
    eligible: Tensor | None = None,
    *,
    rho: float,
    summ: float,
    p: float,
) -> tuple[Tensor, Tensor]:
    """VAR's (head, query) selection and attention redistribution, for every row of a batch.

    Args:
        probs: ``[b, h, q, k]`` post-softmax attention.
        sink_keys: ``[b, k]`` True at sink keys (visual and text sinks).
        image_keys: ``[b, k]`` True at image keys.
        eligible: ``[b, q]`` queries that may be edited (None: all).
        rho: the largest visual-sink share ``r_sink = sum_{S_v} A / sum_{image} (A + 1e-6)``.
        summ: the smallest total image attention ``s_img = sum_{image} A``.
        p: fraction of the sink attention kept.

    Returns:
        ``(new probs, selected [b, h, q] bool)``. In a selected row ``a``:
        ``a'_j = p a_j`` on sinks, ``a'_j = a_j + Omega a_j / sum_{I \\ S_v} a`` on non-sink image
        keys with ``Omega = (1 - p) sum_S a``, every other entry unchanged. A row is selected when
        its layer has a visual sink, ``r_sink <= rho``, ``s_img >= summ``, and its non-sink image
        attention is positive. Unselected rows are returned bit for bit.
    """
    return redistribute_over(probs, KeySets.of(sink_keys, image_keys, probs.dtype), eligible, rho=rho, summ=summ, p=p)


def redistribute_over(
    probs: Tensor, keys: KeySets, eligible: Tensor | None = None, *, rho: float, summ: float, p: float,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`redistribute` with the key sets built beforehand (see :class:`KeySets`); ``inplace``:
    edit ``probs`` itself (a view of the caller's map) and return it."""
    dtype = probs.dtype
    # One matmul gives every row's mass on each of the four key sets.
    s_img, s_visual_sink, s_sink, s_free = torch.matmul(probs, keys.columns).unbind(-1)  # each [b, h, q]
    r_sink = s_visual_sink / (s_img + keys.image_eps)  # pitfall 10: the eps is inside the sum
    selected = (r_sink <= rho) & (s_img >= summ) & (s_free > 0)
    if not keys.all_visual_sink:  # with a visual sink in every row this test keeps every row
        selected &= keys.has_visual_sink
    if eligible is not None:
        selected &= eligible.bool()[:, None, :]
    gain = torch.where(selected, (1 - p) * s_sink / s_free.clamp_min(torch.finfo(dtype).tiny), 0.0)
    if dtype == torch.float32:  # the eager path's dtype: p - 1 computed once, as float32 computes it
        keep_minus_1 = torch.where(selected, _keep_minus_1(p), 0.0)
    else:
        keep_minus_1 = torch.where(selected, p, 1.0).to(dtype) - 1  # so that 1 + it is p exactly
    # factor: p on sinks, 1 + gain on non-sink image keys, 1 elsewhere; exactly 1 in unselected rows.
    # Sinks and non-sink image keys are disjoint, so each entry of the matmul has one nonzero term.
    spread = keys.columns[..., 2:].transpose(-1, -2) if keys.spread is None else keys.spread
    factor = torch.matmul(torch.stack([keep_minus_1, gain], dim=-1), spread).add_(1)
    return (probs.mul_(factor) if inplace else probs * factor), selected


@functools.lru_cache(maxsize=16)
def _keep_minus_1(p: float) -> float:
    """``float32(p) - 1`` in float32 (so that ``1 + it`` is ``float32(p)`` exactly), as a Python float."""
    return float(torch.tensor(p, dtype=torch.float32) - 1)


def row_sink_dims(hidden: Tensor, valid: Tensor, tau: float, max_dims: int = _MAX_DIMS) -> tuple[Tensor, Tensor]:
    """Per row, the dims carrying massive activations: stats.discover_sink_dims' rule, batched.

    Each dim gets one vote per valid token whose normalised activation there exceeds ``tau``;
    a row's dims are its (at most ``max_dims``) most voted ones with at least a tenth of its top
    vote count.

    Args:
        hidden: ``[b, t, D]`` residual stream.
        valid: ``[b, t]`` False at padding.

    Returns:
        ``(dims [b, m] long, found [b, m] bool)``: the candidate dims, most votes first, and
        which of them qualify (a row with none found has an all-False row).
    """
    votes = ((normalized_activations(hidden) > tau) & valid.bool()[..., None]).sum(1)  # [b, D]
    dims = votes.argsort(dim=-1, descending=True, stable=True)[:, :max_dims]
    top = votes.gather(-1, dims)
    return dims, (top > 0) & (top * 10 >= top[:, :1])


def _row_sink_scores(hidden: Tensor, dims: Tensor, found: Tensor) -> Tensor:
    """``phi`` with per-row dims: ``[b, t, D]``, ``[b, m]`` -> ``[b, t]`` (0 where a row has none)."""
    x = hidden.float()
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    picked = x.gather(-1, dims[:, None, :].expand(-1, x.shape[1], -1)).abs() / rms  # [b, t, m]
    return picked.masked_fill(~found[:, None, :], 0.0).amax(-1)


@dataclass(frozen=True, kw_only=True)
class VARConfig(MethodConfig):
    """VAR's parameters."""

    tau: float = param(SINK_TAU, (
        "Sink threshold: a token is a sink in a layer when max over the sink dims of "
        "|x_j[d]| / rms(x_j) (RMS norm without weight, fp32) on the residual entering the layer "
        "exceeds tau. |x_d|/rms(x) is at most sqrt(hidden size), so small models need a smaller tau. "
        "Default 20 (source: VisAttnSink A_exps/lv1.5_7b.yml tau; src/logic/logic.py DimProspector)."), lo=0.0)
    rho: float = param(0.5, (
        "Largest visual-sink share r_sink = sum_{visual sinks} A / sum_{image} (A + 1e-6) of a "
        "(head, query) for its attention to be redistributed (the release's convention, r_sink <= "
        "rho). The paper states it as a visual NON-sink ratio >= rho_paper; the two agree at 0.5, "
        "so the paper's per-task 0.8 / 0.9 would be 0.2 / 0.1 here. Default 0.5 (source: "
        "lv1.5_7b.yml rho; src/logic/logic.py HeadFork)."), lo=0.0, hi=1.0)
    summ: float = param(0.2, (
        "Smallest total image attention sum_{image} A of a (head, query) for its attention to be "
        "redistributed. Default 0.2 (source: lv1.5_7b.yml summ; src/logic/logic.py HeadFork)."), lo=0.0, hi=1.0)
    p: float = param(0.6, (
        "Fraction of a selected (head, query)'s attention on sink tokens (visual and text) that is "
        "KEPT; the other 1 - p goes to the non-sink image tokens in proportion to their attention. "
        "1.0 runs the detection and selection and moves nothing. Called beta in the release README. "
        "Default 0.6 (source: lv1.5_7b.yml p; src/logic/logic.py VARProcessor.attn_redist)."), lo=0.0, hi=1.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers where sinks are detected and attention is redistributed, 0-based, negative "
        "counting from the end; [] for none (the method then installs nothing). None: 2 .. L-2, the "
        "first two and the last layer excluded as the paper says (the release also edits the last "
        "layer, a bug not reproduced). Default None (source: VAR paper; release sink_select_layers "
        "range(L)[2:])."))
    sink_dims: tuple[int, ...] | None = param(None, (
        "Hidden dimensions that carry the massive activations of sink tokens. None: the known "
        "dims of the backbone when lvlm-fix has them (LLaMA-2-7B 2533,1415; -13B 2100,4743; "
        "Qwen2-VL-7B 458,2570), otherwise discovered per sample from the prompt at the first VAR "
        "layer; the report names them and their source. Default None (source: VisAttnSink "
        "src/logic/constants.py; VAR paper for Qwen2-VL)."), lo=0)

    def validate(self) -> None:
        if self.sink_dims is not None and not self.sink_dims:
            raise ConfigError("sink_dims=[] names no dimension; give at least one, or leave it out for the known "
                              "or discovered ones")

    @classmethod
    def noop(cls) -> VARConfig:
        """No layer: nothing is registered."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> VARConfig:
        """``p=1``: sinks are detected and rows selected on every VAR layer, and every weight is kept."""
        return cls(p=1.0)


@register_method
class VAR(Intervention):
    """Per-sample visual-sink detection and attention redistribution to non-sink image tokens."""

    name = "var"
    stage = Stage.ATTENTION_WEIGHTS
    config_cls = VARConfig
    config: VARConfig
    residual_at_decode = False  # sinks are found on the prompt: the plan drops the residual hooks after the prefill

    def __init__(self, config: VARConfig | None = None) -> None:
        super().__init__(config)
        self.layers: frozenset[int] = frozenset()
        self.sink_dims: tuple[int, ...] | None = None
        self.sink_dims_source = "discovered"
        self._reset()

    def _reset(self) -> None:
        self._valid: Tensor | None = None  # [b, t] prompt tokens that are not padding
        self._image: Tensor | None = None  # [b, t] image tokens of the prompt
        self._sinks: dict[int, Tensor] = {}  # layer -> [b, t] sinks among the prompt tokens
        self._dims: tuple[Tensor, Tensor] | None = None  # discovered (dims [b, m], found [b, m])
        self._selected: dict[int, list[Tensor]] = {}  # layer -> [b, h, q] selected (head, query) pairs, per call
        self._keys: dict[int, KeySets] = {}  # layer -> the prompt's key sets, built at first use

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        self.layers = resolve_layers(self.config.layers, default_layers(n), n)
        if self.config.sink_dims is not None:
            self.sink_dims, self.sink_dims_source = self.config.sink_dims, "config"
            bad = [d for d in self.sink_dims if d >= lvlm.hidden_size]
            if bad:
                raise ConfigError(
                    f"sink_dims entry {bad[0]} is out of range; valid range is [0, {lvlm.hidden_size - 1}]")
        elif lvlm.known_sink_dims:
            self.sink_dims, self.sink_dims_source = tuple(lvlm.known_sink_dims), "adapter"
        else:
            self.sink_dims, self.sink_dims_source = None, "discovered"
        self.eager_layers = self.residual_layers = self.layers

    def begin(self, tokens: TokenState) -> None:
        self._reset()
        self._valid = tokens.valid[:, : tokens.prompt_len].clone()
        self._image = tokens.image_mask[:, : tokens.prompt_len].clone()

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:  # [b, t, D]
        if ctx.step != 0:
            return  # sinks are detected on the prompt only
        valid = self._valid[:, : hidden.shape[1]].to(hidden.device)
        if self.sink_dims is not None:
            phi = sink_scores(hidden, self.sink_dims)
        else:
            if self._dims is None:  # the first VAR layer: discover this sample's dims
                self._dims = row_sink_dims(hidden, valid, self.config.tau)
            phi = _row_sink_scores(hidden, *self._dims)
        self._sinks[ctx.layer] = (phi > self.config.tau) & valid

    def edits(self, ctx: AttnContext) -> bool:
        # At the prefill only queries past the row's image may be selected: at a long prefill the
        # chunks of image tokens are left to sdpa.
        return ctx.step != 0 or (ctx.layer in self._sinks and bool(ctx.queries_after_image.any()))

    def post_softmax(self, probs: Tensor, ctx: AttnContext) -> Tensor:  # [b, h, q, k]
        sinks = self._sinks.get(ctx.layer)
        if sinks is None:
            return probs
        c = self.config
        n = sinks.shape[1]  # prompt length: generated tokens are neither sinks nor image tokens
        k = probs.shape[-1]  # a prefill query chunk sees the first k keys only
        eligible = ctx.queries_after_image if ctx.step == 0 else None  # a decode query is past the image
        if eligible is not None and not bool(eligible.any()):
            # No query of this chunk may be selected (at a long prefill, most chunks are image tokens):
            # the factor would be exactly 1.
            return probs
        if ctx.key_start == 0:
            # Keys 0..n-1 are the prompt: its key sets are fixed for the sequence, and later keys
            # (generated tokens) are left as they are, so only the prompt's columns are touched.
            keys = self._keys.get(ctx.layer)
            if keys is None:
                keys = self._keys[ctx.layer] = KeySets.of(sinks, self._image.to(sinks.device), probs.dtype)
            if not keys.any_visual_sink:
                return probs  # no row of this layer has a visual sink: nothing is selected, the factor is exactly 1
            # In place, into the prompt's columns of the map: the attention function's own fresh tensor.
            _, selected = redistribute_over(probs.narrow(-1, 0, n) if k > n else probs, keys.prefix(k), eligible,
                                            rho=c.rho, summ=c.summ, p=c.p, inplace=True)
            out = probs
        else:  # a sliding window dropped keys: map each key back to its position
            pos = ctx.key_positions
            sink_keys = sinks[:, pos.clamp(max=n - 1)] & (pos < n)
            out, selected = redistribute(probs, sink_keys, ctx.image_keys, eligible, rho=c.rho, summ=c.summ, p=c.p)
        self._selected.setdefault(ctx.layer, []).append(selected)  # counted in report(): no op per step
        return out

    def _count(self, layer: int) -> list[int]:
        """(head, query) pairs redistributed at ``layer`` per row, over every forward of the sequence."""
        picked = self._selected.get(layer, [])
        if not picked:
            return [0] * self._valid.shape[0]
        return sum(s.sum((1, 2)) for s in picked).cpu().tolist()

    def summarize(self, report: dict[str, Any]) -> str:
        dims = report.get("sink_dims") or [[]]
        sinks = report.get("sinks", {})
        visual = ", ".join(f"L{layer}: {len(rows[0]['visual'])}" for layer, rows in sinks.items()) or "none"
        moved = report.get("redistributed_total") or [0]
        if not any(dims):
            return (f"no sink dimension found at tau={report['tau']:g} (|x_d|/rms(x) is at most sqrt(hidden size); "
                    "try a lower --tau); nothing redistributed")
        return (f"sink dims {dims[0]} ({report['sink_dims_source']}); visual sinks by layer: {visual}; "
                f"(head, query) pairs redistributed: {moved[0]}" + (f" (row 1 of {len(moved)})" if len(moved) > 1 else ""))

    def report(self) -> dict[str, Any]:
        """Sinks, sink dims and redistributed (head, query) pairs of the last sequence, per row.

        Positions count from each row's first non-padding prompt token; beam rows are rows.
        """
        out: dict[str, Any] = {
            "layers": sorted(self.eager_layers),
            "tau": self.config.tau, "rho": self.config.rho, "summ": self.config.summ, "p": self.config.p,
            "sink_dims_source": self.sink_dims_source,
        }
        if self._valid is None:
            return {**out, "sink_dims": [], "image_span": [], "sinks": {}, "redistributed": {},
                    "redistributed_total": []}
        valid, image = self._valid.cpu(), self._image.cpu()
        b = valid.shape[0]
        start = valid.int().argmax(1)  # first non-padding token
        if self.sink_dims is not None:
            dims = [list(self.sink_dims)] * b
        elif self._dims is not None:
            d, found = (t.cpu() for t in self._dims)
            dims = [d[r][found[r]].tolist() for r in range(b)]
        else:
            dims = [[] for _ in range(b)]
        spans = []
        for r in range(b):
            idx = torch.nonzero(image[r]).flatten()
            spans.append([int(idx[0] - start[r]), int(idx[-1] + 1 - start[r])] if len(idx) else None)
        sinks = {}
        for layer in sorted(self._sinks):
            s = self._sinks[layer].cpu()
            sinks[str(layer)] = [
                {"visual": (torch.nonzero(s[r] & image[r]).flatten() - start[r]).tolist(),
                 "text": (torch.nonzero(s[r] & ~image[r]).flatten() - start[r]).tolist()}
                for r in range(b)
            ]
        # Every sink layer, 0 where no query was selected (a chunk that no query may be selected in is skipped).
        counts = {str(layer): self._count(layer) for layer in sorted(self._sinks)}
        total = [sum(c[r] for c in counts.values()) for r in range(b)]
        return {
            **out,
            "sink_dims": dims,  # per row
            "rows_without_sink_dims": [r for r in range(b) if not dims[r]],
            "image_span": spans,  # [start, end) per row, None without image
            "sinks": sinks,
            "redistributed": counts,  # (head, query) pairs per layer per row, all steps
            "redistributed_total": total,
        }
