"""Where the generated docs go: the path a command is told, never one derived from where the package lives."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` as given (a relative one from the current directory), once its folder is known to exist.

    Checked before a matrix runs for minutes, so that a wrong place is refused at once rather than
    written into (a folder is never created: a missing one means the command runs from elsewhere).

    Raises:
        ConfigError: naming the path, when its folder does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: there is no folder {path.parent} here; run from the repository root or "
                          f"pass {flag} PATH")
    return path
