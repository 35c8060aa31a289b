"""The byte side channel of downloads: artifact blobs over plain HTTP/1.1 with byte ranges.

Why: DownloadAdapter moves bytes as protobuf messages through gRPC's Python message path; on the
H200 host a cold 84 MB adapter took ~120 ms to arrive that way over loopback (~0.7-1.1 GB/s, four
ranged streams), most of the cold path's 144 ms (issue 12). Here the same content-addressed blob is
answered with `socket.sendfile` (the kernel copies page cache -> socket; no Python per byte, no
framing), and a client reads its ranges with `recv_into` straight into pinned memory
(services/inference/blob_fetch.py). gRPC stays the control plane: GetAdapter(blob_url=true) answers a
short-lived signed URL (an S3 presigned URL when the artifacts are in S3) and the range digests; the
client still checks every byte against them.

    GET /v1/blobs/sha256/<64 hex>?exp=<unix seconds>&sig=<hex>      Range: bytes=a-b  -> 206
    (or `Authorization: Bearer <read or write token>` instead of exp/sig, when the registry has tokens)

Rules kept from the gRPC side: the path names a digest, never a file (it must be 64 lowercase hex
and is looked up in the store's blob directory); reads need what GetAdapter needs (a signature the
registry made for a caller it let read, or a token); a blob is served only while the store has it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from loraserve.auth_header import refusal

from . import metrics

log = logging.getLogger(__name__)

BLOB_PATH = re.compile(r"/v1/blobs/sha256/([0-9a-f]{64})")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BlobSigner:
    """HMAC-SHA256 signatures of (digest, expiry): what a presigned URL is, for the registry's own port.
    key None: a random key of this process (replicas behind one address need one shared key)."""

    def __init__(self, key: str | bytes | None, ttl_s: float):
        self.key = key.encode() if isinstance(key, str) else (key or secrets.token_bytes(32))
        self.ttl_s = ttl_s

    def _mac(self, digest_hex: str, exp: int) -> str:
        return hmac.new(self.key, f"GET\n{digest_hex}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def sign(self, digest_hex: str, now: float | None = None) -> tuple[str, int]:
        """(the blob's path with its signed query, expiry in unix seconds)."""
        exp = int((time.time() if now is None else now) + self.ttl_s)
        return f"/v1/blobs/sha256/{digest_hex}?exp={exp}&sig={self._mac(digest_hex, exp)}", exp

    def check(self, digest_hex: str, exp: str, sig: str, now: float | None = None) -> str | None:
        """None when (exp, sig) is a live signature of digest_hex, else why not."""
        if not exp.isdigit() or len(exp) > 12:
            return "the URL's expiry is not a number"
        if not hmac.compare_digest(self._mac(digest_hex, int(exp)), sig):
            return "the URL's signature does not match"
        if int(exp) < (time.time() if now is None else now):
            return "the signed URL expired; ask GetAdapter(blob_url=true) again"
        return None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """[start, end) of a single `bytes=` range within size bytes; None: the whole blob (no header,
    or several ranges, answered whole as RFC 7233 allows); "unsatisfiable": 416."""
    if header is None or "," in header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return "unsatisfiable"
    if m.group(1) == "":  # bytes=-n: the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(m.group(1))
    end = size if m.group(2) == "" else min(size, int(m.group(2)) + 1)  # (inclusive last byte, cut at the end)
    return (start, end) if start < size and start < end else "unsatisfiable"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive: a client reads several ranges over one connection
    server_version = "loraserve-registry"
    timeout = 60                       # an idle or stalled connection frees its thread after this
    server: "BlobServer"

    def setup(self) -> None:
        super().setup()
        # the body's last partial segment must not wait for an ACK (Nagle vs delayed ACK: up to 40 ms)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # (per request: debug only)
        log.debug("blob %s: " + fmt, self.client_address[0], *args)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _fail(self, code: int, message: str) -> None:
        data = (message + "\n").encode()
        metrics.REQUESTS.labels("BlobGet", str(code)).inc()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="loraserve-registry"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        m = BLOB_PATH.fullmatch(url.path)
        if m is None:
            return self._fail(404, "not a blob path: GET /v1/blobs/sha256/<64 hex digits>")
        digest_hex = m.group(1)
        why = self.server.refusal(digest_hex, parse_qs(url.query), self.headers.get_all("Authorization") or [])
        if why is not None:
            metrics.AUTH_REFUSED.labels("BlobGet").inc()
            return self._fail(401, why)
        try:
            f = open(self.server.store.blob_path(digest_hex), "rb")  # (a digest's blob, never a named path)
        except FileNotFoundError:
            return self._fail(404, f"no blob sha256:{digest_hex}")
        with f:
            size = os.fstat(f.fileno()).st_size
            span = parse_range(self.headers.get("Range"), size)
            if span == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                metrics.REQUESTS.labels("BlobGet", "416").inc()
                return
            start, end = span if span is not None else (0, size)
            self.send_response(206 if span is not None else 200)
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"sha256:{digest_hex}"')
            self.send_header("Cache-Control", "private, max-age=31536000, immutable")  # content addressed
            self.end_headers()
            if body and end > start:
                # the kernel copies page cache -> socket (os.sendfile; send() on TLS); the GIL is released
                self.connection.sendfile(f, start, end - start)
                metrics.DOWNLOADED_BYTES.inc(end - start)
        metrics.REQUESTS.labels("BlobGet", str(206 if span is not None else 200)).inc()


class BlobServer(ThreadingHTTPServer):
    """Serves `store`'s blobs (a LocalStore) on (host, port) from a daemon thread (one thread per
    connection). port 0 picks a free one (`.port`). TLS when given an ssl context (the registry's
    own certificate: the same clients trust it)."""

    daemon_threads = True
    allow_reuse_address = False  # a second registry on a taken blob port fails instead of sharing it
    # listen backlog: a client opens its connections at once; socketserver's default of 5 dropped the SYNs
    # of 16 (each retried after 1 s: the H200 probe's 16-connection fetch took 1050 ms instead of ~30)
    request_queue_size = 256

    def __init__(self, host: str, port: int, store, signer: BlobSigner, tokens: list[str],
                 tls: ssl.SSLContext | None = None):
        host = host.strip("[]") or "127.0.0.1"
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        if tls is not None:  # (the handshake on the handler's thread: do_handshake_on_connect=False)
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.store, self.signer, self.tokens = store, signer, tokens
        self.port = self.server_address[1]
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-response (it cancelled its download) is not an error here."""
        log.debug("blob connection from %s ended with an error", client_address[0], exc_info=True)

    def refusal(self, digest_hex: str, query: dict, authorization: list[str]) -> str | None:
        """None when the request may read the blob: a live signature, or a read/write token."""
        if "sig" in query or "exp" in query:
            return self.signer.check(digest_hex, (query.get("exp") or [""])[0], (query.get("sig") or [""])[0])
        if self.tokens:
            return refusal(authorization, self.tokens, "blob reads")
        return "a blob URL needs its signature (exp, sig: GetAdapter with blob_url=true gives one)"

    def start(self) -> "BlobServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="registry-blobs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
