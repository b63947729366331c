"""The one attention function lvlm-fix registers with transformers' ``AttentionInterface``.

Only the text decoder is switched to it (``set_attn_implementation`` with a per-sub-config
dict), so the vision tower keeps its own attention. What it does depends on the plan active on
*the module's own model* (:class:`PlanSeat`, found through the module, so a plan never acts on
another model that shares this function):

* no plan, or a layer the plan neither edits nor reads: the stock sdpa function, untouched;
* a layer the plan *reads* (``observed_layers``): sdpa for the output, plus the fp32 attention
  row of the last query, handed to the plan's ``observe`` callbacks (statistics never keep the
  full ``[b, h, q, k]`` map); at ``value_layers``, that row with the layer's values (after the
  cache update) goes to ``observe_values``;
* a layer the plan *edits* (``eager_layers``): eager math in fp32, with the plan's pre-softmax
  and post-softmax callbacks in between. The fp32 working set is bounded: when the ``[b, h, q, k]``
  map exceeds :func:`block_bytes` (long prefills), the queries are processed in chunks, each
  against the keys it may see, in two passes where a participant needs column statistics (the
  contract is on :class:`~lvlm_fix.hooks.plan.Participant`). The result equals the unchunked math.

The mask function registered beside it is sdpa's, so the passthrough gets exactly the mask
stock sdpa would get (``None`` for an unpadded causal prefill, boolean otherwise); the eager
path turns that mask into the additive form itself.

``generate(output_attentions=True)``: every layer returns its weights, computed as the eager path
computes them (fp32 softmax, whole map, never in query chunks), the edited ones after the edit;
sdpa has none to give. A static cache hands every layer its whole capacity of keys: the slots past
the sequence's length are masked, and the plan's context marks them neither image keys nor valid
keys (:meth:`~lvlm_fix.hooks.plan.Plan.context`), so no statistic counts them. Under
``torch.compile`` the plan is found without ``ContextVar.get``, which dynamo cannot trace
(:meth:`PlanSeat.plan`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import LvlmFixError

if TYPE_CHECKING:
    from torch import Tensor

    from .plan import AttnContext, Plan

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

    ``traced`` mirrors the value last set through :meth:`set`, for :meth:`plan` under ``torch.compile``:
    dynamo cannot trace ``ContextVar.get`` (every call would be a graph break, and the code after
    it, specialised per layer index, would exhaust the recompile limit at the ninth layer). A
    compiled forward runs in one thread, and side streams refuse compiled models
    (:func:`~lvlm_fix.hooks.sidepass.side_stream_mode`), so there the mirror is the thread's value.
    """

    def __init__(self, model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> None:
        self.model = model
        self.modules = attention_modules
        self.current: ContextVar[Plan | None] = ContextVar("lvlm_fix_plan", default=None)
        self.traced: Plan | None = None
        self.users = 0
        self.owners: dict[int, int] = {}  # thread ident -> outer plans of that thread now active

    def plan(self) -> Plan | None:
        """The plan active in this thread (the mirror while dynamo traces)."""
        if torch.compiler.is_compiling():
            return self.traced
        return self.current.get()

    def set(self, plan: Plan | None) -> tuple[object, Plan | None]:
        """Make ``plan`` this thread's plan; the token undoes it (:meth:`reset`)."""
        token = (self.current.set(plan), self.traced)
        self.traced = plan
        return token

    def reset(self, token: tuple[object, Plan | None]) -> None:
        self.current.reset(token[0])
        self.traced = token[1]


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
    return seat.plan() if seat is not None else None


# The fp32 block an edited layer may hold per query chunk ([b, h, chunk, k] scores or probabilities;
# the callbacks keep a few such blocks alive at once). On the CPU small blocks are also the fast
# ones: they stay in cache and below glibc's mmap threshold, so every chunk reuses the same pages
# (a 300 MB map costs more in page faults than in arithmetic). On a GPU larger blocks amortise
# kernel launches against memory that the weights dwarf anyway; other accelerators count as one.
BLOCK_ENV = "LVLM_FIX_ATTN_BLOCK_MB"
DEFAULT_BLOCK_MIB = {"cpu": 16, "cuda": 256}


def block_bytes(plan: Plan, device: torch.device) -> int:
    """Bytes of one fp32 block at an edited layer: ``plan.block_bytes``, else ``$LVLM_FIX_ATTN_BLOCK_MB``
    (MiB, fractions allowed), else :data:`DEFAULT_BLOCK_MIB` for the device."""
    if plan.block_bytes is not None:
        return plan.block_bytes
    env = os.environ.get(BLOCK_ENV)
    if env:
        try:
            mib = float(env)
        except ValueError:
            mib = -1.0
        if not mib > 0:
            raise LvlmFixError(f"{BLOCK_ENV}={env!r}: give the attention block size in MiB, a number > 0 (e.g. 64)")
        return int(mib * 2**20)
    return DEFAULT_BLOCK_MIB.get(device.type, DEFAULT_BLOCK_MIB["cuda"]) * 2**20


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
    attention_mask: Tensor | None, q_len: int, k_len: int, is_causal: bool, device: torch.device,
    rows: tuple[int, int] | None = None,
) -> Tensor | None:
    """The ``[b|1, 1, q, k]`` fp32 additive mask equivalent to what sdpa was given, or None.

    sdpa reads ``mask=None`` with ``q > 1`` as an upper-left causal mask (``is_causal=True``);
    fully masked rows (left padding) get the dtype minimum rather than -inf, as in HF eager,
    so they stay finite. ``rows=(q0, q1)``: only those query rows.
    """
    neg = torch.finfo(torch.float32).min
    q0, q1 = rows or (0, q_len)
    if attention_mask is None:
        if q_len > 1 and is_causal:
            causal = torch.ones(q1 - q0, k_len, dtype=torch.bool, device=device).tril(q0)
            return torch.zeros(1, 1, q1 - q0, k_len, device=device).masked_fill(~causal, neg)
        return None
    mask = attention_mask[..., :k_len]
    if mask.shape[-2] > 1:
        mask = mask[..., q0:q1, :]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, neg)
    return mask.float().clamp(min=neg)


