"""A CLI help a person reads: `run --help` shows the common options and where a method's own are;
`lvlm-fix list METHOD` prints them from the config; `demo` and `run` mark what contradicts the scene."""

from __future__ import annotations

import pytest

from conftest import cli_error, cli_run
from lvlm_fix.interventions import METHODS


def test_run_help_is_short_and_says_where_the_method_parameters_are(capsys):
    code, out, _ = cli_run(capsys, "run", "--help")
    assert code == 0 and len(out.splitlines()) < 120, len(out.splitlines())
    assert "lvlm-fix list METHOD" in out and "--method" in out and "--compare" in out
    assert "[icd]" not in out and "  --alpha" not in out  # no method's flags merged into the common help


def test_method_flags_still_work_though_hidden(capsys):
    assert "alpha=-1.0 is out of range" in cli_error(capsys, "run", "--method", "vhr", "--alpha", "-1")


@pytest.mark.parametrize("name", METHODS.names())
def test_list_method_prints_every_parameter_from_its_config(capsys, name):
    code, out, _ = cli_run(capsys, "list", name)
    assert code == 0
    for d in METHODS.get(name).config_cls.param_docs():
        block = out.split(f"\n  {d.name}  (", 1)[1]
        head, meaning, source = block.splitlines()[:3]
        assert f"{d.type}, default " in head and (d.range in head)
        assert meaning.strip() == d.meaning and source.strip() == f"source: {d.source}"


def test_list_unknown_method_is_one_line_with_a_suggestion(capsys):
    assert "vhr" in cli_error(capsys, "list", "VHR")


def test_demo_refuses_an_unknown_method_before_loading(capsys):
    assert "vhr" in cli_error(capsys, "demo", "--method", "vhrr")


def test_run_on_the_testbed_scene_marks_what_contradicts_it_and_prints_the_legend_only_then(capsys):
    from lvlm_fix.cli.main import _default_image
    from lvlm_fix.demo import mark_against_scene

    _, truth = _default_image(None, None)
    absent = next(c for c in ("knife", "kite", "bus", "toaster") if c not in truth)
    for question in (f"Is there a {truth[0]} in the image?", f"Is there a {absent} in the image?"):
        code, out, _ = cli_run(capsys, "run", "--prompt", question, "--max-new-tokens", "4")
        answer = next(line for line in out.splitlines() if line.startswith("[none]"))
        marked = "*" in answer
        assert code == 0 and ("*word*" in out) == marked, out
        plain = answer.removeprefix("[none] ").replace("*", "")
        assert marked == (mark_against_scene(plain, truth, question) != plain)
