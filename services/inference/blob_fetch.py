"""Artifact bytes over the registry's byte side channel: parallel HTTP/1.1 range GETs, each read with
`recv_into` straight into the caller's buffer (the pinned arena block on CUDA) and checked against
the registry's range digests before anyone may read it.

Why: the gRPC download (ranged_download.py) moves every byte through protobuf messages on the event
loop's thread: ~120 ms for the 84 MB 8B adapter on the H200 host (issue 12's cold path, 144 ms in
all). Here the registry answers with sendfile (services/registry/blob_http.py) or S3 answers a
presigned URL, and each worker thread holds one keep-alive connection: recv_into and sha256 release
the GIL, so the parse (on the loader thread) and the event loop run beside the download.

    await fetch_ranges(target, size, digests, dest, pool, on_range)

dest: a [size] uint8 CPU tensor. Ranges go to `streams` workers in the order [0, last, 1, 2, ...]
(a tar's end early for a parser reading as the bytes arrive). Each piece the registry has a digest of
(4 MiB, or what LORASERVE_RANGE_DIGEST_BYTES made it at upload) is handed to `on_range(start, end)` as
soon as its sha256 matched, while the rest of its GET range still arrives; a mismatch raises DigestMismatchError (never retried on another
path: the bytes are wrong), anything else of the transport BlobUnavailable (the caller may fall
back to gRPC while nothing was handed on).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import DigestMismatchError

# the side channel on (when the registry offers a URL); LORASERVE_BLOB_HTTP=0: gRPC downloads only
BLOB_HTTP = os.environ.get("LORASERVE_BLOB_HTTP", "1") != "0"
# connections per artifact: each receives and hashes its ranges on its own thread (one sha256
# thread ran ~1 GB/s on the H200 host, so 84 MB needs several); LORASERVE_BLOB_STREAMS: override
BLOB_STREAMS = max(1, int(os.environ.get("LORASERVE_BLOB_STREAMS", 8)))
# hash what arrived once this much is waiting (the kernel keeps receiving meanwhile); with BLOB_WAITALL also the
# bytes per recv_into: each step costs a thread two GIL round trips (recv, sha256). LORASERVE_BLOB_HASH_STEP: override
_HASH_STEP = max(64 << 10, int(os.environ.get("LORASERVE_BLOB_HASH_STEP", 1 << 20)))
# plain-HTTP connections read a MiB per call (MSG_WAITALL on a blocking socket); LORASERVE_BLOB_WAITALL=0: what
# each call finds (Python's timeout socket), as measured on the H200 before (probes of 2026-11-30 20:00, 20:30)
BLOB_WAITALL = os.environ.get("LORASERVE_BLOB_WAITALL", "1") != "0"
_MAX_HEADER = 64 << 10


class BlobUnavailable(ConnectionError):
    """The blob could not be read over HTTP (refused, missing, cut, not a range server)."""


@dataclass(frozen=True)
class BlobTarget:
    """Where one artifact's bytes are: scheme, host, port, and the request target (path + query)."""

    scheme: str
    host: str
    port: int
    target: str
    expires_unix: int = 0

    @classmethod
    def of(cls, blob, registry_address: str, tls: bool) -> "BlobTarget":
        """From a GetAdapterResponse.blob (BlobUrl): an absolute URL (a presigned S3 one), or a path on the
        registry host we dialled for gRPC, at blob.port (https when that channel is TLS)."""
        if blob.url.startswith("/"):
            host = registry_address.rsplit(":", 1)[0].strip("[]")
            return cls("https" if tls else "http", host, int(blob.port), blob.url, int(blob.expires_unix))
        u = urlsplit(blob.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BlobUnavailable(f"the registry's blob URL is not http(s): {blob.url[:60]!r}")
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return cls(u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), target, int(blob.expires_unix))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class _Connection:
    """One keep-alive HTTP/1.1 connection that reads byte ranges into memory it is given."""

    def __init__(self, t: BlobTarget, timeout_s: float, ssl_context: ssl.SSLContext | None):
        self.t = t
        try:
            sock = socket.create_connection((t.host, t.port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.waitall = BLOB_WAITALL and t.scheme == "http"
            if t.scheme == "https":
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=t.host)
            elif self.waitall:
                # a blocking socket (the kernel's own receive timeout instead of Python's poll-based one), so
                # recv_into(n, MSG_WAITALL) returns once n bytes are in: one call (and one GIL round trip)
                # per MiB instead of one per ~64 KiB the kernel had ready
                sec = max(1, int(timeout_s))
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, 0))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))
        except OSError as exc:
            raise BlobUnavailable(f"cannot connect to {t.host}:{t.port} for the adapter's bytes: {exc}") from exc
        self.sock = sock
        self.open = True

    def close(self) -> None:
        self.open = False
        try:
            self.sock.close()
        except OSError:
            pass

    def _head(self) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body bytes already received)."""
        buf = bytearray()
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEADER:
                raise BlobUnavailable("the blob server's response header is too long")
            got = self.sock.recv(65536)
            if not got:
                raise BlobUnavailable("the blob server closed the connection before answering")
            buf += got
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BlobUnavailable(f"not an HTTP/1.x answer: {lines[0][:60]!r}")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return int(parts[1]), headers, bytes(buf[end + 4:])

    def read_range(self, start: int, end: int, view: memoryview, units: list, on_unit) -> None:
        """Bytes [start, end) of the blob into view (len end - start). units: [(unit start, unit end, sha256)]
        tiling the range; each unit is hashed as its bytes arrive and, once whole and matching, handed to
        on_unit(unit start, unit end); a mismatch raises _Mismatch(unit start, unit end)."""
        req = (f"GET {self.t.target} HTTP/1.1\r\nHost: {self.t.host_header}\r\nRange: bytes={start}-{end - 1}\r\n"
               f"Accept-Encoding: identity\r\nUser-Agent: loraserve\r\n\r\n")
        self.sock.sendall(req.encode("latin-1"))
        status, headers, rest = self._head()
        n = end - start
        if status != 206 or "chunked" in headers.get("transfer-encoding", ""):
            detail = rest[:200].decode("utf-8", "replace").strip()
            raise BlobUnavailable(f"the blob server answered HTTP {status} to bytes {start}-{end - 1}"
                                  + (f": {detail}" if detail else ""))
        if headers.get("content-length") != str(n) or not headers.get("content-range", "").startswith(
                f"bytes {start}-{end - 1}/"):
            raise BlobUnavailable(f"the blob server sent another range than bytes {start}-{end - 1} "
                                  f"({headers.get('content-range')!r}, {headers.get('content-length')!r} bytes)")
        if len(rest) > n:
            raise BlobUnavailable("the blob server sent more bytes than the range")
        view[:len(rest)] = rest
        pos, hashed, u, sha = len(rest), 0, 0, hashlib.sha256()
        while True:
            # hash what arrived (up to the current unit's end; a whole unit is checked and handed on)
            while hashed < pos and (pos - hashed >= _HASH_STEP or pos == n or units[u][1] - start <= pos):
                stop = min(pos, units[u][1] - start)
                sha.update(view[hashed:stop])
                hashed = stop
                if hashed == units[u][1] - start:
                    if sha.digest() != units[u][2]:
                        raise _Mismatch(units[u][0], units[u][1])
                    on_unit(units[u][0], units[u][1])
                    u, sha = u + 1, hashlib.sha256()
            if pos == n:
                break
            if self.waitall:  # (the GIL is released while it waits and copies)
                want = min(n - pos, _HASH_STEP - (pos - hashed) if pos - hashed < _HASH_STEP else _HASH_STEP)
                got = self.sock.recv_into(view[pos:pos + want], want, socket.MSG_WAITALL)
            else:
                got = self.sock.recv_into(view[pos:], n - pos)
            if not got:
                raise BlobUnavailable(f"the blob server closed the connection after {pos} of {n} bytes")
            pos += got
        if headers.get("connection", "").lower() == "close":
            self.close()


class _Mismatch(Exception):
    """Bytes [start, end) did not hash to the registry's digest of them."""


