"""Bearer-token check for registry calls, as a grpc.aio server interceptor.

Writes need `authorization: Bearer <write_token>` when a write token is configured; reads
need the read token (or the write token) when a read token is configured. Calls outside
the guarded service (health, reflection) are always open. A refused call is answered with
UNAUTHENTICATED before its handler runs, so a refused upload stores nothing.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from loraserve.auth_header import authorization_values, refusal

from . import metrics


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, prefix: str, write_methods: frozenset[str], write_token: str | None,
                 read_token: str | None) -> None:
        self.prefix = prefix
        self.write_methods = write_methods
        self.write_tokens = [write_token] if write_token else []
        self.read_tokens = [t for t in (read_token, write_token) if t] if read_token else []

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if not method.startswith(self.prefix):
            return await continuation(details)
        is_write = method[len(self.prefix):] in self.write_methods
        accepted = self.write_tokens if is_write else self.read_tokens
        if not accepted:
            return await continuation(details)
        message = refusal(authorization_values(details.invocation_metadata), accepted,
                          "writes" if is_write else "reads")
        if message is None:
            return await continuation(details)
        metrics.AUTH_REFUSED.labels(method[len(self.prefix):]).inc()
        return _refusing(await continuation(details), message)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, as response-streaming handlers are

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)
