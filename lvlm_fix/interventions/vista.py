"""VISTA: Visual Information Steering with Token-logit Augmentation (Li et al., ICML 2025).

Two parts, each optional:

* **Visual steering vector (VSV).** Before the prefill, the prompt is run twice without any edit:
  as it is (``X_p``, with the image) and with its image tokens deleted (``X_n``). At each decoder
  layer ``l`` the raw layer output (the residual stream leaving the layer, before the final norm
  for the last one) at the last prompt token gives ``v^l = h^l(X_p) - h^l(X_n)``. During the whole
  generation (the prefill and every decode step, every position), each steered layer's MLP output
  ``m`` is turned toward ``v^l`` at constant norm::

      c  = 1 + max(0, cos(m, -v^l))            (1 without the adaptive factor: simple_mode)
      m' = ||m|| * normalize(normalize(m) + lam * c * normalize(v^l))

  The edit is position-wise and the same at every step, so the KV cache the steered prefill
  builds is what a recomputation would build.
* **Self-logits augmentation (SLA).** The next-token logits are mixed with the mean of the early
  exits of layers ``s..e`` (inclusive), ``lm_head`` applied to their raw outputs (no final norm)::

      logits = (1 - alpha) * logits + alpha * mean_{l in s..e} lm_head(h^l)

  at the last position of every forward (what ``generate()`` reads), before its processors,
  warpers and beam scorer, so greedy, sampling and beam search all decode the mixed logits.

VISTA's two unsteered forwards run before the real prefill: the rows (left padded as given), and
the same rows without their image tokens at their own width (batched with the image rows they would
be padded to those rows' width and cost as much), each stopped after the last steered layer (no
final norm, no ``lm_head``). Every row gets its own vector, so a batch equals
its rows alone; beam search and ``num_return_sequences`` expand the rows before the prefill, so
each expanded row gets its source row's vector. A row without image tokens has ``v = 0`` and its
MLP outputs are left as they are (up to rounding).

Defaults (release ``LzVv123456/VISTA`` at ``dc62252``): ``lam = 0.17`` (``run_chair.sh``, the
release's CHAIR run; its POPE run, ``run_pope.sh``, uses 0.01 and the parsers default to 0.1 for
CHAIR, 0.01 for POPE); every decoder layer steered (``--layers`` unset); ``sla_alpha = 0.3`` and
layers 25..30 of 32 (``--logits-alpha``, ``--logits-layers 25,30``, every script); the adaptive
factor ``c`` on (``simple_mode=False``).

Decisions against the release:

* **The PCA term is dropped.** The release adds the first principal component of a one-row PCA of
  ``v`` to ``v`` itself: the centred data are all zeros, so that component is whatever the SVD
  backend returns for a zero matrix (a unit vector over all layers and dimensions, not reproducible
  across CPU and GPU solvers). Here ``v`` is the mean difference, which is the release's vector
  without that term.
* **Any batch.** The release asserts batch size 1 and reads ``[:, -1]`` of unpadded rows; here
  every row is left padded and keeps its own vector and early exits.
* **The input dtype is kept.** The release computes in fp32 and returns ``.half()`` whatever the
  model's dtype; here the fp32 result is cast back to the MLP output's dtype. The early exits are
  ``lm_head`` in the model's dtype, mixed in fp32 (the release mixes in fp16 for LLaVA).
* **SLA layers at other depths.** The release hard-codes 25..30 for 32 layers (the 7th- to
  2nd-last). For ``L`` layers the default is ``round(25 L / 32) .. round(30 L / 32)`` (halves
  rounded up), the end capped at ``L - 2`` so that the last layer (the one the final logits come
  from) stays out as in the release, the start capped at the end: 25..30 for 32, 31..38 for 40,
  6..6 for 8.
* **The final norm is optional.** The release applies ``lm_head`` to un-normalised hidden states,
  so the early logits are on another scale than the final ones; kept by default,
  ``sla_final_norm=true`` applies the final norm first. A model that soft-caps its final logits
  (``final_logit_softcapping``) gets the same cap on its early exits, so both are mixed on the same
  scale (the release supports no such model).
* **A layer that cannot see the image is not steered.** Where the last token's output at layer ``l``
  cannot depend on any image token (a row without an image; sliding-window layers whose windows, through
  the layers up to ``l``, do not reach back to the image), ``v^l`` is zero in exact arithmetic and rounding
  noise in practice; ``normalize`` would turn that noise into a unit vector of random direction (and a
  different one in a batch and alone). It is set to zero there. The release's models have no sliding
  window, so it never meets the case.
* Only the last position's logits are augmented (the release augments every position and uses the
  last); the early exits are computed for it alone.
* The unsteered forwards are of the bare model: a method composed with VISTA does not edit them
  (the release has none to compose).

Composition: VISTA composes with attention and head methods (they edit the steered forwards)
and with other MLP-output or in-forward logits edits, in composition order. It is refused beside
a contrast-stream method (``vcd``, ``icd``, ``m3id``, ``pai`` with guidance): the contrast rows run
outside the plan and would get neither the steering nor the augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError
from ..hooks.contrast import rows_without_images
from ..hooks.plan import AttnContext, Participant, Plan, StopForward, static_cache
from ..hooks.sidepass import side_forwards
from ..hooks.unembed import project
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["VISTA", "VISTAConfig", "default_sla_layers", "self_logits_augmentation", "steer", "steer_unit"]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def default_sla_layers(n_layers: int) -> list[int]:
    """``round(25 L/32) .. round(30 L/32)``, inclusive, end capped at ``L - 2`` (25..30 for 32 layers)."""
    end = max(0, min(_round_half_up(30 * n_layers / 32), n_layers - 2))
    start = min(_round_half_up(25 * n_layers / 32), end)
    return list(range(start, end + 1))


def steer(out: Tensor, v: Tensor, lam: float, adaptive: bool = True) -> Tensor:
    """VSV's edit of MLP outputs ``out`` ``[n, q, D]`` toward ``v`` ``[n, D]`` (one vector per row), at constant norm.

    ``c = 1 + max(0, cos(m, -v))`` (1 when not ``adaptive``), ``m' = ||m|| normalize(normalize(m) + lam c
    normalize(v))``, computed in fp32 and returned in ``out``'s dtype.
    """
    return steer_unit(out, torch.nn.functional.normalize(v.float(), dim=-1), lam, adaptive)


def steer_unit(out: Tensor, unit: Tensor, lam: float, adaptive: bool = True) -> Tensor:
    """:func:`steer` with ``normalize(v)`` given (``[n, D]`` fp32; zero rows for a zero vector): the per-step form."""
    x = out.float()
    norm = x.norm(dim=-1, keepdim=True)
    direction = x / norm.clamp(min=1e-12)  # normalize(m)
    unit = unit[:, None, :]  # [n, 1, D]: the row's direction at every position
    if adaptive:  # c = 1 + max(0, cos(m, -v)) = 1 + max(0, -normalize(m) . normalize(v))
        c = 1.0 - (direction @ unit.transpose(1, 2)).clamp(max=0.0)  # [n, q, 1]
        direction = direction + (lam * c) * unit
    else:
        direction = direction + lam * unit
    return (direction * (norm / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12))).to(out.dtype)


def self_logits_augmentation(final: Tensor, early: Tensor, alpha: float) -> Tensor:
    """SLA: ``(1 - alpha) final + alpha mean_k early[k]`` for ``final`` ``[n, V]`` and ``early`` ``[k, n, V]`` (fp32)."""
    return (1.0 - alpha) * final + alpha * early.mean(0)


def _reach(lvlm: LVLM) -> list[float]:
    """Per layer, how far back (in positions) the last token's output can have looked, through the layers up to
    it: unbounded after a layer with full attention, its window more after a sliding-window layer (generous by
    one position per layer, so that a token that can be seen is never taken for one that cannot)."""
    reach, out = 0.0, []
    for attention in lvlm.attention_modules:
        window = getattr(attention, "sliding_window", None)
        reach = reach + window if isinstance(window, int) and window > 0 else math.inf
        out.append(reach)
    return out


class _LastToken(Participant):
    """VISTA's unsteered forward: the raw layer outputs at the last position; stops after the last layer it needs."""

    def __init__(self, layers: frozenset[int]) -> None:
        self.layer_output_layers = layers
        self.last = max(layers)
        self.states: dict[int, Tensor] = {}

    def layer_output(self, hidden: Tensor, ctx: AttnContext) -> None:
        self.states[ctx.layer] = hidden[:, -1].to(torch.float32, copy=True)  # left padded: -1 is each row's last token
        if ctx.layer == self.last:
            raise StopForward  # the final norm and lm_head of every position are not needed


