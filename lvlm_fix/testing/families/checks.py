"""The checks each family's tiny model goes through, and one verdict per family (:func:`verify`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import SPANS, tiny_batch, tiny_config, tiny_model

# -- verification ---------------------------------------------------------------------------------
# Method settings under which each method acts on a tiny random model, whose attention is nearly
# uniform and whose activations are small: VAR's tau = 20 presumes a 4096-wide backbone
# (|x_d|/rms(x) <= sqrt(64) = 8 here) and ACT's mean-attention threshold 0.1 is never reached.
ACTIVE: dict[str, dict[str, Any]] = {"vhr": {}, "var": {"tau": 2.5}, "act": {"thres": 0.03}}
NEW_TOKENS = 3
# A row of a left-padded batch against the same row alone: the scores may differ by float rounding only.
BATCH_TOL = 1e-4


def _tol() -> str:
    return f"{BATCH_TOL:.0e}".replace("e-0", "e-")  # 1e-4


@dataclass
class FamilyResult:
    """What :func:`verify` found for one family.

    ``status`` is ``works``, ``refused`` (the seam cannot serve it; ``detail`` says why),
    ``unbuildable`` (no tiny model or inputs could be made offline; ``detail`` says why) or
    ``fails`` (a check failed: a bug to fix). ``path`` is how it was driven: ``processor`` or
    ``model-only``. ``touched`` is what each method reported touching; ``grid`` the image-token
    grid :mod:`lvlm_fix.layout` reads from the inputs (or why none); ``batch`` how the rows of the
    padded batch compared with each row alone (:func:`check`).
    """

    model_type: str
    status: str
    detail: str = ""
    path: str = ""
    touched: dict[str, str] = field(default_factory=dict)
    grid: str = ""
    batch: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        what = "; ".join(f"{k}: {v}" for k, v in self.touched.items()) if self.status == "works" else self.detail
        return f"{self.model_type:24s} {self.status:11s} {self.path:11s} {self.seconds:5.1f}s  {what}"


def _summary(name: str, report: dict[str, Any]) -> str:
    """A short account of what a method touched, from its report (row 0 where per row)."""
    if name == "vhr":
        heads = report.get("selected_heads", {})
        return f"{sum(len(rows[0]) for rows in heads.values())} heads on layers {','.join(heads)}"
    if name == "var":
        total = report.get("redistributed_total") or [0]
        return f"{total[0]} (head, query) pairs redistributed on layers {','.join(map(str, report.get('layers', [])))}"
    if name == "act":
        heads = report.get("heads", {})
        return f"{sum(len(h) for h in heads.values())} heads on layers {','.join(heads)}"
    return "ran"


def _check_image_span(lvlm: Any, batch: dict[str, Any]) -> None:
    """The seam's image tokens are where the model puts image features: no more, no fewer, per row.

    Where the model put them is read from the model itself: the positions where the first decoder
    layer's input (or the decoder's ``inputs_embeds``) differs from the embedding of ``input_ids``.
    A family's boundary tokens (:data:`SPANS`) are not image tokens, even where the model gives
    them learned embeddings of their own (Ovis 2.5).
    """
    import torch

    from ...adapters import _text_model
    from ...hooks.plan import Participant, Plan

    model, ids = lvlm.model, batch["input_ids"]
    seen: dict[str, Any] = {}

    class Span(Participant):
        def begin(self, tokens: Any) -> None:
            seen["seam"] = tokens.image_mask[:, : ids.shape[1]].clone()

    def decoder_input(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("embeds", kwargs.get("inputs_embeds"))

    def layer_input(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("layer", args[0] if args else kwargs.get("hidden_states"))

    hooks = [_text_model(model).register_forward_pre_hook(decoder_input, with_kwargs=True),
             lvlm.text_layers[0].register_forward_pre_hook(layer_input, with_kwargs=True)]
    try:
        with torch.inference_mode(), Plan(lvlm, [Span()]).active():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    # The decoder's own input where it takes embeddings; the first layer's where it embeds input_ids itself
    # (Chameleon). Not the first layer's always: some decoders scale every embedding first (Granite).
    embeds = seen["embeds"] if seen["embeds"] is not None else seen["layer"]
    valid = batch["attention_mask"].bool()
    config = model.config
    boundary = torch.tensor([getattr(config, k) for k in SPANS.get(config.model_type, ())], dtype=ids.dtype)
    placed = (embeds != model.get_input_embeddings()(ids)).any(-1) & valid & ~torch.isin(ids, boundary)
    seam = seen["seam"] & valid
    assert torch.equal(placed, seam), (
        f"the seam sees {seam.sum(1).tolist()} image tokens per row where the model put image features at "
        f"{placed.sum(1).tolist()} ({(placed & seam).sum(1).tolist()} in common)")


def _row_difference(batch_out: Any, batch_len: int, alone: Sequence[tuple[Any, int]]) -> tuple[float, bool]:
    """The largest score difference between row ``r`` of a batch's ``generate()`` output and row ``r``
    generated alone (``alone[r]``: its output and prompt length), and whether each row generated the same
    tokens both ways. Scores masked alike (-inf, the dtype's minimum) compare equal."""
    import torch

    worst, same = 0.0, True
    for r, (out, length) in enumerate(alone):
        new = out.sequences[0, length:]
        same &= torch.equal(batch_out.sequences[r, batch_len: batch_len + len(new)], new)
        for a, b in zip(batch_out.scores, out.scores):
            diff = torch.where(a[r] == b[0], 0.0, (a[r] - b[0]).abs())
            worst = max(worst, float(diff.max()))
    return worst, same


def check(lvlm: Any, batch: dict[str, Any],
          alone: Callable[[int], dict[str, Any]] | None = None) -> tuple[dict[str, str], str]:
    """Run the seam's checks on a wrapped model and one batch; raise AssertionError on a failure.

    ``alone(r)`` gives row ``r`` of the batch as a batch of its own (no padding); with it, each row of
    the padded batch must give the scores and tokens it gives alone (to :data:`BATCH_TOL`), without a
    method and under each one, unless the model's own forward already differs by more than that.
    Returns what each method touched (see :func:`_summary`) and how the batch check went.
    """
    import torch

    from ...api import apply
    from ...hooks.plan import Participant, Plan
    from ...interventions import METHODS

    model = lvlm.model
    valid = batch["attention_mask"].bool()
    prompt_len = batch["input_ids"].shape[1]
    gen = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1, "output_scores": True,
           "return_dict_in_generate": True}

    class EveryLayer(Participant):  # an identity that takes every layer down the eager path
        def bind(self, lvlm: Any) -> None:
            self.eager_layers = frozenset(range(lvlm.num_layers))

    _check_image_span(lvlm, batch)
    with torch.inference_mode():
        ours = model(**batch).logits
        with lvlm.attention_implementation("sdpa"):
            sdpa = model(**batch).logits
        assert torch.equal(ours[valid], sdpa[valid]), f"no-plan logits differ from stock sdpa by {(ours - sdpa)[valid].abs().max():.3g}"
        with Plan(lvlm, [EveryLayer()]).active():
            eager_path = model(**batch).logits
        with lvlm.attention_implementation("eager"):
            eager = model(**batch).logits
        diff = float((eager_path - eager)[valid].abs().max())
        assert diff < 1e-4, f"the eager path differs from stock eager by {diff:.3g}"

        vanilla = model.generate(**batch, **gen)
        singles = [alone(r) for r in range(len(batch["input_ids"]))] if alone is not None else []

        def each_alone() -> list[tuple[Any, int]]:
            return [(model.generate(**one, **gen), one["input_ids"].shape[1]) for one in singles]

        own = _row_difference(vanilla, prompt_len, each_alone())[0] if singles else None
        touched = {}
        for name, params in ACTIVE.items():
            noop = {k: v for k, v in METHODS.get(name).config_cls.noop().to_dict().items() if v is not None}
            with apply(lvlm, name, **noop):
                same = model.generate(**batch, **gen)
            assert torch.equal(same.sequences, vanilla.sequences) and all(
                torch.equal(a, b) for a, b in zip(same.scores, vanilla.scores)), f"{name}'s noop changed the output"
            with apply(lvlm, name, **params) as plan:
                out = model.generate(**batch, **gen)
            assert not torch.equal(out.scores[0], vanilla.scores[0]), f"{name} left the logits unchanged"
            touched[name] = _summary(name, plan.report()[name])
            if own is not None and own <= BATCH_TOL:
                with apply(lvlm, name, **params):
                    worst, same_tokens = _row_difference(out, prompt_len, each_alone())
                assert worst <= BATCH_TOL and same_tokens, (
                    f"under {name}, a row of the padded batch differs from the row alone by {worst:.3g}"
                    + ("" if same_tokens else " and generates other tokens"))
    if own is None:
        batch_note = ""
    elif own <= BATCH_TOL:
        batch_note = "each row as alone"
    else:  # the model's own doing: no method can be held to a tighter standard than the model itself
        batch_note = (f"not checked: without a method, the model's own rows in the batch already differ from the rows "
                      f"alone by over {_tol()}")
    return touched, batch_note


