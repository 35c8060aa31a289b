"""One parser for `authorization` metadata, shared by the registry, the inference gRPC service
and the OpenAI HTTP front, so that all three accept and refuse exactly the same things.

Accepted: exactly one value `<scheme> <token>` with scheme `Bearer` in any case, surrounding
spaces ignored. Refused (with a message naming the rule, never echoing the value): two or
more values (gRPC metadata and HTTP headers can both repeat a key, and which one a proxy or
library picks differs), another scheme, an empty token. Tokens compare in constant time.
"""
from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

HEADER = "authorization"


def authorization_values(metadata: Iterable[tuple[str, Any]] | None) -> list[str]:
    """Every value given for `authorization` in gRPC metadata ((key, value) pairs)."""
    values = []
    for key, value in metadata or ():
        if key.lower() == HEADER:
            values.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return values


def bearer_token(values: list[str]) -> str | None:
    """The token of the one `Bearer <token>` value; None when there is no value.

    Raises ValueError (message fit for the client) on duplicates, another scheme, no token.
    """
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"send one authorization value, not {len(values)}")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise ValueError("authorization must be 'Bearer <token>'")
    token = token.strip()
    if not token:
        raise ValueError("authorization 'Bearer' carries no token")
    return token


def token_accepted(token: str, accepted: list[str]) -> bool:
    """Constant-time comparison against every accepted token (no early exit that tells which)."""
    results = [hmac.compare_digest(token.encode(), t.encode()) for t in accepted]
    return any(results)


def refusal(values: list[str], accepted: list[str], what: str = "calls") -> str | None:
    """None when `values` carry one accepted bearer token, else why not (for UNAUTHENTICATED / 401)."""
    try:
        token = bearer_token(values)
    except ValueError as exc:
        return str(exc)
    if token is None:
        return f"{what} need 'authorization: Bearer <token>'"
    return None if token_accepted(token, accepted) else "the bearer token was not accepted"
