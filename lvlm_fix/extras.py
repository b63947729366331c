"""Optional packages, each installed by an extra of lvlm-fix, and the one way to import them.

The core (load, wrap, apply() around generate(), the methods but CARVE, POPE) needs torch,
transformers and the other packages of ``pyproject.toml``'s ``dependencies``. Scoring CHAIR and
AMBER, loading a benchmark from the Hub, drawing figures and CARVE's masks need more: each such
import goes through :func:`require`, so that a missing package is one line naming the extra that
installs it (``pip install "lvlm-fix[evals]"``), which the CLI prints with exit code 2, never a
traceback half-way through a run.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import LvlmFixError

EXTRAS: dict[str, tuple[str, str]] = {
    # import name -> (distribution, extra); pyproject.toml's optional-dependencies must agree
    # (tests/test_extras.py checks it)
    "nltk": ("nltk", "evals"),  # CHAIR's and AMBER's tokenizer, OPERA's tagger
    "inflect": ("inflect", "evals"),  # CHAIR's inflect singulariser (lvlm-fix mode; original mode's option)
    "datasets": ("datasets", "evals"),  # --hf-dataset (POPE from the Hub or a saved copy)
    "matplotlib": ("matplotlib", "plots"),  # lvlm-fix report, lvlm-fix heads
    "scipy": ("scipy", "carve"),  # CARVE's connected regions (scipy.ndimage.label)
}
"""Every optional package lvlm-fix imports, by import name."""


class MissingExtraError(LvlmFixError, ImportError):
    """An optional package is not installed; the message names the extra that installs it.

    An ``ImportError`` too, so that ``except ImportError`` around an optional feature keeps working."""


def _package(module: str) -> tuple[str, str]:
    """(distribution, extra) of ``module``'s top-level package."""
    top = module.partition(".")[0]
    if top not in EXTRAS:  # a slip in lvlm-fix itself, not in the user's input
        raise KeyError(f"{module!r} is not an optional package of lvlm-fix; add it to EXTRAS and pyproject.toml")
    return EXTRAS[top]


def _missing(module: str, needed_for: str, cause: ImportError | None = None) -> MissingExtraError:
    top = module.partition(".")[0]
    dist, extra = _package(module)
    # A package that is there but fails to import (one of its own dependencies missing) is named
    # with the cause, on the same line; reinstalling the extra repairs both.
    state = ("is not installed" if cause is None or (cause.name or "").partition(".")[0] == top
             else f"cannot be imported ({(str(cause).splitlines() or [''])[0]})")
    return MissingExtraError(f'{needed_for} needs {dist}, which {state}; install it with pip install "lvlm-fix[{extra}]"')


def require(module: str, needed_for: str) -> ModuleType:
    """``module`` (``"scipy.ndimage"``) imported, or a :class:`MissingExtraError` naming its extra.

    Args:
        module: an import name whose top-level package is in :data:`EXTRAS`.
        needed_for: what needs it, for the message (``"CARVE"``, ``"lvlm-fix report"``).
    """
    _package(module)  # an unknown name fails even where the package is installed
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(module, needed_for, e) from None


def check_installed(needed_for: str, *modules: str) -> None:
    """Refuse now, without importing anything, when one of ``modules`` is not installed: for a command
    that needs them only after a slow step (loading a model), e.g. ``check_installed("lvlm-fix heads",
    "matplotlib")``."""
    for module in modules:
        _package(module)
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or set to None in sys.modules
            found = False
        if not found:
            raise _missing(module, needed_for)
