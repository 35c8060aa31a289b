"""Artifact files: a deterministic tar of an adapter directory, and archive-type detection.

The registry stores every adapter as one file. A directory (HF PEFT dir, extracted NeMo)
becomes a plain tar with members at the root, sorted, with zeroed owners and times, so the
same directory always gives the same bytes and so the same sha256 (and dedups).
"""
from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

ARTIFACT_SUFFIX = {"tar": ".tar", "tar.gz": ".tar.gz", "zip": ".zip", "nemo": ".nemo"}


class ArchiveError(ValueError):
    """The file or directory cannot become an artifact (the message says why)."""


def tar_directory(src: Path, dest: Path) -> None:
    """Writes `src`'s regular files (recursively) to the tar `dest`, byte-for-byte reproducibly.

    Symlinks and special files are refused rather than followed: an artifact carries only
    its own bytes.
    """
    src = Path(src)
    if not src.is_dir():
        raise ArchiveError(f"{src} is not a directory")
    entries: list[tuple[str, Path, bool]] = []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{rel} is a symbolic link; adapter directories must hold regular files only")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ArchiveError(f"{rel} is not a regular file")
            entries.append((rel, path, stat.S_ISDIR(mode)))
    if not any(not is_dir for _, _, is_dir in entries):
        raise ArchiveError(f"{src} holds no files")
    entries.sort(key=lambda e: e[0])
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path, is_dir in entries:
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if is_dir:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)


def detect_artifact_type(path: Path) -> str:
    """'tar' | 'tar.gz' | 'zip' from the file's magic bytes; never from its name.

    Whether a tar is a NeMo checkpoint ('nemo') is the parser's verdict on its content."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        kind = "tar.gz"
    elif head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        kind = "zip"
    elif len(head) >= 262 and head[257:262] == b"ustar" or _is_old_tar(path):
        kind = "tar"
    else:
        raise ArchiveError("artifact is not an archive: expected a .tar, .tar.gz/.tgz, .zip or .nemo file "
                           f"(first bytes {head[:8].hex() or 'empty'})")
    return kind


def _is_old_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
