"""The attention seam: parity with stock attention, batching, image positions, hook hygiene."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import PROMPTS, no_plan_left
from lvlm_fix.hooks import Participant, Plan, hooks_on
from lvlm_fix.hooks.attention import ATTN_NAME


def _stock(path, text_impl: str):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation({k: text_impl if getattr(model.config, k) is model.config.get_text_config() else "sdpa"
                                   for k in model.config.sub_configs if getattr(model.config, k, None) is not None})
    return model.eval()


class EveryLayer(Participant):
    """An identity plan that forces the eager path on every layer and records what it sees."""

    def __init__(self) -> None:
        self.contexts = []

    def bind(self, lvlm) -> None:
        self.eager_layers = self.observed_layers = frozenset(range(lvlm.num_layers))

    def observe(self, probs_last, ctx) -> None:
        self.contexts.append(ctx)


@torch.inference_mode()
def test_parity_with_stock_sdpa_and_eager(family, tiny, tiny_dirs, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    valid = batch["attention_mask"].bool()
    assert lvlm.text_config._attn_implementation == ATTN_NAME
    ours = lvlm.model(**batch).logits
    sdpa = _stock(tiny_dirs(family), "sdpa")(**batch).logits
    assert torch.allclose(ours[valid], sdpa[valid], atol=1e-5), (ours - sdpa)[valid].abs().max()

    with Plan(lvlm, [EveryLayer()]).active():
        eager_path = lvlm.model(**batch).logits
    eager = _stock(tiny_dirs(family), "eager")(**batch).logits
    assert torch.allclose(eager_path[valid], eager[valid], atol=1e-5), (eager_path - eager)[valid].abs().max()


def test_batched_greedy_equals_each_row_alone(family, tiny, images):
    lvlm = tiny(family)
    gen = dict(max_new_tokens=6, do_sample=False)
    batch = lvlm.encode(images, PROMPTS)
    with torch.inference_mode():
        together = lvlm.decode(lvlm.model.generate(**batch, **gen), batch["input_ids"].shape[1])
        for i in range(3):
            one = lvlm.encode(images[i : i + 1], PROMPTS[i : i + 1])
            alone = lvlm.decode(lvlm.model.generate(**one, **gen), one["input_ids"].shape[1])
            assert alone[0] == together[i], (i, alone[0], together[i])


def test_image_keys_follow_each_row_under_left_padding(family, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images, PROMPTS)
    recorder = EveryLayer()
    with Plan(lvlm, [recorder]).active(), torch.inference_mode():
        lvlm.model.generate(**batch, max_new_tokens=3, do_sample=False)
    is_image = batch["input_ids"] == lvlm.image_token_id
    prefill = [c for c in recorder.contexts if c.phase == "prefill"]
    decode = [c for c in recorder.contexts if c.phase == "decode"]
    assert prefill and decode
    for ctx in prefill:
        assert torch.equal(ctx.image_keys, is_image[:, ctx.key_positions])
        assert torch.equal(ctx.key_valid, batch["attention_mask"].bool()[:, ctx.key_positions])
    last = is_image.shape[1] - 1 - is_image.flip(1).int().argmax(1)
    assert torch.equal(prefill[0].image_end, last + 1)
    for ctx in decode:  # sliding-window layers hold a suffix of the sequence; positions stay absolute
        assert ctx.query_positions.item() == ctx.key_positions[-1].item()
        inside = ctx.key_positions < is_image.shape[1]
        assert torch.equal(ctx.image_keys[:, inside], is_image[:, ctx.key_positions[inside]])
        assert not ctx.image_keys[:, ~inside].any()
    assert {c.step for c in decode} == {1, 2}


class Boom(RuntimeError):
    pass


class FailAtDecode(EveryLayer):
    def observe(self, probs_last, ctx) -> None:
        if ctx.phase == "decode":
            raise Boom("raised inside generate()")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_no_hook_or_plan_survives_the_context(family, tiny, images):
    lvlm = tiny(family)
    batch = lvlm.encode(images[:2], PROMPTS[:2])
    hooks_before = hooks_on(lvlm.model)
    with torch.inference_mode():
        vanilla = lvlm.model.generate(**batch, max_new_tokens=5, do_sample=False)

    with Plan(lvlm, [EveryLayer()]).active():
        assert hooks_on(lvlm.model) > hooks_before
        lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert hooks_on(lvlm.model) == hooks_before and no_plan_left(lvlm.model)

    with pytest.raises(Boom), Plan(lvlm, [FailAtDecode()]).active():
        lvlm.model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert hooks_on(lvlm.model) == hooks_before and no_plan_left(lvlm.model)
    assert lvlm.text_config._attn_implementation == ATTN_NAME
    with torch.inference_mode():
        assert torch.equal(lvlm.model.generate(**batch, max_new_tokens=5, do_sample=False), vanilla)


def test_text_only_rows_drop_exactly_the_image_tokens(tiny, images):
    lvlm = tiny("qwen2_vl")
    batch = lvlm.encode(images[:2], ["Describe.", PROMPTS[1]])
    text = lvlm.text_only(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    assert {"pixel_values", "image_grid_thw"} <= set(batch) and not {"pixel_values", "image_grid_thw"} & set(text)
    assert all(v.shape == text["input_ids"].shape for v in text.values())  # per-token tensors only
    assert not text["mm_token_type_ids"].any()  # no token of the text-only rows is an image token
    kept = [ids[b][mask[b] & (ids[b] != lvlm.image_token_id)] for b in range(2)]
    assert text["input_ids"].shape[1] == max(len(k) for k in kept) < ids.shape[1]  # trimmed to its own length
    for b in range(2):
        got_mask = text["attention_mask"][b].bool()
        assert torch.equal(text["input_ids"][b][got_mask], kept[b])
        assert got_mask[-len(kept[b]):].all() and not got_mask[: -len(kept[b])].any()  # left padded
    assert len(kept[0]) != len(kept[1])


def test_a_second_plan_cannot_nest(tiny):
    from lvlm_fix.errors import LvlmFixError

    lvlm = tiny("llava")
    with Plan(lvlm, [EveryLayer()]).active():
        with pytest.raises(LvlmFixError, match="already applied"):
            with Plan(lvlm, [EveryLayer()]).active():
                pass
    assert no_plan_left(lvlm.model)


# -- plans belong to their model -------------------------------------------------------------------
def _logits(lvlm, batch):
    with torch.inference_mode():
        return lvlm.model(**batch).logits


def test_a_plan_acts_on_its_own_model_only(tiny, images):
    import lvlm_fix

    a, b = tiny("llava"), tiny("qwen2_vl")
    batch_a, batch_b = a.encode(images[:2], PROMPTS[:2]), b.encode(images[:2], PROMPTS[:2])
    vanilla_a, vanilla_b = _logits(a, batch_a), _logits(b, batch_b)
    with lvlm_fix.apply(a, "act", thres=0.03):
        assert torch.equal(_logits(b, batch_b), vanilla_b)  # B's forward runs untouched beside A's plan
        steered_a = _logits(a, batch_a)
        with torch.inference_mode():  # and B's own generate() too
            b.model.generate(**batch_b, max_new_tokens=2, do_sample=False)
    assert not torch.equal(steered_a, vanilla_a)
    assert no_plan_left(a.model) and no_plan_left(b.model)


def test_two_models_each_with_a_method_applied_at_once(tiny, images):
    import lvlm_fix

    a, b = tiny("gemma3"), tiny("qwen2_vl")
    batch_a, batch_b = a.encode(images[:2], PROMPTS[:2]), b.encode(images[:2], PROMPTS[:2])
    gen = dict(max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        with lvlm_fix.apply(a, "var", tau=2.5):
            alone_a = a.model.generate(**batch_a, **gen)
        with lvlm_fix.apply(b, "vhr") as plan_b:
            alone_b = b.model.generate(**batch_b, **gen)
        heads_b = plan_b.report()["vhr"]["selected_heads"]
        with lvlm_fix.apply(a, "var", tau=2.5), lvlm_fix.apply(b, "vhr") as plan_b:
            # interleaved: each model's generate() runs its own plan while the other's is active
            both_b = b.model.generate(**batch_b, **gen)
            both_a = a.model.generate(**batch_a, **gen)
    assert torch.equal(both_a, alone_a) and torch.equal(both_b, alone_b)
    assert plan_b.report()["vhr"]["selected_heads"] == heads_b
    assert no_plan_left(a.model) and no_plan_left(b.model)


def test_two_handles_of_one_model_share_its_plan_seat(tiny):
    import dataclasses

    from lvlm_fix.errors import LvlmFixError

    lvlm = tiny("llava")
    twin = dataclasses.replace(lvlm)  # another handle, the same model underneath
    with Plan(lvlm, [EveryLayer()]).active():
        with pytest.raises(LvlmFixError, match="already applied to this model"):
            with Plan(twin, [EveryLayer()]).active():
                pass
    assert no_plan_left(lvlm.model)


def test_a_plan_from_a_second_thread_on_the_same_model_is_refused(tiny, images):
    """One model serves one thread at a time: while thread A has VHR applied (its text-only stream
    runs its own plan on a side thread, which is allowed), thread B's method is refused with one
    line; once A is done, B's call runs."""
    import dataclasses
    import threading

    import lvlm_fix
    from lvlm_fix.errors import LvlmFixError

    lvlm = tiny("llava")
    batch = lvlm.encode(images[:1], PROMPTS[:1])
    entered, done_checking, result = threading.Event(), threading.Event(), {}

    def thread_a():
        try:
            with lvlm_fix.apply(lvlm, "vhr") as plan:
                entered.set()
                done_checking.wait(60)
                with torch.inference_mode():  # A's own call still works (and its VHR side stream)
                    lvlm.model.generate(**batch, max_new_tokens=2, do_sample=False)
                result["heads"] = plan.report()["vhr"]["selected_heads"]
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            result["error"] = e
            entered.set()

    a = threading.Thread(target=thread_a)
    a.start()
    try:
        assert entered.wait(60) and "error" not in result
        for handle in (lvlm, dataclasses.replace(lvlm)):  # the model is what is busy, not the handle
            with pytest.raises(LvlmFixError, match="another thread") as err:
                lvlm_fix.generate(handle, images[:1], PROMPTS[:1], method="var", max_new_tokens=2)
            assert "\n" not in str(err.value) and "once per thread" in str(err.value)
    finally:
        done_checking.set()
        a.join(120)
    assert "error" not in result and result["heads"], result
    out = lvlm_fix.generate(lvlm, images[:1], PROMPTS[:1], method="var", max_new_tokens=2)  # sequential use works
    assert len(out.texts) == 1
    assert no_plan_left(lvlm.model)
