"""HookSet: every forward hook lvlm-fix puts on a model goes through one of these.

Hooks are declared first (module, function) and registered together on ``__enter__`` inside
``try``, so a failure half-way removes what was already registered; ``__exit__`` removes every
handle, whatever happened inside the block. Besides forward pre- and post-hooks, a HookSet can
shadow one attribute of an object for its lifetime (:meth:`HookSet.patch`): the contrast stream
uses it for the two methods ``generate()`` calls by name outside any forward (beam reordering of
the cache, and the image encoder it runs before the prefill), which no module hook can see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class _Spec:
    module: Any  # a torch.nn.Module, or any object for a patch
    fn: Any  # the hook, or the patch's value
    with_kwargs: bool = False
    kind: str = "pre"  # "pre" (forward pre-hook), "post" (forward hook) or "patch"
    name: str = ""  # the patched attribute


class _Patch:
    """``obj.name`` shadowed by an instance attribute until :meth:`remove` (then as before)."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name = obj, name
        self._had, self._before = name in vars(obj), vars(obj).get(name)
        setattr(obj, name, value)

    def remove(self) -> None:
        if self._had:
            setattr(self.obj, self.name, self._before)
        else:
            delattr(self.obj, self.name)


class HookSet:
    """An all-or-nothing set of forward hooks and attribute patches, used as a context manager."""

    def __init__(self) -> None:
        self._specs: list[_Spec] = []
        self._handles: list[Any] = []  # torch RemovableHandles and _Patches

    def forward_pre(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> HookSet:
        self._specs.append(_Spec(module, fn, with_kwargs))
        return self

    def forward(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> HookSet:
        """A forward hook ``fn(module, args, [kwargs,] output)``, run after the forward."""
        self._specs.append(_Spec(module, fn, with_kwargs, kind="post"))
        return self

    def patch(self, obj: Any, name: str, value: Any) -> HookSet:
        """Shadow ``obj.name`` by ``value`` (an instance attribute) while the set is entered."""
        self._specs.append(_Spec(obj, value, kind="patch", name=name))
        return self

    def __enter__(self) -> HookSet:
        try:
            for s in self._specs:
                if s.kind == "patch":
                    self._handles.append(_Patch(s.module, s.name, s.fn))
                elif s.kind == "post":
                    self._handles.append(s.module.register_forward_hook(s.fn, with_kwargs=s.with_kwargs))
                else:
                    self._handles.append(s.module.register_forward_pre_hook(s.fn, with_kwargs=s.with_kwargs))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every registered hook and patch (idempotent, newest first)."""
        while self._handles:
            self._handles.pop().remove()


def hooks_on(model: torch.nn.Module) -> int:
    """Number of forward hooks of any kind on ``model`` and its submodules (0 after a clean exit)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )
