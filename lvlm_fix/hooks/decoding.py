"""The decoding seam: a method that owns ``generate()``'s decoding loop (stage ``DECODING``).

transformers 5.x ``generate(custom_generate=<callable>)`` prepares everything as usual (the
generation config, the image inputs, the expansion of the rows for beams, the cache, the logits
processors and the stopping criteria) and then calls the callable instead of its own loop. While a
plan holding such a method is active, :func:`own_decoding` patches the model's ``generate`` so that
every call of the plan passes the method's loop as ``custom_generate``: ``lvlm_fix.apply()`` around a
plain ``model.generate(...)`` and ``lvlm_fix.generate(..., method)`` both run it, and every forward
the loop runs is a forward of the plan (the other methods' hooks edit and read it as any other).

A loop gets the **whole batch** in one ``generate()`` call: its rows are samples x beams, left-padded
to one prompt length (so the generated columns line up across rows), and every forward it runs is
batched over all of them; the loop keeps each sample's search its own. A loop that must continue
some rows alone splits them off into a decoder of their own (:meth:`Decoder.take`); where the rows
cannot be split (M-RoPE models such as Qwen2-VL keep position offsets for the whole batch on the
model) that split is refused in one line, and the batch is served as long as none is needed.
:func:`merge_samples` puts per-sample results back together (each row's left padding kept,
right-padded to the longest).

The loop gets a :class:`Decoder`: the forwards it may run on the live cache (the prefill, one token,
a probe token that is cropped again, several alternative tokens branched in one forward of which one
per row can then be kept, a rewind to an earlier length re-forwarded as one chunk) and the beam
reorder, without naming any module. :class:`BeamScorer` is beam search's bookkeeping as
transformers 4.29 had it (a small object a loop can copy to roll back).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError

if TYPE_CHECKING:
    from torch import Tensor

    from .capture import HookSet
    from .plan import Plan

__all__ = ["BeamScorer", "Decoder", "merge_samples", "own_decoding"]

# Per-token model inputs ([b, L], or [..., b, L] for position ids): cut and grown with the sequence.
_PER_TOKEN = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


def own_decoding(plan: Plan, hooks: HookSet, loop: Callable[..., Any]) -> None:
    """For the plan's lifetime, the model's ``generate()`` runs ``loop`` as its decoding loop.

    ``loop(decoder, logits_processor, stopping_criteria, generation_config)`` gets a :class:`Decoder`
    over the whole batch's rows (``batch x num_beams``, sample-major, left-padded to a common prompt
    length) and returns a dict with ``sequences`` ``[r, L]`` and, optionally, ``sequences_scores``
    ``[r]``, ``scores`` and ``logits`` (tuples of ``[rows, V]``, one per generated position;
    :func:`merge_samples` builds it from per-sample results). Called from a method's ``install``.
    """
    model = plan.lvlm.model
    inner = model.generate  # the class's, or a caller's own patch (a test's spy) that the call goes through

    def custom(model: Any, input_ids: Tensor, logits_processor: Any = None, stopping_criteria: Any = None,
               generation_config: Any = None, **model_kwargs: Any) -> Any:
        out = loop(Decoder(model, input_ids, model_kwargs, plan), logits_processor, stopping_criteria,
                   generation_config)
        return _output(out, generation_config)

    def generate(*args: Any, **kwargs: Any) -> Any:
        if not plan.is_current():
            return inner(*args, **kwargs)
        if kwargs.get("custom_generate") is not None:
            raise LvlmFixError("custom_generate= was given, but a method of the call owns the decoding loop "
                               "(stage decoding); drop custom_generate or the method")
        if kwargs.get("streamer") is not None:
            raise LvlmFixError("streamer= is not served by a method that owns the decoding loop (it may roll tokens "
                               "back); drop the streamer")
        if kwargs.get("stop_strings") is not None:
            # With a callable custom_generate, transformers 5.x drops the tokenizer before it builds the
            # stop-string criterion; and the loop's beam scorer (transformers 4.29's) ends beams at EOS only.
            raise LvlmFixError("stop_strings is not served by a method that owns the decoding loop; drop it, or stop "
                               "at an eos_token_id")
        return inner(*args, **kwargs, custom_generate=custom)  # the whole batch in one call, in lock step

    hooks.patch(model, "generate", generate)


def merge_samples(outs: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    """Per-sample results (each ``sequences`` ``[keep, L_i]`` with its left padding) as one batch: right-padded to
    the longest; a sample whose search ended earlier has no distribution at the later positions (``-inf`` rows)."""
    width = max(o["sequences"].shape[1] for o in outs)
    pad_right = [torch.nn.functional.pad(o["sequences"], (0, width - o["sequences"].shape[1]), value=pad) for o in outs]
    merged: dict[str, Any] = {"sequences": torch.cat(pad_right)}
    if all(o.get("sequences_scores") is not None for o in outs):
        merged["sequences_scores"] = torch.cat([o["sequences_scores"] for o in outs])
    for key in ("scores", "logits"):
        if all(o.get(key) for o in outs):
            steps = max(len(o[key]) for o in outs)
            merged[key] = tuple(torch.cat([o[key][t] if t < len(o[key]) else torch.full_like(o[key][0], -math.inf)
                                           for o in outs]) for t in range(steps))
    return merged


def _output(out: dict[str, Any], generation_config: Any) -> Any:
    if not generation_config.return_dict_in_generate:
        return out["sequences"]
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

    return GenerateBeamDecoderOnlyOutput(
        sequences=out["sequences"], sequences_scores=out.get("sequences_scores"),
        scores=out.get("scores") if generation_config.output_scores else None,
        logits=out.get("logits") if generation_config.output_logits else None)


class Decoder:
    """The forwards a decoding loop runs, on ``generate()``'s own cache, for the batch's rows.

    The rows are ``batch x beams``, left-padded to one prompt length, so the per-token inputs (mask,
    positions) are the prompt's, grown for the generated tokens. The cache is mutated in place:
    :meth:`probe` forwards a token and crops it again; :meth:`branch` forwards several alternative
    next tokens at once and leaves them in the cache until the next call, which either keeps one of
    them per row (:meth:`accept`) or crops them all; :meth:`rewind` crops back to an earlier length and
    re-forwards the kept tokens after it as one chunk. :meth:`take` splits rows off into a decoder of
    their own (a copy of those rows only).
    """

    def __init__(self, model: Any, input_ids: Tensor, model_kwargs: dict[str, Any], plan: Plan | None = None) -> None:
        self.model = model
        self.plan = plan
        self.input_ids = input_ids
        self.prompt_len = input_ids.shape[1]
        self.kw = dict(model_kwargs)
        self.cache = self.kw.get("cache")
        if self.cache is None or not hasattr(self.cache, "crop"):
            raise LvlmFixError("a method that owns the decoding loop needs generate()'s dynamic cache; drop "
                               "use_cache=False / a static cache")
        for layer in getattr(self.cache, "layers", ()):
            if hasattr(layer, "activate_past_recording"):  # sliding-window layers: crops must be able to go back
                layer.activate_past_recording()
        self._prompt = {k: self.kw.pop(k) for k in _PER_TOKEN if self.kw.get(k) is not None}
        text = getattr(model.config, "text_config", model.config)
        self._rope = str(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or "")
        self._count = [0]  # forwards run (prefill, steps, probes, branches, rewinds), shared with taken decoders
        self._pending: tuple[int, int] | None = None  # (length before, tokens) of a branch still in the cache
        self._tokens: Any = None  # the plan's per-row token state of these rows (set by the prefill, or by take)

    @property
    def forwards(self) -> int:
        return self._count[0]

    @property
    def left_padding(self) -> Tensor:
        """``[rows]``: the masked (padding) tokens of each row's prompt."""
        mask = self._prompt.get("attention_mask")
        if mask is None:
            return torch.zeros(self.input_ids.shape[0], dtype=torch.long, device=self.input_ids.device)
        return (mask[:, : self.prompt_len] == 0).sum(dim=-1)

    def _call(self, **inputs: Any) -> Any:
        if self.plan is not None and self._tokens is not None:
            self.plan.tokens = self._tokens  # a taken decoder's rows, or the batch's again after one ran
        out = self.model(**inputs)
        if self.plan is not None and self._tokens is None:
            self._tokens = self.plan.tokens
        self._count[0] += 1
        return out

    def _settle(self) -> None:
        """Crop a branch left in the cache (none was accepted)."""
        if self._pending is not None:
            self.cache.crop(-self._pending[1])
            self._pending = None

    def _per_token(self, length: int) -> dict[str, Tensor]:
        """The prompt's per-token inputs grown to ``length`` tokens (generated tokens: text, unmasked)."""
        new = length - self.prompt_len
        out = {}
        for key, value in self._prompt.items():
            if key == "attention_mask":
                out[key] = torch.cat([value, value.new_ones(value.shape[0], new)], dim=-1)
            elif key == "position_ids":
                step = torch.arange(1, new + 1, dtype=value.dtype, device=value.device)
                out[key] = torch.cat([value, value[..., -1:] + step], dim=-1)
            elif key == "token_type_ids":
                out[key] = torch.cat([value, value[:, -1:].expand(-1, new)], dim=-1)
            else:  # mm_token_type_ids: generated tokens are text
                out[key] = torch.cat([value, value.new_zeros(value.shape[0], new)], dim=-1)
        return out

    def _forward(self, ids: Tensor, new: int | None, first: bool = False) -> Tensor:
        self._settle()
        kw = {**self.kw, **self._per_token(ids.shape[1])}
        inputs = self.model.prepare_inputs_for_generation(ids, next_sequence_length=new, is_first_iteration=first, **kw)
        out = self._call(**inputs, return_dict=True)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def prefill(self) -> Tensor:
        """The prompt's forward: the next-token logits ``[rows, V]`` (fp32)."""
        return self._forward(self.input_ids, None, first=True)

    def step(self, ids: Tensor) -> Tensor:
        """Forward the last token of ``ids`` (the cache holds the rest): its next-token logits."""
        return self._forward(ids, 1)

    def probe(self, ids: Tensor, token: Tensor) -> Tensor:
        """Forward ``token`` ``[rows]`` after ``ids`` on the live cache, then crop it off again: the cache is
        as before. Returns its next-token logits (a loop reads what it needs through the plan's callbacks)."""
        logits = self._forward(torch.cat([ids, token[:, None]], dim=1), 1)
        self.cache.crop(-1)
        return logits

    @property
    def can_branch(self) -> bool:
        """:meth:`branch` applies: a cache without sliding-window layers (their key counts differ per layer) and
        positions the decoder can give (one per token, not M-RoPE's three)."""
        layers = getattr(self.cache, "layers", ())
        prompt_positions = self._prompt.get("position_ids")
        return (all(not getattr(layer, "is_sliding", False) for layer in layers)
                and (prompt_positions is None or prompt_positions.dim() == 2) and "mrope" not in self._rope)

    def branch(self, ids: Tensor, tokens: Tensor) -> Tensor:
        """Forward ``tokens`` ``[rows, n]`` as ``n`` alternative next tokens of ``ids`` in **one** forward: all at the
        next position, each seeing the cached sequence (its padding masked) and itself only (a 4D mask). The same
        attention as ``n`` calls of :meth:`probe`, for the price of about one (a loop reads the rows through the
        plan's callbacks). Returns their next-token logits ``[rows, n, V]`` (fp32); the ``n`` tokens stay in the
        cache until the next call: :meth:`accept` keeps one per row, anything else crops them."""
        self._settle()
        rows, n = tokens.shape
        length = ids.shape[1]
        mask = torch.ones(rows, 1, n, length + n, dtype=torch.bool, device=ids.device)
        mask[..., length:] = torch.eye(n, dtype=torch.bool, device=ids.device)
        grown = self._per_token(length + 1)
        if "attention_mask" in grown:  # left padding: the padded keys stay masked
            mask[:, 0, :, :length] = grown["attention_mask"][:, None, :length].bool()
        if "position_ids" in grown:
            pos = grown["position_ids"][..., -1:].expand(rows, n)
        else:
            pos = torch.full((rows, n), length, dtype=torch.long, device=ids.device)
        extra = {k: v[:, -1:].expand(rows, n) for k, v in grown.items() if k in ("token_type_ids", "mm_token_type_ids")}
        out = self._call(input_ids=tokens, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True,
                         return_dict=True, **extra)
        self._pending = (length, n)
        return out.logits.float()

    @property
    def can_accept(self) -> bool:
        """:meth:`accept` applies: every layer a plain dynamic layer (keys and values ``[rows, heads, seq, dim]``);
        sliding, indexed, linear-attention or quantized layers crop their branch instead."""
        from transformers.cache_utils import DummyLayer, DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) in (DynamicLayer, DummyLayer) for layer in layers)

    def accept(self, beam_idx: Tensor, slot: Tensor) -> None:
        """After :meth:`branch`: row ``r`` becomes row ``beam_idx[r]``'s sequence followed by its branched token
        ``slot[r]``, whose keys and values the branch already computed (it saw the prefix and itself only, as a
        one-token step would). The beam reorder and that step in one copy of the cache."""
        from transformers.cache_utils import DummyLayer

        if self._pending is None:
            raise LvlmFixError("Decoder.accept() needs a branch() just before it")
        length, _ = self._pending
        self._pending = None
        for layer in self.cache.layers:
            if type(layer) is DummyLayer or not layer.is_initialized:
                continue
            for name in ("keys", "values"):
                full = getattr(layer, name)  # [rows, heads, length + n, dim]
                kept = full[:, :, : length + 1].index_select(0, beam_idx)
                kept[:, :, length] = full[beam_idx, :, length + slot]
                setattr(layer, name, kept)

    def rewind(self, ids: Tensor, keep: int) -> Tensor:
        """Crop the cache to its first ``keep`` tokens and forward ``ids[:, keep:]`` as one chunk (the rows of
        ``ids`` may be other beams than the cache's: every row shares the first ``keep`` tokens).
        Returns the next-token logits after ``ids``."""
        self._settle()
        keep = min(keep, ids.shape[1] - 1)  # at least one token forwarded: its logits are the answer
        cached = self.cache.get_seq_length()
        if cached > keep:
            self.cache.crop(keep - cached)
        return self._forward(ids, ids.shape[1] - keep)

    def reorder(self, beam_idx: Tensor) -> None:
        self._settle()
        self.cache.reorder_cache(beam_idx)

    def take(self, rows: Tensor, in_place: bool = False) -> Decoder:
        """A decoder over ``rows`` only (after the prefill): their cache rows copied out (a branch still pending
        included), their per-token inputs, the other row-aligned inputs, and the plan's token state of those rows.
        This decoder is left as it was, or (``in_place``) is narrowed to them, its other rows freed. Refused in one
        line where the rows cannot be split: M-RoPE models keep position offsets for the whole batch on the model
        (Qwen2-VL's ``rope_deltas``), and an input of another layout than one entry per row that is not read by
        the prefill only."""
        from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL

        n = self.input_ids.shape[0]
        positions = self._prompt.get("position_ids")
        if "mrope" in self._rope or (positions is not None and positions.dim() != 2):
            raise LvlmFixError("a sample of this batch must be decoded alone (a rollback), but this model's M-RoPE "
                               "positions are kept for the whole batch; generate one row at a time")
        kw = {}
        for key, value in self.kw.items():
            if key == "cache":
                continue
            if torch.is_tensor(value) and value.dim() > 0:
                if value.shape[0] == n:
                    value = value[rows]
                elif key in MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL:
                    continue  # read by the prefill only, which is done
                else:
                    raise LvlmFixError(f"a sample of this batch must be decoded alone (a rollback), but {key} holds "
                                       f"{value.shape[0]} entries for {n} rows; generate one row at a time")
            kw[key] = value
        cache = self.cache
        if not in_place:
            cache = copy.copy(self.cache)
            cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        cache.batch_select_indices(rows)  # new tensors: a copy's source rows stay untouched
        taken = self if in_place else copy.copy(self)
        taken.input_ids, taken.kw, taken.cache = self.input_ids[rows], {**kw, "cache": cache}, cache
        taken._prompt = {k: v[..., rows, :] for k, v in self._prompt.items()}
        if self._tokens is not None:
            taken._tokens = dataclasses.replace(self._tokens, image_mask=self._tokens.image_mask[rows],
                                                valid=self._tokens.valid[rows])
        return taken


