"""Registry configuration: one slotted dataclass that checks itself, loadable from YAML.

Defaults give a self-contained registry under ./var/registry: a SQLite file
(`registry.db`) and a local artifact directory (`artifacts/`). Production points `db_url`
at PostgreSQL (any SQLAlchemy URL) and `store` at S3 (`s3.endpoint_url`, `bucket`, `prefix`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_ADDRESS = "127.0.0.1:50052"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(slots=True)
class S3Config:
    """Where S3-stored artifacts live. Credentials come from boto3's usual chain (env, files)."""

    bucket: str = ""
    prefix: str = "loraserve/"
    endpoint_url: str | None = None      # e.g. http://127.0.0.1:9000 for MinIO; None = AWS
    region: str | None = None
    multipart_threshold: int = 64 * MiB  # artifacts at least this big go up in parts
    multipart_chunksize: int = 16 * MiB
    # GetAdapter(blob_url=true) answers a presigned GET URL of the blob, which the inference side reads
    # in parallel byte ranges straight from S3 (it must reach endpoint_url); off: bytes go through gRPC
    presign_downloads: bool = False

    def __post_init__(self) -> None:
        _check(self.multipart_chunksize >= 5 * MiB, "s3.multipart_chunksize must be >= 5 MiB (S3 minimum part size)")
        _check(self.multipart_threshold >= self.multipart_chunksize,
               "s3.multipart_threshold must be >= s3.multipart_chunksize")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"


@dataclass(slots=True)
class RegistryConfig:
    """Everything `loraserve registry serve` needs.

    auth_token: when set, writes need `authorization: Bearer <auth_token>`.
    read_token: when set, reads need it (or auth_token); when None, reads are open.
    max_rank / max_artifact_bytes: uploads above either are refused with INVALID_ARGUMENT.
    max_unpacked_bytes / max_compression_ratio: an archive whose members declare more content
    (or more than max_artifact_bytes),
    or more content per archive byte, is refused before anything is decompressed (archive bombs);
    the registry has no model to size this from, so it is one total for every adapter.
    serving_dtype: weights (scale folded in) must fit it; float16, the narrowest, fits every engine.
    gc_interval_seconds: how often the server reclaims temp files of crashed uploads older than
    staging_max_age_seconds and orphan blobs older than gc_min_age_seconds (0 = only at start).
    allowed_import_dirs / allowed_import_s3: ImportAdapter may read only below these
    (directories; "s3://bucket/prefix" URIs). Empty = that kind of import is refused.
    """

    data_dir: Path = Path("var/registry")
    db_url: str | None = None            # None = sqlite file data_dir/registry.db
    store: str = "local"                 # "local" | "s3"
    s3: S3Config = field(default_factory=S3Config)
    auth_token: str | None = None
    read_token: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_rank: int = 256
    max_artifact_bytes: int = 4 * GiB
    allowed_import_dirs: list[Path] = field(default_factory=list)
    allowed_import_s3: list[str] = field(default_factory=list)
    download_chunk_size: int = 64 * KiB
    max_unpacked_bytes: int = 2 * GiB    # e.g. Llama-3-8B, every module, rank 256, bf16: 1.3 GiB
    max_compression_ratio: float = 100.0
    serving_dtype: str = "float16"       # float16 | bfloat16 | float32
    gc_min_age_seconds: float = 3600.0   # orphan blobs younger than this are left alone
    gc_interval_seconds: float = 300.0
    staging_max_age_seconds: float = 600.0  # a live upload touches its file every chunk
    metrics_port: int = 0                # > 0: Prometheus /metrics on this port (same host as gRPC)
    # the byte side channel of downloads (blob_http.py): local blobs over HTTP/1.1 with ranges on this
    # port (same host as gRPC; 0 = a free port, for tests; None = off: downloads go through gRPC only);
    # URLs signed with blob_url_key (None = a random key per process: replicas need one shared key)
    # valid for blob_url_ttl_seconds
    blob_port: int | None = None
    blob_url_key: str | None = None
    blob_url_ttl_seconds: float = 300.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if isinstance(self.s3, dict):
            self.s3 = S3Config(**self.s3)
        _check(self.store in ("local", "s3"), f"store must be 'local' or 's3', got {self.store!r}")
        _check(self.store != "s3" or bool(self.s3.bucket), "store 's3' needs s3.bucket")
        _check(self.max_rank > 0, "max_rank must be > 0")
        _check(self.max_artifact_bytes > 0, "max_artifact_bytes must be > 0")
        _check(self.max_unpacked_bytes > 0, "max_unpacked_bytes must be > 0")
        _check(self.max_compression_ratio >= 1, "max_compression_ratio must be >= 1")
        _check(self.serving_dtype in ("float16", "bfloat16", "float32"),
               f"serving_dtype must be float16, bfloat16 or float32, got {self.serving_dtype!r}")
        _check(self.gc_interval_seconds >= 0 and self.staging_max_age_seconds >= 0,
               "gc_interval_seconds and staging_max_age_seconds must be >= 0")
        for what in ("auth_token", "read_token"):  # None = unguarded; "" would silently be the same
            token = getattr(self, what)
            if token is not None:
                _check(bool(token.strip()), f"{what} is empty or whitespace only; give a real token, or none "
                                            "to leave calls unguarded")
                setattr(self, what, token.strip())
        _check(16 * KiB <= self.download_chunk_size <= MiB, "download_chunk_size must be in [16 KiB, 1 MiB]")
        _check((self.tls_cert_file is None) == (self.tls_key_file is None),
               "tls_cert_file and tls_key_file go together")
        _check(self.blob_port is None or 0 <= self.blob_port < 65536, f"blob_port must be in [0, 65535], got {self.blob_port}")
        _check(self.blob_url_ttl_seconds > 0, "blob_url_ttl_seconds must be > 0")
        _check(self.blob_url_key is None or len(self.blob_url_key.strip()) >= 16,
               "blob_url_key must be at least 16 characters (or none: a random key per process)")
        self.allowed_import_dirs = [Path(p).resolve() for p in self.allowed_import_dirs]
        for uri in self.allowed_import_s3:
            _check(uri.startswith("s3://") and len(uri) > 5, f"allowed_import_s3 entries must be s3:// URIs, got {uri!r}")

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RegistryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        _check(not unknown, f"unknown registry config keys: {unknown}")
        return cls(**raw)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "RegistryConfig":
        """Reads a YAML mapping; a top-level `registry:` section is used when present."""
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        _check(isinstance(raw, dict), f"{path}: expected a mapping")
        return cls.from_dict(raw.get("registry", raw))
