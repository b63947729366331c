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
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"device": "banana"}, "device 'banana' is not a torch device"),
    ({"device_map": "gpu0"}, "device_map 'gpu0' is not a torch device"),
])
def test_model_and_processor_arguments_are_checked_before_the_weights(tiny_dirs, monkeypatch, kwargs, needle):
    _no_weights(monkeypatch)
    with pytest.raises(LvlmFixError, match=re.escape(needle)) as err:
        lvlm_fix.load(tiny_dirs("llava"), **kwargs)
    assert "\n" not in str(err.value)


def test_processor_arguments_it_reads_pass(tiny_dirs):
    """Qwen's max_pixels is read into the image processor's size (not kept under its own name): accepted."""
    handle = lvlm_fix.load(tiny_dirs("qwen2_vl"), processor_kwargs={"max_pixels": 200704, "min_pixels": 3136})
    assert handle.processor.image_processor.size["longest_edge"] == 200704
    assert lvlm_fix.load(tiny_dirs("llava"), processor_kwargs={"do_resize": False}).processor.image_processor.do_resize \
        is False


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
    with pytest.raises(ConfigError, match="method_params names 'var'"):  # parameters of a setting not run
        prepare_eval("pope", methods=["none", "vhr"], method_params={"var": {"tau": 3.5}})


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


def test_a_setting_of_an_earlier_command_is_not_summarised_under_new_run_settings(tiny, coco, tmp_path):
    """run.json deleted, then another command into the folder: the earlier setting's records (made with
    3 new tokens) must not join a summary of a run with 5."""
    from lvlm_fix.evals.runner import evaluate

    lvlm, out = tiny("llava"), tmp_path / "r"
    evaluate(lvlm, methods=["none"], out_dir=out, **_pope(coco))
    (out / "run.json").unlink()
    with pytest.raises(InputError, match=re.escape(str(out / "none" / "samples.jsonl"))):
        evaluate(lvlm, methods=["vhr"], out_dir=out, **{**_pope(coco), "max_new_tokens": 5})


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


# -- 3. images in memory go through the one loader -------------------------------------------------------------
def _forms(tmp_path):
    """One picture as every form the API takes: (name, value), all of which must reach the model alike."""
    import torch

    rgb = Image.new("RGB", (48, 40), (0, 0, 0))
    rgb.paste((250, 40, 10), (0, 0, 48, 12))
    rgb.paste((10, 200, 90), (0, 28, 24, 40))
    rgb.save(tmp_path / "plain.png")
    a = np.asarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, "rotate 90 clockwise to view"
    rgb.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    return a, [
        ("path", str(tmp_path / "plain.png")),
        ("PIL", rgb),
        ("numpy uint8 HWC", a),
        ("numpy float HWC", a / 255.0),
        ("torch uint8 CHW", torch.from_numpy(a.copy()).permute(2, 0, 1)),
        ("torch float CHW in [0,1]", torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255),
        ("PIL with EXIF, as Image.open gives it", Image.open(tmp_path / "phone.png")),
        ("RGBA PIL", rgb.convert("RGBA")),
    ]


def test_every_form_of_an_image_reaches_the_model_alike(tiny, tmp_path):
    lvlm = tiny("llava")
    _, forms = _forms(tmp_path)
    pixels = {name: lvlm.encode([value], ["Describe."])["pixel_values"] for name, value in forms}
    reference = pixels["path"]
    assert {name: bool(p.equal(reference)) for name, p in pixels.items()} == {name: True for name, _ in forms}


def test_a_16_bit_png_opened_by_hand_is_not_all_white(tiny, tmp_path):
    lvlm = tiny("llava")
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    by_hand = lvlm.encode([Image.open(tmp_path / "deep.png")], ["Describe."])["pixel_values"]
    by_path = lvlm.encode([str(tmp_path / "deep.png")], ["Describe."])["pixel_values"]
    as_array = lvlm.encode([ramp], ["Describe."])["pixel_values"]
    assert by_hand.equal(by_path) and as_array.equal(by_path)
    assert by_path.std() > 0.1  # a ramp, not a white sheet


@pytest.mark.parametrize("size", [(1, 1), (10000, 10)])
def test_extreme_sizes_in_memory_warn(tiny, size):
    from lvlm_fix.images import ImageWarning

    with pytest.warns(ImageWarning, match=f"{size[0]}x{size[1]}"):
        tiny("llava").encode([Image.new("RGB", size, (9, 9, 9))], ["Describe."])


