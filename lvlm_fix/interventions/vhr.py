"""VHR: Vision-aware Head Reinforcement, heads selected by the VHD metric (He et al., ACL 2025).

Per sample, heads whose output at the last prompt position changes most when the image tokens
are removed (VHD, Eq. 4) are "vision-aware"; VHR multiplies the top half of them (VHD above
the layer's median, after the outlier filter of Eq. 6) by ``alpha`` in the reinforced layers.

The selection is the paper's layer-by-layer strategy, done inside the real prefill. Beside it,
the same prompts with the image tokens deleted run as a short forward of their own (the
text-only stream, :class:`~lvlm_fix.hooks.sidepass.SidePass`), in lock step: at each reinforced
layer, in order, the VHD of every head is computed at the last prompt position (image row ``b``
against text-only row ``b``), the heads are selected, and both streams are reinforced at once, so
a later layer's VHD is measured on the model already reinforced at the earlier layers. The
text-only stream stops after the last reinforced layer. The selected heads are then frozen for
the whole generation and scaled at every position of every forward (the prompt too, so the KV
cache comes from the reinforced model). The image rows are computed once, and the text-only
stream only at its own length: VHR's irreducible extra work.

Choices where the paper is silent and the official code could not be read (it is not public in a
form we could obtain): the text-only stream deletes exactly the image tokens and keeps every
other token of the prompt; it is reinforced at the earlier layers like the image stream (the
"same edited model" reading of "layer by layer"); the outlier filter's std is torch's default,
Bessel-corrected (n - 1) — with 32 heads a population std (n) would move the threshold by 1.6% of
a std; rows of a batch select their heads independently (the paper assumes batch size 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError
from ..hooks.plan import AttnContext, Participant, Plan
from ..hooks.sidepass import SidePass, run_batched, side_stream_mode
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["VHR", "VHRConfig", "default_layers", "head_divergence", "outlier_filter", "select_heads", "text_only_inputs"]

# Generation-internal forward arguments: the text-only stream's generate() rebuilds its own.
_DROP = frozenset({
    "cache", "past_key_values", "cache_position", "position_ids", "use_cache", "logits_to_keep",
    "num_logits_to_keep", "return_dict", "output_attentions", "output_hidden_states", "labels", "inputs_embeds",
})


def default_layers(n_layers: int) -> list[int]:
    """``{1}`` and the last ``round(14/32 * n_layers)`` layers (``{1, 18..31}`` for 32 layers).

    Rounding is half up (40 layers -> the last 18), and at least one layer is taken.
    """
    k = max(1, math.floor(14 * n_layers / 32 + 0.5))
    return sorted({i for i in (1,) if i < n_layers} | set(range(max(0, n_layers - k), n_layers)))


def head_divergence(with_image: Tensor, text_only: Tensor) -> Tensor:
    """VHD (Eq. 4): ``||a_h - b_h||_2`` per head, in fp32. Inputs ``[..., h, d]`` -> ``[..., h]``."""
    return (with_image.float() - text_only.float()).norm(dim=-1)


def outlier_filter(vhd: Tensor, text_norm_sq: Tensor) -> Tensor:
    """Zero the VHD of heads that are outliers in both VHD and text-only norm (Eq. 6).

    Args:
        vhd: ``[..., h]`` head divergences.
        text_norm_sq: ``[..., h]`` squared norm of the text-only head output (``TA``).

    The threshold is mean + std over the heads of the layer, std Bessel-corrected (torch's
    default; see the module docstring).
    """
    hi_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
    hi_ta = text_norm_sq > text_norm_sq.mean(-1, keepdim=True) + text_norm_sq.std(-1, keepdim=True)
    return vhd.masked_fill(hi_vhd & hi_ta, 0.0)


def select_heads(with_image: Tensor, text_only: Tensor, use_filter: bool = True) -> tuple[Tensor, Tensor]:
    """VHR's head selection for one layer, per row: VHD, outlier filter, VHD > median.

    Args:
        with_image: ``[n, h, d]`` per-head outputs (before ``o_proj``) at the last prompt position.
        text_only: ``[n, h, d]`` the same with the image tokens removed.
        use_filter: apply the outlier filter (Eq. 6): zero the VHD of heads whose VHD *and*
            text-only squared norm both exceed mean + std over the layer's heads.

    Returns:
        ``(selected [n, h] bool, vhd [n, h] fp32 after the filter)``. ``selected`` is
        ``VHD > median`` over heads (Eq. 7). torch's lower median and the averaged median pick the
        same set (an entry above the lower middle value is at least the upper one).
    """
    vhd = head_divergence(with_image, text_only)
    if use_filter:
        vhd = outlier_filter(vhd, text_only.float().pow(2).sum(-1))
    return vhd > vhd.median(dim=-1, keepdim=True).values, vhd


def text_only_inputs(lvlm: LVLM, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The text-only stream's ``generate()`` inputs, built from the prefill's forward arguments.

    Row ``b`` is the prefill's row ``b`` with its image tokens deleted (:meth:`LVLM.text_only`),
    at its own length. Cache and generation-internal arguments (position ids included) are
    dropped: ``generate()`` rebuilds them for these rows.
    """
    if model_kwargs.get("input_ids") is None:
        raise LvlmFixError("vhr needs the model to be called with input_ids= as a keyword argument")
    inputs = {k: v for k, v in model_kwargs.items() if k not in _DROP and v is not None}
    return lvlm.text_only(inputs)


