"""DeCo: Dynamic Correction Decoding (Wang et al., "MLLM can see?", ICLR 2025).

Preceding layers of a vision-language model often still rank the visible object right where the
final layer hallucinates. At every forward, on the last position, DeCo picks the most confident
preceding layer among the final layer's own candidates and adds its logits to the final ones::

    C         = the top-k tokens of p^N = softmax(l^N), cut after the first whose cumulative mass reaches top_p
    l^j       = W_U norm(h^j)       for j in J  (the stream entering decoder layer j, through the final norm)
    (j*, c*)  = argmax over j in J, c in C of softmax(l^j)_c ;   m = softmax(l^j*)_c*
    l~        = l^N + alpha * m * l^j*   on C,   -inf elsewhere

``l~`` (raw logits, not log-probabilities) replaces the next-token logits; ``generate()``'s
processors, warpers (sampling) and beam scorer then run on it once, and ``output_scores`` records it.

Defaults (the release is ``zjunlp/Deco`` at fee8d75, on transformers 4.31.0, LLaVA-1.5-7B scripts):
``alpha = 0.6``, ``threshold_top_p = 0.9``, ``threshold_top_k = 20`` (``chair_llava.py`` and the
POPE / AMBER / MME scripts); layers ``hidden_states[20..28]`` of 32, stated here relative to the
depth ``L``: ``floor(0.625 L) .. floor(0.875 L)``, inclusive.

Deviations from the release, and choices:

* Per row at any batch size: each row has its own candidates, layer and ``m``. The release's
  greedy and sampling loops work at batch 1 only (its beam loop is per row, as here).
* ``generate()``'s processors run once, on ``l~``. The release runs them twice per step (on the
  uncorrected logits, for the recorded scores, and on ``l~``), so a stateful processor advanced
  twice; its ``output_scores`` held the uncorrected logits, here they hold ``l~``.
* fp32: the early exits' logits and softmax are taken in fp32 (the release keeps them in the model's
  dtype, fp16); ``release_compat=true`` rounds the early logits to the model's dtype and takes their
  softmax there, as released.
* ``threshold_top_k`` larger than the vocabulary takes the whole vocabulary (the release's topk raises).
* ``candidate_cut`` (default true, the release) is lvlm-fix's: false keeps every token (no ``-inf``);
  with ``alpha = 0`` every callback runs and ``l~ = l^N`` exactly (the math identity; a
  ``threshold_top_p`` of 1 is no identity: the fp32 cumulative sum can reach 1 before the tail).
* Early exits are always normed, as released (the raw early logits' scale is what ``alpha * m``
  multiplies); a model whose forward softcaps its final logits gets no softcap on the early exits.
* Decoding that feeds several tokens per forward (prompt lookup) is refused: only the last
  position is corrected.

Composition: an in-forward logits edit without a contrast stream. It takes the logits that the
edits before it made: with DoLa (``dola+deco``, whose ``order`` is lower), the candidates are DoLa's
head set's best tokens and the correction is added to DoLa's contrast. A contrast-stream method
(VCD, ICD, M3ID, PAI's guidance) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .dola import TALLY_EVERY, LastPositionReader, choice_counts, logits_device, refuse_multi_token_decoding
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext, TokenState
    from ..model import LVLM

__all__ = ["DeCo", "DeCoConfig", "deco_candidates", "deco_correct", "default_layers"]


def default_layers(n_layers: int) -> list[int]:
    """``floor(0.625 L) .. floor(0.875 L)`` inclusive: the release's 20..28 of 32 layers, at any depth."""
    return list(range(math.floor(0.625 * n_layers), min(math.floor(0.875 * n_layers), n_layers - 1) + 1))


