"""Content-addressed artifact stores: a local directory or an S3 bucket.

Layout (under the local root, or under `s3.prefix` in the bucket):

    blobs/sha256/<64 hex>   committed artifacts, named by the sha256 of their bytes
    tmp/<uuid>              bytes on their way in (S3 only: local uploads stage in tmp/ too)

An upload is received into a local staging file (the parser needs a local path), hashed as
it arrives, validated, then `put` moves it to its blob key: an atomic link on a local disk;
on S3 an upload to tmp/, a check of size and sha256, a server-side copy, and a delete of the
temp key. Identical bytes map to one blob, so a second `put` of them stores nothing.
Nothing under blobs/ is visible to clients until a DB row names it; `gc` removes the rest.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from .config import S3Config

_HEX = re.compile(r"[0-9a-f]{64}")
BLOB_DIR = "blobs/sha256/"
TMP_DIR = "tmp/"


def check_hex(digest_hex: str) -> str:
    if not _HEX.fullmatch(digest_hex):
        raise ValueError(f"not a sha256 hex digest: {digest_hex!r}")
    return digest_hex


RANGES_SUFFIX = ".ranges"  # the range digests beside a blob (range_digests.py)


class ArtifactStore(ABC):
    """Where artifact bytes live. All methods are blocking; the server calls them in threads."""

    staging_dir: Path  # a local directory for incoming files

    def new_staging_path(self) -> Path:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return self.staging_dir / uuid.uuid4().hex

    def list_staging(self) -> list[tuple[str, float]]:
        """(key, mtime) of local staging files, keyed 'staging/<name>'."""
        if not self.staging_dir.is_dir():
            return []
        out = []
        for p in self.staging_dir.iterdir():
            try:
                out.append((f"staging/{p.name}", p.lstat().st_mtime))
            except FileNotFoundError:
                continue  # finished meanwhile
        return out

    def _delete_staging(self, key: str) -> None:
        name = key.removeprefix("staging/")
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad staging key {key!r}")
        path = self.staging_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    @abstractmethod
    def put(self, staged: Path, digest_hex: str, size: int) -> bool:
        """Moves the verified file `staged` to blob `digest_hex`; False if it was already there."""

    @abstractmethod
    def exists(self, digest_hex: str) -> bool: ...

    @abstractmethod
    def read_chunks(self, digest_hex: str, chunk_size: int, offset: int = 0,
                    length: int | None = None) -> Iterator[bytes]:
        """The blob's bytes [offset, offset + length) (None: to the end) in chunks of <= chunk_size."""

    @abstractmethod
    def delete(self, digest_hex: str) -> None: ...

    # the blob's range digests (RANGE_DIGESTS_SUFFIX beside it: range_digests.py); a missing one is None
    def put_ranges(self, digest_hex: str, data: bytes) -> None:
        pass

    def get_ranges(self, digest_hex: str) -> bytes | None:
        return None

    @abstractmethod
    def list_blobs(self) -> list[tuple[str, float]]:
        """(hex digest, last-modified epoch seconds) of every blob."""

    @abstractmethod
    def list_temp(self) -> list[tuple[str, float]]:
        """(opaque key, last-modified epoch seconds) of every temp/staging leftover."""

    @abstractmethod
    def delete_temp(self, key: str) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ArtifactStore):
    """Blobs in a local directory; staging in its tmp/ (same filesystem, so commits are links)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.blob_dir = self.root / BLOB_DIR
        self.staging_dir = self.root / TMP_DIR
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest_hex: str) -> Path:
        return self.blob_dir / check_hex(digest_hex)

    def put(self, staged: Path, digest_hex: str, size: int) -> bool:
        final = self.blob_path(digest_hex)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before any name points at them
        if os.path.getsize(staged) != size:
            raise OSError(f"staged file {staged} has {os.path.getsize(staged)} bytes, expected {size}")
        try:
            os.link(staged, final)  # atomic, and never clobbers: a racing equal upload wins
            created = True
        except FileExistsError:
            created = False
        staged.unlink(missing_ok=True)
        _fsync_dir(self.blob_dir)
        return created

    def exists(self, digest_hex: str) -> bool:
        return self.blob_path(digest_hex).is_file()

    def put_ranges(self, digest_hex: str, data: bytes) -> None:
        path = self.blob_path(digest_hex).with_name(check_hex(digest_hex) + RANGES_SUFFIX)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def get_ranges(self, digest_hex: str) -> bytes | None:
        try:
            return self.blob_path(digest_hex).with_name(check_hex(digest_hex) + RANGES_SUFFIX).read_bytes()
        except FileNotFoundError:
            return None

    def read_chunks(self, digest_hex: str, chunk_size: int, offset: int = 0,
                    length: int | None = None) -> Iterator[bytes]:
        with open(self.blob_path(digest_hex), "rb") as f:
            f.seek(offset)
            left = -1 if length is None else length
            while left and (chunk := f.read(chunk_size if left < 0 else min(chunk_size, left))):
                left -= len(chunk) if left > 0 else 0
                yield chunk

    def delete(self, digest_hex: str) -> None:
        self.blob_path(digest_hex).unlink(missing_ok=True)
        self.blob_path(digest_hex).with_name(check_hex(digest_hex) + RANGES_SUFFIX).unlink(missing_ok=True)

    def list_blobs(self) -> list[tuple[str, float]]:
        return [(p.name, p.stat().st_mtime) for p in self.blob_dir.iterdir() if _HEX.fullmatch(p.name)]

    def list_temp(self) -> list[tuple[str, float]]:
        return self.list_staging()

    def delete_temp(self, key: str) -> None:
        self._delete_staging(key)


def make_s3_client(cfg: S3Config):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or "us-east-1",
                        config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"},
                                          s3={"addressing_style": "path"}))


class S3Store(ArtifactStore):
    """Blobs in an S3 bucket under `prefix`; incoming files stage locally in `staging_dir`."""

    def __init__(self, cfg: S3Config, staging_dir: Path, client=None) -> None:  # type: ignore[no-untyped-def]
        from boto3.s3.transfer import TransferConfig

        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.client = client or make_s3_client(cfg)
        self.staging_dir = Path(staging_dir).resolve()
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.transfer = TransferConfig(multipart_threshold=cfg.multipart_threshold,
                                       multipart_chunksize=cfg.multipart_chunksize, use_threads=True)

    def blob_key(self, digest_hex: str) -> str:
        return f"{self.prefix}{BLOB_DIR}{check_hex(digest_hex)}"

    def put(self, staged: Path, digest_hex: str, size: int) -> bool:
        final = self.blob_key(digest_hex)
        try:
            if self.exists(digest_hex):
                return False
            tmp_key = f"{self.prefix}{TMP_DIR}{uuid.uuid4().hex}"
            extra = {"Metadata": {"sha256": digest_hex}}
            if size < self.cfg.multipart_threshold:
                # Single PUT: S3 itself checks the bytes against the sha256 we send.
                with open(staged, "rb") as f:
                    self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=f,
                                           ChecksumSHA256=base64.b64encode(bytes.fromhex(digest_hex)).decode(),
                                           **extra)
            else:
                self.client.upload_file(str(staged), self.bucket, tmp_key, ExtraArgs=extra, Config=self.transfer)
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=tmp_key)
                if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != digest_hex:
                    raise OSError(f"s3://{self.bucket}/{tmp_key}: stored object does not match the upload")
                self.client.copy({"Bucket": self.bucket, "Key": tmp_key}, self.bucket, final,
                                 ExtraArgs={"MetadataDirective": "COPY"}, Config=self.transfer)
            finally:
                self.client.delete_object(Bucket=self.bucket, Key=tmp_key)
            return True
        finally:
            staged.unlink(missing_ok=True)

    def exists(self, digest_hex: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.blob_key(digest_hex))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_chunks(self, digest_hex: str, chunk_size: int, offset: int = 0,
                    length: int | None = None) -> Iterator[bytes]:
        # a ranged GET (RFC 7233: both ends inclusive) when only part of the object is wanted
        span = {} if offset == 0 and length is None else {
            "Range": f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))}
        if length == 0:
            return
        body = self.client.get_object(Bucket=self.bucket, Key=self.blob_key(digest_hex), **span)["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, digest_hex: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(digest_hex))
        self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(digest_hex) + RANGES_SUFFIX)

    def put_ranges(self, digest_hex: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.blob_key(digest_hex) + RANGES_SUFFIX, Body=data)

    def get_ranges(self, digest_hex: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.blob_key(digest_hex) + RANGES_SUFFIX)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _list(self, sub: str) -> Iterator[tuple[str, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + sub)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):], obj["LastModified"].timestamp()

    def list_blobs(self) -> list[tuple[str, float]]:
        return [(k[len(BLOB_DIR):], t) for k, t in self._list(BLOB_DIR) if _HEX.fullmatch(k[len(BLOB_DIR):])]

    def list_temp(self) -> list[tuple[str, float]]:
        return list(self._list(TMP_DIR)) + self.list_staging()

    def delete_temp(self, key: str) -> None:
        if key.startswith("staging/"):
            self._delete_staging(key)
        elif key.startswith(TMP_DIR) and "/" not in key[len(TMP_DIR):]:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        else:
            raise ValueError(f"bad temp key {key!r}")


def make_store(config) -> ArtifactStore:  # type: ignore[no-untyped-def]
    """The store a RegistryConfig asks for."""
    if config.store == "s3":
        return S3Store(config.s3, staging_dir=config.data_dir / "staging")
    return LocalStore(config.data_dir / "artifacts")


def age_seconds(mtime: float) -> float:
    return time.time() - mtime
