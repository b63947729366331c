"""ACT, the Attention Calibration Technique (Yu et al., ICML 2024), ported to LVLMs.

In the selected heads, keys that receive unusually high *mean* attention (hidden attention
sinks, BOS excepted) keep only a fraction ``beta`` of their weight; the freed mass goes to the
other visible keys of the same query row, in proportion to their attention. Per head ``h`` of a
selected layer and per batch row:

1. ``score_j = sum_{i sees j} A[i, j] / #{valid queries i that see j}``, where "sees" is the
   attention mask of the forward (causal, padding, sliding window): the release's
   ``sum_i A[i, j] / (N - j)`` for an unpadded causal prompt.
2. ``S = {j : score_j > thres}`` minus the row's first valid token (BOS, the ordinary sink, is
   left intact).
3. ``A'[i, j] = beta * A[i, j]`` for ``j in S``; ``A'[i, j] = A[i, j] + (1 - beta) * sum_S A[i, :]
   * A[i, j] / sum_{k not in S} A[i, k]`` otherwise. Rows still sum to 1.

``S`` is found at the prefill, per (row, layer, head), and kept for the decode steps, where the
single query row gets the same redistribution over the same key positions.

Differences from the release (GATECH-EIC/ACT ``a267af7``, written for LLaMA-2 text models):

* **Which sink is spared.** The release removes the *first element* of ``S`` (the sink with the
  lowest position). That is BOS whenever BOS is a sink; when it is not, the release spares some
  other sink and damps BOS not at all (BOS is not in ``S``). lvlm-fix always spares the row's
  first valid token and damps every sink in ``S``. The two differ exactly when BOS's mean
  attention is at most ``thres``: on the embedded testbed model, 44 of the 48 (layer, head)
  pairs of the edited layers on at least one of 20 POPE prompts, edited weights differing by up to 0.60.
* **Decode steps.** The release also sets ``A'[0, 0] = 1``: harmless in a single prefill (row 0
  sees only BOS) but, with a KV cache, row 0 is the *current* token, so it adds a whole unit of
  BOS attention and the row sums to 2. lvlm-fix does not reproduce it, so decoding is correct.
* **Batches.** Padding queries and keys are excluded from the mean (the release is batch size 1).
* **Exact ties.** The column sums are ``torch.sum`` over the queries, the release's reduction, so
  a mean exactly at ``thres`` is decided as the release decides it (a matmul of the same numbers
  rounds otherwise: 54 of 133 constructed ties flipped, on CPU). Two cases add in another order and may
  still flip such a tie: a left-padded row of a batch, and a prefill long enough to be split into
  query chunks (the chunks' sums are added).
* **Heads.** The release ships no head list for LVLMs; see ``heads_file`` below.

Which heads: a head-list JSON file from ``lvlm-fix calibrate`` (:mod:`.search`, ACT's offline
per-head search), an inline list, or by default every head of layers ``lo .. min(L - lo, L - 2)``
with ``lo = max(1, round(2 L / 32))``: the release's layer range ``2..30`` of 32 scaled to the
depth, all heads.

Head-list file format (``format`` = :data:`HEAD_FILE_FORMAT`)::

    {"format": "lvlm-fix/act-heads/1", "model": "...", "num_layers": 32, "num_heads": 32,
     "heads": {"2": [0, 5], "7": [3]},
     "calibration": {"bench": "pope", "samples": 500, "baseline_acc": 0.85,
                     "per_head_gain": {"2:0": 0.004, ...}, ...}}

Only ``heads`` is required; ``num_layers`` / ``num_heads``, when present, must match the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._lazy import torch
from ...errors import ConfigError
from ...hooks.plan import AttnContext, TokenState
from ..base import Intervention, MethodConfig, Stage, param, resolve_layers
from ..registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ...model import LVLM

__all__ = ["HEAD_FILE_FORMAT", "Act", "ActConfig", "act_column_stats", "act_redistribute", "act_sinks",
           "act_sinks_from", "default_act_layers", "parse_heads", "read_head_file"]

HEAD_FILE_FORMAT = "lvlm-fix/act-heads/1"
_SHAPE = '{"heads": {"<layer>": [head, ...]}}'
_NEG_HALF = -1.7e38  # about finfo(float32).min / 2: additive-mask entries at or below it mark masked keys


# -- head lists ---------------------------------------------------------------------------------
def default_act_layers(n_layers: int) -> list[int]:
    """The release's layers 2..30 of 32 scaled to ``n_layers`` (round half up), last layer excluded."""
    lo = max(1, math.floor(2 * n_layers / 32 + 0.5))
    hi = min(n_layers - lo, n_layers - 2)
    return list(range(lo, hi + 1)) if hi >= lo else [min(lo, n_layers - 1)]


