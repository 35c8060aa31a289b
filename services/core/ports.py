"""Listening ports that fail loudly: a taken port is a startup error that names it.

gRPC servers otherwise bind with SO_REUSEPORT, so a second server on a taken port comes up
"ready" and the kernel splits connections between the two (two registries with different data
dirs would split the pushes). `GRPC_OPTIONS` turns that off; `add_grpc_port` and
`bind_or_explain` turn the bind failure into a `PortInUseError` naming the port and the flag.
"""
from __future__ import annotations

import errno
import socket
from typing import Callable, TypeVar

T = TypeVar("T")

# pass to grpc.aio.server(options=...): without it a second server shares the port silently
GRPC_OPTIONS = [("grpc.so_reuseport", 0)]


class PortInUseError(OSError):
    """A port this process must listen on is taken (or the address is not local)."""


def _explain(host: str, port: int, what: str, flag: str) -> PortInUseError:
    return PortInUseError(errno.EADDRINUSE,
                          f"cannot listen on {host}:{port} for {what}: the port is in use (another loraserve or "
                          f"another program holds it) or the address is not local; pick another with {flag}")


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on host:port now (a bind without SO_REUSEPORT succeeds)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "in use"
        try:
            s.bind((host.strip("[]") or "0.0.0.0", port))
        except OSError:
            return False
    return True


def check_free(host: str, port: int | None, what: str, flag: str) -> None:
    """Fail now, before a model loads, if a port that is bound later is already taken."""
    if port and not port_is_free(host, port):
        raise _explain(host, port, what, flag)


def add_grpc_port(server, address: str, what: str = "gRPC", flag: str = "--port", credentials=None) -> int:
    """server.add_(in)secure_port with a clear error; the server must have been built with GRPC_OPTIONS."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:  # grpcio >= 1.5x: "Failed to bind to address ..."
        host, _, p = address.rpartition(":")
        raise _explain(host, int(p) if p.isdigit() else 0, what, flag) from exc
    if port == 0:  # older grpcio returns 0
        host, _, p = address.rpartition(":")
        raise _explain(host, int(p) if p.isdigit() else 0, what, flag)
    return port


def explained(exc: OSError, host: str, port: int, what: str, flag: str) -> OSError:
    """EADDRINUSE / EADDRNOTAVAIL / EACCES from an HTTP server's bind as a PortInUseError naming the port."""
    if isinstance(exc, PortInUseError) or exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        return exc
    return _explain(host, port, what, flag)


def bind_or_explain(start: Callable[[], T], host: str, port: int, what: str, flag: str) -> T:
    """Run start() (an HTTP server's bind); a bind failure becomes a PortInUseError naming the port."""
    try:
        return start()
    except OSError as exc:
        error = explained(exc, host, port, what, flag)
        if error is exc:
            raise
        raise error from exc
