"""The unembedding of extra rows: a fast product for a few rows, and one call shared with the model's own.

Early-exit methods (DoLa, DeCo, ONLY, MemVR, VISTA's self-logits) project a handful of hidden states
per forward through ``lm_head``. Two things make that cheap:

* :func:`project` picks the product's shape. A plain fp32 ``nn.Linear`` on the CPU computing 2 to 8
  rows runs as ``W @ x^T``: the BLAS GEMM behind ``x @ W^T`` packs the whole ``[V, D]`` weight before
  multiplying a few rows, which for a 32k vocabulary costs two to four times what streaming the weight
  once does (LLaVA-118M's unembedding, one thread: 3 rows 27 ms as ``x @ W^T``, 6 ms as ``W @ x^T``;
  one row 8 ms either way). Elsewhere (a GPU, half precision, a quantized or wrapped head, many rows)
  the module is called as it is.
* :func:`shared_forward` is the ``lm_head`` forward a plan installs while a participant shares the
  unembedding (``Participant.unembed_rows``): at the model's own projection of a forward (after its
  last decoder layer), the participants' rows are appended to the model's and all are projected in one
  call, so the weight, the largest single read of a decode step at a small model, is read once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FEW_ROWS", "project", "shared_forward"]

FEW_ROWS = 8  # up to this many rows, a CPU fp32 Linear streams its weight (W @ x^T); from 12 on x @ W^T is faster


def project(head: Any, rows: Tensor, forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``rows`` ``[m, D]`` through the unembedding ``head``: ``[m, V]`` in the head's dtype.

    ``forward``: the head's own forward to call otherwise (default ``head`` itself); a plan passes the
    unpatched one.
    """
    weight = getattr(head, "weight", None)
    # The weight itself on the rows' CPU: an offloaded head (its weight on "meta" until its own forward loads
    # it) goes through that forward.
    if (type(head) is torch.nn.Linear and 1 < rows.shape[0] <= FEW_ROWS and rows.dim() == 2
            and rows.device.type == "cpu" and weight.device == rows.device
            and rows.dtype == torch.float32 and weight.dtype == torch.float32):
        out = torch.matmul(weight, rows.T).T  # the weight streamed once (module docstring)
        return out if head.bias is None else out + head.bias
    return (forward or head)(rows)


def shared_forward(head: Any, forward: Callable[[Tensor], Tensor],
                   extra_rows: Callable[[Tensor], Tensor | None],
                   deliver: Callable[[Tensor], None], armed: Callable[[], bool]) -> Callable[[Tensor], Tensor]:
    """The patched ``head.forward``: when ``armed()`` (the model's own projection of a plan's forward),
    ``extra_rows(last)`` (given the model's last-position input ``[n, D]``) returns rows ``[m, D]`` or None; the
    model's rows and these are projected in one :func:`project` call, ``deliver`` gets the extra logits
    ``[m, V]`` and the model gets its own, shaped as it asked. Any other call goes to ``forward`` untouched."""

    def patched(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or not armed():
            return forward(hidden, *args, **kwargs)
        extra = extra_rows(hidden[..., -1, :].reshape(-1, hidden.shape[-1]) if hidden.dim() > 2 else hidden)
        if extra is None:
            return forward(hidden)
        own = hidden.reshape(-1, hidden.shape[-1])
        out = project(head, torch.cat([own, extra.to(own.device, own.dtype)]), forward)  # early layers may sit elsewhere
        deliver(out[own.shape[0]:])
        return out[: own.shape[0]].reshape(*hidden.shape[:-1], out.shape[-1])

    return patched
