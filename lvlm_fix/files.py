"""Files written whole or not at all: a reader never sees half a file, and a full disk keeps the old one.

Results, checkpoints, reports and figures are all written through these two functions, at every
layer (a method's calibration file, the diagnostics' figures, the eval store), so they live at the
bottom of the package, beside the errors.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError:  # a full disk: the old file stays as it was, and no half-written copy is left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure whole or not at all (a full disk leaves the earlier figure as it was)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
