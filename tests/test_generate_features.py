"""generate()'s features with every method: the matrix (lvlm_fix.testing.generate_features) and its table.

The matrix test runs every cell CI runs (all but most compiled ones and CARVE's compositions beyond
two columns: :func:`~lvlm_fix.testing.generate_features.ci_cells`) and checks each against
docs/generate-features.md. The other tests pin what the matrix rests on: static caches with the
attention-editing methods (the two-row case of issue 30), their empty slots, the masks of sliding
windows, attentions of every layer, refusals before any forward, and compiled decoding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lvlm_fix
from conftest import no_plan_left
from lvlm_fix.errors import ConfigError, LvlmFixError
from lvlm_fix.testing import generate_features
from lvlm_fix.testing.generate_features import (FEATURES, PROMPTS, TOL, Cell, Matrix, cell_text, ci_cells, parse_table,
                                                render, subjects)
from lvlm_fix.hooks import Participant, Plan
from lvlm_fix.hooks.attention import key_padding
from lvlm_fix.testing.tiny import build_image

DOCS = Path(__file__).resolve().parents[1] / "docs" / "generate-features.md"  # the repository's, wherever lvlm_fix lives
GEN = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def testbed():
    return lvlm_fix.load()


@pytest.fixture(scope="module")
def batch(testbed):
    return testbed.encode([build_image(0), build_image(1)], list(PROMPTS))


def _generate(lvlm, batch, method, **kwargs):
    with lvlm_fix.apply(lvlm, method) as plan, torch.inference_mode():
        out = lvlm.model.generate(**batch, **GEN, **kwargs)
    return out, plan.report()


def _assert_same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert (x - y).abs().max() <= TOL, (step, float((x - y).abs().max()))


# -- static caches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["var", "act", "paint"])
def test_static_cache_with_attention_editing_methods_on_two_left_padded_rows(method, testbed, batch):
    """Issue 30's case (it ended in an IndexError inside generate()): the static cache gives the dynamic
    cache's tokens, logits within 1e-5 and the same report (sinks, image keys, edits): its empty slots
    count for nothing."""
    assert (batch["attention_mask"] == 0).any()  # left padded
    dynamic, report = _generate(testbed, batch, method)
    static, static_report = _generate(testbed, batch, method, cache_implementation="static")
    _assert_same(static, dynamic)
    assert static_report == report


class _SlotWatcher(Participant):
    """At one edited layer, what the keys past the sequence's current length get at every forward."""

    def __init__(self, layer: int) -> None:
        self.eager_layers = frozenset({layer})
        self.seen: list[tuple[int, int, int, bool, bool, float]] = []

    def begin(self, tokens):
        self.tokens = tokens

    def post_softmax(self, probs, ctx):
        total = ctx.query_positions[-1].item() + 1  # tokens in the cache after this forward
        # A padding query sees no key: its row is spread evenly (as eager does); no one reads it.
        queries = self.tokens.valid[:, ctx.query_positions][:, None, :, None]
        self.seen.append((ctx.step, ctx.k_len, total, bool(ctx.image_keys[:, total:].any()),
                          bool(ctx.key_valid[:, total:].any()), float((probs * queries)[..., total:].sum())))
        return probs


def test_the_empty_slots_of_a_static_cache_are_masked_and_never_image_or_valid_keys(testbed, batch):
    watcher = _SlotWatcher(layer=2)
    with Plan(testbed, [watcher]).active(), torch.inference_mode():
        testbed.model.generate(**batch, max_new_tokens=4, do_sample=False, cache_implementation="static")
    prompt = batch["input_ids"].shape[1]
    assert [(step, total) for step, _, total, *_ in watcher.seen] == [(step, prompt + step) for step in range(4)]
    capacity = {k_len for _, k_len, *_ in watcher.seen}
    assert len(capacity) == 1 and capacity.pop() > prompt + 3  # slots left empty at every step
    assert not any(image or valid or weight for *_, image, valid, weight in watcher.seen)


def test_key_padding_of_a_sliding_window_mask_reads_each_query_on_itself():
    """A 4D mask (static caches) whose last row hides keys older than a window of 3: padding is
    read on the diagonal (it was read on the last row, which took the old keys for padding)."""
    length, window = 6, 3
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    pad = torch.tensor([[False, False, True, True, True, True], [True] * length])  # row 0: two left pads
    mask = ((j <= i) & (i - j < window))[None, None] & pad[:, None, None, :]  # [2, 1, q, k], bool
    assert torch.equal(key_padding(mask, length), pad)
    assert torch.equal(key_padding({"sliding_attention": mask}, length), pad)  # per layer type, as static caches give
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding({"full_attention": additive, "sliding_attention": mask}, length), pad)


# -- output_attentions -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "var"])
def test_output_attentions_gives_every_layer(method, testbed, batch):
    """Every layer's weights, as eager attention gives them (sdpa gives none: the layers that no method
    edits were left out, and the vanilla model under the seam returned an empty tuple)."""
    plain, _ = _generate(testbed, batch, method)
    out, _ = _generate(testbed, batch, method, output_attentions=True)
    _assert_same(out, plain)
    prompt = batch["input_ids"].shape[1]
    for step, layers in enumerate(out.attentions):
        assert len(layers) == testbed.num_layers
        q, k = (prompt, prompt) if step == 0 else (1, prompt + step)
        for a in layers:
            assert a.shape == (2, testbed.num_heads, q, k)
            assert torch.allclose(a.sum(-1), torch.ones(())), "rows sum to 1"


