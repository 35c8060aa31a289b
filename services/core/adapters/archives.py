"""Reading archive members (tar, tar.gz/.nemo, zip) into memory, bounded against bombs, and the
buffers adapter weights are read into. Used by bundle.py (open_bundle); see its docstring for the
safety rules. Plain tars (the registry's artifacts) skip the bomb meter (they cannot unpack to more
than their own bytes): headers through tarfile, each member read once into its own buffer, from a
file or from a download's pieces in memory (Chunks).
"""
from __future__ import annotations

import bisect
import bz2
import gzip
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import AdapterFormatError, shorten

if TYPE_CHECKING:
    from .bundle import ArchiveLimits

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# A file at the root of an artifact that tells where the artifact's root is.
ROOT_MARKERS = ("adapter_config.json", "model_config.yaml", "model_weights.ckpt")
MAX_MEMBERS = 10_000
Alloc = Callable[[int], "torch.Tensor"]  # nbytes -> uint8 CPU tensor (see writable_buffer)
MiB, GiB = 1 << 20, 1 << 30
_CHUNK = 1 * MiB
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, lzma.LZMAError,
                   NotImplementedError, RuntimeError, ValueError, UnicodeDecodeError, OverflowError)


def writable_buffer(size: int, alloc: Alloc | None = None) -> memoryview:
    """`size` uninitialised bytes, writable (bytearray(size) would first zero them: an extra pass
    over 84 MB); a memoryview of a torch-owned array, which the memoryview keeps alive.
    alloc(size) -> uint8 CPU tensor: where weights files go (the engine passes pinned memory on CUDA,
    so the bytes read are already staged for the host->GPU copy)."""
    return memoryview((alloc or _plain)(size).numpy())


def _plain(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8)


