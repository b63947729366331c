"""HookSet: every forward hook lvlm-fix puts on a model goes through one of these.

Targets are resolved when added (a wrong module name fails before anything is registered);
registration happens on ``__enter__`` inside ``try`` (a failure half-way removes what was
already registered); ``__exit__`` removes every handle, whatever happened inside the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class _Spec:
    module: torch.nn.Module
    fn: Callable
    kind: str  # "forward_pre" | "forward"
    with_kwargs: bool


class HookSet:
    """An all-or-nothing set of forward hooks, used as a context manager."""

    def __init__(self) -> None:
        self._specs: list[_Spec] = []
        self._handles: list[RemovableHandle] = []

    @staticmethod
    def resolve(root: torch.nn.Module, target: str | torch.nn.Module) -> torch.nn.Module:
        """A module, or the submodule of ``root`` at a dotted path (``AttributeError`` if absent)."""
        return root.get_submodule(target) if isinstance(target, str) else target

    def forward_pre(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> HookSet:
        self._specs.append(_Spec(module, fn, "forward_pre", with_kwargs))
        return self

    def forward(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> HookSet:
        self._specs.append(_Spec(module, fn, "forward", with_kwargs))
        return self

    def __enter__(self) -> HookSet:
        try:
            for s in self._specs:
                register = s.module.register_forward_pre_hook if s.kind == "forward_pre" else s.module.register_forward_hook
                self._handles.append(register(s.fn, with_kwargs=s.with_kwargs))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every registered hook (idempotent, newest first)."""
        while self._handles:
            self._handles.pop().remove()


def hooks_on(model: torch.nn.Module) -> int:
    """Number of forward hooks of any kind on ``model`` and its submodules (0 after a clean exit)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )
