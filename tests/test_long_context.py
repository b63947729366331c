"""Long prompts at edited layers: query chunks (a bounded fp32 block) give the unchunked result.

Tiny prompts are forced into chunks with ``plan.block_bytes``; each test compares a chunked run
with an unchunked one of the same plan: tokens equal, logits (prefill and every decode step) and
reports within 1e-6 in fp32.
"""

from __future__ import annotations

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS
from lvlm_fix.diagnostics import HeadStatistics, LastPositionHeads
from lvlm_fix.errors import LvlmFixError
from lvlm_fix.hooks import Participant, Plan, attention
from lvlm_fix.interventions.carve import ImageAttentionRecorder

TOL = 1e-6
# As tests/test_methods.py: each acts on tiny models.
ACTIVE = {"var": {"tau": 2.5}, "act": {"thres": 0.03}, "pai": {}, "paint": {}}


def _block(lvlm, batch, queries: int) -> int:
    """``plan.block_bytes`` that fits ``queries`` query rows of the prefill's fp32 map."""
    b, t = batch["input_ids"].shape
    return queries * 4 * b * lvlm.num_heads * t


@pytest.fixture
def chunks(monkeypatch):
    """The (start, stop) of every query chunk the edited layers processed, in call order."""
    seen: list[tuple[int, int, bool]] = []
    original = attention._chunk_context

    def spy(ctx, q0, q1, kc, stats_pass=False):
        seen.append((q0, q1, stats_pass))
        return original(ctx, q0, q1, kc, stats_pass)

    monkeypatch.setattr(attention, "_chunk_context", spy)
    return seen


def _generate(lvlm, batch, participants_or_method, block: int | None, **params):
    gen = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if isinstance(participants_or_method, str):
        ctx = lvlm_fix.apply(lvlm, participants_or_method, **params)
    else:
        ctx = Plan(lvlm, participants_or_method).active()
    with ctx as plan, torch.inference_mode():
        plan.block_bytes = block
        out = lvlm.model.generate(**batch, **gen)
    return out, plan


def _assert_same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert (x - y).abs().max() <= TOL, (step, (x - y).abs().max())


