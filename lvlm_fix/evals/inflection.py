"""inflect's singular nouns, shared by CHAIR's coco mode and its original-rules mode."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _engine() -> Any:
    # Imported on first use: inflect takes seconds to import (typeguard re-compiles its
    # functions at import time) and only CHAIR needs it.
    import inflect

    return inflect.engine()


@functools.lru_cache(maxsize=1 << 16)
def inflect_singular(word: str) -> str:
    """``word``'s singular by inflect, or ``word`` when inflect finds none (or rejects it: inflect
    type-checks its input and refuses e.g. the empty string)."""
    try:
        return _engine().singular_noun(word) or word
    except Exception:
        return word
