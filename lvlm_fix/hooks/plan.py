"""A Plan: the participants (interventions, statistics recorders) active during one call.

Lifecycle: ``with Plan(lvlm, participants).active(): lvlm.model.generate(...)``

* enter: every hook target is resolved, then the hooks are registered (one :class:`HookSet`)
  and the plan takes its model's seat (:class:`~lvlm_fix.hooks.attention.PlanSeat`), where the
  attention function of that model's layers, and nobody else, finds it;
* each ``generate()`` call: once it has resolved its settings, and before it encodes the images,
  makes a cache or runs any forward, the participants may refuse a feature they cannot serve
  (:meth:`Participant.check_generate`; the plan itself refuses a chunked prefill);
* during: a pre-hook on the top-level model sees every forward. A forward on an empty cache
  starts a new sequence: image-token positions are read from ``input_ids`` (per row, so left
  padding and variable image-token counts are handled) and every participant's per-row state
  is reset through ``begin``; later forwards (decode steps) extend the token bookkeeping. Each
  forward's context is built once, at its first use, for every layer (:meth:`Plan.context`);
  residual hooks that only the prefill needs (``Participant.residual_at_decode`` False) are
  removed at each sequence's first decode step and put back by the next prefill (not inside a
  forward that dynamo traces: there they stay, and return at once); likewise the layers read only
  by participants that observe the prefill alone (``Participant.observe_at_decode`` False) are not
  read at decode steps;
* exit (normally or by exception): hooks removed, the seat given back. Nothing stays patched.

A plan acts on its own model only: a forward of another model while it is active runs untouched,
and two models can each have a plan active at once. Two plans on one model nest only as a
participant's own forward on a side thread (``active(inner=True)``, VHR's text-only stream).
A plan entered on a model while another thread's plan is active on it is refused: one model
serves one thread at a time (load it once per thread to run calls in parallel).

A forward that a participant runs for itself beside the real one (a contrast stream's rows) runs
inside :func:`outside_plan`, so that no participant edits or counts it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError
from .attention import ATTN_NAME, SEAT_ATTR, PlanSeat, acquire_seat, block_bytes, key_padding, release_seat
from .capture import HookSet
from .unembed import shared_forward

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM


class StopForward(Exception):
    """Raised by a hook to end a forward early (a statistics pass that needs no later layer)."""


@dataclass
class AttnContext:
    """Where a callback is: layer, step, which queries and keys it sees, and which keys are image tokens.

    At an edited layer's prefill the attention function may hand the callbacks one **query
    chunk** at a time (see :class:`Participant`): then ``query_positions`` are the chunk's
    queries, ``chunk`` says where they sit among the forward's ``q_len`` queries, and the key
    fields cover the chunk's keys, a prefix of the forward's ``k_len`` keys (the keys after the
    last one any query of the chunk may see are left out: they would get exactly zero weight).
    The key fields always match the key axis of the tensors the callback gets.

    The plan builds one context per forward (and key length) and hands it to every layer with its
    ``layer`` set (:meth:`Plan.context`): read it during the callback; to keep it past the call, keep
    a copy (``dataclasses.replace(ctx)``).

    Attributes:
        layer: text-decoder layer index.
        phase: ``"prefill"`` (more than one query) or ``"decode"`` (one query).
        step: forward count in the current sequence, 0 for the prefill.
        query_positions: ``[q]`` absolute positions of the queries in the sequence (this chunk's).
        image_end: ``[b]`` one past the last image token of each row's prompt (0: no image).
        key_positions: ``[k]`` absolute positions of the keys (sliding-window caches hold a
            suffix of the sequence). None outside the attention function.
        key_start: the position of key 0 as a Python int (0 unless a sliding window has dropped
            the oldest keys); None when unknown. With 0, the prompt's keys are the first ones.
        image_keys: ``[b, k]`` True where the key is an image token of that row.
        key_valid: ``[b, k]`` False where the key is padding.
        q_len: queries of the whole forward; ``k_len``: its keys (None outside the attention function).
        chunk: the queries of this call among the forward's (``slice(0, q_len)`` when unchunked).
        stats_pass: True during the column-statistics pass (see :meth:`Participant.accumulate`),
            when ``pre_softmax`` runs on a chunk that the editing pass will see again.
    """

    layer: int
    phase: str
    step: int
    query_positions: Tensor
    image_end: Tensor
    key_positions: Tensor | None = None
    key_start: int | None = None
    image_keys: Tensor | None = None
    key_valid: Tensor | None = None
    q_len: int | None = None
    k_len: int | None = None
    chunk: slice | None = None
    stats_pass: bool = False

    @property
    def queries_after_image(self) -> Tensor:
        """``[b, q]`` True for queries past the row's last image token."""
        return self.query_positions[None, :] >= self.image_end[:, None]

    @property
    def has_last_query(self) -> bool:
        """This call holds the forward's last query, as its last row: the position whose logits pick the next token."""
        return self.chunk is None or self.q_len is None or self.chunk.stop == self.q_len


# The layer sets a participant declares in ``bind`` (its roles), each a ``frozenset[int]`` attribute of
# :class:`Participant`: the one list that the plan's depth check and a method's ``layers_on`` read.
LAYER_ROLES = ("eager_layers", "column_stats_layers", "observed_layers", "head_output_layers", "residual_layers",
               "mlp_layers", "layer_output_layers", "value_layers")


class Participant:
    """Base class for anything that reads or rewrites the model during a Plan.

    Subclasses declare which layers they need in :meth:`bind` (by filling the layer sets) and
    override the callbacks they use; the defaults are identities. Callbacks get tensors of the
    whole batch and must treat rows independently.

    **Query chunks.** At an edited layer, the attention function bounds its fp32 working set
    (``Plan.block_bytes``): when the ``[b, h, q, k]`` map would exceed it (long prefills), the
    queries are split into chunks and ``pre_softmax`` / ``post_softmax`` / ``accumulate`` are
    called once per chunk, in query order, with ``[b, h, chunk, k_chunk]`` tensors and a context
    whose ``query_positions``, ``chunk`` and key fields describe that chunk (:class:`AttnContext`).
    Short prompts and decode steps are one chunk holding every query and key. So a callback must
    be a function of its chunk: row-wise edits (each query row on its own) need nothing more; a
    method that edits "the last query" checks ``ctx.has_last_query`` and edits row ``-1``; per-key
    state kept from the prefill is sliced to the chunk's keys (``[..., :probs.shape[-1]]``, which
    start at key 0); ``observe`` is called once, with the last query's row. The row of a padding
    query (every key masked) is not defined, as in stock attention (sdpa and eager already differ
    there; in a chunk it spreads over the chunk's keys): skip padding queries in any statistic
    (``TokenState.valid`` at ``ctx.query_positions``). Nothing reads their outputs. A chunk that
    no participant edits (:meth:`edits` False) is computed by sdpa, and no callback sees it.

    **Column statistics.** A method whose edit needs a statistic over *all* queries (e.g. ACT's
    mean attention each key receives) lists the layer in ``column_stats_layers`` and implements
    :meth:`accumulate`: at every forward of such a layer, ``accumulate`` sees every chunk first
    (the statistics pass), then ``post_softmax`` sees the chunks again (the editing pass). During
    the statistics pass of a chunked forward ``pre_softmax`` runs too (``ctx.stats_pass`` is
    True), so that ``accumulate`` sees the same scores as an unchunked forward: keep
    ``pre_softmax`` free of side effects, or skip them when ``ctx.stats_pass``.
    """

    name: str = ""  # the key of this participant's report; empty: the class name in lower case
    eager_layers: frozenset[int] = frozenset()  # attention rewritten (pre/post softmax): eager path
    column_stats_layers: frozenset[int] = frozenset()  # accumulate() over all queries before editing (eager path)
    observed_layers: frozenset[int] = frozenset()  # last query's attention row read
    head_output_layers: frozenset[int] = frozenset()  # per-head outputs (input of o_proj) read/scaled
    residual_layers: frozenset[int] = frozenset()  # residual stream entering the layer read
    mlp_layers: frozenset[int] = frozenset()  # the layer's MLP output read/replaced (mlp_output)
    layer_output_layers: frozenset[int] = frozenset()  # residual stream leaving the layer read (layer_output)
    value_layers: frozenset[int] = frozenset()  # last query's attention row with the layer's values read (observe_values)
    # logits() replaces the next-token logits of every forward of the plan (set in bind, like the layer sets)
    edits_logits: bool = False
    # unembed_rows() hands rows to project in the same lm_head call as the model's own (set in bind)
    shares_unembedding: bool = False
    # residual() reads the decode steps too; False: the prefill's only, and the plan takes the layer's
    # hook off at the first decode step (and puts it back for the next prefill), so decode steps pay nothing.
    residual_at_decode: bool = True
    # observe() reads the decode steps too; False: the prefill's only, and at decode steps the plan stops
    # recomputing the last query's row of the layers that only such participants read.
    observe_at_decode: bool = True

    def bind(self, lvlm: LVLM) -> None:
        """Called once per Plan with the model handle, before any hook is registered."""

    def contrast_active(self) -> bool:
        """Whether this participant decodes a contrast stream beside ``generate()`` with its settings
        (:class:`~lvlm_fix.hooks.contrast.ContrastStream`). A call runs at most one: a second would
        combine the first one's already combined logits."""
        return False

    def begin(self, tokens: TokenState) -> None:
        """A new sequence starts (prefill): reset per-row state."""

    def install(self, plan: Plan, hooks: HookSet) -> None:
        """Add hooks of its own (e.g. on the vision tower) to the plan's :class:`HookSet`.

        Called when the plan is entered, before any hook is registered; the hooks are registered
        and removed with the plan's own. A hook runs for any forward of its module, so it should
        act only while ``plan.is_current()``.
        """

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        """Refuse a ``generate()`` feature this participant cannot serve, before any forward of the call.

        Called once per ``generate()`` call of the plan, when ``generate()`` has resolved its
        ``GenerationConfig`` (the call's arguments over the model's defaults), with the model
        arguments of the call (a cache passed in among them; :func:`static_cache` says whether the
        call decodes with a static one), before the images are encoded, the cache is made or any
        forward runs. Raise :class:`LvlmFixError` with one line naming the feature and the fix.
        """

    def before_prefill(self, lvlm: LVLM, model_kwargs: dict[str, Any]) -> None:
        """Runs before the prefill forward with the model's inputs (e.g. VHR prepares its text-only stream)."""

    def end(self) -> None:
        """The plan is being left, normally or by an exception: release anything still held."""

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:  # [b, h, q, k] fp32, one query chunk
        """Edit the masked, scaled scores (in place or a new tensor); masked keys hold ``finfo.min``."""
        return scores

    def edits(self, ctx: AttnContext) -> bool:
        """Whether ``pre_softmax``/``post_softmax`` may change this query chunk (only asked of a chunk of
        a chunked forward). False for every participant: sdpa computes the chunk, no callback runs."""
        return True

    def accumulate(self, scores: Tensor, probs: Tensor, ctx: AttnContext) -> None:  # [b, h, q, k] fp32 each
        """Column statistics (layers in ``column_stats_layers``): called with every query chunk of a
        forward before the first ``post_softmax`` of that forward and layer.

        ``scores`` are what ``pre_softmax`` returned and ``probs`` their softmax, before any
        ``post_softmax`` edit; read them, never modify them. Keys past the chunk's last visible
        key are not in the tensors (their weight is exactly zero): accumulate into
        ``[..., :probs.shape[-1]]`` of a ``ctx.k_len``-long buffer.
        """

    def post_softmax(self, probs: Tensor, ctx: AttnContext) -> Tensor:  # [b, h, q, k] fp32, one query chunk
        """Edit the attention weights (in place or a new tensor); rows sum to 1."""
        return probs

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:  # [b, h, k] fp32, last query
        pass

    def observe_values(self, probs_last: Tensor, values: Tensor, ctx: AttnContext) -> None:
        """Layers in ``value_layers``: the last query's attention row ``probs_last`` ``[b, h, k]`` (fp32, what
        ``observe`` gets) with the layer's values ``values`` ``[b, h, k, d]`` (the model's dtype, after the cache
        update, key/value heads repeated to the query heads), once per forward. Read only: a method that builds
        its own attention output from the row (ONLY) weights the values itself."""

    def head_output(self, heads: Tensor, ctx: AttnContext) -> Tensor | None:  # [b, q, h, d]
        return None

    def head_scale(self, ctx: AttnContext) -> Tensor | None:
        """A factor for the flat o_proj input ``[b, q, h*d]`` (e.g. ``[b, 1, h*d]``, each head's ``d`` entries
        sharing its factor), when at this forward the participant's ``head_output`` would be exactly
        ``heads * factor`` viewed per head; None: call ``head_output``. Free of side effects. When every
        participant of the layer gives one, the plan multiplies the o_proj input by them, without the
        per-head view and its reshape back (VHR's decode steps)."""
        return None

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:  # [b, q, hidden]
        pass

    def mlp_output(self, out: Tensor, x: Tensor, ctx: AttnContext) -> Tensor | None:  # [b, q, hidden] each
        """Layers in ``mlp_layers``: the MLP's output ``out`` (what the layer adds to, or norms into, its
        residual stream) from its input ``x`` (the normed stream), every position of every forward. Return the
        replacement (same shape and dtype) or None to keep it; participants of a layer see each other's edit in
        composition order. ``ctx`` has no key fields (it is not an attention call)."""
        return None

    def layer_output(self, hidden: Tensor, ctx: AttnContext) -> None:  # [b, q, hidden]
        """Layers in ``layer_output_layers``: read the residual stream leaving the layer (before the final
        norm for the last layer), every forward. Read only; the stream entering layer ``i`` is ``residual``."""

    def logits(self, last: Tensor, ctx: AttnContext) -> Tensor | None:  # [n, V] fp32, the last position
        """With ``edits_logits``: the next-token logits of every forward of the plan, in fp32, after the
        forward and before ``generate()``'s logits processors and warpers (so a cut made here precedes
        temperature, top-k and top-p, and beam search takes its log-softmax). Return the replacement or
        None; ``ctx.layer`` is the model's depth (after the last layer). Edits of several participants
        apply in composition order. A method whose release records the edited logits as ``scores`` gets
        that for free: ``output_scores`` records what the processors return."""
        return None

    def unembed_rows(self, last: Tensor, ctx: AttnContext) -> Tensor | None:  # [n, D] -> [m, D]
        """With ``shares_unembedding``: rows to project through ``lm_head`` together with the model's own
        projection of this forward (after its last decoder layer), or None. ``last`` is ``lm_head``'s input at
        the last position ``[n, D]`` (after the final norm). The logits come back through :meth:`unembedded`
        in the same forward, before :meth:`logits`; a model whose forward does not call ``lvlm.lm_head``
        never asks, so a participant keeps its own projection for a forward that delivered nothing."""
        return None

    def unembedded(self, logits: Tensor, ctx: AttnContext) -> None:  # [m, V], lm_head's dtype
        """With ``shares_unembedding``: the logits of the rows :meth:`unembed_rows` returned, in their order."""

    def report(self) -> dict[str, Any]:
        """What this participant saw and touched, JSON-serialisable."""
        return {}


@dataclass
class TokenState:
    """Per-row bookkeeping of the sequence being generated.

    Attributes:
        image_mask: ``[b, t]`` True at image-token positions (prompt only; generated tokens are text).
        valid: ``[b, t]`` False at padding.
        prompt_len: length of the (padded) prompt.
        past: tokens before the current forward; ``q_len``: tokens in it; ``step``: forward count.
    """

    image_mask: Tensor
    valid: Tensor
    prompt_len: int
    past: int = 0
    q_len: int = 0
    step: int = 0

    @cached_property  # fixed for the sequence: only the prompt holds image tokens
    def image_end(self) -> Tensor:
        """``[b]`` one past each row's last image token (0 for a row without image)."""
        pos = torch.arange(1, self.prompt_len + 1, device=self.image_mask.device)
        return (self.image_mask[:, : self.prompt_len] * pos).amax(dim=1)


class Plan:
    """The participants of one call, in order of application, and the hooks that serve them."""

    def __init__(self, lvlm: LVLM, participants: Sequence[Participant]) -> None:
        self.lvlm = lvlm
        self.participants = list(participants)
        for p in self.participants:
            p.bind(lvlm)
        self.column_stats_layers = frozenset().union(*(p.column_stats_layers for p in self.participants))
        # A column statistic needs every query's probabilities, which sdpa does not give: eager path.
        self.eager_layers = frozenset().union(*(p.eager_layers for p in self.participants), self.column_stats_layers)
        self.observed_layers = frozenset().union(*(p.observed_layers for p in self.participants))
        # observed_layers is the prefill's set; _on_model_forward switches it to the decode steps' (observe_at_decode).
        self._observed_prefill = self.observed_layers
        decode = frozenset().union(*(p.observed_layers for p in self.participants if p.observe_at_decode))
        self._observed_decode = self.observed_layers if decode == self.observed_layers else decode
        self.value_layers = frozenset().union(*(p.value_layers for p in self.participants))
        n = lvlm.num_layers
        for name in LAYER_ROLES:
            for p in self.participants:
                bad = sorted(i for i in getattr(p, name) if not 0 <= i < n)
                if bad:
                    raise LvlmFixError(f"layer index {bad[0]} is beyond the model's depth: valid layers are 0..{n - 1}")
        editors = [p.name or type(p).__name__.lower() for p in self.participants if p.edits_logits]
        streams = [p.name or type(p).__name__.lower() for p in self.participants if p.contrast_active()]
        if editors and streams:
            # The contrast rows run outside the plan: their logits would miss the edit the main rows got.
            raise LvlmFixError(f"{editors[0]} edits the next-token logits inside the forward and {streams[0]} combines "
                               "them with a contrast stream that does not get that edit; run them in separate calls")
        self._num_heads = lvlm.num_heads  # read once: the property walks the config on every access
        self.tokens: TokenState | None = None
        # Bytes of one [b, h, chunk, k] fp32 block at an edited layer (None: $LVLM_FIX_ATTN_BLOCK_MB or
        # the device's default, see hooks.attention.block_bytes).
        self.block_bytes: int | None = None
        self._seat: PlanSeat | None = None  # the model's seat while this plan is active
        # Hooks needed at the prefill only: off from a sequence's first decode step to the next prefill.
        self._prefill_hooks = HookSet()
        self._prefill_hooks_on = False
        self._ctx_cache: dict[tuple, AttnContext] = {}  # this forward's contexts, by (k_len, device)
        self._unembed_armed = False  # the model's own lm_head call of this forward may take shared rows
        self._block_cache: dict[torch.device, int] = {}  # this forward's block size, by device

    def is_current(self) -> bool:
        """Whether the forward in progress (in this thread) belongs to this plan, not to another
        plan of the model (VHR's text-only stream) nor to a forward run outside any plan."""
        return self._seat is not None and self._seat.plan() is self

    # -- queried by the attention function --------------------------------------------------
    def touches(self, layer: int) -> bool:
        return layer in self.eager_layers or layer in self.observed_layers or layer in self.value_layers

    def context(self, layer: int, *, q_len: int, k_len: int | None = None, device: torch.device | None = None) -> AttnContext:
        """The context of ``layer`` in the current forward (key fields only when ``k_len`` is given).

        Nothing in it but ``layer`` depends on the layer, so one :class:`AttnContext` is built per
        forward (and ``k_len``, device) and handed to every layer with its ``layer`` set: a callback
        reads it during its call and keeps none of it (copy it with ``dataclasses.replace`` to keep it).
        """
        key = (k_len, device)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            ctx = self._ctx_cache[key] = self._build_context(layer, k_len, device)
        ctx.layer = layer
        return ctx

    def _build_context(self, layer: int, k_len: int | None, device: torch.device | None) -> AttnContext:
        t = self._require_tokens()
        dev = device or t.image_mask.device
        total = t.past + t.q_len
        image_mask, valid = _on(t.image_mask, dev), _on(t.valid, dev)
        fields: dict[str, Any] = {}
        if k_len is not None:
            # Keys are the most recent k_len tokens (sliding-window layers keep a suffix), except a
            # static cache, whose k_len is its capacity: there key j is position j, and the keys at
            # and after ``total`` are empty slots (masked; never image keys, valid keys or sinks).
            # At k_len == total both readings agree; taking the static one keeps a static cache on
            # one branch for its whole generation (under torch.compile, a flip is a recompile).
            start = total - k_len if k_len < total else 0
            pos = torch.arange(start, start + k_len, device=dev)
            # Every key a token of the sequence, in order (the usual case): plain views. Not while dynamo traces
            # (a static cache): comparing the step's length there would be one more guard, and one more graph.
            if not torch.compiler.is_compiling() and k_len == total:
                image_keys, key_valid = _prefix(image_mask, k_len), _prefix(valid, k_len)
            else:
                inside = pos < total
                idx = pos.clamp(max=total - 1)
                image_keys, key_valid = image_mask[:, idx] & inside, valid[:, idx] & inside
            fields.update(key_positions=pos, key_start=start, image_keys=image_keys, key_valid=key_valid)
        return AttnContext(layer=layer, phase="prefill" if t.q_len > 1 else "decode", step=t.step,
                           query_positions=torch.arange(t.past, total, device=dev), image_end=_on(t.image_end, dev),
                           q_len=t.q_len, k_len=k_len, chunk=slice(0, t.q_len), **fields)

    def block_size(self, device: torch.device) -> int:
        """:func:`~lvlm_fix.hooks.attention.block_bytes`, read once per forward and device (it reads the
        environment); a decode step does not read it at all (one query is one block)."""
        size = self._block_cache.get(device)
        if size is None:
            size = self._block_cache[device] = block_bytes(self, device)
        return size

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:
        for p in self.participants:
            if ctx.layer in p.eager_layers:
                scores = p.pre_softmax(scores, ctx)
        return scores

    def edits(self, ctx: AttnContext) -> bool:
        return any(p.edits(ctx) for p in self.participants if ctx.layer in p.eager_layers)

    def accumulate(self, scores: Tensor, probs: Tensor, ctx: AttnContext) -> None:
        for p in self.participants:
            if ctx.layer in p.column_stats_layers:
                p.accumulate(scores, probs, ctx)

    def post_softmax(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        for p in self.participants:
            if ctx.layer in p.eager_layers:
                probs = p.post_softmax(probs, ctx)
        return probs

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:
        for p in self.participants:
            if ctx.layer in p.observed_layers:
                p.observe(probs_last, ctx)

    def observe_values(self, probs_last: Tensor, values: Tensor, ctx: AttnContext) -> None:
        for p in self.participants:
            if ctx.layer in p.value_layers:
                p.observe_values(probs_last, values, ctx)

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        """Refuse, before any forward, a ``generate()`` call the plan cannot serve (see
        :meth:`Participant.check_generate`); the participants' own refusals follow."""
        if self.participants and getattr(generation_config, "prefill_chunk_size", None):
            # A later chunk would count as a decode step: the prompt's image tokens after the first
            # chunk would be taken for text, and every per-prompt statistic would miss them.
            raise LvlmFixError(f"prefill_chunk_size={generation_config.prefill_chunk_size}: lvlm-fix's methods read "
                               "the whole prompt in one prefill forward; drop prefill_chunk_size")
        for p in self.participants:
            p.check_generate(generation_config, model_kwargs)

    # -- hooks ----------------------------------------------------------------------------------
    def _before_generate(self, prepare_config: Any) -> Any:
        """``model._prepare_generation_config`` followed by :meth:`check_generate`: ``generate()``'s first
        step, which resolves the call's settings; the images are encoded and the cache made after it."""
        def prepare(*args: Any, **kwargs: Any) -> Any:
            generation_config, model_kwargs = prepare_config(*args, **kwargs)
            if self.is_current():
                self.check_generate(generation_config, model_kwargs)
            return generation_config, model_kwargs

        return prepare

    def _require_tokens(self) -> TokenState:
        if self.tokens is None:
            raise LvlmFixError("the model was called without input_ids; lvlm-fix needs them to locate image tokens")
        return self.tokens

    def _on_model_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.is_current():  # another plan's forward (e.g. VHR's text-only stream)
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise LvlmFixError("the model was called without input_ids; lvlm-fix needs them to locate image tokens")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # int(): a static cache answers with its live length tensor, which its update() advances in
        # place at every layer, so the value read here would not stay the tokens before this forward.
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        q_len = input_ids.shape[1]
        self._ctx_cache.clear()
        self._block_cache.clear()
        self._unembed_armed = False  # armed again by this forward's last layer (a forward without lm_head leaves none)
        # The same object unless a participant observes the prefill only: nothing is assigned in a traced forward.
        observed = self._observed_prefill if past == 0 else self._observed_decode
        if self.observed_layers is not observed:
            self.observed_layers = observed
        if past == 0:
            if not self._prefill_hooks_on:  # taken off by the previous sequence's first decode step
                self._prefill_hooks.__enter__()
                self._prefill_hooks_on = True
            for p in self.participants:
                p.before_prefill(self.lvlm, {**kwargs, "input_ids": input_ids})
            image_mask = self.lvlm.image_token_mask(input_ids)
            valid = key_padding(mask2d, q_len) if mask2d is not None else torch.ones_like(image_mask)
            self.tokens = TokenState(image_mask=image_mask, valid=valid, prompt_len=q_len, q_len=q_len)
            for p in self.participants:
                p.begin(self.tokens)
            return
        # Removing a hook inside a forward that dynamo traces (compiled decode steps) would break its graph:
        # there the prefill-only hooks stay, and return at once (their readers check the step).
        if not torch.compiler.is_compiling():
            self._drop_prefill_hooks()
        t = self._require_tokens()
        t.step += 1
        t.past, t.q_len = past, q_len
        grow = past + q_len - t.image_mask.shape[1]
        if grow > 0:
            t.image_mask = torch.cat([t.image_mask, t.image_mask.new_zeros(t.image_mask.shape[0], grow)], dim=1)
        if torch.is_tensor(mask2d) and mask2d.dim() == 2 and mask2d.shape[-1] >= past + q_len:
            t.valid = key_padding(mask2d, past + q_len)
        elif grow > 0:
            t.valid = torch.cat([t.valid, t.valid.new_ones(t.valid.shape[0], grow)], dim=1)

    def _drop_prefill_hooks(self) -> None:
        if self._prefill_hooks_on:
            self._prefill_hooks.remove()
            self._prefill_hooks_on = False

    def _head_hook(self, layer: int):
        on_layer = [p for p in self.participants if layer in p.head_output_layers]

        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not self.is_current():
                return None
            x = args[0]  # [b, q, h*d], the input of o_proj
            b, q, hd = x.shape
            ctx = self.context(layer, q_len=q, device=x.device)
            scales = [p.head_scale(ctx) for p in on_layer]
            if all(s is not None for s in scales):  # whole-head factors only: on the flat input, in order
                for s in scales:
                    x = x * s
                return (x, *args[1:])
            heads = x.view(b, q, self._num_heads, hd // self._num_heads)
            changed = False
            for p in on_layer:
                new = p.head_output(heads, ctx)
                if new is not None:
                    heads, changed = new, True
            return (heads.reshape(b, q, hd), *args[1:]) if changed else None

        return hook

    def _residual_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.is_current():
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # [b, q, hidden]
            ctx = self.context(layer, q_len=hidden.shape[1], device=hidden.device)
            for p in self.participants:
                if layer in p.residual_layers:
                    p.residual(hidden, ctx)

        return hook

    def _mlp_hook(self, layer: int):
        on_layer = [p for p in self.participants if layer in p.mlp_layers]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.is_current():
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            out = output[0] if isinstance(output, tuple) else output  # a mixture of experts adds its router logits
            ctx = self.context(layer, q_len=out.shape[1], device=out.device)
            changed = False
            for p in on_layer:
                new = p.mlp_output(out, x, ctx)
                if new is not None:
                    out, changed = new, True
            if not changed:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    def _layer_output_hook(self, layer: int):
        on_layer = [p for p in self.participants if layer in p.layer_output_layers]

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not self.is_current():
                return
            hidden = output[0] if isinstance(output, tuple) else output  # [b, q, hidden]
            ctx = self.context(layer, q_len=hidden.shape[1], device=hidden.device)
            for p in on_layer:
                p.layer_output(hidden, ctx)

        return hook

    def _share_unembedding(self, hooks: HookSet, last_layer: Any) -> None:
        """``lm_head`` projects the sharing participants' rows with the model's own (hooks.unembed): armed when
        the last decoder layer of a forward of this plan has run, so only the model's own projection, not an
        early exit a method computes mid-forward or after it, takes the rows."""
        head = self.lvlm.lm_head
        sharing = [p for p in self.participants if p.shares_unembedding]
        state: dict[str, Any] = {"sizes": []}

        def arm(module: Any, args: tuple, output: Any) -> None:
            self._unembed_armed = self.is_current()

        def armed() -> bool:
            on, self._unembed_armed = self._unembed_armed, False
            return on

        def rows(last: Tensor) -> Tensor | None:
            ctx = self.context(self.lvlm.num_layers, q_len=1, device=last.device)
            got = [(p, p.unembed_rows(last, ctx)) for p in sharing]
            got = [(p, r) for p, r in got if r is not None]
            state["sizes"], state["ctx"] = [(p, r.shape[0]) for p, r in got], ctx
            return torch.cat([r for _, r in got]) if got else None

        def deliver(logits: Tensor) -> None:
            for (p, n), part in zip(state["sizes"], logits.split([n for _, n in state["sizes"]])):
                p.unembedded(part, state["ctx"])

        hooks.forward(last_layer, arm)
        hooks.patch(head, "forward", shared_forward(head, head.forward, rows, deliver, armed))

    def _logits_hook(self, participant: Participant):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.is_current():
                return None
            if getattr(output, "logits", None) is None:
                raise LvlmFixError(f"{participant.name} needs the model's logits; call the model with return_dict=True")
            ctx = self.context(self.lvlm.num_layers, q_len=output.logits.shape[1], device=output.logits.device)
            new = participant.logits(output.logits[:, -1].to(torch.float32, copy=True), ctx)
            if new is None:
                return None
            logits = output.logits if output.logits.dtype == torch.float32 else output.logits.float()
            logits[:, -1] = new  # fp32 even for bf16 models, as a contrast stream's combination
            output.logits = logits
            return output

        return hook

    @contextmanager
    def active(self, inner: bool = False) -> Iterator[Plan]:
        """Register every hook, publish the plan, and undo both on exit (even on error).

        Args:
            inner: this plan runs a participant's own forward inside another plan's call (VHR's
                text-only stream); the outer plan's hooks stay registered but dormant for it.
        """
        layers = self.lvlm.text_layers
        hooks = HookSet()
        model = self.lvlm.model
        hooks.forward_pre(model, self._on_model_forward, with_kwargs=True)
        if hasattr(model, "_prepare_generation_config"):
            hooks.patch(model, "_prepare_generation_config", self._before_generate(model._prepare_generation_config))
        for i in sorted(set().union(*(p.head_output_layers for p in self.participants))):
            hooks.forward_pre(self.lvlm.out_proj(i), self._head_hook(i))
        every_step = set().union(*(p.residual_layers for p in self.participants if p.residual_at_decode))
        self._prefill_hooks = HookSet()
        for i in sorted(set().union(*(p.residual_layers for p in self.participants))):
            # A layer whose residual readers all stop at the prefill: its hook is taken off at each
            # sequence's first decode step and put back by the next prefill (_on_model_forward).
            (hooks if i in every_step else self._prefill_hooks).forward_pre(layers[i], self._residual_hook(i),
                                                                            with_kwargs=True)
        for i in sorted(set().union(*(p.mlp_layers for p in self.participants))):
            hooks.forward(self.lvlm.mlp(i), self._mlp_hook(i), with_kwargs=True)
        for i in sorted(set().union(*(p.layer_output_layers for p in self.participants))):
            hooks.forward(layers[i], self._layer_output_hook(i))
        if any(p.shares_unembedding for p in self.participants):
            self._share_unembedding(hooks, layers[-1])
        for p in self.participants:  # in composition order: a logits edit and a method's own hooks alike
            if p.edits_logits:
                hooks.forward(model, self._logits_hook(p), with_kwargs=True)
            p.install(self, hooks)
        seat = acquire_seat(self.lvlm.model, self.lvlm.attention_modules, inner=inner)
        try:
            if seat.plan() is not None and not inner:
                raise LvlmFixError("a method is already applied to this model; combine methods in one call, "
                                   "e.g. method='vhr+var'")
            with hooks, self.lvlm.attention_implementation(ATTN_NAME), _symbolic_step_ints():
                self._seat, token = seat, seat.set(self)
                try:
                    self._prefill_hooks.__enter__()  # registered with the plan's, outside any traced forward
                    self._prefill_hooks_on = True
                    yield self
                finally:
                    seat.reset(token)
                    self._drop_prefill_hooks()
                    self._ctx_cache.clear()
                    self._block_cache.clear()
                    for p in self.participants:
                        p.end()
        finally:
            release_seat(seat, inner=inner)

    def report(self) -> dict[str, Any]:
        """Each participant's report under its name (a method's registered name, e.g. ``"vhr"``)."""
        return {p.name or type(p).__name__.lower(): p.report() for p in self.participants}


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without an op when it is there already (the context is built every forward)."""
    return t if t.device == device else t.to(device)


def _prefix(t: Tensor, k: int) -> Tensor:
    """``t[:, :k]``, ``t`` itself when it has ``k`` columns (no op)."""
    return t if t.shape[1] == k else t[:, :k]


def static_cache(generation_config: Any, model_kwargs: dict[str, Any]) -> str | None:
    """What makes a ``generate()`` call decode with a static cache (one of fixed capacity, which
    ``torch.compile`` needs), in words, or None: the cache passed in, else ``cache_implementation``."""
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None:
        return type(cache).__name__ if getattr(cache, "is_compileable", False) else None
    impl = generation_config.cache_implementation
    return f"cache_implementation={impl!r}" if impl in ALL_STATIC_CACHE_IMPLEMENTATIONS else None


_STEP_INTS_LOCK = threading.Lock()
_step_ints: dict[str, Any] = {"plans": 0, "before": None}  # plans active in any thread; the setting before the first


@contextmanager
def _symbolic_step_ints() -> Iterator[None]:
    """While a plan is active, dynamo may trace the ints that change every decode step as symbols.

    Under ``torch.compile`` (``generate()`` compiles its decode steps with a static cache) the
    plan's bookkeeping is traced with the forward: the tokens before this forward, the step count,
    a participant's counters. They are reached through the model's modules (the forward hooks, the
    attention modules' seat), and dynamo takes an int attribute found through a module for a
    constant: every decode step would recompile, until its recompile limit (8) leaves the forward
    uncompiled. This lets such ints become symbolic after their first change (one recompile).

    Dynamo's setting is global: the first plan to enter (in any thread) sets it, the last to leave
    puts back what it was (plans of two models in two threads need not leave in order).
    """
    config = torch._dynamo.config
    with _STEP_INTS_LOCK:
        if not _step_ints["plans"]:
            _step_ints["before"] = config.allow_unspec_int_on_nn_module
            config.allow_unspec_int_on_nn_module = True
        _step_ints["plans"] += 1
    try:
        yield
    finally:
        with _STEP_INTS_LOCK:
            _step_ints["plans"] -= 1
            if not _step_ints["plans"]:
                config.allow_unspec_int_on_nn_module = _step_ints["before"]


@contextmanager
def outside_plan(lvlm: LVLM) -> Iterator[None]:
    """Run ``lvlm``'s forwards inside the block as if no plan were active: no participant edits, reads or counts them.

    The one place where a participant's own forward (a contrast stream's rows) leaves the plan of
    the call in progress; the plan's hooks stay registered but are dormant for these forwards.
    """
    seat = lvlm.model.__dict__.get(SEAT_ATTR)
    if seat is None:  # no plan is active on this model: nothing to leave
        yield
        return
    token = seat.set(None)  # this thread only; the plan comes back when the block ends
    try:
        yield
    finally:
        seat.reset(token)
