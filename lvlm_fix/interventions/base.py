"""What a method is: a frozen config dataclass plus the method's math, registered by name.

A method subclasses :class:`Intervention` (itself a :class:`~lvlm_fix.hooks.Participant`:
it declares the layers it needs in ``bind`` and overrides the callbacks it uses) and pairs it
with a config subclass of :class:`MethodConfig` whose fields carry ``metadata={"help": ...}``
stating the default and its source. ``Config.noop()`` gives settings under which the method is
an exact identity. Method files hold math only: layers, heads and image positions arrive
through ``bind`` (the :class:`~lvlm_fix.model.LVLM` handle) and the callbacks' ``ctx``.

Composition (``"vhr+var"``) applies methods in the fixed order of :data:`ORDER`: first the
input refinement (CARVE: the final answer is generated on the refined image), then the
head-output scaling (VHR), then the attention redistributions (VAR, then ACT), each seeing the
output of the one before.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError, UnknownNameError
from ..hooks.plan import Participant
from ..registry import Registry

ORDER = ("carve", "vhr", "var", "act")
NONE = "none"  # the baseline: no method


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's config: frozen, keyword-only, validated on construction."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming a bad value and its valid range."""

    @classmethod
    def noop(cls) -> MethodConfig:
        """Settings under which the method is an exact identity."""
        raise NotImplementedError(cls.__name__)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Intervention(Participant):
    """A registered method. ``refines_input`` methods rewrite the image instead of the model."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    refines_input: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "config": self.config.to_dict()}


METHODS: Registry[type[Intervention]] = Registry("method")


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: registers ``cls`` under ``cls.name``."""
    return METHODS.register(cls.name)(cls)


def split_methods(spec: str | Sequence[str] | None) -> list[str]:
    """``"vhr+var"`` -> ``["vhr", "var"]`` in composition order; ``None``/``"none"`` -> ``[]``."""
    if spec is None:
        return []
    names = [s.strip() for s in (spec.split("+") if isinstance(spec, str) else spec) if s.strip()]
    names = [n for n in names if n != NONE]
    for n in names:
        if n not in METHODS:
            raise UnknownNameError("method", n, [*METHODS.names(), NONE])
    if len(set(names)) != len(names):
        raise ConfigError(f"method {spec!r} names a method twice; list each once, e.g. 'vhr+var'")
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def build_methods(spec: str | Sequence[str] | None, **params: Any) -> list[Intervention]:
    """Instantiate the methods of ``spec`` with ``params`` routed to every config that has the field.

    Raises:
        UnknownNameError: an unknown method.
        ConfigError: a parameter no selected method takes, or a value out of range.
    """
    classes = [METHODS.get(n) for n in split_methods(spec)]
    params = {k: v for k, v in params.items() if v is not None}
    unused = set(params)
    methods = []
    for cls in classes:
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        mine = {k: v for k, v in params.items() if k in fields}
        unused -= set(mine)
        try:
            methods.append(cls(cls.config_cls(**mine)))
        except TypeError as e:
            raise ConfigError(f"bad parameters for {cls.name}: {e}") from None
    if unused:
        names = "+".join(c.name for c in classes) or NONE
        raise ConfigError(f"parameter {sorted(unused)[0]!r} is not a parameter of method {names!r}; see `lvlm-fix list`")
    return methods


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi``."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"{name}={value} is out of range; valid range is {rng}")


def resolve_layers(layers: Sequence[int] | None, default: Sequence[int], n_layers: int, name: str = "layers") -> frozenset[int]:
    """Explicit ``layers`` (negative counts from the end) or ``default``; each must exist."""
    chosen = default if layers is None else layers
    out = set()
    for i in chosen:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"{name} index {i} is beyond the model's depth; valid layers are 0..{n_layers - 1}")
        out.add(j)
    return frozenset(out)