def parse_heads(spec: str) -> dict[int, list[int]]:
    """``"2:0,5;7:3"`` -> ``{2: [0, 5], 7: [3]}`` (raises ConfigError naming the bad part)."""
    heads: dict[int, list[int]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        layer, sep, rest = part.partition(":")
        try:
            if not sep:
                raise ValueError
            hs = [int(h) for h in rest.split(",") if h.strip()]
            heads.setdefault(int(layer), []).extend(hs)
        except ValueError:
            raise ConfigError(
                f"heads={spec!r}: cannot read {part!r}; write 'layer:head,head;layer:head', e.g. '2:0,5;7:3'"
            ) from None
    return {layer: sorted(set(hs)) for layer, hs in heads.items()}


def read_head_file(path: str | Path) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Read an ACT head-list file: ``({layer: [heads]}, the whole JSON document)``.

    Raises:
        ConfigError: the file is missing or is not a head list (message names the path).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ACT head-list file not found: {p}; create one with `lvlm-fix calibrate` or omit heads_file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        raw = doc["heads"]
        heads = {int(layer): sorted({int(h) for h in hs}) for layer, hs in raw.items()}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"ACT head-list file {p} is not valid JSON ({e}); expected {_SHAPE}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"ACT head-list file {p} has no valid 'heads' mapping; expected {_SHAPE}") from None
    return heads, doc


# -- the math (pure, vectorised over rows, heads and queries) -------------------------------------
def act_column_stats(probs: Tensor, seen: Tensor, queries: Tensor | None = None,
                     keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per key, the attention it receives from the valid queries that see it, and how many they are.

    Args:
        probs: ``[b, h, q, k]`` post-softmax attention of scores in which the keys a query does not
            see hold the mask's floor (so a query that sees any key gives them exactly zero). All
            queries, or one chunk of them: the results of chunks add up.
        seen: ``[b, h|1, q, k]``, True (or 1.0) where the mask (and any pre-softmax edit) lets query
            ``i`` see key ``j``.
        queries: ``[b, q]`` valid (non-padding) queries; None: all.
        keys: ``[b, k]`` valid keys; None: all.

    Returns:
        ``(total, count)``, ``[b, h, k]`` fp32 each: ``sum_{i sees j} A[i, j]`` and ``#{i sees j}``.

    ``total`` is ``torch.sum`` over the query axis, the reduction the release uses
    (``sum(dim=0) / (N - j) > thres``), so a mean exactly at ``thres`` is decided as the release
    decides it: the same numbers added in another order (a matmul with a row of ones) round
    differently, and then 54 of 133 constructed exact ties came out the other way.
    """
    dtype = probs.dtype
    seen = seen.to(dtype)  # 0/1
    valid = torch.ones(probs.shape[0], probs.shape[2], dtype=dtype, device=probs.device) if queries is None \
        else queries.to(dtype)
    # A valid query that sees no key at all (its row is uniform over masked keys) adds nothing.
    rows = valid[:, None, :] * seen.amax(-1)  # [b, h|1, q]
    # Excluded rows are zeroed (a copy of the map) only when there are any: an unpadded prompt's map
    # is summed as it is. A padded row's sum starts with the padding's zeros, which torch groups
    # differently: there an exact tie can still go either way (the release runs one unpadded row).
    kept = probs if bool(rows.all()) else probs * rows[..., None]
    total = kept.sum(-2)  # [b, h, k]
    count = torch.matmul(valid[:, None, None, :], seen)[:, :, 0]  # [b, h|1, k]: whole numbers, exact in any order
    if keys is not None:
        total, count = total * keys.to(dtype)[:, None, :], count * keys.to(dtype)[:, None, :]
    return total, count.expand_as(total)


def act_sinks_from(total: Tensor, count: Tensor, thres: float, keep: Tensor | None = None) -> Tensor:
    """ACT's sink set per (row, head) from :func:`act_column_stats` over every query.

    ``score_j = total_j / count_j``; keys with ``score_j > thres`` are sinks, except ``keep``
    (``[b]``, the row's first valid token, BOS) and keys no valid query sees. Returns ``[b, h, k]`` bool.
    """
    score = total / count.clamp_min(1)  # [b, h, k]
    sinks = (score > thres) & (count > 0)
    if keep is not None:
        b, h, _ = sinks.shape
        sinks = sinks.scatter(-1, keep.view(b, 1, 1).expand(b, h, 1), False)
    return sinks


def act_sinks(probs: Tensor, visible: Tensor, thres: float, keep: Tensor | None = None) -> Tensor:
    """ACT's sink set per (row, head): keys whose mean received attention exceeds ``thres``.

    Args:
        probs: ``[b, h, q, k]`` post-softmax attention.
        visible: ``[b, h|1, q, k]`` True where query ``i`` (a valid, non-padding query) sees key ``j``.
        thres: threshold on ``score_j = sum_i A[i, j] / #visible queries of j``.
        keep: ``[b]`` key index never flagged per row (the row's first valid token, BOS).

    Returns:
        ``[b, h, k]`` bool; keys no valid query sees are never sinks.
    """
    return act_sinks_from(*act_column_stats(probs, visible), thres, keep)  # visible folds in validity


def act_redistribute(probs: Tensor, sinks: Tensor, beta: float, rows: Tensor | None = None) -> Tensor:
    """Keep ``beta`` of the sink keys' weight and spread the rest over the other keys.

    Args:
        probs: ``[b, h, q, k]`` post-softmax attention (rows sum to 1).
        sinks: ``[b, h, k]`` bool sink set, the same for every query of a (row, head).
        beta: fraction of each sink's weight it keeps.
        rows: ``[b, q]`` bool, queries to edit (padding queries are left as they are).

    Returns:
        The edited ``[b, h, q, k]``; every edited row still sums to 1. A query row that puts all
        its weight on sinks (nothing to redistribute onto) or sees no sink is returned unchanged.
    """
    # Both masses in one matmul ([b, h, q, k] @ [b, h, k, 2]): few ops for a decode step's single row.
    return _redistribute_by(probs, sinks[:, :, None, :], _sink_columns(sinks, probs.dtype), beta, rows)


def _sink_columns(sinks: Tensor, dtype: torch.dtype) -> Tensor:
    """``[b, h, k, 2]``: 1 at the sinks, then 1 at the other keys (the two masses' matmul operand)."""
    return torch.stack([sinks, ~sinks], dim=-1).to(dtype)


def _redistribute_by(probs: Tensor, s: Tensor, columns: Tensor, beta: float, rows: Tensor | None) -> Tensor:
    """:func:`act_redistribute` with the sink mask ``s`` ``[b, h, 1, k]`` and its :func:`_sink_columns` given
    (a decode step slices both from buffers kept for the sequence)."""
    # The rest is summed, not 1 - sink_mass, so that a tiny rest is exact.
    sink_mass, rest_mass = torch.matmul(probs, columns).split(1, dim=-1)  # [b, h, q, 1] each
    ok = rest_mass > 0
    if rows is not None:
        ok = ok & rows[:, None, :, None]
    # Per (row, head, query): sinks are scaled by beta, the other keys by 1 + freed / rest.
    grow = 1.0 + (1.0 - beta) * sink_mass / rest_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    if probs.dtype == torch.float32:  # the same float32 values in two wheres, with scalars (fewer ops)
        factor = torch.where(ok, torch.where(s, beta, grow), 1.0)
    else:
        one = torch.ones_like(grow)
        factor = torch.where(s, torch.where(ok, beta * one, one), torch.where(ok, grow, one))
    return factor.mul_(probs)  # into the factor's fresh memory: the map is the largest tensor here


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ActConfig(MethodConfig):
    """ACT settings (GATECH-EIC/ACT a267af7)."""

    beta: float = param(0.4, (
        "Fraction of its attention a sink key keeps; 1.0 runs the sink search and moves nothing. "
        "Default 0.4 (source: scripts/calibration.sh and scripts/evaluation.sh, BETA)."), lo=0.0, hi=1.0)
    thres: float = param(0.1, (
        "A key is a sink when its mean received attention, over the queries that see it, exceeds this. "
        "Default 0.1 (source: scripts/*.sh THRES; the paper's alpha/N test is not what the code does)."),
        lo=0.0, hi=1.0)
    heads_file: str | None = param(None, (
        "Head-list JSON written by `lvlm-fix calibrate` ({\"heads\": {\"<layer>\": [h, ...]}}), ACT's offline "
        "per-head search (source: scripts/calibration.sh, models/augment_index.py). Default None: every head of "
        "layers lo..min(L-lo, L-2) with lo = max(1, round(2L/32)), i.e. the release's layers 2..30 of 32 scaled "
        "to the depth (source: models/llama_modelling_aug.py range(2, 31)); the release ships no LVLM head list."))
    heads: str | None = param(None, (
        "Inline head list 'layer:head,head;layer:head' instead of a file, e.g. '14:3,7'. "
        "Default None (source: lvlm-fix; the release selects heads through LAYER_NUM/HEAD_NUM env vars)."))
    layers: tuple[int, ...] | None = param(None, (
        "Restrict ACT to these layers (negative counts from the end; [] for none, the method then installs "
        "nothing); without a head list, all heads of these layers. Default None: the head list's layers, or "
        "the scaled range 2..30 of 32 (source: models/llama_modelling_aug.py)."))

    def validate(self) -> None:
        if self.heads_file is not None and self.heads is not None:
            raise ConfigError("give either heads_file or heads, not both")
        if self.heads_file is not None:
            read_head_file(self.heads_file)
        if self.heads is not None:
            parse_heads(self.heads)

    @classmethod
    def noop(cls) -> ActConfig:
        """No layer: nothing is registered."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> ActConfig:
        """``beta=1``: sinks are searched and every row recomputed on every ACT layer, nothing moves."""
        return cls(beta=1.0)


# -- the intervention ----------------------------------------------------------------------------
@register_method
class Act(Intervention):
    """ACT: damp hidden attention sinks in selected heads, at the prefill and every decode step."""

    name = "act"
    stage = Stage.ATTENTION_WEIGHTS
    config_cls = ActConfig
    config: ActConfig

    def __init__(self, config: ActConfig | None = None) -> None:
        super().__init__(config)
        self.heads: dict[int, list[int]] = {}
        self.head_source = "none"
        self._index: dict[tuple[int, torch.device], Tensor] = {}
        self._valid: Tensor | None = None  # [b, t] prompt tokens that are not padding
        self._image_mask: Tensor | None = None  # [b, t] image tokens of the prompt
        self._stats: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> column sums and counts, during the prefill
        self._sinks: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (first key position [1], sinks [b, hs, k])
        self._image: dict[int, Tensor] = {}  # layer -> [b, k] image keys at the prefill (for the report)
        self._first: Tensor | None = None
        self._steps = 0
        self._decode_bufs: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> decode steps' sink mask and columns

    # -- setup --
    def bind(self, lvlm: LVLM) -> None:
        c = self.config
        n, n_heads = lvlm.num_layers, lvlm.num_heads
        self.eager_layers = self.column_stats_layers = frozenset()
        self.heads = {}
        if c.heads_file is not None:
            heads, doc = read_head_file(c.heads_file)
            for key, size in (("num_layers", n), ("num_heads", n_heads)):
                if key in doc and int(doc[key]) != size:
                    raise ConfigError(
                        f"ACT head-list file {c.heads_file} was calibrated for {key}={doc[key]}, but this model has "
                        f"{key}={size}; calibrate this model with `lvlm-fix calibrate`"
                    )
            self.head_source = str(c.heads_file)
        elif c.heads is not None:
            heads, self.head_source = parse_heads(c.heads), "inline"
        else:
            layers = resolve_layers(c.layers, default_act_layers(n), n)
            heads, self.head_source = {layer: list(range(n_heads)) for layer in sorted(layers)}, "default: all heads"
        where = f"ACT heads ({self.head_source})"
        for layer, hs in heads.items():
            if not 0 <= layer < n:
                raise ConfigError(f"{where}: layer {layer} is beyond the model's depth; valid layers are 0..{n - 1}")
            bad = [h for h in hs if not 0 <= h < n_heads]
            if bad:
                raise ConfigError(
                    f"{where}: head {bad[0]} of layer {layer} is out of range; valid heads are 0..{n_heads - 1}"
                )
        if c.layers is not None and (c.heads_file is not None or c.heads is not None):
            keep = resolve_layers(c.layers, (), n)
            heads = {layer: hs for layer, hs in heads.items() if layer in keep}
        self.heads = {layer: hs for layer, hs in sorted(heads.items()) if hs}
        # The sink set needs every query's attention before any query is edited.
        self.eager_layers = self.column_stats_layers = frozenset(self.heads)

    def begin(self, tokens: TokenState) -> None:
        self._valid = tokens.valid[:, : tokens.prompt_len].clone()
        self._image_mask = tokens.image_mask[:, : tokens.prompt_len].clone()
        self._stats.clear()
        self._sinks.clear()
        self._decode_bufs.clear()
        self._image.clear()
        self._first = self._valid.int().argmax(1)  # position of the row's first valid token (BOS)
        self._steps = 0

    def _heads_on(self, layer: int, device: torch.device) -> Tensor:
        key = (layer, device)
        if key not in self._index:
            self._index[key] = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
        return self._index[key]

    # -- callbacks --
    def _select(self, x: Tensor, layer: int) -> Tensor:
        """The selected heads of ``x`` ``[b, h, q, k]`` (``x`` itself when every head is selected)."""
        if len(self.heads[layer]) == x.shape[1]:
            return x
        return x.index_select(1, self._heads_on(layer, x.device))

    def accumulate(self, scores: Tensor, probs: Tensor, ctx: AttnContext) -> None:
        if ctx.step != 0:  # sinks are found at the prefill only
            return
        layer = ctx.layer
        queries = self._valid.to(probs.device)[:, ctx.query_positions]  # [b, q]: padding queries never count
        # "Sees": the mask (and any pre-softmax edit) left the score above the mask's floor. Written
        # straight as 0/1 floats: a boolean map and its conversion cost ten times more.
        s = self._select(scores, layer)
        seen = torch.gt(s, _NEG_HALF, out=torch.empty_like(s))
        total, count = act_column_stats(self._select(probs, layer), seen, queries, ctx.key_valid)  # [b, hs, kc]
        kc, k_len = total.shape[-1], ctx.k_len or total.shape[-1]
        stats = self._stats.get(layer)
        if stats is None and kc == k_len:  # one chunk (a short prompt): nothing to add up
            self._stats[layer] = (total, count)
            return
        if stats is None:
            stats = self._stats[layer] = (total.new_zeros(*total.shape[:-1], k_len),
                                          count.new_zeros(*count.shape[:-1], k_len))
        stats[0][..., :kc] += total
        stats[1][..., :kc] += count

    def _prefill_sinks(self, ctx: AttnContext) -> Tensor:
        """The layer's sink set from the column statistics of every query (the first call of the editing pass)."""
        layer = ctx.layer
        start = ctx.key_positions[:1]
        total, count = self._stats.pop(layer)
        k_len = total.shape[-1]
        first = self._first.to(total.device)
        sinks = act_sinks_from(total, count, self.config.thres, keep=(first - start).clamp(0, k_len - 1))
        self._sinks[layer] = (start, sinks)
        pos = start + torch.arange(k_len, device=total.device)  # every key of the prefill
        n = self._image_mask.shape[1]
        self._image[layer] = self._image_mask.to(total.device)[:, pos.clamp(max=n - 1)] & (pos < n)
        return sinks

    def post_softmax(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        p = self._select(probs, ctx.layer)  # [b, hs, q, k]
        k = p.shape[-1]  # a prefill query chunk sees the first k keys only
        queries = None  # a decode step's query is a generated token: never padding
        if ctx.step == 0:
            queries = self._valid.to(p.device)[:, ctx.query_positions]  # [b, q] valid
            sinks = self._prefill_sinks(ctx) if ctx.layer in self._stats else self._sinks[ctx.layer][1]
            sinks = sinks[..., :k]
        else:
            stored = self._sinks.get(ctx.layer)
            if stored is None:
                return probs
            start, prefill_sinks = stored
            if prefill_sinks.shape[0] != p.shape[0]:
                raise ConfigError("ACT: the batch changed size between the prefill and a decode step; "
                                  "generate each batch with one generate() call")
            n0 = prefill_sinks.shape[-1]
            self._steps = max(self._steps, ctx.step)
            if ctx.key_start == 0:
                # Keys still start at position 0, so they did at the prefill too (a window only
                # moves forward): the prefill's keys, then new keys, which are never sinks. The mask
                # and the matmul operand are slices of buffers kept for the sequence: two ops per step.
                s, columns = self._decode_operands(ctx.layer, prefill_sinks, k, p.dtype)
                new = _redistribute_by(p, s, columns, self.config.beta, None)
                return new if p is probs else probs.index_copy(1, self._heads_on(ctx.layer, probs.device), new)
            else:  # a sliding window moved: map each key back to its prefill index
                rel = ctx.key_positions - start  # key j was key rel[j] at the prefill
                inside = (rel >= 0) & (rel < n0)
                sinks = prefill_sinks[..., rel.clamp(0, n0 - 1)] & inside
        new = act_redistribute(p, sinks, self.config.beta, rows=queries)
        if p is probs:
            return new
        return probs.index_copy(1, self._heads_on(ctx.layer, probs.device), new)

    def _decode_operands(self, layer: int, prefill_sinks: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The sink mask ``[b, hs, 1, k]`` and :func:`_sink_columns` ``[b, hs, k, 2]`` of a decode step with
        ``k`` keys: slices of buffers holding the prefill's sinks, then keys that are never sinks. A buffer
        twice the length needed is built when ``k`` outgrows it (log many times per sequence)."""
        bufs = self._decode_bufs.get(layer)
        if bufs is None or bufs[0].shape[-1] < k or bufs[1].dtype != dtype:
            sinks = torch.nn.functional.pad(prefill_sinks, (0, 2 * k - prefill_sinks.shape[-1]), value=False)
            bufs = self._decode_bufs[layer] = (sinks[:, :, None, :], _sink_columns(sinks, dtype))
        return bufs[0].narrow(-1, 0, k), bufs[1].narrow(2, 0, k)  # narrow: a cheaper call than indexing

    def summarize(self, report: dict[str, Any]) -> str:
        sinks = report.get("sinks", {})
        per_layer = ", ".join(f"L{layer}: {v['mean_per_head']:g}" for layer, v in sinks.items()) or "none"
        n_heads = sum(len(h) for h in report.get("heads", {}).values())
        return (f"{n_heads} heads ({report['head_source']}); sinks per head by layer: {per_layer}; "
                f"each keeps beta={report['beta']:g} of its attention")

    def report(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "beta": c.beta,
            "thres": c.thres,
            "head_source": self.head_source,
            "heads": {str(layer): hs for layer, hs in self.heads.items()},
            "decode_steps": self._steps,
        }
        sinks: dict[str, Any] = {}
        for layer, (start, s) in self._sinks.items():
            s = s.cpu()
            per_head = s.sum(-1).float()  # [b, hs]
            img = self._image[layer].cpu()[:, None, :] & s
            union = s.any(1)  # [b, k]
            first = self._first.cpu() - int(start)  # key index of each row's first valid token
            sinks[str(layer)] = {
                "mean_per_head": round(float(per_head.mean()), 4),
                "max_per_head": int(per_head.max()) if per_head.numel() else 0,
                "image_token_share": round(float(img.sum() / s.sum().clamp_min(1)), 4),
                # Sink positions per row (union over heads), counted from the row's first valid token.
                "positions": [[int(j) - int(first[r]) for j in torch.nonzero(union[r]).flatten()]
                              for r in range(s.shape[0])],
            }
        out["sinks"] = sinks
        return out
