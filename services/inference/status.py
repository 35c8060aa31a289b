"""Status codes of the inference service, shared by the gRPC servicer and the OpenAI HTTP front.

* `check_adapter_ref` / `check_lora_request`: what a request may name, checked before any
  registry call or file access, so that a bad reference is INVALID_ARGUMENT (never retried),
  not UNAVAILABLE (retried) or whatever the registry or the file system make of it.
* `classify(exc)`: the errors declared in errors.py (each with its gRPC code and HTTP status)
  -> (gRPC code, message); anything else is INTERNAL with a generic message and a reference
  to one server log line, never the exception's text (which may carry user input or paths).
* `shown(value)` / `clip(message)`: no message echoes unbounded input. gRPC carries the
  message percent-encoded in a trailer (8 KiB by default), so a 10,000-char name echoed in
  full turned a bad request into RESOURCE_EXHAUSTED "metadata size exceeds hard limit".
"""
from __future__ import annotations

import re

import grpc

from .errors import HTTP_STATUS, MAX_MESSAGE_BYTES, InvalidRequestError, clip, declared, status_of  # noqa: F401

# The registry's own rules (loraserve.registry.records; not imported: it needs SQLAlchemy, which
# an inference-only install does not have). 'org/name', each part at most 100 characters.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,99}")
MAX_LORA_NAME = 256
MAX_LORA_PATH = 4096        # PATH_MAX on Linux


def shown(value: str, limit: int = 64) -> str:
    """repr of a user-given string for an error message, at most `limit` characters of it."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _refuse(message: str) -> None:
    raise InvalidRequestError(message)


def check_adapter_ref(name: str, version: int = 0, alias: str = "") -> None:
    """A registry reference: a valid name, then a version > 0 or an alias (or neither: latest)."""
    if not name:
        _refuse("adapter name is empty")
    if not NAME_RE.fullmatch(name):
        _refuse(f"bad adapter name {shown(name)}: use letters, digits, '.', '_', '-' (optionally 'org/name'), "
                "starting with a letter or digit, at most 100 characters a part")
    if version < 0:
        _refuse(f"adapter version must be > 0 (or 0 for the latest), got {version}")
    if version and alias:
        _refuse("give an adapter version or an alias, not both")
    if alias and not ALIAS_RE.fullmatch(alias):
        _refuse(f"bad adapter alias {shown(alias)}: start with a letter; letters, digits, '.', '_', '-', "
                "at most 100 characters")


def check_lora_request(lora_name: str, lora_int_id: int, lora_path: str) -> None:
    """TensorRT-LLM's LoRARequest fields, before the path reaches the file system."""
    if not lora_name:
        _refuse("lora_name must not be empty")
    if len(lora_name) > MAX_LORA_NAME or not lora_name.isprintable():
        _refuse(f"bad lora_name {shown(lora_name)}: at most {MAX_LORA_NAME} printable characters")
    if lora_int_id < 0:
        _refuse(f"lora_int_id must be >= 0, got {lora_int_id}")
    if len(lora_path) > MAX_LORA_PATH or "\x00" in lora_path:
        _refuse(f"bad lora_path {shown(lora_path)}: at most {MAX_LORA_PATH} characters, no NUL bytes")


def mapped(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, clipped message) of a declared error (errors.py); None for anything else."""
    found = declared(exc)
    return None if found is None else (grpc.StatusCode[found.code], found.message)


def classify(exc: BaseException, where: str = "request", request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """(gRPC code, message) for any exception; an undeclared one is logged once (request id, reference)
    and INTERNAL with a generic message."""
    found = status_of(exc, where, request_id)
    return grpc.StatusCode[found.code], found.message