@pytest.mark.parametrize("images, prompts, needle", [
    (None, ["Q"], "images must be a list"),
    ([], [], "no rows"),
    ("IMG", ["Q"], "images must be a list"),  # a bare image where a list is expected (replaced below)
    ("cat.png", ["Q"], "images must be a list"),
    (["IMG", "IMG"], ["Q"], "2 images for 1 prompts"),
    (["IMG"], "Q", "prompts must be a list"),
    (["IMG"], [""], "non-empty text"),
    (["IMG"], [None], "non-empty text"),
    ([None], ["Q"], "image is None"),
    (["missing.png"], ["Q"], "image not found"),
    ([[]], ["Q"], "empty list of images"),
    ([np.zeros((5, 5, 7))], ["Q"], "is not an image"),
    ([np.zeros((2, 5, 5, 3))], ["Q"], "is not an image"),
    ([np.full((8, 8), 3.0)], ["Q"], "values in [0, 1]"),
    ([np.full((8, 8), -1)], ["Q"], "0..255"),
    ([object()], ["Q"], "cannot be read"),
])
def test_bad_api_inputs_are_one_line(tiny, images, prompts, needle):
    img = Image.new("RGB", (32, 32))

    def swap(x):
        return img if isinstance(x, str) and x == "IMG" else x

    images = [swap(x) for x in images] if isinstance(images, list) else swap(images)
    for call in (lambda: lvlm_fix.generate(tiny("llava"), images, prompts, max_new_tokens=2),
                 lambda: tiny("llava").encode(images, prompts)):
        with pytest.raises(InputError, match=re.escape(needle)) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [({"max_new_tokens": 0}, "max_new_tokens=0"),
                                            ({"max_new_tokens": -3}, "max_new_tokens=-3"),
                                            ({"num_beams": 0}, "num_beams=0"), ({"seed": -1}, "seed=-1"),
                                            ({"system_prompt": " "}, "system_prompt")])
def test_bad_generation_arguments_are_one_line(tiny, kwargs, needle):
    with pytest.raises(LvlmFixError, match=needle):
        lvlm_fix.generate(tiny("llava"), [Image.new("RGB", (32, 32))], ["Q"], **kwargs)


def test_a_string_or_a_dead_handle_is_one_line(tiny_dirs):
    from lvlm_fix.diagnostics import head_statistics

    img = Image.new("RGB", (32, 32))
    for call in (lambda h: lvlm_fix.generate(h, [img], ["Q"]), lambda h: head_statistics(h, img, "Q"),
                 lambda h: lvlm_fix.apply(h, "vhr").__enter__()):
        with pytest.raises(InputError, match="expected the handle of lvlm_fix.load"):
            call("llava-hf/llava-1.5-7b-hf")
        handle = lvlm_fix.load(tiny_dirs("llava"))
        handle.model = None
        with pytest.raises(InputError, match="is gone"):
            call(handle)


def test_head_statistics_takes_any_form_and_refuses_a_list(tiny, tmp_path):
    from lvlm_fix.diagnostics import head_statistics

    a, _ = _forms(tmp_path)
    lvlm = tiny("llava")
    assert head_statistics(lvlm, a, "Q")["vhd"] == head_statistics(lvlm, Image.fromarray(a), "Q")["vhd"]
    with pytest.raises(InputError, match="takes one image"):
        head_statistics(lvlm, [a, a], "Q")


# -- 4. full disk and unwritable outputs --------------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _eval_argv(tiny_dirs, coco, out, methods="none"):
    return ["eval", "--model", str(tiny_dirs("llava")), "--pope-questions", str(coco), "--image-dir",
            str(coco / "images"), "--split", "random", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "2",
            "--n-boot", "20", "--methods", methods, "--out", str(out)]


def test_eval_out_that_is_a_file_or_impossible_is_one_line_before_loading(capsys, tiny_dirs, coco, tmp_path,
                                                                           monkeypatch):
    _no_weights(monkeypatch)
    (tmp_path / "f").write_text("mine")
    assert "is a file; give a folder" in cli_error(capsys, *_eval_argv(tiny_dirs, coco, tmp_path / "f"))
    assert "is not writable" in cli_error(capsys, *_eval_argv(tiny_dirs, coco, tmp_path / "f" / "sub"))
    assert (tmp_path / "f").read_text() == "mine"
    with pytest.raises(InputError, match="is a file"):
        lvlm_fix.evaluate(None, out_dir=tmp_path / "f", pope_questions=str(coco), image_dir=str(coco / "images"),
                          split="random", limit=2)


