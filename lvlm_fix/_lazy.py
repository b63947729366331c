"""Heavy modules imported on first use, so that ``lvlm-fix --help`` and ``lvlm-fix list`` start at once.

The method files, the hooks and the registry are imported to list the methods and build the CLI's
flags; importing torch (about 1.5 s) and transformers (about 1 s) there would make every usage
error slow. Modules that need them at run time write ``from .._lazy import torch`` (annotations
stay plain under ``from __future__ import annotations`` with a ``TYPE_CHECKING`` import). The first
attribute read imports the real module; every later read of the same name is an ordinary
attribute lookup, because the value is stored on the proxy.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for ``name`` that imports it when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str) -> Any:  # only called for names not yet cached
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


torch = LazyModule("torch")