def plan(size: int, digests: tuple[int, list[bytes]] | None, whole_digest: str,
         request_bytes: int = 4 << 20) -> list[tuple[int, int, list[tuple[int, int, bytes]]]]:
    """[(start, end, units)]: GET ranges of about request_bytes (whole digest units), each with its units
    [(start, end, sha256 it must have)]: the registry's range digests, or the whole artifact as one unit when
    it is small enough to have none. Raises BlobUnavailable when the bytes cannot be checked piece by piece."""
    if digests is not None and digests[0] > 0 and len(digests[1]) == -(-size // digests[0]):
        unit, shas = digests
        units = [(off, min(off + unit, size), shas[i]) for i, off in enumerate(range(0, size, unit))]
    elif size <= (4 << 20) and whole_digest.startswith("sha256:"):
        units = [(0, size, bytes.fromhex(whole_digest[7:]))]
    else:
        raise BlobUnavailable("no range digests for this artifact: it is checked as a whole on the gRPC path")
    per = max(1, request_bytes // max(1, units[0][1] - units[0][0]))
    return [(group[0][0], group[-1][1], group) for group in (units[i:i + per] for i in range(0, len(units), per))]


async def fetch_ranges(t: BlobTarget, size: int, digests, whole_digest: str, dest, pool: ThreadPoolExecutor,
                       on_range=None, streams: int | None = None, timeout_s: float = 30.0,
                       ssl_context: ssl.SSLContext | None = None, what: str = "the adapter") -> None:
    """Every byte of the blob at `t` into dest ([size] uint8 CPU tensor), each digest unit checked before
    on_range(start, end) is called for it (on a worker thread). Waits until no worker writes into dest any
    more, also when it raises or is cancelled."""
    ranges = plan(size, digests, whole_digest)
    order = list(range(len(ranges)))
    if len(order) > 2:
        order = [0, order[-1], *order[1:-1]]
    base = memoryview(dest.numpy()).cast("B")
    if len(base) != size:
        raise ValueError(f"dest holds {len(base)} bytes, the blob {size}")
    lock, stop, conns = threading.Lock(), threading.Event(), []
    queue = iter(order)

    def worker() -> None:
        conn = None
        try:
            while not stop.is_set():
                with lock:
                    r = next(queue, None)
                if r is None:
                    return
                start, end, units = ranges[r]
                if conn is None or not conn.open:
                    conn = _Connection(t, timeout_s, ssl_context)
                    with lock:
                        conns.append(conn)
                try:
                    conn.read_range(start, end, base[start:end], units, on_range or (lambda a, b: None))
                except _Mismatch as bad:
                    raise DigestMismatchError(f"{what}: bytes {bad.args[0]}-{bad.args[1] - 1} from {t.host}:{t.port} "
                                              f"do not match the registry's digest of that range") from None
                except (OSError, ValueError) as exc:
                    if stop.is_set():
                        return
                    raise exc if isinstance(exc, BlobUnavailable) else BlobUnavailable(
                        f"reading bytes {start}-{end - 1} of {what}: {exc}") from exc
        except BaseException:
            stop.set()
            raise
        finally:
            if conn is not None:
                conn.close()

    jobs = [asyncio.wrap_future(pool.submit(worker)) for _ in range(min(streams or BLOB_STREAMS, len(order)))]
    try:
        await asyncio.gather(*jobs)
    finally:
        if not all(j.done() for j in jobs):  # failed or cancelled: stop the others now, then wait for them
            stop.set()
            with lock:
                for c in conns:
                    try:
                        c.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            await asyncio.shield(asyncio.gather(*jobs, return_exceptions=True))