@pytest.mark.parametrize("argv", [
    ["run", "--out", "{tmp}/o"],
    ["heads", "--out", "{tmp}/o"],
    ["calibrate", "--pope-questions", "{coco}", "--image-dir", "{coco}/images", "--limit", "2", "--out", "{tmp}/h.json"],
    ["score", "--bench", "pope", "--input", "{tmp}/a.jsonl", "--label-key", "label", "--out", "{tmp}/o"],
    ["testbed", "benchmark", "--n-images", "1", "--out", "{tmp}/o"],
])
def test_a_full_disk_is_refused_before_the_work(capsys, monkeypatch, coco, tmp_path, argv):
    import shutil
    from collections import namedtuple

    _no_weights(monkeypatch)
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "text": "yes", "label": "yes"}) + "\n")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    line = cli_error(capsys, *[a.format(tmp=tmp_path, coco=coco) for a in argv])
    assert "disk is full" in line


def test_eval_on_enospc_keeps_what_it_wrote_and_resumes(capsys, tiny_dirs, coco, tmp_path, monkeypatch):
    import os

    out = tmp_path / "e"
    code, _, err = _run(capsys, *_eval_argv(tiny_dirs, coco, out))
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    real_fsync, calls = os.fsync, {"n": 0}

    def full_after_one(fd):  # the vhr setting's first batch lands, its second finds the disk full
        calls["n"] += 1
        if calls["n"] >= 3:
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_one)
    line = cli_error(capsys, *_eval_argv(tiny_dirs, coco, out, "none,vhr"))
    assert "No space left on device" in line and "what was written before is kept" in line
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {p: p.read_bytes() for p in before} == before  # the finished setting untouched
    partial = (out / "vhr" / "samples.jsonl").read_text()
    assert partial.endswith("\n") and len(partial.splitlines()) == 2  # one whole batch, no torn line
    assert not list(out.rglob("*.tmp"))
    code, _, err = _run(capsys, *_eval_argv(tiny_dirs, coco, out, "none,vhr"))
    assert code == 0 and "vhr" in json.loads((out / "summary.json").read_text())["methods"], err


