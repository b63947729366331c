"""The decoding seam: a method that owns ``generate()``'s decoding loop (stage ``DECODING``).

transformers 5.x ``generate(custom_generate=<callable>)`` prepares everything as usual (the
generation config, the image inputs, the expansion of the rows for beams, the cache, the logits
processors and the stopping criteria) and then calls the callable instead of its own loop. While a
plan holding such a method is active, :func:`own_decoding` patches the model's ``generate`` so that
every call of the plan passes the method's loop as ``custom_generate``: ``lvlm_fix.apply()`` around a
plain ``model.generate(...)`` and ``lvlm_fix.generate(..., method)`` both run it, and every forward
the loop runs is a forward of the plan (the other methods' hooks edit and read it as any other).

A loop searches **one sample at a time** (its rows are that sample's beams): a batch of several
samples is split into one ``generate()`` call per sample, each without its left padding, and the
outputs are put back together (left padding restored, right-padded to the longest). A batched call
therefore gives each row its answer alone, by construction. A model whose image inputs do not hold
one entry per row (Qwen2-VL's flattened patches) cannot be split here: such a batch is refused in
one line.

The loop gets a :class:`Decoder`: the forwards it may run on the live cache (the prefill, one token,
a probe token that is cropped again, a rewind to an earlier length re-forwarded as one chunk) and
the beam reorder, without naming any module. :class:`BeamScorer` is beam search's bookkeeping as
transformers 4.29 had it (a small object a loop can copy to roll back).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError

if TYPE_CHECKING:
    from torch import Tensor

    from .capture import HookSet
    from .plan import Plan

__all__ = ["BeamScorer", "Decoder", "own_decoding"]

# Per-token model inputs ([b, L], or [..., b, L] for position ids): cut and grown with the sequence.
_PER_TOKEN = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


def own_decoding(plan: Plan, hooks: HookSet, loop: Callable[..., Any]) -> None:
    """For the plan's lifetime, the model's ``generate()`` runs ``loop`` as its decoding loop.

    ``loop(decoder, logits_processor, stopping_criteria, generation_config)`` gets a :class:`Decoder`
    over one sample's rows and returns a dict with ``sequences`` ``[r, L]`` and, optionally,
    ``sequences_scores`` ``[r]``, ``scores`` and ``logits`` (tuples of ``[rows, V]``, one per
    generated position). Called from a method's ``install``.
    """
    model = plan.lvlm.model
    inner = model.generate  # the class's, or a caller's own patch (a test's spy) that the call goes through

    def custom(model: Any, input_ids: Tensor, logits_processor: Any = None, stopping_criteria: Any = None,
               generation_config: Any = None, **model_kwargs: Any) -> Any:
        out = loop(Decoder(model, input_ids, model_kwargs), logits_processor, stopping_criteria, generation_config)
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
        if args:  # positional arguments, named as generate() names them (the first is the prompt ids)
            names = [p for p in inspect.signature(type(model).generate).parameters if p != "self"]
            kwargs.update(zip(names, args))
            args = ()
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        if kwargs.get("stop_strings") is not None:
            # With a callable custom_generate, transformers 5.x drops the tokenizer before it builds the
            # stop-string criterion; and the loop's beam scorer (transformers 4.29's) ends beams at EOS only.
            raise LvlmFixError("stop_strings is not served by a method that owns the decoding loop; drop it, or stop "
                               "at an eos_token_id")
        return _per_sample(plan, inner, custom, args, kwargs)

    hooks.patch(model, "generate", generate)


def _per_sample(plan: Plan, inner: Callable[..., Any], custom: Callable[..., Any], args: tuple,
                kwargs: dict[str, Any]) -> Any:
    """One ``generate()`` call per sample, without its left padding; the outputs put back together."""
    ids = kwargs.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise LvlmFixError("a method that owns the decoding loop needs input_ids [batch, length]; pass input_ids")
    b, length = ids.shape
    mask = kwargs.get("attention_mask")
    if b == 1 and (mask is None or bool(mask.all())):
        return inner(*args, **kwargs, custom_generate=custom)
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] != b and key != "position_ids":
            raise LvlmFixError(f"{key} holds {value.shape[0]} entries for a batch of {b} rows, so the batch cannot be "
                               "split into one search per sample; generate one row at a time")
    outs, starts = [], []
    for i in range(b):
        start = int(mask[i].nonzero()[0]) if mask is not None and bool(mask[i].any()) else 0
        row = {}
        for key, value in kwargs.items():
            if key == "position_ids" and torch.is_tensor(value):
                value = value[..., i:i + 1, start:]
            elif torch.is_tensor(value) and value.dim() > 0:
                value = value[i:i + 1]
                if key in _PER_TOKEN or key == "input_ids":
                    value = value[:, start:]
            row[key] = value
        outs.append(inner(*args, **row, custom_generate=custom))
        starts.append(start)
    return _merge(outs, starts, ids, plan.lvlm.pad_token_id)


def _merge(outs: list[Any], starts: list[int], ids: Tensor, pad: int) -> Any:
    """The per-sample outputs as one batch: each row's left padding put back, right-padded to the longest."""
    seqs = [o.sequences if hasattr(o, "sequences") else o for o in outs]
    rows = [torch.cat([ids[i:i + 1, :s].expand(q.shape[0], -1), q], dim=1) for i, (s, q) in enumerate(zip(starts, seqs))]
    width = max(r.shape[1] for r in rows)
    sequences = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad) for r in rows])
    if not hasattr(outs[0], "sequences"):
        return sequences
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

    merged: dict[str, Any] = {"sequences": sequences}
    if outs[0].sequences_scores is not None:
        merged["sequences_scores"] = torch.cat([o.sequences_scores for o in outs])
    for key in ("scores", "logits"):
        if getattr(outs[0], key) is not None:
            steps = max(len(getattr(o, key)) for o in outs)
            # a sample whose search ended earlier has no distribution at the later positions: -inf rows
            merged[key] = tuple(torch.cat([getattr(o, key)[t] if t < len(getattr(o, key))
                                           else torch.full_like(getattr(o, key)[0], -math.inf) for o in outs])
                                for t in range(steps))
    return GenerateBeamDecoderOnlyOutput(**merged)


