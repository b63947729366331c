"""The run folder on disk: append-only sample records, fixed settings files, and the folder lock.

Records are JSON lines with a string ``"id"``; they are appended, flushed and fsynced per batch,
so a crash loses at most the batch being written. Reading is forgiving: a line that is not a
record (torn by a kill, a ``{}`` typed by hand, a duplicate) is set aside in ``<file>.dropped``
with a warning, every valid record is kept, and the file is rewritten atomically without it; the
runner then redoes exactly the samples whose record is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, LvlmFixWarning, RunFolderBusyError
from ..files import atomic_write

LOCK_NAME = ".lock"


SETTINGS_KEY = "settings"  # each record's digest of the settings that made it (run.json + its config.json)


def settings_digest(run: Any, config: Any) -> str:
    """The digest a record carries of the settings that made it: the run's (run.json) and its setting's
    (config.json), as they are written (JSON, ``str`` for the rest)."""
    import hashlib

    data = json.loads(json.dumps({"run": run, "config": config}, default=str))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(path: Path, records: dict[str, dict[str, Any]], digest: str, legacy_ok: bool) -> None:
    """Refuse records made with other settings than the ones this run resumes with.

    Editing run.json or a config.json is refused by :func:`fixed_json`; deleting one and resuming with
    other settings is refused here, since every record names the settings that made it. Records of an
    older lvlm-fix carry no digest: they are kept only when both settings files were there to check.
    """
    other = [r for r in records.values()
             if r.get(SETTINGS_KEY) != digest and not (legacy_ok and SETTINGS_KEY not in r)]
    if other:
        raise InputError(f"{path} holds {len(other)} record(s) made with other settings than this run's (was run.json "
                         "or config.json deleted or edited?); use a new --out folder or the original settings")


def read_records(path: Path, valid: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, dict[str, Any]]:
    """Records by id, first occurrence wins. Lines that are not JSON objects with a string ``id``
    accepted by ``valid`` are moved to ``<path>.dropped`` (their samples are redone)."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise InputError(f"{path} is a folder or device, not a samples file; move it away and run again")
    raw = path.read_bytes()
    records: dict[str, dict[str, Any]] = {}
    kept: list[bytes] = []
    dropped: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and valid(rec)):
            dropped.append(line)
        elif rec["id"] in records:
            dropped.append(line)  # a duplicate: the first record stays
        else:
            records[rec["id"]] = rec
            kept.append(line)
    if dropped or (raw and not raw.endswith(b"\n")):
        if dropped:
            with open(path.with_name(path.name + ".dropped"), "ab") as f:
                f.write(b"".join(x + b"\n" for x in dropped))
            warnings.warn(f"{path}: set aside {len(dropped)} unreadable or duplicate line(s) in {path.name}.dropped; "
                          f"kept {len(records)} records, the missing samples are redone", LvlmFixWarning, stacklevel=2)
        atomic_write(path, b"".join(x + b"\n" for x in kept))
    return records


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines, then flush and fsync. A write that fails (a full disk) is undone:
    the file is cut back to its earlier records, so no half-written line is left."""
    data = "".join(json.dumps(rec, ensure_ascii=False, default=str) + "\n" for rec in records).encode()
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


def merge_shards(folder: Path, ids: Sequence[str], valid: Callable[[dict[str, Any]], bool] = lambda r: True,
                 ) -> dict[str, dict[str, Any]]:
    """Fold every process's ``samples.rank<r>.jsonl`` into ``samples.jsonl`` (sample order first,
    then any other records already there), then drop the shards."""
    shards = sorted(folder.glob("samples.rank*.jsonl"))
    merged: dict[str, dict[str, Any]] = {}
    for path in [folder / "samples.jsonl", *shards]:
        for k, v in read_records(path, valid).items():
            merged.setdefault(k, v)
    known = set(ids)
    order = [i for i in ids if i in merged] + [i for i in merged if i not in known]
    atomic_write(folder / "samples.jsonl",
                  "".join(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in order).encode())
    for path in shards:  # the shards stay until the merged file is complete
        path.unlink()
    return merged


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(path, json.dumps(data, indent=1, ensure_ascii=False, default=str).encode())


def read_fixed(path: Path) -> dict[str, Any] | None:
    """A settings file (run.json, config.json) as written, None when absent; a damaged one is one line."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "is a folder" if path.is_dir() else f"is not valid JSON ({type(e).__name__})"
        raise InputError(f"{path} {why}: the settings of the results beside it cannot be checked; restore it, "
                         "or use a new --out folder") from None
    if not isinstance(old, dict):
        raise InputError(f"{path} is not a JSON object: the settings of the results beside it cannot be checked; "
                         "restore it, or use a new --out folder")
    return old


