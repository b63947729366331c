"""A contrast stream: the same rows with another input, decoded in lock step inside the real ``generate()``.

Contrastive decoding methods need, for every row ``generate()`` decodes, a second copy of the row
with a different input (noised image, disturbed instruction, no image), advanced with the same
tokens and its own KV cache, and a per-step combination of the two next-token logits.
:class:`ContrastStream` is that mechanism, once; a method subclasses it and supplies the
contrast rows (:meth:`~ContrastStream.contrast_rows`, built from the main rows with the helpers
below), the changed pixels when only the images differ (:meth:`~ContrastStream.contrast_pixels`)
and the combination (:meth:`~ContrastStream.combine`).

How it rides on ``generate()`` (greedy, sampling, beam search, batches; nothing is re-implemented):

* **A forward hook on the top-level model.** After each forward of the main rows (the plan's
  attention participants active) it runs the contrast rows' forward *outside* the plan
  (:func:`~lvlm_fix.hooks.plan.outside_plan`: attention edits act on the main stream only) and
  replaces the main rows' last-position logits by the combination, computed in fp32.
  ``generate()`` then runs its own logits processors and, when sampling, its warpers
  (temperature, top-k, top-p) on the combination, so a plausibility cut inside ``combine`` comes
  before temperature, as in the methods' releases.
* **Masked tokens.** A token that either stream masks (``-inf``, or the dtype's minimum, as
  chameleon does for its image codes) is ``-inf`` in the combination: the arithmetic alone gives
  NaN there (``-inf + inf``, or ``finfo.min`` times ``1 + a`` overflowing), or ``+inf`` where only
  the contrast stream masks it (:func:`keep_masked`).
* **After the processors.** A method whose release applies its combination as a logits processor
  (PAI) sets ``combines_after_processors``. Inside ``generate()`` the stream then adds two
  processors to the list ``generate()`` builds: first, one that hands the processors the main rows'
  own logits (what they would see without the stream; log-probabilities in beam search), and,
  after ``generate()``'s processors and the caller's (where a processor passed to ``generate()``
  goes, as the release passes its own), one that combines the processed scores with the contrast
  rows' logits (:meth:`~ContrastStream.combine_scores`); the sampling warpers come after it. A
  forward still returns :meth:`~ContrastStream.combine`'s logits (a plain forward,
  ``output_logits``).
* **Prefill.** The forward that starts a sequence (empty cache) builds the contrast rows from that
  forward's own inputs, which ``generate()`` has already expanded for beams and
  ``num_return_sequences``. The contrast rows get their own ``DynamicCache`` (like generate's,
  sliding-window layers included), their own attention mask, and position ids derived from the
  main rows' with the same token edit (so M-RoPE positions stay exact), left padded like the main
  rows. A method that sets ``edits_contrast_embeddings`` rewrites the contrast rows' input
  embeddings at that prefill (:meth:`~ContrastStream.contrast_embeddings`, a pre-hook on the first
  decoder layer for that one forward; AvisC zeroes image tokens there).
* **Decode steps.** Each later forward feeds the contrast rows the main rows' new token (the pad
  token of a finished row too, so the caches stay aligned), through the model's own
  ``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation``: the contrast rows
  are advanced exactly as ``generate()`` advances the main rows.
* **Beam search.** ``generate()`` reorders its cache with ``model._reorder_cache(cache, beam_idx)``
  when the model has that method. The stream gives the model one for the plan's lifetime: it
  reorders the main cache as ``generate()`` would, and the contrast cache with the same
  ``beam_idx`` (its rows were expanded in the same order).
* **Images.** ``generate()`` encodes the images before the prefill and hands the features to the
  forward (``mm_encoder_outputs``). Contrast rows with the same images reuse those features (the
  vision tower runs once). For rows whose pixels change, the stream records the encoder's inputs
  (``get_image_features``, shadowed during the plan), encodes the changed pixels with them at the
  contrast prefill, and expands the features as ``generate()`` expanded the main ones.

Not served (refused with one line): ``use_cache=False``, static caches (``cache_implementation=
"static"`` and compiled forwards), and any decoding that feeds several new tokens per forward
(assisted or speculative decoding, prompt lookup, chunked prefill). Memory: a second KV cache.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import TYPE_CHECKING, Any, ClassVar

from .._lazy import torch
from ..errors import LvlmFixError
from .plan import Participant, Plan, TokenState, outside_plan, static_cache

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import Tensor

    from ..model import LVLM
    from .capture import HookSet

__all__ = ["ContrastStream", "insert_tokens", "keep_masked", "linear_contrast", "masked_tokens", "plausibility_cut",
           "rows_without_images", "text_positions"]

# Forward arguments that are generate()'s bookkeeping rather than the rows: the stream keeps its own.
_BOOKKEEPING = frozenset({
    "cache", "past_key_values", "cache_position", "use_cache", "logits_to_keep", "num_logits_to_keep",
    "return_dict", "output_attentions", "output_hidden_states", "labels",
})


# -- contrast rows from the main rows ---------------------------------------------------------------
def _per_token(value: Any, shape: tuple[int, int]) -> bool:
    return torch.is_tensor(value) and value.dim() == 2 and tuple(value.shape) == shape


def text_positions(mask: Tensor, like: Tensor) -> Tensor:
    """Position ids of rows without images: ``generate()``'s (mask cumsum, 0 on padding), one copy per
    leading component of ``like`` (M-RoPE's text and vision components are all equal on text)."""
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return pos.expand(*like.shape[:-2], *pos.shape).to(like.dtype).contiguous()


def rows_without_images(lvlm: LVLM, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The rows with their image tokens deleted and no image inputs, at their own (shorter) length.

    Every per-token tensor is cut as :meth:`LVLM.text_only` cuts it; position ids, when the main
    rows had them, are recomputed as plain text positions of the new rows.
    """
    positions = inputs.get("position_ids")
    rows = lvlm.text_only({k: v for k, v in inputs.items() if k != "position_ids"})
    if positions is not None:
        rows["position_ids"] = text_positions(rows["attention_mask"], positions)
    return rows


def insert_tokens(inputs: Mapping[str, Any], at: Tensor, tokens: Tensor, remove: int = 0) -> dict[str, Any]:
    """The rows with ``remove`` tokens from column ``at[r]`` of row ``r`` replaced by ``tokens`` (every row alike).

    Every per-token tensor (``[b, L]``) is edited the same way: the new tokens get ``tokens`` as
    input ids, 1 in the attention mask and 0 elsewhere (text token types). Position ids
    (``[..., b, L]``) continue from the token before the insertion, component by component, and
    every later position moves by ``len(tokens) - remove``: exactly the positions of the edited
    prompt, for RoPE and M-RoPE alike. Every row grows by the same amount, so the left padding
    stays as it was. Other inputs (images, their features) are kept.
    """
    ids = inputs["input_ids"]
    b, length = ids.shape
    m = int(tokens.numel())
    width = length + m - remove
    col = torch.arange(width, device=ids.device)[None, :]
    rel = col - at[:, None]  # [b, W]: column relative to the insertion point
    inserted = (rel >= 0) & (rel < m)
    src = torch.where(rel < 0, col, col - m + remove).clamp(0, length - 1)
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if name == "position_ids" or not _per_token(value, (b, length)):
            out[name] = value
            continue
        kept = value.gather(1, src)
        if name == "input_ids" and m:
            fill = tokens.to(kept.device, kept.dtype)[rel.clamp(0, m - 1)]
        else:
            fill = torch.full_like(kept, int(name == "attention_mask"))  # new tokens: attended, text type
        out[name] = torch.where(inserted, fill, kept)
    pos = inputs.get("position_ids")
    if pos is not None:
        lead = pos.shape[:-2]
        moved = pos.gather(-1, src.expand(*lead, b, width)) + torch.where(rel >= m, m - remove, 0)
        prev_col = (at - 1).clamp(min=0)
        prev = pos.gather(-1, prev_col.view(*(1,) * len(lead), b, 1).expand(*lead, b, 1))
        mask = inputs.get("attention_mask")
        has_prev = (at > 0) if mask is None else (at > 0) & mask.gather(1, prev_col[:, None])[:, 0].bool()
        base = torch.where(has_prev[:, None], prev, -1)  # [..., b, 1]
        out["position_ids"] = torch.where(inserted, base + 1 + rel, moved)
    return out


def masked_tokens(logits: Tensor) -> Tensor:
    """True where the model (or a processor) masked the token: ``-inf``, or at most half the dtype's
    minimum (chameleon fills its image codes with ``finfo(logits.dtype).min``). Pass the logits in the
    model's own dtype: fp16's minimum cast to fp32 is an ordinary fp32 number."""
    return logits <= torch.finfo(logits.dtype).min / 2


def keep_masked(combined: Tensor, *logits: Tensor) -> Tensor:
    """``combined`` with ``-inf`` wherever any of ``logits`` (each in its own dtype) is masked.

    A combination of a masked token is no number: ``(1 + a) l - a l'`` is ``-inf + inf = NaN``
    where both streams hold ``-inf`` (and where both hold ``finfo.min``, whose multiples overflow),
    and ``+inf`` or a huge logit where only the contrast stream masks it. A token either stream
    forbids stays forbidden.
    """
    masked = masked_tokens(logits[0])
    for other in logits[1:]:
        masked = masked | masked_tokens(other)
    return combined.masked_fill(masked.to(combined.device), float("-inf"))


def plausibility_cut(out: Tensor, main: Tensor, beta: float) -> Tensor:
    """``out`` with ``-inf`` at the tokens whose main-stream probability is below ``beta`` times the most
    likely one's (``main < max(main) + log(beta)``, the distribution ``main`` gives); ``beta = 0`` cuts nothing."""
    if beta <= 0:
        return out
    return out.masked_fill(main < main.amax(-1, keepdim=True) + math.log(beta), float("-inf"))


def linear_contrast(main: Tensor, contrast: Tensor, alpha: float, beta: float) -> Tensor:
    """``(1 + alpha) * main - alpha * contrast`` on fp32 logits, with the adaptive plausibility cut
    (:func:`plausibility_cut`, on the unwarped main stream). With ``alpha = 1`` and
    ``contrast == main`` the result is ``main`` exactly. Masked tokens are the caller's
    (:func:`keep_masked`): here they may come out NaN.
    """
    return plausibility_cut(main * (1.0 + alpha) - contrast * alpha, main, beta)


# -- the stream -------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """The contrast rows of one sequence, kept the way generate() keeps its model kwargs."""

    kwargs: dict[str, Any]
    main_cache: Any  # the main rows' cache, to recognise its beam reorderings
    n: int
    prompt_len: int
    step: int = 1  # combined steps; the prefill gives the first token
    first_ids: list[int] = field(default_factory=list)  # row 0's contrast prompt, for the report


@dataclass
class _Encoded:
    """The last call of the image encoder for the main rows: its arguments and output."""

    encoder: Any
    args: tuple
    kwargs: dict[str, Any]
    output: Any
    n_features: int  # len(output.pooler_output) when encoded, before generate() expands it


@dataclass
class _Step:
    """One forward's streams, kept for the processors of ``generate()``'s step (fp32, ``[n, V]``)."""

    main: Tensor  # the main rows' own logits
    contrast: Tensor
    masked: Tensor  # bool: a token either stream masked
    step: int


class _Processor:
    """A logits processor that is a function of the scores (duck-typed: ``LogitsProcessorList`` only calls it)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return self.fn(scores)


class ContrastStream(Participant):
    """Base of the methods that combine the next-token logits with a contrast stream (see the module doc).

    A subclass sets :attr:`contrast_kind`, implements :meth:`contrast_active`, :meth:`combine` and
    (unless the rows are the main rows) :meth:`contrast_rows`; a subclass whose contrast rows
    differ only by their pixels sets :attr:`changes_images` and implements
    :meth:`contrast_pixels`. When :meth:`contrast_active` is False nothing is installed.
    """

    contrast_kind: ClassVar[str] = ""  # what the contrast rows differ by, for the report
    changes_images: ClassVar[bool] = False  # the contrast rows see other pixels (contrast_pixels)
    # In generate(), combine where a logits processor would, after generate()'s own processors
    # (combine_scores); a forward still returns combine()'s logits (see "After the processors").
    combines_after_processors: ClassVar[bool] = False
    # The contrast rows' input embeddings are edited at their prefill (contrast_embeddings; not with null_contrast).
    edits_contrast_embeddings: ClassVar[bool] = False
    contrast_on: bool = False
    null_contrast: bool = False  # feed the contrast rows the main rows' own inputs (a check of the mechanism)
    _rows: _Rows | None = None
    _encoded: _Encoded | None = None
    _starting: bool = False
    _last: _Step | None = None  # the last forward's streams, for the processors (combines_after_processors)

    # -- the method's part ------------------------------------------------------------------------
    def contrast_active(self) -> bool:
        """Whether the stream runs with these settings (False: no hook at all, the model runs as vanilla)."""
        raise NotImplementedError

    def contrast_rows(self, lvlm: LVLM, inputs: dict[str, Any]) -> dict[str, Any]:
        """The contrast rows' forward inputs from the main rows' (ids, masks, position ids, images)."""
        return dict(inputs)

    def contrast_pixels(self, pixel_values: Tensor, image_inputs: Mapping[str, Any]) -> Tensor:
        """The contrast rows' pixels (``changes_images`` only); ``image_inputs`` holds the encoder's other inputs."""
        raise NotImplementedError

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        """The next-token logits ``[n, V]`` from the main and contrast rows' fp32 logits; ``step`` is 1 for
        the first generated token. Must not modify its inputs in place. Masked tokens need no care: the
        stream sets every token that either stream masks to ``-inf`` afterwards (:func:`keep_masked`)."""
        raise NotImplementedError

    def combined(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        """:meth:`combine` of the two streams' logits ``[n, V]`` as the model gave them (any dtype): in fp32,
        with every token that either stream masks at ``-inf`` (:func:`keep_masked`)."""
        return keep_masked(self.combine(main.to(torch.float32, copy=True), contrast.float(), step), main, contrast)

    def contrast_embeddings(self, embeds: Tensor) -> Tensor:
        """``edits_contrast_embeddings`` only: the contrast rows' input embeddings ``[n, L, d]`` at their
        prefill (the first text-decoder layer's input: token embeddings with the image features merged in),
        returned edited; the KV cache carries the edit to every later step. Must not modify ``embeds`` in place."""
        raise NotImplementedError

    def combine_scores(self, scores: Tensor, contrast: Tensor, step: int, *, log_probs: bool) -> Tensor:
        """``combines_after_processors`` only: the combination at a logits processor's place, from
        ``generate()``'s processed main scores ``[n, V]`` (fp32; log-probabilities in beam search,
        ``log_probs``) and the contrast rows' fp32 logits. Must not modify its inputs in place."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------
    def bind(self, lvlm: LVLM) -> None:
        self.contrast_on = self.contrast_active()
        self._rows = self._encoded = None

    def install(self, plan: Plan, hooks: HookSet) -> None:
        if not self.contrast_on:
            return
        self._plan = plan
        model = plan.lvlm.model
        hooks.forward(model, self._after_forward, with_kwargs=True)
        hooks.patch(model, "_reorder_cache", partial(self._reorder_cache, getattr(type(model), "_reorder_cache", None)))
        if self.combines_after_processors:
            hooks.patch(model, "_get_logits_processor", partial(self._logits_processors, model._get_logits_processor))
        encoder = getattr(model.base_model, "get_image_features", None)
        if self.changes_images and not self.null_contrast and encoder is not None:
            hooks.patch(model.base_model, "get_image_features", self._tap(encoder))

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        # generate(): refused before it encodes the images. before_prefill checks a plain forward.
        self._refuse(generation_config.use_cache, static_cache(generation_config, model_kwargs))

    def before_prefill(self, lvlm: LVLM, model_kwargs: dict[str, Any]) -> None:
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        self._refuse(model_kwargs.get("use_cache"), type(cache).__name__ if getattr(cache, "is_compileable", False)
                     else None)

    def _refuse(self, use_cache: bool | None, static: str | None) -> None:
        if not self.contrast_on:
            return
        if use_cache is False:
            raise LvlmFixError(f"{self.name} decodes a contrast stream on generate()'s KV cache; drop use_cache=False")
        if static:
            raise LvlmFixError(f"{self.name} does not support static caches ({static}); use the default "
                               "dynamic cache (drop cache_implementation)")

    def begin(self, tokens: TokenState) -> None:
        self._rows, self._starting, self._last = None, self.contrast_on, None

    def end(self) -> None:
        if self._rows is not None:  # free the contrast cache; the counts stay for the report
            self._rows.kwargs, self._rows.main_cache = {}, None
        self._encoded = self._last = None

    # -- hooks ------------------------------------------------------------------------------------
    def _after_forward(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._plan.is_current():  # a contrast forward, or another plan's
            return None
        if getattr(output, "logits", None) is None:
            raise LvlmFixError(f"{self.name} needs the model's logits; call the model with return_dict=True")
        if self._starting:
            self._starting = False
            contrast = self._prefill(kwargs, output)
        else:
            contrast = self._decode(kwargs)
        raw = output.logits[:, -1]
        if self.combines_after_processors:  # the processors' inputs, read before the write below
            self._last = _Step(raw.to(torch.float32, copy=True), contrast.to(torch.float32, copy=True),
                               masked_tokens(raw) | masked_tokens(contrast), self._rows.step)
        combined = self.combined(raw, contrast, self._rows.step)
        logits = output.logits if output.logits.dtype == torch.float32 else output.logits.float()
        logits[:, -1] = combined  # fp32 even for bf16 models: (1 + a) l - a l' amplifies rounding
        output.logits = logits
        return output

    def _forward(self, ids: Tensor, kw: dict[str, Any], first: bool) -> tuple[Tensor, dict[str, Any]]:
        """One forward of the contrast rows, prepared and followed up exactly as generate() does for its rows."""
        model = self._plan.lvlm.model
        inputs = model.prepare_inputs_for_generation(ids, next_sequence_length=None if first else 1,
                                                     is_first_iteration=first, **kw)
        with outside_plan(self._plan.lvlm):
            out = model(**inputs, return_dict=True)
        return out.logits[:, -1], model._update_model_kwargs_for_generation(out, kw)

    def _prefill(self, kwargs: dict[str, Any], output: Any) -> Tensor:
        from transformers import DynamicCache

        lvlm = self._plan.lvlm
        if kwargs.get("input_ids") is None:
            raise LvlmFixError(f"{self.name} needs the model to be called with input_ids= as a keyword argument")
        inputs = {k: v for k, v in kwargs.items() if k not in _BOOKKEEPING and v is not None}
        rows = dict(inputs) if self.null_contrast else self.contrast_rows(lvlm, inputs)
        if self.changes_images and not self.null_contrast:
            rows = self._with_changed_images(rows)
        ids = rows.pop("input_ids")
        mask = rows.get("attention_mask")
        if mask is not None and bool(mask.all()):
            rows["attention_mask"] = None  # as generate() does without padding: sdpa then runs unmasked
        rows.update(cache=DynamicCache(config=lvlm.model.config.get_text_config(decoder=True)), use_cache=True)
        if "logits_to_keep" in kwargs:
            rows["logits_to_keep"] = 1
        with self._edited_embeddings():
            logits, kw = self._forward(ids, rows, first=True)
        # The images are encoded into the cache now; do not keep them alive for the whole generation.
        kw = {k: v for k, v in kw.items() if k != "mm_encoder_outputs" and not k.startswith("pixel_")}
        first = ids[0][mask[0].bool()] if mask is not None else ids[0]
        main_cache = next((c for c in (kwargs.get("cache"), kwargs.get("past_key_values"), output.get("cache"))
                           if c is not None), None)
        self._rows = _Rows(kwargs=kw, main_cache=main_cache, n=ids.shape[0], prompt_len=ids.shape[1],
                           first_ids=first.tolist())
        self._encoded = None
        return logits

    @contextmanager
    def _edited_embeddings(self) -> Any:
        """During the contrast prefill: :meth:`contrast_embeddings` on the first decoder layer's input."""
        if not self.edits_contrast_embeddings or self.null_contrast:
            yield
            return

        def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
            if args:
                return (self.contrast_embeddings(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.contrast_embeddings(kwargs["hidden_states"])}

        handle = self._plan.lvlm.text_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _decode(self, kwargs: dict[str, Any]) -> Tensor:
        s = self._rows
        ids = kwargs.get("input_ids")
        if s is None:
            raise LvlmFixError(f"{self.name} cannot continue a sequence whose prefill it did not see; start "
                               "generation from the prompt (no cache passed in)")
        if ids is None or tuple(ids.shape) != (s.n, 1):
            raise LvlmFixError(
                f"{self.name} decodes one new token per row and forward after the prefill, but this forward has "
                f"input_ids of shape {None if ids is None else tuple(ids.shape)} for {s.n} rows; assisted or "
                "speculative decoding, prompt lookup and prefill chunking are not supported with a contrast stream")
        logits, s.kwargs = self._forward(ids, s.kwargs, first=False)
        s.step += 1
        return logits

    def _reorder_cache(self, own: Any, cache: Any, beam_idx: Tensor) -> Any:
        """What generate() calls to reorder its cache between beam-search steps (see the module doc)."""
        ours = self._rows is not None and cache is self._rows.main_cache
        if own is not None:  # a model class with a reordering of its own keeps it
            cache = own(cache, beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        if ours:
            # Only the cache: like generate() for its rows, the masks and positions of one sample's
            # beams are identical, so reordering them would change nothing.
            self._rows.kwargs["cache"].reorder_cache(beam_idx)
        return cache

    def _tap(self, encoder: Any) -> Any:
        """``get_image_features`` that also records what it encoded for the main rows."""

        @wraps(encoder)  # generate() picks the encoder's inputs from its signature
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            out = encoder(*args, **kwargs)
            if self._plan.is_current():
                features = getattr(out, "pooler_output", None)
                self._encoded = _Encoded(encoder, args, kwargs, out, 0 if features is None else len(features))
            return out

        return get_image_features

    def _with_changed_images(self, rows: dict[str, Any]) -> dict[str, Any]:
        """The contrast rows' images: changed pixels, or features of the changed pixels (see the module doc)."""
        if "pixel_values" in rows:  # a forward given pixels: it encodes them itself
            rows["pixel_values"] = self.contrast_pixels(rows["pixel_values"], rows)
            return rows
        features = (rows.get("mm_encoder_outputs") or {}).get("image")
        enc = self._encoded
        if features is None or enc is None or features is not enc.output:
            raise LvlmFixError(f"{self.name} found no image of this forward to change; pass the images to generate() "
                               "or to the forward as pixel_values")
        bound = inspect.signature(enc.encoder).bind(*enc.args, **enc.kwargs)
        bound.arguments["pixel_values"] = self.contrast_pixels(bound.arguments["pixel_values"], bound.arguments)
        with outside_plan(self._plan.lvlm):
            changed = enc.encoder(*bound.args, **bound.kwargs)
        pooled = getattr(features, "pooler_output", None)
        now = 0 if pooled is None else len(pooled)
        if enc.n_features and now != enc.n_features:  # generate() expanded them for beams / num_return_sequences
            k = now // enc.n_features
            self._plan.lvlm.model._expand_multimodal_outputs(rows["input_ids"][::k], {"image": changed}, expand_size=k)
        rows["mm_encoder_outputs"] = {**rows["mm_encoder_outputs"], "image": changed}
        return rows

    # -- after the processors (combines_after_processors) ------------------------------------------
    def _logits_processors(self, own: Any, *args: Any, **kwargs: Any) -> Any:
        """``generate()``'s ``_get_logits_processor``, with the combination where a logits processor
        passed to ``generate()`` goes (after its own processors and the caller's, before the
        sampling warpers), and, first, the main rows' own logits back in place of the forward's
        combined ones: the processors see what they would see without the stream."""
        from transformers import LogitsProcessorList

        bound = inspect.signature(own).bind(*args, **kwargs)
        # Beam search hands its processors log-probabilities (log_softmax of the forward's logits).
        beams = (bound.arguments["generation_config"].num_beams or 1) > 1
        combine = _Processor(partial(self._combine_scores, beams))
        bound.arguments["logits_processor"] = LogitsProcessorList([*(bound.arguments.get("logits_processor") or []),
                                                                   combine])
        processors = own(*bound.args, **bound.kwargs)
        processors.insert(0, _Processor(partial(self._restore, beams)))
        return processors

    def _step_for(self, scores: Tensor) -> _Step:
        last = self._last
        if last is None or tuple(last.main.shape) != tuple(scores.shape):
            raise LvlmFixError(f"{self.name} found no forward of this generate() step to combine "
                               f"(scores of shape {tuple(scores.shape)}); call generate() on the model under the plan")
        return last

    def _restore(self, log_probs: bool, scores: Tensor) -> Tensor:
        main = self._step_for(scores).main.to(scores.device)
        return main.log_softmax(-1) if log_probs else main

    def _combine_scores(self, log_probs: bool, scores: Tensor) -> Tensor:
        last = self._step_for(scores)
        out = self.combine_scores(scores, last.contrast.to(scores.device), last.step, log_probs=log_probs)
        return out.masked_fill(last.masked.to(scores.device) | masked_tokens(scores), float("-inf"))

    # -- report -----------------------------------------------------------------------------------
    def stream_report(self) -> dict[str, Any]:
        """What the stream did in the last sequence: its input, rows, prompt length and combined steps."""
        s = self._rows
        out: dict[str, Any] = {"contrast": "main rows (null contrast)" if self.null_contrast else self.contrast_kind,
                               "stream_ran": s is not None}
        if s is not None:
            out.update(rows=s.n, contrast_prompt_tokens=s.prompt_len, steps=s.step)
        return out
