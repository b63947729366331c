"""What a method is: a stage, a frozen config and the method's math, all in the method's own file.

A method subclasses :class:`Intervention` and declares three class attributes:

* ``name``: its registered name, used on the command line and as its results folder;
* ``stage``: where it acts (:class:`Stage`);
* ``config_cls``: a frozen :class:`MethodConfig` dataclass whose fields are its parameters, each
  declared with :func:`param` (default, help text naming the source, valid range).

and may declare ``order``, its place in a composition (:meth:`Intervention.composition_key`; by
default :data:`DEFAULT_ORDER` of its stage).

Methods that act inside ``generate()`` (head outputs, attention, logits) are
:class:`~lvlm_fix.hooks.Participant`\\ s: ``bind`` declares the layers they need and the callbacks
do the math, on tensors of the whole batch, row by row. Methods that act around ``generate()``
(input refinement, pipelines) override :meth:`Intervention.generate`. Contrastive decoding methods
derive from :class:`~lvlm_fix.interventions.contrastive.ContrastiveMethod`, which holds what they
share (config fields, ``bind``, the linear contrast). A method file holds the
method's math and nothing about module paths or model names: layers, heads and image positions
arrive through ``bind`` (the model handle) and the callbacks' ``ctx``.

Registering is :func:`lvlm_fix.register_method` (built-in files decorate their class with it;
the package imports every module of ``lvlm_fix.interventions`` on first use, so a new built-in is
one new file). See ``docs/adding-a-method.md`` for a complete example.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from ..errors import ConfigError
from ..hooks.plan import LAYER_ROLES, Participant

if TYPE_CHECKING:
    from contextvars import ContextVar

    from PIL import Image

    from ..model import LVLM
    from .calibration import Calibration


class Stage(enum.Enum):
    """Where a method acts: what it reads or rewrites. Where it goes in a composition is its own
    declaration, :attr:`Intervention.order` (by default :data:`DEFAULT_ORDER` of its stage)."""

    PIPELINE = "pipeline"  # runs several generate() calls of its own and combines them (e.g. MVP)
    INPUT = "input"  # rewrites the input image or prompt, then generates once (e.g. CARVE)
    HEAD_OUTPUTS = "head_outputs"  # scales per-head attention outputs, the input of o_proj (e.g. VHR)
    ATTENTION_SCORES = "attention_scores"  # edits pre-softmax attention logits (e.g. PAI)
    ATTENTION_WEIGHTS = "attention_weights"  # edits post-softmax attention weights (e.g. VAR, ACT)
    MLP_OUTPUTS = "mlp_outputs"  # edits the decoder layers' MLP outputs (e.g. VISTA, VTI, MemVR)
    LOGITS = "logits"  # edits the next-token logits: in the forward (e.g. DoLa) or against a contrast stream (e.g. VCD)
    DECODING = "decoding"  # owns generate()'s decoding loop: its own search over the plan's forwards (e.g. OPERA)

    @property
    def wraps_generate(self) -> bool:
        """The method calls ``generate()`` itself, so it cannot wrap a caller's ``generate()``."""
        return self in (Stage.PIPELINE, Stage.INPUT)

    @property
    def owns_decoding(self) -> bool:
        """The method replaces ``generate()``'s decoding loop (``generate(custom_generate=...)``): generate()
        still prepares the inputs, the cache, the processors and the stopping criteria; every forward of
        the loop runs inside the plan. One per composition, and no contrast stream beside it."""
        return self is Stage.DECODING


# The composition order of a method that declares none, by stage (lower first; the gaps leave room for
# a plugin's own order between two built-ins). In a plan, only methods that edit the same tensor see each
# other's edit, in this order (PAI's then PAINT's scores; ACT's then VAR's weights); a method that runs
# generate() itself goes around every later one (MVP calls CARVE, which calls the plan).
DEFAULT_ORDER = {Stage.PIPELINE: 0, Stage.INPUT: 10, Stage.HEAD_OUTPUTS: 20, Stage.ATTENTION_SCORES: 30,
                 Stage.ATTENTION_WEIGHTS: 40, Stage.MLP_OUTPUTS: 45, Stage.LOGITS: 50,
                 Stage.DECODING: 60}


