"""HookSet: every forward hook lvlm-fix puts on a model goes through one of these.

Hooks are declared first (module, function) and registered together on ``__enter__`` inside
``try``, so a failure half-way removes what was already registered; ``__exit__`` removes every
handle, whatever happened inside the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class _Spec:
    module: torch.nn.Module
    fn: Callable
    with_kwargs: bool


class HookSet:
    """An all-or-nothing set of forward pre-hooks, used as a context manager."""

    def __init__(self) -> None:
        self._specs: list[_Spec] = []
        self._handles: list[Any] = []  # torch RemovableHandles

    def forward_pre(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> HookSet:
        self._specs.append(_Spec(module, fn, with_kwargs))
        return self

    def __enter__(self) -> HookSet:
        try:
            for s in self._specs:
                self._handles.append(s.module.register_forward_pre_hook(s.fn, with_kwargs=s.with_kwargs))
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
