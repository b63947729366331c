"""Hostile input, round two: booleans read strictly wherever they come from text, specs and options said once
and meant once, nothing mixed in a resumed run folder, images in memory through the one loader, full disks and
unwritable outputs, nothing of the user's overwritten, files a user made for ``score`` and ``report``.

Each case is one ``LvlmFixError`` line (exit 2 on the command line), raised before work is spent where it can be.
The table-driven test at the end grows with every class.
"""

from __future__ import annotations

import errno
import json
import re

import numpy as np
import pytest
from PIL import Image

import lvlm_fix
from conftest import cli_error
from conftest import cli_run as _run
from lvlm_fix.errors import ConfigError, InputError, LvlmFixError


def _no_weights(monkeypatch):
    """Make reading any weights a test failure: every check here must come before them."""
    import transformers

    def fail(*a, **k):
        pytest.fail("weights were loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fail)


# -- 1. booleans from text -------------------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["no", "yes", "0", "1", "off", "nein"])
def test_a_boolean_method_parameter_takes_only_true_or_false(capsys, word):
    from lvlm_fix.interventions import build_methods

    with pytest.raises(ConfigError, match="release_compat"):
        build_methods(f"pai:release_compat={word}")
    assert "release_compat" in cli_error(capsys, "run", "--method", "pai", "--set", f"pai.release_compat={word}")
    assert build_methods("pai:release_compat=false")[0].config.release_compat is False


@pytest.mark.parametrize("key", ["use_safetensors", "local_files_only", "ignore_mismatched_sizes"])
def test_boolean_load_arguments_are_read_strictly(key):
    from lvlm_fix.model import check_kwargs

    assert check_kwargs({key: "no"}, "--model-args") == {key: False}
    assert check_kwargs({key: 1}, "--model-args") == {key: True}
    with pytest.raises(ConfigError, match=f"{key}='maybe' is not a boolean"):
        check_kwargs({key: "maybe"}, "--model-args")


@pytest.mark.parametrize("kwargs", [{"do_resize": "no"}, {"low_cpu_mem_usage": "off"}, {"tie_word_embeddings": "No"}])
def test_a_boolean_word_as_text_is_never_passed_on(tiny_dirs, monkeypatch, kwargs):
    _no_weights(monkeypatch)
    with pytest.raises(InputError, match="boolean written as text"):
        lvlm_fix.load(tiny_dirs("llava"), processor_kwargs=kwargs if "do_resize" in kwargs else None,
                      **({} if "do_resize" in kwargs else kwargs))


def test_a_boolean_config_setting_is_read_strictly(tiny_dirs, monkeypatch):
    from lvlm_fix.model import _check_against_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dirs("llava"))
    assert _check_against_config({"tie_word_embeddings": 0}, config) == {"tie_word_embeddings": False}
    with pytest.raises(ConfigError, match="is not a boolean"):
        _check_against_config({"tie_word_embeddings": 7}, config)


# -- 6. model and processor arguments checked for more than form, before any weight ----------------------------
@pytest.mark.parametrize("kwargs, needle", [
    ({"foo": 1}, "'foo' is neither a from_pretrained argument nor a setting"),
    ({"use_cache": False}, "'use_cache' is neither"),  # a text-config setting: the model's __init__ would fail on it
    ({"low_cpu_mem_usage": True}, "neither"),  # transformers 5 drops it without a word
    ({"attn_implementation": "banana"}, "'banana' is not an attention implementation"),
    ({"attn_implementation": {"text_config": "fast"}}, "'fast' is not an attention implementation"),
    ({"torch_dtype": "float16"}, "load()'s own dtype"),
    ({"processor_kwargs": {"max_pixels": 200704}}, "'max_pixels' is not a setting of this model's processor"),
])
def test_model_and_processor_arguments_are_checked_before_the_weights(tiny_dirs, monkeypatch, kwargs, needle):
    _no_weights(monkeypatch)
    with pytest.raises(LvlmFixError, match=re.escape(needle)) as err:
        lvlm_fix.load(tiny_dirs("llava"), **kwargs)
    assert "\n" not in str(err.value)


