"""Adapters on demand: registry reference -> local disk cache -> engine's host/GPU tiers.

`AdapterFetcher.fetch(name, version, alias)` asks the registry which version a reference
means (GetAdapter), and returns a local artifact path named by its content digest,
downloading it (DownloadAdapter, digest verified before the file appears) only when the
disk cache lacks it. Concurrent fetches of one cold adapter share one download.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc

from loraserve.adapters.archives import StagedArtifact
from loraserve.adapters.bundle import Chunks
from loraserve.registry.archive import ARTIFACT_SUFFIX  # the registry's own artifact file names

from .errors import (DigestMismatchError, RegistryAccessError, RegistryAdapterNotFound,  # noqa: F401 - re-exported
                     RegistryRequestError, RegistryUnavailableError)
from .lora.manager import TierStats
from . import ranged_download
from .blob_source import BlobDownloads
from .ranged_source import RangedDownloads
from .download_files import check_digest as _check_digest, read_index as _read_index, write_file as _write_file
from .download_files import write_index as _write_index

log = logging.getLogger(__name__)
# bytes per DownloadAdapter message asked for (the registry clamps it to its largest, 1 MiB by default;
# LORASERVE_DOWNLOAD_CHUNK: measurement override, benchmarks/cold_diag.py)
DOWNLOAD_CHUNK = int(os.environ.get("LORASERVE_DOWNLOAD_CHUNK", 1 << 20))


# a downloaded plain tar is served from memory while its disk copy is written (0: disk first, as before)
FETCH_IN_MEMORY = os.environ.get("LORASERVE_FETCH_IN_MEMORY", "1") != "0"

# a ranged download is copied straight into the engine's staging memory (stage_alloc) and its disk
# copy written as it arrives (LORASERVE_FETCH_STAGED=0: the pieces kept in memory, as before)
FETCH_STAGED = os.environ.get("LORASERVE_FETCH_STAGED", "1") != "0"
# ... and handed to the caller while it still arrives, so the parse runs beside the download (it waits
# for the bytes it reads; nothing parsed is used before the digest checked out). LORASERVE_FETCH_OVERLAP=0: off
FETCH_OVERLAP = os.environ.get("LORASERVE_FETCH_OVERLAP", "1") != "0"
# a {name, version} not in the index is downloaded at once, its first range's first message telling what
# GetAdapter would (a round trip less). LORASERVE_SKIP_RESOLVE=0: GetAdapter first, as before
SKIP_RESOLVE = os.environ.get("LORASERVE_SKIP_RESOLVE", "1") != "0"
# ... and checked range by range on 4 threads against the registry's range digests (computed at upload
# from the verified bytes) instead of one in-order sha256 of the whole artifact (~85 ms for 84 MB on
# the H200 host). LORASERVE_RANGE_CHECKS=0: the whole-artifact hash, as before
RANGE_CHECKS = os.environ.get("LORASERVE_RANGE_CHECKS", "1") != "0"

# A download's threads need the GIL for microseconds per MiB (recv, sha256, hand-on) beside the parser and the event
# loop; at Python's default 5 ms switch interval each such wait can last 5 ms behind a thread in bytecode
# (benchmarks/cold_path.py --vary spin=1, CPU: an 84 MB cold path x5-7 slower, x2-3 at 0.5 ms). AsyncLLM (the
# service's engine thread) lowers it to 0.5 ms for the same reason; a fetcher in an offline LLM process does too.
# LORASERVE_FETCH_SWITCH_INTERVAL_MS=0: the interpreter's setting is left alone
FETCH_SWITCH_INTERVAL_S = float(os.environ.get("LORASERVE_FETCH_SWITCH_INTERVAL_MS", "0.5")) / 1e3

# reconnect soon after a registry restart (gRPC's default backoff grows to 120 s)
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
              ("grpc.max_reconnect_backoff_ms", 2000),
              ("grpc.max_receive_message_length", 16 << 20),  # download chunks larger than gRPC's 4 MiB default
              # the registry may send DATA frames of up to 16 MiB (HTTP/2's default is 16 KiB: 64 frames per
              # 1 MiB chunk); on loopback the 84 MB download went 144 -> 91 ms (benchmarks/cold_diag.py)
              ("grpc.http2.max_frame_size", (16 << 20) - 1)]


@dataclass
class FetchedAdapter:
    name: str
    version: int
    digest: str
    path: str
    format: str          # hf | nemo
    downloaded: bool     # False: served from the disk cache
    resolve_s: float = 0.0   # asking the registry what the reference means (0 when cached)
    download_s: float = 0.0  # download + digest check (+ file write unless in memory; 0 when on disk already)
    # the verified artifact bytes, while its disk copy is still being written (a plain tar downloaded
    # just now): parse these, not the file; None: the file at `path` is complete
    # a StagedArtifact: the bytes in the engine's staging memory, for the caller's parser alone
    data: Chunks | StagedArtifact | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Resolved:
    """What a reference meant: enough to find (or download) the artifact without asking again."""

    name: str
    version: int
    digest: str
    artifact_type: str
    format: str          # hf | nemo
    size: int = 0        # bytes of the artifact (0: unknown, from an older refs.json)


class AdapterFetcher(BlobDownloads, RangedDownloads):
    """Registry outage: versions are immutable, so `{name, version}` found in the disk cache is
    served without asking the registry (the index survives restarts: refs.json in the cache).
    Alias / latest resolutions are cached for `ref_ttl_s`; past that the registry is asked, and
    while it cannot be reached the last resolution is served stale (a warning, `stale_served`).
    A reference never resolved gets RegistryUnavailableError (UNAVAILABLE). Nothing to reset:
    the gRPC channel reconnects by itself when the registry returns."""

    def __init__(self, address: str | None, cache_dir: str, token: str | None = None, timeout_s: float = 30.0,
                 ca_file: str | None = None, ref_ttl_s: float = 5.0, stale_timeout_s: float = 2.0,
                 stage_alloc=None):
        """stage_alloc: nbytes -> StagedArtifact | None (LoRAManager.staging_alloc): a ranged download
        lands there directly, each message at its offset (pinned on CUDA: no read copy afterwards)."""
        self.address, self.cache_dir, self.token, self.timeout_s = address, cache_dir, token, timeout_s
        self.stage_alloc = stage_alloc if FETCH_STAGED else None
        if 0 < FETCH_SWITCH_INTERVAL_S < sys.getswitchinterval():
            sys.setswitchinterval(FETCH_SWITCH_INTERVAL_S)  # (process-wide; see FETCH_SWITCH_INTERVAL_S)
        self.ca_file = ca_file
        self.ref_ttl_s, self.stale_timeout_s = ref_ttl_s, stale_timeout_s
        os.makedirs(cache_dir, exist_ok=True)
        self._channel = None
        self._stub = None
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats = TierStats()  # the disk tier's counters, same shape as the host/GPU tiers
        self.stale_served = 0     # resolutions served from cache because the registry was unreachable
        self.registry_errors = 0  # registry calls that failed as unavailable
        self._index_path = os.path.join(cache_dir, "refs.json")
        self._index_writer, self._index_write = None, None  # (_remember)
        self._pinned: dict[tuple[str, int], _Resolved] = self._load_index()
        self._refs: dict[tuple[str, str], tuple[_Resolved, float]] = {}  # (name, alias or "") -> (what, when)
        self._writing: dict[str, Chunks] = {}   # digest -> verified bytes whose disk copy is being written
        self._writes: dict[str, asyncio.Future] = {}  # digest -> that write
        self._hasher = None  # one worker thread: a ranged download's sha256, in artifact order
        self._landing: dict[str, asyncio.Future] = {}  # digest -> a staged download still arriving (overlap)
        self._ranges = ranged_download.registry_serves_ranges()  # False: stubs older than offset/length
        self._blobs: dict = {}  # digest -> (blob_fetch.BlobTarget, range digests): its bytes over HTTP (blob_source)
        self._scratch: list = []

    def _registry(self):
        if self.address is None:
            raise RegistryUnavailableError("no registry is configured (--registry)")
        if self._stub is None:
            from loraserve.v1 import registry_pb2_grpc

            if self.ca_file:
                with open(self.ca_file, "rb") as f:
                    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
                self._channel = grpc.aio.secure_channel(self.address, creds, options=_RECONNECT)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=_RECONNECT)
            self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
            self._raw = ranged_download.RawDownloads(self._channel)
        return self._stub

    def _ranged(self):
        """What ranged downloads call DownloadAdapter on: the stub, or its raw-split stand-in."""
        stub = self._registry()
        return self._raw if ranged_download.DOWNLOAD_RAW else stub

    @property
    def _metadata(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    async def flush(self) -> None:
        """Waits until the disk copies being written are complete."""
        for task in list(self._writes.values()) + list(self._landing.values()):
            await asyncio.gather(task, return_exceptions=True)
        if self._index_write is not None:
            await asyncio.gather(asyncio.wrap_future(self._index_write), return_exceptions=True)

    async def close(self) -> None:
        """Waits for the disk copies still being written, then closes the channel."""
        await self.flush()
        if self._channel is not None:
            await self._channel.close()
        if self._hasher is not None:
            self._hasher.shutdown(wait=False)
            self._placers.shutdown(wait=False)
            self._verifiers.shutdown(wait=False)
        for pool in (self._blob_pool, self._blob_writer, self._index_writer):
            if pool is not None:
                pool.shutdown(wait=False)

    def _translate(self, exc: grpc.aio.AioRpcError, what: str) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            return RegistryAdapterNotFound(f"{what}: {exc.details()}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return RegistryUnavailableError(f"registry at {self.address} is unavailable: {exc.details()}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return RegistryAccessError(f"the adapter registry refused this server's read token (--registry-token) "
                                       f"for {what}: {code.name}: {exc.details()}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return RegistryRequestError(f"{what}: {exc.details()}")
        return RegistryUnavailableError(f"registry error for {what}: {code.name}: {exc.details()}")

    async def list_adapters(self, page_size: int = 1000) -> list:
        from loraserve.v1 import registry_pb2 as pb

        out, token = [], ""
        try:
            while True:
                resp = await self._registry().ListAdapters(
                    pb.ListAdaptersRequest(page_size=page_size, page_token=token, latest_only=True),
                    metadata=self._metadata, timeout=self.timeout_s)
                out.extend(resp.adapters)
                token = resp.next_page_token
                if not token:
                    return out
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, "list adapters") from exc

    # ---- reference -> what it means (cached; see the class docstring) ---------------------------
    def _path(self, r: _Resolved) -> str:
        return os.path.join(self.cache_dir, r.digest.split(":", 1)[-1] + ARTIFACT_SUFFIX.get(r.artifact_type, ".tar"))

    def _load_index(self) -> dict[tuple[str, int], _Resolved]:
        try:
            return {(r["name"], int(r["version"])): _Resolved(r["name"], int(r["version"]), r["digest"],
                                                              r["artifact_type"], r["format"], int(r.get("size", 0)))
                    for r in _read_index(self._index_path)}
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable adapter index %s: %s", self._index_path, exc)
            return {}

    def _remember(self, r: _Resolved, alias: str, version: int) -> None:
        """Keep a resolution; a new {name, version} also goes to the index file, written on its own thread
        in order (on a slow disk the write cost ms of a cold adapter's path; flush() waits for it)."""
        if version == 0:
            self._refs[(r.name, alias)] = (r, time.monotonic())
        if (r.name, r.version) in self._pinned:
            return
        self._pinned[(r.name, r.version)] = r
        if self._index_writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._index_writer = ThreadPoolExecutor(1, thread_name_prefix="loraserve-adapter-index")
        self._index_write = self._index_writer.submit(_write_index, [vars(x) for x in self._pinned.values()],
                                                      self._index_path, self.cache_dir)

    async def _resolve(self, name: str, version: int, alias: str, what: str) -> _Resolved:
        from loraserve.v1 import registry_pb2 as pb

        if version:
            pinned = self._pinned.get((name, version))
            if pinned is not None and os.path.exists(self._path(pinned)):
                return pinned  # immutable: no registry needed
        cached = None if version else self._refs.get((name, alias))
        if cached is not None and time.monotonic() - cached[1] < self.ref_ttl_s and os.path.exists(self._path(cached[0])):
            return cached[0]
        timeout = self.stale_timeout_s if cached is not None else self.timeout_s
        blob = {"blob_url": True} if self._blob_wanted() else {}  # (its signed URL too: blob_source.py)
        try:
            resp = await self._registry().GetAdapter(pb.GetAdapterRequest(name=name, version=version, alias=alias, **blob),
                                                     metadata=self._metadata, timeout=timeout)
            meta = resp.adapter
        except grpc.aio.AioRpcError as exc:
            err = self._translate(exc, what)
            if isinstance(err, RegistryUnavailableError):
                self.registry_errors += 1
                if cached is not None and os.path.exists(self._path(cached[0])):
                    self.stale_served += 1
                    log.warning("registry unreachable; serving %s as last resolved (%s version %d, %.0f s old): %s",
                                what, cached[0].name, cached[0].version, time.monotonic() - cached[1], exc.details())
                    return cached[0]
            raise err from exc
        r = _Resolved(meta.name, meta.version, meta.digest, meta.artifact_type,
                      "nemo" if meta.format == pb.ADAPTER_FORMAT_NEMO else "hf", meta.size_bytes)
        self._remember(r, alias, version)
        if blob:
            self._note_blob(resp)
        return r

    async def fetch(self, name: str, version: int = 0, alias: str = "") -> FetchedAdapter:
        what = f"adapter {name!r}" + (f" version {version}" if version else f" alias {alias!r}" if alias else "")
        t0 = time.perf_counter()
        first = await self._open_first(name, version, what)  # {name, version} never fetched: no GetAdapter
        meta = first[2] if first is not None else await self._resolve(name, version, alias, what)
        resolve_s = time.perf_counter() - t0
        fmt = meta.format
        path = self._path(meta)
        if first is not None and (os.path.exists(path) or meta.digest in self._writing or meta.digest in self._inflight
                                  or meta.artifact_type != "tar" or meta.size <= 0):
            first[0].cancel()  # the bytes are here already (or are not downloaded as ranges)
            first = None
        writing = self._writing.get(meta.digest)
        if writing is not None:  # downloaded just now, its disk copy not complete yet: the bytes in memory
            self.stats.hits += 1
            return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, False, resolve_s, data=writing)
        if os.path.exists(path):
            self.stats.hits += 1
            return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, False, resolve_s)
        fut = self._inflight.get(meta.digest)
        if fut is None:  # single flight: the first caller downloads, the others await it
            fut = asyncio.get_running_loop().create_future()
            self._inflight[meta.digest] = fut
            t1 = time.perf_counter()
            landing = None
            try:
                data = await self._download(meta, path, first)
                landing = self._landing.get(meta.digest) if isinstance(data, StagedArtifact) else None
                if landing is not None:  # still arriving: waiters wait for the verified file
                    landing.add_done_callback(lambda t, f=fut, d=meta.digest: self._landed(d, f, t))
                else:
                    # waiters share the bytes only if they are read-only (Chunks); a StagedArtifact is the
                    # caller's alone (its parser writes it): they read the file, complete by now
                    fut.set_result(None if isinstance(data, StagedArtifact) else data)
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            finally:
                if landing is None:
                    self._inflight.pop(meta.digest, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # mark retrieved
            return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, True, resolve_s,
                                  time.perf_counter() - t1, data)
        t1 = time.perf_counter()
        data = await asyncio.shield(fut)
        self.stats.hits += 1
        return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, False, resolve_s, time.perf_counter() - t1,
                              data)

    async def _open_first(self, name: str, version: int, what: str):
        """(call, its AdapterVersion, _Resolved) for a {name, version} not in the index: the download's
        first range, whose first message says what GetAdapter would (ranged_download.open_first_range);
        None when the index knows it, or for aliases (their TTL cache is _resolve's) and one-stream setups."""
        if not (version and SKIP_RESOLVE and self._ranges and FETCH_IN_MEMORY and self.address
                and ranged_download.DOWNLOAD_STREAMS > 1) or self._blob_wanted():
            return None  # (with blob URLs: GetAdapter answers the URL in the same round trip)
        pinned = self._pinned.get((name, version))
        if pinned is not None and os.path.exists(self._path(pinned)):
            return None
        from loraserve.v1 import registry_pb2 as pb

        try:
            call, m, rd = await ranged_download.open_first_range(self._ranged(), name, version, self._metadata,
                                                                 self.timeout_s, DOWNLOAD_CHUNK, ranged_download.RANGE_BYTES)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return None  # the resolving path decides (pinned copies, stale aliases, its own error)
            err = self._translate(exc, what)
            if isinstance(err, RegistryUnavailableError):
                self.registry_errors += 1
            raise err from exc
        except ConnectionError as exc:
            raise RegistryUnavailableError(f"{what}: {exc}") from exc
        r = _Resolved(m.name, m.version, m.digest, m.artifact_type, "nemo" if m.format == pb.ADAPTER_FORMAT_NEMO else "hf",
                      m.size_bytes)
        self._remember(r, "", version)
        return call, m, r, (rd if RANGE_CHECKS else None)

    async def _download(self, meta, path: str, first=None) -> Chunks | None:
        """Download, verify the digest, and keep the artifact. A plain tar (what the registry makes
        of a pushed directory) of known size goes into memory and is returned at once, verified;
        its disk copy is written on a thread meanwhile (on a slow disk the write cost more than the
        download: 84 MB, 120-200 ms against 125). Anything else goes to disk first (None)."""
        from loraserve.v1 import registry_pb2 as pb

        self.stats.misses += 1
        in_memory = FETCH_IN_MEMORY and meta.artifact_type == "tar" and meta.size > 0
        blob = self._blob_for(meta) if in_memory else None
        if blob is not None:  # the registry's byte side channel (blob_source.py)
            if first is not None:
                first[0].cancel()
            return await self._download_blob(meta, path, *blob)
        if (in_memory and self._ranges and ranged_download.DOWNLOAD_STREAMS > 1
                and (meta.size > ranged_download.RANGE_BYTES or first is not None)):
            try:
                return await self._download_ranges(meta, path, first)
            except ranged_download.RangesUnsupported as exc:
                log.warning("registry at %s does not serve byte ranges (%s): one stream from now on", self.address, exc)
                self._ranges = False
        if first is not None:
            first[0].cancel()  # (not downloaded as ranges after all)
        sha, size = hashlib.sha256(), 0
        pieces: list[bytes] | None = [] if in_memory else None  # the messages' own bytes, kept as they are
        fd, tmp = (None, None) if in_memory else tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        loop = asyncio.get_running_loop()

        def consume(chunk: bytes) -> None:  # hash (+ write), off the event loop (it serves every stream)
            sha.update(chunk)
            if pieces is None:
                f.write(chunk)

        try:
            with (contextlib.nullcontext() if in_memory else os.fdopen(fd, "wb")) as f:
                call = self._registry().DownloadAdapter(  # 1 MiB chunks: 84 messages for an 84 MB adapter, not 1,300
                    pb.DownloadAdapterRequest(name=meta.name, version=meta.version, chunk_size=DOWNLOAD_CHUNK),
                    metadata=self._metadata, timeout=self.timeout_s)
                pending = None  # chunk k is hashed and kept while chunk k+1 arrives (one at a time: in order)
                try:
                    async for msg in call:
                        if msg.WhichOneof("payload") == "chunk":
                            if pending is not None:
                                await pending
                            pending = loop.run_in_executor(None, consume, msg.chunk)
                            size += len(msg.chunk)
                            if pieces is not None:
                                pieces.append(msg.chunk)
                finally:
                    if pending is not None:
                        await pending
            _check_digest(meta, "sha256:" + sha.hexdigest(), size if in_memory else None)
            self.stats.bytes_loaded += size
            if not in_memory:
                os.replace(tmp, path)
                return None
            return self._keep(meta, path, pieces)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, f"download of {meta.name!r} v{meta.version}") from exc
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _keep(self, meta, path: str, pieces) -> Chunks:
        """Verified bytes kept in memory and returned; their disk copy is written on a thread meanwhile."""
        data = self._writing[meta.digest] = Chunks(pieces)
        task = asyncio.get_running_loop().run_in_executor(None, _write_file, data, path, self.cache_dir)
        self._writes[meta.digest] = task
        task.add_done_callback(lambda t, d=meta.digest: self._wrote(d, t))
        return data

    def _landed(self, digest: str, fut: asyncio.Future, task: asyncio.Future) -> None:
        """An overlapped download ended: settle its single-flight waiters."""
        self._landing.pop(digest, None)
        self._inflight.pop(digest, None)
        err = task.exception() if not task.cancelled() else RegistryUnavailableError(f"download of {digest} was cancelled")
        if not fut.done():
            fut.set_exception(err) if err is not None else fut.set_result(None)
            if err is not None:
                fut.exception()  # mark retrieved (nobody may be waiting)

    def _wrote(self, digest: str, task: asyncio.Future) -> None:
        self._writing.pop(digest, None)
        self._writes.pop(digest, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("writing the disk copy of %s failed (served from memory; fetched again next time): %s",
                        digest, task.exception())