def key_padding(attention_mask: Tensor | dict[str, Tensor], length: int) -> Tensor:
    """``[b, length]`` True where a key is not padding.

    From the usual 2D mask, or from the 4D one (``[b, 1, q, k]``) that ``generate()`` builds for
    static caches, given per layer type (``{"full_attention": ..., "sliding_attention": ...}``)
    when the model has several. In a 4D mask, each query of the forward is one of the last ``q``
    of the ``length`` keys and sees itself unless it is padding: those keys are read on the
    diagonal, which a sliding window never hides (its last row would: a key older than the window
    is masked there, padding or not). Earlier keys are read on the last row (full attention).
    """
    if isinstance(attention_mask, dict):  # a static cache's masks per layer type: full attention if any
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
    if attention_mask.dim() == 2:
        return attention_mask[:, :length].bool()
    seen = attention_mask[:, 0, :, :length]  # [b, q, length]
    seen = seen if seen.dtype == torch.bool else seen == 0
    q = min(seen.shape[1], length)
    own = seen[:, -q:].diagonal(offset=length - q, dim1=-2, dim2=-1)  # query i against itself: [b, q]
    return torch.cat([seen[:, -1, : length - q], own], dim=-1)


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
    plan = seat[0].plan() if seat is not None else None
    # output_attentions=True: every layer returns its weights, as under attn_implementation="eager"
    # (sdpa has none to give); the map is then computed whole, never in query chunks.
    weights = bool(kwargs.get("output_attentions"))
    if plan is None or not plan.touches(layer := seat[1]):
        if weights:
            _refuse_extra(kwargs, "output_attentions=True")
            return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    _refuse_extra(kwargs, f"editing layer {layer}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = _is_causal(module, kwargs)
    n_rep = query.shape[1] // key.shape[1]
    ctx = plan.context(layer, q_len=q_len, k_len=k_len, device=query.device)

    if weights:  # the whole map, through the callbacks (a read-only layer's have nothing to edit)
        return _one_block(plan, ctx, module, query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), attention_mask,
                          scaling, is_causal, dropout)
    if layer not in plan.eager_layers:
        # Read-only layer: sdpa computes the output; only the last query's row is recomputed.
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        mask = additive_mask(attention_mask, q_len, k_len, is_causal, query.device, rows=(q_len - 1, q_len))
        last = _attention_probs(query[:, :, -1:], repeat_kv(key, n_rep), mask, scaling)
        if layer in plan.observed_layers:
            plan.observe(last[:, :, 0], ctx)
        if layer in plan.value_layers:
            plan.observe_values(last[:, :, 0], repeat_kv(value, n_rep), ctx)
        return out, None

    return _edited_attention(plan, ctx, module, query, repeat_kv(key, n_rep), repeat_kv(value, n_rep),
                             attention_mask, scaling, is_causal, dropout)


def _is_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    return kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)


def _refuse_extra(kwargs: dict, doing: str) -> None:
    """Refuse an attention argument that sdpa would take and the eager math here would silently drop."""
    extra = [k for k in _NOT_IN_EAGER if kwargs.get(k) is not None]
    if extra:
        raise LvlmFixError(f"this model's attention passes {extra[0]!r}, which lvlm-fix's eager path does not "
                           f"implement, so it cannot serve {doing}")