def test_four_bit_without_bitsandbytes_is_one_line(tiny_dirs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    _no_weights(monkeypatch)
    with pytest.raises(InputError, match="needs the bitsandbytes package"):
        lvlm_fix.load(tiny_dirs("llava"), quantization_config={"load_in_4bit": True})


@pytest.mark.parametrize("arg, flag", [("dtype=float16", "--dtype"), ("device=cpu", "--device"),
                                       ("device_map=auto", "--device-map"), ("revision=main", "--revision")])
def test_model_args_that_collide_with_a_flag_are_refused(capsys, monkeypatch, arg, flag):
    _no_weights(monkeypatch)
    assert f"duplicates {flag}" in cli_error(capsys, "run", "--model-args", arg)


# -- 6. specs and options said once, meant once ---------------------------------------------------------------
@pytest.mark.parametrize("spec, needle", [
    ("vhr:alpha=1.5:alpha=3", "sets vhr.alpha twice"),
    ("vhr:layers=[1,2", "unclosed '['"),
    ("vhr:layers=1,2]", "closes no bracket"),
    ("vhr:layers=[1,2)", "closes no bracket"),
])
def test_a_spec_said_twice_or_unclosed_is_refused(capsys, spec, needle):
    from lvlm_fix.interventions import build_methods

    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_methods(spec)
    assert needle in cli_error(capsys, "run", "--method", spec)
    assert needle in cli_error(capsys, "eval", "--methods", f"none,{spec}", "--out", "/nonexistent/never")


def test_lmms_eval_refuses_a_value_set_twice():
    from lvlm_fix.integrations.lmms_eval import method_spec

    with pytest.raises(ConfigError, match="twice"):
        method_spec("vhr:alpha=1.5:alpha=3", {})
    with pytest.raises(ConfigError, match="set twice"):
        method_spec("vhr:alpha=1.5", {"alpha": "3"})


@pytest.mark.parametrize("methods", ["vhr,vhr", "none,vhr,none", "vhr:alpha=2,vhr:alpha=2"])
def test_a_setting_listed_twice_is_refused_not_deduplicated(capsys, methods, tmp_path):
    assert "twice" in cli_error(capsys, "eval", "--methods", methods, "--out", str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_an_empty_layer_list_is_refused(capsys):
    assert "names no integer" in cli_error(capsys, "run", "--method", "vhr", "--layers", "")
    assert "names no integer" in cli_error(capsys, "run", "--method", "vhr", "--layers", " , ")


@pytest.mark.parametrize("argv", [["eval", "--seed", "-5"], ["run", "--seed", "-1"], ["score", "--bench", "pope",
                                  "--input", "x.json", "--out", "o", "--seed", "-5"], ["run", "--seed", str(2**70)]])
def test_a_negative_or_huge_seed_is_refused_up_front(capsys, monkeypatch, argv, tmp_path):
    _no_weights(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert "--seed" in cli_error(capsys, *argv)
    assert not any(tmp_path.iterdir())


def test_the_api_refuses_a_negative_seed_before_any_sample():
    from lvlm_fix.evals.runner import prepare_eval

    with pytest.raises(ConfigError, match="--seed -5"):
        prepare_eval("pope", methods=["none"], seed=-5)


# -- 2. nothing mixed, ever -----------------------------------------------------------------------------------
def _pope(coco, **kw):
    return dict(bench="pope", pope_questions=str(coco), image_dir=str(coco / "images"), batch_size=4,
                max_new_tokens=3, n_boot=50, progress=False, split="random", limit=4, **kw)


@pytest.mark.parametrize("deleted", ["run.json", "vhr/config.json", "both"])
def test_deleting_a_settings_file_then_resuming_with_other_settings_is_refused(tiny, coco, tmp_path, deleted):
    """Answers made with alpha 3 and 3 new tokens are never reported under alpha 2 or 5 new tokens."""
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    evaluate(lvlm, methods=["vhr"], method_params={"vhr": {"alpha": 3.0}}, out_dir=out, **_pope(coco))
    kept = (out / "vhr" / "samples.jsonl").read_bytes()
    for name in (["run.json", "vhr/config.json"] if deleted == "both" else [deleted]):
        (out / name).unlink()
    other = ({"method_params": {"vhr": {"alpha": 3.0}}, "max_new_tokens": 5} if deleted == "run.json"
             else {"method_params": {"vhr": {"alpha": 2.0}}})
    with pytest.raises(InputError, match="made with other settings"):
        evaluate(lvlm, methods=["vhr"], out_dir=out, **{**_pope(coco), **other})
    assert (out / "vhr" / "samples.jsonl").read_bytes() == kept  # nothing lost either


def test_deleting_run_json_and_resuming_with_the_same_settings_resumes(tiny, coco, tmp_path):
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    first = evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    (out / "run.json").unlink()
    again = evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    assert again["methods"] == first["methods"]


def test_an_older_folder_with_a_settings_file_deleted_is_refused(tiny, coco, tmp_path):
    """Records without a digest (an older lvlm-fix) are kept only while both settings files can vouch for them."""
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    samples = out / "none" / "samples.jsonl"
    old = [{k: v for k, v in json.loads(x).items() if k != "settings"} for x in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps(r) + "\n" for r in old))
    evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))  # both files there: resumed
    (out / "run.json").unlink()
    with pytest.raises(InputError, match="made with other settings"):
        evaluate(lvlm, methods=["none"], out_dir=out, **{**_pope(coco), "max_new_tokens": 5})


@pytest.mark.parametrize("damage", ["garbage", "folder", "list"])
@pytest.mark.parametrize("which", ["run.json", "none/config.json"])
def test_a_damaged_settings_file_is_one_line(tiny, coco, tmp_path, damage, which):
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    path = out / which
    path.unlink()
    if damage == "folder":
        path.mkdir()
    else:
        path.write_text("{not json" if damage == "garbage" else "[1, 2]")
    with pytest.raises(InputError, match=re.escape(str(path))) as err:
        evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    assert "\n" not in str(err.value) and "use a new --out" in str(err.value)


def test_a_samples_file_that_is_a_folder_is_one_line(tiny, coco, tmp_path, capsys):
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    (out / "none" / "samples.jsonl").mkdir(parents=True)
    with pytest.raises(InputError, match="is a folder or device, not a samples file"):
        evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))


def test_score_records_are_tied_to_the_scored_file(coco, tmp_path):
    from lvlm_fix.evals.runner import score_outputs

    answers = tmp_path / "a.jsonl"
    rows = [{"question_id": i, "text": "yes" if i % 2 else "no", "label": "yes" if i % 3 else "no"} for i in range(8)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(out_dir=tmp_path / "s", split="random", n_boot=20, label_key="label")
    score_outputs("pope", answers, **kw)
    (tmp_path / "s" / "a" / "config.json").unlink()
    answers.write_text("".join(json.dumps({**r, "text": "yes"}) + "\n" for r in rows))  # other answers, same name
    with pytest.raises(InputError, match="made with other settings"):
        score_outputs("pope", answers, **kw)
