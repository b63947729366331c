"""A small name -> object registry with "did you mean" errors (methods and evals use it)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

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
