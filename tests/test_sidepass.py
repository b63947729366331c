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


# -- fences ---------------------------------------------------------------------------------------
def test_the_side_inherits_autocast_and_grad_mode():
    seen: list[tuple] = []

    def run() -> None:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled()))
        side.pause(None)

    side = SidePass(run)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        side.resume()
    side.close()
    side = SidePass(run)
    side.resume()  # outside: no autocast, grad on (the test thread's defaults)
    side.close()
    assert seen == [(True, torch.bfloat16, False), (False, torch.get_autocast_dtype("cpu"), True)]


def test_a_side_that_stops_answering_raises_instead_of_hanging():
    release = threading.Event()

    def run() -> None:
        release.wait(5)  # never pauses in time

    side = SidePass(run, timeout=0.2)
    with pytest.raises(LvlmFixError, match=r"gave no answer in 0.2 s.*LVLM_FIX_SIDE_TIMEOUT"):
        side.resume()
    release.set()


def test_a_caller_that_stops_answering_unwinds_the_side():
    def run() -> None:
        side.pause("first")
        side.pause("never reached")

    side = SidePass(run, timeout=0.2)
    assert side.resume() == "first"
    side._thread.join(5)  # the side gave up waiting for us and ended with an error
    assert not side._thread.is_alive()
    with pytest.raises(LvlmFixError, match="the calling thread gave no answer"):
        side.resume("late")


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_timeout_setting_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("LVLM_FIX_SIDE_TIMEOUT", value)
    with pytest.raises(LvlmFixError, match="LVLM_FIX_SIDE_TIMEOUT"):
        SidePass(lambda: None)


def _vhr_run(handle, batch, **gen):
    with torch.inference_mode(), lvlm_fix.apply(handle, "vhr") as plan:
        out = handle.model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True, **gen)
    return out, plan.report()["vhr"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_the_batched_fallback_equals_the_threaded_stream(family, tiny, images, monkeypatch):
    handle = tiny(family)
    batch = handle.encode(images[:2], PROMPTS)
    threaded, threaded_report = _vhr_run(handle, batch)
    monkeypatch.setenv("LVLM_FIX_SIDE_STREAM", "batched")
    batched, batched_report = _vhr_run(handle, batch)
    assert batched_report["selected_heads"] == threaded_report["selected_heads"]
    assert torch.equal(batched.sequences, threaded.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched.scores, threaded.scores))
    assert not _side_threads()


def test_offloaded_weights_take_the_batched_fallback(tiny_dirs, images):
    from accelerate import cpu_offload

    from lvlm_fix.hooks.sidepass import side_stream_mode

    plain = lvlm_fix.load(tiny_dirs("llava"), dtype="float32")
    offloaded = lvlm_fix.load(tiny_dirs("llava"), dtype="float32")
    cpu_offload(offloaded.model.model.language_model, execution_device="cpu")  # weights live off the module
    assert side_stream_mode(plain) == "thread" and side_stream_mode(offloaded) == "batched"
    batch = plain.encode(images[:2], PROMPTS)
    expected, expected_report = _vhr_run(plain, batch)
    got, report = _vhr_run(offloaded, batch)
    assert report["selected_heads"] == expected_report["selected_heads"]
    assert torch.equal(got.sequences, expected.sequences)


def test_a_static_cache_runs_the_threaded_stream(tiny, images):
    handle = tiny("llava")
    batch = handle.encode(images[:2], PROMPTS)
    dynamic, dynamic_report = _vhr_run(handle, batch)
    static, static_report = _vhr_run(handle, batch, cache_implementation="static")
    assert static_report["selected_heads"] == dynamic_report["selected_heads"]
    assert torch.equal(static.sequences, dynamic.sequences)
    assert not _side_threads()


def test_a_compiled_model_is_refused_with_a_clear_error(tiny_dirs, images):
    handle = lvlm_fix.load(tiny_dirs("llava"), dtype="float32")
    handle.model.forward = torch.compile(handle.model.forward, backend="eager")  # compiled, never traced here
    batch = handle.encode(images[:1], PROMPTS[:1])
    with pytest.raises(LvlmFixError, match="cannot run inside a compiled model"), lvlm_fix.apply(handle, "vhr"):
        handle.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert not _side_threads()
