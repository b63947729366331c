"""``check_method``: the conformance checks every built-in method passes, in one call for a plugin.

Each check runs the method through the same path as :func:`lvlm_fix.generate` (the package's
:func:`~lvlm_fix.api.run_methods`, one :class:`~lvlm_fix.hooks.Plan` around the model's own
``generate()``) on two left-padded rows of images and prompts, greedy, 5 new tokens:

* ``noop``: at ``config_cls.noop()`` the answers are vanilla ``generate()``'s, tokens and scores
  bit for bit (``torch.equal``), and a method that acts inside ``generate()`` installs nothing (no
  layer, hook or attribute beyond those of an empty plan);
* ``math_identity``: at ``config_cls.math_identity()`` the method's callbacks run, at every layer
  it binds, and the tokens are vanilla's, the scores within ``atol`` (eager fp32 math is not
  bit-identical to sdpa);
* ``batched``: each row of the batch gets the answer it gets alone (scores within ``atol`` too);
* ``hygiene``: after every exit, normal or by an interrupt raised inside ``generate()``, every
  module of the model has the hooks, attributes and attention implementation it had before, and
  vanilla ``generate()`` gives what it gave before;
* ``chunked``: with the edited attention forced into query chunks of a few rows
  (``$LVLM_FIX_ATTN_BLOCK_MB``), the answers equal the unchunked ones (scores within ``atol``).

``params`` are the settings under which the method acts on the check's model (its defaults when
omitted); ``batched``, ``hygiene`` and ``chunked`` run at them. ``noop`` and ``math_identity`` run
at the settings ``noop()`` / ``math_identity()`` declare, with ``identity_params`` set on them: on a
tiny random model, whose attention is nearly uniform, a threshold may need lowering there too for
the math to select anything (the built-ins' tests lower VAR's ``tau`` and ACT's ``thres``).

A check that does not apply is skipped, with the reason in the returned list: ``noop`` /
``math_identity`` when the config declares no such setting, ``chunked`` when no edited attention
layer ran (a method that acts on the logits or the input only). A method that runs ``generate()``
itself (stage ``PIPELINE`` / ``INPUT``) may refuse ``generate()``'s score outputs (MVP does), so its
answers are compared as texts; so are those of a method that owns the decoding loop (stage
``DECODING``: its scores are a beam search's log-probabilities, not greedy decoding's logits). A
failed check raises ``AssertionError`` naming the method and the
check.

Example::

    from lvlm_fix.testing import check_method

    results = check_method(ScaleImageAttention)  # a tiny LLaVA is built offline on first use
    assert [r.status for r in results] == ["passed"] * 5
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lvlm_fix.api import run_methods
from lvlm_fix.errors import ConfigError
from lvlm_fix.hooks import Participant, Plan, attention
from lvlm_fix.hooks.plan import LAYER_ROLES
from lvlm_fix.interventions import Intervention, MethodConfig
from lvlm_fix.model import LVLM

__all__ = ["CHECKS", "CheckResult", "check_method"]

CHECKS = ("noop", "math_identity", "batched", "hygiene", "chunked")
"""The checks, in the order they run."""

# Two prompts of different lengths, so that the batch is left padded.
PROMPTS = ("Is there a cat in the image?", "Describe the image: every object, its colour and where it is.")
GEN = {"max_new_tokens": 5, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
CHUNK_QUERIES = 4  # query rows per chunk when chunking is forced: several chunks in any prompt of an image
# The callbacks through which a method's math runs (hooks.Participant's and a contrast stream's);
# math_identity counts their calls to show the math was in the path.
CALLBACKS = ("pre_softmax", "accumulate", "post_softmax", "observe", "observe_values", "head_output", "residual",
             "mlp_output", "layer_output", "unembed_rows", "logits", "combine", "combine_scores")


@dataclass(frozen=True)
class CheckResult:
    """One check of :func:`check_method`: ``passed``, or ``skipped`` with the reason."""

    check: str
    status: Literal["passed", "skipped"]
    reason: str = ""


@dataclass
class _Run:
    texts: list[str]
    tokens: torch.Tensor | None  # [b, new] generated ids (None for a method that runs generate() itself)
    scores: tuple[torch.Tensor, ...] | None  # per step [b, vocab]


class _Interrupt(KeyboardInterrupt):
    """Raised inside generate() by the hygiene check: a BaseException, as Ctrl-C is, so that only
    ``finally`` blocks (not ``except Exception``) can clean up after it."""


class _RaiseAt(LogitsProcessor):
    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            raise _Interrupt(f"interrupted at decoding step {self.step}")
        return scores


def check_method(cls: type[Intervention], *, params: Mapping[str, Any] | None = None, model: LVLM | None = None,
                 identity_params: Mapping[str, Any] | None = None, images: Sequence[Any] | None = None,
                 prompts: Sequence[str] | None = None, atol: float = 1e-5) -> list[CheckResult]:
    """Run the conformance checks (module docstring) on method class ``cls``; raise on the first failure.

    Args:
        cls: an :class:`~lvlm_fix.interventions.Intervention` subclass (registered or not).
        params: the method's settings for the checks, by field name; default its config's defaults.
        identity_params: fields set on ``noop()`` and ``math_identity()`` for the identity checks; default none.
        model: the handle to check on; default a tiny random LLaVA built offline (once per process).
        images, prompts: two rows to check on; default two drawn images and two prompts of different lengths.
        atol: tolerance on the scores where they need not be bit-identical (fp32; loosen it for half precision).

    Returns:
        One :class:`CheckResult` per check of :data:`CHECKS`, in that order.

    Raises:
        AssertionError: ``check_method(NAME) CHECK: what differs``.
        ConfigError: ``cls`` is not a method class, or ``params`` / ``identity_params`` name a field its
            config does not have or a value it refuses.
    """
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        raise ConfigError(f"check_method({cls!r}): give a method class, a subclass of lvlm_fix.interventions.Intervention")
    fields = [f.name for f in dataclasses.fields(cls.config_cls)]
    for arg, given in (("params", params), ("identity_params", identity_params)):
        unknown = sorted(set(given or {}) - set(fields))
        if unknown:
            raise ConfigError(f"check_method({cls.__name__}, {arg}=...): {unknown[0]!r} is not a field of "
                              f"{cls.config_cls.__name__}; its fields are {', '.join(fields)}")
    case = _Case(cls, dict(params or {}), dict(identity_params or {}), model or tiny_model(), atol,
                 list(images) if images is not None else _images(), list(prompts or PROMPTS))
    with _env(attention.BLOCK_ENV, None):  # "unchunked" means unchunked, whatever the caller's environment
        return case.run()


@dataclass
class _Case:
    cls: type[Intervention]
    params: dict[str, Any]
    identity_params: dict[str, Any]
    lvlm: LVLM
    atol: float
    images: list[Any]
    prompts: list[str]

    def __post_init__(self) -> None:
        self.name = getattr(self.cls, "name", self.cls.__name__)
        self.in_plan = not self.cls.stage.wraps_generate  # acts inside the caller's generate()

    def fail(self, check: str, what: str) -> AssertionError:
        return AssertionError(f"check_method({self.name}) {check}: {what}")

    def run(self) -> list[CheckResult]:
        self.before = None
        self.vanilla = self.generate(None)
        self.before = _state(self.lvlm.model)  # after a first generate(), which may cache things on the model
        active = self.cls(self.cls.config_cls(**self.params))
        noop, math_identity, batched = self.noop(), self.math_identity(), self.batched(active)
        chunked = self.chunked(active)
        hygiene = self.hygiene(active)  # last: it ends with vanilla generate() after everything
        return [noop, math_identity, batched, hygiene, chunked]

    # -- running ---------------------------------------------------------------------------------
    def setting(self, which: str) -> MethodConfig | None:
        """``config_cls.<which>()`` (``noop`` or ``math_identity``) with ``identity_params`` set on it."""
        try:
            special = getattr(self.cls.config_cls, which)()
        except NotImplementedError:  # the base class's: the method declares none
            return None
        return None if special is None else dataclasses.replace(special, **self.identity_params)

    def generate(self, method: Intervention | None, rows: slice = slice(None)) -> _Run:
        """The method (None: none) through run_methods, as lvlm_fix.generate() runs it, then a hygiene check."""
        texts_only = not self.in_plan or self.cls.stage.owns_decoding  # a decoding loop scores as a beam search
        gen = dict(GEN) if method is not None and texts_only else {**GEN, **SCORES}
        images, prompts = self.images[rows], self.prompts[rows]
        out = run_methods(self.lvlm, [method] if method is not None else [], images, prompts, gen)
        self.clean("a run that returned" if method is not None else "a run without the method")
        if out.output is None:
            return _Run(out.texts, None, None)
        prompt_len = self.lvlm.encode(images, prompts)["input_ids"].shape[1]
        return _Run(out.texts, out.output.sequences[:, prompt_len:], out.output.scores)

    def clean(self, after: str) -> None:
        """The model as it was before the first run: every module's hooks, attributes and attention implementation."""
        diff = self.before is not None and _diff(self.before, _state(self.lvlm.model))
        if diff:
            raise self.fail("hygiene", f"after {after}, {diff}")

    def same(self, check: str, got: _Run, want: _Run, *, exact: bool, rows: slice = slice(None), what: str) -> None:
        """``got`` (its rows) equal to ``want``'s ``rows``: texts, tokens, and scores (exactly or within atol)."""
        want_texts = want.texts[rows]
        if got.texts != want_texts:
            raise self.fail(check, f"{what}: answers {got.texts!r} differ from {want_texts!r}")
        if got.tokens is None or want.tokens is None:
            return
        n = got.tokens.shape[1]
        if not torch.equal(got.tokens, want.tokens[rows, :n]):
            raise self.fail(check, f"{what}: tokens {got.tokens.tolist()} differ from {want.tokens[rows, :n].tolist()}")
        for step, (a, b) in enumerate(zip(got.scores, want.scores)):
            b = b[rows]
            if exact and not torch.equal(a, b):
                raise self.fail(check, f"{what}: the scores of step {step} are not bit-identical "
                                       f"(max difference {(a - b).abs().max().item():.3g})")
            finite = torch.isfinite(a) | torch.isfinite(b)  # -inf where a processor masked a token, in both
            if not exact and (not torch.equal(a.isinf(), b.isinf())
                              or (a - b)[finite].abs().max().item() > self.atol):
                raise self.fail(check, f"{what}: the scores of step {step} differ by "
                                       f"{(a - b)[finite].abs().max().item():.3g} > atol={self.atol:g}")

    # -- the checks ------------------------------------------------------------------------------
    def noop(self) -> CheckResult:
        config = self.setting("noop")
        if config is None:
            return CheckResult("noop", "skipped", f"{self.cls.config_cls.__name__} declares no noop() setting")
        method = self.cls(config)
        if self.in_plan:
            self.installs_nothing(method)
        self.same("noop", self.generate(method), self.vanilla, exact=True, what=f"at noop() {_short(config)}")
        return CheckResult("noop", "passed")

    def installs_nothing(self, method: Intervention) -> None:
        """At noop() the plan holds no layer of the method and adds no hook or attribute to an empty plan's."""
        # Two plans hold hooks and patches of their own (new ids): compare counts and attribute names.
        with Plan(self.lvlm, []).active():
            empty = _state(self.lvlm.model, by_identity=False)
        with Plan(self.lvlm, [method]).active():
            layers = {k: sorted(getattr(method, k)) for k in LAYER_ROLES if getattr(method, k)}
            diff = _diff(empty, _state(self.lvlm.model, by_identity=False))
        self.clean("a noop() plan")
        if layers:
            raise self.fail("noop", f"at noop() the method still binds layers {layers}")
        if diff:
            raise self.fail("noop", f"at noop() the method installs something: {diff}")

    def math_identity(self) -> CheckResult:
        config = self.setting("math_identity")
        if config is None:
            return CheckResult("math_identity", "skipped",
                               f"{self.cls.config_cls.__name__}.math_identity() gives no setting")
        method = self.cls(config)
        calls, seen = _count_callbacks(method) if self.in_plan else (None, set())
        got = self.generate(method)
        if calls is not None:
            if not sum(calls.values()):
                raise self.fail("math_identity", f"at math_identity() {_short(config)} no callback of the method ran "
                                                 f"({', '.join(CALLBACKS)}): the math is not in the path")
            declared = set().union(*(getattr(method, k) for k in LAYER_ROLES))  # bound by the run's plan
            if declared - seen:
                raise self.fail("math_identity", f"at math_identity() {_short(config)} no callback ran at layer(s) "
                                                 f"{sorted(declared - seen)} that the method binds")
        self.same("math_identity", got, self.vanilla, exact=False, what=f"at math_identity() {_short(config)}")
        return CheckResult("math_identity", "passed")

    def batched(self, method: Intervention) -> CheckResult:
        self.active = self.generate(method)
        for i in range(len(self.prompts)):
            alone = self.generate(method, slice(i, i + 1))
            self.same("batched", alone, self.active, exact=False, rows=slice(i, i + 1),
                      what=f"row {i} alone against row {i} of the batch")
        return CheckResult("batched", "passed")

    def hygiene(self, method: Intervention) -> CheckResult:
        # Every run so far was checked on its way out (generate()); now the exits by an interrupt.
        calls = self.interrupted(method, at_call=None)  # counts the method's generate() calls
        for at in sorted({1, max(calls, 1)}):  # the first call and, for a method that runs several, the last
            self.interrupted(method, at_call=at)
        again = self.generate(None)
        self.same("hygiene", again, self.vanilla, exact=True, what="vanilla generate() after the method")
        return CheckResult("hygiene", "passed")

    def interrupted(self, method: Intervention, at_call: int | None) -> int:
        """Run the method with an interrupt raised inside its ``at_call``-th generate() call (None: none);
        the number of generate() calls it made."""
        model = self.lvlm.model
        own = model.__dict__.get("generate")
        real = model.generate
        count, raised = [0], []

        def generate(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] == at_call:
                step = 2 if kwargs.get("max_new_tokens", 2) >= 2 else 1  # after a decode step where there is one
                raiser = _RaiseAt(step)
                raised.append(raiser)
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), raiser])
            return real(*args, **kwargs)

        model.generate = generate
        interrupted = False
        try:
            run_methods(self.lvlm, [method], self.images, self.prompts, dict(GEN))
        except _Interrupt:
            interrupted = True
        finally:
            if own is None:
                del model.generate
            else:
                model.generate = own
        where = f"an interrupt inside generate() call {at_call}"
        if at_call is not None:
            self.clean(where)
            if raised and raised[0].calls >= raised[0].step and not interrupted:
                raise self.fail("hygiene", f"{where} did not reach the caller: the method swallowed it")
        else:
            self.clean("a run that returned")
        return count[0]

    def chunked(self, method: Intervention) -> CheckResult:
        batch = self.lvlm.encode(self.images, self.prompts)
        rows, prompt_len = batch["input_ids"].shape
        block = CHUNK_QUERIES * 4 * rows * self.lvlm.num_heads * prompt_len  # bytes of CHUNK_QUERIES fp32 query rows
        with _spy_chunks() as chunks, _env(attention.BLOCK_ENV, f"{(block + 0.5) / 2**20:.12f}"):
            got = self.generate(method)
        if not chunks:
            return CheckResult("chunked", "skipped", "no edited attention layer ran the eager path at these "
                                                     "settings, so there is no query chunk to compare")
        self.same("chunked", got, self.active, exact=False, what=f"in query chunks of {CHUNK_QUERIES} rows")
        return CheckResult("chunked", "passed")