def test_report_on_enospc_keeps_results_md(capsys, tiny_dirs, coco, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "e"
    assert _run(capsys, *_eval_argv(tiny_dirs, coco, out))[0] == 0
    md = (out / "results.md").read_bytes()
    monkeypatch.setattr(Figure, "savefig", _enospc)
    assert "No space left on device" in cli_error(capsys, "report", str(out))
    assert (out / "results.md").read_bytes() == md and not list(out.rglob("*.tmp*"))


def test_heads_on_enospc_leaves_no_stats_json_so_it_runs_again(capsys, tiny_dirs, image_file, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    argv = ["heads", "--model", str(tiny_dirs("llava")), "--image", str(image_file), "--out", str(tmp_path / "h")]
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", _enospc)
    assert "No space left on device" in cli_error(capsys, *argv)
    assert not (tmp_path / "h" / "stats.json").exists() and not list((tmp_path / "h").glob("*.tmp*"))
    monkeypatch.setattr(Figure, "savefig", real)
    code, _, err = _run(capsys, *argv)
    assert code == 0 and (tmp_path / "h" / "stats.json").is_file(), err


# -- 5. nothing of the user's overwritten -------------------------------------------------------------------------
def test_calibrate_refuses_to_replace_a_file_before_any_work(capsys, monkeypatch, coco, tmp_path):
    _no_weights(monkeypatch)
    (tmp_path / "heads.json").write_text("my notes")
    argv = ["calibrate", "--pope-questions", str(coco), "--image-dir", str(coco / "images"), "--limit", "2"]
    assert "pass --force" in cli_error(capsys, *argv, "--out", str(tmp_path / "heads.json"))
    assert "is a folder" in cli_error(capsys, *argv, "--out", str(tmp_path))
    assert (tmp_path / "heads.json").read_text() == "my notes"


def test_testbed_benchmark_refuses_a_folder_with_files_unless_forced(capsys, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "annotations.json").write_text("mine")
    assert "pass --force" in cli_error(capsys, "testbed", "benchmark", "--n-images", "1", "--out", str(tmp_path / "b"))
    assert (tmp_path / "b" / "annotations.json").read_text() == "mine"


# -- 7. score and report read files a user made ------------------------------------------------------------------
def _labelled(tmp_path, rows, name="a.jsonl", raw: bytes | None = None):
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


@pytest.mark.parametrize("rows, raw, extra, needle", [
    (None, b'{"question_id": 1, "text": "yes", "label": "yes"}\n{"question_id": 2, "text": "\xff\xfe", "label": "no"}\n',
     [], "a.jsonl:2 is not UTF-8"),
    ([{"question_id": 1.7, "text": "yes", "label": "yes"}], None, [], "question_id=1.7; ids must be integers"),
    ([{"question_id": True, "text": "yes", "label": "yes"}], None, [], "question_id=True"),
    ([{"question_id": None, "text": "yes", "label": "yes"}], None, [], "question_id=None"),
    ([{"question_id": 1, "text": "yes", "label": "yes"}], None, ["--id-key", "qid"], "no question id key 'qid'"),
    ([{"question_id": 1, "text": "yes", "label": "yes"}] * 2, None, [], "a second time"),
])
def test_score_refuses_what_it_cannot_read_faithfully(capsys, tmp_path, rows, raw, extra, needle):
    path = _labelled(tmp_path, rows, raw=raw)
    line = cli_error(capsys, "score", "--bench", "pope", "--input", str(path), "--label-key", "label", *extra,
                     "--out", str(tmp_path / "o"))
    assert needle in line


@pytest.mark.parametrize("first, needle", [
    (b'{"question_id": 0, "image": "COCO_val2014_000000000000.jpg", "text": "Is there a d\xf6g?", "label": "yes"}',
     "is not UTF-8"),
    (b'{"question_id": 0.5, "image": "COCO_val2014_000000000000.jpg", "text": "A?", "label": "yes"}',
     "question_id 0.5 is not an integer"),
])
def test_a_pope_question_file_a_user_made_is_one_line(capsys, coco, tmp_path, first, needle):
    (tmp_path / "coco_pope_random.json").write_bytes(first + b"\n")
    line = cli_error(capsys, "eval", "--pope-questions", str(tmp_path), "--image-dir", str(coco / "images"),
                     "--split", "random", "--out", str(tmp_path / "o"))
    assert needle in line


def _summary_folder(capsys, tmp_path):
    rows = [{"question_id": i, "text": "yes" if i % 2 else "no", "label": "yes" if i % 3 else "no"} for i in range(6)]
    out = tmp_path / "o"
    assert _run(capsys, "score", "--bench", "pope", "--input", str(_labelled(tmp_path, rows)), "--label-key", "label",
                "--n-boot", "20", "--out", str(out))[0] == 0
    return out


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s["methods"].clear(), "lists no method"),
    (lambda s: s["methods"]["a"]["splits"]["all"].update(accuracy="high"), "accuracy is 'high', not a number"),
    (lambda s: s["methods"]["a"]["splits"]["all"].pop("f1"), "f1 is None, not a number"),
    (lambda s: s["methods"]["a"]["splits"]["all"]["ci"]["f1"].update(low=None), "ci.f1.low is None"),
    (lambda s: s["methods"]["a"].update(splits=[]), "has no per-split results"),
    (lambda s: s.update(cost={"a": {"seconds_per_sample": "slow"}}), "seconds_per_sample is 'slow'"),
])
def test_report_refuses_a_summary_it_cannot_draw(capsys, tmp_path, edit, needle):
    out = _summary_folder(capsys, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    edit(summary)
    (out / "summary.json").write_text(json.dumps(summary))
    assert needle in cli_error(capsys, "report", str(out))


def test_report_refuses_a_results_md_that_is_a_folder(capsys, tmp_path):
    out = _summary_folder(capsys, tmp_path)
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    assert "results.md is not a file" in cli_error(capsys, "report", str(out))
    (out / "results.md").rmdir()
    (out / "summary.json").write_bytes(b"\xff\xfe{")
    assert "is not an lvlm-fix summary" in cli_error(capsys, "report", str(out))


def test_a_jsonl_that_is_not_utf8_is_refused_not_garbled(capsys, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"image": "fine.png", "prompt": "A?"}\n{"image": "fine.png", "prompt": "Is there a d\xf6g?"}\n')
    assert "rows.jsonl:2 is not UTF-8" in cli_error(capsys, "run", "--model", "x/y", "--jsonl", str(rows))


def test_a_truncated_jpeg_in_a_jsonl_is_refused_before_any_answer(capsys, tmp_path, monkeypatch):
    import io

    _no_weights(monkeypatch)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.8)])  # the header whole, the pixels cut short
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": n, "prompt": "A?"}) + "\n" for n in ("fine.png", "cut.jpg")))
    line = cli_error(capsys, "run", "--model", "x/y", "--jsonl", str(rows), "--out", str(tmp_path / "o"))
    assert "rows.jsonl:2" in line and "cut.jpg" in line