def _close(a, b) -> bool:
    """Reports equal, floats within TOL."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= TOL
    return a == b


# -- the built-in attention methods ----------------------------------------------------------------
# 1 row: sdpa's implicit causal mask; 3 rows: left padding, a boolean mask (Gemma3: bidirectional
# image blocks and sliding-window layers).
CASES = [(name, family, rows) for name in ("var", "act")
         for family, rows in (("llava", 1), ("llava", 3), ("qwen2_vl", 1), ("qwen2_vl", 3), ("gemma3", 3))]
# PAI and PAINT edit the last query row only (PAINT reads a CLS token: LLaVA's tower has one).
CASES += [("pai", "llava", 3), ("pai", "qwen2_vl", 3), ("paint", "llava", 1), ("paint", "llava", 3)]


@pytest.mark.parametrize("name, family, rows", CASES)
def test_chunked_method_equals_unchunked(name, family, rows, tiny, images, chunks):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:rows], PROMPTS[:rows])
    whole, whole_plan = _generate(lvlm, batch, name, None, **ACTIVE[name])
    assert not chunks
    chunked, plan = _generate(lvlm, batch, name, _block(lvlm, batch, 5), **ACTIVE[name])
    _assert_same(chunked, whole)
    assert _close(plan.report(), whole_plan.report())
    assert any(q1 - q0 == 5 for q0, q1, _ in chunks)
    # ACT's sinks need every query's column statistics first; VAR has none.
    assert any(stats for *_, stats in chunks) == (name == "act")
    vanilla = lvlm.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert not torch.allclose(vanilla.logits[0], whole.logits[0])  # the method did act


# -- the contract, on a participant of each kind ---------------------------------------------------
class ColumnDamp(Participant):
    """Needs a column statistic: halves, in every query row, the key that receives the most attention
    summed over all valid queries (ACT's shape of method), and records what each callback saw."""

    def __init__(self, layer: int) -> None:
        self.eager_layers = self.column_stats_layers = frozenset({layer})
        self.calls: list[tuple[str, int, int, int, bool]] = []  # (callback, step, chunk start, stop, stats pass)
        self.columns: dict[int, torch.Tensor] = {}  # step -> [b, h, k] column sums
        self.top: torch.Tensor | None = None

    def _check(self, name: str, x: torch.Tensor, ctx) -> None:
        b, h, q, k = x.shape
        assert ctx.query_positions.shape == (q,) and ctx.chunk.stop - ctx.chunk.start == q
        assert ctx.key_positions.shape == (k,) and ctx.image_keys.shape == ctx.key_valid.shape == (b, k)
        assert k <= ctx.k_len and ctx.has_last_query == (ctx.chunk.stop == ctx.q_len)
        self.calls.append((name, ctx.step, ctx.chunk.start, ctx.chunk.stop, ctx.stats_pass))

    def pre_softmax(self, scores, ctx):
        self._check("pre", scores, ctx)
        return scores

    def begin(self, tokens) -> None:
        self.tokens = tokens

    def accumulate(self, scores, probs, ctx):
        self._check("acc", probs, ctx)
        if ctx.chunk.start == 0:
            self.columns[ctx.step] = probs.new_zeros(*probs.shape[:2], ctx.k_len)
            self.top = None
        queries = self.tokens.valid[:, ctx.query_positions]  # padding queries' rows are undefined: skipped
        self.columns[ctx.step][..., : probs.shape[-1]] += (probs * queries[:, None, :, None]).sum(-2)

    def post_softmax(self, probs, ctx):
        self._check("post", probs, ctx)
        if self.top is None:  # first chunk of the editing pass: the statistic is complete
            self.top = self.columns[ctx.step].argmax(-1)  # [b, h]
        k = probs.shape[-1]
        hit = torch.nn.functional.one_hot(self.top, ctx.k_len)[..., :k].bool()[:, :, None, :]
        damped = torch.where(hit, probs * 0.5, probs)
        return damped / damped.sum(-1, keepdim=True)


class LastRowBoost(Participant):
    """Adds to the last query's image scores, as PAI and PAINT do; no other chunk is edited."""

    def __init__(self, layer: int) -> None:
        self.eager_layers = frozenset({layer})
        self.edited_rows: list[int] = []

    def edits(self, ctx) -> bool:
        return ctx.has_last_query

    def pre_softmax(self, scores, ctx):
        if not ctx.stats_pass and ctx.has_last_query:
            self.edited_rows.append(int(ctx.query_positions[-1]))
        if ctx.has_last_query:
            scores = scores.clone()
            scores[:, :, -1] += 2.0 * ctx.image_keys[:, None, :]
        return scores


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_column_statistics_and_last_row_edits_in_chunks(family, rows, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:rows], PROMPTS[:rows])
    t = batch["input_ids"].shape[1]
    runs = {}
    for block in (None, _block(lvlm, batch, 4)):
        parts = [LastRowBoost(1), ColumnDamp(1)]  # the boost edits the scores the statistic reads
        runs[block] = (*_generate(lvlm, batch, parts, block), parts)
    (whole, _, (boost_w, damp_w)), (chunked, _, (boost_c, damp_c)) = runs.values()
    _assert_same(chunked, whole)
    for step in damp_w.columns:  # the statistic over all queries is the unchunked one
        assert (damp_c.columns[step] - damp_w.columns[step]).abs().max() <= TOL
    # The prefill's last query, then each decode step's.
    assert boost_c.edited_rows == boost_w.edited_rows == list(range(t - 1, t + 1))

    prefill = [c for c in damp_c.calls if c[1] == 0]
    stats_pass = [c for c in prefill if c[-1]]
    assert prefill[: len(stats_pass)] == stats_pass  # every chunk's statistics before any edit
    spans = [(q0, min(q0 + 4, t)) for q0 in range(0, t, 4)]  # every query once, in order
    assert [(c[0], c[2], c[3]) for c in stats_pass] == [(n, *s) for s in spans for n in ("pre", "acc")]
    assert [(c[0], c[2], c[3]) for c in prefill[len(stats_pass):]] == [(n, *s) for s in spans for n in ("pre", "post")]