# -- refusals before any forward ---------------------------------------------------------------------
def _forwards_before(fn) -> tuple[str, int]:
    count = [0]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    try:
        with pytest.raises(LvlmFixError) as e:
            fn()
    finally:
        handle.remove()
    return str(e.value), count[0]


@pytest.mark.parametrize(("method", "kwargs", "needle"), [
    ("vcd", {"cache_implementation": "static"}, "static caches"),
    ("pai", {"use_cache": False}, "use_cache=False"),
    ("var", {"prefill_chunk_size": 16}, "prefill_chunk_size"),
])
def test_refused_in_one_line_before_any_module_runs(method, kwargs, needle, testbed, batch):
    """The contrast streams refused a static cache at the prefill, after generate() had run the
    vision tower; a chunked prefill was taken for decode steps (image tokens after the first chunk
    read as text)."""
    def run():
        with lvlm_fix.apply(testbed, method), torch.inference_mode():
            testbed.model.generate(**batch, max_new_tokens=2, **kwargs)

    message, forwards = _forwards_before(run)
    assert needle in message and "\n" not in message
    assert forwards == 0
    assert no_plan_left(testbed.model) and "_prepare_generation_config" not in vars(testbed.model)


def test_mvp_refuses_the_generate_arguments_its_calls_would_drop(testbed):
    images = [build_image(0)]
    for kwargs, name in (({"num_beams": 2}, "num_beams"), ({"streamer": object()}, "streamer"),
                         ({"cache_implementation": "static"}, "cache_implementation")):
        with pytest.raises(ConfigError, match=f"does not take {name}; drop it"):
            lvlm_fix.generate(testbed, images, [PROMPTS[0]], "mvp", max_new_tokens=2, generate_kwargs=kwargs)


# -- the matrix and its table ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix(testbed, tiny):
    return Matrix({"testbed": testbed, "gemma3": tiny("gemma3"), "llava": tiny("llava")})


def test_every_cell_of_the_matrix_is_served_or_refused_as_the_table_says(matrix):
    """Each cell CI runs is what docs/generate-features.md says (its status, and the line of a refusal,
    skip or n/a); a cell that is none of yes / refused / skipped / n/a fails with what went wrong."""
    table = DOCS.read_text(encoding="utf-8")
    documented = parse_table(table)
    order = subjects()
    assert {s for s, _ in documented} == set(order), ("run `python -m lvlm_fix.testing.generate_features --write-docs` "
                                                      "from the repository root")
    got = matrix.run(ci_cells(order))
    wrong = {cell: (cell_text(c), documented[cell]) for cell, c in got.items() if cell_text(c) != documented[cell]}
    assert not wrong, f"cells that are not the table's (got, table): {wrong}"
    missing = {cell: c.note for cell, c in got.items() if c.status != "yes" and c.note not in table}
    assert not missing, f"refusal, skip or n/a lines the table does not give: {missing}"


def test_the_table_is_rendered_from_cells():
    """What --write-docs writes: one row per subject, every column, the notes word for word."""
    order = ["none", "vcd"]
    cells = {("none", f.key): Cell("yes") for f in FEATURES}
    cells |= {("vcd", f.key): Cell("refused", "vcd does not support static caches") for f in FEATURES}
    cells[("none", "compile")] = Cell("yes", "1 graph break, 3 graphs")
    text = render(cells, order)
    assert parse_table(text) == {cell: cell_text(c) for cell, c in cells.items()}
    assert "yes (1 graph break, 3 graphs)" in text and "vcd does not support static caches" in text


def test_write_docs_writes_where_it_is_told_and_refuses_a_missing_folder_before_running(tmp_path, monkeypatch,
                                                                                        capsys):
    """--write-docs PATH (default docs/generate-features.md, from the current directory): never a path derived
    from where the package lives (it wrote lvlm_fix/docs/ once the module moved to lvlm_fix/testing/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate_features, "load_models", lambda: pytest.fail("the matrix ran"))
    for argv, folder in ((["--write-docs"], "docs"), (["--write-docs", "out/table.md"], "out")):
        with pytest.raises(SystemExit) as e:
            generate_features.main(argv)
        assert e.value.code == 2
        assert f"there is no folder {folder} here; run from the repository root" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(generate_features, "load_models", lambda: {})
    monkeypatch.setattr(generate_features, "Matrix", lambda models, compile_backend: SimpleNamespace(run=lambda cells: {}))
    monkeypatch.setattr(generate_features, "render", lambda cells, order: "the table\n")
    assert generate_features.main(["--write-docs", "out/table.md"]) == 0
    assert (tmp_path / "out" / "table.md").read_text() == "the table\n"


def test_dynamos_int_setting_comes_back_when_plans_leave_out_of_order(tiny):
    """Two models, a plan on each (as two threads may): the setting the first plan changed comes back
    when the last one leaves, whichever that is (per-plan patches would leave it changed)."""
    config = torch._dynamo.config
    before = config.allow_unspec_int_on_nn_module
    first = Plan(tiny("llava"), []).active()
    second = Plan(tiny("gemma3"), []).active()
    first.__enter__()
    second.__enter__()
    assert config.allow_unspec_int_on_nn_module is True
    first.__exit__(None, None, None)  # the first leaves first
    assert config.allow_unspec_int_on_nn_module is True
    second.__exit__(None, None, None)
    assert config.allow_unspec_int_on_nn_module == before
