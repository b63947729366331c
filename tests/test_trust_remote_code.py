"""trust_remote_code is read strictly wherever it can arrive as text: remote code runs only when the
user said true. Python's truthiness would read the string "no" as true."""

from __future__ import annotations

import pytest

import lvlm_fix
from lvlm_fix.errors import ConfigError, LvlmFixError, strict_bool


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("False", False), ("TRUE", True), ("yes", True), ("no", False),
    ("0", False), ("1", True), (0, False), (1, True), ("'false'", False),
])
def test_explicit_spellings_are_read(value, expected):
    assert strict_bool("trust_remote_code", value) is expected


@pytest.mark.parametrize("value", ["", "nope", "y", "off-ish", 2, -1, 0.5, None, [], "truee"])
def test_anything_else_is_refused_with_one_line(value):
    with pytest.raises(ConfigError, match=r"trust_remote_code=.* is not a boolean; write trust_remote_code=true"):
        strict_bool("trust_remote_code", value)


def _spy_from_pretrained(monkeypatch):
    """Record what AutoConfig.from_pretrained is asked, and stop there (no weights are loaded)."""
    import transformers

    seen = {}

    def config_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise OSError("stopped by the test")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_from_pretrained)
    return seen


@pytest.mark.parametrize("text", ["no", "false", "False", "0"])
def test_load_never_trusts_a_false_word(monkeypatch, text):
    seen = _spy_from_pretrained(monkeypatch)
    with pytest.raises(LvlmFixError, match="stopped by the test"):
        lvlm_fix.load("testbed", trust_remote_code=text)
    assert seen["trust_remote_code"] is False
    seen.clear()
    with pytest.raises(LvlmFixError, match="stopped by the test"):  # the same through --model-args
        lvlm_fix.load("testbed", **{"trust_remote_code": text})
    assert seen["trust_remote_code"] is False


def test_load_refuses_an_unreadable_boolean_before_any_file_is_read(monkeypatch):
    seen = _spy_from_pretrained(monkeypatch)
    with pytest.raises(ConfigError, match="trust_remote_code='maybe' is not a boolean"):
        lvlm_fix.load("testbed", trust_remote_code="maybe")
    assert seen == {}


def test_cli_model_args_false_word_is_false(monkeypatch, capsys):
    from conftest import cli_error

    seen = _spy_from_pretrained(monkeypatch)
    assert "stopped by the test" in cli_error(capsys, "run", "--model-args", "trust_remote_code=no")
    assert seen["trust_remote_code"] is False
    assert "is not a boolean" in cli_error(capsys, "run", "--model-args", "trust_remote_code=perhaps")
    assert "disagree" in cli_error(capsys, "run", "--trust-remote-code", "--model-args", "trust_remote_code=false")


def test_lmms_eval_model_args_no_is_false(monkeypatch):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (README: lmms-eval)")
    from lvlm_fix.integrations.lmms_eval import LvlmFixLMMS

    seen = _spy_from_pretrained(monkeypatch)
    with pytest.raises(LvlmFixError, match="stopped by the test"):
        LvlmFixLMMS(pretrained="testbed", trust_remote_code="no")
    assert seen["trust_remote_code"] is False
    with pytest.raises(ConfigError, match="is not a boolean"):
        LvlmFixLMMS(pretrained="testbed", trust_remote_code="nah")
