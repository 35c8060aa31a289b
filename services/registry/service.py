"""Registry domain logic: upload/import, lookups, delete, aliases, tags, garbage collection.

Blocking code (SQLAlchemy sessions, store I/O, the artifact parser); the gRPC layer runs it
in threads. Commit order is what makes crashes harmless:

    1. bytes -> staging file, sha256 computed on the way in (a crash leaves a temp file)
    2. validate with the shared parser (INVALID_ARGUMENT on any problem)
    3. store.put: the blob appears under blobs/sha256/<hex> (a crash leaves an orphan blob)
    4. one DB transaction allocates the version and inserts the row, tags and aliases

Clients see only rows, and a row exists only after its blob, so no crash point exposes a
half adapter; `gc` removes temp files and orphan blobs later. Versions come from
`adapters.last_version`, bumped under a row lock (BEGIN IMMEDIATE on SQLite), and the
unique (adapter, version) constraint backs it up: racing uploads get distinct versions.
Deleting a version removes its blob once no row names that digest any more.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload

import torch

from loraserve.adapters import AdapterFormatError, LoraAdapter, validate_artifact
from loraserve.adapters.bundle import ArchiveLimits

from . import db, queries
from .archive import ARTIFACT_SUFFIX, ArchiveError, detect_artifact_type
from .config import RegistryConfig
from .errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,  # noqa: F401
                     PermissionDenied, RegistryError)
from .ingest import IncomingArtifact, check_s3_allowed, resolve_allowed_path, stage_path, stage_s3
from .models import Adapter, AdapterAlias, AdapterTag, AdapterVersionRow, utcnow
from .records import AdapterRecord, UploadMeta, UploadResult, check_alias, check_name, check_tags
from . import range_digests
from .store import ArtifactStore, age_seconds, make_s3_client, make_store

log = logging.getLogger(__name__)

_TX_ATTEMPTS = 12
# largest DownloadAdapter chunk (the request's chunk_size is clamped to it); the server's message
# limit is 8 MiB. LORASERVE_REGISTRY_MAX_CHUNK: measurement override (benchmarks/cold_diag.py)
MAX_DOWNLOAD_CHUNK = min(int(os.environ.get("LORASERVE_REGISTRY_MAX_CHUNK", 1 << 20)), 6 << 20)
_LOCK_STRIPES = 64
_RANGED_TTL_S = 10.0  # how long a ranged download's later ranges skip the DB lookup


class Aborted(RegistryError):
    """A transaction kept conflicting with others (-> ABORTED; the client may retry)."""


@dataclass(slots=True)
class GcReport:
    removed_blobs: list[str] = field(default_factory=list)
    removed_temp: list[str] = field(default_factory=list)
    kept_young: int = 0


class RegistryService:
    def __init__(self, config: RegistryConfig, engine: Engine, store: ArtifactStore) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self._sessions = db.session_factory(engine)
        self._blob_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._active_staging: set[str] = set()
        self._active_guard = threading.Lock()
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        # {name, version} -> (record, when) for a ranged download's later ranges (offset > 0): the client
        # asked for range 0 moments ago, and a version's artifact never changes; a delete here drops it
        self._ranged: dict[tuple[str, int], tuple[AdapterRecord, float]] = {}
        self._range_digests: dict[str, tuple[int, list[bytes]] | None] = {}  # digest -> (immutable, as the blob)
        self.blob_server = None  # blob_http.BlobServer when config.blob_port is set (server.create_server)

    @classmethod
    def open(cls, config: RegistryConfig) -> "RegistryService":
        """Engine + migrations to head + store, as the config says."""
        config.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(config.resolved_db_url)
        db.upgrade(engine)
        return cls(config, engine, make_store(config))

    def close(self) -> None:
        self.stop_periodic_gc()
        if self.blob_server is not None:
            self.blob_server.stop()
            self.blob_server = None
        self.engine.dispose()

    def start_periodic_gc(self) -> None:
        """Runs gc() every config.gc_interval_seconds in a daemon thread (0 = never), until close().

        So staging files of uploads that crashed (client gone, registry killed mid-write in another
        replica) are reclaimed while the server runs, not only at its next start."""
        interval = self.config.gc_interval_seconds
        if interval <= 0 or self._gc_thread is not None:
            return

        def loop() -> None:
            while not self._gc_stop.wait(interval):
                try:
                    self.gc()
                except Exception:  # a DB/store hiccup must not end the loop; the next round retries
                    log.exception("periodic gc failed")

        self._gc_thread = threading.Thread(target=loop, name="registry-gc", daemon=True)
        self._gc_thread.start()

    def stop_periodic_gc(self) -> None:
        self._gc_stop.set()
        if self._gc_thread is not None:
            self._gc_thread.join(timeout=10)
            self._gc_thread = None

    # ---- upload / import -------------------------------------------------------------

    def start_upload(self, meta: UploadMeta) -> IncomingArtifact:
        meta.check()
        path = self.store.new_staging_path()
        with self._active_guard:
            self._active_staging.add(path.name)
        return IncomingArtifact(path, self.config.max_artifact_bytes)

    def finish_upload(self, incoming: IncomingArtifact, meta: UploadMeta) -> UploadResult:
        """Validates and commits what `incoming` received; returns (record, deduplicated)."""
        try:
            digest_hex = incoming.close()
            return self._commit(incoming.path, digest_hex, incoming.size, meta, meta.filename)
        finally:
            self.abort_upload(incoming)

    def abort_upload(self, incoming: IncomingArtifact) -> None:
        incoming.discard()
        with self._active_guard:
            self._active_staging.discard(incoming.path.name)

    def import_adapter(self, meta: UploadMeta, source_uri: str) -> UploadResult:
        """Registers an artifact from s3://bucket/key or an allowed server-side path."""
        meta.check()
        if not source_uri:
            raise InvalidArgument("source_uri is required")
        if source_uri.startswith("s3://"):
            bucket, key = check_s3_allowed(source_uri, self.config.allowed_import_s3)
            client = getattr(self.store, "client", None) or make_s3_client(self.config.s3)
            stage = lambda inc: stage_s3(client, bucket, key, inc)  # noqa: E731
        elif "://" in source_uri and not source_uri.startswith("file://"):
            raise InvalidArgument(f"source_uri must be s3://..., file://... or an absolute path, got "
                                  f"{source_uri[:120]!r}")
        else:
            src = resolve_allowed_path(source_uri, self.config.allowed_import_dirs)
            stage = lambda inc: stage_path(src, inc)  # noqa: E731
        incoming = self.start_upload(meta)
        try:
            hint = stage(incoming)
        except BaseException:
            self.abort_upload(incoming)
            raise
        if not meta.filename:
            meta.filename = hint
        return self.finish_upload(incoming, meta)

    def _commit(self, staged: Path, digest_hex: str, size: int, meta: UploadMeta,
                hint: str) -> UploadResult:
        digest = f"sha256:{digest_hex}"
        if size == 0:
            raise InvalidArgument("artifact is empty (no chunks received)")
        if meta.expected_size and meta.expected_size != size:
            raise InvalidArgument(f"received {size} bytes but the metadata announced {meta.expected_size}")
        if meta.expected_digest and meta.expected_digest != digest:
            raise InvalidArgument(f"received bytes hash to {digest}, not the announced {meta.expected_digest}")
        try:
            kind = detect_artifact_type(staged)
        except ArchiveError as exc:
            raise InvalidArgument(str(exc)) from exc
        typed = staged.with_name(staged.name + ARTIFACT_SUFFIX[kind])
        os.rename(staged, typed)  # the parser goes by suffix
        try:
            adapter = self._validate(typed, hint or f"{meta.name}{ARTIFACT_SUFFIX[kind]}")
            if meta.format and adapter.format != meta.format:
                raise InvalidArgument(f"metadata says format {meta.format!r} but the artifact is {adapter.format!r}")
            # decided by content: an HF tar named *.nemo stays "tar"; a NeMo tar is "nemo"
            # (a gzipped one too when the client named it .nemo)
            named_nemo = hint.lower().endswith(".nemo") or meta.format == "nemo"
            artifact_type = "nemo" if adapter.format == "nemo" and (kind == "tar" or named_nemo) else kind
            if (same := self._version_with_digest(meta.name, digest)) is not None:  # early answer, no upload
                return self._already_there(meta, same)
            with self._blob_lock(digest_hex):
                if size > range_digests.RANGE_BYTES:  # from the verified file, before it moves (a sidecar
                    self.store.put_ranges(digest_hex, range_digests.compute(typed))  # alone is harmless)
                created = self.store.put(typed, digest_hex, size)
                try:
                    record = self._insert_version(meta, adapter, digest, size, artifact_type)
                except BaseException as exc:
                    if created:
                        self._delete_blob_if_unreferenced(digest_hex)
                    if isinstance(exc, AlreadyExists) and (same := self._version_with_digest(meta.name, digest)):
                        return self._already_there(meta, same)  # lost a race to an identical upload
                    raise
            log.info("stored %s version %d (%s, %d bytes%s)", record.name, record.version, digest, size,
                     "" if created else ", deduplicated")
            return UploadResult(record, deduplicated=not created)
        finally:
            typed.unlink(missing_ok=True)

    def _validate(self, path: Path, shown_as: str) -> LoraAdapter:
        """The parser's verdict; messages name `shown_as` (the client's file), not the temp file."""
        cfg = self.config
        try:
            adapter = validate_artifact(
                path, max_rank=cfg.max_rank, max_bytes=cfg.max_artifact_bytes,
                limits=ArchiveLimits(max_total_bytes=min(cfg.max_unpacked_bytes, cfg.max_artifact_bytes),
                                     max_ratio=cfg.max_compression_ratio),
                serving_dtype=getattr(torch, cfg.serving_dtype))
        except AdapterFormatError as exc:
            shown = shown_as if len(shown_as) <= 100 else shown_as[:100] + "..."
            raise InvalidArgument(f"invalid adapter artifact: {str(exc).replace(path.name, shown)}") from exc
        if adapter.rank > cfg.max_rank:
            raise InvalidArgument(f"adapter rank {adapter.rank} exceeds the server's max_rank {cfg.max_rank}")
        return adapter

    def _version_with_digest(self, name: str, digest: str) -> AdapterRecord | None:
        with self._sessions() as s:
            row = s.scalar(select(AdapterVersionRow).join(Adapter, Adapter.id == AdapterVersionRow.adapter_id)
                           .where(Adapter.name == name, AdapterVersionRow.digest == digest))
            return None if row is None else queries.record_of(s, row, name)

    @staticmethod
    def _already_there(meta: UploadMeta, same: AdapterRecord) -> UploadResult:
        if not meta.exist_ok:
            raise AlreadyExists(f"{meta.name} version {same.version} already has these exact bytes ({same.digest}); "
                                "push with exist_ok to get that version back instead")
        return UploadResult(same, deduplicated=True, existing=True)

    def _insert_version(self, meta: UploadMeta, adapter: LoraAdapter, digest: str, size: int,
                        artifact_type: str) -> AdapterRecord:
        def insert(s: Session) -> AdapterRecord:
            ad = s.scalar(select(Adapter).where(Adapter.name == meta.name).with_for_update())
            if ad is None:
                ad = Adapter(name=meta.name, last_version=0, created_at=utcnow())
                s.add(ad)
                s.flush()  # a racing creator makes this raise IntegrityError -> retry
            dup = s.scalar(select(AdapterVersionRow.version)
                           .where(AdapterVersionRow.adapter_id == ad.id, AdapterVersionRow.digest == digest))
            if dup is not None:
                raise AlreadyExists(f"{meta.name} version {dup} already has these exact bytes ({digest})")
            ad.last_version += 1
            row = AdapterVersionRow(
                adapter_id=ad.id, version=ad.last_version, format=adapter.format, base_model=meta.base_model,
                description=meta.description, rank=int(adapter.rank), alpha=float(adapter.alpha),
                use_rslora=bool(adapter.use_rslora), target_modules=sorted(adapter.target_modules),
                num_layers=int(adapter.num_layers), size_bytes=size, digest=digest, artifact_type=artifact_type,
                created_at=utcnow(), tags=[AdapterTag(key=k, value=v) for k, v in sorted(meta.tags.items())],
                aliases=[])
            s.add(row)
            s.flush()
            for alias in meta.aliases:
                self._point_alias(s, ad, alias, row)
            s.flush()
            return queries.record_of(s, row, meta.name)

        return self._write(insert)

    def _write(self, fn):  # type: ignore[no-untyped-def]
        """Runs fn(session) in a transaction, retrying conflicts (unique races, locks, deadlocks)."""
        for attempt in range(_TX_ATTEMPTS):
            try:
                with self._sessions.begin() as s:
                    return fn(s)
            except (IntegrityError, OperationalError) as exc:
                if attempt == _TX_ATTEMPTS - 1:
                    raise Aborted(f"database conflict persisted after {_TX_ATTEMPTS} attempts: "
                                  f"{type(exc.orig).__name__}") from exc
                time.sleep(min(0.02 * 2 ** attempt, 1.0))
        raise AssertionError("unreachable")

    # ---- lookups ---------------------------------------------------------------------

    def get(self, name: str, version: int = 0, alias: str = "") -> AdapterRecord:
        with self._sessions() as s:
            row = queries.resolve(s, name, version, alias)
            return queries.record_of(s, row, name)

    def list(self, page_size: int = 0, page_token: str = "", base_model: str = "", name_prefix: str = "",
             latest_only: bool = False) -> tuple[list[AdapterRecord], str]:
        with self._sessions() as s:
            return queries.list_page(s, page_size, page_token, base_model, name_prefix, latest_only)

    def cached_range_digests(self, record: AdapterRecord):
        """range_digests(record) if already read, else False."""
        return self._range_digests.get(record.digest, False)

    def range_digests(self, record: AdapterRecord) -> tuple[int, list[bytes]] | None:
        """The artifact's range digests (range_digests.py), None when it has none; remembered."""
        key = record.digest
        if key not in self._range_digests:
            if len(self._range_digests) > 4096:
                self._range_digests.clear()
            self._range_digests[key] = range_digests.decode(
                self.store.get_ranges(record.digest.removeprefix("sha256:")), record.size_bytes)
        return self._range_digests[key]

    def open_download(self, name: str, version: int = 0, alias: str = "", chunk_size: int = 0,
                      offset: int = 0, length: int = 0) -> tuple[AdapterRecord, Iterator[bytes]]:
        """(the version, its artifact's bytes [offset, offset + length) in chunks); length 0: to the end."""
        if offset < 0 or length < 0:
            raise InvalidArgument(f"offset ({offset}) and length ({length}) must be >= 0")
        cached = self._ranged.get((name, version)) if version > 0 and offset > 0 and not alias else None
        if cached is not None and time.monotonic() - cached[1] < _RANGED_TTL_S:
            # a later range of a download under way: no DB lookup, no store check (~2 ms a range)
            record = cached[0]
            length = min(length, record.size_bytes - offset) if length else 0
            if offset > record.size_bytes:
                raise OutOfRange(f"{name} version {record.version}: offset {offset} lies past the end of its "
                                 f"{record.size_bytes}-byte artifact")
            size = max(16 << 10, min(chunk_size or self.config.download_chunk_size, MAX_DOWNLOAD_CHUNK))
            return record, self.store.read_chunks(record.digest.removeprefix("sha256:"), size, offset,
                                                  length or record.size_bytes - offset)
        record = self.get(name, version, alias)
        if version > 0 and not alias and (offset > 0 or length > 0):
            if len(self._ranged) > 1024:
                self._ranged.clear()
            self._ranged[(name, version)] = (record, time.monotonic())
        if offset > record.size_bytes:
            raise OutOfRange(f"{name} version {record.version}: offset {offset} lies past the end of its "
                             f"{record.size_bytes}-byte artifact")
        length = min(length, record.size_bytes - offset) if length else 0  # (as an HTTP Range: cut at the end)
        digest_hex = record.digest.removeprefix("sha256:")
        if not self.store.exists(digest_hex):
            raise FailedPrecondition(f"{name} version {record.version}: artifact {record.digest} is missing "
                                     "from the store")
        size = chunk_size or self.config.download_chunk_size
        size = max(16 << 10, min(size, MAX_DOWNLOAD_CHUNK))
        if offset == 0 and length == 0:
            return record, self.store.read_chunks(digest_hex, size)
        return record, self.store.read_chunks(digest_hex, size, offset, length or record.size_bytes - offset)

    # ---- writes: delete, aliases, tags -----------------------------------------------

    def delete(self, name: str, version: int = 0, all_versions: bool = False, force: bool = False) -> list[int]:
        """Deletes one version or all; versions carrying aliases need force. Returns the versions."""
        check_name(name)
        self._ranged.clear()
        if version < 0 or (version > 0) == all_versions:
            raise InvalidArgument("give either a version > 0 or all_versions=true")

        def remove(s: Session) -> tuple[list[int], set[str]]:
            ad = s.scalar(select(Adapter).where(Adapter.name == name).with_for_update())
            if ad is None:
                raise NotFound(f"no adapter named {name!r}")
            q = select(AdapterVersionRow).where(AdapterVersionRow.adapter_id == ad.id)
            if version:
                q = q.where(AdapterVersionRow.version == version)
            rows = list(s.scalars(q.options(selectinload(AdapterVersionRow.aliases))))
            if not rows:
                raise NotFound(f"adapter {name!r} has no version {version}" if version else
                               f"adapter {name!r} has no versions left")
            aliased = [(r.version, a.alias) for r in rows for a in r.aliases]
            if aliased and not force:
                v, a = aliased[0]
                raise FailedPrecondition(f"{name} version {v} is aliased as {a!r}; move or delete the alias "
                                         "first, or delete with force")
            for r in rows:
                s.delete(r)
            return sorted(r.version for r in rows), {r.digest for r in rows}

        versions, digests = self._write(remove)
        self._ranged.clear()  # (again: a range may have cached it while the delete ran)
        for digest in digests:
            hex_ = digest.removeprefix("sha256:")
            with self._blob_lock(hex_):
                self._delete_blob_if_unreferenced(hex_)
        return versions

    def set_alias(self, name: str, alias: str, version: int) -> AdapterRecord:
        check_alias(alias)
        if version <= 0:
            raise InvalidArgument("version must be > 0")

        def point(s: Session) -> AdapterRecord:
            row = queries.resolve(s, name, version, "")
            self._point_alias(s, row.adapter, alias, row)
            s.flush()
            return queries.record_of(s, row, name)

        return self._write(point)

    def delete_alias(self, name: str, alias: str) -> None:
        check_name(name)
        check_alias(alias)

        def drop(s: Session) -> None:
            found = s.scalar(select(AdapterAlias).join(Adapter, Adapter.id == AdapterAlias.adapter_id)
                             .where(Adapter.name == name, AdapterAlias.alias == alias))
            if found is None:
                raise NotFound(f"adapter {name!r} has no alias {alias!r}")
            s.delete(found)

        self._write(drop)

    def set_tags(self, name: str, version: int, alias: str, set_: dict[str, str],
                 remove: list[str]) -> AdapterRecord:
        check_tags(set_)

        def update(s: Session) -> AdapterRecord:
            row = queries.resolve(s, name, version, alias)
            by_key = {t.key: t for t in row.tags}
            for key in remove:
                if key in by_key and key not in set_:
                    row.tags.remove(by_key.pop(key))
            for key, value in set_.items():
                if key in by_key:
                    by_key[key].value = value
                else:
                    row.tags.append(AdapterTag(key=key, value=value))
            s.flush()
            return queries.record_of(s, row, name)

        return self._write(update)

    @staticmethod
    def _point_alias(s: Session, ad: Adapter, alias: str, row: AdapterVersionRow) -> None:
        existing = s.scalar(select(AdapterAlias).where(AdapterAlias.adapter_id == ad.id, AdapterAlias.alias == alias))
        if existing is None:
            row.aliases.append(AdapterAlias(adapter_id=ad.id, alias=alias))
        else:
            existing.version_row = row  # an alias moves; it never points at two versions

    # ---- blobs and garbage collection ------------------------------------------------

    @contextmanager
    def _blob_lock(self, digest_hex: str) -> Iterator[None]:
        """Serialises put+insert against delete-if-unreferenced for one digest in this process."""
        with self._blob_locks[int(digest_hex[:8], 16) % _LOCK_STRIPES]:
            yield

    def _delete_blob_if_unreferenced(self, digest_hex: str) -> bool:
        with self._sessions() as s:
            used = s.scalar(select(func.count()).select_from(AdapterVersionRow)
                            .where(AdapterVersionRow.digest == f"sha256:{digest_hex}"))
        if used:
            return False
        self.store.delete(digest_hex)
        return True

    def gc(self, min_age_seconds: float | None = None) -> GcReport:
        """Removes blobs no row names and temp/staging leftovers, if old enough.

        Old enough: min_age_seconds when given (both kinds), else gc_min_age_seconds for blobs and
        staging_max_age_seconds for temp files (an upload writes its file every chunk, so a live
        one stays young). The age guard protects uploads in flight in other processes sharing
        the store; this process's own in-flight uploads are never touched.
        """
        min_age = self.config.gc_min_age_seconds if min_age_seconds is None else min_age_seconds
        temp_age = self.config.staging_max_age_seconds if min_age_seconds is None else min_age_seconds
        report = GcReport()
        with self._sessions() as s:
            referenced = {d.removeprefix("sha256:") for d in s.scalars(select(AdapterVersionRow.digest).distinct())}
        for digest_hex, mtime in self.store.list_blobs():
            if digest_hex in referenced:
                continue
            if age_seconds(mtime) < min_age:
                report.kept_young += 1
                continue
            with self._blob_lock(digest_hex):
                if self._delete_blob_if_unreferenced(digest_hex):
                    report.removed_blobs.append(digest_hex)
        with self._active_guard:
            active = set(self._active_staging)
        for key, mtime in self.store.list_temp():
            if key.rsplit("/", 1)[-1].split(".", 1)[0] in active:
                continue
            if age_seconds(mtime) < temp_age:
                report.kept_young += 1
                continue
            self.store.delete_temp(key)
            report.removed_temp.append(key)
        log.info("gc: removed %d orphan blobs, %d temp files; kept %d too young",
                 len(report.removed_blobs), len(report.removed_temp), report.kept_young)
        return report