# -- 8. the lmms-eval model fails at construction (or at its first request), before work is spent ------------------
@pytest.mark.parametrize("kwargs, needle", [
    ({"device": "banana"}, "device 'banana' is not a torch device"),
    ({"device": "cuda:7"}, "device=cpu"),
    ({"device_map": "{bad"}, "device_map='{bad' is not a JSON object"),
    ({"device_map": '{"": "banana"}'}, "'banana' is not a torch device"),
    ({"device_map": "[1, 2]"}, "is not a torch device"),
    ({"report": "{tmp}"}, "is a folder"),
    ({"report": "{tmp}/file.txt/r.jsonl"}, "cannot be written"),
    ({"trust_remote_code": "nah"}, "is not a boolean"),
])
def test_lmms_eval_model_refuses_bad_arguments_at_construction(monkeypatch, tmp_path, kwargs, needle):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (README: lmms-eval)")
    from lvlm_fix.integrations.lmms_eval import LvlmFixLMMS

    monkeypatch.setattr(lvlm_fix, "load", lambda *a, **k: pytest.fail("loaded before refusing a bad model arg"))
    (tmp_path / "file.txt").write_text("")
    kwargs = {k: v.replace("{tmp}", str(tmp_path)) for k, v in kwargs.items()}
    with pytest.raises(LvlmFixError, match=re.escape(needle)) as err:
        LvlmFixLMMS(pretrained="testbed", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("gen, needle", [
    ({"temperature": "hot"}, "temperature='hot'"),
    ({"temperature": -1}, "temperature=-1"),
    ({"max_new_tokens": -3}, "max_new_tokens=-3"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"max_new_tokens": "ten"}, "max_new_tokens='ten'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5"),
    ({"num_beams": 0}, "num_beams=0"),
    ({"do_sample": "no way"}, "do_sample='no way' is not a boolean"),
    ({"until": 5}, "until=5"),
])
def test_lmms_eval_task_generation_arguments_are_checked_at_the_first_request(gen, needle):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (README: lmms-eval)")
    from lvlm_fix.integrations.lmms_eval import LvlmFixLMMS

    with pytest.raises(ConfigError, match=re.escape(needle)):
        LvlmFixLMMS._generation(None, gen)
    assert LvlmFixLMMS._generation(None, {"temperature": "0.5", "max_new_tokens": "7"})[0]["max_new_tokens"] == 7


# -- 9. fuzzing: the API's inputs, the score readers, the spec grammar ----------------------------------------------
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SPEC_PIECES = st.sampled_from(["vhr", "var", "vcd", "pai", "none", "VHR", "+", ":", "=", ",", "[", "]", "{", "}", '"',
                                "'", "alpha", "layers", "tau", "1", "1.5", "-2", "nan", "true", "no", "[1,2]", " ",
                                "alpha=3", "release_compat", "x"])


@settings(max_examples=80, deadline=None)
@example(parts=["vhr:layers=", "[", "1", ",", "2"])  # an unclosed bracket was a RecursionError
@given(parts=st.lists(st.one_of(_SPEC_PIECES, st.text(max_size=4)), max_size=8))
def test_spec_grammar_is_a_method_list_or_one_line(parts):
    from lvlm_fix.interventions import build_methods
    from lvlm_fix.interventions.registry import split_specs

    text = "".join(parts)
    for call in (lambda: build_methods(text), lambda: [build_methods(s) for s in split_specs(text)]):
        try:
            call()
        except LvlmFixError as e:
            assert "\n" not in str(e), text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(sets=[], methods=["none,", "vhr:layers=[1,2"])
