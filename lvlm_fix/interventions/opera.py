"""OPERA: beam search with an over-trust penalty and retrospection (Huang et al., CVPR 2024).

OPERA owns the decoding loop (stage ``DECODING``): it is beam search whose candidates are
re-scored by what the last decoder layer's attention says about them, with a rollback when the
same over-trusted "summary" token keeps coming back.

Each step, for every beam row:

1. **Candidates.** ``Y`` = the top ``N`` tokens of the raw next-token logits ``l``. Each candidate
   ``c`` is forwarded once after the row, on the live cache. Alone in the plan, all candidates of
   all rows are one branched forward, and the chosen candidate's forward is kept as the step's
   (its keys and values, next-token logits and attention row: exactly what a forward of the chosen
   token computes), the others cropped; a chosen token that was not a candidate (a rollback's
   choice, a processor's push) is forwarded on its own after the crop.
2. **Attention statistic.** The last layer's post-softmax row of a query, reduced by a max over
   heads and renormalised over its keys: ``ã = max_h A_h / Σ_k max_h A_h[k]``.
3. **Over-trust score.** In the square of the response (rows and columns from the response start
   to the candidate, every generated token plus ``c``), scaled by ``σ``: the column score
   ``φ_j = 1e-7 · Π_{i=j..t} σ ã_i[j]`` (the product runs down column ``j`` from the diagonal),
   ``φ(c) = max_j φ_j`` and ``loc_c = argmax_j φ_j``. The image score ``ι_c = Σ_{image keys} ã_c``.
4. **Penalised logits.** ``s_c = l_c + w ι_c`` while at most ``bonus_tokens`` tokens (the candidate
   included) are in the response, else ``s_c = l_c - w φ(c)``; every other token gets ``-999``.
   Then ``log_softmax`` (the candidates' renormalised log-probabilities), the logits processors and
   beam search's selection (top ``2·beams`` of ``beams·V``, 4.29 ``BeamSearchScorer`` semantics:
   :class:`~lvlm_fix.hooks.decoding.BeamScorer`).
5. **Retrospection.** ``loc_b`` = the mode of ``loc_c`` over a row's candidates, ``loc`` = the mode of
   ``loc_b`` over the rows; each row keeps the history of its ``loc_b``. When every row's history
   holds ``loc`` more than ``threshold`` times and ``loc >= min_rollback_loc``, decoding rolls back
   to response position ``loc + 1``: the beams, their scores and the scorer from just before that
   token was chosen are restored, and the token is chosen again from the full-vocabulary logits
   (shifted so that their minimum is ``-999``, no candidate restriction, no penalty) with every
   (beam, token) pair chosen there before set to ``-999``. A position is a target at most ``N``
   times; then the target moves to ``loc``; when that is exhausted too, there is no rollback.

Defaults (``shikiw/OPERA`` @ 61426ef, its vendored transformers 4.29.2 ``generation/utils.py``, the
``chair_eval.py`` / ``pope_eval.py`` scripts and the README): ``scale_factor`` 50, ``threshold`` 15,
``num_attn_candidates`` 5, ``penalty_weights`` 1, beam 5 (the call's ``num_beams``); hard-coded there:
the 10-token bonus regime, no rollback below position 10, ``1e-7`` and ``-999``.

Deviations from the release (``release_compat=True`` restores the first four):

* **fp32 penalty.** The release stores ``φ`` in an fp16 buffer (and, on the fp16 models it ran,
  computes it in fp16): the penalty is then either below ``1e-7·65504`` or ``inf``, a step function.
  Here it is computed and kept in fp32. Compat: ``ã`` cast to fp16, scaled and multiplied in fp16,
  stored in fp16, as the paper's fp16 runs did.
* **Rejections cleared at the right positions.** On a rollback the release clears the last slots of
  its 512-long rejection list instead of the positions after the target, so stale rejections
  survive. Here every position after the target is cleared.
* **Location history follows the beams.** The release does not reorder a row's ``loc`` history when
  beams move; here it is reordered with the beams (and restored with them on a rollback).
* **Targets at the newest token.** When ``loc + 1`` is the current step or later (no token has been
  chosen there yet), the release restores the state one step earlier and files the rejections at
  ``loc + 1``. Here there is nothing to retract: no rollback. The release also restores the scorer
  object kept in its history (not a copy), so a later rollback to the same step sees it mutated;
  here each restore takes a copy.
* **No re-prefill.** The release re-runs a full prefill (image included) on every rollback; here
  the cache is cropped to the prompt and the restored beams' tokens are re-forwarded as one chunk
  (the same math within float rounding). Candidates are forwarded on the live cache; the chosen
  one's forward is reused as the step (within float rounding of a forward of its own).
* **Batches.** The release is batch-1 only (one rollback decision for the whole batch). Here each
  sample is an independent search, run in lock step with the others: one ``generate()`` call, the
  rows samples x beams, every forward batched over them, and per sample its own scorer, ``loc``,
  location history, rollback decision and selection over its own beams. Finished samples stay in
  the batch as padding rows (as generate()'s beam search keeps them) until every sample is done.
  A sample that must roll back while others share the batch is split off (its rows copied out of
  the cache, its left padding masked) and decoded alone to its end; the others go on in lock step.
  The 4.29 scorer's lengths leave a row's left padding out, so each row's search is its own alone.
  That split is refused in one line on M-RoPE models (Qwen2-VL keeps position offsets for the
  whole batch) and when OPERA is composed (the other methods keep per-row state).
* **Bounded memory.** Only each response row's window and image sum are kept, not full attention
  maps; the history covers the whole response (the release's 512-state bound only matters past 512
  tokens, where its rejection list would overflow).
* **Image positions** come from the model's image tokens of each row (the release hard-codes the
  576 tokens of LLaVA-1.5's image).
* **Greedy** (``num_beams=1``) runs as a one-beam OPERA search (the release refuses it). Sampling is
  refused: OPERA is a beam search.

Composition: OPERA's forwards are the plan's, so attention, head, MLP and in-forward logits methods
compose with it (their edits shape the attention OPERA reads and the logits it ranks). A method
that decodes a contrast stream (VCD, ICD, M3ID, PAI's guidance) is refused: the stream decodes in
lock step with generate()'s own rows and cannot follow candidates and rollbacks. A second method
of the decoding stage is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError
from ..hooks.decoding import BeamScorer, Decoder, merge_samples, own_decoding
from ..hooks.plan import static_cache
from .base import Intervention, MethodConfig, Stage, param
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.capture import HookSet
    from ..hooks.plan import AttnContext, Plan
    from ..model import LVLM

REJECTED = -999.0  # the release's fill for non-candidates and rejected pairs (utils.py:3543, 3556)
TINY = 1e-7  # the release's factor before the column product is stored (utils.py:3427)
SLOTS = 512  # the release's rejection list (window_size, utils.py:3134); release_compat only


@dataclass(frozen=True, kw_only=True)
class OperaConfig(MethodConfig):
    scale_factor: float = param(50.0, "Scales the attention weights in the response window before the column "
                                      "products (sigma). Default 50 (source: OPERA README, chair_eval.py, "
                                      "utils.py:1159).", lo=0.0, lo_open=True)
    threshold: int = param(15, "A rollback needs every beam's location history to hold the current location "
                               "more than this many times (r). Default 15 (source: OPERA README, chair_eval.py, "
                               "utils.py:1160; the README's efficient setting is 25).", lo=0)
    num_attn_candidates: int = param(5, "Candidates per beam (N): the top-N tokens of the raw logits, each "
                                        "forwarded once; also the most rollbacks to one position. 0 turns OPERA "
                                        "off. Default 5 (source: OPERA README, chair_eval.py, utils.py:1161).",
                                     lo=0)
    penalty_weights: float = param(1.0, "Weight of the over-trust penalty and of the image-attention bonus (w). "
                                        "Default 1 (source: OPERA README, chair_eval.py, utils.py:1162).", lo=0.0)
    rollback: bool = param(True, "Retrospection: roll back when the over-trust location repeats. Default true "
                                 "(source: OPERA utils.py:3459, always on there).")
    bonus_tokens: int = param(10, "While the response (with the candidate) has at most this many tokens, the "
                                  "candidates get the image-attention bonus instead of the penalty. Default 10 "
                                  "(source: OPERA utils.py:3440, hard-coded there).", lo=0)
    min_rollback_loc: int = param(10, "No rollback to a location below this response position. Default 10 "
                                      "(source: OPERA utils.py:3460, hard-coded there).", lo=0)
    release_compat: bool = param(False, "Reproduce the release: the fp16 penalty buffer, stale rejections, the "
                                        "location history not reordered with the beams, and its rollback target "
                                        "one step early at the newest token. Default false (source: this "
                                        "port; see docs/methods/opera.md).")

    @classmethod
    def noop(cls) -> OperaConfig:
        return cls(num_attn_candidates=0)  # no candidate: nothing installed, generate() decodes as it would

    @classmethod
    def math_identity(cls) -> OperaConfig:
        # The candidates run and are read, nothing is penalised or rolled back. With one beam (greedy)
        # the chosen token is the argmax, as vanilla's; with more beams the restriction to the top N
        # renormalises each beam's log-probabilities, so only N >= vocabulary is vanilla beam search
        # (tests/test_opera.py checks that on a small vocabulary).
        return cls(penalty_weights=0.0, rollback=False, num_attn_candidates=2)


@register_method
class Opera(Intervention):
    """OPERA: beam search re-scored by an over-trust penalty on the last layer's attention, with rollback."""

    name = "opera"
    stage = Stage.DECODING
    config_cls = OperaConfig

    def bind(self, lvlm: LVLM) -> None:
        # The last layer runs lvlm-fix's eager attention so that post_softmax can read every query row of a
        # branched forward (an observed layer gives the last query's only); OPERA never edits it.
        self.eager_layers = frozenset({lvlm.num_layers - 1}) if self.active else frozenset()
        self._alone = True
        self._capture: dict[str, Any] | None = None
        self._stats = {"samples": 0, "steps": 0, "candidates": 0, "forwards": 0, "bonus_steps": 0, "rollbacks": []}

    @property
    def active(self) -> bool:
        return self.config.num_attn_candidates > 0

    def install(self, plan: Plan, hooks: HookSet) -> None:
        if self.active:
            # Composed, each candidate is a forward of its own: the other methods then see ordinary decode steps
            # (a branched forward would look to them like a prefill chunk whose last query alone is "new").
            self._alone = plan.participants == [self]
            own_decoding(plan, hooks, self.search)

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        if not self.active:
            return
        gc = generation_config
        if gc.do_sample:
            raise LvlmFixError("opera is a beam search: do_sample=True is not served; use do_sample=False with "
                               "num_beams (the release uses 5)")
        if (gc.num_return_sequences or 1) > gc.num_beams:
            raise LvlmFixError(f"num_return_sequences={gc.num_return_sequences} exceeds num_beams={gc.num_beams}; "
                               "ask for at most num_beams sequences")
        if getattr(gc, "num_beam_groups", 1) and getattr(gc, "num_beam_groups", 1) > 1:
            raise LvlmFixError(f"num_beam_groups={gc.num_beam_groups} (diverse beam search) is not served by opera; "
                               "drop num_beam_groups")
        if getattr(gc, "prompt_lookup_num_tokens", None):
            raise LvlmFixError("prompt_lookup_num_tokens (assisted decoding) is not served by opera; drop it")
        if gc.use_cache is False:
            raise LvlmFixError("use_cache=False: opera forwards its candidates on the cache; drop use_cache=False")
        what = static_cache(gc, model_kwargs)
        if what:
            raise LvlmFixError(f"{what}: opera crops the cache after each candidate, which a static cache cannot "
                               "do; use the default dynamic cache")
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if gc.cache_implementation == "quantized" or "Quantized" in type(cache).__name__:
            # A crop of a quantized cache does not give back the keys as they were before the candidates.
            raise LvlmFixError("a quantized cache: opera forwards its candidates on the cache and crops them off, which "
                               "a quantized cache does not undo exactly; use the default dynamic cache")
        if gc.output_attentions or gc.output_hidden_states:
            raise LvlmFixError("output_attentions / output_hidden_states are not returned by opera's loop; drop them")

    # -- the attention read ----------------------------------------------------------------------
    def post_softmax(self, probs: Tensor, ctx: AttnContext) -> Tensor:  # [rows, heads, q, keys], the last layer
        """Reads (never edits) the last layer's weights of the forwards the search asks for: each query row
        reduced by a max over heads and renormalised over its keys, and its sum over the row's image keys."""
        if self._capture is not None:
            row = probs.amax(dim=1)  # [rows, q, keys]
            row = row / row.sum(dim=-1, keepdim=True)
            image = (row * ctx.image_keys[:, None, :].to(row.dtype)).sum(dim=-1)
            q, k = ctx.q_len or row.shape[1], ctx.k_len or row.shape[2]
            if ctx.chunk is None or row.shape[1:] == (q, k):
                self._capture["rows"], self._capture["image"] = row, image
            else:  # a query chunk (a long branch): its rows, over the keys it may see, into the forward's map
                rows = self._capture.setdefault("rows", row.new_zeros(row.shape[0], q, k))
                rows[:, ctx.chunk, : row.shape[2]] = row
                self._capture.setdefault("image", image.new_zeros(row.shape[0], q))[:, ctx.chunk] = image
        return probs

    def _read(self, run) -> tuple[Any, Tensor, Tensor]:
        """Run a forward and return its result with the last layer's renormalised rows ``[rows, q, keys]``
        and their image sums ``[rows, q]``."""
        self._capture = {}
        try:
            out = run()
            seen = self._capture
        finally:
            self._capture = None
        if "rows" not in seen:
            raise LvlmFixError("opera read no attention of the last layer in this forward; is another method "
                               "replacing that layer's attention?")
        return out, seen["rows"], seen["image"]

    def candidates(self, dec: Decoder, ids: Tensor, cand: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each candidate's row over the response columns ``[rows, N, t+1]`` (the last column its own), its
        image sum ``[rows, N]`` and, when branched, its next-token logits ``[rows, N, V]`` (the branch stays in
        the cache for :meth:`Decoder.accept`): one branched forward when OPERA is alone in the plan, else one
        forward per candidate (then composed methods see ordinary decode steps) and no logits."""
        start, length = dec.prompt_len, ids.shape[1]
        if self._alone and dec.can_branch:
            logits, rows, image = self._read(lambda: dec.branch(ids, cand))  # rows: [rows, N, length + N]
            own = rows[:, :, length:].diagonal(dim1=1, dim2=2)  # each candidate's weight on itself
            return torch.cat([rows[:, :, start:length], own[..., None]], dim=-1), image, logits
        windows, images = [], []
        for k in range(cand.shape[1]):
            _, rows, image = self._read(lambda k=k: dec.probe(ids, cand[:, k]))
            windows.append(rows[:, -1, start:])
            images.append(image[:, -1])
        return torch.stack(windows, dim=1), torch.stack(images, dim=1), None

    # -- the math --------------------------------------------------------------------------------
    def column_scores(self, window: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """``φ(c)`` and ``loc_c`` ``[rows, N]`` from the response rows ``window`` ``[rows, t, t]`` (row i: the
        renormalised attention of response token i over the response) and the candidates' rows ``cand``
        ``[rows, N, t+1]``."""
        return over_trust(window, cand, self.config.scale_factor, fp16=self.config.release_compat)

    def search(self, dec: Decoder, processors: Any, stopping: Any, gc: Any) -> dict[str, Any]:
        """OPERA's beam search (module docstring) for every sample of the batch, in lock step: the decoder's rows
        are samples x beams; each sample's search is its own (scorer, location history, rollbacks)."""
        beams = gc.num_beams
        eos = [int(x) for x in gc._eos_token_tensor.flatten().tolist()] if gc._eos_token_tensor is not None else []
        pad = int(gc._pad_token_tensor) if gc._pad_token_tensor is not None else (eos[0] if eos else 0)
        run = _Run(processors, stopping, eos, pad, beams, dec.prompt_len)
        device = dec.input_ids.device
        padding = dec.left_padding.tolist()
        samples = [_Sample(BeamScorer(beams, gc.length_penalty, gc.early_stopping, gc.num_return_sequences or 1,
                                         stopping.max_length, padding[i * beams]), device, self.config.release_compat)
                   for i in range(dec.input_ids.shape[0] // beams)]
        self._stats["samples"] += len(samples)
        logits = dec.prefill()
        window = torch.zeros(dec.input_ids.shape[0], 0, 0, device=device)  # [rows, t, t]
        self._lockstep(run, dec, samples, dec.input_ids, window, logits)
        self._stats["forwards"] += dec.forwards
        return merge_samples([s.result for s in samples], pad)

    def _lockstep(self, run: _Run, dec: Decoder, group: list[_Sample], ids: Tensor, window: Tensor, logits: Tensor,
                  redo: tuple[_Sample, tuple[int, int], int] | None = None) -> None:
        """Decode ``group`` (the samples whose rows ``dec`` holds, in order, ``beams`` rows each) to their end.
        A finished sample's rows stay in the batch as padding (as generate()'s beam search keeps them). A sample
        that must roll back while other samples share ``dec`` is taken out into a decoder of its own and decoded
        to its end alone first (``redo``: that rollback, for its first step); the others go on in lock step."""
        cfg, start, beams = self.config, run.start, run.beams
        while True:
            t = ids.shape[1] - start  # tokens generated so far: the same for every row
            vocab = logits.shape[-1]
            n = min(cfg.num_attn_candidates, vocab)
            branched = None  # the branch's logits: the next step's forward when every chosen token is a candidate
            if redo is None:
                running = [s for s in group if s.result is None]
                cand_logits, cand = logits.topk(n, dim=-1)  # on the raw logits, as the release
                cand_rows, iota, branched = self.candidates(dec, ids, cand)
                self._stats["candidates"] += n * len(running)
                phi, loc_c = self.column_scores(window, cand_rows)
                if t + 1 <= cfg.bonus_tokens:
                    penalised = cand_logits + cfg.penalty_weights * iota
                    self._stats["bonus_steps"] += len(running)
                else:
                    penalised = cand_logits - cfg.penalty_weights * phi
                loc_b = loc_c.mode(dim=-1).values  # [rows]
                step_logits = torch.full_like(logits, REJECTED).scatter_(-1, cand, penalised)
                raw = logits
                rolls = []
                for k, s in enumerate(group):
                    if s.result is not None:
                        continue
                    mine = loc_b[k * beams:(k + 1) * beams]
                    loc = int(mine.mode().values)
                    s.hist = torch.cat([s.hist, mine[None]], dim=0)
                    s.states.append({"ids": ids[k * beams:(k + 1) * beams], "scorer": s.scorer.copy(),
                                     "beam_scores": s.beam_scores, "hist": s.hist})
                    where = self._target(s.hist, loc, t, s.times, n) if cfg.rollback else None
                    if where is not None:
                        rolls.append((k, (s, where, loc)))
                if rolls and len(group) > 1:
                    if not self._alone:
                        raise LvlmFixError("a sample of this batch must roll back alone, which opera serves only when "
                                           "it is the call's only method (composed methods keep state for every row); "
                                           "generate one row at a time")
                    out = {k for k, _ in rolls}
                    for k, split in rolls:  # each decoded to its end alone, from its rollback
                        mine = torch.arange(k * beams, (k + 1) * beams, device=ids.device)
                        self._lockstep(run, dec.take(mine), [split[0]], ids[mine], window[mine], logits[mine], split)
                    stay = [k for k in range(len(group)) if k not in out]
                    if not stay or all(group[k].result is not None for k in stay):
                        return
                    keep = torch.cat([torch.arange(k * beams, (k + 1) * beams, device=ids.device) for k in stay])
                    group = [group[k] for k in stay]
                    dec = dec.take(keep, in_place=True)  # the split rows' copies hold them now
                    ids, window, logits, raw = ids[keep], window[keep], logits[keep], raw[keep]
                    step_logits, cand, cand_rows = step_logits[keep], cand[keep], cand_rows[keep]
                    branched = branched[keep] if branched is not None else None
                elif rolls:
                    redo = rolls[0][1]
            if redo is not None:  # the only sample of dec rolls back
                s, (target, slot), loc = redo
                ids, window, step_logits, raw = self._roll(dec, s, target, slot, loc, t, vocab, start)
                branched, redo = None, None
            ids, beam_idx, tokens, processed = self._select(run, group, ids, step_logits, raw, vocab)
            if all(s.result is not None for s in group):
                return
            w_row = None
            if branched is not None and dec.can_accept:
                chosen = cand[beam_idx] == tokens[:, None]  # [rows, N]: where each new row's token is among its
                finished = torch.tensor([s.result is not None for s in group], device=ids.device)
                finished = finished.repeat_interleave(beams)
                if bool((chosen.any(dim=-1) | finished).all()):  # source beam's candidates (finished rows: any)
                    slot = chosen.int().argmax(dim=-1)
                    dec.accept(beam_idx, slot)  # the chosen candidate's forward is this step's
                    logits, w_row = branched[beam_idx, slot], cand_rows[beam_idx, slot]
            if w_row is None:  # a token that was not forwarded (a rollback's choice, a processor's push)
                dec.reorder(beam_idx)
                logits, rows_seen, _ = self._read(lambda: dec.step(ids))
                w_row = rows_seen[:, -1, start:]  # the new token's row over the response
            for k, s in enumerate(group):
                if s.result is None:
                    s.new_rows.append(w_row[k * beams:(k + 1) * beams])
            window = grow_window(window, beam_idx, w_row)

    def _select(self, run: _Run, group: list[_Sample], ids: Tensor, step_logits: Tensor, raw: Tensor,
                vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Beam search's choice for every running sample of ``group`` (the top ``2*beams`` of its ``beams*V``);
        a finished sample's rows continue its first beam with padding. Returns the new ids, the source row and
        token of every new row, and the processed log-probabilities."""
        beams, compat = run.beams, self.config.release_compat
        log_probs = torch.log_softmax(step_logits, dim=-1)
        processed = run.processors(ids, log_probs)
        scores = torch.cat([s.beam_scores for s in group])
        top, flat_idx = (processed + scores[:, None]).view(len(group), beams * vocab).topk(2 * beams, dim=-1)
        sources, tokens = [], []
        for k, s in enumerate(group):
            rows = slice(k * beams, (k + 1) * beams)
            if s.result is not None:
                sources.append(torch.full((beams,), k * beams, dtype=torch.long, device=ids.device))
                tokens.append(torch.full((beams,), run.pad, dtype=ids.dtype, device=ids.device))
                continue
            s.beam_scores, tok, src = s.scorer.process(ids[rows], top[k], flat_idx[k] % vocab, flat_idx[k] // vocab,
                                                       set(run.eos), run.pad)
            s.chosen.append((src, tok))
            s.scores_out.append(processed[rows])
            s.logits_out.append(raw[rows])
            if not compat:  # the history follows its beams (the release keeps it in place)
                s.hist = s.hist[:, src]
            self._stats["steps"] += 1
            sources.append(src + k * beams)
            tokens.append(tok)
        beam_idx, chosen = torch.cat(sources), torch.cat(tokens)
        ids = torch.cat([ids[beam_idx], chosen[:, None]], dim=1)
        for k, s in enumerate(group):
            rows = slice(k * beams, (k + 1) * beams)
            if s.result is None and (s.scorer.done or bool(run.stopping(ids[rows], processed[rows]).all())):
                sequences, seq_scores = s.scorer.finalize(ids[rows], s.beam_scores, run.eos, run.pad)
                s.result = {"sequences": sequences, "sequences_scores": seq_scores, "scores": tuple(s.scores_out),
                            "logits": tuple(s.logits_out)}
                s.beam_scores = torch.zeros_like(s.beam_scores)
        return ids, beam_idx, chosen, processed

    def _roll(self, dec: Decoder, s: _Sample, target: int, slot: int, loc: int, t: int, vocab: int,
              start: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Roll ``s`` (the only sample of ``dec``) back to step ``target`` (module docstring, step 5): its state
        from before that step restored, the cache rewound, and the full-vocabulary logits with the pairs rejected
        at ``slot`` (``target`` but in compat mode). Returns its ids, response window, step and raw logits."""
        compat = self.config.release_compat
        state = s.states[target]
        del s.states[target + 1:]
        bad_idx, bad_tok = s.chosen[target]
        del s.chosen[target:], s.new_rows[target:], s.scores_out[target:], s.logits_out[target:]
        ids, s.beam_scores, s.hist = state["ids"], state["beam_scores"], state["hist"]
        # compat: the scorer object kept in the history itself (utils.py:3487), later mutated
        s.scorer = state["scorer"] if compat else state["scorer"].copy()
        window = rebuild_window(s.new_rows, s.chosen, ids.shape[0])
        rejected = s.rejected
        if compat:  # utils.py:3479-3481, 3540: the tail slots of the 512-long list, then loc + 2
            for j in range(max(0, t - slot - 1)):
                rejected[-(j + 1)] = []
            rejected[slot + 1] = []
        else:
            for pos in [p for p in rejected if p > target]:
                del rejected[pos]
        pairs = bad_idx * vocab + bad_tok
        previous = rejected[slot] if compat else rejected.get(slot, [])
        rejected[slot] = [*previous, pairs]
        raw = dec.rewind(ids, start)
        step_logits = raw - (-REJECTED + raw.min(dim=-1, keepdim=True).values)  # minimum at -999
        step_logits.view(-1)[torch.cat(rejected[slot])] = REJECTED
        self._stats["rollbacks"].append({"step": t, "to": target, "loc": loc})
        return ids, window, step_logits, raw

    def _target(self, hist: Tensor, loc: int, t: int, times: dict[int, int], n: int) -> tuple[int, int] | None:
        """The step to restore and the rejection slot, or None: no rollback (module docstring, step 5)."""
        cfg = self.config
        if not bool(((hist == loc).sum(dim=0) > cfg.threshold).all()) or loc < cfg.min_rollback_loc:
            return None
        pos = loc + 1
        if times.get(pos, 0) >= n:
            pos -= 1
            if times.get(pos, 0) >= n:
                return None
        if not cfg.release_compat and pos > t - 1:
            return None  # no token has been chosen at pos yet: nothing to retract
        if cfg.release_compat and pos + 1 >= SLOTS:
            return None  # the release's rejection list overflows: its bare except means no rollback
        times[pos] = times.get(pos, 0) + 1
        # The release restores history_states[-2] after popping: the state of pos, or of t - 1 when pos >= t.
        return (min(pos, t - 1), pos) if cfg.release_compat else (pos, pos)

    def report(self) -> dict[str, Any]:
        stats = getattr(self, "_stats", None)
        if stats is None:
            return {"active": False}
        return {"active": self.active, **{k: v for k, v in stats.items() if k != "rollbacks"},
                "rollbacks": len(stats["rollbacks"]), "rollback_targets": [r["to"] for r in stats["rollbacks"]]}

    def summarize(self, report: dict[str, Any]) -> str:
        if not report.get("active"):
            return "off"
        return (f"{report['steps']} beam steps over {report['samples']} sample(s), {report['candidates']} "
                f"candidates read in {report['forwards']} forwards, {report['rollbacks']} rollback(s)")


class _Run:
    """What a search's steps share: generate()'s processors and stopping criteria, EOS and padding, the beams."""

    def __init__(self, processors: Any, stopping: Any, eos: list[int], pad: int, beams: int, start: int) -> None:
        self.processors, self.stopping, self.eos, self.pad, self.beams, self.start = (processors, stopping, eos, pad,
                                                                                     beams, start)


class _Sample:
    """One sample's search: its scorer, beam scores, location history, per-step states for a rollback, rejections
    and outputs (beam indices local to its ``beams`` rows). ``result`` is set when its search ends."""

    def __init__(self, scorer: BeamScorer, device: Any, compat: bool) -> None:
        beams = scorer.beams
        self.scorer = scorer
        self.beam_scores = torch.zeros(beams, device=device)
        self.beam_scores[1:] = -1e9  # only the first beam's continuations at the first step (identical rows)
        self.hist = torch.zeros(0, beams, dtype=torch.long, device=device)  # [steps, beams]: each row's loc_b per step
        self.new_rows: list[Tensor] = []  # new_rows[s-1]: the row of response token s-1 (read at step s), per beam then
        self.chosen: list[tuple[Tensor, Tensor]] = []  # chosen[s]: (beam_idx, tokens) picked at step s
        self.states: list[dict[str, Any]] = []  # states[s]: the beams before step s's choice
        self.times: dict[int, int] = {}  # rollbacks per target position
        self.rejected: dict[int, list[Tensor]] | list[list[Tensor]] = [[] for _ in range(SLOTS)] if compat else {}
        self.scores_out: list[Tensor] = []
        self.logits_out: list[Tensor] = []
        self.result: dict[str, Any] | None = None


def over_trust(window: Tensor, cand: Tensor, scale: float, fp16: bool = False) -> tuple[Tensor, Tensor]:
    """The column scores ``φ_j = 1e-7 · Π_{i=j..t} σ ã_i[j]`` of each candidate's response square, their
    max ``φ(c)`` and argmax ``loc_c`` ``[rows, N]``.

    ``window`` ``[rows, t, t]``: the response rows before the candidate (lower triangular);
    ``cand`` ``[rows, N, t+1]``: each candidate's row. ``fp16``: the release's fp16 path (the square
    in fp16, scaled and multiplied in fp16, the result stored in fp16).
    """
    rows, n, size = cand.shape
    t = size - 1
    if fp16:
        square = torch.zeros(rows, n, size, size, dtype=torch.float16, device=cand.device)
        square[:, :, :t, :t] = window[:, None].to(torch.float16)
        square[:, :, t, :] = cand.to(torch.float16)
        square = scale * square
        phi = torch.zeros(rows, n, size, dtype=torch.float16, device=cand.device)
        for j in range(size):
            phi[..., j] = TINY * square[..., j:, j].prod(-1)
    else:
        scaled = scale * window.float()  # [rows, t, t]
        below = torch.ones(t, t, dtype=torch.bool, device=cand.device).tril()  # i >= j
        column = torch.where(below, scaled, torch.ones_like(scaled)).prod(dim=1)  # [rows, t]: Π_{i=j..t-1}
        last = scale * cand.float()  # [rows, N, t+1]
        phi = torch.cat([column[:, None] * last[..., :t], last[..., t:]], dim=-1) * TINY
    score, loc = phi.max(dim=-1)
    return score.float(), loc


def grow_window(window: Tensor, beam_idx: Tensor, row: Tensor) -> Tensor:
    """The response rows after a step: the chosen beams' rows, one more column, and the new row ``[rows, t]``."""
    rows, t, _ = window.shape
    grown = window.new_zeros(rows, t + 1, t + 1)
    grown[:, :t, :t] = window[beam_idx]
    grown[:, t, :] = row
    return grown


def rebuild_window(new_rows: list[Tensor], chosen: list[tuple[Tensor, Tensor]], rows: int) -> Tensor:
    """The response rows of the beams at step ``len(new_rows)``, replayed from each step's new rows and beam choices."""
    device = new_rows[0].device if new_rows else None
    window = torch.zeros(rows, 0, 0, device=device)
    for s, row in enumerate(new_rows):
        window = grow_window(window, chosen[s][0], row)
    return window

