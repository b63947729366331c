"""The method registry, method specs (``"vhr:alpha=1.5+var"``) and building composed methods.

Where methods come from, all registered through :func:`register_method`:

* built-ins: every module (or package) of ``lvlm_fix.interventions`` is imported on the first
  lookup, and its method class registers itself; a new built-in is one new file;
* installed plugins: the entry-point group ``lvlm_fix.methods`` (each entry point names a method
  class, or a module that registers its methods when imported);
* ad-hoc modules: ``LVLM_FIX_PLUGINS=mypkg.mymethods,path/to/file.py`` imports them first;
* any code that calls ``lvlm_fix.register_method(MyMethod)`` before using the name.

A method spec names one setting of one or more composed methods::

    none                         the vanilla model
    vhr                          VHR with its defaults
    vhr:alpha=1.5                VHR with alpha = 1.5
    vhr:layers=[1,2]+var:tau=3.5 VHR and VAR, each with its own parameters

Values are read as JSON where they parse (numbers, ``true``/``false``, ``[1,2]``, quoted strings),
else as plain strings; ``a,b`` outside brackets is a list. In Python the same spec can be a dict:
``{"vhr": {"layers": [1]}, "var": {"tau": 3.5}}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, UnknownNameError
from ..hooks.plan import Participant
from ..registry import PLUGINS_ENV, Registry, entry_point_objects, import_plugins
from .base import Intervention, MethodConfig, Stage

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "NONE", "PLUGINS_ENV", "MethodSpec", "build_methods", "format_spec",
           "method_fields", "parse_spec", "parse_value", "register_method"]

NONE = "none"  # the baseline: no method
ENTRY_POINT_GROUP = "lvlm_fix.methods"
_NOT_METHODS = {"base", "calibration", "contrastive", "registry"}  # modules of this package that define no method

# One composed method setting: (method name, its parameters), in composition order.
MethodSpec = list[tuple[str, dict[str, Any]]]


def _load_methods() -> None:
    """Import the built-in method modules, then the plugins (entry points, then $LVLM_FIX_PLUGINS)."""
    package = sys.modules[__package__]
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"{__package__}.{mod.name}")
    for obj in entry_point_objects(ENTRY_POINT_GROUP, "method"):
        if isinstance(obj, type) and obj not in METHODS._items.values():
            register_method(obj)
    import_plugins()  # shared with the bench registry: a file that brings both is run once


METHODS: Registry[type[Intervention]] = Registry("method", loader=_load_methods)


def register_method(cls: type[Intervention]) -> type[Intervention]:
    """Register a method class under ``cls.name`` (usable as a class decorator).

    The class must subclass :class:`Intervention` and declare ``name`` (lowercase letters, digits
    and ``_``), ``stage`` (a :class:`Stage`) and ``config_cls`` (a :class:`MethodConfig` subclass
    with a ``noop()``), and may declare ``order`` (an int, its place in a composition). Registering
    the same class twice is a no-op; another class under a taken name is an error.

    Raises:
        TypeError: a missing or wrong declaration, named in the message.
        ValueError: the name is taken.
    """
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        raise TypeError(f"{where} is not a subclass of lvlm_fix.interventions.Intervention")
    for attr in ("name", "stage", "config_cls"):
        if attr not in _declared(cls):
            raise TypeError(f"method class {where} does not declare {attr!r}; every method declares name, stage "
                            "and config_cls (see docs/adding-a-method.md)")
    if not isinstance(cls.stage, Stage):
        raise TypeError(f"method {cls.name!r}: stage={cls.stage!r} is not a lvlm_fix.interventions.Stage")
    if cls.order is not None and (isinstance(cls.order, bool) or not isinstance(cls.order, int)):
        raise TypeError(f"method {cls.name!r}: order={cls.order!r} is not an int; declare an int (lower composes "
                        "first) or leave it out for its stage's default")
    if not (isinstance(cls.config_cls, type) and issubclass(cls.config_cls, MethodConfig)
            and dataclasses.is_dataclass(cls.config_cls)):
        raise TypeError(f"method {cls.name!r}: config_cls must be a dataclass subclassing MethodConfig")
    if cls.config_cls.noop.__func__ is MethodConfig.noop.__func__:
        raise TypeError(f"method {cls.name!r}: {cls.config_cls.__name__} must define noop(), the settings under "
                        "which the method installs nothing")
    existing = METHODS._items.get(cls.name)
    if existing is cls:
        return cls
    if existing is not None:
        raise ValueError(f"method name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
                         f"rename {where}")
    return METHODS.register(cls.name)(cls)


def _declared(cls: type) -> set[str]:
    """Attributes set on ``cls`` or a subclass of Intervention between it and Intervention."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Intervention:
            break
        names.update(vars(klass))
    return names


