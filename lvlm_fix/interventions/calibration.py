"""Offline calibrations that methods declare, which ``lvlm-fix calibrate --method NAME`` runs.

A method that must be fitted on labelled data before use (ACT: which heads to damp) declares it on
its class as ``calibration = Calibration(...)``: what it picks, the function that runs the search on
a bench's samples, the function that writes its file, and the config field that reads the file
back. ``lvlm-fix calibrate`` lists the methods that declare one (:func:`calibrations`) and runs the
declared functions; nothing in the command names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["Calibration", "calibrations"]


@dataclass(frozen=True)
class Calibration:
    """A method's offline calibration.

    Attributes:
        what: one line, what it picks and how (``lvlm-fix calibrate --help`` prints it).
        run: ``run(lvlm, samples, *, limit, dataset) -> dict``: the search over the ``data`` of the
            bench's samples (at most ``limit``), returning a JSON-ready result that records
            ``dataset`` (the bench's description of the data: its id, sha256, size).
        write: ``write(result, path) -> Path``: the file the method reads back.
        reads_back: the config field that reads the file (``heads_file``: ``--heads-file FILE``).
        bench: the bench whose samples it takes; ``split``: its default split there.
        summary: ``summary(result, path) -> str``: the line printed after writing (or a warning
            when the result would change nothing, returning ``""``).
        limit: the default number of calibration samples (``--limit``).
        load: ``load(data, limit) -> (samples, dataset)``, for a calibration whose data is not a bench's
            samples (VTI's caption pairs): ``data`` holds the command's data flags (``demos``,
            ``image_dir``, ...; None where not given); ``bench`` is then only a label.
        options: the keyword arguments of ``run`` that ``--option NAME=VALUE`` sets, with their types.
    """

    what: str
    run: Callable[..., dict[str, Any]]
    write: Callable[[dict[str, Any], str | Path], Path]
    reads_back: str
    bench: str = "pope"
    split: str | None = None
    summary: Callable[[dict[str, Any], str | Path], str] | None = None
    limit: int = 100
    load: Callable[[dict[str, Any], int], tuple[list[Any], dict[str, Any]]] | None = None
    options: dict[str, type] = field(default_factory=dict)

    @property
    def flag(self) -> str:
        """The command-line flag that reads the file back (``--heads-file``)."""
        return "--" + self.reads_back.replace("_", "-")


def calibrations() -> dict[str, Calibration]:
    """The registered methods that declare a calibration (built-ins and plugins), by name.

    Raises:
        TypeError: a method whose ``calibration`` is not a :class:`Calibration`, or reads its file back
            through a field its config does not have.
    """
    from .registry import METHODS

    out = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        cal = getattr(cls, "calibration", None)  # a class attribute; methods without one calibrate nothing
        if cal is None:
            continue
        if not isinstance(cal, Calibration):
            raise TypeError(f"method {name!r}: calibration={cal!r} is not a lvlm_fix.interventions.Calibration")
        if cal.reads_back not in {f.name for f in fields(cls.config_cls)}:
            raise TypeError(f"method {name!r}: its calibration's file is read back through {cal.reads_back!r}, "
                            f"which is not a field of {cls.config_cls.__name__}")
        out[name] = cal
    return out
