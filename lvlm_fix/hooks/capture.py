"""HookSet: every forward hook lvlm-fix puts on a model goes through one of these.

Hooks are declared first (module, function) and registered together on ``__enter__`` inside
``try``, so a failure half-way removes what was already registered; ``__exit__`` removes every
handle, whatever happened inside the block. Besides forward pre- and post-hooks, a HookSet can
shadow one attribute of an object for its lifetime (:meth:`HookSet.patch`): the contrast stream
uses it for the two methods ``generate()`` calls by name outside any forward (beam reordering of
the cache, and the image encoder it runs before the prefill), which no module hook can see.

Also here: :func:`vision_cls_attention`, which finds, by structure, where a vision tower's CLS
query attends (the attention module of each ViT layer, whose q/k projections a forward hook
can read), and :func:`cls_attention_row`, which recomputes that row from the projections' outputs.
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


# -- the vision tower's CLS attention ---------------------------------------------------------------
@dataclass(frozen=True)
class ClsAttention:
    """Where a vision tower's CLS query attends, found from the model's structure.

    Attributes:
        attentions: per ViT layer, its attention module (with ``q_proj``, ``k_proj``, ``head_dim``
            and ``scale``), in layer order.
        num_patches: patch tokens per image; the tower's sequence is the CLS token (position 0)
            then the patches in row-major order.
    """

    attentions: tuple[Any, ...]
    num_patches: int


_CLS_PARAMETERS = ("class_embedding", "cls_token")  # CLIP, ViT / DINO naming of the learned CLS token


def vision_cls_attention(model: torch.nn.Module) -> ClsAttention:
    """The vision tower of ``model`` and its per-layer attention modules, if it has a CLS token.

    Derived, not looked up by model name: the tower is the outermost module whose ``config`` is
    the model's ``vision_config``; it has a CLS token when it owns a learned class embedding; its
    layers are its module list of ``vision_config.num_hidden_layers`` entries; each layer's
    attention is the first submodule with ``q_proj`` and ``k_proj``.

    Raises:
        LvlmFixError: no vision tower, no CLS token, or no readable attention projections.
    """
    from torch import nn

    from ..errors import LvlmFixError

    kind = getattr(model.config, "model_type", "?")
    vision_config = getattr(model.config, "vision_config", None)
    tower = next((m for m in model.modules() if vision_config is not None
                  and getattr(m, "config", None) is vision_config), None)
    if tower is None:
        raise LvlmFixError(f"cannot find the vision tower of this {kind!r} model (no module carries its vision_config)")
    if not any(name.rsplit(".", 1)[-1] in _CLS_PARAMETERS for name, _ in tower.named_parameters()):
        raise LvlmFixError(f"the vision tower of this {kind!r} model has no CLS token "
                           f"({type(tower).__name__}); CLS attention cannot be read from it")
    depth = getattr(vision_config, "num_hidden_layers", None)
    layers = next((m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) == depth), None)
    attentions = []
    for layer in layers if layers is not None else ():
        attn = next((m for m in layer.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")
                     and hasattr(m, "head_dim") and hasattr(m, "scale")), None)
        attentions.append(attn)
    if not attentions or any(a is None for a in attentions):
        raise LvlmFixError(f"cannot read the q/k projections of the vision tower of this {kind!r} model "
                           f"({type(tower).__name__})")
    side = vision_config.image_size // vision_config.patch_size
    return ClsAttention(tuple(attentions), side * side)


def cls_attention_row(attention: Any, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS query's attention row of one ViT layer, recomputed from its projections' outputs.

    Args:
        attention: the layer's attention module (for ``head_dim`` and ``scale``).
        queries: the output of its ``q_proj`` (``[b, n, d]``; only position 0, CLS, is used).
        keys: the output of its ``k_proj`` (``[b, n, d]``).

    Returns:
        ``softmax(q_cls k^T * scale)`` in fp32, ``[b, heads, n]`` (a ViT's attention is
        bidirectional and unmasked, so the row is exactly what the layer computed).
    """
    b, n, _ = keys.shape
    hd = attention.head_dim
    q = queries[:, :1].float().view(b, 1, -1, hd).transpose(1, 2)  # [b, h, 1, hd]
    k = keys.float().view(b, n, -1, hd).transpose(1, 2)  # [b, h, n, hd]
    return (q @ k.transpose(-1, -2) * attention.scale).softmax(-1)[:, :, 0]
