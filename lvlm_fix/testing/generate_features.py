"""Which of ``generate()``'s features each method serves: the matrix that CI runs, and its table.

Usage::

    python -m lvlm_fix.testing.generate_features                # run the whole matrix, print the table
    # from the repository root: and write the table to docs/generate-features.md (any PATH it is given)
    python -m lvlm_fix.testing.generate_features --write-docs docs/generate-features.md

A row is a subject: the vanilla model under lvlm-fix's seam (``none``), every built-in method, and
one composition per pair of stages. A column is one ``generate()`` feature. Each cell runs the
two-row, left-padded batch of :data:`PROMPTS` on the embedded testbed (greedy, :data:`MAX_NEW`
new tokens) with the feature, and is one of:

* ``yes``: the run agrees with the same subject under the default settings (dynamic cache,
  uncompiled), by the column's check (:class:`Feature`):

  - *same*: the feature changes nothing that ``generate()`` decides (a cache, compilation, what it
    returns, a streamer): tokens equal, every step's logits within :data:`TOL`, and what the
    feature adds is there (scores, every layer's attentions, the streamed tokens, ...);
  - *prefix*: the feature ends the run early (``max_time``): the tokens and logits it produced
    are the default run's first ones;
  - *first*: a lossy cache (quantized): the prefill, which attends to the keys as computed, gives
    the default run's first token and logits; later steps attend to dequantized keys;
  - *replay*: the feature changes the decoding (sampling, beams, a logits processor, stop strings):
    its contract holds (no banned word, no end before ``min_new_tokens``, ...) and every step's
    logits of every returned sequence equal the subject's logits, under the default settings, for
    the same tokens (the sequences forced back through ``generate()``) within :data:`TOL`.

* ``refused``: one :class:`~lvlm_fix.errors.LvlmFixError` line naming the feature, raised before
  any forward (no module of the model ran). A refusal that comes only after some forward ran (a
  pipeline's own passes) shows as ``refused†``, which no table cell may be: the test fails on it.
* ``skipped``: the feature needs what this machine lacks (a CUDA device, a package); the reason.
* ``n/a``: the subject does not take the feature at all, e.g. a method that runs ``generate()``
  itself answers through :func:`lvlm_fix.generate`, which returns texts, not ``generate()``'s dict.

Subjects that run ``generate()`` themselves (CARVE, MVP; stages ``input`` and ``pipeline``) go
through :func:`lvlm_fix.generate` with the feature in ``generate_kwargs``; their answer is the
last ``generate()`` call, which must receive the feature as given, and is checked as above but
by its tokens (``lvlm_fix.generate`` keeps no logits).

Three columns run a tiny model instead (:func:`load_models`): the sliding-window cache, the tiny
Gemma-3 (one layer in two slides over 8 keys, prompts of 43 tokens), its static cache (a window
that rolls) against its dynamic one; ``stop_strings``, the tiny LLaVA, because transformers'
``StopStringCriteria`` cannot read the testbed's word-level vocabulary (it fails without any
method); ``torch.compile``, the tiny LLaVA, for time: it compiles ``generate()``'s decode steps (a
static cache and a ``CompileConfig``, as on a GPU; on a CPU it needs ``_compile_all_devices``) with
the backend given (``eager`` by default: dynamo traces lvlm-fix's seam, which is what can break;
inductor's code generation is torch's) and notes the graph breaks and the graphs dynamo reports.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._lazy import torch
from ..errors import LvlmFixError
from ..files import atomic_write
from .output import output_file

__all__ = ["CI_COMPILED", "COMPOSITIONS", "FEATURES", "MAX_NEW", "PROMPTS", "TOL", "Cell", "CellFailure", "Feature",
           "Matrix", "cell_text", "ci_cells", "load_models", "main", "parse_table", "render", "subjects"]

MAX_NEW = 6  # new tokens per run: enough for stop strings, banned words and min_new_tokens to bite
TOL = 1e-5  # logits of two runs that must agree (fp32; sdpa, eager math and cache layouts round apart)
PROMPTS = ("Is there a cat in the image?", "Describe the image.")  # two rows of different lengths: left padding
DEFAULT_DOCS = "docs/generate-features.md"  # where --write-docs writes by default, from the current directory

# One composition per pair of stages (pipeline, input, head outputs, attention scores and weights,
# logits); each method is in at least one. Two contrast streams do not compose (PAI is one).
COMPOSITIONS = ("mvp+carve", "mvp+vhr", "mvp+paint", "mvp+var", "mvp+vcd",
                "carve+vhr", "carve+pai", "carve+act", "carve+m3id",
                "vhr+paint", "vhr+var", "vhr+icd",
                "pai+act", "paint+vcd", "var+m3id")


# What CI leaves to the full run (python -m lvlm_fix.testing.generate_features): compiling takes seconds per
# cell (dynamo traces the whole model), so CI compiles the vanilla model and VAR (and sees every
# refusal of the column, which costs nothing); CARVE's statistics pass costs a generate() of its
# own per cell, so CI runs CARVE's compositions with a static cache and sampling only.
CI_COMPILED = ("none", "var")
CI_CARVE_FEATURES = ("static", "sample")


def ci_cells(order: Sequence[str]) -> list[tuple[str, str]]:
    """The cells tests/test_generate_features.py runs (see :data:`CI_COMPILED`)."""
    cells = []
    for s in order:
        for f in FEATURES:
            if f.key == "compile" and s not in CI_COMPILED and not _refuses_static(s):
                continue
            if "+" in s and s.startswith("carve") and f.key not in CI_CARVE_FEATURES:
                continue
            cells.append((s, f.key))
    return cells


def _refuses_static(subject: str) -> bool:
    """MVP and the contrast streams refuse a static cache, hence compiling, before any work."""
    from ..hooks.contrast import ContrastStream
    from ..interventions import build_methods

    methods = build_methods(None if subject == "none" else subject)
    return any(m.name == "mvp" or isinstance(m, ContrastStream) for m in methods)


def subjects() -> list[str]:
    """``none``, every registered method (in composition order), then :data:`COMPOSITIONS`."""
    from ..interventions import METHODS

    return ["none", *sorted(METHODS.names(), key=lambda n: METHODS.get(n).composition_key()), *COMPOSITIONS]


@dataclass(frozen=True)
class Cell:
    status: str  # "yes", "refused", "skipped" or "n/a"
    note: str = ""  # the refusal's line, why skipped or n/a; for compile, the graph breaks
    late: bool = False  # refused by the answer's generate(), after the generate() calls of the method's own stage


class CellFailure(AssertionError):
    """A cell that is none of the four outcomes: a wrong result, or an error that is no one-line refusal."""


@dataclass(frozen=True)
class Feature:
    """One column: the ``generate()`` arguments, the check, and the words a refusal must name."""

    key: str
    label: str
    words: tuple[str, ...]
    check: str  # "same", "first", "prefix" or "replay"
    kwargs: Callable[[Any, Any], dict[str, Any]]  # (lvlm, the subject's default run) -> generate() arguments
    contract: Callable[..., str | None] | None = None  # (lvlm, run, kwargs, default run) -> failure
    model: str = "testbed"
    returns_dict: bool = False  # adds to generate()'s output dict: not through lvlm_fix.generate()
    from_default: bool = False  # kwargs read the subject's default run (the stop word, the banned token)
    skip: Callable[[], str | None] | None = None


# -- the features ---------------------------------------------------------------------------------
class _Streamer:
    """A batch streamer (transformers' TextStreamer takes one row): keeps what ``generate()`` puts."""

    def __init__(self) -> None:
        self.parts: list[Any] = []

    def put(self, value: Any) -> None:
        self.parts.append(value.reshape(value.shape[0], -1).cpu())

    def end(self) -> None:
        self.parts.append(None)


def _streamed(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
    parts = kwargs["streamer"].parts
    if not parts or parts[-1] is not None:
        return "the streamer was not ended"
    if not torch.equal(torch.cat(parts[:-1], dim=1), _sequences(run).cpu()):
        return "the streamed tokens are not the returned ones"
    return None


def _compile_config(backend: str) -> Any:
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode="default" if backend == "inductor" else None)
    config._compile_all_devices = True  # transformers compiles on a CPU only when asked (its testing switch)
    return config


def _offload_skip() -> str | None:
    return None if torch.cuda.is_available() else "offloaded caches prefetch on CUDA streams: no CUDA device here"


def _quantized_skip() -> str | None:
    import importlib.util

    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        return None
    return "the quantized cache's default backend, optimum-quanto, is not installed"


def _texts(lvlm: Any, row: Any) -> list[str]:
    """The row's text after each of its tokens, up to its end (a row stopped early is padded after it)."""
    tokens = _until_end(lvlm, row)
    while tokens and tokens[-1] == lvlm.pad_token_id:
        tokens.pop()
    return [lvlm.tokenizer.decode(tokens[:k], skip_special_tokens=True) for k in range(1, len(tokens) + 1)]


def _stop_word(lvlm: Any, default: Any) -> str:
    """Text that a token of the default run adds after its first step (the longer row first): to stop at."""
    for row in (1, 0):
        texts = _texts(lvlm, _generated(default)[row])
        for before, after in zip(texts, texts[1:]):
            piece = after[len(before):].strip() if after.startswith(before) else ""
            if piece and piece.isprintable() and "\ufffd" not in piece:
                return piece
    return "the"  # no text at all (a random model repeating one byte): nothing to stop at, as by default


def _stop_at(texts: list[str], word: str) -> int | None:
    """The first token after which the text ends with ``word``."""
    return next((k for k, t in enumerate(texts) if t.rstrip().endswith(word)), None)


def _stopped(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
    """Each row ends at the first token that ends its text with the stop string, and a row of the
    default run that reached it stops there (its tokens up to it are the default's: the replay check)."""
    word = kwargs["stop_strings"][0]
    for r, (row, free) in enumerate(zip(_generated(run), _generated(default))):
        texts, k = _texts(lvlm, row), _stop_at(_texts(lvlm, free), word)
        end = _stop_at(texts, word)
        if end is not None and end < len(texts) - 1:
            return f"row {r} went on after the stop string {word!r}"
        if k is not None and len(texts) != k + 1:
            return f"row {r} did not stop at the stop string {word!r} after token {k}"
    return None


def _banned(lvlm: Any, default: Any) -> list[list[int]]:
    """The default run's first token of the longer row, banned."""
    return [[int(_generated(default)[1, 0])]]


def _no_banned(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
    bad = kwargs["bad_words_ids"][0][0]
    return f"the banned token {bad} was generated" if (_generated(run) == bad).any() else None


def _long_enough(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
    lengths = _lengths(lvlm, run)
    short = [int(n) for n in lengths if n < kwargs["min_new_tokens"]]
    return f"a row ended after {short[0]} tokens, before min_new_tokens" if short else None


def _rows(factor: int) -> Callable[..., str | None]:
    def contract(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
        n = _sequences(run).shape[0]
        return None if n == factor * len(PROMPTS) else f"{n} sequences returned, not {factor * len(PROMPTS)}"

    return contract


def _scores_pick_tokens(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
    if len(run.scores) != _generated(run).shape[1]:
        return f"{len(run.scores)} steps of scores for {_generated(run).shape[1]} tokens"
    live = _live(lvlm, run)
    picked = torch.stack([s.argmax(-1) for s in run.scores], 1)
    return None if torch.equal(picked[live], _generated(run)[live]) else "the tokens are not the scores' argmax"


def _every_layer(name: str, extra: int = 0) -> Callable[..., str | None]:
    def contract(lvlm: Any, run: Any, kwargs: dict[str, Any], default: Any) -> str | None:
        steps = getattr(run, name)
        if steps is None or len(steps) != _generated(run).shape[1]:
            return f"{name}: not one entry per step"
        for step in steps:
            if len(step) != lvlm.num_layers + extra or any(t is None for t in step):
                return f"{name}: {len(step)} layers (None among them?) where the model has {lvlm.num_layers + extra}"
        if name == "attentions" and not all(torch.allclose(a.float().sum(-1), torch.ones(())) for a in steps[0]):
            return "attentions: rows do not sum to 1"
        return None

    return contract


def _no_args(*_: Any) -> dict[str, Any]:
    return {}


FEATURES: tuple[Feature, ...] = (
    Feature("static", "static cache", ("static", "cache_implementation"), "same",
            lambda lvlm, d: {"cache_implementation": "static"}),
    Feature("sliding", "static sliding-window cache", ("static", "cache_implementation", "sliding"), "same",
            lambda lvlm, d: {"cache_implementation": "static"}, model="gemma3"),
    Feature("offloaded", "offloaded cache", ("offload", "cache_implementation"), "same",
            lambda lvlm, d: {"cache_implementation": "offloaded"}, skip=_offload_skip),
    Feature("quantized", "quantized cache", ("quantiz", "cache_implementation"), "first",
            lambda lvlm, d: {"cache_implementation": "quantized"}, skip=_quantized_skip),
    Feature("compile", "torch.compile", ("compile", "static", "cache_implementation"), "same",
            lambda lvlm, d: {"cache_implementation": "static"}, model="llava"),  # and the matrix's CompileConfig
    Feature("scores", "output_scores", ("output_scores", "return_dict_in_generate"), "same",
            lambda lvlm, d: {"output_scores": True}, _scores_pick_tokens, returns_dict=True),
    Feature("logits", "output_logits", ("output_logits", "return_dict_in_generate"), "same",
            _no_args, returns_dict=True),  # every run of the matrix returns the logits: this is the default run
    Feature("attentions", "output_attentions", ("output_attentions", "return_dict_in_generate"), "same",
            lambda lvlm, d: {"output_attentions": True}, _every_layer("attentions"), returns_dict=True),
    Feature("hidden", "output_hidden_states", ("output_hidden_states", "return_dict_in_generate"), "same",
            lambda lvlm, d: {"output_hidden_states": True}, _every_layer("hidden_states", 1), returns_dict=True),
    Feature("streamer", "streamer", ("streamer",), "same", lambda lvlm, d: {"streamer": _Streamer()}, _streamed),
    Feature("stop", "stop_strings", ("stop_strings", "tokenizer"), "replay",
            lambda lvlm, d: {"stop_strings": [_stop_word(lvlm, d)], "tokenizer": lvlm.tokenizer}, _stopped,
            model="llava", from_default=True),  # StopStringCriteria cannot read the testbed's word-level vocabulary
    Feature("sample", "sampling, num_return_sequences=2", ("do_sample", "num_return_sequences"), "replay",
            lambda lvlm, d: {"do_sample": True, "num_return_sequences": 2}, _rows(2)),
    Feature("beams", "beams, num_return_sequences=2", ("num_beams", "num_return_sequences"), "replay",
            lambda lvlm, d: {"num_beams": 2, "num_return_sequences": 2}, _rows(2)),
    Feature("min_new", "min_new_tokens", ("min_new_tokens",), "replay",
            lambda lvlm, d: {"min_new_tokens": MAX_NEW}, _long_enough),
    Feature("repetition", "repetition_penalty", ("repetition_penalty",), "replay",
            lambda lvlm, d: {"repetition_penalty": 1.5}),
    Feature("bad_words", "bad_words_ids", ("bad_words_ids",), "replay",
            lambda lvlm, d: {"bad_words_ids": _banned(lvlm, d)}, _no_banned, from_default=True),
    Feature("max_time", "max_time", ("max_time",), "prefix", lambda lvlm, d: {"max_time": 1e-9}),
)


# -- reading runs ---------------------------------------------------------------------------------
def _sequences(run: Any) -> Any:
    return run.sequences if hasattr(run, "sequences") else run


def _generated(run: Any) -> Any:
    return _sequences(run)[:, run.prompt_len:]


def _until_end(lvlm: Any, row: Any) -> list[int]:
    from ..model import eos_token_ids

    eos, out = eos_token_ids(lvlm), []
    for tok in row.tolist():
        out.append(tok)
        if tok in eos:
            break
    return out


def _lengths(lvlm: Any, run: Any) -> Any:
    from ..model import eos_token_ids, generated_lengths

    return generated_lengths(_sequences(run), run.prompt_len, eos_token_ids(lvlm))


def _live(lvlm: Any, run: Any) -> Any:
    """``[rows, steps]`` True up to and including each row's end (after it, generate() writes padding)."""
    steps = _generated(run).shape[1]
    return torch.arange(steps)[None, :] < _lengths(lvlm, run)[:, None]


def _row_logits(run: Any, row: int, step: int) -> Any:
    """The logits that chose ``row``'s token at ``step`` (in beam search, those of the beam it came from)."""
    beams = getattr(run, "beam_indices", None)
    return run.logits[step][row if beams is None else int(beams[row, step])]


def _close(a: Any, b: Any) -> bool:
    """Equal where either is not finite (masked tokens), elsewhere within :data:`TOL` times the largest logit
    (at least 1): fp32 rounding is relative, and a method that mixes several layers' logits (VISTA) has larger ones."""
    a, b = a.float(), b.float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite], b[~finite]):
        return False
    if finite.sum() == 0:
        return True
    scale = max(1.0, float(b[finite].abs().max()))
    return bool((a[finite] - b[finite]).abs().max() <= TOL * scale)


class _Force:
    """A logits processor that makes ``generate()`` pick the given tokens (their score kept, the rest -inf)."""

    def __init__(self, tokens: Any, prompt_len: int) -> None:
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        tok = self.tokens[:, input_ids.shape[1] - self.prompt_len].to(scores.device)[:, None]
        return torch.full_like(scores, -float("inf")).scatter(1, tok, scores.gather(1, tok))


# -- the matrix -----------------------------------------------------------------------------------
@dataclass
class Matrix:
    """Runs cells on loaded models: ``{"testbed": lvlm, "gemma3": lvlm}`` (see :func:`load_models`)."""

    models: dict[str, Any]
    compile_backend: str = "eager"
    _defaults: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._compile = _compile_config(self.compile_backend)  # one object: the two kwargs of a cell compare equal
        self._forwards = _Forwards()

    def cell(self, subject: str, feature: Feature) -> Cell:
        """The cell of ``subject`` and ``feature``; raises :class:`CellFailure` when it is none of the four outcomes."""
        reason = feature.skip() if feature.skip else None
        if reason:
            return Cell("skipped", reason)
        lvlm = self.models[feature.model]
        wraps = _wraps(subject)
        if wraps and feature.returns_dict:
            return Cell("n/a", "runs generate() itself, more than once: lvlm_fix.generate() keeps the answering "
                               "call's output object (Generation.output), not compared here")
        try:
            _bind(lvlm, subject)
        except LvlmFixError as e:  # the subject does not serve this model at all
            return Cell("n/a", _one_line(e))
        # The stop word and the banned token come from a default run: the vanilla one first, so that a
        # refused cell costs no run of the subject; then the subject's own, so that they bite.
        kwargs = self._kwargs(lvlm, feature, "none")
        # Forwards before a refusal are counted by a global module hook, which dynamo would trace
        # into the compiled steps: the compile column's refusals come from the same check as the
        # static cache's (compiling needs one), whose cells count them.
        counted = feature.key != "compile"
        run, refusal = self._attempt(lambda: self._run(lvlm, subject, kwargs, wraps), counted)
        if refusal is None:
            default = self._default(subject, feature.model)
            own = self._kwargs(lvlm, feature, subject) if feature.from_default else kwargs
            if own != kwargs:
                kwargs = own
                run, refusal = self._attempt(lambda: self._run(lvlm, subject, kwargs, wraps), counted)
        if refusal is not None:
            return self._refused(feature, *refusal)
        failure = self._check(lvlm, subject, feature, kwargs, run, default, wraps)
        if failure:
            raise CellFailure(f"{subject} x {feature.label}: {failure}")
        return Cell("yes", _breaks(*run.graphs) if feature.key == "compile" else "")

    def run(self, cells: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Cell]:
        by_key = {f.key: f for f in FEATURES}
        return {(s, k): self.cell(s, by_key[k]) for s, k in cells}

    # -- runs --
    def _kwargs(self, lvlm: Any, feature: Feature, subject: str) -> dict[str, Any]:
        kwargs = feature.kwargs(lvlm, self._default(subject, feature.model))
        if feature.key == "compile":
            kwargs["compile_config"] = self._compile
        return kwargs

    def _default(self, subject: str, model: str) -> Any:
        key = (subject, model)
        if key not in self._defaults:
            lvlm = self.models[model]
            self._defaults[key] = self._run(lvlm, subject, {}, _wraps(subject))
        return self._defaults[key]

    def _run(self, lvlm: Any, subject: str, kwargs: dict[str, Any], wraps: bool,
             rows: int = 1, force: Any = None) -> Any:
        """One ``generate()`` of the batch (each row ``rows`` times), greedy unless ``kwargs`` say otherwise."""
        from ..api import apply, generate
        from .tiny import build_image

        images = [build_image(r) for r in range(len(PROMPTS)) for _ in range(rows)]
        prompts = [p for p in PROMPTS for _ in range(rows)]
        compiled = "compile_config" in kwargs
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            lvlm.model.__dict__.pop("_compiled_call", None)  # a compiled call keeps the plan it was traced with
        if wraps:
            with _LastGenerate(lvlm.model, self._forwards) as last:
                generate(lvlm, images, prompts, None if subject == "none" else subject, max_new_tokens=MAX_NEW,
                         generate_kwargs=kwargs or None)
            run = last.output
            run.prompt_len, run.received = last.input_ids.shape[1], last.kwargs
        else:
            batch = lvlm.encode(images, prompts)
            gen = {"max_new_tokens": MAX_NEW, "do_sample": False, "num_beams": 1, "return_dict_in_generate": True,
                   "output_logits": True, **kwargs}
            if force is not None:
                from transformers import LogitsProcessorList

                gen["logits_processor"] = LogitsProcessorList([_Force(force, batch["input_ids"].shape[1])])
                gen["max_new_tokens"] = force.shape[1]
            if "do_sample" in kwargs and kwargs["do_sample"]:
                torch.manual_seed(0)
            with apply(lvlm, None if subject == "none" else subject), torch.inference_mode():
                run = lvlm.model.generate(**batch, **gen)
            run.prompt_len = batch["input_ids"].shape[1]
        if compiled:
            counters = torch._dynamo.utils.counters
            run.graphs = (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"])
            lvlm.model.__dict__.pop("_compiled_call", None)
        return run

    def _attempt(self, fn: Callable[[], Any], counted: bool = True) -> tuple[Any, tuple[str, int, bool] | None]:
        """``(result, None)``, or ``(None, (the LvlmFixError's text, module forwards that ran before it in the
        generate() call that refused, whether generate() calls ran before that one))``."""
        counter = self._forwards
        counter.total = counter.at_last_generate = counter.calls = 0
        handle = torch.nn.modules.module.register_module_forward_pre_hook(counter) if counted else None
        try:
            return fn(), None
        except LvlmFixError as e:
            return None, (str(e), counter.total - counter.at_last_generate, counter.calls > 1)
        finally:
            if handle is not None:
                handle.remove()

    @staticmethod
    def _refused(feature: Feature, message: str, forwards: int, late: bool) -> Cell:
        if "\n" in message.strip():
            raise CellFailure(f"{feature.label}: a refusal of more than one line: {message!r}")
        if forwards:
            raise CellFailure(f"{feature.label}: refused after {forwards} module forwards: {message}")
        if not any(w in message for w in feature.words):
            raise CellFailure(f"{feature.label}: the refusal names none of {feature.words}: {message}")
        return Cell("refused", message.strip(), late)

    # -- checks --
    def _check(self, lvlm: Any, subject: str, feature: Feature, kwargs: dict[str, Any], run: Any, default: Any,
               wraps: bool) -> str | None:
        if wraps:
            missing = [k for k in kwargs if k not in run.received or run.received[k] is not kwargs[k]]
            if missing:
                return f"the answer's generate() did not receive {missing[0]}"
        if feature.contract is not None:
            failure = feature.contract(lvlm, run, kwargs, default)
            if failure:
                return failure
        if feature.check == "replay":
            # A decoding loop searches each sample on its own: a processor that forces every row's tokens at
            # once (the replay's) would see one sample's rows.
            return None if wraps or _owns_decoding(subject) else self._replay(lvlm, subject, run)
        got, want = _sequences(run), _sequences(default)
        if feature.check == "prefix":
            if got.shape[1] >= want.shape[1]:
                return "max_time did not end the run early"
            if _owns_decoding(subject):  # a beam search cut short returns its best beam then, no prefix of the full one's
                return None
            want = want[:, : got.shape[1]]
        if feature.check == "first":  # a lossy cache: the prefill (which sees the keys as computed) is exact
            got, want = got[:, : run.prompt_len + 1], want[:, : run.prompt_len + 1]
        if not torch.equal(got, want):
            return "tokens differ from the default run"
        if wraps:
            return None
        for step in range(got.shape[1] - run.prompt_len):
            if not _close(run.logits[step], default.logits[step]):
                diff = (run.logits[step] - default.logits[step]).abs().nan_to_num(0).max()
                return f"step {step}: logits differ from the default run by {float(diff):.2e} (> {TOL:g} x the largest)"
        return None

    def _replay(self, lvlm: Any, subject: str, run: Any) -> str | None:
        """Each returned sequence forced back through the subject's default ``generate()``: the same logits."""
        tokens = _generated(run)
        rows = tokens.shape[0] // len(PROMPTS)
        replay = self._run(lvlm, subject, {}, False, rows=rows, force=tokens)
        live = _live(lvlm, run)
        for r in range(tokens.shape[0]):
            for step in range(tokens.shape[1]):
                if live[r, step] and not _close(_row_logits(run, r, step), replay.logits[step][r]):
                    return f"row {r}, step {step}: logits differ from the default settings' for the same tokens"
        return None


class _Forwards:
    """A global forward pre-hook: module forwards in all, and before the last ``generate()`` call began
    (``calls``: the ``generate()`` calls begun)."""

    def __init__(self) -> None:
        self.total = self.at_last_generate = self.calls = 0

    def __call__(self, module: Any, args: Any) -> None:
        self.total += 1


class _LastGenerate:
    """Keeps the arguments and output of the model's last ``generate()`` (the answer of a pipeline)."""

    def __init__(self, model: Any, forwards: _Forwards) -> None:
        self.model, self.forwards, self.output, self.kwargs, self.input_ids = model, forwards, None, {}, None

    def __enter__(self) -> _LastGenerate:
        original = self.model.generate

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.forwards.at_last_generate, self.forwards.calls = self.forwards.total, self.forwards.calls + 1
            out = original(*args, **kwargs)
            self.kwargs, self.input_ids = kwargs, kwargs["input_ids"]
            self.output = out if hasattr(out, "sequences") else _Tokens(out)
            return out

        self.model.generate = spy
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.generate


@dataclass
class _Tokens:
    sequences: Any


def _bind(lvlm: Any, subject: str) -> None:
    """Bind the subject's methods that act inside ``generate()`` to ``lvlm`` (a model they refuse raises)."""
    from ..hooks.plan import Plan
    from ..interventions import build_methods

    Plan(lvlm, [m for m in build_methods(None if subject == "none" else subject) if not m.stage.wraps_generate])


def _wraps(subject: str) -> bool:
    from ..interventions import build_methods

    methods = build_methods(None if subject == "none" else subject)
    return bool(methods) and methods[0].stage.wraps_generate


def _owns_decoding(subject: str) -> bool:
    from ..interventions import build_methods

    return any(m.stage.owns_decoding for m in build_methods(None if subject == "none" else subject))


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0]


def _breaks(breaks: int, graphs: int) -> str:
    return f"{breaks} graph break{'s' if breaks != 1 else ''}, {graphs} graphs"


def load_models(root: str | Path | None = None) -> dict[str, Any]:
    """The testbed, the tiny Gemma-3 and LLaVA (built under ``root``, a temporary folder by default)."""
    from ..model import load
    from .tiny import build_tiny

    root = Path(root or tempfile.mkdtemp(prefix="lvlm-fix-features-"))
    tiny = {f: load(build_tiny(f, root / f, seed=0), dtype="float32") for f in ("gemma3", "llava")}
    return {"testbed": load(), **tiny}


# -- the table ------------------------------------------------------------------------------------
def cell_text(cell: Cell) -> str:
    """A cell as the table shows it: the status; the graph breaks of a compiled one; † after a late refusal."""
    if cell.status == "yes" and cell.note:
        return f"yes ({cell.note})"
    return cell.status + ("†" if cell.late else "")


def render(results: dict[tuple[str, str], Cell], subject_order: Sequence[str]) -> str:
    """docs/generate-features.md: the table, then every refusal, skip and n/a with its line."""
    features = [f for f in FEATURES if any(k == f.key for _, k in results)]
    head = "| method | " + " | ".join(f.label for f in features) + " |"
    lines = [head, "|" + "---|" * (len(features) + 1)]
    for s in subject_order:
        lines.append(f"| `{s}` | " + " | ".join(cell_text(results[(s, f.key)]) for f in features) + " |")
    # Each line once, with where it was given: columns that share their rows are written together.
    notes: dict[tuple[str, str], dict[str, list[str]]] = {}
    for f in features:
        for s in subject_order:
            c = results[(s, f.key)]
            if c.status != "yes":
                notes.setdefault((c.status, c.note), {}).setdefault(f.label, []).append(f"`{s}`" + "†" * c.late)
    body = []
    for (status, note), where in notes.items():
        by_rows: dict[tuple[str, ...], list[str]] = {}
        for label, rows in where.items():
            by_rows.setdefault(tuple(rows), []).append(label)
        places = "; ".join(f"{', '.join(labels)}: " + ("every method" if len(rows) == len(subject_order)
                                                          else ", ".join(rows)) for rows, labels in by_rows.items())
        body.append(f"* **{status}**, {places}: {note}")
    return _HEADER + "\n".join(lines) + "\n\n## Refusals, skips and n/a, word for word\n\n" + "\n".join(body) + "\n"


_HEADER = """# generate() features, per method

<!-- generated by `python -m lvlm_fix.testing.generate_features --write-docs docs/generate-features.md` from
the repository root, from the matrix that tests/test_generate_features.py runs; the test checks every cell it
runs against this table -->

Which of `generate()`'s features each method serves when it is applied around the real `generate()`
(`lvlm_fix.apply`; CARVE and MVP, which run `generate()` themselves, through
`lvlm_fix.generate(..., generate_kwargs=...)`), with one composition per pair of stages. Every cell
runs a left-padded batch of two rows, greedy, 6 new tokens, on the embedded testbed (three columns
on a tiny model: the static sliding-window cache on the tiny Gemma-3, whose sliding layers keep 8
keys of a 43-token prompt; `stop_strings` and `torch.compile` on the tiny LLaVA), and is:

* **yes**: tokens equal to the same method's under the default settings (dynamic cache, not
  compiled) and every step's logits within 1e-5 of the largest logit, with what the feature adds present (scores whose
  argmax is the token, every layer's attentions and hidden states, the streamed tokens). For the
  features that change the decoding (stop strings, sampling, beams, `min_new_tokens`,
  `repetition_penalty`, `bad_words_ids`): the feature's rule holds (each row ends at the stop
  string, no banned token, no end before `min_new_tokens`) and the logits of every returned
  sequence equal the method's logits, under the default settings, for the same tokens (the
  sequence forced back through `generate()`). `max_time` ends the run after its first token, whose
  logits are the default run's. For CARVE and MVP: the answer's `generate()` got the feature as
  given, the rule holds, and its tokens are the default's (`lvlm_fix.generate` keeps no logits).
* **refused**: one line naming the feature, before any module of the model has run (for a
  composition with CARVE or MVP, before their own passes: `lvlm_fix.generate` asks the later methods
  first).
* **skipped**: this machine lacks what the feature needs; **n/a**: the method cannot take it.

`torch.compile`: `generate()` compiles its decode steps (a static cache and a `CompileConfig`, on a
CPU with `_compile_all_devices`, transformers' switch for it), here with dynamo's `eager` backend:
dynamo traces lvlm-fix's seam (the plan's hooks, the attention function, each method's callbacks),
which is what can break. The cell gives the graph breaks and the graphs dynamo reported for the
five decode steps. The one break is the plan reading the cache's length (a tensor in a static
cache) as each forward starts. The plan's per-step counters are traced as symbols, so a method adds
one graph (the recompile when they first change), not one per step: they were specialised as
constants, and a 64-token answer hit dynamo's recompile limit (8) and ran uncompiled after it.
With inductor, the code a CPU runs (`python -m lvlm_fix.testing.generate_features --backend inductor
--features compile --subjects none,vhr,paint,act,var,carve+act,vhr+var`, 3 minutes on 2 cores),
those cells are the same: tokens equal, logits within 1e-5, one graph break. Decode times compiled
against eager are for a machine with a GPU.
The methods that decode a second stream beside `generate()` (VCD, ICD, M3ID, PAI) keep it in a
dynamic cache and refuse static caches, hence compilation; MVP decodes with its own settings and
refuses every argument that would not reach its calls. Offloaded caches need CUDA: a machine with
one runs that column. The quantized cache's backend, optimum-quanto, installs on a CPU torch (the
`test` extra has it); a quantized cache is lossy after the prefill, so its cell checks the first
token and its logits, which the prefill's exact keys give.

"""


def parse_table(text: str) -> dict[tuple[str, str], str]:
    """``{(subject, feature key): cell text}`` (:func:`cell_text`) from a rendered table."""
    by_label = {f.label: f.key for f in FEATURES}
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    labels = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    out = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        subject = cells[0].strip("`")
        for label, cell in zip(labels, cells[1:]):
            out[(subject, by_label[label])] = cell
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlm_fix.testing.generate_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-docs", nargs="?", const=DEFAULT_DOCS, default=None, metavar="PATH",
                        help=f"write the table to PATH (default {DEFAULT_DOCS}, from the current directory)")
    parser.add_argument("--backend", default="eager", help="torch.compile backend of the compile column (eager)")
    parser.add_argument("--subjects", help="comma-separated rows to run (default: all)")
    parser.add_argument("--features", help=f"comma-separated columns to run, of {', '.join(f.key for f in FEATURES)}")
    args = parser.parse_args(argv)
    if args.write_docs is not None and (args.subjects or args.features or args.backend != "eager"):
        parser.error("--write-docs writes the whole matrix with the eager backend; give no --subjects, --features "
                     "or --backend with it")
    docs = None
    if args.write_docs is not None:  # refused before the matrix runs, not after
        try:
            docs = output_file(args.write_docs, "--write-docs")
        except LvlmFixError as e:
            parser.error(str(e))
    order = args.subjects.split(",") if args.subjects else subjects()
    keys = args.features.split(",") if args.features else [f.key for f in FEATURES]
    matrix = Matrix(load_models(), compile_backend=args.backend)
    text = render(matrix.run((s, k) for s in order for k in keys), order)
    print(text)
    if docs is not None:
        atomic_write(docs, text.encode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