def method_fields(name: str) -> dict[str, dataclasses.Field]:
    """The config fields of method ``name``, by field name."""
    return {f.name: f for f in dataclasses.fields(METHODS.get(name).config_cls)}


# -- specs ------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A parameter value written on the command line or in a spec: JSON where it parses, else a
    comma-separated list, else the string itself (``true`` and ``none`` in any case are read too)."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("none", "null"):
        return None
    for read in (json.loads, float):  # float() also reads inf and nan, so that they are refused as such
        try:
            return read(t)
        except ValueError:
            pass
    if "," in t:
        return [parse_value(x) for x in _split(t, ",")]
    return t


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes; an unclosed or stray bracket or quote is refused
    (read as a plain string it would be split again without end, or silently mean something else)."""
    parts, stack, quote, start = [], [], "", 0
    pairs = {")": "(", "]": "[", "}": "{"}
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack.pop() != pairs[ch]:
                raise ConfigError(f"{text!r} has a {ch!r} that closes no bracket; balance the brackets, e.g. [1,2]")
        elif ch == sep and not stack:
            parts.append(text[start:i])
            start = i + 1
    if stack or quote:
        raise ConfigError(f"{text!r} has an unclosed {(quote or stack[-1])!r}; close it, e.g. layers=[1,2]")
    parts.append(text[start:])
    return parts


def split_specs(text: str) -> list[str]:
    """``"none,vhr:alpha=1.5,vhr:layers=[1,2]"`` -> the specs, split on commas outside brackets."""
    return [s.strip() for s in _split(text, ",")]


def parse_spec(spec: str | Sequence[str] | Mapping[str, Mapping[str, Any]] | None) -> MethodSpec:
    """Read a method spec into ``[(name, params), ...]`` in composition order
    (:meth:`Intervention.composition_key`; see the module docstring).

    Raises:
        ConfigError: an empty spec or part, a malformed ``key=value``, a method named twice, or
            ``none`` composed with a method.
        UnknownNameError: an unknown method (with a "did you mean", case slips included).
    """
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        items = [(str(name), dict(params or {})) for name, params in spec.items()]
        text = "+".join(name for name, _ in items)
    else:
        text = spec if isinstance(spec, str) else "+".join(spec)
        if not text.strip():
            raise ConfigError("empty method spec; name a method (e.g. 'vhr'), several joined by '+', or 'none'")
        items = [_parse_part(part, text) for part in _split(text, "+")]
    names = [name for name, _ in items]
    if names == [NONE] and not items[0][1]:
        return []
    if NONE in names:
        raise ConfigError(f"method spec {text!r} composes 'none' with a method; use 'none' alone for the baseline")
    for name in names:
        if name not in METHODS:
            raise UnknownNameError("method", name, [*METHODS.names(), NONE])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"method spec {text!r} names {twice[0]!r} twice; list each method once, e.g. 'vhr+var'")
    return sorted(items, key=lambda item: METHODS.get(item[0]).composition_key())


def _parse_part(part: str, whole: str) -> tuple[str, dict[str, Any]]:
    name, *assignments = (x.strip() for x in _split(part, ":"))
    if not name:
        raise ConfigError(f"method spec {whole!r} has an empty part; join method names with '+', e.g. 'vhr+var'")
    params: dict[str, Any] = {}
    for item in assignments:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"method spec {whole!r}: {item!r} is not key=value; write e.g. 'vhr:alpha=1.5'")
        if key.strip() in params:  # the later value would silently win
            raise ConfigError(f"method spec {whole!r} sets {name}.{key.strip()} twice; set each parameter once")
        params[key.strip()] = parse_value(value)
    return name, params


def format_spec(items: MethodSpec) -> str:
    """The canonical text of a parsed spec (``"vhr:alpha=1.5+var:tau=3.5"``; ``"none"`` when empty)."""
    if not items:
        return NONE
    return "+".join(name + "".join(f":{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(params.items()))
                    for name, params in items)


def build_methods(spec: str | Sequence[str] | Mapping[str, Mapping[str, Any]] | None,
                  params: Mapping[str, Mapping[str, Any]] | None = None, **flat: Any) -> list[Intervention]:
    """Instantiate the methods of ``spec``, in composition order (:meth:`Intervention.composition_key`).

    Args:
        spec: a method spec (see the module docstring), a list of names, a dict of per-method
            parameters, or None / ``"none"`` for no method.
        params: more per-method parameters, ``{"vhr": {"alpha": 2}}`` (the CLI's ``--set vhr.alpha=2``).
        **flat: parameters by field name alone, each routed to the one composed method that has the
            field (None values are ignored, as unset CLI flags).

    Raises:
        UnknownNameError: an unknown method.
        ConfigError: a parameter no composed method takes, a flat parameter that two composed
            methods take (set it per method instead), a parameter set twice, a bad value, or two
            composed methods that each decode a contrast stream.
    """
    items = parse_spec(spec)
    names = [name for name, _ in items]
    per_method = {name: dict(p) for name, p in items}
    for name, extra in (params or {}).items():
        if name not in per_method:
            raise ConfigError(f"parameters given for method {name!r}, which is not in {format_spec(items)!r}")
        _merge(per_method[name], extra, name)
    for key, value in flat.items():
        if value is None:
            continue
        owners = [n for n in names if key in method_fields(n)]
        if not owners:
            taken_by = ", ".join(names) or NONE
            raise ConfigError(f"parameter {key!r} is not a parameter of {taken_by}; see `lvlm-fix list`")
        if len(owners) > 1:
            raise ConfigError(f"parameter {key!r} is taken by both {owners[0]!r} and {owners[1]!r}; set it for one "
                              f"method: --set {owners[0]}.{key}=... on the command line, or "
                              f"{{'{owners[0]}': {{'{key}': ...}}}} in Python")
        _merge(per_method[owners[0]], {key: value}, owners[0])
    methods = []
    for name in names:
        cls = METHODS.get(name)
        unknown = sorted(set(per_method[name]) - set(method_fields(name)))
        if unknown:
            raise ConfigError(f"{unknown[0]!r} is not a parameter of {name}; its parameters: "
                              f"{', '.join(method_fields(name))}")
        try:
            methods.append(cls(cls.config_cls(**per_method[name])))
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    # One contrast stream per generation: two would each combine the other's already combined logits.
    streams = [m.name for m in methods if m.contrast_active()]
    if len(streams) > 1:
        raise ConfigError(f"{streams[0]!r} and {streams[1]!r} each decode a contrast stream; compose at most one "
                          "contrastive method per run (attention and head methods compose with it, e.g. 'vhr+vcd')")
    # One decoding loop per generation, and no contrast stream beside it: the stream decodes in lock step with
    # generate()'s own rows, and a loop of its own (OPERA's candidates and rollbacks) is not that.
    loops = [m.name for m in methods if m.stage.owns_decoding]
    if len(loops) > 1:
        raise ConfigError(f"{loops[0]!r} and {loops[1]!r} each own the decoding loop; compose at most one of them")
    if loops and streams:
        raise ConfigError(f"{loops[0]!r} owns the decoding loop and {streams[0]!r} decodes a contrast stream, which "
                          f"cannot follow it; drop one (attention and head methods compose with {loops[0]!r})")
    # The contrast rows run outside the plan: an in-forward logits edit would reach the main rows only.
    editors = [m.name for m in methods if type(m).logits is not Participant.logits]
    if streams and editors:
        raise ConfigError(f"{editors[0]!r} edits the next-token logits inside the forward and {streams[0]!r} combines "
                          "them with a contrast stream that does not get that edit; run them in separate calls")
    return methods


def _merge(into: dict[str, Any], extra: Mapping[str, Any], name: str) -> None:
    for key, value in extra.items():
        if key in into and into[key] != value:
            raise ConfigError(f"parameter {key!r} of {name} is set twice ({into[key]!r} and {value!r}); set it once")
        into[key] = value
