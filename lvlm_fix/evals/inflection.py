"""inflect's singular nouns, shared by CHAIR's coco mode and its original-rules mode."""

from __future__ import annotations

import functools
from typing import Any

from ..extras import require


@functools.cache
def engine() -> Any:
    """inflect's engine. Imported on first use: inflect takes seconds to import (typeguard re-compiles
    its functions at import time) and only CHAIR needs it; the extractors that use it call this when
    they are made, so that a missing inflect is refused before a run starts."""
    return require("inflect", "CHAIR's inflect singulariser (--chair-mode lvlm-fix, --chair-singularizer "
                              "inflect)").engine()


@functools.lru_cache(maxsize=1 << 16)
def inflect_singular(word: str) -> str:
    """``word``'s singular by inflect, or ``word`` when inflect finds none (or rejects it: inflect
    type-checks its input and refuses e.g. the empty string)."""
    inflect = engine()  # outside the try: a missing inflect is an error, not a word left as it is
    try:
        return inflect.singular_noun(word) or word
    except Exception:
        return word