def test_chunks_no_participant_edits_run_sdpa(tiny, images, chunks):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:3], PROMPTS)
    boost = LastRowBoost(1)
    posts = []

    class Spy(Participant):  # sees the post_softmax calls that happen at the boosted layer
        eager_layers = frozenset({1})

        def edits(self, ctx):
            return False

        def post_softmax(self, probs, ctx):
            posts.append(ctx.chunk)
            return probs

    whole, _ = _generate(lvlm, batch, [LastRowBoost(1)], None)
    chunked, _ = _generate(lvlm, batch, [boost, Spy()], _block(lvlm, batch, 4))
    _assert_same(chunked, whole)
    t = batch["input_ids"].shape[1]
    assert [c for c in posts if c.stop > 1] == [slice(t - (t % 4 or 4), t)]  # only the last chunk of the prefill


# -- what reads attention: the statistics pass and CARVE's recorder on chunked layers --------------
class Identity(Participant):
    """Edits nothing, on every layer: forces the eager (chunked) path under the readers."""

    def bind(self, lvlm) -> None:
        self.eager_layers = frozenset(range(lvlm.num_layers))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_statistics_pass_and_carve_recorder_read_the_same_rows_in_chunks(family, tiny, images):
    from lvlm_fix.layout import image_token_grids

    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    text = LastPositionHeads()
    with Plan(lvlm, [text]).active(), torch.inference_mode():
        lvlm.model.generate(**lvlm.text_only(batch), max_new_tokens=1, do_sample=False)
    grids = image_token_grids(lvlm, batch)
    layers = list(range(lvlm.num_layers))
    reports, maps = [], []
    for block in (None, _block(lvlm, batch, 3)):
        # Sink dims given: discovering them ranks per-dim vote counts, where float noise can reorder ties.
        stats = HeadStatistics(text.heads, sink_dims=tuple(range(lvlm.hidden_size)), tau=2.5)
        recorder = ImageAttentionRecorder(layers, grids)
        _generate(lvlm, batch, [stats, recorder, Identity()], block)
        reports.append(stats.report())
        maps.append(recorder.stacked())
    assert _close(reports[0], reports[1])
    assert maps[0].shape == maps[1].shape and (maps[0] - maps[1]).abs().max() <= TOL


# -- the block size and the masks ------------------------------------------------------------------
def test_block_size_comes_from_the_plan_then_the_environment(tiny, monkeypatch):
    plan = Plan(tiny("llava"), [])
    cpu = torch.device("cpu")
    monkeypatch.delenv(attention.BLOCK_ENV, raising=False)
    assert attention.block_bytes(plan, cpu) == attention.DEFAULT_BLOCK_MIB["cpu"] * 2**20
    monkeypatch.setenv(attention.BLOCK_ENV, "0.5")
    assert attention.block_bytes(plan, cpu) == 2**19
    plan.block_bytes = 1000
    assert attention.block_bytes(plan, cpu) == 1000
    plan.block_bytes = None
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv(attention.BLOCK_ENV, bad)
        with pytest.raises(LvlmFixError, match=attention.BLOCK_ENV):
            attention.block_bytes(plan, cpu)


def test_mask_rows_equal_the_whole_masks_rows():
    q, k = 6, 9
    bool_mask = torch.rand(2, 1, q, k) > 0.3
    float_mask = torch.where(bool_mask, 0.0, torch.finfo(torch.float32).min).to(torch.float16)
    for mask in (None, bool_mask, float_mask):
        whole = attention.additive_mask(mask, q, k, True, torch.device("cpu"))
        for rows in ((0, 2), (2, 5), (5, 6)):
            part = attention.additive_mask(mask, q, k, True, torch.device("cpu"), rows=rows)
            assert torch.equal(part, whole[..., rows[0]:rows[1], :])