def param(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False) -> Any:
    """A config field: ``default``, a ``help`` text stating the default and its source, and a range.

    Numeric values must lie in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); a bound of None is
    unbounded. Every float must be finite. Types are checked from the field's annotation.
    """
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's config: frozen, keyword-only, checked on construction.

    Every field is checked against its annotation (``float`` finite and within its declared range,
    ``int`` not a bool, ``tuple[int, ...]`` from a list or a single int, ``Literal`` one of its
    choices); :meth:`validate` adds the checks that involve several fields.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _checked(f.name, getattr(self, f.name), hints[f.name], f.metadata)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming a bad combination of values and the fix."""

    @classmethod
    def noop(cls) -> MethodConfig:
        """Settings under which the method installs nothing: the model runs exactly as without it."""
        raise NotImplementedError(cls.__name__)

    @classmethod
    def math_identity(cls) -> MethodConfig | None:
        """Settings under which the method's callbacks run on every layer it edits and change nothing.

        The identity test with the math in the path: tokens equal to vanilla ``generate()``,
        logits within float rounding (eager fp32 math is not bit-identical to sdpa). None when the
        method has no such setting.
        """
        return None

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def param_docs(cls) -> list[ParamDoc]:
        """Each field as :class:`ParamDoc`: the one description that ``lvlm-fix list METHOD`` and the
        docs site's parameter tables print (both read it from here, so neither is written by hand)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            text = " ".join(f.metadata.get("help", "").split())
            out.append(ParamDoc(name=f.name, type=_type_text(hints[f.name]), default=_default_text(f.default),
                                range=_range_text(hints[f.name], f.metadata), source=_sources(text),
                                meaning=_first_sentence(text), help=text))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParamDoc:
    """One method parameter as documented: every field derived from its :func:`param` declaration."""

    name: str
    type: str  # "float", "int", "bool", "str", "list of int", "one of"
    default: str  # the field's default as it would be written on the command line
    range: str  # "[0, 1]", "(0, inf)", the choices, or "" when any value of the type goes
    source: str  # the "source: ..." parts of the help text, joined by "; "
    meaning: str  # the help text's first sentence
    help: str  # the whole help text, on one line


def _type_text(typ: Any) -> str:
    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) is Literal:
        return "one of"
    if typ in (bool, int, float, str):
        return typ.__name__
    if get_origin(typ) is tuple:
        return f"list of {get_args(typ)[0].__name__}"
    return _type_text(args[0]) if len(args) == 1 else str(typ)


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as --set and the spec syntax take it
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return "None" if value is None else str(value)


def _range_text(typ: Any, meta: Any) -> str:
    """The valid values, in the notation of the out-of-range message (``_check_range``)."""
    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) is Literal or (len(args) == 1 and get_origin(args[0]) is Literal):
        return " | ".join(map(str, get_args(typ if get_origin(typ) is Literal else args[0])))
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if lo is None and hi is None:
        return ""
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
    return f"{left}, {'inf)' if hi is None else f'{hi:g}]'}"


def _source_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every ``source: ...`` of a help text, each up to the bracket that encloses it."""
    spans = []
    for m in re.finditer(r"\bsource: ", text):
        depth, end = 0, len(text)
        for i in range(m.end(), len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth < 0:
                end = i
                break
        spans.append((m.start(), end))
    return spans


def _sources(text: str) -> str:
    return "; ".join(text[a + len("source: "):b].strip().rstrip(".") for a, b in _source_spans(text))


# Words whose full stop ends no sentence ("paper Alg. 1", "e.g. X").
_ABBREVIATIONS = ("e.g", "i.e", "eq", "fig", "alg", "app", "thm", "cf", "vs", "no", "sec")


def _first_sentence(text: str) -> str:
    """The help text's first sentence, without a ``(source: ...)`` inside it (that has its own column)."""
    for a, b in reversed(_source_spans(text)):
        if text[a - 1:a] == "(" and text[b:b + 1] == ")":
            text = text[:a - 1].rstrip() + text[b + 1:]
    for m in re.finditer(r"\.\s+(?=[A-Z0-9])", text):
        word = text[:m.start()].rsplit(None, 1)[-1].lower()
        if word not in _ABBREVIATIONS and not re.fullmatch(r"[a-z]", word):
            return text[:m.start()] + "."
    return text.rstrip(".") + "."


def _checked(name: str, value: Any, typ: Any, meta: Any) -> Any:
    """``value`` converted to the field type ``typ`` (int -> float, list -> tuple), or ConfigError."""
    args = get_args(typ)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name}=None is not allowed; give a value or leave {name} out for its default")
    if type(None) in args:  # Optional[X]: check against X
        inner = [a for a in args if a is not type(None)]
        typ = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]
        args = get_args(typ)
    origin = get_origin(typ)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, args))}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        _check_range(name, value, meta)
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value} is not a finite number; give a real value")
        _check_range(name, value, meta)
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    if origin is tuple and args[-1] is Ellipsis:  # tuple[int, ...]
        items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ConfigError(f"{name}={value!r} must be a list of integers, e.g. [1, 2]")
        for item in items:
            _checked(name, item, args[0], meta)
        return tuple(items)
    return value  # other annotations are the method's own business (validate())


