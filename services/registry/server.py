"""gRPC front of the registry: a thin grpc.aio servicer over RegistryService.

    create_server(config, address) -> (server, port)   bind (port 0 picks one); caller starts it
    serve(config, address)                              run until SIGINT/SIGTERM

Blocking work (DB, store, parser) runs in threads; domain errors become canonical status
codes. Reflection and grpc.health.v1 are always on; writes need a bearer token when the
config has one (auth.BearerAuthInterceptor).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve import ports
from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc as pb_grpc

from . import metrics
from .auth import BearerAuthInterceptor
from .blob_http import BlobServer, BlobSigner
from .config import RegistryConfig
from .errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, PermissionDenied,
                     RegistryError)
from .ingest import IncomingArtifact
from .records import AdapterRecord, UploadMeta
from .service import Aborted, RegistryService
from .store import LocalStore, S3Store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
MAX_MESSAGE_BYTES = 8 << 20
FORMAT_TO_PB = {"hf": pb.ADAPTER_FORMAT_HF, "nemo": pb.ADAPTER_FORMAT_NEMO}
FORMAT_FROM_PB = {pb.ADAPTER_FORMAT_UNSPECIFIED: "", pb.ADAPTER_FORMAT_HF: "hf", pb.ADAPTER_FORMAT_NEMO: "nemo"}
_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
}


def status_for(exc: RegistryError) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def record_to_pb(r: AdapterRecord) -> pb.AdapterVersion:
    msg = pb.AdapterVersion(
        name=r.name, version=r.version, aliases=r.aliases, format=FORMAT_TO_PB[r.format], base_model=r.base_model,
        rank=r.rank, alpha=r.alpha, target_modules=r.target_modules, size_bytes=r.size_bytes, digest=r.digest,
        description=r.description, tags=r.tags, use_rslora=r.use_rslora, num_layers=r.num_layers,
        artifact_type=r.artifact_type, is_latest=r.is_latest)
    msg.created_at.FromDatetime(r.created_at)
    return msg


def meta_from_pb(m: pb.UploadAdapterMetadata) -> UploadMeta:
    if m.format not in FORMAT_FROM_PB:
        raise InvalidArgument(f"unknown format enum value {m.format}")
    return UploadMeta(name=m.name, format=FORMAT_FROM_PB[m.format], base_model=m.base_model,
                      description=m.description, tags=dict(m.tags), aliases=list(m.aliases), filename=m.filename,
                      expected_size=m.size_bytes, expected_digest=m.digest, exist_ok=m.exist_ok)


class _Observed:
    """Counts one RPC by final status code and times it (metrics.REQUESTS / LATENCY)."""

    def __init__(self, method: str) -> None:
        self.method, self.code, self.start = method, "OK", time.perf_counter()

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, RegistryError):
            self.code = status_for(exc).name
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.code = "CANCELLED"
        elif self.code == "OK":
            self.code = "UNKNOWN"

    def done(self) -> None:
        metrics.REQUESTS.labels(self.method, self.code).inc()
        metrics.LATENCY.labels(self.method).observe(time.perf_counter() - self.start)


def _mapped(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turns a RegistryError raised by a unary handler into context.abort(code, message)."""
    async def wrapper(self: "RegistryServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Observed(fn.__name__)
        try:
            return await fn(self, request, context)
        except RegistryError as exc:
            call.failed(exc)
            await context.abort(status_for(exc), str(exc))
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            call.done()

    wrapper.__name__ = fn.__name__
    return wrapper


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, service: RegistryService) -> None:
        self.service = service

    async def UploadAdapter(self, request_iterator: AsyncIterator[pb.UploadAdapterRequest],
                            context: grpc.aio.ServicerContext) -> pb.UploadAdapterResponse:
        incoming: IncomingArtifact | None = None
        meta: UploadMeta | None = None
        call = _Observed("UploadAdapter")
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("payload")
                if incoming is None:
                    if kind != "metadata":
                        raise InvalidArgument("the first UploadAdapterRequest must carry metadata")
                    meta = meta_from_pb(req.metadata)
                    incoming = self.service.start_upload(meta)
                elif kind == "chunk":
                    incoming.write(req.chunk)  # small local write + hash; cheap enough for the loop
                else:
                    raise InvalidArgument("only the first UploadAdapterRequest may carry metadata")
            if incoming is None or meta is None:
                raise InvalidArgument("empty upload: send metadata, then the artifact in chunks")
            result = await asyncio.to_thread(self.service.finish_upload, incoming, meta)
            metrics.UPLOADED_BYTES.inc(incoming.size)
            if result.deduplicated:
                metrics.DEDUPLICATED.inc()
            return pb.UploadAdapterResponse(adapter=record_to_pb(result.adapter), deduplicated=result.deduplicated,
                                            existing=result.existing)
        except RegistryError as exc:
            call.failed(exc)
            if incoming is not None:  # clean up before the client hears the answer
                self.service.abort_upload(incoming)
            await context.abort(status_for(exc), str(exc))
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            call.done()
            if incoming is not None:  # cancelled, refused or failed: leave no staging file behind
                self.service.abort_upload(incoming)

    @_mapped
    async def ImportAdapter(self, request: pb.ImportAdapterRequest, context) -> pb.ImportAdapterResponse:
        result = await asyncio.to_thread(self.service.import_adapter, meta_from_pb(request.metadata),
                                         request.source_uri)
        return pb.ImportAdapterResponse(adapter=record_to_pb(result.adapter), deduplicated=result.deduplicated,
                                        existing=result.existing)

    @_mapped
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.GetAdapterResponse:
        record = await asyncio.to_thread(self.service.get, request.name, request.version, request.alias)
        resp = pb.GetAdapterResponse(adapter=record_to_pb(record))
        if getattr(request, "blob_url", False):  # (stubs older than the blob side channel lack it)
            await self._locate(record, resp)
        return resp

    async def _locate(self, record: AdapterRecord, resp: pb.GetAdapterResponse) -> None:
        """The artifact's signed blob URL (blob_http.py: this registry's blob port, or a presigned S3
        URL) when the registry serves blobs that way, and its range digests (for gRPC ranges too)."""
        digest_hex = record.digest.removeprefix("sha256:")
        blob, store = self.service.blob_server, self.service.store
        if blob is not None:
            resp.blob.url, resp.blob.expires_unix = blob.signer.sign(digest_hex)
            resp.blob.port = blob.port
        elif isinstance(store, S3Store) and store.cfg.presign_downloads:
            ttl = int(self.service.config.blob_url_ttl_seconds)
            resp.blob.url = store.client.generate_presigned_url(  # (signed locally: no S3 round trip)
                "get_object", Params={"Bucket": store.bucket, "Key": store.blob_key(digest_hex)}, ExpiresIn=ttl)
            resp.blob.expires_unix = int(time.time()) + ttl
        ranges = self.service.cached_range_digests(record)  # (no thread hop once read)
        if ranges is False:
            ranges = await asyncio.to_thread(self.service.range_digests, record)
        if ranges is not None:
            resp.range_digests.range_bytes = ranges[0]
            resp.range_digests.sha256.extend(ranges[1])

    @_mapped
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        records, token = await asyncio.to_thread(
            self.service.list, request.page_size, request.page_token, request.base_model, request.name_prefix,
            request.latest_only)
        return pb.ListAdaptersResponse(adapters=[record_to_pb(r) for r in records], next_page_token=token)

    @_mapped
    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        versions = await asyncio.to_thread(self.service.delete, request.name, request.version,
                                           request.all_versions, request.force)
        return pb.DeleteAdapterResponse(deleted_versions=versions)

    async def DownloadAdapter(self, request: pb.DownloadAdapterRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadAdapterResponse]:
        call = _Observed("DownloadAdapter")
        try:
            record, chunks = await asyncio.to_thread(self.service.open_download, request.name, request.version,
                                                     request.alias, request.chunk_size,
                                                     getattr(request, "offset", 0),  # (stubs older than ranges)
                                                     getattr(request, "length", 0))
        except RegistryError as exc:
            call.failed(exc)
            call.done()
            await context.abort(status_for(exc), str(exc))
        first = pb.DownloadAdapterResponse(adapter=record_to_pb(record))
        ranges = await asyncio.to_thread(self.service.range_digests, record)  # (a ranged client checks ranges)
        if ranges is not None:
            first.range_digests.range_bytes = ranges[0]
            first.range_digests.sha256.extend(ranges[1])
        yield first
        it = iter(chunks)

        def read_ahead() -> asyncio.Future:  # chunk k+1 is read on a thread while chunk k is sent
            fut = asyncio.ensure_future(asyncio.to_thread(next, it, None))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if abandoned
            return fut
        try:
            pending = read_ahead()
            while (chunk := await pending) is not None:
                pending = read_ahead()
                yield pb.DownloadAdapterResponse(chunk=chunk)
                metrics.DOWNLOADED_BYTES.inc(len(chunk))
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            call.done()
            close = getattr(it, "close", None)
            try:
                if close:
                    close()  # releases the file / S3 body now, not at garbage collection
            except ValueError:
                pass  # cancelled while a worker thread was inside next(it): it is closed when collected

    @_mapped
    async def SetAlias(self, request: pb.SetAliasRequest, context) -> pb.SetAliasResponse:
        record = await asyncio.to_thread(self.service.set_alias, request.name, request.alias, request.version)
        return pb.SetAliasResponse(adapter=record_to_pb(record))

    @_mapped
    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context) -> pb.DeleteAliasResponse:
        await asyncio.to_thread(self.service.delete_alias, request.name, request.alias)
        return pb.DeleteAliasResponse()

    @_mapped
    async def SetTags(self, request: pb.SetTagsRequest, context) -> pb.SetTagsResponse:
        record = await asyncio.to_thread(self.service.set_tags, request.name, request.version, request.alias,
                                         dict(request.set), list(request.remove))
        return pb.SetTagsResponse(adapter=record_to_pb(record))