def _eager_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float, scaling: float | None, kwargs: dict) -> tuple[Tensor, Tensor]:
    """Unedited attention with its weights (the no-plan path of ``output_attentions=True``), fp32 as the edited path."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    mask = additive_mask(attention_mask, q_len, k_len, _is_causal(module, kwargs), query.device)
    probs = _attention_probs(query, repeat_kv(key, n_rep), mask, scaling)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, repeat_kv(value, n_rep).float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def _edited_attention(
    plan: Plan, ctx: AttnContext, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, scaling: float, is_causal: bool, dropout: float,
) -> tuple[Tensor, Tensor | None]:
    """Eager fp32 attention with the plan's callbacks; ``key``/``value`` already have every head.

    One block (short prompts, decode steps): the whole ``[b, h, q, k]`` map, as HF eager computes
    it, and it is returned as the attention weights. Otherwise query chunks of at most
    :func:`block_bytes` each (the weights are not returned: no full map exists):

    1. if a participant keeps column statistics at this layer, every chunk's scores and
       probabilities go to ``accumulate`` first;
    2. every chunk is then computed again and edited (``post_softmax``), except the chunks no
       participant edits (:meth:`Plan.edits`), which stock sdpa computes from the same rows of the mask.
    """
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    layer = ctx.layer
    # One query (a decode step) is always one block: the block size is not even read.
    if q_len == 1 or (step := max(1, plan.block_size(query.device) // (4 * b * h * k_len))) >= q_len:
        return _one_block(plan, ctx, module, query, key, value, attention_mask, scaling, is_causal, dropout)

    # Operands once per layer, fp32 and contiguous: the chunks' matmuls read them many times
    # (a strided [b, h, q, d] view of the projections' [b, q, h, d] halves the matmul speed).
    q32 = query.float().contiguous()
    key_t = key.float().transpose(-1, -2).contiguous()  # [b, h, d, k]: chunk keys are a prefix of columns
    v32 = value.float().contiguous()
    observed = layer in plan.observed_layers or layer in plan.value_layers  # the last query's row is read
    chunks = [(q0, min(q0 + step, q_len)) for q0 in range(0, q_len, step)]
    if layer in plan.column_stats_layers:  # statistics pass: every chunk seen before any is edited
        for q0, q1 in chunks:
            mask, kc = _chunk_mask(attention_mask, q0, q1, k_len, is_causal, query.device)
            cctx = _chunk_context(ctx, q0, q1, kc, stats_pass=True)
            scores = _chunk_scores(plan, cctx, q32, key_t, mask, scaling)
            plan.accumulate(scores, scores.softmax(dim=-1), cctx)
            del scores
    out = torch.empty_like(query)  # [b, h, q, d], the model's dtype
    for q0, q1 in chunks:
        mask, kc = _chunk_mask(attention_mask, q0, q1, k_len, is_causal, query.device)
        cctx = _chunk_context(ctx, q0, q1, kc)
        if not (observed and q1 == q_len) and not plan.edits(cctx):
            out[:, :, q0:q1] = _sdpa_chunk(query, key, value, mask, q0, q1, kc, scaling,
                                           dropout if module.training else 0.0)
            continue
        probs = _chunk_scores(plan, cctx, q32, key_t, mask, scaling).softmax(dim=-1)  # [b, h, c, kc] fp32
        probs = plan.post_softmax(probs, cctx)
        if observed and q1 == q_len:
            plan.observe(probs[:, :, -1], cctx)
            plan.observe_values(probs[:, :, -1], value[:, :, :kc], cctx)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out[:, :, q0:q1] = torch.matmul(probs, v32[:, :, :kc])
        del probs
    return out.transpose(1, 2).contiguous(), None


def _one_block(
    plan: Plan, ctx: AttnContext, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, scaling: float, is_causal: bool, dropout: float,
) -> tuple[Tensor, Tensor]:
    """The whole map at once, the callbacks' order as in a chunk (short prompts and decode steps)."""
    q_len, k_len = query.shape[2], key.shape[2]
    mask = additive_mask(attention_mask, q_len, k_len, is_causal, query.device)
    scores = torch.matmul(_fp32(query), _fp32(key).transpose(-1, -2)).mul_(scaling)  # [b, h, q, k]
    if mask is not None:
        scores.add_(mask)  # in place: this runs per edited layer and step
    scores = plan.pre_softmax(scores, ctx)
    probs = scores.softmax(dim=-1)  # [b, h, q, k], fp32
    if ctx.layer in plan.column_stats_layers:
        plan.accumulate(scores, probs, ctx)
    del scores
    probs = plan.post_softmax(probs, ctx)
    if ctx.layer in plan.observed_layers:
        plan.observe(probs[:, :, -1], ctx)
    if ctx.layer in plan.value_layers:
        plan.observe_values(probs[:, :, -1], value, ctx)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = _as(torch.matmul(probs, _fp32(value)), query.dtype)  # [b, h, q, d]
    return out.transpose(1, 2).contiguous(), _as(probs, query.dtype)  # the weights as eager returns them


