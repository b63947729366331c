"""Every family of the installed transformers' image-text-to-text mapping, through the seam.

Each family is built tiny once per session (:func:`lvlm_fix.families.verify`): no-plan parity with
stock sdpa bit for bit, the eager path against stock eager, every method's noop bit-identical
through ``generate()``, and VHR, VAR and ACT changing the logits. Refused families must be refused
with a reason; families that cannot be built offline are skipped with theirs. The committed
support table (docs/supported-models.md) must be what the matrix finds.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from lvlm_fix import families
from lvlm_fix.families import DOCS, FamilyResult, family_types, support_table, verify

FAMILY_TYPES = family_types()
MIN_WORKING = 50


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


def _committed_statuses() -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|", DOCS.read_text(), flags=re.M) if DOCS.exists() else []
    return dict(rows)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family(model_type, matrix):
    result = matrix(model_type)
    if result.status == "unbuildable":
        pytest.skip(f"no tiny {model_type} can be built offline here yet: {result.detail}")
    assert result.status != "fails", f"{model_type}: {result.detail}"
    if result.status == "refused":
        assert len(result.detail) > 20, "a refusal says why"
    else:
        assert result.path in ("processor", "model-only")
        assert set(result.touched) == {"vhr", "var", "act"}
    committed = _committed_statuses().get(model_type)
    assert committed == result.status, (
        f"{model_type} is {result.status} here but {committed} in {DOCS.name}; "
        "run `python -m lvlm_fix.families --write-docs`")


def test_the_support_table_is_current_and_at_least_50_families_work(matrix, capsys):
    results = [matrix(t) for t in FAMILY_TYPES]
    works = sum(r.status == "works" for r in results)
    with capsys.disabled():
        print(f"\nworks on {works} of {len(results)} families (matrix: {sum(matrix.spent):.0f} s)")
    assert works >= MIN_WORKING
    assert DOCS.read_text() == support_table(results), (
        f"{DOCS} is out of date; run `python -m lvlm_fix.families --write-docs`")


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
    assert families._mrope_section([16, 24, 24], {"head_dim": 16}) == [2, 3, 3]
    assert sum(families._mrope_section([16, 24, 24], {"head_dim": 16, "partial_rotary_factor": 0.5})) == 4


def test_the_command_line_checks_some_families_and_rejects_unknown_ones(capsys):
    assert families.main(["llava", "mllama"]) == 0
    out = capsys.readouterr().out
    assert "works on 1 of 2 families" in out and re.search(r"mllama\s+refused", out)
    with pytest.raises(SystemExit) as e:
        families.main(["not_a_family"])
    assert e.value.code == 2 and "'not_a_family' is not a model type" in capsys.readouterr().err
