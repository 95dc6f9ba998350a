"""Output files written whole or not at all: a temporary file beside the target, renamed over it
once complete (a rename within a folder is atomic), removed if anything fails; and the fingerprints
that key caches of results by the models that made them."""

import hashlib
import inspect
import json
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


def digest(value) -> str:
    """A short hash of a JSON-serializable value, the same for equal values (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(source) -> dict | str | None:
    """What identifies a model or a verifier, for caches of its results: a checkpoint folder by its
    resolved path and each file's name, size and modification time (a rewritten weight file changes
    it; reading the weights would cost as much as loading them); a callable by its qualified name
    and a hash of its source where Python has it; anything else by its type's name."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        folder = Path(source).resolve()
        listing = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in folder.rglob("*") if p.is_file())
        return {"path": str(folder), "files": digest(listing)}
    if callable(source) and hasattr(source, "__qualname__"):
        try:
            code = digest(inspect.getsource(source))
        except (OSError, TypeError):
            code = None
        return {"callable": f"{source.__module__}:{source.__qualname__}", "source": code}
    return type(source).__qualname__
