"""The method kit: registration, specs, parameter checks, and a method from outside the package.

The outside method is the docs' example, ``docs/examples/scale_image_attention.py``, imported from
its file as a user would; it is checked through apply(), generate(), the CLI's list / run / eval,
an entry point and $LVLM_FIX_PLUGINS, like a built-in.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lvlm_fix
from conftest import PROMPTS, cli_error
from lvlm_fix.errors import ConfigError, UnknownNameError
from lvlm_fix.interventions import (
    METHODS,
    Intervention,
    MethodConfig,
    Stage,
    build_methods,
    format_spec,
    param,
    parse_spec,
    parse_value,
    register_method,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "scale_image_attention.py"
BUILTINS = [n for n in METHODS.names()]


@pytest.fixture()
def example():
    """The docs' example module, imported from its file and registered; unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("scale_image_attention", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    METHODS._items.pop(module.ScaleImageAttention.name, None)
    del sys.modules[spec.name]


# -- specs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, parsed", [
    (None, []), ("none", []),
    ("vhr", [("vhr", {})]),
    ("var+vhr", [("vhr", {}), ("var", {})]),  # stage order: head outputs before attention weights
    ("vhr:alpha=1.5:layers=[1,2]+var:tau=3.5", [("vhr", {"alpha": 1.5, "layers": [1, 2]}), ("var", {"tau": 3.5})]),
    ('act:heads="2:0,5;7:3"', [("act", {"heads": "2:0,5;7:3"})]),  # quotes protect ':' and ','
    ({"var": {"tau": 3.5}, "vhr": {"layers": [1]}}, [("vhr", {"layers": [1]}), ("var", {"tau": 3.5})]),
    (["act", "carve"], [("carve", {}), ("act", {})]),  # input refinement first
])
def test_specs_parse_in_stage_order(spec, parsed):
    assert parse_spec(spec) == parsed


def test_format_spec_round_trips():
    for text in ("vhr:alpha=1.5+var:layers=[2,3]:tau=3.5", 'carve:fusion="first"', "none"):
        assert format_spec(parse_spec(text)) == text


@pytest.mark.parametrize("spec, needle", [
    ("", "empty method spec"), ("  ", "empty method spec"), ("+", "empty part"), ("vhr+", "empty part"),
    ("none+vhr", "composes 'none'"), ("vhr+vhr", "'vhr' twice"), ("vhr:alpha", "is not key=value"),
    ("vhr:=2", "is not key=value"),
])
def test_bad_specs_are_config_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_spec(spec)


@pytest.mark.parametrize("name, hint", [("VHR", "'vhr'"), ("Var", "'var'"), ("vrh", "'vhr'"), ("CARVE", "'carve'")])
def test_unknown_names_suggest_the_close_one_case_included(name, hint):
    with pytest.raises(UnknownNameError, match=f"Did you mean {hint}"):
        parse_spec(name)


def test_values_read_as_json_numbers_lists_bools_or_strings():
    assert parse_value("1.5") == 1.5 and parse_value("2") == 2 and parse_value("[1,2]") == [1, 2]
    assert parse_value("1,2") == [1, 2] and parse_value("True") is True and parse_value("none") is None
    assert parse_value("full") == "full" and parse_value('"a:b"') == "a:b"
    assert parse_value("inf") == float("inf")  # read, so that the config can refuse it by name


# -- parameter checks ----------------------------------------------------------------------------------
def _fields(kind):
    for name in BUILTINS:
        cfg = METHODS.get(name).config_cls
        hints = typing.get_type_hints(cfg)
        for f in dataclasses.fields(cfg):
            if kind in (hints[f.name], typing.Optional[kind]):
                yield name, f.name


@pytest.mark.parametrize("name, field", list(_fields(float)))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_parameter_refuses_non_finite_values(name, field, bad):
    with pytest.raises(ConfigError, match=f"{field}=.*not a finite number"):
        build_methods(name, **{field: bad})


@pytest.mark.parametrize("name, field", list(_fields(int)))
def test_int_parameters_refuse_bools_and_fractions(name, field):
    for bad in (True, 1.5, "3"):
        with pytest.raises(ConfigError, match=field):
            build_methods(name, **{field: bad})


