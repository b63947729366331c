"""Sweeps written in a file: ``lvlm-fix eval --sweep sweep.toml``.

Each table of the TOML file is a method spec (a method, or a composition such as ``"vhr+var"``, quoted);
each key one of its parameters; a list value is a grid, and a table's grids multiply. A table with no
keys is one setting (``[none]``, the baseline)::

    [none]
    [vhr]
    alpha = [1.5, 2, 3]          # three settings
    [var]
    tau = 3.5                    # a fixed value
    rho = [0.5, 0.8]             # two settings, each with tau 3.5
    ["vhr+var"]
    "vhr.layers" = [[1]]         # a composition's keys name their method; a list-valued parameter is
    "var.layers" = [[2]]         # a list inside the grid's list

gives ``none, vhr:alpha=1.5, vhr:alpha=2, vhr:alpha=3, var:tau=3.5:rho=0.5, var:tau=3.5:rho=0.8,
vhr:layers=[1]+var:layers=[2]``: the settings of ``--methods``, in the file's order, checked the same way
before any weight is loaded. ``eval`` copies the file into the run folder as ``sweep.toml``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

__all__ = ["SWEEP_FILE", "sweep_specs"]

SWEEP_FILE = "sweep.toml"  # the copy in the run folder


def _value(v: Any, where: str) -> str:
    """A value in the spec grammar (``vhr:alpha=1.5``, lists as ``[1,2]``, booleans true/false)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return "[" + ",".join(map(str, v)) + "]"
    if isinstance(v, str) and v and not set(v) & set(":+,=[]"):
        return v
    raise ConfigError(f"{where} = {v!r} cannot be a method parameter in a sweep file; give a number, true/false, "
                      "a list of integers, or a word without : + , = [ ]")


def _settings(spec: str, table: dict[str, Any]) -> list[str]:
    methods = [m.strip() for m in spec.split("+")]
    if not all(methods):
        raise ConfigError(f"[{spec}] is not a method spec; name a method, or several joined by +")
    keys, grids = [], []
    # an unquoted dotted key (vhr.layers = ...) arrives as a nested table: flatten it back to "vhr.layers"
    flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2 if isinstance(v, dict) else v
            for k, v in table.items() for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)])}
    for key, value in flat.items():
        owner, dot, field = key.rpartition(".")
        if not dot:
            if len(methods) > 1:
                raise ConfigError(f"[{spec}] {key}: in a composition, name the method, e.g. \"{methods[0]}.{key}\"")
            owner, field = methods[0], key
        if owner not in methods:
            raise ConfigError(f"[{spec}] {key}: {owner!r} is not one of this table's methods ({', '.join(methods)})")
        grid = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise ConfigError(f"[{spec}] {key} = []: a grid needs at least one value")
        keys.append((owner, field, key))
        grids.append(grid)
    out = []
    for combo in itertools.product(*grids):
        params: dict[str, list[str]] = {m: [] for m in methods}
        for (owner, field, key), v in zip(keys, combo):
            params[owner].append(f"{field}={_value(v, f'[{spec}] {key}')}")
        out.append("+".join(":".join([m, *params[m]]) for m in methods))
    return out


def sweep_specs(path: str | Path) -> list[str]:
    """The settings a sweep file describes, as ``--methods`` specs, in the file's order (module docstring)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise InputError("reading a sweep file needs Python 3.11 or `pip install tomli`") from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sweep file not found: {p}; pass a TOML file (see `lvlm-fix eval --help`)")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not a TOML file ({e}); write one table per method, e.g. [vhr] alpha = [1.5, 2]") \
            from None
    settings = []
    for spec, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: {spec} = {table!r} is outside a table; put parameters under [METHOD]")
        settings += _settings(spec, table)
    if not settings:
        raise ConfigError(f"{p} names no setting; add a table per method, e.g. [none] and [vhr] alpha = [1.5, 2]")
    return settings
