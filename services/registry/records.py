"""Plain values the service hands out, request checks, and the opaque list page token."""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from loraserve.adapters.errors import shorten

from .errors import InvalidArgument
from .models import AdapterVersionRow

LATEST = "latest"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,99}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}")
MAX_TAG_VALUE = 1000
FORMATS = ("hf", "nemo")


@dataclass(slots=True)
class UploadMeta:
    """What the client says about an artifact before sending its bytes."""

    name: str
    format: str = ""                     # "" = detect, else "hf" | "nemo"
    base_model: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    filename: str = ""
    expected_size: int = 0               # > 0: checked
    expected_digest: str = ""            # "sha256:<hex>": checked
    exist_ok: bool = False               # same bytes already a version of this name: return it

    def check(self) -> None:
        check_name(self.name)
        if self.format and self.format not in FORMATS:
            raise InvalidArgument(f"format must be one of {FORMATS}, got {shorten(self.format, 40)}")
        if len(self.base_model) > 500:
            raise InvalidArgument("base_model is longer than 500 characters")
        if len(self.description) > 10_000:
            raise InvalidArgument("description is longer than 10000 characters")
        check_tags(self.tags)
        for alias in self.aliases:
            check_alias(alias)
        if self.expected_digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", self.expected_digest):
            raise InvalidArgument(f"digest must look like sha256:<64 lowercase hex>, got {shorten(self.expected_digest, 80)}")
        if self.expected_size < 0:
            raise InvalidArgument("size_bytes must be >= 0")


@dataclass(slots=True)
class AdapterRecord:
    """One stored version, as the API shows it."""

    name: str
    version: int
    format: str
    base_model: str
    description: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    num_layers: int
    size_bytes: int
    digest: str
    artifact_type: str
    created_at: datetime
    aliases: list[str]
    tags: dict[str, str]
    is_latest: bool

    @classmethod
    def from_row(cls, row: AdapterVersionRow, name: str, latest_version: int) -> "AdapterRecord":
        return cls(name=name, version=row.version, format=row.format, base_model=row.base_model,
                   description=row.description, rank=row.rank, alpha=row.alpha, use_rslora=row.use_rslora,
                   target_modules=list(row.target_modules), num_layers=row.num_layers, size_bytes=row.size_bytes,
                   digest=row.digest, artifact_type=row.artifact_type, created_at=row.created_at,
                   aliases=sorted(a.alias for a in row.aliases), tags={t.key: t.value for t in row.tags},
                   is_latest=row.version == latest_version)


@dataclass(slots=True)
class UploadResult:
    adapter: AdapterRecord
    deduplicated: bool                   # the bytes were already in the store (under any name)
    existing: bool = False               # exist_ok: `adapter` already had these bytes before this call


def check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"bad adapter name {shorten(name, 120)}: use letters, digits, '.', '_', '-' (optionally "
                              "'org/name'), starting with a letter or digit, at most 100 characters a part")


def check_alias(alias: str) -> None:
    if alias == LATEST:
        raise InvalidArgument("'latest' is implicit (the highest version) and cannot be set")
    if not ALIAS_RE.fullmatch(alias):
        raise InvalidArgument(f"bad alias {shorten(alias, 120)}: start with a letter; letters, digits, '.', '_', '-'")


def check_tags(tags: dict[str, str]) -> None:
    for key, value in tags.items():
        if not TAG_KEY_RE.fullmatch(key):
            raise InvalidArgument(f"bad tag key {shorten(key, 120)}: letters, digits, '.', '_', '/', ':', '-'")
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgument(f"tag {shorten(key, 120)}: value longer than {MAX_TAG_VALUE} characters")


def encode_page_token(name: str, version: int, filters: list[object]) -> str:
    raw = json.dumps({"n": name, "v": version, "f": filters}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filters: list[object]) -> tuple[str, int]:
    """(name, version) of the last item of the previous page; the filters must be the same."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        name, version, old_filters = str(raw["n"]), int(raw["v"]), raw["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("page_token is not one this server issued") from exc
    if old_filters != filters:
        raise InvalidArgument("page_token was issued for different filters; start again without a token")
    return name, version