def _check_range(name: str, value: float, meta: Any) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value} is out of range; valid range is {_range_text(float, meta)}")


@dataclass
class Generation:
    """Texts generated for a batch, and what the methods saw and touched."""

    texts: list[str]
    report: dict[str, Any] = field(default_factory=dict)  # per method name
    artifacts: dict[str, Any] = field(default_factory=dict)  # per method name, e.g. CARVE's refined images
    tokens: list[int] = field(default_factory=list)  # generated tokens per row, up to and including EOS
    # generate()'s own output object when asked for with return_dict_in_generate=True (scores, logits,
    # attentions, hidden states), else None; a method that wraps generate() passes on its last call's.
    output: Any = None


# What a method that wraps generate() calls to generate: ``inner(images, prompts, gen)`` applies the
# methods composed after it (composition_key) around the model's own generate() and returns their Generation.
Inner = Callable[[Sequence[Any], Sequence[str], dict[str, Any]], Generation]


class Intervention(Participant):
    """A registered method: ``name``, ``stage``, ``config_cls`` and the math (see the module docstring)."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    config_cls: ClassVar[type[MethodConfig]]
    order: ClassVar[int | None] = None  # place in a composition, lower first; None: DEFAULT_ORDER[stage]
    calibration: ClassVar[Calibration | None] = None  # an offline fit `lvlm-fix calibrate` runs (ACT's heads)
    # A ContextVar the eval runner sets to a RunCache (lvlm_fix.evals.store) of the setting's folder while it runs,
    # for what a method computes once per run and reuses across batches and resumes (MVP's captions).
    run_cache: ClassVar[ContextVar[Any] | None] = None

    @classmethod
    def composition_key(cls) -> tuple[bool, int, str]:
        """Where the method goes among composed methods, first to last: the methods that run
        ``generate()`` themselves first (each calls the later ones through ``inner``), then by
        ``order``, then by name."""
        order = DEFAULT_ORDER[cls.stage] if cls.order is None else cls.order
        return (not cls.stage.wraps_generate, order, cls.name)

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def describe(self, lvlm: LVLM | None = None) -> dict[str, Any]:
        """The method, its stage and its config (written to every result's provenance); with a model,
        also what it acts on there (:meth:`layers_on`), e.g. the default layers resolved to its depth."""
        out = {"method": self.name, "stage": self.stage.value, "config": self.config.to_dict()}
        if lvlm is not None:
            out["on_model"] = self.layers_on(lvlm)
        return out

    def layers_on(self, lvlm: LVLM) -> dict[str, list[int]]:
        """The layers this method uses on ``lvlm``, by role (the layer sets ``bind`` declares)."""
        self.bind(lvlm)
        return {role: sorted(getattr(self, role)) for role in LAYER_ROLES if getattr(self, role)}

    def generate(self, lvlm: LVLM, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str],
                 gen: dict[str, Any], inner: Inner, *, system_prompt: str | None = None) -> Generation:
        """For ``PIPELINE`` and ``INPUT`` stages: produce the answers, calling ``inner`` for each generation.

        ``gen`` holds the ``generate()`` arguments of the call; ``inner`` applies the methods
        composed after this one (with the call's ``system_prompt``, which the method's own encodes
        should pass to ``lvlm.encode`` too). Return the Generation with this method's report (and
        artifacts) added under its name.
        """
        raise NotImplementedError(f"method {self.name!r} of stage {self.stage.name} must implement generate()")

    def summarize(self, report: dict[str, Any]) -> str:
        """One short human line of what the method touched (``run --compare``), from its :meth:`report`.

        The default lists the report's short values; methods override it with what matters.
        """
        short = [f"{k}={v}" for k, v in report.items()
                 if isinstance(v, (bool, int, float, str)) or (isinstance(v, (list, tuple)) and len(str(v)) <= 40)]
        return "; ".join(short)[:300]

    @classmethod
    def prompts(cls) -> list[str]:
        """Texts this method sends to the model besides the user's prompt (e.g. a general instruction).

        The embedded testbed's tests check that each one encodes without unknown tokens.
        """
        return []


def resolve_layers(layers: Sequence[int] | None, default: Sequence[int], n_layers: int, name: str = "layers") -> frozenset[int]:
    """Explicit ``layers`` (negative counts from the end; ``()`` is none) or ``default``; each must exist."""
    chosen = default if layers is None else layers
    out = set()
    for i in chosen:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"{name} index {i} is beyond the model's depth; valid layers are 0..{n_layers - 1}")
        out.add(j)
    return frozenset(out)
