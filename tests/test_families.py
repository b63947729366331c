"""Every family of the installed transformers' image-text-to-text mapping, through the seam.

Each family is built tiny once per session (:func:`lvlm_fix.testing.families.verify`) and gets one verdict,
decided by that build on the installed transformers: *works* (no-plan parity with stock sdpa bit for
bit, the eager path against stock eager, the seam's image tokens where the model puts image
features, every method's noop bit-identical through ``generate()``, VHR, VAR and ACT changing the
logits, padded rows as alone), *refused* with a reason, or *unbuildable* here with a reason (skipped).
docs/supported-models.md is the table of one transformers version: it must be what the matrix finds
when that version is installed, and the README must state its count.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from lvlm_fix.testing import families
from lvlm_fix.errors import LvlmFixError
from lvlm_fix.testing.families import build, checks, command
from lvlm_fix.testing.families import (
    FamilyResult,
    family_types,
    readme_claim,
    support_table,
    sync_readme,
    table_headline,
    tiny_batch,
    tiny_config,
    tiny_model,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "supported-models.md"  # the repository's, wherever the package is installed
README = ROOT / "README.md"
FAMILY_TYPES = family_types()
MIN_WORKING = 50  # on every transformers the pin admits; a regression in the builder shows up here first
# Built as transformers' own testers build them, and driven through every check (issue 23).
MUST_WORK = ("chameleon", "emu3", "llama4", "llava", "qwen2_vl")


@pytest.fixture(scope="session")
def matrix():
    """model_type -> FamilyResult, each family verified once per session on one thread."""
    results: dict[str, FamilyResult] = {}
    spent: list[float] = []

    def get(model_type: str) -> FamilyResult:
        if model_type not in results:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: more threads only contend with each other
            start = time.perf_counter()
            try:
                results[model_type] = verify(model_type)
            finally:
                torch.set_num_threads(threads)
                spent.append(time.perf_counter() - start)
        return results[model_type]

    get.results, get.spent = results, spent
    return get


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family(model_type, matrix):
    result = matrix(model_type)
    assert result.status in ("works", "refused", "unbuildable"), f"{model_type}: {result.detail}"
    if result.status != "works":
        assert len(result.detail) > 20, f"{model_type} is {result.status} without saying why"
        assert not result.touched and not result.path
        if result.status == "unbuildable":
            pytest.skip(f"{model_type} cannot be checked here: {result.detail}")  # the build or its own forward failed
        return
    assert result.path in ("processor", "model-only")
    assert set(result.touched) == {"vhr", "var", "act"}
    assert result.grid and result.batch


@pytest.mark.parametrize("model_type", MUST_WORK)
def test_families_once_marked_unbuildable_are_built_and_work(model_type, matrix):
    if model_type not in FAMILY_TYPES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    result = matrix(model_type)
    if result.status == "unbuildable" and "its stock forward fails in transformers" in result.detail:
        pytest.skip(f"{model_type}: {result.detail}")  # transformers' own bug there (llama4 on 5.24)
    assert result.status == "works", f"{model_type}: {result.status}: {result.detail}"
    assert result.batch == "each row as alone"


def test_a_family_whose_own_forward_fails_is_unbuildable_not_a_seam_failure(tiny, images, monkeypatch):
    lvlm = tiny("llava")
    batch = lvlm.encode(images[:2], ["Is there a cat?", "Describe it."])

    def broken(*args, **kwargs):
        raise AttributeError("'CausalLMOutputWithPast' object has no attribute 'image_outputs'")

    monkeypatch.setattr(lvlm.model, "forward", broken)
    result = checks._checked(lvlm, batch, lambda r: batch)
    assert result["status"] == "unbuildable", result
    assert result["detail"].startswith(f"its stock forward fails in transformers {transformers.__version__}: ")
    assert "image_outputs" in result["detail"]
    monkeypatch.undo()  # the seam's own failure stays a failure
    monkeypatch.setattr(checks, "check", lambda *a: (_ for _ in ()).throw(AssertionError("seam bug")))
    assert checks._checked(lvlm, batch, lambda r: batch)["status"] == "fails"


def test_vq_families_map_their_codes_into_the_vocabulary():
    for model_type, codebook in (("chameleon", "num_embeddings"), ("emu3", "codebook_size")):
        config = tiny_config(model_type)
        vocab = config.vocabulary_map
        assert vocab["<image>"] == config.image_token_id
        codes = [vocab[build.VQ_CODE_NAMES[model_type](c)] for c in range(getattr(config.vq_config, codebook))]
        assert len(set(codes)) == len(codes) and max(codes) < build._SPECIAL_FROM <= config.image_token_id
    model = tiny_model("chameleon")  # the VQ tokenizer's codes come back as the mapped ids
    with torch.inference_mode():
        ids = model.model.get_image_tokens(torch.randn(1, 3, 64, 64))
    assert ids.shape == (1, 16) and set(ids.flatten().tolist()) <= set(model.config.vocabulary_map.values())


def test_a_batch_row_alone_is_the_row_of_the_batch():
    model = tiny_model("qwen2_vl")  # pixels as patches of every image in one tensor, with image_grid_thw
    batch = tiny_batch(model)
    for r in range(2):
        alone = tiny_batch(model, rows=[r])
        valid = batch["attention_mask"][r].bool()
        assert torch.equal(batch["input_ids"][r][valid], alone["input_ids"][0])
        patches = len(alone["pixel_values"])
        assert torch.equal(batch["pixel_values"][r * patches:(r + 1) * patches], alone["pixel_values"])
        assert torch.equal(batch["image_grid_thw"][r], alone["image_grid_thw"][0])


def test_ovis2_5_image_tokens_sit_between_its_boundary_tokens():
    if "ovis2_5" not in FAMILY_TYPES:
        pytest.skip(f"transformers {transformers.__version__} has no ovis2_5")
    model = tiny_model("ovis2_5")
    c = model.config
    ids = tiny_batch(model, rows=[0])["input_ids"][0].tolist()
    first, last = ids.index(c.image_token_id), len(ids) - 1 - ids[::-1].index(c.image_token_id)
    assert ids[first - 1] == c.image_start_token_id and ids[last + 1] == c.image_end_token_id


def test_the_span_check_fails_when_the_seam_reads_the_wrong_tokens():
    from lvlm_fix import wrap

    model = tiny_model("llava")
    lvlm = wrap(model)
    batch = tiny_batch(model)
    checks._check_image_span(lvlm, batch)
    text_id = int(batch["input_ids"][1, 0])  # an ordinary text token of row 1
    lvlm.adapter = dataclasses.replace(lvlm.adapter, image_token_ids=(text_id,))
    with pytest.raises(AssertionError, match="the seam sees"):
        checks._check_image_span(lvlm, batch)


def test_row_differences_count_scores_and_tokens():
    masked = torch.finfo(torch.float32).min
    scores = (torch.tensor([[0.0, masked], [1.0, masked]]),)
    batch = SimpleNamespace(sequences=torch.tensor([[9, 5, 1], [5, 5, 2]]), scores=scores)
    alone = [(SimpleNamespace(sequences=torch.tensor([[5, 1]]), scores=(torch.tensor([[0.0, masked]]),)), 1),
             (SimpleNamespace(sequences=torch.tensor([[5, 5, 3]]), scores=(torch.tensor([[1.5, masked]]),)), 2)]
    worst, same = checks._row_difference(batch, 2, alone)
    assert worst == 0.5 and not same  # row 1 generated 3 where the batch row generated 2


def test_the_support_table_names_the_installed_transformers_and_every_type(matrix, capsys):
    results = [matrix(t) for t in FAMILY_TYPES]
    works = sum(r.status == "works" for r in results)
    with capsys.disabled():
        print(f"\nworks on {works} of {len(results)} families of transformers {transformers.__version__} "
              f"(matrix: {sum(matrix.spent):.0f} s)")
    table = support_table(results)
    assert table_headline(table) == (transformers.__version__, works, len(FAMILY_TYPES))
    assert all(f"| `{t}` |" in table for t in FAMILY_TYPES)
    assert works >= MIN_WORKING


def test_the_committed_support_table_is_current_for_its_transformers(matrix):
    version, _, _ = table_headline(DOCS.read_text())
    if version != transformers.__version__:
        pytest.skip(f"{DOCS.name} is the table of transformers {version}, this is {transformers.__version__}: "
                    "`python -m lvlm_fix.testing.families` gives this version's verdicts")
    results = [matrix(t) for t in FAMILY_TYPES]
    assert DOCS.read_text() == support_table(results), (
        f"{DOCS} is out of date; run `python -m lvlm_fix.testing.families --write-docs` from the repository root")


def test_the_readme_states_the_count_of_the_support_table():
    assert readme_claim(DOCS.read_text()) in README.read_text(), (
        "the README's family count is not the one docs/supported-models.md states; "
        "run `python -m lvlm_fix.testing.families --write-docs` from the repository root")


def test_sync_readme_rewrites_the_count_and_nothing_else(tmp_path):
    table = support_table([FamilyResult("llava", "works"), FamilyResult("mllama", "refused", "a reason")], "9.9.9")
    readme = tmp_path / "README.md"
    readme.write_text("models: **54 of the 100 image-text-to-text families of transformers 5.24 verified** (LLaVA)\n")
    sync_readme(readme, table)
    assert readme.read_text() == ("models: **1 of the 2 image-text-to-text families of transformers 9.9.9 verified** "
                                  "(LLaVA)\n")
    readme.write_text("models: many\n")
    with pytest.raises(LvlmFixError, match="states the family count 0 times"):
        sync_readme(readme, table)


def test_the_refusals_name_the_reason():
    from transformers import CONFIG_MAPPING

    from lvlm_fix.adapters import unsupported_reason

    assert "cross-attention" in unsupported_reason(CONFIG_MAPPING["mllama"]())
    assert "encoder-decoder" in unsupported_reason(CONFIG_MAPPING["florence2"]())
    assert "not placed at image tokens" in unsupported_reason(CONFIG_MAPPING["git"]())
    assert "linear_attention" in unsupported_reason(CONFIG_MAPPING["qwen3_5"]())
    assert unsupported_reason(CONFIG_MAPPING["llava"]()) is None


def test_the_shrinker_keeps_coupled_dimensions_consistent():
    qwen = families.tiny_config("qwen2_5_vl")  # M-RoPE sections sum to half the tiny head dim
    text = qwen.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    sam = families.tiny_config("deepseek_vl_hybrid").high_res_vision_config  # layer indices inside the tiny stack
    assert all(0 <= i < sam.num_hidden_layers for i in sam.global_attn_indexes)
    gemma = families.tiny_config("gemma3").text_config  # sliding and full layers both kept
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"} and len(gemma.layer_types) == 4
    assert build._mrope_section([16, 24, 24], {"head_dim": 16}) == [2, 3, 3]
    assert sum(build._mrope_section([16, 24, 24], {"head_dim": 16, "partial_rotary_factor": 0.5})) == 4


def test_write_docs_writes_the_table_and_the_count_where_it_is_told(tmp_path, monkeypatch, capsys):
    """--write-docs PATH and --readme PATH: relative paths from the current directory, nothing written into
    the package (it wrote to a path computed from the package's location, lvlm_fix/docs/ once it moved)."""
    monkeypatch.setattr(command, "family_types", lambda: ["llava", "mllama"])  # the whole mapping takes minutes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "R.md").write_text("models: **54 of the 100 image-text-to-text families of transformers 5.24 verified**\n")
    assert families.main(["--write-docs", "out/table.md", "--readme", "R.md"]) == 0
    assert table_headline((tmp_path / "out" / "table.md").read_text()) == (transformers.__version__, 1, 2)
    assert (tmp_path / "R.md").read_text() == (f"models: **1 of the 2 image-text-to-text families of transformers "
                                               f"{transformers.__version__} verified**\n")
    assert "wrote out/table.md and the family count in R.md" in capsys.readouterr().out
    (tmp_path / "docs").mkdir()  # the defaults: docs/supported-models.md and README.md, from here
    (tmp_path / "R.md").rename(tmp_path / "README.md")
    assert families.main(["--write-docs"]) == 0
    assert (tmp_path / "docs" / "supported-models.md").read_text().startswith("# Supported models")


def test_write_docs_refuses_a_place_that_is_not_there_before_any_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(command, "verify", lambda t: pytest.fail("a family was checked"))
    monkeypatch.chdir(tmp_path)  # no docs/ folder and no README here

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            families.main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--write-docs docs/supported-models.md: there is no folder docs here" in refused("--write-docs")
    assert "--write-docs a/b.md: there is no folder a here" in refused("--write-docs", "a/b.md")
    (tmp_path / "docs").mkdir()
    assert "--readme README.md is not a file" in refused("--write-docs")
    (tmp_path / "README.md").write_text("models: many\n")
    assert "--readme README.md states the family count 0 times" in refused("--write-docs")
    assert "--readme goes with --write-docs" in refused("--readme", "README.md")
    table = support_table([FamilyResult("llava", "works")], "9.9.9")
    with pytest.raises(LvlmFixError, match="states the family count 0 times"):  # the README first: nothing written
        families.write_docs(table, tmp_path / "docs" / "t.md", tmp_path / "README.md")
    assert not (tmp_path / "docs" / "t.md").exists()


def test_the_command_line_checks_some_families_and_rejects_unknown_ones(capsys):
    assert families.main(["llava", "mllama"]) == 0
    out = capsys.readouterr().out
    assert "works on 1 of 2 families" in out and re.search(r"mllama\s+refused", out)
    with pytest.raises(SystemExit) as e:
        families.main(["not_a_family"])
    assert e.value.code == 2 and "'not_a_family' is not a model type" in capsys.readouterr().err