def _fp32(x: Tensor) -> Tensor:
    return _as(x, torch.float32)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without dispatching an op when it is that dtype already (every edited layer and step)."""
    return x if x.dtype == dtype else x.to(dtype)


def _chunk_context(ctx: AttnContext, q0: int, q1: int, kc: int, stats_pass: bool = False) -> AttnContext:
    """The context of queries ``q0:q1`` against keys ``[0, kc)``."""
    return dataclasses.replace(
        ctx, query_positions=ctx.query_positions[q0:q1], chunk=slice(q0, q1), stats_pass=stats_pass,
        key_positions=ctx.key_positions[:kc], image_keys=ctx.image_keys[:, :kc], key_valid=ctx.key_valid[:, :kc])


def _chunk_scores(plan: Plan, cctx: AttnContext, q32: Tensor, key_t: Tensor, mask: Tensor | None,
                  scaling: float) -> Tensor:
    """The chunk's masked, scaled fp32 scores ``[b, h, c, kc]``, after the plan's ``pre_softmax``."""
    q0, q1 = cctx.chunk.start, cctx.chunk.stop
    kc = cctx.key_positions.shape[0]
    scores = torch.matmul(q32[:, :, q0:q1], key_t[..., :kc]).mul_(scaling)
    if mask is not None:
        # A boolean mask covers the last keys of the chunk (the causal triangle) or all of them.
        # Filling with the minimum equals adding it (s + min rounds to min), as the one-block path does.
        neg = torch.finfo(torch.float32).min
        tail = scores[..., kc - mask.shape[-1]:]
        if mask.dtype == torch.bool:
            tail.masked_fill_(~mask, neg)
        else:
            tail.add_(mask.float().clamp(min=neg))
    return plan.pre_softmax(scores, cctx)


def _chunk_mask(
    attention_mask: Tensor | None, q0: int, q1: int, k_len: int, is_causal: bool, device: torch.device
) -> tuple[Tensor | None, int]:
    """``(mask, kc)`` for queries ``q0:q1``: ``kc`` is one past the last key any of them may see
    (keys after it would get exactly zero weight, so they are left out: half the work of a causal
    prefill); ``mask`` covers the last ``mask.shape[-1]`` of the ``kc`` keys, every earlier key
    being seen: boolean (True: seen) or additive, the rows of what sdpa was given; None: all seen.

    A chunk of fully masked rows only (padding queries) keeps every key, as the one-block softmax
    does; a fully masked row beside seen ones spreads its weight over the chunk's keys instead.
    Such a row is a padding query: nothing reads its output.
    """
    neg = torch.finfo(torch.float32).min
    if attention_mask is None:
        if not is_causal:
            return None, k_len
        kc = min(q1, k_len)  # sdpa's is_causal is upper-left: row i sees keys j <= i
        return torch.ones(q1 - q0, kc - q0, dtype=torch.bool, device=device).tril(), kc  # keys q0:kc
    rows = attention_mask[..., q0:q1, :k_len] if attention_mask.shape[-2] > 1 else attention_mask[..., :k_len]
    seen = rows if rows.dtype == torch.bool else rows > neg / 2  # [b|1, 1, c, k]
    cols = seen.any(-2).flatten(0, -2).any(0)  # [k]: seen by some query of the chunk
    kc = int(cols.nonzero().max()) + 1 if bool(cols.any()) else k_len
    return rows[..., :kc], kc


def _sdpa_chunk(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, q0: int, q1: int, kc: int,
                scaling: float, dropout: float) -> Tensor:
    """Stock sdpa for queries ``q0:q1`` of a chunk no participant edits, in the model's dtype."""
    if mask is not None and mask.shape[-1] < kc:  # the causal triangle: every earlier key is seen
        mask = torch.ones(q1 - q0, kc, dtype=torch.bool, device=query.device).tril(q0)
    return torch.nn.functional.scaled_dot_product_attention(
        query[:, :, q0:q1], key[:, :, :kc], value[:, :, :kc], attn_mask=mask, dropout_p=dropout, scale=scaling)
