"""Errors a user can fix. The CLI prints each as one line and exits with code 2."""

from __future__ import annotations

from collections.abc import Iterable


class LvlmFixError(Exception):
    """Base class for every error caused by user input (bad value, missing file, unsupported model)."""


class UnsupportedModelError(LvlmFixError):
    """A model the attention seam cannot serve; the message says why and what works."""

    def __init__(self, model_type: str, reason: str) -> None:
        self.model_type, self.reason = model_type, reason
        super().__init__(
            f"model type {model_type!r} is not supported: {reason}. lvlm-fix works on LVLMs whose text decoder is a "
            "stack of self-attention layers reading the image as image tokens in input_ids (llava, qwen2_vl, gemma3, "
            "internvl, mistral3 and more: the verified families are listed in docs/supported-models.md)"
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


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def strict_bool(name: str, value: object) -> bool:
    """A boolean setting that may arrive as text (``--model-args``, lmms-eval ``model_args``, config files).

    Only an explicit spelling counts: ``bool`` values, ``true``/``false`` (any case), ``yes``/``no`` and
    ``1``/``0``. Anything else is refused rather than read by Python's truthiness, under which the string
    ``"no"`` is true — for ``trust_remote_code`` that would run a model folder's own code.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip("\"'").lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(f"{name}={value!r} is not a boolean; write {name}=true or {name}=false")