@pytest.mark.parametrize("name, field", list(_fields(bool)))
def test_bool_parameters_refuse_numbers(name, field):
    with pytest.raises(ConfigError, match=field):
        build_methods(name, **{field: 1})


def test_every_builtin_parameter_documents_default_and_source():
    for name in BUILTINS:
        for field, text in METHODS.get(name).config_cls.field_help().items():
            assert "Default" in text and "source" in text, (name, field)


def test_parameters_route_per_method_and_refuse_ambiguity():
    vhr, var = build_methods("vhr+var", params={"vhr": {"layers": 1}, "var": {"layers": [2]}}, tau=3.5)
    assert (vhr.config.layers, var.config.layers, var.config.tau) == ((1,), (2,), 3.5)
    with pytest.raises(ConfigError, match="taken by both 'vhr' and 'var'"):
        build_methods("vhr+var", layers=[1])
    with pytest.raises(ConfigError, match="'tau' is not a parameter of vhr"):
        build_methods("vhr", tau=3.0)
    with pytest.raises(ConfigError, match="'tua' is not a parameter of var; its parameters: tau"):
        build_methods("var:tua=3")
    with pytest.raises(ConfigError, match="set twice"):
        build_methods("vhr:alpha=2", alpha=3.0)
    with pytest.raises(ConfigError, match="not in 'vhr'"):
        build_methods("vhr", params={"var": {"tau": 1.0}})


# -- registration --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Cfg(MethodConfig):
    k: float = param(1.0, "k. Default 1 (source: test).")

    @classmethod
    def noop(cls):
        return cls()


def test_registration_fails_loudly_on_a_missing_declaration():
    class NoStage(Intervention):
        name, config_cls = "no_stage", _Cfg

    class NoNoop(Intervention):
        name, stage = "no_noop", Stage.HEAD_OUTPUTS

        @dataclass(frozen=True, kw_only=True)
        class config_cls(MethodConfig):  # noqa: N801
            pass

    class BadStage(Intervention):
        name, stage, config_cls = "bad_stage", "attention", _Cfg

    with pytest.raises(TypeError, match="does not declare 'stage'"):
        register_method(NoStage)
    with pytest.raises(TypeError, match="must define noop"):
        register_method(NoNoop)
    with pytest.raises(TypeError, match="is not a lvlm_fix.interventions.Stage"):
        register_method(BadStage)
    with pytest.raises(TypeError, match="not a subclass"):
        register_method(dict)
    assert not {"no_stage", "no_noop", "bad_stage"} & set(METHODS.names())


def test_a_taken_name_is_refused_and_re_registering_is_a_no_op():
    class Other(Intervention):
        name, stage, config_cls = "vhr", Stage.HEAD_OUTPUTS, _Cfg

    with pytest.raises(ValueError, match="'vhr' is taken"):
        register_method(Other)
    vhr = METHODS.get("vhr")
    assert register_method(vhr) is vhr


# -- the docs' example, from outside the package -------------------------------------------------------------
def test_example_post_softmax_on_a_hand_computed_case(example, tiny):
    m = example.ScaleImageAttention(example.ScaleImageAttentionConfig(factor=3.0, heads=(1,), layers=(1,)))
    m.bind(tiny("llava"))
    probs = torch.tensor([[[[0.5, 0.25, 0.25]], [[0.5, 0.25, 0.25]]]])  # [b=1, h=2, q=1, k=3]
    ctx = type("Ctx", (), {"image_keys": torch.tensor([[False, True, True]])})()
    out = m.post_softmax(probs, ctx)
    # head 1: [0.5, 0.75, 0.75] / 2.0; head 0 untouched
    assert torch.allclose(out[0, 1, 0], torch.tensor([0.25, 0.375, 0.375]))
    assert torch.equal(out[0, 0], probs[0, 0])


