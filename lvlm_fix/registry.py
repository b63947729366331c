"""A small name -> object registry with "did you mean" errors (methods and evals use it), and the
plugin paths every registry shares: an entry-point group of its own, and ``$LVLM_FIX_PLUGINS``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import LvlmFixError, UnknownNameError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Maps lowercase names to objects. The registry key is the CLI name and the results folder name."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        """``loader``, if given, is called once before the first lookup to register the entries
        (e.g. import every built-in module and the plugins); registering never triggers it."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None  # first, so a lookup during loading cannot recurse
            try:
                loader()
            except BaseException:
                self._loader = loader  # a failed load is retried (and fails again, loudly) next time
                raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("vhr")``. Names are lowercase and unique."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and '_'")

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# -- plugin paths, shared by the method and bench registries ----------------------------------------
PLUGINS_ENV = "LVLM_FIX_PLUGINS"
"""Comma-separated module names or ``.py`` files imported before the first lookup of any registry."""


def entry_point_objects(group: str, kind: str) -> list[Any]:
    """The objects the installed packages' entry points of ``group`` name (a class, or a module that
    registers its entries when imported); a broken one is one line naming it (``kind``: "method")."""
    objects = []
    for ep in metadata.entry_points(group=group):
        try:
            objects.append(ep.load())
        except Exception as e:
            raise LvlmFixError(f"cannot load {kind} plugin {ep.name!r} ({ep.value}): {type(e).__name__}: {e}; "
                               "fix or uninstall the package that declares it") from None
    return objects


def import_plugins() -> None:
    """Import each ``$LVLM_FIX_PLUGINS`` entry (a module name, or the path of a ``.py`` file) once.

    Every registry calls this from its loader, and one plugin file may register methods and benches
    alike: a file already imported is not run again (a second run would make new classes under the
    names the first run registered)."""
    for item in filter(None, (x.strip() for x in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            if item.endswith(".py"):
                path = Path(item).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                name = f"lvlm_fix_plugin_{path.stem}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]  # half-run: the next lookup retries it, and fails the same way
                    raise
            else:
                importlib.import_module(item)
        except LvlmFixError:
            raise
        except Exception as e:
            raise LvlmFixError(f"cannot import plugin {item!r} from ${PLUGINS_ENV}: {type(e).__name__}: {e}; "
                               "give importable module names or .py files, comma-separated") from None
