"""Output files written whole or not at all: a temporary file beside the target, renamed over it
once complete (a rename within a folder is atomic), removed if anything fails."""

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def _temporary_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return tmp


def replace_atomically(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path``."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomically(path, lines: Iterable[str]) -> None:
    """Every line of ``lines``, or nothing."""
    write_all_atomically({path: lines})


def write_all_atomically(files: dict) -> None:
    """Each ``path: lines`` of ``files`` written, or none of them: every file goes to a temporary file
    first, and only once all are complete are they renamed into place."""
    done: list[tuple[str, Path]] = []
    try:
        for path, lines in files.items():
            path = Path(path)
            done.append((_temporary_beside(path), path))
            with open(done[-1][0], "w") as f:
                for line in lines:
                    f.write(line + "\n")
        for tmp, path in done:
            os.replace(tmp, path)
    finally:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)
