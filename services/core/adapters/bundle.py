"""Read-only access to the files of an adapter artifact, whatever its packaging.

An artifact is a directory, a weights file that sits beside its config, or an archive
(.tar, .tar.gz/.tgz, .nemo = tar, .zip). Archives are treated as untrusted uploads: members are
read into memory, never extracted, and absolute paths, '..' components, symlinks, hardlinks,
sparse and device files are rejected.

Archive bombs are refused before they cost memory or time (`ArchiveLimits`): every member's
declared size is checked against a per-member and a total limit and against a compression
ratio (unpacked bytes per archive byte) before a byte of it is decompressed; decompression runs
in 1 MiB chunks through a counter that stops at the same limits, so headers that tarfile reads
whole (pax, GNU long names) and zip entries that lie about their size are bounded too.
`ArchiveLimits.for_model` sizes the limits from what a LoRA of max_lora_rank can need for the
served model; the registry, which has no model, uses a configured total. The archive readers
live in archives.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .archives import (_ARCHIVE_ERRORS, MAX_MEMBERS, ROOT_MARKERS, WEIGHT_SUFFIXES, Alloc, Chunks,  # noqa: F401
                       GiB, MiB, _Budget, _read_plain_tar_bytes, _read_tar, _read_zip, _strip_single_top_folder,
                       _unreadable, safe_member_name, writable_buffer)
from .errors import AdapterFormatError, clip, shorten


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """How much an archive may unpack to; every limit is checked before the bytes are produced.

    max_total_bytes: all members together, unpacked. max_member_bytes: one member (None = total).
    max_ratio: unpacked bytes per archive byte (trained LoRA weights compress ~1.1-3x; a deflate
    bomb of zeros is ~1000x); not applied while the unpacked total is under ratio_free_bytes, so
    small all-zero test adapters still load.
    """

    max_total_bytes: int = 2 * GiB
    max_member_bytes: int | None = None
    max_ratio: float = 100.0
    ratio_free_bytes: int = 16 * MiB
    max_members: int = MAX_MEMBERS

    def __post_init__(self) -> None:
        if self.max_total_bytes <= 0 or (self.max_member_bytes is not None and self.max_member_bytes <= 0):
            raise ValueError("archive limits must be > 0")
        if not self.max_ratio >= 1:
            raise ValueError(f"max_ratio must be >= 1, got {self.max_ratio}")

    @property
    def member_limit(self) -> int:
        return self.max_total_bytes if self.max_member_bytes is None else min(self.max_member_bytes,
                                                                              self.max_total_bytes)

    @classmethod
    def for_model(cls, module_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int,
                  **overrides) -> "ArchiveLimits":
        """Limits that admit any LoRA of rank <= max_rank on every module of the model, stored in fp32.

        module_shapes: HF module -> (in_features, out_features). Twice the fp32 bytes of all
        factors plus 16 MiB covers fp64 checkpoints, pickle/safetensors framing and configs.
        """
        weights = lora_bytes_bound(module_shapes, num_layers, max_rank)
        total = 2 * weights + 16 * MiB
        return cls(max_total_bytes=total, max_member_bytes=total, **overrides)


def lora_bytes_bound(module_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int,
                     itemsize: int = 4) -> int:
    """Bytes of A [r, in] + B [out, r] for every module and layer at rank max_rank."""
    return num_layers * max_rank * itemsize * sum(i + o for i, o in module_shapes.values())


def limits_for(max_bytes: int | None) -> ArchiveLimits:
    """The default limits, with the total capped at max_bytes when given."""
    return ArchiveLimits() if max_bytes is None else ArchiveLimits(max_total_bytes=max_bytes)


class Bundle:
    """Files of one artifact, addressed by relative POSIX path."""

    def __init__(self, origin: str, kind: str):
        self.origin = origin      # shown in error messages (already shortened)
        self.kind = kind          # "dir" | "tar" | "zip"
        self.weights_hint: str | None = None  # a weights file the caller named explicitly
        self.read_s = 0.0                     # seconds spent reading files from disk in read()

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

    def read(self, name: str) -> bytes | memoryview:
        """A weights file read from a plain tar comes as a writable buffer, handed out once: the
        parser owns it (its tensors are views of it; scales are folded into them in place)."""
        if name not in self._files:
            raise AdapterFormatError(f"{self.origin}: missing {name}")
        data = self._files[name]
        if data is None:
            raise RuntimeError(f"{self.origin}: {name} was already handed out to a parser")
        if isinstance(data, memoryview):
            self._files[name] = None
        return data


class DirBundle(Bundle):
    """Files of a directory on disk.

    confine_to: when given (lora_path under --allowed-lora-dir), every file read, symlinks
    resolved, must lie under one of these real directories; a link to a file elsewhere is
    refused without saying where it points.
    """

    def __init__(self, root: Path, origin: str, limits: ArchiveLimits,
                 confine_to: list[str] | None = None, alloc: Alloc | None = None):
        super().__init__(origin, "dir")
        self.root = root
        self._alloc = alloc
        self._limits = limits
        self._confine_to = confine_to
        self._bytes_read = 0

    def names(self) -> list[str]:
        found: list[str] = []
        try:
            for entry in os.scandir(self.root):
                if entry.is_file():
                    found.append(entry.name)
                elif entry.is_dir():  # one level down: mp_rank_00/, or an unpacked archive's folder
                    found.extend(f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path)
                                 if sub.is_file())
        except OSError as exc:
            raise AdapterFormatError(f"{self.origin}: cannot list the adapter directory "
                                     f"({exc.strerror or type(exc).__name__})") from None
        return sorted(found)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes | bytearray:
        """The file's bytes; a weights file's in a fresh writable buffer (tensors may be views of it)."""
        path = self.root / name
        if not path.is_file():
            raise AdapterFormatError(f"{self.origin}: missing {name}")
        if self._confine_to is not None:
            real = os.path.realpath(path)
            if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self._confine_to):
                raise AdapterFormatError(f"{self.origin}: {shorten(name)} is a link to a file outside the "
                                         "allowed adapter directories")
        try:
            size = path.stat().st_size
            self._bytes_read += size
            if size > self._limits.member_limit or self._bytes_read > self._limits.max_total_bytes:
                raise AdapterFormatError(
                    f"{self.origin}: adapter files exceed max_bytes={self._limits.max_total_bytes} "
                    f"({self._bytes_read} bytes with {shorten(name)})")
            t0 = time.perf_counter()
            data = _read_file(path, size, self._alloc if name.endswith(WEIGHT_SUFFIXES) else None)
            self.read_s += time.perf_counter() - t0
            return data if name.endswith(WEIGHT_SUFFIXES) else bytes(data)  # configs: bytes (yaml wants them)
        except OSError as exc:  # permissions, a file removed meanwhile, a directory named *.safetensors
            raise AdapterFormatError(f"{self.origin}: cannot read {shorten(name)} "
                                     f"({exc.strerror or type(exc).__name__})") from None


def _read_file(path: Path, size: int, alloc: Alloc | None = None) -> memoryview:
    """One copy from the page cache into a writable buffer of the size stat() gave (read_bytes()
    would grow a read-only bytes object); a file that changed size meanwhile is read whole anyway."""
    buf = writable_buffer(size, alloc)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            n = f.readinto(buf[got:])
            if not n:
                return buf[:got]
            got += n
        rest = f.read()
    return memoryview(bytearray(buf) + rest) if rest else buf


def open_bundle(path: str | os.PathLike, max_bytes: int | None = None, *, limits: ArchiveLimits | None = None,
                confine_to: list[str] | None = None, alloc: Alloc | None = None,
                data: Chunks | bytes | None = None) -> Bundle:
    """Open `path` (directory, weights file, or archive) as a Bundle; see module docstring.

    limits: archive/size limits (default: `limits_for(max_bytes)`). confine_to: see DirBundle.
    alloc: see writable_buffer (directories and plain tars; other archives decompress into bytes).
    data: the bytes of `path` already in memory (a verified download whose file is still being
    written); a plain tar only. Never modified: the weights are copied out of it.
    """
    limits = limits if limits is not None else limits_for(max_bytes)
    if max_bytes is not None and limits.max_total_bytes > max_bytes:  # the tighter of both wins
        limits = dataclasses.replace(limits, max_total_bytes=max_bytes)
    p = Path(path)
    origin = clip(p.name or str(p))
    if data is not None:
        if max_bytes is not None and len(data) > max_bytes:
            raise AdapterFormatError(f"{origin}: artifact is {len(data)} bytes, over max_bytes={max_bytes}")
        try:
            files = _read_plain_tar_bytes(data, _Budget(limits, len(data), origin), origin, alloc)
        except AdapterFormatError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise _unreadable(origin, e) from None
        return MemoryBundle(_strip_single_top_folder(files), origin, "tar")
    if p.is_dir():
        return DirBundle(p, origin, limits, confine_to, alloc)
    if not p.is_file():
        raise AdapterFormatError(f"{origin}: no such file or directory")
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise AdapterFormatError(f"{origin}: artifact is {size} bytes, over max_bytes={max_bytes}")
    if p.name.endswith(WEIGHT_SUFFIXES):
        bundle = DirBundle(p.parent, origin, limits, confine_to, alloc)
        bundle.weights_hint = p.name
        return bundle
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        files, kind = _read_zip(p, limits, origin), "zip"
    else:
        files, kind = _read_tar(p, limits, origin, alloc), "tar"
    return MemoryBundle(_strip_single_top_folder(files), origin, kind)


class DigestCancelled(Exception):
    """artifact_digest stopped early: the caller no longer wants the digest (e.g. the parse refused
    the artifact, possibly a sparse multi-GB bomb that would otherwise be hashed to the end)."""


def file_sha256(path: Path, cancel: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    # one reused 1 MiB buffer: a fresh bytes object per chunk would, after glibc raises its mmap
    # threshold, be carved from the (hashing thread's) heap and kept by the process
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancel is not None and cancel.is_set():
                raise DigestCancelled(str(path))
            h.update(view[:n])
    return h.hexdigest()


def artifact_digest(path: str | os.PathLike, cancel: threading.Event | None = None) -> str:
    """Content digest "sha256:<hex>".

    A file: sha256 of its bytes. A directory: sha256 over the lines
    "<relative posix path>\\0<file sha256 hex>\\n" of all regular files (symlinks to files are
    hashed by content; symlinked folders are not entered), sorted by path, so the digest does
    not depend on file system order or timestamps. cancel set: stops within 1 MiB (DigestCancelled).
    """
    p = Path(path)
    if p.is_file():
        return "sha256:" + file_sha256(p, cancel)
    if not p.is_dir():
        raise AdapterFormatError(f"{p}: no such file or directory")
    entries: list[tuple[str, str]] = []
    for dirpath, _, filenames in os.walk(p):
        for fn in filenames:
            full = Path(dirpath) / fn
            if full.is_file():
                entries.append((full.relative_to(p).as_posix(), file_sha256(full, cancel)))
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return "sha256:" + h.hexdigest()
