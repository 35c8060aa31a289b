"""Downloaded artifact bytes -> the local disk cache: the digest check and the atomic file write (adapter_source.py)."""
from __future__ import annotations

import json
import logging
import os
import tempfile

from loraserve.adapters.bundle import Chunks

from .errors import DigestMismatchError

log = logging.getLogger(__name__)


def check_digest(meta, got: str, size: int | None = None) -> None:
    """Raises DigestMismatchError unless the downloaded bytes hash to meta.digest (and, when size is given,
    are meta.size bytes)."""
    if got != meta.digest or (size is not None and size != meta.size):
        sizes = ("", "") if size is None else (f" ({size})", f" ({meta.size} bytes)")
        raise DigestMismatchError(f"adapter {meta.name!r} v{meta.version}: downloaded bytes{sizes[0]} hash to "
                                  f"{got}, registry announced {meta.digest}{sizes[1]}")


def read_index(path: str) -> list[dict]:
    """The disk cache's index of resolved {name, version} (refs.json): its rows, [] if missing or unreadable."""
    try:
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"name", "version", "digest", "artifact_type",
                                                                            "format"} <= set(r) for r in rows):
            raise ValueError("not a list of resolutions")
        return rows
    except FileNotFoundError:
        return []
    except ValueError as exc:
        log.warning("ignoring unreadable adapter index %s: %s", path, exc)
        return []


def write_index(rows: list[dict], path: str, cache_dir: str) -> None:
    """rows -> the index file, atomically (a temp file renamed)."""
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".refs-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_file(data: Chunks, path: str, cache_dir: str) -> None:
    """data -> path, atomically (a temp file renamed: a crash never leaves a partial artifact)."""
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(data.pieces)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pwrite_all(fd: int, data, at: int) -> None:
    """All of `data` (bytes-like) to the file fd at offset `at` (os.pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