WRITE_METHODS = frozenset({"UploadAdapter", "ImportAdapter", "DeleteAdapter", "SetAlias", "DeleteAlias", "SetTags"})


def create_server(config: RegistryConfig, address: str,
                  service: RegistryService | None = None) -> tuple[grpc.aio.Server, int]:
    """A registry server bound to `address` (not started). Opens the service when none is given."""
    service = service or RegistryService.open(config)
    auth = BearerAuthInterceptor(prefix=f"/{SERVICE_NAME}/", write_methods=WRITE_METHODS,
                                 write_token=config.auth_token, read_token=config.read_token)
    server = grpc.aio.server(interceptors=[auth], options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *ports.GRPC_OPTIONS,  # no SO_REUSEPORT: a second registry on a taken port fails instead of sharing it
    ])
    server.registry_service = service  # type: ignore[attr-defined]  # for callers that stop it
    if config.blob_port is not None and isinstance(service.store, LocalStore) and service.blob_server is None:
        service.blob_server = _blob_server(config, address, service.store)  # bound now, served from start()
    pb_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls_cert_file:
        creds = grpc.ssl_server_credentials([(config.tls_key_file.read_bytes(),  # type: ignore[union-attr]
                                              config.tls_cert_file.read_bytes())])
        port = ports.add_grpc_port(server, address, "the registry", "--port/--address", credentials=creds)
    else:
        port = ports.add_grpc_port(server, address, "the registry", "--port/--address")
    return server, port


