"""Getting artifact bytes into a local staging file, hashed on the way in.

Three sources: gRPC upload chunks (`IncomingArtifact.write`), a server-side path under an
operator-allowed directory, and an s3:// URI under an allowed prefix. Each ends with a
staging file, its sha256 and its size; nothing is visible to clients yet.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from .archive import ArchiveError, tar_directory
from loraserve.adapters.errors import shorten

from .errors import InvalidArgument, PermissionDenied

COPY_CHUNK = 1 << 20


class IncomingArtifact:
    """A staging file being written; refuses to grow past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._sha = hashlib.sha256()
        self._file = open(path, "xb", buffering=0)  # chunks are 16-64 KiB: no buffer needed

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            raise InvalidArgument(f"artifact is larger than the server's limit of {self.max_bytes} bytes "
                                  "(max_artifact_bytes)")
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        """Flushes and closes; returns the sha256 hex digest of everything written."""
        if not self._file.closed:
            self._file.close()
        return self._sha.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


def copy_in(src, incoming: IncomingArtifact) -> None:  # type: ignore[no-untyped-def]
    """Copies a readable binary stream into `incoming`, hashing as it goes."""
    while chunk := src.read(COPY_CHUNK):
        incoming.write(chunk)


def resolve_allowed_path(uri: str, allowed_dirs: list[Path]) -> Path:
    """The real path named by `uri` ('/abs' or 'file:///abs'), if it lies under an allowed dir.

    Symlinks are resolved first, so a link out of an allowed directory is refused too.
    """
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"file URI must name a local path, got host {shorten(parsed.netloc, 80)}")
        raw = unquote(parsed.path)
    else:
        raw = uri
    if "\0" in raw:
        raise InvalidArgument("import path has a NUL byte")
    if not raw.startswith("/"):
        raise InvalidArgument(f"import path must be absolute, got {shorten(raw, 120)}")
    if not allowed_dirs:
        raise PermissionDenied("importing server-side paths is disabled (no allowed_import_dirs configured)")
    real = Path(raw).resolve()
    if not any(real.is_relative_to(d) for d in allowed_dirs):
        raise PermissionDenied(f"{shorten(raw, 120)} is not under an allowed import directory")
    if not real.exists():  # only said for paths inside an allowed dir: nothing leaks about the rest
        raise InvalidArgument(f"{shorten(raw, 120)} does not exist")
    return real


def stage_path(src: Path, incoming: IncomingArtifact) -> str:
    """Copies a file, or a deterministic tar of a directory, into `incoming`; returns a name hint."""
    if src.is_dir():
        tmp_tar = incoming.path.with_name(incoming.path.name + ".dir.tar")
        try:
            tar_directory(src, tmp_tar)
        except ArchiveError as exc:
            raise InvalidArgument(str(exc)) from exc
        try:
            with open(tmp_tar, "rb") as f:
                copy_in(f, incoming)
        finally:
            tmp_tar.unlink(missing_ok=True)
        return src.name + ".tar"
    if not src.is_file():
        raise InvalidArgument(f"{src} is neither a file nor a directory")
    with open(src, "rb") as f:
        copy_in(f, incoming)
    return src.name


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise InvalidArgument(f"expected s3://bucket/key, got {shorten(uri, 120)}")
    return parsed.netloc, parsed.path.lstrip("/")


def check_s3_allowed(uri: str, allowed: list[str]) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not allowed:
        raise PermissionDenied("importing from S3 is disabled (no allowed_import_s3 configured)")
    normalized = f"s3://{bucket}/{key}"
    for prefix in allowed:
        p = prefix.rstrip("/")
        if normalized == p or normalized.startswith(p + "/"):
            return bucket, key
    raise PermissionDenied(f"{shorten(uri, 120)} is not under an allowed import prefix")


def stage_s3(client, bucket: str, key: str, incoming: IncomingArtifact) -> str:  # type: ignore[no-untyped-def]
    """Streams s3://bucket/key into `incoming`; returns a name hint (the key's basename)."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise InvalidArgument(f"s3://{bucket}/{key} does not exist") from exc
        raise
    if head["ContentLength"] > incoming.max_bytes:
        raise InvalidArgument(f"s3://{bucket}/{key} has {head['ContentLength']} bytes, over the server's limit "
                              f"of {incoming.max_bytes} (max_artifact_bytes)")
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        for chunk in body.iter_chunks(COPY_CHUNK):
            incoming.write(chunk)
    finally:
        body.close()
    return key.rsplit("/", 1)[-1]
