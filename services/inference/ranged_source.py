"""AdapterFetcher's gRPC ranged downloads (ranged_download.py does the streams): the part that keeps the bytes.

A plain tar of known size is downloaded as parallel byte ranges: into the engine's staging block when
there is one (stage_alloc: the pinned arena on CUDA), its disk copy written as it arrives, and with
LORASERVE_FETCH_OVERLAP handed to the parser while it still arrives (`_land` finishes it); else kept in
memory (Chunks) and written to disk on a thread. The blob side channel (blob_source.py) falls back here.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time

import grpc

from loraserve.adapters.archives import StagedArtifact
from loraserve.adapters.bundle import Chunks

from . import ranged_download
from .download_files import check_digest as _check_digest
from .errors import RegistryUnavailableError

log = logging.getLogger(__name__)


class RangedDownloads:
    """Mixin of AdapterFetcher (its address, timeout_s, stage_alloc, stats, _landing, _ranges, _registry,
    _ranged, _metadata, _translate, _keep, _range_digests_of)."""

    async def _download_ranges(self, meta, path: str, first=None) -> Chunks:
        """_download of a plain tar as parallel byte ranges (ranged_download.py): verified, kept in
        memory and returned; its disk copy is written on a thread meanwhile."""
        loop = asyncio.get_running_loop()
        staged = await loop.run_in_executor(None, self.stage_alloc, meta.size) if self.stage_alloc else None
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-") if staged is not None else (None, None)
        if staged is not None and _settings().FETCH_OVERLAP:
            staged.begin()
            self._landing[meta.digest] = asyncio.ensure_future(self._land(meta, path, staged, fd, tmp, first))
            return staged
        try:
            pieces, got = await self._fetch_ranges(meta, None if staged is None else staged.buf, fd, first)
            if staged is not None:
                fd = self._commit_staged(meta, got, fd, tmp, path)
                return staged
        except BaseException:
            if staged is not None:
                staged.release()
            raise
        finally:
            if fd is not None:
                os.close(fd)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        size = sum(len(p) for p in pieces)
        _check_digest(meta, got, size)
        self.stats.bytes_loaded += size
        return self._keep(meta, path, pieces)

    async def _fetch_ranges(self, meta, dest, fd, first=None, on_landed=None):
        """ranged_download.download_ranges of meta's artifact -> (pieces, "sha256:..."), gRPC and connection
        errors translated (RangesUnsupported propagates)."""
        what = f"download of {meta.name!r} v{meta.version}"
        if self._hasher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="loraserve-download-sha")
            self._placers = ThreadPoolExecutor(2, thread_name_prefix="loraserve-download-place")
            self._verifiers = ThreadPoolExecutor(4, thread_name_prefix="loraserve-download-verify")
        try:
            return await ranged_download.download_ranges(
                self._ranged(), meta, self._metadata, self.timeout_s, _settings().DOWNLOAD_CHUNK, self._hasher, dest=dest, fd=fd,
                place_pool=self._placers, on_landed=on_landed, first=first and first[:2],
                range_sha=first[3] if first else self._range_digests_of(meta.digest), verify_pool=self._verifiers)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, what) from exc
        except ConnectionError as exc:
            raise RegistryUnavailableError(f"{what}: {exc}") from exc

    def _commit_staged(self, meta, got: str, fd: int, tmp: str, path: str) -> None:
        """A staged download is complete: its digest checked, its disk copy (written as it arrived) closed
        and moved into place. Returns None (the caller's fd, now closed)."""
        _check_digest(meta, got)
        os.close(fd)
        os.replace(tmp, path)
        self.stats.bytes_loaded += meta.size
        return None

    async def _land(self, meta, path: str, staged: StagedArtifact, fd: int, tmp: str, first=None) -> None:
        """The rest of an overlapped staged download (its caller already has `staged`): every piece
        into staged.buf and the disk copy as it arrives, then the digest check; staged.finish tells
        the parser the outcome (the error, also raised here, for the single-flight waiters)."""
        t0 = time.perf_counter()
        what = f"download of {meta.name!r} v{meta.version}"
        try:
            try:
                _, got = await self._fetch_ranges(meta, staged.buf, fd, first, on_landed=staged.landed)
            except ranged_download.RangesUnsupported as exc:  # (its parser already has the block: no fallback now)
                log.warning("registry at %s does not serve byte ranges (%s): one stream from now on", self.address, exc)
                self._ranges = False
                raise RegistryUnavailableError(f"{what}: the registry does not serve byte ranges; retry "
                                               f"(one stream from now on)") from exc
            fd = self._commit_staged(meta, got, fd, tmp, path)
            staged.download_s = time.perf_counter() - t0
            staged.finish(None)
        except BaseException as exc:
            staged.finish(exc if isinstance(exc, Exception) else RegistryUnavailableError(f"{what} was cancelled"))
            raise
        finally:
            if fd is not None:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)


def _settings():
    """adapter_source's module (its switches, read when used: tests and benchmarks set them there)."""
    from . import adapter_source

    return adapter_source