class _TextStream(Participant):
    """The text-only stream's participant: hand each reinforced layer's heads over, apply the choice.

    At each reinforced layer it pauses with its heads at the last prompt position; the image
    stream answers with the heads selected from both, and both streams scale them by ``alpha``.
    """

    def __init__(self, layers: frozenset[int], side: SidePass, alpha: float) -> None:
        self.head_output_layers = layers
        self.side, self.alpha = side, alpha

    def head_output(self, heads: Tensor, ctx: AttnContext) -> Tensor:  # [n, q, h, d]
        selected = self.side.pause(heads[:, -1])
        return heads * torch.where(selected, self.alpha, 1.0).to(heads.device, heads.dtype)[:, None, :, None]


@dataclass(frozen=True, kw_only=True)
class VHRConfig(MethodConfig):
    """VHR's parameters."""

    alpha: float = param(2.0, (
        "Factor multiplying the outputs of the selected vision-aware heads (per-head output before "
        "o_proj), at every position and step. 1.0 runs the selection and changes nothing; the paper's "
        "Table 6 shows the output degenerating at 4.0. "
        "Default 2.0 (source: VHR paper §4.4 and Table 6; official runner vhr_aug_ratio)."), lo=0.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers to reinforce, 0-based, negative counting from the end; [] for none (the method "
        "then installs nothing). None: {1} and the last round(14/32 * L) layers, i.e. {1, 18..31} on a "
        "32-layer model, scaled to the model's depth (rounding half up). Default None (source: VHR paper "
        "§4.4 and Table 5; official runner vhr_layers=[1]+list(range(32))[-14:])."))
    outlier_filter: bool = param(True, (
        "Before taking the heads with VHD above the layer's median, zero the VHD of heads that are "
        "outliers (above mean + std over the layer's heads) in both VHD and text-only output norm. "
        "Default True (source: VHR paper §3.2 Eq. 6 and Table 4; official runner vhr_filter)."))

    @classmethod
    def noop(cls) -> VHRConfig:
        """No layer: no hook, no text-only stream."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> VHRConfig:
        """``alpha=1``: the text-only stream runs and heads are selected and scaled by 1 on every layer."""
        return cls(alpha=1.0)


@register_method
class VHR(Intervention):
    """Vision-aware head reinforcement: per-sample head selection by VHD, heads scaled by alpha."""

    name = "vhr"
    stage = Stage.HEAD_OUTPUTS
    config_cls = VHRConfig
    config: VHRConfig

    def __init__(self, config: VHRConfig | None = None) -> None:
        super().__init__(config)
        self.layers: frozenset[int] = frozenset()
        self.selected: dict[int, Tensor] = {}  # layer -> [b, h] bool, frozen from the prefill
        self.vhd: dict[int, Tensor] = {}  # layer -> [b, h] VHD after the filter
        self._scale: dict[int, Tensor] = {}  # layer -> [b, 1, h, 1] factor
        self._flat: dict[int, Tensor] = {}  # layer -> the same on the flat o_proj input, [b, 1, h*d]
        # layer -> d, read off the prefill's per-head outputs: the config's head_dim is not always one number
        # (Gemma 4's differs between its sliding and global layers, and reading it raises)
        self._head_dims: dict[int, int] = {}
        self._text: SidePass | None = None  # the text-only stream, open during the prefill
        self._reply: Tensor | None = None  # the heads selected at the text stream's last pause

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        self.layers = self.head_output_layers = resolve_layers(self.config.layers, default_layers(n), n)

    def before_prefill(self, lvlm: LVLM, model_kwargs: dict[str, Any]) -> None:
        self.end()
        self.selected, self.vhd, self._scale, self._flat = {}, {}, {}, {}
        if not self.head_output_layers:
            return
        inputs = text_only_inputs(lvlm, model_kwargs)
        if side_stream_mode(lvlm) == "batched":  # no side thread: both streams in one prefill of their own, now
            run_batched(lvlm, model_kwargs, inputs, self.head_output_layers, self._choose)
            return

        def run() -> None:  # on the side thread, from the first resume()
            stream = _TextStream(self.head_output_layers, side, self.config.alpha)
            with Plan(lvlm, [stream]).active(inner=True):
                lvlm.model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=1)

        side = self._text = SidePass(run, name="vhr text-only stream")

    def end(self) -> None:
        if self._text is not None:
            self._text.close()
        self._text, self._reply = None, None

    def _choose(self, layer: int, with_image: Tensor, text_only: Tensor) -> Tensor:
        """Select ``layer``'s heads from both streams' last-position heads ``[n, h, d]``; the ``[n, h]`` factor."""
        selected, vhd = select_heads(with_image, text_only, self.config.outlier_filter)
        self.selected[layer], self.vhd[layer] = selected, vhd
        factor = torch.where(selected, self.config.alpha, 1.0).to(with_image.dtype)
        self._scale[layer] = factor[:, None, :, None]
        return factor

    def _select(self, heads: Tensor, layer: int) -> Tensor:
        """This layer's selection in the prefill, in lock step with the text-only stream; the scale."""
        text = self._text.resume(self._reply)  # [n, h, d]: its heads at this layer
        if text.shape[0] != heads.shape[0]:
            raise LvlmFixError(f"vhr's text-only stream has {text.shape[0]} rows but the prefill {heads.shape[0]}")
        self._choose(layer, heads[:, -1], text)
        self._reply = self.selected[layer]
        if layer == max(self.head_output_layers):
            self.end()  # the text-only stream is needed no further
        return self._scale[layer]

    def head_output(self, heads: Tensor, ctx: AttnContext) -> Tensor | None:  # [b, q, h, d]
        self._head_dims[ctx.layer] = heads.shape[-1]  # for head_scale: the width this layer's heads have
        if self._text is not None:
            if ctx.step == 0:
                return heads * self._select(heads, ctx.layer)
            self.end()
            raise LvlmFixError("vhr's prefill did not reach every reinforced layer, so no head was selected at "
                               f"layers {sorted(self.head_output_layers - set(self.selected))}")
        scale = self._scale.get(ctx.layer)
        if scale is None:
            return None
        if scale.shape[0] != heads.shape[0]:
            raise LvlmFixError(
                f"vhr selected heads for {scale.shape[0]} rows but the forward has {heads.shape[0]}; "
                "start a new generate() call for a new batch")
        if scale.dtype != heads.dtype or scale.device != heads.device:
            scale = self._scale[ctx.layer] = scale.to(heads.device, heads.dtype)
        return heads * scale

    def head_scale(self, ctx: AttnContext) -> Tensor | None:
        """After the selection, the frozen factor on the flat o_proj input ``[b, 1, h*d]``: the same
        products as :meth:`head_output`'s, without the per-head view (one op per layer and step)."""
        scale = self._scale.get(ctx.layer) if self._text is None else None
        if scale is None or scale.shape[0] != ctx.image_end.shape[0] or scale.device != ctx.image_end.device:
            return None  # the prefill's selection, a layer not reached, another batch or device: head_output
        flat = self._flat.get(ctx.layer)
        if flat is None:  # [b, 1, h, 1] -> [b, 1, h*d], once per layer and sequence
            width = self._head_dims.get(ctx.layer)
            if width is None:  # head_output has not seen this layer's heads yet: it serves this step
                return None
            flat = self._flat[ctx.layer] = scale.expand(-1, -1, -1, width).flatten(2)
        return flat

    def summarize(self, report: dict[str, Any]) -> str:
        heads = report.get("selected_heads", {})
        if not heads:
            return f"no head selected (layers {report.get('layers')}, alpha {report.get('alpha')})"
        rows = len(next(iter(heads.values())))
        per_layer = ", ".join(f"L{layer}: {','.join(map(str, sel[0])) or '-'}" for layer, sel in heads.items())
        return (f"heads x{report['alpha']:g} by layer{' (row 1 of ' + str(rows) + ')' if rows > 1 else ''}: "
                f"{per_layer}")

    def report(self) -> dict[str, Any]:
        """Selected heads per layer per row of the last prefill (beam rows counted as rows)."""
        layers = sorted(self.selected)
        return {
            "alpha": self.config.alpha,
            "layers": sorted(self.layers),
            "outlier_filter": self.config.outlier_filter,
            "selected_heads": {
                str(layer): [torch.nonzero(row).flatten().tolist() for row in self.selected[layer].cpu()]
                for layer in layers
            },
            "vhd": {str(layer): self.vhd[layer].cpu().tolist() for layer in layers},
        }