def fixed_json(path: Path, data: dict[str, Any], what: str) -> bool:
    """Write ``data`` once; later runs in the same folder must match it (else :class:`InputError`).
    Returns whether the file was there already (and matched)."""
    new = json.loads(json.dumps(data, default=str))
    old = read_fixed(path)
    if old is not None:
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise InputError(f"{path.parent} holds results of a different {what} (differs in {', '.join(diff)}); "
                             "use a new --out folder or the original settings")
        return True
    write_json(path, new)
    return False


# -- where results go -------------------------------------------------------------------------------
MIN_FREE_BYTES = 1 << 20  # under this a run could not write even its settings: refuse before the work


def check_out_dir(root: Path, option: str = "--out") -> Path:
    """Create ``root`` (a folder for results) and check, before any work, that it can be written: not a
    file, creatable, writable, and on a disk with room left. One line naming the folder and the fix."""
    import shutil
    import tempfile

    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"{option} {root} is a file; give a folder (e.g. {option} {root.parent / (root.stem + '_out')})")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as e:
        raise InputError(f"{option} {root} is not writable ({e.strerror or e}); choose another folder") from None
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise InputError(f"{option} {root}: its disk is full ({free} bytes free); free some space or choose a folder "
                         "on another disk")
    return root


# -- the folder lock -------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold ``<root>/.lock`` (pid, host, start time) while a run writes into ``root``.

    A second run into the same folder is refused with :class:`RunFolderBusyError`. A lock left by
    a process that no longer exists on this host is taken over with a warning; one from another
    host is never guessed at (the message says how to remove it).
    """
    check_out_dir(root)  # a file, an impossible path, a full disk: one line, before any work
    path = root / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = root / f"{LOCK_NAME}.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: fails if a lock exists, and never leaves an empty one
                break
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text())
                    pid, host = int(holder["pid"]), str(holder["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    holder, pid, host = {}, -1, "?"
                if host == me["host"] and (pid == me["pid"] or not _alive(pid)):
                    warnings.warn(f"{path}: taking over a stale lock of process {pid}, which has ended",
                                  LvlmFixWarning, stacklevel=3)
                    path.unlink(missing_ok=True)
                    continue
                raise RunFolderBusyError(
                    f"{root} is in use by process {pid} on {host} since {holder.get('since', '?')}; wait for it to "
                    f"finish or use another --out (if that process is gone, delete {path})") from None
        else:
            raise RunFolderBusyError(f"could not lock {root}; another run keeps taking it, use another --out")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


# -- run-scoped caches a method asks for ------------------------------------------------------------
class RunCache:
    """A key -> JSON value cache for one setting of one run, kept in memory and, with a folder, on disk.

    A method that declares ``run_cache`` (a ``ContextVar`` class attribute, as
    :class:`~lvlm_fix.interventions.mvp.MVP` does) is given one while the runner generates with its
    setting: in memory across the setting's batches,
    and in ``<setting folder>/cache/<method>.jsonl`` (one record per entry, appended and fsynced like
    the samples) so that a resumed run reads back what an interrupted one computed. The keys are the
    method's to choose: they must name everything that changes the value (the folder already belongs
    to one model and one setting, but a key that forgets a setting would still be wrong elsewhere).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            valid = lambda r: "value" in r  # noqa: E731 - a torn or hand-made line is set aside, its entry redone
            self.entries = {k: r["value"] for k, r in read_records(path, valid).items()}

    def get(self, key: str) -> Any | None:
        return self.entries.get(key)

    def put(self, items: dict[str, Any]) -> None:
        """Remember ``items`` (key -> JSON value) and, with a folder, append them to its file."""
        new = {k: v for k, v in items.items() if k not in self.entries}
        self.entries.update(new)
        if self.path is not None and new:
            append_records(self.path, [{"id": k, "value": v} for k, v in new.items()])