def _short(config: MethodConfig) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items()) + ")"


def _count_callbacks(method: Participant) -> tuple[dict[str, int], set[int]]:
    """Count the calls of the method's own callbacks (those it overrides), through instance attributes;
    and collect the layers they were called for (from their ``ctx``)."""
    calls: dict[str, int] = {}
    layers: set[int] = set()
    for name in CALLBACKS:
        own = getattr(type(method), name, None)
        if own is None or own is getattr(Participant, name, None):
            continue
        calls[name] = 0

        def counted(*args: Any, _name: str = name, _fn: Callable = getattr(method, name), **kwargs: Any) -> Any:
            calls[_name] += 1
            ctx = args[-1] if args else None
            if isinstance(getattr(ctx, "layer", None), int):
                layers.add(ctx.layer)
            return _fn(*args, **kwargs)

        setattr(method, name, counted)
    return calls, layers


# -- the model's state, for hygiene ----------------------------------------------------------------
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _state(model: torch.nn.Module, by_identity: bool = True) -> dict[str, dict[str, Any]]:
    """Per module (and ``<torch global>``): its hook ids, its attributes (callables by identity: a
    patched method is a new object under the old name) and its config's attention implementation.
    ``by_identity=False``: hook counts and attribute names only."""
    from torch.nn.modules import module as torch_module

    def hooks(d: dict) -> Any:
        return tuple(d) if by_identity else tuple(range(len(d)))

    out: dict[str, dict[str, Any]] = {"<torch global>": {
        d: hooks(getattr(torch_module, f"_global{d}")) for d in _HOOK_DICTS if hasattr(torch_module, f"_global{d}")}}
    for name, m in model.named_modules():
        state: dict[str, Any] = {d: hooks(getattr(m, d, {})) for d in _HOOK_DICTS}
        state["attributes"] = {k: id(v) if callable(v) and by_identity else None for k, v in vars(m).items()}
        config = m.__dict__.get("config")
        if config is not None:
            configs = {"": config, **{k: getattr(config, k, None) for k in getattr(config, "sub_configs", {})}}
            state["attention"] = {k: getattr(c, "_attn_implementation", None) for k, c in configs.items() if c is not None}
        out[name or "<model>"] = state
    return out