@given(sets=st.lists(st.tuples(st.sampled_from(["vhr", "var", "pai", "x", ""]),
                               st.sampled_from(["alpha", "layers", "release_compat", "", "tau"]),
                               st.one_of(_SPEC_PIECES, st.text(max_size=5))), max_size=3),
       methods=st.lists(st.one_of(_SPEC_PIECES, st.text(max_size=3)), max_size=5))
def test_sweep_grammar_is_a_sweep_or_exit_2(capsys, monkeypatch, tmp_path_factory, sets, methods):
    from lvlm_fix import model

    # Loading is out of scope: a sweep that gets that far was read whole.
    monkeypatch.setattr(model, "load", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    argv = ["eval", "--methods", "".join(methods), "--out", str(tmp_path_factory.mktemp("s") / "o")]
    for method, key, value in sets:
        argv += ["--set", f"{method}.{key}={value}"]
    code, _, err = _run(capsys, *argv)
    assert code in (0, 2) and "Traceback" not in err and err.count("error:") == (code == 2), (argv, err)


def _arrays():
    shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
    dtypes = st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, bool, np.int8])
    return st.builds(lambda shape, dtype, scale: (np.random.default_rng(0).random(shape) * scale).astype(dtype),
                     shapes, dtypes, st.sampled_from([1.0, 255.0, 70000.0, -3.0]))


_IMAGES = st.one_of(st.none(), st.just("missing.png"), st.integers(), _arrays(),
                    st.builds(lambda w, h, mode: Image.new(mode, (w, h)), st.integers(1, 40), st.integers(1, 40),
                              st.sampled_from(["RGB", "L", "RGBA", "I;16", "F", "P", "1"])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.one_of(_IMAGES, st.lists(st.one_of(_IMAGES, st.lists(_IMAGES, max_size=2)), max_size=3)),
       prompts=st.one_of(st.none(), st.text(max_size=5), st.lists(st.one_of(st.text(max_size=6), st.integers()),
                                                                   max_size=3)),
       new_tokens=st.integers(-2, 2))
def test_api_inputs_generate_or_one_line(tiny, images, prompts, new_tokens):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = lvlm_fix.generate(tiny("llava"), images, prompts, max_new_tokens=new_tokens)
            assert len(out.texts) == len(prompts)
        except LvlmFixError as e:
            assert "\n" not in str(e)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True), st.text(max_size=6),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
_ROWS = st.dictionaries(st.sampled_from(["question_id", "text", "answer", "label", "category", "image", "x"]),
                        _VALUES, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=40),
                         st.lists(_ROWS, max_size=4).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows)),
                         st.lists(_ROWS, max_size=4).map(json.dumps)),
       extra=st.sampled_from([[], ["--label-key", "label"], ["--id-key", "x"], ["--text-key", "answer"],
                              ["--split", "random", "--label-key", "label"]]))
def test_score_readers_score_or_exit_2(capsys, tmp_path_factory, coco, content, extra):
    folder = tmp_path_factory.mktemp("score")
    path = folder / "answers.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    data = [] if "--label-key" in extra else ["--pope-questions", str(coco), "--image-dir", str(coco / "images")]
    code, _, err = _run(capsys, "score", "--bench", "pope", "--input", str(path), *data, *extra, "--n-boot", "5",
                        "--out", str(folder / "o"))
    assert code in (0, 2) and "Traceback" not in err, (content, extra, err)


@pytest.fixture(scope="module")
def scored_summary(tmp_path_factory):
    """A real summary.json of `lvlm-fix score` (made once), for the report fuzzer to edit."""
    from lvlm_fix.evals.runner import score_outputs

    folder = tmp_path_factory.mktemp("summary")
    rows = [{"question_id": i, "text": "yes" if i % 2 else "no", "label": "yes" if i % 3 else "no"} for i in range(6)]
    return score_outputs("pope", _labelled(folder, rows), out_dir=folder / "o", label_key="label", n_boot=20)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(["methods", "a", "splits", "all", "ci", "f1", "low", "cost", "bench",
                                      "accuracy", "baseline"]), min_size=1, max_size=5),
       value=_VALUES)