@dataclass(frozen=True, kw_only=True)
class VISTAConfig(MethodConfig):
    """VISTA's parameters."""

    lam: float = param(0.17, (
        "Steering strength lambda: each steered layer's MLP output m becomes ||m|| normalize(normalize(m) + "
        "lambda c normalize(v)), v the visual steering vector of the row and layer. 0 runs the steering and "
        "changes nothing. Default 0.17 (source: VISTA release, run_chair.sh --vsv-lambda 0.17; its POPE run, "
        "run_pope.sh, uses 0.01: set lam=0.01 for POPE as released)."), lo=0.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers whose MLP output is steered, 0-based, negative counting from the end; [] turns the "
        "steering off (and its unsteered forwards). None: every layer. Default None (source: VISTA release, "
        "--layers unset)."))
    simple_mode: bool = param(False, (
        "Drop the adaptive factor c = 1 + max(0, cos(m, -v)) (c = 1). Default False (source: VISTA release, "
        "llm_layers.py VSVLayer simple_mode=False)."))
    sla_alpha: float = param(0.3, (
        "Self-logits augmentation: next-token logits (1 - alpha) l + alpha * mean of lm_head of the raw outputs of "
        "sla_layers; 0 runs it and changes nothing. Default 0.3 (source: VISTA release, --logits-alpha 0.3, every "
        "script)."), lo=0.0, hi=1.0)
    sla_layers: tuple[int, ...] | None = param(None, (
        "Layers whose early exits are averaged, 0-based, negative counting from the end (the release's range "
        "'25,30' is [25,26,27,28,29,30]); [] turns the augmentation off. None: round(25L/32)..round(30L/32), "
        "the end capped at L-2, i.e. 25..30 of 32. Default None (source: VISTA release, --logits-layers 25,30)."))
    sla_final_norm: bool = param(False, (
        "Apply the final norm to the early layers' outputs before lm_head. Default False (source: VISTA release, "
        "llava_llama.py, lm_head on the raw hidden states)."))

    @classmethod
    def noop(cls) -> VISTAConfig:
        """No steered layer and no augmented layer: nothing is installed, no unsteered forward runs."""
        return cls(layers=(), sla_layers=())

    @classmethod
    def math_identity(cls) -> VISTAConfig:
        """``lam = 0`` (the unsteered forwards run, m' = ||m|| normalize(normalize(m)) = m up to rounding) and
        ``sla_alpha = 0`` (the early exits are computed and weighted 0: the final logits exactly)."""
        return cls(lam=0.0, sla_alpha=0.0)


