"""AdapterFetcher's use of the registry's byte side channel (blob_fetch.py): the part that decides.

GetAdapter(blob_url=true) answers the version, a short-lived signed URL of its artifact and its range
digests in one round trip (`_note_blob` keeps the URL by digest). A cold artifact with such a URL is
then read by blob_fetch's workers straight into the staging block (the pinned arena on CUDA; plain
memory on CPU), each 4 MiB range handed to the parser only once its digest matched (and copied for the
disk cache, written once the parser released the bytes: DISK_COPY_AFTER_PARSE); the parser runs beside
the download as with the gRPC ranges (LORASERVE_FETCH_OVERLAP).

Fallbacks, so gRPC stays the path that always works: a registry that offers no URL (no --blob-port,
older stubs) is not asked again for BLOB_RETRY_S; a transport failure before any range was handed on
downloads over gRPC into the same block; after that (the parser has read some ranges) it fails with
UNAVAILABLE and the next request retries. A range whose bytes do not match is DigestMismatchError.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from loraserve.adapters.archives import StagedArtifact

from . import blob_fetch
from .download_files import check_digest, pwrite_all
from .errors import RegistryUnavailableError

log = logging.getLogger(__name__)
_SCRATCH_KEPT_BYTES = 256 << 20  # disk-copy buffers up to this size are kept for the next download (2 at most)
BLOB_RETRY_S = 60.0  # how long a registry that offered no blob URL (or whose URL failed) is not asked for one
# the disk copy's writes (84 MB of page-cache copies and dirty pages for the 8B adapter) wait until the parser
# released the staged bytes (StagedArtifact.released: parsed and staged, the request can run), at most this long,
# so they run beside the request's first step, not beside the download and parse it waits for.
# LORASERVE_DISK_COPY_AFTER_PARSE=0: each verified range written as it arrives (as before)
DISK_COPY_AFTER_PARSE = os.environ.get("LORASERVE_DISK_COPY_AFTER_PARSE", "1") != "0"
DISK_COPY_WAIT_S = 2.0


class BlobDownloads:
    """Mixin of AdapterFetcher (its address, ca_file, timeout_s, stage_alloc, stats, _landing, _fetch_ranges,
    _commit_staged)."""

    _blobs: dict
    _blob_pool: ThreadPoolExecutor | None = None
    _blob_writer: ThreadPoolExecutor | None = None
    _scratch: list  # idle disk-copy buffers (_take_scratch)
    blob_downloads = 0   # artifacts that arrived over the blob side channel
    blob_fallbacks = 0   # ... whose URL failed before any byte was used: downloaded over gRPC instead
    _blob_off_until: float = 0.0

    def _blob_wanted(self) -> bool:
        return (blob_fetch.BLOB_HTTP and self.address is not None and time.monotonic() >= self._blob_off_until
                and _stubs_know_blob_urls())

    def _note_blob(self, resp) -> None:
        """Keep the blob URL (and range digests) of a GetAdapter(blob_url=true) answer, by digest."""
        blob = resp.blob if resp.HasField("blob") else None
        rd = resp.range_digests if resp.HasField("range_digests") else None
        digests = (rd.range_bytes, list(rd.sha256)) if rd is not None else None
        if len(self._blobs) > 256:
            self._blobs.clear()
        if blob is None or not blob.url:
            self._blob_off_until = time.monotonic() + BLOB_RETRY_S
            if digests is not None:  # (the gRPC ranges check them one by one too)
                self._blobs[resp.adapter.digest] = (None, digests)
            return
        try:
            target = blob_fetch.BlobTarget.of(blob, self.address, bool(self.ca_file))
        except blob_fetch.BlobUnavailable as exc:
            log.warning("ignoring the registry's blob URL: %s", exc)
            self._blob_off_until = time.monotonic() + BLOB_RETRY_S
            return
        self._blobs[resp.adapter.digest] = (target, digests)

    def _blob_for(self, meta):
        """(BlobTarget, range digests) to download meta's artifact over HTTP, or None."""
        found = self._blobs.get(meta.digest)
        if found is None or found[0] is None or not self._blob_wanted() or meta.artifact_type != "tar" or meta.size <= 0:
            return None
        self._blobs.pop(meta.digest, None)
        if found[0].expires_unix and time.time() > found[0].expires_unix - 5:
            return None
        try:
            blob_fetch.plan(meta.size, found[1], meta.digest)
        except blob_fetch.BlobUnavailable:
            return None  # (no range digests: the gRPC path checks the whole artifact)
        return found

    def _range_digests_of(self, digest: str):
        """The range digests a GetAdapter(blob_url=true) answered for `digest` (for the gRPC ranges), or None."""
        found = self._blobs.pop(digest, None)
        return found[1] if found is not None else None

    async def _download_blob(self, meta, path: str, target, digests) -> StagedArtifact:
        """The artifact as a StagedArtifact: returned at once while it lands (FETCH_OVERLAP), else when done."""
        from .adapter_source import FETCH_OVERLAP

        if self._blob_pool is None:
            self._blob_pool = ThreadPoolExecutor(blob_fetch.BLOB_STREAMS + 2, thread_name_prefix="loraserve-blob")
        loop = asyncio.get_running_loop()
        staged = await loop.run_in_executor(None, self.stage_alloc, meta.size) if self.stage_alloc else None
        if staged is None:  # (no arena: CPU, or no room) plain memory
            staged = StagedArtifact(torch.empty(meta.size, dtype=torch.uint8))
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        staged.begin()
        task = asyncio.ensure_future(self._land_blob(meta, path, staged, fd, tmp, target, digests))
        if FETCH_OVERLAP:
            self._landing[meta.digest] = task
            return staged
        try:
            await task
        except BaseException:
            staged.release()
            raise
        return staged

    async def _land_blob(self, meta, path: str, staged: StagedArtifact, fd: int, tmp: str, target, digests) -> None:
        """Every range into staged.buf, verified, then staged.finish (the parser may use what it parsed); the
        disk copy is written meanwhile from a copy of each verified range (the parser folds scales into
        staged.buf in place) and committed last. Errors are also raised here, for the single-flight waiters."""
        t0 = time.perf_counter()
        what = f"adapter {meta.name!r} v{meta.version}"
        if self._blob_writer is None:
            self._blob_writer = ThreadPoolExecutor(2, thread_name_prefix="loraserve-blob-write")
        scratch = self._take_scratch(meta.size)   # [>= size] uint8: the disk copy's bytes
        src, dst = staged.buf.data_ptr(), scratch.ctypes.data
        writes, handed, finished = [], [0], False
        held: list | None = [] if DISK_COPY_AFTER_PARSE else None  # verified (start, end) not written yet
        lock = threading.Lock()

        def write(start: int, end: int) -> None:
            writes.append(self._blob_writer.submit(pwrite_all, fd, memoryview(scratch)[start:end], start))

        def on_range(start: int, end: int) -> None:  # (a worker thread)
            ctypes.memmove(dst + start, src + start, end - start)  # (releases the GIL) before the parser may fold it
            handed[0] += 1
            staged.landed(start, end)
            with lock:
                if held is not None:
                    held.append((start, end))
                    return
            write(start, end)

        async def write_held() -> None:
            """The held ranges written once the parser released the bytes (or DISK_COPY_WAIT_S passed)."""
            nonlocal held
            if held is None:
                return
            if not staged.released.is_set():
                await asyncio.to_thread(staged.released.wait, DISK_COPY_WAIT_S)
            with lock:
                ranges, held = held, None
            for start, end in ranges:
                write(start, end)

        try:
            try:
                await blob_fetch.fetch_ranges(target, meta.size, digests, meta.digest, staged.buf, self._blob_pool,
                                              on_range, timeout_s=self.timeout_s, ssl_context=self._blob_tls(),
                                              what=what)
                got = meta.digest
            except blob_fetch.BlobUnavailable as exc:
                self._blob_off_until = time.monotonic() + BLOB_RETRY_S
                if handed[0]:  # the parser may have read (and folded) ranges: no second copy over them
                    raise RegistryUnavailableError(f"download of {what} over HTTP failed midway: {exc}") from exc
                log.warning("the registry's blob URL failed (%s); downloading %s over gRPC (for %.0f s)", exc, what,
                            BLOB_RETRY_S)
                self.blob_fallbacks += 1
                _, got = await self._fetch_ranges(meta, staged.buf, fd, None, on_landed=staged.landed)
            else:
                self.blob_downloads += 1
            check_digest(meta, got)
            staged.download_s = time.perf_counter() - t0
            staged.finish(None)
            finished = True
            await write_held()
            await asyncio.gather(*(asyncio.wrap_future(w) for w in writes))
            fd = self._commit_staged(meta, got, fd, tmp, path)
        except BaseException as exc:
            if not finished:
                staged.finish(exc if isinstance(exc, Exception) else
                              RegistryUnavailableError(f"download of {what} was cancelled"))
            await asyncio.gather(*(asyncio.wrap_future(w) for w in writes), return_exceptions=True)
            raise
        finally:
            if all(w.done() for w in writes) and scratch.nbytes <= _SCRATCH_KEPT_BYTES and len(self._scratch) < 2:
                self._scratch.append(scratch)
            if fd is not None:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _take_scratch(self, nbytes: int) -> np.ndarray:
        """A buffer of >= nbytes for a disk copy, reused across downloads (a fresh 84 MB one costs ~20k page
        faults inside the workers' copies); the largest one kept that fits, else a new one."""
        fits = [b for b in self._scratch if b.nbytes >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.nbytes)
            self._scratch.remove(best)
            return best
        if self._scratch:  # (too small: dropped, so at most one grows per concurrent download)
            self._scratch.pop(0)
        return np.empty(nbytes, dtype=np.uint8)

    def _blob_tls(self):
        if not self.ca_file:
            return None
        import ssl

        return ssl.create_default_context(cafile=self.ca_file)


def _stubs_know_blob_urls() -> bool:
    from loraserve.v1 import registry_pb2 as pb

    return "blob_url" in pb.GetAdapterRequest.DESCRIPTOR.fields_by_name