class BeamScorer:
    """Beam search's bookkeeping for one sample, with transformers 4.29's ``BeamSearchScorer`` semantics.

    Each step takes the top ``2 * beams`` (token, score) pairs over the beams: a pair ending in EOS
    among the first ``beams`` ranks becomes a finished hypothesis (without the EOS, scored
    ``sum_logprobs / len ** length_penalty`` where ``len`` counts the prompt too, as 4.29 did), the
    others continue, ``beams`` of them. The sample is done when ``beams`` hypotheses are finished
    and, with ``early_stopping=False``, none of the running beams could beat the worst of them at
    the current length. :meth:`finalize` adds the running beams and returns the best ``keep``.
    ``padding``: the sample's left padding in a batch, left out of every length (so that its search
    is the sample's alone). Plain Python state: ``copy.deepcopy`` snapshots it for a rollback.
    """

    def __init__(self, beams: int, length_penalty: float, early_stopping: bool | str, keep: int,
                 max_length: int, padding: int = 0) -> None:
        self.beams, self.length_penalty, self.early_stopping = beams, length_penalty, early_stopping
        self.keep, self.max_length, self.padding = keep, max_length, padding
        self.hyps: list[tuple[float, Tensor]] = []
        self.worst = 1e9
        self.done = False

    def copy(self) -> BeamScorer:
        return copy.deepcopy(self)

    def _add(self, hyp: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / ((hyp.shape[-1] - self.padding) ** self.length_penalty)
        if len(self.hyps) < self.beams or score > self.worst:
            self.hyps.append((score, hyp))
            if len(self.hyps) > self.beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.hyps))
                del self.hyps[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def _is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.hyps) < self.beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0:
            return self.worst >= best_sum_logprobs / (cur_len - self.padding) ** self.length_penalty
        return self.worst >= best_sum_logprobs / (self.max_length - self.padding) ** self.length_penalty  # "never"

    def process(self, ids: Tensor, scores: Tensor, tokens: Tensor, beam_of: Tensor,
                eos: set[int], pad: int) -> tuple[Tensor, Tensor, Tensor]:
        """One step: ``scores``/``tokens``/``beam_of`` ``[2*beams]`` ranked best first. Returns the next
        beam scores, tokens and source beams ``[beams]``."""
        n = self.beams
        next_scores = scores.new_zeros(n)
        next_tokens = tokens.new_full((n,), pad)
        next_beams = beam_of.new_zeros(n)
        if self.done:
            return next_scores, next_tokens, next_beams
        kept = 0
        for rank, (tok, score, src) in enumerate(zip(tokens.tolist(), scores.tolist(), beam_of.tolist())):
            if tok in eos:
                if rank < n:
                    self._add(ids[src].clone(), score)
            else:
                next_scores[kept], next_tokens[kept], next_beams[kept] = score, tok, src
                kept += 1
            if kept == n:
                break
        if kept < n:
            raise LvlmFixError(f"more than {n} of the {2 * n} best tokens are end-of-sequence tokens; use more beams")
        self.done = self.done or self._is_done(float(scores.max()), ids.shape[-1] + 1)
        return next_scores, next_tokens, next_beams

    def finalize(self, ids: Tensor, beam_scores: Tensor, eos: list[int], pad: int) -> tuple[Tensor, Tensor]:
        """The best ``keep`` hypotheses ``[keep, L]`` (an EOS after each one that ends early, then padding)
        and their scores ``[keep]``."""
        if not self.done:
            for b in range(self.beams):
                self._add(ids[b], float(beam_scores[b]))
        best = sorted(self.hyps, key=lambda h: h[0])[::-1][: self.keep]
        lengths = [h.shape[-1] for _, h in best]
        width = min(max(lengths) + 1, self.max_length)
        out = ids.new_full((len(best), width), pad)
        for i, (_, h) in enumerate(best):
            out[i, : h.shape[-1]] = h
            if h.shape[-1] < width and eos:
                out[i, h.shape[-1]] = eos[0]
        return out, torch.tensor([s for s, _ in best], dtype=torch.float32, device=ids.device)
