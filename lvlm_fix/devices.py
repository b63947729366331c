"""Checking a device name (and a ``device_map``) before any weight is loaded.

:func:`check_device`, the command line's, imports no torch unless the name needs one, so that
``lvlm-fix run --help`` and a bad name cost no torch import; :func:`check_torch_device`, for
:func:`~lvlm_fix.model.load` and the lmms-eval model, reads the name as torch does.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InputError

# device_map values that name a placement strategy (accelerate's), not a device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(meta|(cpu|mps|cuda|xpu|npu|hpu)(:\d+)?)$")  # cpu:0 too, as torchrun names it


def check_device(device: Any, option: str = "device") -> None:
    """A device torch can use here, or one line naming it and the fix (before any weight is loaded)."""
    if device is None:
        return
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise InputError(f"{option} {device!r} is not a torch device; use e.g. cpu, cuda, cuda:0 or mps")
    kind, _, index = device.partition(":")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise InputError(f"{option} {device}: this torch ({torch.__version__}) has {build}; use {_cpu(option)}")
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise InputError(f"{option} {device}: MPS is not available on this machine; use {_cpu(option)}")


def check_torch_device(name: str, option: str) -> None:
    """Any name torch reads (``cpu:0`` under torchrun too), and a GPU that is there (:func:`check_device`);
    what :func:`~lvlm_fix.model.load` and the lmms-eval model check, with torch already imported."""
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise InputError(f"{option} {name!r} is not a torch device; use e.g. cpu, cuda, cuda:0 or mps") from None
    if name.partition(":")[0] in ("cuda", "mps"):
        check_device(name, option)


def _cpu(option: str) -> str:
    return f"{option} cpu" if option.startswith("--") else f"{option}=cpu"