def safe_member_name(raw: str, origin: str) -> str | None:
    """Normalise an archive member name, rejecting absolute paths and '..'; None for the root."""
    name = raw.replace("\\", "/")
    if "\0" in name:
        raise AdapterFormatError(f"{origin}: archive member {shorten(raw)} has a NUL byte in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterFormatError(f"{origin}: archive member {shorten(raw)} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise AdapterFormatError(f"{origin}: archive member {shorten(raw)} escapes the archive ('..')")
    return "/".join(parts) or None


class _Budget:
    """Declared member sizes against ArchiveLimits, checked before any of a member is unpacked."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int, origin: str):
        self.limits, self.origin = limits, origin
        self.archive_bytes = archive_bytes
        self.ratio_cap = max(limits.ratio_free_bytes, int(limits.max_ratio * max(archive_bytes, 1)))
        self.total = 0
        self.members = 0

    def take(self, n: int, member: str) -> None:
        lim = self.limits
        self.members += 1
        if self.members > lim.max_members:
            raise AdapterFormatError(f"{self.origin}: archive has more than {lim.max_members} members")
        self.total += n
        if self.total > lim.max_total_bytes:
            raise AdapterFormatError(
                f"{self.origin}: unpacked content exceeds max_bytes={lim.max_total_bytes}, the most an "
                f"adapter may need (at member {shorten(member)})")
        if n > lim.member_limit:
            raise AdapterFormatError(
                f"{self.origin}: archive member {shorten(member)} unpacks to {n} bytes, over the limit of "
                f"{lim.member_limit} bytes for one file of an adapter")
        if self.total > self.ratio_cap:
            raise AdapterFormatError(
                f"{self.origin}: archive of {self.archive_bytes} bytes declares {self.total} bytes of content "
                f"(compression ratio over {lim.max_ratio:g}:1): a decompression bomb, not adapter weights")


class _Meter:
    """A read()-only view of a decompressing stream that stops at the limits.

    tarfile reads pax headers and GNU long names whole, outside any member budget; this caps all
    decompressed bytes (at max_total + 16 MiB of headers) and the running ratio of decompressed
    to compressed bytes consumed so far, so a bomb stops after ratio_free_bytes at most.
    """

    def __init__(self, stream, raw, limits: ArchiveLimits, origin: str):  # type: ignore[no-untyped-def]
        self.stream, self.raw, self.limits, self.origin = stream, raw, limits, origin
        self.cap = limits.max_total_bytes + 16 * MiB
        self.out = 0

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else min(n, _CHUNK)
        data = self.stream.read(n)
        self.out += len(data)
        if self.out > self.cap:
            raise AdapterFormatError(f"{self.origin}: archive unpacks to more than {self.cap} bytes")
        if self.out > self.limits.ratio_free_bytes:
            consumed = max(self.raw.tell(), 1)
            if self.out > self.limits.max_ratio * consumed:
                raise AdapterFormatError(
                    f"{self.origin}: archive content compresses more than {self.limits.max_ratio:g}:1 "
                    f"({self.out} bytes from {consumed}); a decompression bomb, not adapter weights")
        return data


def _decompressing(raw):  # type: ignore[no-untyped-def]
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


def _read_exactly(stream, size: int, member: str, origin: str) -> bytes:  # type: ignore[no-untyped-def]
    """`size` bytes of a member in _CHUNK pieces; refuses a member that is shorter or longer."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        piece = stream.read(min(left, _CHUNK))
        if not piece:
            raise AdapterFormatError(f"{origin}: archive member {shorten(member)} is truncated")
        parts.append(piece)
        left -= len(piece)
    if stream.read(1):
        raise AdapterFormatError(f"{origin}: archive member {shorten(member)} is longer than its declared size")
    return b"".join(parts)


def _add_member(files: dict[str, bytes], name: str, data: bytes, origin: str) -> None:
    if name in files:
        raise AdapterFormatError(f"{origin}: archive has two members named {shorten(name)}")
    files[name] = data


def _unreadable(origin: str, e: BaseException) -> AdapterFormatError:
    """A message for a person: what the archive is not, with the library's first line, cut short."""
    detail = (str(e).splitlines() or [""])[0].rstrip(":")
    detail = detail[:120] + ("..." if len(detail) > 120 else "")
    return AdapterFormatError(f"{origin}: not a readable .tar/.tar.gz/.nemo/.zip archive or adapter file"
                              + (f" ({detail})" if detail else ""))


class Chunks:
    """Bytes held as the pieces they arrived in (a download's 1 MiB messages), never joined: an
    84 MB join is one more pass over fresh memory. Read through `copy_into` / `_ChunkFile`."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.starts = [0]
        for p in pieces:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def copy_into(self, dst: memoryview, pos: int) -> int:
        """Copy bytes from offset `pos` into dst (as many as fit and exist); returns the count."""
        n, k = 0, max(0, bisect.bisect_right(self.starts, pos) - 1)
        while n < len(dst) and k < len(self.pieces):
            piece, off = self.pieces[k], pos + n - self.starts[k]
            take = min(len(piece) - off, len(dst) - n)
            dst[n:n + take] = memoryview(piece)[off:off + take]
            n, k = n + take, k + 1
        return n


from .staged import STAGED_IN_PROGRESS, StagedArtifact, _WaitingFile  # noqa: E402,F401 - re-exported


class _ChunkFile(io.RawIOBase):
    """A read-only, seekable file over Chunks (or any bytes-like): tarfile reads the headers through
    it (a few hundred bytes each) and seeks over the members' data."""

    def __init__(self, data):  # type: ignore[no-untyped-def]
        self.data = data if isinstance(data, Chunks) else Chunks([data if isinstance(data, memoryview) else bytes(data)])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = self.data.copy_into(memoryview(b).cast("B"), self.pos)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else len(self.data) + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def _read_plain_tar_bytes(data, budget: "_Budget", origin: str, alloc: Alloc | None) -> dict[str, bytes | memoryview]:  # type: ignore[no-untyped-def]
    """_read_plain_tar over bytes in memory (Chunks): each weights file is copied once into a fresh
    writable buffer (pinned through `alloc` on CUDA), which the parser then owns; `data` stays untouched.
    A StagedArtifact is the parser's own: its weights files are views of it, not copies."""
    files: dict[str, bytes | memoryview] = {}
    staged = data if isinstance(data, StagedArtifact) else None
    whole = staged.take() if staged is not None else None  # weights: views of it, no copy
    source = _WaitingFile(staged, whole) if staged is not None else _ChunkFile(data)
    with tarfile.open(fileobj=io.BufferedReader(source), mode="r:") as tar:
        for member in tar:
            name = _tar_member_name(member, origin)
            if name is None:
                continue
            budget.take(member.size, member.name)
            if staged is not None:
                start, end = member.offset_data, member.offset_data + member.size
                if end > len(whole):
                    raise AdapterFormatError(f"{origin}: archive member {shorten(member.name)} is truncated")
                if name.endswith(WEIGHT_SUFFIXES):
                    # its header (8-byte length, then JSON) now; the tensors' bytes as the parser needs them
                    staged.wait_for(start, min(end, start + 8))
                    head = int.from_bytes(whole[start:min(end, start + 8)], "little")
                    staged.wait_for(start, min(end, start + 8 + head))
                    _add_member(files, name, whole[start:end], origin)
                else:
                    staged.wait_for(start, end)
                    _add_member(files, name, bytes(whole[start:end]), origin)
                continue
            buf = writable_buffer(member.size, alloc if name.endswith(WEIGHT_SUFFIXES) else None)
            if source.data.copy_into(buf, member.offset_data) != member.size:
                raise AdapterFormatError(f"{origin}: archive member {shorten(member.name)} is truncated")
            _add_member(files, name, buf if name.endswith(WEIGHT_SUFFIXES) else bytes(buf), origin)
    return files


def _tar_member_name(member: tarfile.TarInfo, origin: str) -> str | None:
    """The member's safe name if it is a regular file to read; None for folders (to skip)."""
    name = safe_member_name(member.name, origin)
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        raise AdapterFormatError(
            f"{origin}: archive member {shorten(member.name)} is a {kind} "
            f"(to {shorten(member.linkname)}); links are not allowed")
    if member.isdir() or (name is None and member.size == 0):
        return None
    if member.issparse():
        raise AdapterFormatError(f"{origin}: archive member {shorten(member.name)} is a sparse "
                                 "file; only regular files are allowed")
    if not member.isreg() or name is None:
        raise AdapterFormatError(
            f"{origin}: archive member {shorten(member.name)} is a device/fifo/special "
            f"file; only regular files are allowed")
    return name


def _read_tar(path: Path, limits: ArchiveLimits, origin: str, alloc: Alloc | None = None
              ) -> dict[str, bytes | memoryview]:
    size = path.stat().st_size
    budget = _Budget(limits, size, origin)
    files: dict[str, bytes | memoryview] = {}
    try:
        with open(path, "rb") as raw, _decompressing(raw) as stream:
            if stream is raw:  # a plain tar (the registry's artifacts): headers only, then each member's bytes
                return _read_plain_tar(path, raw, size, budget, origin, alloc)
            # "r|": one forward pass, no seeks (a seek in a gzip stream re-decompresses from the start)
            with tarfile.open(fileobj=_Meter(stream, raw, limits, origin), mode="r|") as tar:
                for member in tar:
                    name = _tar_member_name(member, origin)
                    if name is None:
                        continue
                    budget.take(member.size, member.name)
                    stream_in = tar.extractfile(member)
                    data = _read_exactly(stream_in, member.size, member.name, origin) if stream_in else b""
                    _add_member(files, name, data, origin)
    except AdapterFormatError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise _unreadable(origin, e) from None
    return files


def _read_plain_tar(path: Path, raw, size: int, budget: "_Budget", origin: str,  # type: ignore[no-untyped-def]
                    alloc: Alloc | None) -> dict[str, bytes | memoryview]:
    """An uncompressed tar can unpack to no more than its own bytes, so no bomb meter: tarfile reads
    the headers (seeking over the data) and each member is read once, straight from the file into
    a writable buffer (tensors.py decodes safetensors in it without copying)."""
    files: dict[str, bytes | memoryview] = {}
    with tarfile.open(fileobj=raw, mode="r:") as tar, open(path, "rb", buffering=0) as data_f:
        for member in tar:
            name = _tar_member_name(member, origin)
            if name is None:
                continue
            budget.take(member.size, member.name)
            if member.offset_data + member.size > size:
                raise AdapterFormatError(f"{origin}: archive member {shorten(member.name)} is truncated")
            buf = writable_buffer(member.size, alloc if name.endswith(WEIGHT_SUFFIXES) else None)
            data_f.seek(member.offset_data)
            got = 0
            while got < member.size:
                n = data_f.readinto(buf[got:])
                if not n:
                    raise AdapterFormatError(f"{origin}: archive member {shorten(member.name)} is truncated")
                got += n
            _add_member(files, name, buf if name.endswith(WEIGHT_SUFFIXES) else bytes(buf), origin)
    return files


def _read_zip(path: Path, limits: ArchiveLimits, origin: str) -> dict[str, bytes]:
    budget = _Budget(limits, path.stat().st_size, origin)
    files: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            wanted = []
            for info in infos:  # every declared size is checked before anything is decompressed
                name = safe_member_name(info.filename, origin)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise AdapterFormatError(
                        f"{origin}: archive member {shorten(info.filename)} is a symlink; links are not allowed")
                if info.is_dir() or name is None:
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise AdapterFormatError(
                        f"{origin}: archive member {shorten(info.filename)} is not a regular file")
                if info.flag_bits & 0x1:
                    raise AdapterFormatError(f"{origin}: archive member {shorten(info.filename)} is encrypted")
                budget.take(info.file_size, info.filename)
                wanted.append((name, info))
            for name, info in wanted:
                with zf.open(info) as stream:
                    data = _read_exactly(stream, info.file_size, info.filename, origin)
                _add_member(files, name, data, origin)
    except AdapterFormatError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise _unreadable(origin, e) from None
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