def test_report_draws_or_exits_2_on_any_edit_of_the_summary(capsys, tmp_path_factory, scored_summary, path, value):
    out = tmp_path_factory.mktemp("rep")
    summary = json.loads(json.dumps(scored_summary))
    node = summary
    for key in path[:-1]:  # walk as far as the path exists, then set the last key found there
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            break
        node = node[key]
    if isinstance(node, dict):
        node[path[-1]] = value
    (out / "summary.json").write_text(json.dumps(summary))
    code, _, err = _run(capsys, "report", str(out))
    assert code in (0, 2) and "Traceback" not in err, (path, value, err)


# -- the table: case -> exit code and message fragment (add a row with every new class) -------------------------------
HOSTILE = [
    # 1. booleans from text
    (["run", "--model-args", "trust_remote_code=nah"], 2, "trust_remote_code='nah' is not a boolean"),
    (["run", "--model-args", "use_safetensors=maybe"], 2, "use_safetensors='maybe' is not a boolean"),
    (["run", "--method", "pai", "--set", "pai.release_compat=no"], 2, "release_compat='no' must be true or false"),
    (["run", "--method", "pai:release_compat=0"], 2, "release_compat=0 must be true or false"),
    # 6. said once, meant once; options checked for more than form
    (["run", "--method", "vhr:alpha=1.5:alpha=3"], 2, "sets vhr.alpha twice"),
    (["run", "--method", "vhr:layers=[1,2"], 2, "unclosed '['"),
    (["run", "--method", "vhr", "--layers", ""], 2, "names no integer"),
    (["run", "--set", "vhr.alpha=1", "--set", "vhr.alpha=2", "--method", "vhr"], 2, "given twice"),
    (["eval", "--methods", "vhr,vhr", "--out", "{tmp}/e"], 2, "lists 'vhr' twice"),
    (["eval", "--seed", "-5", "--out", "{tmp}/e"], 2, "--seed"),
    (["run", "--model-args", "dtype=float16"], 2, "duplicates --dtype"),
    (["run", "--model-args", "device_map=auto"], 2, "duplicates --device-map"),
    (["run", "--model", "{llava}", "--image", "{img}", "--model-args", "attn_implementation=banana"], 2,
     "'banana' is not an attention implementation"),
    (["run", "--model", "{llava}", "--image", "{img}", "--model-args", "use_cach=false"], 2,
     "'use_cach' is neither a from_pretrained argument"),
    (["run", "--model", "{llava}", "--image", "{img}", "--processor-args", "max_pixels=200704"], 2,
     "'max_pixels' is not a setting of this model's processor"),
    # 4. unwritable outputs, checked before the work
    (["eval", "--out", "{tmp}/file"], 2, "is a file; give a folder"),
    (["eval", "--out", "{tmp}/file/sub"], 2, "is not writable"),
    (["run", "--out", "{tmp}/file"], 2, "is a file; give a folder"),
    # 5. nothing of the user's overwritten
    (["calibrate", "--pope-questions", "{coco}", "--image-dir", "{coco}/images", "--out", "{tmp}/file"], 2,
     "pass --force"),
    (["testbed", "benchmark", "--out", "{tmp}"], 2, "pass --force"),
    # 7. files a user made
    (["score", "--bench", "pope", "--input", "{tmp}/latin1.jsonl", "--label-key", "label", "--out", "{tmp}/s"], 2,
     "is not UTF-8"),
    (["score", "--bench", "pope", "--input", "{tmp}/float_id.jsonl", "--label-key", "label", "--out", "{tmp}/s"], 2,
     "ids must be integers"),
    (["score", "--bench", "pope", "--input", "{tmp}/float_id.jsonl", "--label-key", "label", "--id-key", "qid",
      "--out", "{tmp}/s"], 2, "no question id key 'qid'"),
    (["report", "{tmp}/empty_summary"], 2, "lists no method"),
    # and what is fine stays fine
    (["list"], 0, ""),
]


