"""Domain errors of the registry; the gRPC layer maps each to one canonical status code."""
from __future__ import annotations


class RegistryError(Exception):
    """Base class; str(exc) is the message the client sees."""


class InvalidArgument(RegistryError):
    """Bad request or bad artifact (-> INVALID_ARGUMENT)."""


class NotFound(RegistryError):
    """No such adapter, version or alias (-> NOT_FOUND)."""


class AlreadyExists(RegistryError):
    """The same bytes are already a version of this name (-> ALREADY_EXISTS)."""


class PermissionDenied(RegistryError):
    """An import source outside what the operator allowed (-> PERMISSION_DENIED)."""


class FailedPrecondition(RegistryError):
    """The request is valid but the current state forbids it (-> FAILED_PRECONDITION)."""


class OutOfRange(RegistryError):
    """A byte range past the end of the artifact (-> OUT_OF_RANGE)."""
