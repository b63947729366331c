"""The benchmark scripts in smoke mode (tiny model, a few tokens, 1 repetition), so they never rot.

No timing threshold is asserted: CI machines are noisy. What is checked is that every method and
every batch size gets a positive, finite time ratio and memory ratio, and that the real-size GPU
configurations still build (shrunk to toy widths, on the CPU).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # eval_throughput imports overhead
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_overhead_smoke_has_a_ratio_for_every_method_and_batch():
    overhead = _load("overhead")
    threads = torch.get_num_threads()
    res = overhead.main(["--smoke"])
    assert torch.get_num_threads() == threads  # smoke's single thread is restored
    rows = {(r["batch"], r["config"]): r for r in res["rows"]}
    for batch in (1, 2):
        for method in overhead.METHODS:
            row = rows[(batch, method)]
            for key in ("time_ratio", "mem_ratio", "mem_extra_ratio"):
                assert _positive_finite(row[key]), (batch, method, key, row[key])
            assert row["time_s"] > 0 and row["peak_bytes"] > 0
        assert rows[(batch, "carve")]["baseline"] == "api"
        assert rows[(batch, "mvp")]["baseline"] == "yes_no" and rows[(batch, "paint")]["baseline"] == "vanilla"
        assert rows[(batch, "heads")]["baseline"] == "prefill"
        assert rows[(batch, "heads")]["memory_baseline"] == "vanilla"
        assert _positive_finite(rows[(batch, "sdpa")]["time_ratio"])
        for method in overhead.TIME_TARGETS:
            assert isinstance(rows[(batch, method)]["meets_target"], bool)
    assert "| vhr |" in res["table"] and "heads" in res["table"]


def test_eval_throughput_smoke_has_a_rate_for_every_batch():
    throughput = _load("eval_throughput")
    res = throughput.main(["--smoke"])
    rows = {r["batch"]: r for r in res["rows"]}
    assert set(rows) == {1, 2}
    for row in rows.values():
        assert _positive_finite(row["samples_per_s"]) and _positive_finite(row["speedup"])
        assert row["samples"] == 4
    assert rows[1]["speedup"] == 1.0


@pytest.mark.parametrize(("name", "n_image_tokens"), [("llava-1.5-7b", 576), ("qwen2.5-vl-7b", 144)])
def test_gpu_configs_build_shrunk_on_cpu(name, n_image_tokens):
    """The --gpu-configs code path, at toy widths: same image side, same image-token count."""
    overhead = _load("overhead")
    from lvlm_fix.testing.tiny import build_image

    s = overhead.real_size_subject(name, "cpu", "float32", shrink=True)
    batch = s.lvlm.encode([build_image(0, s.image_size)], ["Describe the image."])
    assert int((batch["input_ids"] == s.lvlm.image_token_id).sum()) == n_image_tokens
    with torch.inference_mode():
        out = s.lvlm.model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_configs_without_cuda_fail_clearly():
    overhead = _load("overhead")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        overhead.main(["--gpu-configs", "llava-1.5-7b"])


def _tiny_doc(tmp_path: Path) -> Path:
    gpu = _load("gpu")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\n## GPU\n\n{gpu.MARK_START}\nnot measured\n{gpu.MARK_END}\n\n## Reproduce\n")
    return doc


def test_gpu_script_tiny_times_every_method_at_every_cell_and_fills_the_doc(tmp_path):
    """benchmarks/gpu.py --tiny: the GPU script's whole path on the CPU (toy widths, 2 tokens)."""
    gpu = _load("gpu")
    doc = _tiny_doc(tmp_path)
    res = gpu.main(["--tiny", "--out", str(tmp_path / "out"), "--update-doc", str(doc)])
    rows = {(r["prompt_text_tokens"], r["batch"], r["config"]): r for r in res["rows"]}
    lengths = {r["prompt_text_tokens"]: r["prompt_len"] for r in res["rows"]}
    assert lengths[40] > lengths[8] > 576  # the filler lengthens the prompt beside the 576 image tokens
    for text_tokens in gpu.TINY["prompt_tokens"]:
        for batch in gpu.TINY["batch_sizes"]:
            for method in ("vanilla", *gpu.METHODS):
                row = rows[(text_tokens, batch, method)]
                assert row["status"] == "ok", row
                assert _positive_finite(row["time_ratio"]) and row["time_s"] > 0
                assert "peak_bytes" not in row  # CUDA's counter only: no CPU stand-in
            assert rows[(text_tokens, batch, "carve")]["baseline"] == "api"
            assert rows[(text_tokens, batch, "vcd")]["target"] == "time <= 1.3"  # the GPU target, batch <= 8
            assert isinstance(rows[(text_tokens, batch, "vcd")]["meets_target"], bool)
            assert rows[(text_tokens, batch, "mvp")]["baseline"] == "yes_no"
    assert [r["batch"] for r in res["pope"]] == [1, 16] and res["skipped"] == []
    # Compiled vs eager: a row per method and batch, timed both ways with equal tokens, or refused in one line.
    compiled = {(r["batch"], r["config"]): r for r in res["compiled"]}
    assert set(compiled) == {(b, m) for b in gpu.TINY["compile_batch_sizes"] for m in gpu.COMPILED_METHODS}
    assert {"vanilla", "vhr", "var", "vcd"} <= set(gpu.COMPILED_METHODS)  # the four
    for (_, method), row in compiled.items():
        if method == "vcd":
            assert row["status"] == "refused" and "static" in row["note"] and "\n" not in row["note"], row
            assert "eager_ms" not in row  # not timed
            continue
        assert row["status"] == "ok", row
        assert math.isfinite(row["eager_ms"]) and math.isfinite(row["compiled_ms"]) and row["compile_s"] > 0
        assert row["tokens_equal"] and row["graphs"] >= 1, row
    assert res["compiled_skipped"] == []
    saved = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert len(saved["rows"]) == len(res["rows"])
    markdown = (tmp_path / "out" / "gpu.md").read_text()
    assert "| mvp | yes_no |" in markdown and "POPE throughput" in markdown
    assert "Compiled vs eager decode" in markdown and "| 1 | vcd | refused: vcd does not support static" in markdown
    text = doc.read_text()
    assert "not measured" not in text and "| vcd | vanilla |" in text and text.endswith("## Reproduce\n")
    # --render redoes the markdown from the JSON alone (results fetched from a lent machine).
    gpu.main(["--render", str(tmp_path / "out" / "gpu.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "gpu.md").read_text() == markdown


def test_gpu_script_skips_what_the_budget_cannot_hold_and_still_writes(tmp_path):
    gpu = _load("gpu")
    res = gpu.main(["--tiny", "--budget-s", "0", "--prompt-tokens", "8", "--batch-sizes", "1",
                    "--out", str(tmp_path)])
    assert {r["status"] for r in res["rows"]} == {"skipped (budget)"} and res["pope"] == []
    assert any("vanilla and after" in s for s in res["skipped"]) and any("POPE" in s for s in res["skipped"])
    assert "skipped (budget)" in (tmp_path / "gpu.md").read_text()
    assert {r["status"] for r in res["compiled"]} == {"skipped (budget)"}
    assert any(s.startswith("compiled vs eager, b=1: vanilla") for s in res["compiled_skipped"])


def test_gpu_script_keeps_the_compiled_tables_share_of_the_budget(tmp_path):
    """The other tables stop --compile-share-s before the end; the compiled-vs-eager table still runs."""
    gpu = _load("gpu")
    res = gpu.main(["--tiny", "--budget-s", "300", "--compile-share-s", "300", "--prompt-tokens", "8",
                    "--batch-sizes", "1", "--out", str(tmp_path)])
    assert {r["status"] for r in res["rows"]} == {"skipped (budget)"} and res["pope"] == []
    assert {r["status"] for r in res["compiled"]} == {"ok", "refused"}


def test_gpu_script_refuses_a_doc_without_the_markers(tmp_path):
    gpu = _load("gpu")
    doc = tmp_path / "B.md"
    doc.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="gpu-table:start"):
        gpu.update_doc(doc, "table")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_script_without_cuda_points_to_tiny():
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--tiny"):
        _load("gpu").main([])


def test_gpu_script_targets_long_prompts_and_large_batches():
    gpu = _load("gpu")
    act = {"config": "act", "prompt_text_tokens": 3072, "batch": 16, "time_ratio": 1.2, "mem_ratio": 1.3}
    gpu.add_target(act)
    assert (act["target"], act["meets_target"]) == ("time <= 1.3 and peak <= 1.25", False)  # memory over
    vcd = {"config": "vcd", "prompt_text_tokens": 256, "batch": 16, "time_ratio": 1.5}
    gpu.add_target(vcd)
    assert (vcd["target"], vcd["meets_target"]) == ("time <= 2.1", True)  # above batch 8: the CPU limit
    var = {"config": "var", "prompt_text_tokens": 3072, "batch": 1, "time_ratio": 1.1}
    gpu.add_target(var)  # no memory measured (CPU): no verdict
    assert var["target"] == "time <= 1.3 and peak <= 1.25" and var["meets_target"] is None
