"""`lvlm-fix calibrate` runs the calibration a method declares (today ACT's head search) and says what it did:
the data it used (printed and recorded), a warning when no head passes, and by default data disjoint from what
`eval` scores (the testbed's seed-1 benchmark). Its --method choices are the methods that declare one."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import cli_error, cli_run
from lvlm_fix.errors import LvlmFixWarning
from lvlm_fix.interventions import METHODS, param, register_method
from lvlm_fix.interventions.act import Act, ActConfig
from lvlm_fix.interventions.calibration import Calibration, calibrations


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
    def no_head(lvlm, samples, limit=None, **_):
        return {"format": 1, "heads": {}, "num_layers": lvlm.num_layers, "num_heads": lvlm.num_heads,
                "calibration": {"samples": len(list(samples)), "baseline_acc": 0.5, "selected": 0, "combined_acc": 0.5}}

    monkeypatch.setattr(Act, "calibration", dataclasses.replace(Act.calibration, run=no_head))
    out = tmp_path / "heads.json"
    with pytest.warns(LvlmFixWarning, match=r"no head raised .* lists no head .* makes ACT change nothing"):
        code, _, err = cli_run(capsys, "calibrate", "--limit", "2", "--out", str(out))
    assert code == 0 and json.loads(out.read_text())["heads"] == {}, err


def test_calibrate_refuses_an_unknown_split_in_one_line(capsys, tmp_path):
    assert "adversarial" in cli_error(capsys, "calibrate", "--split", "adverserial", "--out", str(tmp_path / "h.json"))


def test_act_declares_its_calibration_and_only_methods_that_declare_one_are_listed():
    assert set(calibrations()) == {"act", "vti"}  # no other built-in is fitted offline
    cal = calibrations()["act"]
    assert (cal.bench, cal.split, cal.flag) == ("pope", "random", "--heads-file")


def test_calibrate_help_lists_what_each_declared_calibration_picks(capsys):
    code, out, _ = cli_run(capsys, "calibrate", "--help")
    assert code == 0 and "act: the heads ACT damps" in " ".join(out.split()) and "--heads-file" in out


def test_calibrate_refuses_a_method_without_a_calibration_in_one_line(capsys, tmp_path):
    line = cli_error(capsys, "calibrate", "--method", "vhr", "--out", str(tmp_path / "h.json"))
    assert "'vhr' declares no calibration" in line and line.endswith("the methods that do: act, vti")
    assert "the methods that do: act" in cli_error(capsys, "calibrate", "--method", "banana", "--out",
                                                   str(tmp_path / "h.json"))
    assert not (tmp_path / "h.json").exists()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CountConfig(ActConfig):
    counts_file: str | None = param(None, "the file `lvlm-fix calibrate --method counted` writes")


def _count(lvlm, samples, *, limit, dataset):
    return {"n": len(samples), "yes": sum(s.label == "yes" for s in samples), "dataset": dataset["id"], "limit": limit}


def _write(result, path):
    from pathlib import Path

    Path(path).write_text(json.dumps(result))
    return Path(path)


class _Counted(Act):  # ACT's stage and hooks; only the name, the config and the calibration are its own
    """A plugin method that declares a calibration of its own: the share of yes answers."""

    name = "counted"
    config_cls = _CountConfig
    calibration = Calibration(what="counts the yes answers", run=_count, write=_write, reads_back="counts_file",
                              bench="pope", split="popular", summary=lambda result, path: f"{result['yes']} yes")


def test_a_plugin_methods_calibration_is_listed_and_run_without_the_cli_naming_it(capsys, tmp_path):
    register_method(_Counted)
    try:
        assert "the methods that do: act, counted, vti" in cli_error(capsys, "calibrate", "--method", "vhr", "--out",
                                                                str(tmp_path / "x.json"))
        out = tmp_path / "counts.json"
        code, stdout, err = cli_run(capsys, "calibrate", "--method", "counted", "--limit", "4", "--out", str(out))
        assert code == 0, err
        written = json.loads(out.read_text())
        assert written["n"] == 4 and written["limit"] == 4 and "seed1" in written["dataset"]
        assert "questions of POPE popular" in err and f"{written['yes']} yes" in err  # its split, its summary
        assert f"--method counted --counts-file {out}" in stdout
    finally:
        METHODS._items.pop("counted", None)


def test_calibrate_refuses_another_bench_than_the_declared_one(capsys, tmp_path):
    assert "calibrates on --bench pope" in cli_error(capsys, "calibrate", "--bench", "chair", "--out",
                                                     str(tmp_path / "h.json"))
