"""Opera mode against the CHAIR scorer's own outputs on released captions (tests/chair_released/README.md).

PAINT's files ship here (Apache 2.0): its scorer output on 500 LLaVA-1.5 captions and the ground truth
of its chair.pkl. The middle-layers repository's files carry no licence, so that check reads a
checkout named by LVLM_FIX_MIDDLE_LAYERS_REPO and is skipped without one. Both scorer outputs were
made with NLTK's real tagger; here the fallback tagger (every token a noun) runs, which reproduces
every caption's hallucinated objects and loses recall on the captions listed in the README."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lvlm_fix.cli.main import main
from lvlm_fix.evals.chair import ChairEvaluator, ChairResult

HERE = Path(__file__).resolve().parent / "chair_released"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "chair_released.py"
MIDDLE = os.environ.get("LVLM_FIX_MIDDLE_LAYERS_REPO")


def _tool():
    spec = importlib.util.spec_from_file_location("chair_released", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chair_released"] = module
    spec.loader.exec_module(module)
    return module


def _agreement(scorer: dict, result: ChairResult) -> dict[str, int]:
    rows = scorer["sentences"]
    assert [(r["image_id"], r["caption"]) for r in rows] == [(d.image_id, d.caption) for d in result.details]
    pairs = list(zip(rows, result.details))
    return {
        "hallucinated": sum([n for _, n in r["mscoco_hallucinated_words"]] == d.hallucinated for r, d in pairs),
        "mentioned": sum(r["mscoco_generated_words"] == d.mentioned for r, d in pairs),
        "mentions_lost": sum(len(r["mscoco_generated_words"]) - len(d.mentioned) for r, d in pairs),
    }


def _check(scorer: dict, ground_truth: Path, mentioned_equal: int) -> ChairResult:
    ev = ChairEvaluator.from_ground_truth(ground_truth, mode="opera", tagger="noun")
    result = ev.evaluate(scorer["sentences"])
    agree = _agreement(scorer, result)
    assert agree["hallucinated"] >= 497 and agree["hallucinated"] == 500  # 500 measured; the issue asks >= 497
    assert agree["mentioned"] == mentioned_equal  # the recall difference of the fallback tagger
    printed = scorer["overall_metrics"]
    assert f"{100 * result.chair_s:.1f}" == f"{100 * printed['CHAIRs']:.1f}"  # chair.py prints one decimal
    assert f"{100 * result.chair_i:.1f}" == f"{100 * printed['CHAIRi']:.1f}"
    assert result.recall < printed["Recall"]  # only mentions are lost, never gained on these captions
    return result


def test_paint_released_outputs_with_the_fallback_tagger() -> None:
    scorer = json.loads(gzip.decompress((HERE / "paint_outputs.json.gz").read_bytes()))
    result = _check(scorer, HERE / "paint_ground_truth.json", mentioned_equal=480)
    assert (result.n, result.n_hallucinated, result.n_mentions) == (500, 582, 12385)  # scorer: 582 / 12430
    assert f"{100 * result.recall:.1f}" == "53.2" and f"{100 * scorer['overall_metrics']['Recall']:.1f}" == "53.7"


@pytest.mark.skipif(not MIDDLE, reason="the middle-layers repository has no licence, so its files are not shipped; "
                                       "set LVLM_FIX_MIDDLE_LAYERS_REPO to a checkout of "
                                       "ZhangqiJiang07/middle_layers_indicating_hallucinations to run this check")
def test_middle_layers_released_outputs_with_the_fallback_tagger(tmp_path: Path) -> None:
    repo = Path(str(MIDDLE))
    scorer_file = repo / "log" / "llava-1.5" / "llava_1.5_7B_CHAIR.json"
    gt = tmp_path / "gt.json"
    _tool().main(["convert", str(repo / "chair.pkl"), "--images", str(scorer_file), "--out", str(gt)])
    result = _check(json.loads(scorer_file.read_text()), gt, mentioned_equal=486)
    assert (result.n, result.n_hallucinated, result.n_mentions) == (500, 261, 3870)  # scorer: 261 / 3889


def test_score_a_released_scorer_output_from_the_cli(capsys, tmp_path: Path) -> None:
    """`lvlm-fix score` reads the scorer's own output file (its sentences) and the converted ground truth."""
    scorer = json.loads(gzip.decompress((HERE / "paint_outputs.json.gz").read_bytes()))
    scorer["sentences"] = scorer["sentences"][:40]
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps(scorer, indent=2))
    try:
        main(["score", "--bench", "chair", "--chair-mode", "opera", "--chair-tagger", "noun", "--chair-ground-truth",
              str(HERE / "paint_ground_truth.json"), "--captions", str(outputs), "--out", str(tmp_path / "s"),
              "--n-boot", "20"])
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["settings"]["chair_mode"] == "opera" and summary["settings"]["tagger"].startswith("none")
    assert summary["provenance"]["dataset"]["id"].endswith("paint_ground_truth.json")
    recs = [json.loads(x) for x in (tmp_path / "s" / "outputs" / "samples.jsonl").read_text().splitlines()]
    assert [r["hallucinated"] for r in recs] == [[n for _, n in r["mscoco_hallucinated_words"]]
                                                 for r in scorer["sentences"]]
    row = summary["methods"]["outputs"]["splits"]["val"]
    assert row["chair_s"] == pytest.approx(sum(bool(r["mscoco_hallucinated_words"]) for r in scorer["sentences"]) / 40)


def test_ground_truth_and_coco_annotations_exclude_each_other(capsys, tmp_path: Path) -> None:
    rows = tmp_path / "c.jsonl"
    rows.write_text('{"image_id": 974, "caption": "A dog."}\n')
    with pytest.raises(SystemExit):
        main(["score", "--bench", "chair", "--chair-ground-truth", str(HERE / "paint_ground_truth.json"),
              "--coco-annotations", str(tmp_path), "--captions", str(rows), "--out", str(tmp_path / "s")])
    assert "--chair-ground-truth FILE or --coco-annotations DIR, not both" in capsys.readouterr().err


class CHAIR:  # the name OPERA's evaluator class pickles under
    pass


def test_converter_reads_a_chair_cache_and_refuses_anything_else(monkeypatch, tmp_path: Path) -> None:
    cached = CHAIR()
    cached.imid_to_objects = defaultdict(list, {974: {"person", "bench"}, 5: {"dog"}})
    cached.double_word_dict = {"bow tie": "tie"}
    monkeypatch.setattr(CHAIR, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "CHAIR", CHAIR, raising=False)
    pkl = tmp_path / "chair.pkl"
    pkl.write_bytes(pickle.dumps(cached, protocol=4))
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 974, "caption": "x"}\n')
    tool = _tool()
    tool.main(["convert", str(pkl), "--images", str(captions), "--out", str(tmp_path / "gt.json")])
    assert json.loads((tmp_path / "gt.json").read_text()) == {"974": ["bench", "person"]}
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(os.system))
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|nt)\.system is not allowed in a CHAIR cache"):
        tool.load_cache(evil)