def deco_candidates(mature: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """The candidate set of each row of ``mature`` ``[n, V]``: ``(ids [n, k], in_set [n, k])``, the top-k
    token ids by probability (descending) and which of them are kept: up to and including the first
    whose cumulative probability reaches ``top_p``."""
    k = min(top_k, mature.shape[-1])
    probs, ids = mature.softmax(-1).topk(k, dim=-1)
    cum = probs.cumsum(-1)
    crossing = torch.searchsorted(cum, cum.new_full((cum.shape[0], 1), top_p), right=False)  # [n, 1]
    in_set = torch.arange(k, device=ids.device)[None, :] <= crossing  # the crossing token is in the set
    return ids, in_set


def deco_correct(mature: Tensor, early: Tensor, alpha: float, top_k: int, top_p: float, *, cut: bool = True,
                 probs_dtype: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeCo's correction of ``mature`` ``[n, V]`` by the early exits ``early`` ``[J, n, V]`` (logits).

    Returns ``(l~ [n, V], j* [n] as an index into J, m [n], |C| [n])``. ``probs_dtype``: the dtype of
    the early exits' softmax (None: fp32); the early logits are rounded to it first.
    """
    ids, in_set = deco_candidates(mature, top_k, top_p)
    if probs_dtype is not None:
        early = early.to(probs_dtype)
    j, n, k = early.shape[0], ids.shape[0], ids.shape[1]
    # p^j on the candidates only: exp(l^j_c - logsumexp l^j), without the whole [J, n, V] softmax
    on_cand = early.gather(-1, ids[None].expand(j, n, k))  # [J, n, k] the early logits of the candidates
    on_c = (on_cand - early.logsumexp(-1, keepdim=True)).exp().float()
    out_of_set = ~in_set
    on_c = on_c.masked_fill(out_of_set[None], -1.0)  # out of the set: below every probability
    flat = on_c.permute(1, 0, 2).reshape(n, j * k)  # per row, layer-major as the release's [J, C] argmax
    m, where = flat.max(-1)  # the first maximum, as argmax
    pick = torch.div(where, k, rounding_mode="floor")
    rows = torch.arange(n, device=mature.device)
    weight = (alpha * m)[:, None]
    if cut:  # only the set survives: the correction of its tokens, scattered into -inf (fewer ops over V)
        kept = (mature.gather(1, ids) + weight * on_cand[pick, rows].float()).masked_fill_(out_of_set, -math.inf)
        out = torch.full_like(mature, -math.inf).scatter_(1, ids, kept)
    else:
        out = mature + weight * early[pick, rows].float()
    return out, pick, m, in_set.sum(-1)


@dataclass(frozen=True, kw_only=True)
class DeCoConfig(MethodConfig):
    """DeCo's parameters."""

    alpha: float = param(0.6, (
        "The correction's strength: l~ = l^N + alpha m l^j*, m the chosen layer's top candidate probability. "
        "Default 0.6 (source: DeCo release, chair_llava.py --alpha and the POPE/AMBER/MME scripts)."), lo=0.0)
    threshold_top_p: float = param(0.9, (
        "The candidates are cut after the first top-k token whose cumulative final-layer probability reaches "
        "this. Default 0.9 (source: DeCo release, chair_llava.py --threshold_top_p)."), lo=0.0, hi=1.0,
        lo_open=True)
    threshold_top_k: int = param(20, (
        "At most this many candidates, by final-layer probability (the vocabulary if larger). Default 20 "
        "(source: DeCo release, chair_llava.py --threshold_top_k)."), lo=1)
    layers: tuple[int, ...] | None = param(None, (
        "Preceding layers (the stream entering each 0-based decoder layer, through the final norm), negative "
        "counting from the end; [] for none. None: floor(0.625 L)..floor(0.875 L). Default None (source: DeCo "
        "release, chair_llava.py early_exit_layers range(20, 29) of 32 layers)."))
    candidate_cut: bool = param(True, (
        "Give -inf to every token outside the candidates. Default true (source: DeCo release, "
        "generation/utils.py deco_greedy_search; false is lvlm-fix's, with alpha 0 an identity)."))
    release_compat: bool = param(False, (
        "Round the early exits' logits to the model's dtype and take their softmax there, as the release "
        "(fp16). Default false (source: lvlm-fix, which takes them in fp32)."))

    @classmethod
    def noop(cls) -> DeCoConfig:
        """No preceding layer: nothing is installed."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> DeCoConfig:
        """Candidates, layer and ``m`` are found, and ``l~ = l^N + 0 * m * l^j* = l^N`` exactly, uncut."""
        return cls(alpha=0.0, candidate_cut=False)


@register_method
class DeCo(Intervention):
    """DeCo: correct the final logits with the most confident preceding layer's."""

    name = "deco"
    stage = Stage.LOGITS
    config_cls = DeCoConfig
    config: DeCoConfig

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        self.lvlm = lvlm
        self.layers = sorted(resolve_layers(self.config.layers, default_layers(n), n))
        self.residual_layers = frozenset(self.layers)
        self.edits_logits = self.shares_unembedding = bool(self.layers)
        self._probs_dtype = lvlm.model.dtype if self.config.release_compat else None
        self._reader = LastPositionReader()
        # per layer, rows x forwards that chose it; the sums of m and |C| (tensors on the device from the start)
        device = logits_device(lvlm)
        self._counts = torch.zeros(len(self.layers), dtype=torch.long, device=device)
        self._m_sum = torch.zeros((), device=device)
        self._candidates = torch.zeros((), dtype=torch.long, device=device)
        self._steps = self._rows = 0
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # per forward: (j*, m, |C|) of its rows

    def _tally(self) -> None:
        """Adds the pending forwards' choices, m and |C| to the running sums (tensors: no device sync)."""
        if self._pending:
            pick, m, size = (torch.cat(t) for t in zip(*self._pending))
            self._pending.clear()
            self._counts = self._counts + choice_counts(pick, len(self.layers))
            self._m_sum, self._candidates = self._m_sum + m.sum(), self._candidates + size.sum()

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        refuse_multi_token_decoding(self.name, generation_config)

    def begin(self, tokens: TokenState) -> None:
        self._reader.last, self._reader.shared = {}, None

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:
        self._reader.read(hidden, ctx.layer)

    def unembed_rows(self, last: Tensor, ctx: AttnContext) -> Tensor:
        return self._reader.rows(self.lvlm, self.layers, norm=True)

    def unembedded(self, logits: Tensor, ctx: AttnContext) -> None:
        self._reader.take(logits)

    def logits(self, last: Tensor, ctx: AttnContext) -> Tensor:
        c = self.config
        early = self._reader.exits(self.lvlm, self.layers, norm=True)
        out, pick, m, size = deco_correct(last, early, c.alpha, c.threshold_top_k, c.threshold_top_p,
                                          cut=c.candidate_cut, probs_dtype=self._probs_dtype)
        self._pending.append((pick, m, size))  # tallied in bulk (_tally): fewer ops per step
        if len(self._pending) >= TALLY_EVERY:
            self._tally()
        self._steps += 1
        self._rows += last.shape[0]
        return out

    def report(self) -> dict[str, Any]:
        c = self.config
        self._tally()
        counts = self._counts.tolist()
        per_row = (lambda t: round(t.item() / self._rows, 4)) if self._rows else (lambda t: None)  # noqa: E731
        return {"layers": self.layers, "alpha": c.alpha, "threshold_top_p": c.threshold_top_p,
                "threshold_top_k": c.threshold_top_k, "candidate_cut": c.candidate_cut,
                "release_compat": c.release_compat, "steps": self._steps,
                "selected_layer_counts": {str(j): k for j, k in zip(self.layers, counts) if k},
                "mean_m": per_row(self._m_sum), "mean_candidates": per_row(self._candidates)}

    def summarize(self, report: dict[str, Any]) -> str:
        counts = report["selected_layer_counts"]
        return (f"alpha={report['alpha']} over layers {report['layers']}; chosen: "
                + (", ".join(f"layer {j} x{k}" for j, k in counts.items()) or "none")
                + f"; mean m={report['mean_m']}, mean |C|={report['mean_candidates']}")