def verify(model_type: str) -> FamilyResult:
    """Build ``model_type`` tiny, wrap it, and run :func:`check`; never raises for a family's failure."""
    from transformers import CONFIG_MAPPING

    from ...adapters import unsupported_reason

    start = time.perf_counter()

    def result(status: str, detail: str = "", **kw: Any) -> FamilyResult:
        return FamilyResult(model_type, status, detail, seconds=round(time.perf_counter() - start, 2), **kw)

    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception as e:  # noqa: BLE001 - e.g. a config that needs its sub-configs given (vision-encoder-decoder)
        return result("unbuildable", f"default config: {_error(e)}")
    reason = unsupported_reason(default)  # what the config alone rules out, at full size
    if reason is not None:
        return result("refused", reason)
    build = _with_processor if model_type in _processor_families() else _model_only
    found = build(model_type)
    if found["status"] in ("works", "fails"):
        found["path"] = "processor" if build is _with_processor else "model-only"
    return result(**found)


def _processor_families() -> tuple[str, ...]:
    from ..tiny import PROCESSOR_FAMILIES

    return PROCESSOR_FAMILIES


def _model_only(model_type: str) -> dict[str, Any]:
    """A tiny model from the shrunk default config, driven with hand-built inputs."""
    from ...errors import UnsupportedModelError
    from ...model import wrap

    for stage, make in (("config", lambda: tiny_config(model_type)), ("model", lambda: tiny_model(model_type))):
        try:
            model = make()
        except Exception as e:  # noqa: BLE001 - the family's own error is the finding
            return {"status": "unbuildable", "detail": f"tiny {stage}: {_error(e)}"}
    try:
        lvlm = wrap(model, name=f"tiny {model_type}")
    except UnsupportedModelError as e:
        return {"status": "refused", "detail": e.reason}
    try:
        batch = tiny_batch(model)
    except Exception as e:  # noqa: BLE001
        return {"status": "unbuildable", "detail": f"inputs: {_error(e)}"}
    return _checked(lvlm, batch, lambda r: tiny_batch(model, rows=[r]))


