"""`lvlm-fix calibrate` says what it did: the data it used (printed and recorded), a warning when no head
passes, and by default data disjoint from what `eval` scores (the testbed's seed-1 benchmark)."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error, cli_run
from lvlm_fix.errors import LvlmFixWarning


def test_calibrate_defaults_to_the_testbeds_other_benchmark_and_says_so(capsys, tmp_path, recwarn):
    out = tmp_path / "heads.json"
    code, stdout, err = cli_run(capsys, "calibrate", "--limit", "2", "--out", str(out))
    assert code == 0, err
    dataset = json.loads(out.read_text())["calibration"]["dataset"]
    assert "seed1" in dataset["id"] and dataset["n"] == 2  # not the seed-0 benchmark that eval scores
    assert "calibration data: 2 questions of POPE random from" in err and "seed1" in err
    said = err + "".join(str(w.message) for w in recwarn)  # what passed, or the warning that nothing did
    assert "raise yes/no accuracy" in said or "no head raised" in said


def test_calibrate_warns_when_no_head_passes(capsys, tmp_path, monkeypatch):
    import lvlm_fix.interventions.act as act

    def no_head(lvlm, samples, limit=None, **_):
        return {"format": 1, "heads": {}, "num_layers": lvlm.num_layers, "num_heads": lvlm.num_heads,
                "calibration": {"samples": len(list(samples)), "baseline_acc": 0.5, "selected": 0, "combined_acc": 0.5}}

    monkeypatch.setattr(act, "calibrate_act", no_head)
    out = tmp_path / "heads.json"
    with pytest.warns(LvlmFixWarning, match=r"no head raised .* lists no head .* makes ACT change nothing"):
        code, _, err = cli_run(capsys, "calibrate", "--limit", "2", "--out", str(out))
    assert code == 0 and json.loads(out.read_text())["heads"] == {}, err


def test_calibrate_refuses_an_unknown_split_in_one_line(capsys, tmp_path):
    assert "adversarial" in cli_error(capsys, "calibrate", "--split", "adverserial", "--out", str(tmp_path / "h.json"))
