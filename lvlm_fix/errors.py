"""Errors a user can fix. The CLI prints each as one line and exits with code 2."""

from __future__ import annotations

from collections.abc import Iterable


class LvlmFixError(Exception):
    """Base class for every error caused by user input (bad value, missing file, unsupported model)."""


class UnsupportedModelError(LvlmFixError):
    """The model's ``config.model_type`` has no adapter."""

    def __init__(self, model_type: str, supported: Iterable[str]) -> None:
        self.model_type = model_type
        self.supported = sorted(supported)
        super().__init__(
            f"unsupported model type {model_type!r}; supported types: {', '.join(self.supported)} "
            "(add an Adapter to lvlm_fix.adapters.ADAPTERS for a new architecture)"
        )


class UnknownNameError(LvlmFixError, KeyError):
    """A name (method, eval, split) that is not registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        import difflib

        self.kind, self.name = kind, name
        self.available = sorted(available)
        by_lower = {a.lower(): a for a in self.available}  # a case slip ("VHR") is the likeliest typo
        close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
        hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Available: {', '.join(self.available)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class ConfigError(LvlmFixError, ValueError):
    """A method or run parameter outside its valid range."""


class InputError(LvlmFixError, ValueError):
    """Unreadable image, malformed prompt file, and the like."""


class DataError(InputError):
    """A dataset file, folder or record that is missing or malformed."""


class RunFolderBusyError(InputError):
    """Another live process is writing into the same run folder (``--out``)."""


class LvlmFixWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""
