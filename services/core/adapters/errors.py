"""The one exception type every adapter-format problem raises, and the helper that keeps its
messages short whatever the input."""
from __future__ import annotations

MAX_MESSAGE_CHARS = 1000  # a message is shown to a person (gRPC status detail): never unbounded


def shorten(value: object, limit: int = 200) -> str:
    """repr() of a name, key or path from untrusted input, cut to about `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def clip(text: str, limit: int = 60) -> str:
    """`text` itself when short, else its first `limit` characters and a count (no quotes added)."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


class AdapterFormatError(ValueError):
    """An adapter artifact is malformed, unsafe or incompatible.

    The message names what is wrong (file, tensor key, shape, config field) so that it can be
    shown verbatim to the user, e.g. as the detail of a gRPC INVALID_ARGUMENT status. It is cut
    to MAX_MESSAGE_CHARS, so that no input can make an error message (or gRPC trailer) huge.
    `unforeseen` marks errors turned into this type by the loader's last-resort net: the parser
    met input no check foresaw (the fuzzer counts these as bugs).
    """

    unforeseen = False

    def __init__(self, message: str = "") -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"... (message cut, {len(message)} characters)"
        super().__init__(message)