def _output(out: dict[str, Any], generation_config: Any) -> Any:
    if not generation_config.return_dict_in_generate:
        return out["sequences"]
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

    return GenerateBeamDecoderOnlyOutput(
        sequences=out["sequences"], sequences_scores=out.get("sequences_scores"),
        scores=out.get("scores") if generation_config.output_scores else None,
        logits=out.get("logits") if generation_config.output_logits else None)


class Decoder:
    """The forwards a decoding loop runs, on ``generate()``'s own cache, for one sample's rows.

    Every row holds the same prompt (``generate()`` expanded it for the beams), so the per-token
    inputs (mask, positions) are the prompt's, grown for the generated tokens. The cache is
    mutated in place: :meth:`probe` forwards a token and crops it again; :meth:`rewind` crops back to
    an earlier length and re-forwards the kept tokens after it as one chunk. Nothing is copied.
    """

    def __init__(self, model: Any, input_ids: Tensor, model_kwargs: dict[str, Any]) -> None:
        self.model = model
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
        self.forwards = 0  # forwards run (prefill, steps, probes, rewinds)

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
        kw = {**self.kw, **self._per_token(ids.shape[1])}
        inputs = self.model.prepare_inputs_for_generation(ids, next_sequence_length=new, is_first_iteration=first, **kw)
        out = self.model(**inputs, return_dict=True)
        self.forwards += 1
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

    def branch(self, ids: Tensor, tokens: Tensor) -> None:
        """Forward ``tokens`` ``[rows, n]`` as ``n`` alternative next tokens of ``ids`` in **one** forward: all at the
        next position, each seeing the cached sequence and itself only (a 4D mask), then crop them off again.
        The same attention as ``n`` calls of :meth:`probe`, for the price of about one (a loop reads the rows
        through the plan's callbacks)."""
        rows, n = tokens.shape
        length = ids.shape[1]
        mask = torch.ones(rows, 1, n, length + n, dtype=torch.bool, device=ids.device)
        mask[..., length:] = torch.eye(n, dtype=torch.bool, device=ids.device)
        positions = self._prompt.get("position_ids")
        if positions is None:
            pos = torch.full((rows, n), length, dtype=torch.long, device=ids.device)
        else:
            pos = self._per_token(length + 1)["position_ids"][..., -1:].expand(rows, n)
        extra = {k: v for k, v in self._per_token(length + n).items() if k in ("token_type_ids", "mm_token_type_ids")}
        self.model(input_ids=tokens, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True,
                   return_dict=True, **{k: v[:, -n:] for k, v in extra.items()})
        self.forwards += 1
        self.cache.crop(-n)

    def rewind(self, ids: Tensor, keep: int) -> Tensor:
        """Crop the cache to its first ``keep`` tokens and forward ``ids[:, keep:]`` as one chunk (the rows of
        ``ids`` may be other beams than the cache's: every row shares the first ``keep`` tokens).
        Returns the next-token logits after ``ids``."""
        keep = min(keep, ids.shape[1] - 1)  # at least one token forwarded: its logits are the answer
        cached = self.cache.get_seq_length()
        if cached > keep:
            self.cache.crop(keep - cached)
        return self._forward(ids, ids.shape[1] - keep)

    def reorder(self, beam_idx: Tensor) -> None:
        self.cache.reorder_cache(beam_idx)


class BeamScorer:
    """Beam search's bookkeeping for one sample, with transformers 4.29's ``BeamSearchScorer`` semantics.

    Each step takes the top ``2 * beams`` (token, score) pairs over the beams: a pair ending in EOS
    among the first ``beams`` ranks becomes a finished hypothesis (without the EOS, scored
    ``sum_logprobs / len ** length_penalty`` where ``len`` counts the prompt too, as 4.29 did), the
    others continue, ``beams`` of them. The sample is done when ``beams`` hypotheses are finished
    and, with ``early_stopping=False``, none of the running beams could beat the worst of them at
    the current length. :meth:`finalize` adds the running beams and returns the best ``keep``.
    Plain Python state: ``copy.deepcopy`` snapshots it for a rollback.
    """

    def __init__(self, beams: int, length_penalty: float, early_stopping: bool | str, keep: int,
                 max_length: int) -> None:
        self.beams, self.length_penalty, self.early_stopping = beams, length_penalty, early_stopping
        self.keep, self.max_length = keep, max_length
        self.hyps: list[tuple[float, Tensor]] = []
        self.worst = 1e9
        self.done = False

    def copy(self) -> BeamScorer:
        return copy.deepcopy(self)

    def _add(self, hyp: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
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
            return self.worst >= best_sum_logprobs / cur_len ** self.length_penalty
        return self.worst >= best_sum_logprobs / self.max_length ** self.length_penalty  # "never"

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