@register_method
class VISTA(Intervention):
    """VISTA: MLP outputs steered toward the row's visual vector, logits mixed with early exits."""

    name = "vista"
    stage = Stage.MLP_OUTPUTS  # its augmentation edits the logits in the same forward, in composition order
    config_cls = VISTAConfig
    config: VISTAConfig

    def __init__(self, config: VISTAConfig | None = None) -> None:
        super().__init__(config)
        self.sla_layers: list[int] = []
        self._vectors: dict[int, Tensor] = {}  # layer -> [n, D] fp32, the rows' steering vectors of this sequence
        self._units: dict[int, Tensor] = {}  # layer -> the same normalised (zero rows stay zero)
        self._first = -1  # the first steered layer: counts the steered forwards
        self._early: dict[int, Tensor] = {}  # layer -> [n, D], this forward's raw outputs at the last position
        self._head: Any = None
        self._norm: Any = None
        self._softcap: float | None = None
        self.counts = {"steered_forwards": 0, "augmented_forwards": 0}
        self._norms: list[float] = []  # per row: the mean over steered layers of ||v^l||, for the report

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        c = self.config
        self.mlp_layers = resolve_layers(c.layers, range(n), n)
        self._first = min(self.mlp_layers, default=-1)
        self.sla_layers = sorted(resolve_layers(c.sla_layers, default_sla_layers(n), n, name="sla_layers"))
        self.layer_output_layers = frozenset(self.sla_layers)
        self.edits_logits = self.shares_unembedding = bool(self.sla_layers)
        self._shared: Tensor | None = None  # this forward's early logits from the model's own lm_head call
        if self.edits_logits:
            self._head = lvlm.lm_head
            self._norm = lvlm.final_norm if c.sla_final_norm else None
            cap = getattr(lvlm.text_config, "final_logit_softcapping", None)
            self._softcap = float(cap) if cap else None

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        if self.mlp_layers and generation_config.use_cache is False:
            # Without a cache every step is a new prefill of the grown sequence: the vector would be recomputed
            # from the last generated token instead of the prompt's last token.
            raise LvlmFixError("vista computes its steering vectors once from the prompt, which needs generate()'s "
                               "KV cache; drop use_cache=False")
        static = static_cache(generation_config, model_kwargs)
        if self.mlp_layers and static:
            # Its unsteered forward of the rows with and without their image is built from the prefill's inputs,
            # which a static cache pads to the cache's capacity: the rows' last tokens would not be found.
            raise LvlmFixError(f"vista does not support static caches ({static}); use the default dynamic cache "
                               "(drop cache_implementation)")

    def begin(self, tokens: Any) -> None:
        self._early, self._shared = {}, None

    def before_prefill(self, lvlm: LVLM, model_kwargs: dict[str, Any]) -> None:
        self._vectors, self._units = {}, {}
        if not self.mlp_layers:
            return
        if model_kwargs.get("input_ids") is None:
            raise LvlmFixError("vista needs the model to be called with input_ids= as a keyword argument")
        states = []
        # Two forwards, the rows and the same rows without their image tokens at their own (much shorter) width:
        # batched, the image-free rows would be padded to the image rows' width and cost as much as they do.
        for batch in side_forwards(lvlm, model_kwargs, rows_without_images(lvlm, model_kwargs)):
            reader = _LastToken(self.mlp_layers)
            try:
                # Its own plan: the plan in progress (this steering included) is dormant for this forward.
                with torch.no_grad(), Plan(lvlm, [reader]).active(inner=True):
                    lvlm.model(**batch, use_cache=False)
            except StopForward:
                pass
            if set(reader.states) != set(self.mlp_layers):
                raise LvlmFixError("vista's unsteered forward did not reach every steered layer "
                                   f"(missing {sorted(self.mlp_layers - set(reader.states))})")
            states.append(reader.states)
        # v^l = h^l(with image) - h^l(without), at each row's last token: the mean difference (the release's
        # one-row PCA adds a zero matrix's singular vector, dropped here).
        self._vectors = {layer: h - states[1][layer] for layer, h in states[0].items()}
        # Where the last token cannot see any image token yet (no image, or sliding windows that do not reach it),
        # v is zero in exact arithmetic and rounding noise in practice: normalize() would give it a random
        # direction, so it is set to zero (no steering there).
        image = lvlm.image_token_mask(model_kwargs["input_ids"])
        cols = torch.arange(1, image.shape[1] + 1, device=image.device)
        after = (image.shape[1] - (image * cols).amax(1)).float()  # positions from the last image token to the end
        after[~image.any(1)] = math.inf  # a row without an image sees none at any layer
        for layer, reach in zip(range(lvlm.num_layers), _reach(lvlm)):
            if layer in self._vectors:
                blind = (after > reach).to(self._vectors[layer].device)
                self._vectors[layer][blind] = 0.0
        self._norms = torch.stack([v.norm(dim=-1) for v in self._vectors.values()]).mean(0).tolist()
        self._units = {layer: torch.nn.functional.normalize(v, dim=-1) for layer, v in self._vectors.items()}

    def mlp_output(self, out: Tensor, x: Tensor, ctx: AttnContext) -> Tensor | None:
        v = self._units.get(ctx.layer)
        if v is None:
            raise LvlmFixError("vista has no steering vector for this forward: its prefill did not run in this plan; "
                               "call the model on the whole prompt first (generate() does)")
        if v.shape[0] != out.shape[0]:
            raise LvlmFixError(f"vista computed steering vectors for {v.shape[0]} rows but the forward has "
                               f"{out.shape[0]}; start a new generate() call for a new batch")
        if v.device != out.device:
            v = self._units[ctx.layer] = v.to(out.device)
        if ctx.layer == self._first:
            self.counts["steered_forwards"] += 1
        return steer_unit(out, v, self.config.lam, adaptive=not self.config.simple_mode)

    def layer_output(self, hidden: Tensor, ctx: AttnContext) -> None:
        self._early[ctx.layer] = hidden[:, -1].clone()  # the last position: the only one whose logits are mixed

    def unembed_rows(self, last: Tensor, ctx: AttnContext) -> Tensor:
        return self._exit_rows()

    def _exit_rows(self) -> Tensor:
        """This forward's early-exit rows ``[k n, D]``, layer-major (normed when ``sla_final_norm``)."""
        h = torch.cat([self._early.pop(i) for i in self.sla_layers])
        return h if self._norm is None else self._norm(h)

    def unembedded(self, logits: Tensor, ctx: AttnContext) -> None:
        self._shared = logits

    def logits(self, last: Tensor, ctx: AttnContext) -> Tensor | None:
        if ctx.phase == "decode" and ctx.q_len > 1:
            raise LvlmFixError(f"vista augments one new token per row and forward, got {ctx.q_len}; drop "
                               "assistant_model / prompt_lookup_num_tokens")
        shared, self._shared = self._shared, None
        if shared is None:  # the model's lm_head call did not take the rows: one product of the k layers here
            shared = project(self._head, self._exit_rows().to(self._head.weight.device))
        early = shared.reshape(len(self.sla_layers), last.shape[0], -1).float()  # [k, n, V]
        if self._softcap is not None:
            early = torch.tanh(early / self._softcap) * self._softcap
        self.counts["augmented_forwards"] += 1
        return self_logits_augmentation(last, early.to(last.device), self.config.sla_alpha)

    def end(self) -> None:
        self._vectors, self._units, self._early = {}, {}, {}

    def summarize(self, report: dict[str, Any]) -> str:
        parts = []
        if report["layers"]:
            norms = ", ".join(f"{x:.3g}" for x in report["vector_norm"])
            parts.append(f"MLP outputs of {len(report['layers'])} layers steered (lam {report['lam']:g}; "
                         f"mean ||v|| per row: {norms})")
        if report["sla_layers"]:
            parts.append(f"logits mixed with layers {report['sla_layers']} (alpha {report['sla_alpha']:g})")
        return "; ".join(parts) or "nothing installed"

    def report(self) -> dict[str, Any]:
        c = self.config
        return {"lam": c.lam, "simple_mode": c.simple_mode, "layers": sorted(self.mlp_layers),
                "sla_alpha": c.sla_alpha, "sla_layers": list(self.sla_layers), "sla_final_norm": c.sla_final_norm,
                "vector_norm": list(self._norms), **self.counts}
