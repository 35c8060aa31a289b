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
    gc_min_age_seconds: float = 3600.0   # temp files/orphans younger than this are left alone
    metrics_port: int = 0                # > 0: Prometheus /metrics on this port (same host as gRPC)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if isinstance(self.s3, dict):
            self.s3 = S3Config(**self.s3)
        _check(self.store in ("local", "s3"), f"store must be 'local' or 's3', got {self.store!r}")
        _check(self.store != "s3" or bool(self.s3.bucket), "store 's3' needs s3.bucket")
        _check(self.max_rank > 0, "max_rank must be > 0")
        _check(self.max_artifact_bytes > 0, "max_artifact_bytes must be > 0")
        _check(16 * KiB <= self.download_chunk_size <= MiB, "download_chunk_size must be in [16 KiB, 1 MiB]")
        _check((self.tls_cert_file is None) == (self.tls_key_file is None),
               "tls_cert_file and tls_key_file go together")
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