def _with_processor(model_type: str) -> dict[str, Any]:
    """A tiny checkpoint with its real processor (:mod:`lvlm_fix.testing.tiny`), loaded by ``load()``, inputs from ``encode()``."""
    import tempfile

    from ...model import load
    from ..tiny import build_image, build_tiny

    with tempfile.TemporaryDirectory(prefix=f"lvlm-fix-{model_type}-") as tmp:
        lvlm = load(build_tiny(model_type, tmp), dtype="float32")
        images, prompts = [build_image(0), build_image(1)], ["Is there a cat?", "Describe the image in detail."]
        batch = lvlm.encode(images, prompts)
        return _checked(lvlm, batch, lambda r: lvlm.encode(images[r: r + 1], prompts[r: r + 1]))


def _stock_forward_error(lvlm: Any, batch: dict[str, Any]) -> str | None:
    """The error of the model's own forward (stock sdpa, no lvlm-fix function in the path), or None."""
    import traceback

    import torch

    try:
        with torch.no_grad(), lvlm.attention_implementation("sdpa"):
            lvlm.model(**batch)
    except Exception as e:  # noqa: BLE001 - the family's own error is the finding
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return f"{_error(e)} ({Path(tb.filename).name}:{tb.lineno})"
    return None


def _checked(lvlm: Any, batch: dict[str, Any], alone: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    import traceback

    from ...errors import LvlmFixError
    from ...layout import image_token_grids

    try:
        touched, batch_note = check(lvlm, batch, alone)
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{_error(e)} ({Path(tb.filename).name}:{tb.lineno})"
        broken = _stock_forward_error(lvlm, batch)
        if broken is not None:  # transformers' own model fails on these inputs: not the seam's finding
            import transformers

            return {"status": "unbuildable", "detail": f"its stock forward fails in transformers "
                                                       f"{transformers.__version__}: {broken}"}
        return {"status": "fails", "detail": where}
    try:
        g = image_token_grids(lvlm, batch)[0]
        grid = f"{g.rows}x{g.cols}" + (f" at +{g.offset}" if g.offset else "")
    except LvlmFixError as e:  # reported, not fatal: VHR, VAR and ACT need no grid (CARVE and the figure do)
        message = str(e)
        grid = "none: " + ("learned " + message.split("they are the ")[-1] if "not a patch grid" in message
                           else "separator tokens in unknown places" if "separator tokens" in message
                           else "not a square, and the inputs give no grid")
    return {"status": "works", "touched": touched, "grid": grid, "batch": batch_note}


def _error(e: BaseException) -> str:
    """An exception as one short line (strict-dataclass errors span several): at most 180 characters of its
    message, ending at a sentence's end where one falls inside them."""
    text = " ".join(str(e).split())
    if len(text) > 180:
        text = text[:180]
        text = text[: text.rindex(". ") + 1] if ". " in text else text
    return f"{type(e).__name__}: {text}"

