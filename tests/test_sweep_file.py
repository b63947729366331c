"""Sweeps as files: `lvlm-fix eval --sweep FILE.toml` expands the file's grids into settings, checks them
up front like --methods, and records the file in the run folder."""

from __future__ import annotations

import json

import pytest

from conftest import cli_error, cli_run
from lvlm_fix.errors import ConfigError, InputError
from lvlm_fix.sweep import sweep_specs

EXAMPLE = """
[none]
[vhr]
alpha = [1.5, 2, 3]
[var]
tau = 3.5
rho = [0.5, 0.8]
["vhr+var"]
vhr.layers = [[1]]
"var.layers" = [[2]]
"""


def test_a_sweep_file_expands_its_grids_in_order(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(EXAMPLE)
    assert sweep_specs(path) == ["none", "vhr:alpha=1.5", "vhr:alpha=2", "vhr:alpha=3", "var:tau=3.5:rho=0.5",
                                 "var:tau=3.5:rho=0.8", "vhr:layers=[1]+var:layers=[2]"]


@pytest.mark.parametrize("text, error, needle", [
    ('["vhr+var"]\nlayers = [[1]]\n', ConfigError, 'name the method, e.g. "vhr.layers"'),
    ('["vhr+var"]\n"act.layers" = [[1]]\n', ConfigError, "'act' is not one of"),
    ('[icd]\ndisturbance = "a: b"\n', ConfigError, "cannot be a method parameter"),
    ("[vhr]\nalpha = []\n", ConfigError, "at least one value"),
    ("alpha = 2\n", ConfigError, "outside a table"),
    ("", ConfigError, "names no setting"),
    ("[vhr\n", InputError, "is not a TOML file"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_fix(tmp_path, text, error, needle):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(error, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
        sweep_specs(path)
    assert "\n" not in str(e.value)


def test_eval_runs_a_sweep_file_checked_up_front_and_records_it(capsys, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text("[none]\n[vhr]\nalpha = [1.5, 2]\n")
    out = tmp_path / "run"
    code, _, err = cli_run(capsys, "eval", "--sweep", str(path), "--limit", "1", "--out", str(out))
    assert code == 0, err
    assert sorted(json.loads((out / "summary.json").read_text())["methods"]) == ["none", "vhr:alpha=1.5", "vhr:alpha=2"]
    assert (out / "sweep.toml").read_text() == path.read_text()
    path.write_text("[vhr]\nalpha = [1.5, -1]\n")  # refused before any weight loads, as --methods vhr:alpha=-1
    assert "alpha=-1" in cli_error(capsys, "eval", "--sweep", str(path), "--out", str(tmp_path / "run2"))
    assert "not both" in cli_error(capsys, "eval", "--sweep", str(path), "--methods", "none,vhr", "--out",
                                   str(tmp_path / "run3"))