@pytest.mark.parametrize("argv, code, fragment", HOSTILE, ids=[" ".join(a)[:60] for a, _, _ in HOSTILE])
def test_hostile_table(capsys, monkeypatch, tmp_path, tiny_dirs, coco, image_file, argv, code, fragment):
    _no_weights(monkeypatch)
    (tmp_path / "file").write_text("the user's")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question_id": 1, "text": "s\xed", "label": "yes"}\n')
    (tmp_path / "float_id.jsonl").write_text('{"question_id": 1.7, "text": "yes", "label": "yes"}\n')
    (tmp_path / "empty_summary").mkdir()
    (tmp_path / "empty_summary" / "summary.json").write_text('{"bench": "pope", "baseline": "none", "methods": {}}')
    llava = str(tiny_dirs("llava")) if "{llava}" in argv else ""
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{coco}", str(coco)).replace("{llava}", llava)
            .replace("{img}", str(image_file)) for a in argv]
    if code == 2:
        assert fragment in cli_error(capsys, *argv)
    else:
        got, _, err = _run(capsys, *argv)
        assert got == code and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "the user's"  # nothing of the user's overwritten, whatever the case



# -- 7. the CHAIR and AMBER readers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, needle", [
    ([{"image_id": 1.7, "caption": "A dog."}], "image_id=1.7; ids must be integers"),
    ([{"image_id": True, "caption": "A dog."}], "image_id=True"),
    ([{"image_id": "1", "caption": "A dog."}, {"image_id": 1, "caption": "A cup."}], "image 1 a second time"),
    ([{"image_id": 0, "caption": "A dog."}, {"image_id": 0, "caption": "A dog."}], "image 0 a second time"),
])
def test_chair_score_refuses_float_boolean_and_duplicate_ids(capsys, coco, tmp_path, rows, needle):
    path = _labelled(tmp_path, rows, "caps.jsonl")
    line = cli_error(capsys, "score", "--bench", "chair", "--coco-annotations", str(coco / "annotations"),
                     "--captions", str(path), "--out", str(tmp_path / "o"))
    assert needle in line


OFFICIAL_AMBER = __import__("pathlib").Path(__file__).parent / "amber_official"


def _amber_copy(tmp_path):
    import shutil

    folder = tmp_path / "amber"
    shutil.copytree(OFFICIAL_AMBER, folder)
    return folder


@pytest.mark.parametrize("rid, needle", [
    (1.5, "id=1.5; ids must be integers"), (True, "id=True"),
    (0, "AMBER id 0 has no annotation"), (-1, "AMBER id -1 has no annotation"),
    (99999999, "AMBER id 99999999 has no annotation"),
])
def test_amber_score_ids_are_named_for_what_they_are(capsys, tmp_path, rid, needle):
    folder = _amber_copy(tmp_path)
    path = _labelled(tmp_path, None, "r.json", raw=json.dumps([{"id": rid, "response": "A dog."}]).encode())
    line = cli_error(capsys, "score", "--bench", "amber", "--split", "generative", "--amber-dir", str(folder),
                     "--responses", str(path), "--out", str(tmp_path / "o"))
    assert needle in line and "not integers" not in line.replace("ids must be integers", "")


@pytest.mark.parametrize("damage, needle", [
    (lambda anns: anns[0].update(type="nonsense"), "annotations.json id 1"),
    (None, "annotations.json"),  # not UTF-8
])
def test_a_malformed_amber_annotations_file_is_blamed_not_the_responses(capsys, tmp_path, damage, needle):
    folder = _amber_copy(tmp_path)
    anns = json.loads((folder / "annotations.json").read_text())
    if damage is None:
        (folder / "annotations.json").write_bytes(b"[\xff" + json.dumps(anns)[1:].encode())
    else:
        damage(anns)
        (folder / "annotations.json").write_text(json.dumps(anns))
    path = _labelled(tmp_path, None, "r.json", raw=json.dumps([{"id": 1, "response": "A dog."}]).encode())
    line = cli_error(capsys, "score", "--bench", "amber", "--split", "generative", "--amber-dir", str(folder),
                     "--responses", str(path), "--out", str(tmp_path / "o"))
    assert needle in line and "r.json" not in line


def test_an_array_given_as_the_image_list_is_named_on_one_line(tiny):
    """An array's repr spans lines; the error names its type and shape instead (hypothesis found a 2x1 uint8 array)."""
    import numpy as np

    with pytest.raises(LvlmFixError) as e:
        lvlm_fix.generate(tiny("llava"), np.zeros((2, 1), dtype=np.uint8), [], max_new_tokens=1)
    assert "\n" not in str(e.value) and "ndarray of shape (2, 1)" in str(e.value)
