"""The one attention function lvlm-fix registers with transformers' ``AttentionInterface``.

Only the text decoder is switched to it (``set_attn_implementation`` with a per-sub-config
dict), so the vision tower keeps its own attention. What it does depends on the plan active on
*the module's own model* (:class:`PlanSeat`, found through the module, so a plan never acts on
another model that shares this function):

* no plan, or a layer the plan neither edits nor reads: the stock sdpa function, untouched;
* a layer the plan *reads* (``observed_layers``): sdpa for the output, plus the fp32 attention
  row of the last query, handed to the plan's ``observe`` callbacks (statistics never keep the
  full ``[b, h, q, k]`` map);
* a layer the plan *edits* (``eager_layers``): eager math in fp32, with the plan's pre-softmax
  and post-softmax callbacks in between.

The mask function registered beside it is sdpa's, so the passthrough gets exactly the mask
stock sdpa would get (``None`` for an unpadded causal prefill, boolean otherwise); the eager
path turns that mask into the additive form itself.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import LvlmFixError

if TYPE_CHECKING:
    from torch import Tensor

    from .plan import Plan

ATTN_NAME = "lvlm_fix"
# Attention arguments that change the math and that the eager path does not apply (attention sinks,
# logit soft-capping, additive position bias): a layer that receives one cannot be edited exactly.
_NOT_IN_EAGER = ("s_aux", "sinks", "softcap", "position_bias")
SEAT_ATTR = "_lvlm_fix_seat"  # instance attribute of a text-decoder attention module: (PlanSeat, layer index)


class PlanSeat:
    """Where the active plan of one model is found, by that model's attention modules and hooks.

    ``current`` is a ``ContextVar``: each thread sees its own value, so VHR's text-only stream can
    run its own plan on the same model from its side thread while the caller's plan waits. The
    seat is installed on the text decoder's attention modules (``SEAT_ATTR``, with the module's
    layer index) when the first plan of the model becomes active, and removed when the last one
    leaves: a model with no active plan carries no lvlm-fix attribute, and the attention
    function's no-plan path is one dictionary look-up.

    ``owners`` counts the outer plans (not a side stream's ``inner`` one) per thread: one model
    serves the calls of one thread at a time (see :func:`acquire_seat`).
    """

    def __init__(self, model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> None:
        self.model = model
        self.modules = attention_modules
        self.current: ContextVar[Plan | None] = ContextVar("lvlm_fix_plan", default=None)
        self.users = 0
        self.owners: dict[int, int] = {}  # thread ident -> outer plans of that thread now active


_SEATS_LOCK = threading.Lock()  # plans may enter and leave from several threads (side streams, user threads)


def acquire_seat(model: torch.nn.Module, attention_modules: list[torch.nn.Module], inner: bool = False) -> PlanSeat:
    """The model's seat, installed on its attention modules if no plan of the model is active yet.

    Raises:
        LvlmFixError: an outer plan of another thread is active on ``model``. The plans themselves
            would keep apart (``current`` is per thread), but the forwards would not: the side
            streams' lock step, a contrast stream's own forwards, the attention implementation
            switched back on exit and the tokenizer's padding side assume one caller per model.
    """
    me = threading.get_ident()
    with _SEATS_LOCK:  # check and claim in one step: two threads entering at once cannot both pass
        seat = model.__dict__.get(SEAT_ATTR)
        if not inner and seat is not None and any(t != me for t in seat.owners):
            raise LvlmFixError("another thread is already running a method on this model; one model serves one "
                               "thread at a time: run the calls one after another, or load the model once per thread")
        if seat is None:
            seat = PlanSeat(model, attention_modules)
            for i, m in enumerate(attention_modules):
                m.__dict__[SEAT_ATTR] = (seat, i)  # __dict__: plain attribute, not a registered submodule
            model.__dict__[SEAT_ATTR] = seat
        seat.users += 1
        if not inner:
            seat.owners[me] = seat.owners.get(me, 0) + 1
        return seat


def release_seat(seat: PlanSeat, inner: bool = False) -> None:
    """Undo one :func:`acquire_seat` (same ``inner``, same thread); the last one removes the seat from the model."""
    with _SEATS_LOCK:
        seat.users -= 1
        if not inner:
            me = threading.get_ident()
            seat.owners[me] -= 1
            if not seat.owners[me]:
                del seat.owners[me]
        if seat.users == 0:
            for m in seat.modules:
                m.__dict__.pop(SEAT_ATTR, None)
            seat.model.__dict__.pop(SEAT_ATTR, None)


def active_plan(model: torch.nn.Module) -> Plan | None:
    """The plan active on ``model`` in this thread, or None."""
    seat = model.__dict__.get(SEAT_ATTR)
    return seat.current.get() if seat is not None else None


# transformers' sdpa path, bound by register(): importing transformers at module import would
# make `lvlm-fix --help` slow, and the attention function only runs after register().
sdpa_attention_forward = repeat_kv = None


def register() -> None:
    """Register the attention function and its mask function (idempotent).

    The mask registration is not optional: a custom attention name without a mask function
    gets *no* mask from transformers, which silently makes prefill bidirectional.
    """
    global sdpa_attention_forward, repeat_kv
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    sdpa_attention_forward, repeat_kv = sdpa_attention.sdpa_attention_forward, sdpa_attention.repeat_kv
    AttentionInterface.register(ATTN_NAME, lvlm_fix_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def additive_mask(
    attention_mask: Tensor | None, q_len: int, k_len: int, is_causal: bool, device: torch.device
) -> Tensor | None:
    """The ``[b|1, 1, q, k]`` fp32 additive mask equivalent to what sdpa was given, or None.

    sdpa reads ``mask=None`` with ``q > 1`` as an upper-left causal mask (``is_causal=True``);
    fully masked rows (left padding) get the dtype minimum rather than -inf, as in HF eager,
    so they stay finite.
    """
    neg = torch.finfo(torch.float32).min
    if attention_mask is None:
        if q_len > 1 and is_causal:
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
            return torch.zeros(1, 1, q_len, k_len, device=device).masked_fill(~causal, neg)
        return None
    mask = attention_mask[..., :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, neg)
    return mask.float().clamp(min=neg)


def key_padding(attention_mask: Tensor, length: int) -> Tensor:
    """``[b, length]`` True where a key is not padding.

    From the usual 2D mask, or from a 4D one (generate() builds one for static caches): its last
    query row, which every earlier key of the row is visible to unless it is padding.
    """
    if attention_mask.dim() == 2:
        return attention_mask[:, :length].bool()
    row = attention_mask[:, 0, -1, :length]
    return row if row.dtype == torch.bool else row == 0


def _attention_probs(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """fp32 softmax(q k^T * scaling + mask); query ``[b, h, q, d]``, key ``[b, h, k, d]``."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [b, h, q, k]
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


def lvlm_fix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Drop-in attention: ``query [b, h, q, d]``, ``key/value [b, h_kv, k, d]`` (after RoPE and cache)."""
    seat = module.__dict__.get(SEAT_ATTR)  # None unless a plan of this module's model is active
    plan = seat[0].current.get() if seat is not None else None
    if plan is None or not plan.touches(layer := seat[1]):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    extra = [k for k in _NOT_IN_EAGER if kwargs.get(k) is not None]
    if extra:  # sdpa would take these; the eager math below would silently drop them
        raise LvlmFixError(f"the attention of layer {layer} passes {extra[0]!r}, which lvlm-fix's eager path does not "
                           "implement; this model cannot be edited at that layer")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
    n_rep = query.shape[1] // key.shape[1]
    ctx = plan.context(layer, q_len=q_len, k_len=k_len, device=query.device)

    if layer not in plan.eager_layers:
        # Read-only layer: sdpa computes the output; only the last query's row is recomputed.
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        mask = additive_mask(attention_mask, q_len, k_len, is_causal, query.device)
        last = _attention_probs(query[:, :, -1:], repeat_kv(key, n_rep), None if mask is None else mask[..., -1:, :], scaling)
        plan.observe(last[:, :, 0], ctx)
        return out, None

    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    mask = additive_mask(attention_mask, q_len, k_len, is_causal, query.device)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)  # [b, h, q, k]
    if mask is not None:
        scores.add_(mask)  # in place: this runs per edited layer and step
    scores = plan.pre_softmax(scores, ctx)
    probs = scores.softmax(dim=-1)  # [b, h, q, k], fp32
    probs = plan.post_softmax(probs, ctx)
    if layer in plan.observed_layers:
        plan.observe(probs[:, :, -1], ctx)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # [b, h, q, d]
    return out.transpose(1, 2).contiguous(), probs
