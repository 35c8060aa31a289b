"""Read-only access to the files of an adapter artifact, whatever its packaging.

An artifact is a directory, a weights file that sits beside its config, or an archive
(.tar, .tar.gz/.tgz, .nemo = tar, .zip). Archives are treated as untrusted uploads: members are
read into memory, never extracted, and absolute paths, '..' components, symlinks, hardlinks and
device files are rejected, as are archives whose content exceeds `max_bytes` once unpacked.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from .errors import AdapterFormatError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# A file at the root of an artifact that tells where the artifact's root is.
ROOT_MARKERS = ("adapter_config.json", "model_config.yaml", "model_weights.ckpt")
MAX_MEMBERS = 10_000
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
                   NotImplementedError, RuntimeError, ValueError)


class Bundle:
    """Files of one artifact, addressed by relative POSIX path."""

    def __init__(self, origin: str, kind: str):
        self.origin = origin      # shown in error messages
        self.kind = kind          # "dir" | "tar" | "zip"
        self.weights_hint: str | None = None  # a weights file the caller named explicitly

    def names(self) -> list[str]:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in self.names()

    def read(self, name: str) -> bytes:
        raise NotImplementedError


class MemoryBundle(Bundle):
    """Archive members already read (and size-checked) into memory."""

    def __init__(self, files: dict[str, bytes], origin: str, kind: str):
        super().__init__(origin, kind)
        self._files = files

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        if name not in self._files:
            raise AdapterFormatError(f"{self.origin}: missing {name}")
        return self._files[name]


class DirBundle(Bundle):
    """Files of a directory on disk (operator-supplied, so symlinks to files are followed)."""

    def __init__(self, root: Path, origin: str, max_bytes: int | None):
        super().__init__(origin, "dir")
        self.root = root
        self._max_bytes = max_bytes
        self._bytes_read = 0

    def names(self) -> list[str]:
        found: list[str] = []
        for entry in os.scandir(self.root):
            if entry.is_file():
                found.append(entry.name)
            elif entry.is_dir():  # one level down: mp_rank_00/, or an unpacked archive's folder
                found.extend(f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path)
                             if sub.is_file())
        return sorted(found)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        path = self.root / name
        if not path.is_file():
            raise AdapterFormatError(f"{self.origin}: missing {name}")
        self._bytes_read += path.stat().st_size
        if self._max_bytes is not None and self._bytes_read > self._max_bytes:
            raise AdapterFormatError(
                f"{self.origin}: adapter files exceed max_bytes={self._max_bytes} "
                f"({self._bytes_read} bytes with {name})")
        return path.read_bytes()


def open_bundle(path: str | os.PathLike, max_bytes: int | None = None) -> Bundle:
    """Open `path` (directory, weights file, or archive) as a Bundle; see module docstring."""
    p = Path(path)
    origin = p.name or str(p)
    if p.is_dir():
        return DirBundle(p, origin, max_bytes)
    if not p.is_file():
        raise AdapterFormatError(f"{p}: no such file or directory")
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise AdapterFormatError(f"{origin}: artifact is {size} bytes, over max_bytes={max_bytes}")
    if p.name.endswith(WEIGHT_SUFFIXES):
        bundle = DirBundle(p.parent, origin, max_bytes)
        bundle.weights_hint = p.name
        return bundle
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        files, kind = _read_zip(p, max_bytes, origin), "zip"
    else:
        files, kind = _read_tar(p, max_bytes, origin), "tar"
    return MemoryBundle(_strip_single_top_folder(files), origin, kind)


def safe_member_name(raw: str, origin: str) -> str | None:
    """Normalise an archive member name, rejecting absolute paths and '..'; None for the root."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterFormatError(f"{origin}: archive member {raw!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise AdapterFormatError(f"{origin}: archive member {raw!r} escapes the archive ('..')")
    return "/".join(parts) or None


class _Budget:
    """Counts unpacked bytes against max_bytes (zip/tar bombs)."""

    def __init__(self, max_bytes: int | None, origin: str):
        self.left, self.max_bytes, self.origin = max_bytes, max_bytes, origin

    def take(self, n: int, member: str) -> None:
        if self.left is None:
            return
        self.left -= n
        if self.left < 0:
            raise AdapterFormatError(
                f"{self.origin}: unpacked content exceeds max_bytes={self.max_bytes} "
                f"(at member {member!r})")


def _add_member(files: dict[str, bytes], name: str, data: bytes, origin: str) -> None:
    if name in files:
        raise AdapterFormatError(f"{origin}: archive has two members named {name!r}")
    if len(files) >= MAX_MEMBERS:
        raise AdapterFormatError(f"{origin}: archive has more than {MAX_MEMBERS} members")
    files[name] = data


def _read_tar(path: Path, max_bytes: int | None, origin: str) -> dict[str, bytes]:
    budget = _Budget(max_bytes, origin)
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = safe_member_name(member.name, origin)
                if member.issym() or member.islnk():
                    kind = "symlink" if member.issym() else "hardlink"
                    raise AdapterFormatError(
                        f"{origin}: archive member {member.name!r} is a {kind} "
                        f"(to {member.linkname!r}); links are not allowed")
                if member.isdir() or name is None:
                    continue
                if not member.isreg():
                    raise AdapterFormatError(
                        f"{origin}: archive member {member.name!r} is a device/fifo/special "
                        f"file; only regular files are allowed")
                budget.take(member.size, member.name)
                stream = tar.extractfile(member)
                data = stream.read() if stream is not None else b""
                if len(data) != member.size:
                    raise AdapterFormatError(f"{origin}: archive member {member.name!r} is truncated")
                _add_member(files, name, data, origin)
    except AdapterFormatError:
        raise
    except _ARCHIVE_ERRORS as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise AdapterFormatError(
            f"{origin}: not a readable .tar/.tar.gz/.nemo/.zip archive or adapter file "
            f"({type(e).__name__}: {detail.rstrip(':')})") from None
    return files


def _read_zip(path: Path, max_bytes: int | None, origin: str) -> dict[str, bytes]:
    budget = _Budget(max_bytes, origin)
    files: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = safe_member_name(info.filename, origin)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise AdapterFormatError(
                        f"{origin}: archive member {info.filename!r} is a symlink; links are not allowed")
                if info.is_dir() or name is None:
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise AdapterFormatError(
                        f"{origin}: archive member {info.filename!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise AdapterFormatError(f"{origin}: archive member {info.filename!r} is encrypted")
                budget.take(info.file_size, info.filename)
                with zf.open(info) as stream:
                    # Read at most the declared size + 1 so a lying header cannot inflate memory.
                    data = stream.read(info.file_size + 1)
                if len(data) != info.file_size:
                    raise AdapterFormatError(
                        f"{origin}: archive member {info.filename!r} does not match its declared size")
                _add_member(files, name, data, origin)
    except AdapterFormatError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise AdapterFormatError(
            f"{origin}: not a readable zip archive ({type(e).__name__}: {e})") from None
    return files


def _strip_single_top_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    """Drop macOS junk; if the adapter sits in one top-level folder, make that folder the root."""
    files = {n: d for n, d in files.items() if not n.startswith("__MACOSX/")}
    if any(n in ROOT_MARKERS for n in files):
        return files
    tops = {n.split("/", 1)[0] for n in files}
    if len(tops) == 1 and all("/" in n for n in files):
        cut = len(tops.pop()) + 1
        return {n[cut:]: d for n, d in files.items()}
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_digest(path: str | os.PathLike) -> str:
    """Content digest "sha256:<hex>".

    A file: sha256 of its bytes. A directory: sha256 over the lines
    "<relative posix path>\\0<file sha256 hex>\\n" of all regular files (symlinks to files are
    hashed by content; symlinked folders are not entered), sorted by path, so the digest does
    not depend on file system order or timestamps.
    """
    p = Path(path)
    if p.is_file():
        return "sha256:" + file_sha256(p)
    if not p.is_dir():
        raise AdapterFormatError(f"{p}: no such file or directory")
    entries: list[tuple[str, str]] = []
    for dirpath, _, filenames in os.walk(p):
        for fn in filenames:
            full = Path(dirpath) / fn
            if full.is_file():
                entries.append((full.relative_to(p).as_posix(), file_sha256(full)))
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return "sha256:" + h.hexdigest()
