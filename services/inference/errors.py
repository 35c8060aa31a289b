"""Every error the inference service reports to a client, declared once with its status on both
fronts: the canonical gRPC code (by name: this module imports no grpc, the offline LLM API uses
it too) and the HTTP status of the OpenAI front. The registry's errors.py is the model.

    raise AdapterNotFoundError("adapter 'x' is not loaded")   # NOT_FOUND over gRPC, 404 over HTTP

`status_of(exc)` is the one mapping both fronts use. Only the types declared here (and
AdapterFormatError, the adapter parser's own type shared with the registry) are client errors;
anything else, a KeyError or ValueError from our own code included, is INTERNAL / 500 with a
generic message and one ERROR log line that carries the request id and a reference the
client sees, never the exception's text (it may hold user input or server paths).

Each class keeps the builtin base it had (ValueError, LookupError, PermissionError,
RuntimeError), so callers of the offline API that catch those still do.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from loraserve.adapters.errors import AdapterFormatError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024    # UTF-8 bytes of a message; percent-encoded in a gRPC trailer it stays under 8 KiB


class InferenceError(Exception):
    """Base class; str(exc) is the message the client sees."""

    grpc_code = "INTERNAL"
    http_status = 500
    openai_param: str | None = None   # the request field an OpenAI error body names
    openai_code: str | None = None


# ---- the request itself is wrong (never retried) ----------------------------------------------------
class InvalidRequestError(InferenceError, ValueError):
    grpc_code, http_status = "INVALID_ARGUMENT", 400


class ChatTemplateError(InferenceError, ValueError):
    """The template refused these messages (its raise_exception) or failed to render them."""

    grpc_code, http_status, openai_param = "INVALID_ARGUMENT", 400, "messages"


class RegistryRequestError(InferenceError, ValueError):
    """The registry refused the reference itself (INVALID_ARGUMENT there)."""

    grpc_code, http_status, openai_param = "INVALID_ARGUMENT", 400, "model"


class AdapterNotFoundError(InferenceError, LookupError):
    """No such adapter loaded, or no such lora_path."""

    grpc_code, http_status, openai_param, openai_code = "NOT_FOUND", 404, "model", "model_not_found"


class RegistryAdapterNotFound(InferenceError, LookupError):
    grpc_code, http_status, openai_param, openai_code = "NOT_FOUND", 404, "model", "model_not_found"


class AdapterAccessError(InferenceError, PermissionError):
    """lora_path is outside every directory the operator allowed."""

    grpc_code, http_status, openai_param = "PERMISSION_DENIED", 403, "lora_request"


class RegistryAccessError(InferenceError, PermissionError):
    """The registry refused this server's read token (--registry-token): an operator's fix, not a retry."""

    grpc_code, http_status, openai_param = "PERMISSION_DENIED", 403, "model"


class AdapterBusyError(InferenceError, RuntimeError):
    """Unload of an adapter that requests still use."""

    grpc_code, http_status = "FAILED_PRECONDITION", 409


class AdapterLoadError(InferenceError, RuntimeError):
    """A background (re)load of an adapter failed (its source left or changed on disk): its waiting
    requests fail with this."""

    grpc_code, http_status = "FAILED_PRECONDITION", 409


# ---- the server cannot take it now (retry later) ----------------------------------------------------
class QueueFullError(InferenceError, RuntimeError):
    grpc_code, http_status = "RESOURCE_EXHAUSTED", 429


class AdapterCapacityError(InferenceError, RuntimeError):
    """The adapter can never fit the host tier (larger than host_cache_size)."""

    grpc_code, http_status = "RESOURCE_EXHAUSTED", 429


class ShuttingDownError(InferenceError, RuntimeError):
    grpc_code, http_status = "UNAVAILABLE", 503


class RegistryUnavailableError(InferenceError, RuntimeError):
    grpc_code, http_status = "UNAVAILABLE", 503


class EngineDeadError(InferenceError, RuntimeError):
    grpc_code, http_status = "UNAVAILABLE", 503


class DigestMismatchError(InferenceError, RuntimeError):
    """Downloaded adapter bytes do not hash to the registry's digest (a bad upstream: 502)."""

    grpc_code, http_status = "DATA_LOSS", 502


# ---- the server failed -----------------------------------------------------------------------------
class EngineStepError(InferenceError, RuntimeError):
    """The engine step computing this request failed; other requests go on."""


class InternalError(InferenceError):
    """An unexpected exception, already logged under `reference`; the client sees only the reference."""

    def __init__(self, reference: str):
        super().__init__(f"internal error (reference {reference} in the server log)")
        self.reference = reference


# types declared elsewhere that are client errors too: (grpc code, HTTP status, OpenAI param)
EXTERNAL: dict[type[BaseException], tuple[str, int, str | None]] = {
    AdapterFormatError: ("INVALID_ARGUMENT", 400, None),   # a malformed adapter artifact (lora_path or registry)
}

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
               "DATA_LOSS": 502, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


@dataclass(frozen=True)
class Status:
    code: str                 # grpc.StatusCode name
    http_status: int
    message: str              # fit for the client: bounded, no internal text
    openai_param: str | None = None
    openai_code: str | None = None


def clip(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """message cut to `limit` UTF-8 bytes (on a character boundary), marked when cut."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    return raw[:limit - 20].decode("utf-8", "ignore") + f"... [{len(raw)} bytes]"


def declared(exc: BaseException) -> Status | None:
    """The status of a client-facing error; None for anything else (no logging)."""
    message = clip(str(exc) or type(exc).__name__)
    if isinstance(exc, InferenceError):
        return Status(exc.grpc_code, exc.http_status, message, exc.openai_param, exc.openai_code)
    for cls, (code, http, param) in EXTERNAL.items():
        if isinstance(exc, cls):
            return Status(code, http, message, param)
    return None


def internal(exc: BaseException, where: str, request_id: str | None = None) -> InternalError:
    """Log an unexpected exception once (traceback, request id, a fresh reference) and return the
    InternalError the client gets in its place."""
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s (request %s): %s", reference, where, request_id or "-", type(exc).__name__,
              exc_info=exc)
    return InternalError(reference)


def status_of(exc: BaseException, where: str = "request", request_id: str | None = None) -> Status:
    """The status both fronts answer with; an undeclared exception is logged and INTERNAL."""
    found = declared(exc)
    if found is not None:
        return found
    err = internal(exc, where, request_id)
    return Status(err.grpc_code, err.http_status, str(err))


def code_name(exc: BaseException) -> str:
    """The gRPC code name of any exception, without logging (for metrics and the request log line)."""
    found = declared(exc)
    return found.code if found is not None else "INTERNAL"