def test_example_identities_and_effect_through_apply(example, tiny, images):
    lvlm = tiny("llava")
    batch = lvlm.encode(images, PROMPTS)
    gen = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, **gen)
    runs = {}
    for label, cfg in (("noop", example.ScaleImageAttentionConfig.noop()),
                       ("identity", example.ScaleImageAttentionConfig.math_identity()),
                       ("active", example.ScaleImageAttentionConfig(factor=8.0, heads=(0, 1, 2, 3), layers=(0, 1)))):
        params = {k: v for k, v in cfg.to_dict().items()}
        with torch.inference_mode(), lvlm_fix.apply(lvlm, "scale_image_attention", **params) as plan:
            runs[label] = lvlm.model.generate(**batch, **gen)
        assert plan.report()["scale_image_attention"]["factor"] == cfg.factor
    assert all(torch.equal(a, b) for a, b in zip(runs["noop"].scores, vanilla.scores))
    assert torch.equal(runs["identity"].sequences, vanilla.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(runs["identity"].scores, vanilla.scores)) <= 1e-5
    assert (runs["active"].scores[0] - vanilla.scores[0]).abs().max() > 1e-3


def test_example_composes_with_a_builtin_each_with_its_own_layers(example, tiny, images):
    out = lvlm_fix.generate(tiny("llava"), images[:2], PROMPTS[:2],
                            {"vhr": {"layers": [1]}, "scale_image_attention": {"layers": [2], "factor": 3.0}},
                            max_new_tokens=3)
    assert out.report["vhr"]["layers"] == [1] and out.report["scale_image_attention"]["layers"] == [2]


def test_example_in_list_run_and_eval(example, capsys, tiny_dirs, images, tmp_path):
    from lvlm_fix.cli.main import main

    main(["list"])
    assert "scale_image_attention" in capsys.readouterr().out
    image = tmp_path / "i.png"
    images[0].save(image)
    model = str(tiny_dirs("llava"))
    main(["run", "--model", model, "--image", str(image), "--prompt", "Is there a cat?", "--max-new-tokens", "3",
          "--method", "vhr+scale_image_attention", "--set", "vhr.layers=1", "--set", "scale_image_attention.layers=2",
          "--compare", "--out", str(tmp_path / "run")])
    row = json.loads((tmp_path / "run" / "answers.jsonl").read_text().splitlines()[0])
    assert row["method"] == "vhr+scale_image_attention" and "baseline" in row
    line = cli_error(capsys, "run", "--model", model, "--image", str(image), "--method", "vhr+scale_image_attention",
                     "--layers", "1")
    assert "--set vhr.layers" in line
    main(["eval", "--bench", "pope", "--split", "random", "--limit", "2", "--batch-size", "2", "--n-boot", "10",
          "--methods", "none,scale_image_attention:factor=3", "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"none", "scale_image_attention:factor=3"}


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvlm_fix.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def test_example_through_an_entry_point_and_the_plugins_variable(tmp_path, tiny_dirs, images):
    site = tmp_path / "site"
    (site / "example_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "scale_image_attention.py").write_text(EXAMPLE.read_text())
    (site / "example_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: example-plugin\n"
                                                                   "Version: 0.1\n")
    (site / "example_plugin-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [lvlm_fix.methods]
        scale_image_attention = scale_image_attention:ScaleImageAttention
        """))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    listed = _cli("list", env={"PYTHONPATH": path})
    assert listed.returncode == 0 and "scale_image_attention" in listed.stdout, listed.stderr
    image = tmp_path / "i.png"
    images[0].save(image)
    ran = _cli("run", "--model", str(tiny_dirs("llava")), "--image", str(image), "--prompt", "Is there a cat?",
               "--method", "scale_image_attention:factor=3", "--max-new-tokens", "2", env={"PYTHONPATH": path})
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
    by_file = _cli("list", env={"LVLM_FIX_PLUGINS": str(EXAMPLE)})
    assert by_file.returncode == 0 and "scale_image_attention" in by_file.stdout, by_file.stderr
    broken = _cli("list", env={"LVLM_FIX_PLUGINS": str(tmp_path / "missing.py")})
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "missing.py" in broken.stderr


def test_help_and_list_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom lvlm_fix.cli.main import main\n"
            "for argv in (['--help'], ['list'], ['run', '--help'], ['run', '--method', 'VHR']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