def _blob_server(config: RegistryConfig, address: str, store: LocalStore) -> BlobServer:
    """The blob side channel (blob_http.py) on the gRPC address's host, TLS when the registry has it."""
    tls = None
    if config.tls_cert_file:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
    host = address.rsplit(":", 1)[0]
    tokens = [t for t in (config.read_token, config.auth_token) if t]
    signer = BlobSigner(config.blob_url_key or os.environ.get("LORASERVE_REGISTRY_BLOB_KEY"), config.blob_url_ttl_seconds)
    try:
        return BlobServer(host, config.blob_port or 0, store, signer, tokens, tls)
    except OSError as exc:
        raise ports.PortInUseError(exc.errno, f"the registry's blob port {host}:{config.blob_port} cannot be bound "
                                              f"({exc.strerror}); pick another with --blob-port") from exc


async def start(config: RegistryConfig, address: str) -> tuple[grpc.aio.Server, int]:
    """create_server + start + health SERVING."""
    server, port = create_server(config, address)
    await server.start()
    if server.registry_service.blob_server is not None:  # type: ignore[attr-defined]
        server.registry_service.blob_server.start()  # type: ignore[attr-defined]
        log.info("registry: blobs over HTTP on port %d", server.registry_service.blob_server.port)  # type: ignore[attr-defined]
    server.registry_service.start_periodic_gc()  # type: ignore[attr-defined]  # stopped by service.close()
    for name in ("", SERVICE_NAME):
        await server.health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
    return server, port


async def serve(config: RegistryConfig, address: str) -> None:
    server, port = await start(config, address)
    host = address.rsplit(":", 1)[0]
    print(f"loraserve registry listening on {host}:{port}", flush=True)
    if config.metrics_port:
        from prometheus_client import start_http_server

        ports.bind_or_explain(lambda: start_http_server(config.metrics_port, addr=host.strip("[]") or "127.0.0.1"),
                              host, config.metrics_port, "registry metrics", "--metrics-port")
        log.info("registry: Prometheus metrics on http://%s:%d/metrics", host, config.metrics_port)
    log.info("registry: data %s, db %s, store %s", config.data_dir, config.resolved_db_url.split("@")[-1],
             config.store)
    service: RegistryService = server.registry_service  # type: ignore[attr-defined]
    asyncio.get_running_loop().run_in_executor(None, service.gc)  # leftovers of earlier crashes
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("registry: shutting down")
    await server.health_servicer.enter_graceful_shutdown()  # type: ignore[attr-defined]
    await server.stop(grace=5)
    service.close()