def _diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> str:
    """The first difference between two :func:`_state` snapshots, in words ("" when none)."""
    for where in before.keys() | after.keys():
        if where not in after or where not in before:
            return f"module {where!r} was {'removed' if where not in after else 'added'}"
    for where, b in before.items():
        a = after[where]
        for d in _HOOK_DICTS:
            if b.get(d) != a.get(d):
                kind = d.strip("_").replace("_", " ")[:-1] + "(s)"  # "forward pre hook(s)"
                extra = len(a.get(d, ())) - len(b.get(d, ()))
                change = f"{extra} {kind} more" if extra > 0 else f"{-extra} {kind} fewer" if extra < 0 else \
                    f"other {kind}"
                return f"module {where!r} has {change} than before"
        if b.get("attributes") != a.get("attributes"):
            gained = sorted(set(a["attributes"]) - set(b["attributes"]))
            lost = sorted(set(b["attributes"]) - set(a["attributes"]))
            swapped = sorted(k for k in set(a["attributes"]) & set(b["attributes"]) if a["attributes"][k] != b["attributes"][k])
            parts = [f"gained attribute(s) {gained}" * bool(gained), f"lost attribute(s) {lost}" * bool(lost),
                     f"has attribute(s) {swapped} replaced" * bool(swapped)]
            return f"module {where!r} " + ", ".join(p for p in parts if p)
        if b.get("attention") != a.get("attention"):
            return f"module {where!r} has its attention implementation {b.get('attention')} changed to {a.get('attention')}"
    return ""


# -- environment -----------------------------------------------------------------------------------
@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def _spy_chunks() -> Iterator[list[tuple[int, int]]]:
    """The ``(start, stop)`` of every query chunk an edited attention layer formed inside the block."""
    seen: list[tuple[int, int]] = []
    original = attention._chunk_context

    def spy(ctx: Any, q0: int, q1: int, *args: Any, **kwargs: Any) -> Any:
        seen.append((q0, q1))
        return original(ctx, q0, q1, *args, **kwargs)

    attention._chunk_context = spy  # the attention function looks the name up at each call
    try:
        yield seen
    finally:
        attention._chunk_context = original


# -- the default model -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tiny_model() -> LVLM:
    """A tiny random-weight LLaVA (the real architecture, CLIP tower with a CLS token), built offline and
    loaded once per process in fp32 on the CPU (about half a second)."""
    import lvlm_fix

    from .tiny import build_tiny

    root = tempfile.mkdtemp(prefix="lvlm-fix-check-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return lvlm_fix.load(build_tiny("llava", os.path.join(root, "llava"), seed=0), dtype="float32")


def _images() -> list[Any]:
    from .tiny import build_image

    return [build_image(seed) for seed in range(2)]
