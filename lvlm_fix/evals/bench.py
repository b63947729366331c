"""The bench registry: a benchmark is one registered :class:`Bench` subclass.

A bench says where its samples come from (its data options), what each split asks and how it
decodes (:class:`Prompting`), how one answer becomes a stored record (with its scores), how
records of one split aggregate into metrics (with the per-sample arrays the bootstrap resamples),
and how the comparison table looks. The runner (:mod:`.runner`) and the CLI are generic over it:
``--bench`` choices, ``lvlm-fix list`` and the bench's own flags all come from :data:`BENCHES`.

Where benches come from, all registered through :func:`register_bench` (as methods are through
``register_method``):

* built-ins: every module of ``lvlm_fix.evals.benches`` is imported on the first lookup, and its
  bench class registers itself; a new built-in is one new file;
* installed plugins: the entry-point group ``lvlm_fix.benches`` (each entry point names a bench
  class, or a module that registers its benches when imported);
* ad-hoc modules: ``LVLM_FIX_PLUGINS=mypkg.mybench,path/to/file.py`` imports them first (the same
  variable as the methods', so one file may bring both);
* any code that calls ``register_bench(MyBench)`` before using the name.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, DataError, UnknownNameError
from ..registry import Registry, entry_point_objects, import_plugins

__all__ = ["BENCHES", "ENTRY_POINT_GROUP", "Bench", "Option", "Prompting", "Sample", "ci_cell", "make_bench",
           "p_cell", "pick_key", "read_rows", "register_bench", "row_id"]

ENTRY_POINT_GROUP = "lvlm_fix.benches"
_BUILTINS = "lvlm_fix.evals.benches"


def _load_benches() -> None:
    """Import the built-in bench modules, then the plugins (entry points, then $LVLM_FIX_PLUGINS)."""
    package = importlib.import_module(_BUILTINS)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{_BUILTINS}.{info.name}")
    for obj in entry_point_objects(ENTRY_POINT_GROUP, "bench"):
        if isinstance(obj, type) and obj not in BENCHES._items.values():
            register_bench(obj)
    import_plugins()


BENCHES: Registry[type[Bench]] = Registry("eval", loader=_load_benches)

# What a bench must implement itself: the base's versions raise NotImplementedError.
_REQUIRED = ("load", "record", "aggregate", "table")


def register_bench(cls: type[Bench]) -> type[Bench]:
    """Register a bench class under ``cls.name`` (usable as a class decorator).

    The class must subclass :class:`Bench`, declare ``name`` (lowercase letters, digits and ``_``:
    the ``--bench`` value and the results' name) and ``description`` (its line in ``lvlm-fix list``),
    and implement ``load``, ``record``, ``aggregate`` and ``table``; ``values`` too when it declares
    ``stats``. Registering the same class twice is a no-op; another class under a taken name is an
    error.

    Raises:
        TypeError: a missing or wrong declaration, named in the message.
        ValueError: the name is taken.
    """
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    if not (isinstance(cls, type) and issubclass(cls, Bench)):
        raise TypeError(f"{where} is not a subclass of lvlm_fix.evals.bench.Bench")
    for attr in ("name", "description"):
        if not isinstance(getattr(cls, attr), str) or not getattr(cls, attr):
            raise TypeError(f"bench class {where} does not declare {attr!r}; every bench declares name and "
                            "description (see docs/guides/adding-a-benchmark.md)")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise TypeError(f"bench class {where}: name={cls.name!r} must be lowercase letters, digits and '_'")
    required = [*_REQUIRED, *(("values",) if cls.stats is not Bench.stats else ())]
    missing = [m for m in required if getattr(cls, m) is getattr(Bench, m)]
    if missing:
        raise TypeError(f"bench {cls.name!r} does not implement {', '.join(missing)} (see the Bench docstrings)")
    existing = BENCHES._items.get(cls.name)
    if existing is cls:
        return cls
    if existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__):
        return existing  # the same plugin file run again by another loader: its first run's class stays
    if existing is not None:
        raise ValueError(f"bench name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
                         f"rename {where}")
    return BENCHES.register(cls.name)(cls)


@dataclass(frozen=True)
class Option:
    """A bench's own setting; the CLI turns it into ``--name-with-dashes``.

    ``default`` is what the bench uses when the option is not given (None: nothing, e.g. the
    synthetic data); ``choices`` restricts the value; ``flag`` makes a boolean switch.
    """

    name: str
    help: str
    choices: tuple[str, ...] | None = None
    default: Any = None
    flag: bool = False

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Sample:
    """One thing to ask the model: its id (unique in a run), split, question and bench data."""

    id: str
    split: str
    question: str
    data: Any = field(repr=False, compare=False)

    def load_image(self) -> Any:
        return self.data.load_image()


@dataclass(frozen=True)
class Prompting:
    """How one split is asked: user-turn template (``{question}``), system prompt, generation
    settings for ``generate()`` (``stop`` strings cut the decoded text) and seed."""

    template: str = "{question}"
    system_prompt: str | None = None
    generation: Mapping[str, Any] = field(default_factory=lambda: {"max_new_tokens": 32, "do_sample": False,
                                                                     "num_beams": 1})
    seed: int = 0


class Bench:
    """Base class of a benchmark. Subclasses set the class attributes and implement the methods
    that raise ``NotImplementedError``; ``self.split`` and ``self.opts`` hold the validated settings.

    Class attributes:
        name: the registry key: the ``--bench`` value, and the name results record.
        description: one line for ``lvlm-fix list``.
        splits: accepted ``--split`` values; with more than one, ``all`` means every one.
            Empty: the bench takes no split.
        default_split: used when ``--split`` is not given.
        options: the bench's own settings (data sources, modes, parsers).
        record_keys: keys every stored record must have (others are redone on resume).
        id_keys / text_keys: candidate keys of a file of existing outputs (``lvlm-fix score``).
        frontiers: (x, y) metric pairs whose trade-off across settings ``lvlm-fix report`` plots.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()
    default_split: ClassVar[str | None] = None
    options: ClassVar[tuple[Option, ...]] = ()
    record_keys: ClassVar[tuple[str, ...]] = ("id",)
    id_keys: ClassVar[tuple[str, ...]] = ("id",)
    text_keys: ClassVar[tuple[str, ...]] = ("text",)
    # Pairs of metrics (x, y) whose trade-off across settings `lvlm-fix report` plots, e.g. recall vs CHAIR_I.
    frontiers: ClassVar[tuple[tuple[str, str], ...]] = ()

    scoring = False
    """True when the bench scores answers generated elsewhere (``lvlm-fix score``)."""

    def __init__(self, split: str | None = None, **opts: Any) -> None:
        self.split = split if split is not None else self.default_split
        self.given = {k for k, v in opts.items() if v is not None}
        self.opts = {o.name: opts[o.name] if opts.get(o.name) is not None else o.default for o in self.options}

    @property
    def split_names(self) -> list[str]:
        """The splits this run covers, in order."""
        if not self.splits:
            return []
        return list(self.splits) if self.split == "all" else [str(self.split)]

    # -- to implement ---------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What every result must name (mode, parser, preset, versions, hashes)."""
        return {}

    def caveat(self) -> str:
        """A line printed above the table (comparability warnings)."""
        return ""

    def valid(self, record: dict[str, Any]) -> bool:
        """Whether a stored record is complete (else it is set aside and its sample redone)."""
        return all(k in record for k in self.record_keys)

    def load(self, limit: int | None, seed: int) -> tuple[list[Sample], dict[str, Any]]:
        """The samples (``limit`` per split) and a description of the data (ids, sha256, size)."""
        raise NotImplementedError

    def prompting(self, split: str) -> Prompting:
        """How the samples of ``split`` are asked."""
        return Prompting()

    def record(self, sample: Sample, text: str) -> dict[str, Any]:
        """The stored record of one answer, scores included (must carry ``"id": sample.id``)."""
        raise NotImplementedError

    def aggregate(self, split: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Metrics of one split's records (JSON-ready)."""
        raise NotImplementedError

    def stats(self, split: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """Metric functions over :meth:`values` arrays (for CIs and paired tests), ``(..., n, k)``."""
        return {}

    def values(self, split: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Per-sample array that :meth:`stats` functions reduce."""
        raise NotImplementedError

    def overall(self, rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """Metrics across splits for one method (e.g. POPE's average), from the split rows."""
        return {}

    def table(self, summary: dict[str, Any]) -> list[str]:
        """Markdown table lines of the comparison."""
        raise NotImplementedError

    def read_outputs(self, path: Path, id_key: str | None, text_key: str | None,
                     label_key: str | None) -> tuple[list[Sample], dict[str, str], dict[str, Any]]:
        """Existing outputs for ``lvlm-fix score``: the samples, their texts by sample id, and the
        description of the data they are scored against."""
        raise ConfigError(f"lvlm-fix score does not support --bench {self.name}")


def make_bench(name: str, split: str | None = None, **options: Any) -> Bench:
    """Validate a bench name, its split and options; return the configured bench.

    Raises:
        UnknownNameError: For an unknown bench.
        ConfigError: For a split or option the bench does not take, or a value outside its choices.
    """
    cls = BENCHES.get(name)
    known = {o.name: o for o in cls.options}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in known:
            flags = ", ".join(o.cli for o in cls.options) or "none"
            raise ConfigError(f"--{key.replace('_', '-')} is not an option of --bench {name} (its options: {flags})")
        opt = known[key]
        if opt.choices and given[key] not in opt.choices:
            raise ConfigError(f"{opt.cli} {given[key]!r} is not one of {', '.join(opt.choices)}")
    if split is not None:
        allowed = [*cls.splits, "all"] if len(cls.splits) > 1 else list(cls.splits)
        if not allowed:
            raise ConfigError(f"--bench {name} takes no --split (got {split!r}); leave it out")
        if split not in allowed:
            raise UnknownNameError(f"{name} split", split, allowed)
    return cls(split, **given)


# -- helpers shared by benches ----------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list file or a JSON-lines file (one object per line)."""
    if not path.is_file():
        raise DataError(f"file not found: {path}; pass an existing .json or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is still UTF-8
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); pass a JSON list "
                            "or one JSON object per line") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg}); pass a JSON list or one JSON "
                                "object per line") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: item {bad + 1} is not a JSON object; each row must be an object")
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def pick_key(path: Path, rows: list[dict[str, Any]], given: str | None, candidates: Sequence[str], what: str,
             flag: str) -> str:
    """The key of ``what`` in ``rows``: ``given``, or the first candidate the first row has."""
    keys = [given] if given else list(candidates)
    key = next((k for k in keys if k in rows[0]), None)
    if key is None:
        raise DataError(f"{path}: the first row has no {what} key {' or '.join(map(repr, keys))} (its keys: "
                        f"{', '.join(map(repr, rows[0]))}); name it with {flag}")
    missing = next((i for i, r in enumerate(rows) if key not in r), None)
    if missing is not None:
        raise DataError(f"{path}: row {missing + 1} has no {key!r} key; every row needs it")
    return key


def row_id(path: Path, index: int, value: Any, key: str) -> str:
    """A row's sample id as text: an integer or a non-empty string. A float or a boolean is refused, not
    rounded or read as 1 (``1.7`` and ``true`` would otherwise both name sample 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}: row {index + 1} has {key}={value!r}; ids must be integers or non-empty strings")
    return str(value)


def ci_cell(row: dict[str, Any], key: str, digits: int = 1) -> str:
    """``value [low, high]`` in % for a metric with a CI in ``row["ci"]``."""
    pct = lambda x: f"{100 * x:.{digits}f}"  # noqa: E731
    ci = row.get("ci", {}).get(key)
    return f"{pct(row[key])} [{pct(ci['low'])}, {pct(ci['high'])}]" if ci else pct(row[key])


def p_cell(row: dict[str, Any], key: str) -> str:
    """The paired-bootstrap p-value vs the baseline (``<0.001`` at 1,000 replicates' floor), or a dash."""
    from .stats import p_text

    vs = row.get("vs_baseline", {})
    return p_text(vs[key]["p_value"], vs[key].get("n_boot", 1000)) if key in vs else "—"
