"""Adapters on demand: registry reference -> local disk cache -> engine's host/GPU tiers.

`AdapterFetcher.fetch(name, version, alias)` asks the registry which version a reference
means (GetAdapter), and returns a local artifact path named by its content digest,
downloading it (DownloadAdapter, digest verified before the file appears) only when the
disk cache lacks it. Concurrent fetches of one cold adapter share one download.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

import grpc

from loraserve.registry.archive import ARTIFACT_SUFFIX  # the registry's own artifact file names

from .lora.manager import TierStats

log = logging.getLogger(__name__)



class RegistryUnavailableError(RuntimeError):
    pass


class RegistryAdapterNotFound(LookupError):
    pass


class DigestMismatchError(RuntimeError):
    pass


class RegistryAccessError(PermissionError):
    """The registry refused this server's read token (--registry-token): an operator's fix, not a retry."""


class RegistryRequestError(ValueError):
    """The registry refused the reference itself (INVALID_ARGUMENT there)."""


@dataclass
class FetchedAdapter:
    name: str
    version: int
    digest: str
    path: str
    format: str          # hf | nemo
    downloaded: bool     # False: served from the disk cache


class AdapterFetcher:
    def __init__(self, address: str | None, cache_dir: str, token: str | None = None, timeout_s: float = 30.0,
                 ca_file: str | None = None):
        self.address, self.cache_dir, self.token, self.timeout_s = address, cache_dir, token, timeout_s
        self.ca_file = ca_file
        os.makedirs(cache_dir, exist_ok=True)
        self._channel = None
        self._stub = None
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats = TierStats()  # the disk tier's counters, same shape as the host/GPU tiers

    def _registry(self):
        if self.address is None:
            raise RegistryUnavailableError("no registry is configured (--registry)")
        if self._stub is None:
            from loraserve.v1 import registry_pb2_grpc

            if self.ca_file:
                with open(self.ca_file, "rb") as f:
                    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
                self._channel = grpc.aio.secure_channel(self.address, creds)
            else:
                self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        return self._stub

    @property
    def _metadata(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

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

    async def fetch(self, name: str, version: int = 0, alias: str = "") -> FetchedAdapter:
        from loraserve.v1 import registry_pb2 as pb

        what = f"adapter {name!r}" + (f" version {version}" if version else f" alias {alias!r}" if alias else "")
        try:
            meta = (await self._registry().GetAdapter(pb.GetAdapterRequest(name=name, version=version, alias=alias),
                                                      metadata=self._metadata, timeout=self.timeout_s)).adapter
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, what) from exc
        fmt = "nemo" if meta.format == pb.ADAPTER_FORMAT_NEMO else "hf"
        hexdigest = meta.digest.split(":", 1)[-1]
        path = os.path.join(self.cache_dir, hexdigest + ARTIFACT_SUFFIX.get(meta.artifact_type, ".tar"))
        if os.path.exists(path):
            self.stats.hits += 1
            return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, downloaded=False)
        fut = self._inflight.get(meta.digest)
        if fut is None:  # single flight: the first caller downloads, the others await it
            fut = asyncio.get_running_loop().create_future()
            self._inflight[meta.digest] = fut
            try:
                await self._download(meta, path)
                fut.set_result(True)
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            finally:
                self._inflight.pop(meta.digest, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # mark retrieved
            return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, downloaded=True)
        await asyncio.shield(fut)
        self.stats.hits += 1
        return FetchedAdapter(meta.name, meta.version, meta.digest, path, fmt, downloaded=False)

    async def _download(self, meta, path: str) -> None:
        from loraserve.v1 import registry_pb2 as pb

        self.stats.misses += 1
        sha, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                call = self._registry().DownloadAdapter(
                    pb.DownloadAdapterRequest(name=meta.name, version=meta.version),
                    metadata=self._metadata, timeout=self.timeout_s)
                async for msg in call:
                    if msg.WhichOneof("payload") == "chunk":
                        sha.update(msg.chunk)
                        size += len(msg.chunk)
                        f.write(msg.chunk)
            got = "sha256:" + sha.hexdigest()
            if got != meta.digest:
                raise DigestMismatchError(f"adapter {meta.name!r} v{meta.version}: downloaded bytes hash to {got}, "
                                          f"registry announced {meta.digest}")
            os.replace(tmp, path)
            self.stats.bytes_loaded += size
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, f"download of {meta.name!r} v{meta.version}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
