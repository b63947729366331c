"""SidePass (VHR's text-only stream): strict alternation, replies, errors and clean stops."""

from __future__ import annotations

import threading

import pytest
import torch

import lvlm_fix
from lvlm_fix.errors import LvlmFixError
from lvlm_fix.hooks.capture import hooks_on
from lvlm_fix.hooks.plan import AttnContext, Participant, Plan
from lvlm_fix.hooks.sidepass import SidePass
from lvlm_fix.interventions import vhr as vhr_module
from lvlm_fix.interventions.vhr import VHR, VHRConfig

PROMPTS = ["Describe the image.", "Is there a cat in the image?"]


def _side_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "side pass" in t.name or "text-only stream" in t.name]


def test_pauses_and_replies_alternate():
    log: list[str] = []

    def run() -> None:
        log.append("side start")
        a = side.pause(1)
        log.append(f"side got {a}")
        side.pause(a + 10)
        log.append("side end")

    side = SidePass(run)
    log.append("main")
    assert side.resume("ignored") == 1
    log.append("main again")
    assert side.resume(5) == 15
    with pytest.raises(LvlmFixError, match="ended before"):
        side.resume(None)  # the side ends instead of pausing a third time
    assert log == ["main", "side start", "main again", "side got 5", "side end"]
    with pytest.raises(LvlmFixError, match="already ended"):
        side.resume()
    side.close()  # idempotent after the end
    assert not _side_threads()


def test_an_error_on_the_side_is_raised_in_the_caller():
    class Boom(Exception):
        pass

    def run() -> None:
        side.pause("first")
        raise Boom("on the side")

    side = SidePass(run)
    assert side.resume() == "first"
    with pytest.raises(Boom, match="on the side"):
        side.resume()
    side.close()
    assert not _side_threads()


def test_close_stops_a_paused_side_and_runs_nothing_after_the_pause():
    after: list[str] = []

    def run() -> None:
        side.pause(0)
        after.append("ran")

    side = SidePass(run)
    side.resume()
    side.close()
    side.close()
    assert after == [] and not _side_threads()
    SidePass(run).close()  # never started: nothing to do


def test_the_side_inherits_inference_mode():
    seen: list[bool] = []

    def run() -> None:
        seen.append(torch.is_inference_mode_enabled())
        side.pause(None)

    for mode in (True, False):
        side = SidePass(run)
        with torch.inference_mode(mode):
            side.resume()
        side.close()
    assert seen == [True, False]


class _FailInPrefill(Participant):
    """Raises in the prefill at a layer after VHR's first reinforced one, with the text stream open."""

    def __init__(self, layer: int) -> None:
        self.head_output_layers = frozenset({layer})

    def head_output(self, heads: torch.Tensor, ctx: AttnContext) -> None:
        raise RuntimeError(f"failed at layer {ctx.layer}")


def test_an_error_mid_prefill_closes_the_text_stream_and_vhr_still_works(tiny, images):
    handle = tiny("llava")
    batch = handle.encode(images[:2], PROMPTS)
    with torch.inference_mode():
        handle.model.generate(**batch, max_new_tokens=1)  # transformers adds its own hooks on a first call
    hooks_before = hooks_on(handle.model)
    with pytest.raises(RuntimeError, match="failed at layer 2"), torch.inference_mode():
        with Plan(handle, [VHR(VHRConfig()), _FailInPrefill(2)]).active():
            handle.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert not _side_threads() and hooks_on(handle.model) == hooks_before
    res = lvlm_fix.generate(handle, images[:2], PROMPTS, method="vhr", max_new_tokens=3)
    assert len(res.texts) == 2 and list(res.report["vhr"]["selected_heads"]) == ["1", "2", "3"]
    assert not _side_threads() and hooks_on(handle.model) == hooks_before


def test_an_error_in_the_text_stream_reaches_the_caller(tiny, images, monkeypatch):
    handle = tiny("llava")
    batch = handle.encode(images[:1], PROMPTS[:1])
    with torch.inference_mode():
        handle.model.generate(**batch, max_new_tokens=1)  # transformers adds its own hooks on a first call
    hooks_before = hooks_on(handle.model)

    def broken(self, heads, ctx):
        raise ValueError(f"text stream broke at layer {ctx.layer}")

    monkeypatch.setattr(vhr_module._TextStream, "head_output", broken)
    with pytest.raises(ValueError, match="text stream broke at layer 1"), lvlm_fix.apply(handle, "vhr"):
        handle.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert not _side_threads() and hooks_on(handle.model) == hooks_before
