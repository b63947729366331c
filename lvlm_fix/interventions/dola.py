"""DoLa: Decoding by Contrasting Layers (Chuang et al., ICLR 2024), applied to a vision-language model.

At every forward, on the last position (the one whose logits pick the next token), the model's own
next-token logits ``l^N`` (the "mature" layer) are contrasted with an early exit ``l^j = W_U h^j``,
the residual stream entering decoder layer ``j`` projected through the unembedding ``W_U``::

    q = softmax(l)
    d_j = 1/2 [ mean_v M_j (log M_j - log q_N) + mean_v M_j (log M_j - log q_j) ],  M_j = (q_N + q_j) / 2
    j*  = argmax_j d_j                                    (dynamic DoLa; static DoLa fixes j*)
    H   = {v : log q_N(v) >= max log q_N + log(relative_top)}
    F(v) = log q_N(v) - contrast_scale * log q_j*(v)  on H,  -inf elsewhere

``F`` replaces the next-token logits; ``generate()``'s own processors (a repetition penalty),
warpers and beam scorer then run on it, and ``output_scores`` records it, as in the release.

Defaults and their sources (the release is ``voidism/DoLa`` at 805230e, on transformers 4.28.1):

* ``relative_top = 0.1``: the release's default and every script's value.
* Candidate layers: ``range(s, L, 2)`` for a model of depth ``L``, with ``s = 0``, or 2 when the
  unembedding is tied to the input embedding (then layer 0's exit only echoes the input token).
  This is HALC's setting for LLaVA-1.5 (``{0, 2, .., 30}`` of 32, HALC ``pope_eval.py``), stated for
  any depth; ``candidate_layers='low'`` / ``'high'`` take the first / second half as Hugging Face's
  DoLa does (``range(s, L//2, 2)`` / ``range(L//2, L, 2)``, and the 20 layers at either end past 40
  layers).
* No repetition penalty is added: the LLM paper uses 1.2 with DoLa (release ``tfqa_eval.py``), the
  LVLM setting (HALC) none; pass ``repetition_penalty=1.2`` to ``generate()`` for the former.

Deviations from the release, and choices:

* The premature layer is chosen **per row** (each row's own ``d``). The release averages ``d``
  over the batch and takes one layer for every row; ``release_compat=true`` reproduces that.
* The divergence is the release's as computed: a mean over the vocabulary of ``KL(M || q)``
  (PyTorch's ``kl_div`` argument order), not the textbook Jensen-Shannon divergence
  ``1/2 [KL(q_N || M) + KL(q_j || M)]``. Only its argmax is used; it is kept for fidelity.
* Early exits go through ``W_U`` **without** the final norm, as released (the mature logits are
  normed); ``premature_norm=true`` norms them (as DeCo does).
* With ``relative_top = 0`` the release contrasts the raw logits (no log-softmax, no head set):
  ``F = l^N - contrast_scale * l^j*``; kept. It differs from the log-probability contrast by a
  per-row constant, which only a processor that is not shift-invariant (a repetition penalty) sees.
* ``contrast_scale`` (default 1, the release's contrast) is lvlm-fix's: with ``contrast_scale = 0``
  and ``relative_top = 0`` every callback runs and ``F = l^N`` exactly (the math identity).
* Beam search is served (the release and Hugging Face have none): the beams take the log-softmax
  of ``F``, as for any logits. Decoding that feeds several tokens per forward (prompt lookup) is
  refused: only the last position is contrasted.
* A model whose forward softcaps its final logits gets no softcap on its early exits (none of the
  supported families softcaps in its vision-language forward).

Composition: DoLa edits the logits inside the forward (no contrast stream), before any other such
edit (its ``order`` 48 puts it after the MLP-output methods, 45, and ahead of the ``LOGITS`` stage's
default 50), because its divergence
needs the model's whole mature distribution; DeCo then corrects DoLa's output (``dola+deco``). Any
method composes before it; a contrast-stream method (VCD, ICD, M3ID, PAI's guidance) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.unembed import project
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext, TokenState
    from ..model import LVLM

__all__ = ["DoLa", "DoLaConfig", "LastPositionReader", "candidate_layers", "choice_counts", "dola_contrast",
           "dola_divergence", "early_exit_logits", "logits_device"]


def candidate_layers(n_layers: int, which: str = "all", *, tied: bool = False) -> list[int]:
    """The premature-layer candidates of depth ``n_layers``: every second layer from ``s`` (``'all'``),
    or its lower / upper part (``'low'``, ``'high'``, Hugging Face's DoLa rule). ``s`` is 2 when the
    unembedding is tied to the input embedding and the model has more than 2 layers, else 0."""
    s = 2 if tied and n_layers > 2 else 0
    if which == "all":
        return list(range(s, n_layers, 2))
    half = n_layers // 2 if n_layers <= 40 else None
    if which == "low":
        return list(range(s, half if half is not None else 20, 2))
    return list(range(half if half is not None else n_layers - 20, n_layers, 2))


def early_exit_logits(lvlm: LVLM, hidden: Tensor, *, norm: bool, projected: Tensor | None = None) -> Tensor:
    """``[J, n, D]`` residual streams to ``[J, n, V]`` fp32 next-token logits: (the final norm, then)
    the unembedding, all layers in one matmul so that its weight is read once. ``projected``: their
    ``[J*n, V]`` logits already computed in the model's own ``lm_head`` call (the shared unembedding)."""
    j, n, d = hidden.shape
    if projected is None:
        projected = project(lvlm.lm_head, exit_rows(lvlm, hidden, norm=norm))
    return projected.reshape(j, n, -1).float()


def exit_rows(lvlm: LVLM, hidden: Tensor, *, norm: bool) -> Tensor:
    """The rows ``[J*n, D]`` that :func:`early_exit_logits` projects."""
    x = hidden.reshape(-1, hidden.shape[-1])
    return lvlm.final_norm(x) if norm else x


def dola_divergence(mature: Tensor, early: Tensor) -> Tensor:
    """``d_j`` of every candidate and row, ``[J, n]``, from the mature logits ``[n, V]`` and the early
    ones ``[J, n, V]``: ``1/2 [mean_v M (log M - log q_N) + mean_v M (log M - log q_j)]``, ``M`` the
    two distributions' average (the release's ``kl_div(log q, M)``; ``0 log 0 = 0``)."""
    # = 1/2 mean_v [2 M log M - M (log q_N + log q_j)]. In place on [J, n, V] buffers of its own: at a
    # large vocabulary and batch these passes, and fresh allocations for each, cost more than the projection.
    # log M of M clamped at the smallest normal float, so that 0 log 0 = 0 (as kl_div takes it; xlogy is slower).
    log_n, log_j = mature.log_softmax(-1)[None], early.log_softmax(-1)
    m = log_j.exp().add_(log_n.exp()).mul_(0.5)
    t = m.clamp_min(torch.finfo(m.dtype).tiny).log_().mul_(2.0).sub_(log_j.add_(log_n))
    return t.mul_(m).mean(-1).mul_(0.5)


def dola_contrast(mature: Tensor, premature: Tensor, relative_top: float, scale: float = 1.0) -> Tensor:
    """``F`` of rows ``[n, V]``: ``log q_N - scale log q_j*`` on the head set ``H`` (``-inf`` off it);
    with ``relative_top = 0``, the raw ``l^N - scale l^j*`` on every token (the release's branch)."""
    if relative_top == 0:
        return mature - scale * premature
    log_n = mature.log_softmax(-1)
    # the row's top token always passes (log(relative_top) <= 0), so H is never empty
    keep = log_n >= log_n.amax(-1, keepdim=True) + math.log(relative_top)
    return (log_n - scale * premature.log_softmax(-1)).masked_fill(~keep, -math.inf)


class LastPositionReader:
    """Keeps the last position of the residual stream entering each chosen layer, for one forward.

    ``hidden`` of ``Participant.residual`` is ``[b, q, D]``; only ``[:, -1]`` predicts the next token
    (the prefill hands the whole prompt). A view is kept (the stack in :meth:`stacked` copies it): a decoder
    layer does not write into its input.
    """

    def __init__(self) -> None:
        self.last: dict[int, Tensor] = {}
        # With the shared unembedding: this forward's stack and its logits from the model's lm_head call
        self.shared: tuple[Tensor, Tensor | None] | None = None

    def rows(self, lvlm: LVLM, layers: list[int], *, norm: bool) -> Tensor:
        """``unembed_rows``: this forward's streams of ``layers`` as rows for the model's ``lm_head`` call."""
        stack = self.stacked(layers)
        self.shared = (stack, None)
        return exit_rows(lvlm, stack, norm=norm)

    def take(self, logits: Tensor) -> None:
        """``unembedded``: their logits."""
        if self.shared is not None:
            self.shared = (self.shared[0], logits)

    def exits(self, lvlm: LVLM, layers: list[int], *, norm: bool) -> Tensor:
        """This forward's ``[J, n, V]`` fp32 early exits: the shared projection's, else projected here."""
        shared, self.shared = self.shared, None
        if shared is not None and shared[1] is not None:
            return early_exit_logits(lvlm, shared[0], norm=norm, projected=shared[1])
        return early_exit_logits(lvlm, self.stacked(layers), norm=norm)

    def read(self, hidden: Tensor, layer: int) -> None:
        self.last[layer] = hidden[:, -1]

    def stacked(self, layers: list[int]) -> Tensor:
        """``[J, n, D]`` in the order of ``layers``; each must have been read at this forward."""
        missing = [j for j in layers if j not in self.last]
        if missing:
            raise LvlmFixError(f"layer {missing[0]}'s residual stream was not read at this forward; the model's "
                               "decoder layers were not all run (an early stop?)")
        out, self.last = torch.stack([self.last[j] for j in layers]), {}
        return out


def logits_device(lvlm: LVLM) -> torch.device:
    """Where the next-token logits are: the unembedding's device."""
    return next(lvlm.lm_head.parameters()).device


TALLY_EVERY = 256  # forwards whose report counts are summed together (few ops per decode step, bounded memory)


def choice_counts(pick: Tensor, n: int) -> Tensor:
    """``[n]``: how many rows chose each of ``n`` options (``pick`` ``[rows]``). Not ``bincount``, whose
    output length depends on the values: a compiled decode step (static cache) would break its graph there."""
    return (pick[:, None] == torch.arange(n, device=pick.device)).sum(0)


def refuse_multi_token_decoding(name: str, generation_config: Any) -> None:
    """Only the last position of a forward is edited: decoding that takes several tokens from one forward
    (prompt lookup) would use unedited logits for the others."""
    n = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if n:
        raise LvlmFixError(f"prompt_lookup_num_tokens={n}: {name} edits the last position's logits of each forward "
                           "only; drop prompt_lookup_num_tokens")


@dataclass(frozen=True, kw_only=True)
class DoLaConfig(MethodConfig):
    """DoLa's parameters."""

    relative_top: float = param(0.1, (
        "Head set: tokens whose mature log-probability is within log(relative_top) of the top one are kept, the "
        "others get -inf; 0 contrasts the raw logits of every token (the release's branch). Default 0.1 "
        "(source: DoLa release, dola.py and generation/utils.py relative_top_filter)."), lo=0.0, hi=1.0)
    layers: tuple[int, ...] | None = param(None, (
        "Candidate premature layers (the stream entering each 0-based decoder layer; 0 is the embeddings), "
        "negative counting from the end; [] for none. None: candidate_layers' rule. Default None (source: HALC's "
        "LLaVA-1.5 setting {0, 2, .., 30} of 32, stated for any depth)."))
    candidate_layers: Literal["all", "low", "high"] = param("all", (
        "The rule for the candidates when layers is None: every second layer from s (all), the lower half (low) "
        "or the upper half (high), s = 2 for a tied unembedding, else 0. Default all (source: HALC's LVLM "
        "setting; low/high: Hugging Face's DoLa rule)."))
    premature_layer: int | None = param(None, (
        "Static DoLa: contrast with this layer at every step instead of choosing one (negative counts from the "
        "end). Default None, dynamic (source: DoLa release, --early-exit-layers with two entries)."))
    contrast_scale: float = param(1.0, (
        "The weight of the premature log-probabilities in the contrast, log q_N - contrast_scale log q_j. "
        "Default 1 (source: DoLa release; the parameter is lvlm-fix's, 0 with relative_top 0 is an "
        "identity)."), lo=0.0)
    premature_norm: bool = param(False, (
        "Apply the final norm to the early exits before the unembedding. Default false (source: DoLa release, "
        "modeling_llama.py early exits through lm_head alone)."))
    release_compat: bool = param(False, (
        "Choose one premature layer for the whole batch from the divergence averaged over the rows, as the "
        "release does. Default false (source: lvlm-fix, which chooses per row)."))

    def validate(self) -> None:
        if self.premature_layer is not None and (self.layers is not None or self.candidate_layers != "all"):
            raise ConfigError(f"premature_layer={self.premature_layer} (static DoLa) takes no candidates; drop layers "
                              "and candidate_layers, or drop premature_layer for dynamic DoLa")

    @classmethod
    def noop(cls) -> DoLaConfig:
        """No candidate layer: nothing is installed."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> DoLaConfig:
        """Every early exit is projected and a layer chosen, and ``F = l^N - 0 * l^j* = l^N`` exactly."""
        return cls(contrast_scale=0.0, relative_top=0.0)


@register_method
class DoLa(Intervention):
    """DoLa: contrast the next-token logits with those of a premature layer."""

    name = "dola"
    stage = Stage.LOGITS
    # Before the other in-forward logits edits (LOGITS' default 50): the divergence needs the model's own
    # mature distribution, whole; a later edit (DeCo's correction) takes DoLa's output.
    order = 48
    config_cls = DoLaConfig
    config: DoLaConfig

    def bind(self, lvlm: LVLM) -> None:
        c, n = self.config, lvlm.num_layers
        self.lvlm = lvlm
        if c.premature_layer is not None:
            self.candidates = sorted(resolve_layers((c.premature_layer,), (), n, name="premature_layer"))
        else:
            head, embed = lvlm.lm_head, lvlm.model.get_input_embeddings()
            tied = embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", False)
            self.candidates = sorted(resolve_layers(c.layers, candidate_layers(n, c.candidate_layers, tied=tied), n))
        self.residual_layers = frozenset(self.candidates)
        self.edits_logits = self.shares_unembedding = bool(self.candidates)
        self._reader = LastPositionReader()
        # per candidate, rows x forwards that chose it, kept on the device (a tensor from the start: a compiled
        # decode step would recompile when None became a tensor)
        self._counts = torch.zeros(len(self.candidates), dtype=torch.long, device=logits_device(lvlm))
        self._steps = 0
        self._pending: list[Tensor] = []  # per forward: its rows' chosen candidates

    def _tally(self) -> None:
        if self._pending:
            self._counts = self._counts + choice_counts(torch.cat(self._pending), len(self.candidates))
            self._pending.clear()

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        refuse_multi_token_decoding(self.name, generation_config)

    def begin(self, tokens: TokenState) -> None:
        self._reader.last, self._reader.shared = {}, None

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:
        self._reader.read(hidden, ctx.layer)

    def unembed_rows(self, last: Tensor, ctx: AttnContext) -> Tensor:
        return self._reader.rows(self.lvlm, self.candidates, norm=self.config.premature_norm)

    def unembedded(self, logits: Tensor, ctx: AttnContext) -> None:
        self._reader.take(logits)

    def logits(self, last: Tensor, ctx: AttnContext) -> Tensor:
        c = self.config
        early = self._reader.exits(self.lvlm, self.candidates, norm=c.premature_norm)
        rows = torch.arange(last.shape[0], device=last.device)
        if len(self.candidates) == 1:
            pick = torch.zeros_like(rows)
        else:
            d = dola_divergence(last, early)  # [J, n]
            if c.release_compat:  # one layer for the batch, from the rows' mean divergence
                d = d.mean(-1, keepdim=True).expand_as(d)
            pick = d.argmax(0)
        self._pending.append(pick)  # tallied in bulk (_tally): fewer ops per step
        if len(self._pending) >= TALLY_EVERY:
            self._tally()
        self._steps += 1
        return dola_contrast(last, early[pick, rows], c.relative_top, c.contrast_scale)

    def report(self) -> dict[str, Any]:
        c = self.config
        self._tally()
        counts = self._counts.tolist()
        return {"mode": "static" if c.premature_layer is not None else "dynamic", "candidates": self.candidates,
                "premature_layer_counts": {str(j): k for j, k in zip(self.candidates, counts) if k},
                "steps": self._steps, "relative_top": c.relative_top, "contrast_scale": c.contrast_scale,
                "premature_norm": c.premature_norm, "release_compat": c.release_compat}

    def summarize(self, report: dict[str, Any]) -> str:
        counts = report["premature_layer_counts"]
        return (f"{report['mode']} DoLa over layers {report['candidates']}; chosen per row and step: "
                + (", ".join(f"layer {j} x{k}" for j, k in counts.items()) or "none"))
