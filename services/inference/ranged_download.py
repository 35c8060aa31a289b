"""One artifact downloaded as several byte ranges at once, hashed in order while it arrives.

Why: one DownloadAdapter stream on loopback ran at ~0.45 GB/s on the H200 host (84 MB in
180-197 ms, issue 12): one HTTP/2 stream is paced by its flow-control window and by one Python
thread on each side. Ranges of `range_bytes` are asked for in order, `streams` at a time, over
the one channel (the way S3 clients fetch ranged GETs in parallel); the sha256 of the whole
artifact is computed on one worker thread as the bytes become contiguous, so the digest is ready
one message after the last byte arrives instead of one pass over 84 MB later.

The result is the list of the messages' own bytes in artifact order (`Chunks`, never joined),
exactly what the single-stream download gives, so everything after it is unchanged.

A registry that predates ranges ignores the request's offset/length and sends the whole
artifact: the first range then runs past its length and `RangesUnsupported` is raised, so the
caller can fall back to one stream.
"""
from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from .download_files import pwrite_all

# parallel DownloadAdapter streams per artifact (1: the single stream, as before) and bytes per
# range; artifacts of at most one range are always one stream. LORASERVE_DOWNLOAD_STREAMS /
# LORASERVE_DOWNLOAD_RANGE: overrides (benchmarks/cold_diag.py sweeps them)
DOWNLOAD_STREAMS = max(1, int(os.environ.get("LORASERVE_DOWNLOAD_STREAMS", 4)))
# H200 probe (17:30, 84 MB, registry process on loopback): 1 stream 115-128 ms, 4 x 8 MiB 91-101, 4 x 4 MiB
# 77-95; the registry's range digests use the same size (services/registry/range_digests.py)
RANGE_BYTES = max(1 << 20, int(os.environ.get("LORASERVE_DOWNLOAD_RANGE", 4 << 20)))


async def open_first_range(stub, name: str, version: int, metadata, timeout_s: float, chunk_size: int,
                           range_bytes: int):
    """(the open call, its AdapterVersion, its range digests (range_bytes, [sha256]) or None): the first
    range [0, range_bytes) of {name, version} asked for
    without asking GetAdapter first (one round trip less on a cold adapter: the stream's first message
    names the version and its digest). The caller hands the call to download_ranges(first=...) or
    cancels it (the artifact was cached after all). grpc errors propagate."""
    from loraserve.v1 import registry_pb2 as pb

    call = stub.DownloadAdapter(pb.DownloadAdapterRequest(name=name, version=version, chunk_size=chunk_size,
                                                          offset=0, length=range_bytes),
                                metadata=metadata, timeout=timeout_s)
    try:
        msg = await call.read()
    except BaseException:
        call.cancel()
        raise
    which, adapter = (None, None) if msg is grpc.aio.EOF else _payload(msg)
    if which != "adapter":
        call.cancel()
        raise ConnectionError(f"the registry's download of {name!r} v{version} did not begin with its version")
    rd = msg.range_digests if msg.HasField("range_digests") else None
    return call, adapter, ((rd.range_bytes, list(rd.sha256)) if rd is not None and rd.range_bytes > 0 else None)


# DownloadAdapter responses split by hand (LORASERVE_DOWNLOAD_RAW=1): a chunk message is field 2, bytes:
# tag 0x12, a varint length, the bytes; it is handed on as a memoryview of the received message, not
# decoded (protobuf's decode copies 1 MiB into its arena and again into the `chunk` bytes object)
DOWNLOAD_RAW = os.environ.get("LORASERVE_DOWNLOAD_RAW", "0") != "0"
_METHOD = "/loraserve.v1.RegistryService/DownloadAdapter"


def split_download_response(raw: bytes):
    """A DownloadAdapterResponse's wire bytes -> memoryview of its chunk, or the decoded message
    (the `adapter` one, or anything not a lone chunk field)."""
    if raw[:1] == b"\x12":
        n, shift, i = 0, 0, 1
        while i < len(raw) and i < 11:
            byte = raw[i]
            n |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                if i + n == len(raw):
                    return memoryview(raw)[i:]
                break
            shift += 7
    from loraserve.v1 import registry_pb2 as pb

    return pb.DownloadAdapterResponse.FromString(raw)


class RawDownloads:
    """A stand-in for the stub's DownloadAdapter whose chunk messages come as memoryviews."""

    def __init__(self, channel):
        from loraserve.v1 import registry_pb2 as pb

        self.DownloadAdapter = channel.unary_stream(_METHOD, request_serializer=pb.DownloadAdapterRequest.SerializeToString,
                                                    response_deserializer=split_download_response)


def _payload(msg):
    """("chunk", bytes-like) or ("adapter", AdapterVersion) or (None, None) of one response."""
    if isinstance(msg, memoryview):
        return "chunk", msg
    which = msg.WhichOneof("payload")
    return which, (msg.chunk if which == "chunk" else msg.adapter if which == "adapter" else None)


class RangesUnsupported(Exception):
    """The registry sent more bytes than a range asked for: it does not serve byte ranges."""


def registry_serves_ranges() -> bool:
    """Whether these generated stubs know DownloadAdapterRequest.offset/length (older stubs do not)."""
    from loraserve.v1 import registry_pb2 as pb

    return "offset" in pb.DownloadAdapterRequest.DESCRIPTOR.fields_by_name


def plan_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    """[(offset, length)] covering [0, size) in order, each <= range_bytes (the last may be shorter)."""
    return [(off, min(range_bytes, size - off)) for off in range(0, size, range_bytes)]


class _Placer:
    """Each piece, as it arrives, copied to its offset in `dest` (a [size] uint8 CPU tensor: pinned on
    CUDA, so the weights are staged for the host->GPU copy by the time the download ends) and written
    to its offset in the file `fd`, on worker threads (both release the GIL; any order). The hasher
    keeps a piece only until it is hashed, so nothing holds the whole artifact twice."""

    def __init__(self, dest, fd: int | None, pool: ThreadPoolExecutor, on_landed=None):
        self.base = dest.data_ptr() if dest is not None else None
        self.size = dest.numel() if dest is not None else None
        self.fd, self.pool, self.jobs = fd, pool, []
        self.on_landed = on_landed  # (start, end): those bytes of dest hold their final value

    def put(self, offset: int, piece: bytes) -> None:
        if offset + len(piece) > (self.size if self.size is not None else offset + len(piece)):
            raise ConnectionError(f"a piece at {offset}+{len(piece)} lies past the artifact's end")
        self.jobs.append(self.pool.submit(self._place, offset, piece))

    def _place(self, offset: int, piece: bytes) -> None:
        if self.base is not None:
            # a foreign call: the GIL is released (a memoryview piece: by its address; `piece` keeps it alive)
            src = piece if isinstance(piece, bytes) else np.frombuffer(piece, dtype=np.uint8).ctypes.data
            ctypes.memmove(self.base + offset, src, len(piece))
            if self.on_landed is not None:
                self.on_landed(offset, offset + len(piece))
        if self.fd is not None:
            pwrite_all(self.fd, piece, offset)

    async def wait(self) -> None:
        if self.jobs:
            await asyncio.gather(*(asyncio.wrap_future(j) for j in self.jobs))


class _InOrderHasher:
    """sha256 over pieces that arrive per range, out of order across ranges but in order within
    one: pieces are fed to one worker thread (hashlib releases the GIL) as soon as every byte
    before them has arrived. Also gives the pieces back in artifact order."""

    def __init__(self, num_ranges: int, pool: ThreadPoolExecutor, keep: bool = True):
        self.keep = keep                    # False: pieces are dropped once hashed (a _Placer has them)
        self.sha = hashlib.sha256()
        self.pieces: list[list[bytes]] = [[] for _ in range(num_ranges)]
        self.complete = [False] * num_ranges
        self._range, self._piece = 0, 0     # the next piece to hash
        self._pool = pool
        self._last = None                   # the last hash job submitted (jobs run in order: one worker)

    def add(self, r: int, piece: bytes) -> None:
        self.pieces[r].append(piece)
        self._advance()

    def finish(self, r: int) -> None:
        self.complete[r] = True
        self._advance()

    def _advance(self) -> None:
        while self._range < len(self.pieces):
            got = self.pieces[self._range]
            while self._piece < len(got):
                self._last = self._pool.submit(self.sha.update, got[self._piece])
                if not self.keep:
                    got[self._piece] = b""
                self._piece += 1
            if not self.complete[self._range]:
                return
            self._range, self._piece = self._range + 1, 0

    async def digest(self) -> str:
        """"sha256:<hex>" once every range is complete and hashed."""
        assert all(self.complete), "digest asked for before every range arrived"
        if self._last is not None:
            await asyncio.wrap_future(self._last)
        return "sha256:" + self.sha.hexdigest()

    def ordered(self) -> list[bytes]:
        return [p for pieces in self.pieces for p in pieces]


async def download_ranges(stub, meta, metadata, timeout_s: float, chunk_size: int, pool: ThreadPoolExecutor,
                          streams: int | None = None, range_bytes: int | None = None, dest=None,
                          fd: int | None = None, place_pool: ThreadPoolExecutor | None = None, on_landed=None,
                          first=None, range_sha=None, verify_pool: ThreadPoolExecutor | None = None
                          ) -> tuple[list[bytes] | None, str]:
    """(the artifact's pieces in order, "sha256:<hex>" of them) for `meta` (name, version, digest,
    size > 0) over `stub` (a RegistryServiceStub on an aio channel). grpc errors propagate as they
    are (the caller translates them); RangesUnsupported when the registry ignores ranges; a range
    that ends short raises ConnectionError (the registry's artifact changed or was cut).
    dest ([size] uint8 CPU tensor) and/or fd (a file opened for writing): each piece is placed at its
    offset there as it arrives (on place_pool), and the pieces are not kept (None is returned);
    on_landed(start, end) is called (on a worker thread) as each piece lands in dest.
    first: the call open_first_range made (its `adapter` message read): it serves range 0.
    range_sha: the registry's range digests (range_bytes, [sha256 per range]); when they match this
    plan, each range is checked on its own as it completes (on verify_pool's threads) instead of the
    whole artifact hashed in order, and meta.digest is returned if every range checked out.

    Ranges are asked for in artifact order except the last, which goes second: a tar's end (its
    closing blocks, any file after the weights) is then there early for a parser reading the
    bytes as they arrive (the in-order hash simply keeps that range's pieces until their turn)."""
    from loraserve.v1 import registry_pb2 as pb

    streams = DOWNLOAD_STREAMS if streams is None else streams   # (the module's values when called: overrides)
    range_bytes = RANGE_BYTES if range_bytes is None else range_bytes
    ranges = plan_ranges(meta.size, range_bytes)
    placing = dest is not None or fd is not None
    # the registry's digests may be finer than the ranges (LORASERVE_RANGE_DIGEST_BYTES): k of them a range
    unit = range_sha[0] if range_sha is not None else 0
    by_range = (unit > 0 and range_bytes % unit == 0 and len(range_sha[1]) == -(-meta.size // unit))
    k = range_bytes // unit if by_range else 0
    hasher = _InOrderHasher(len(ranges), pool, keep=not placing) if not by_range else None
    range_pieces: list[list] = [[] for _ in ranges]   # by_range: each range's pieces until checked
    checks: list = [None] * len(ranges)
    placer = _Placer(dest, fd, place_pool, on_landed) if placing else None
    gate = asyncio.Semaphore(max(1, streams))  # FIFO: ranges start in artifact order

    async def fetch(r: int, offset: int, length: int) -> None:
        async with gate:
            if r == 0 and first is not None:
                call = first[0]
            else:
                call = stub.DownloadAdapter(pb.DownloadAdapterRequest(
                    name=meta.name, version=meta.version, chunk_size=chunk_size, offset=offset, length=length),
                    metadata=metadata, timeout=timeout_s)
            got = 0
            try:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    which, value = _payload(msg)
                    if which == "chunk":
                        got += len(value)
                        if got > length:
                            raise RangesUnsupported(f"the registry sent more than the {length} bytes asked for")
                        if placer is not None:
                            placer.put(offset + got - len(value), value)
                        if hasher is not None:
                            hasher.add(r, value)
                        else:
                            range_pieces[r].append(value)
                    elif which == "adapter" and value.digest != meta.digest:
                        raise ConnectionError(f"range {offset}+{length}: the registry now names digest "
                                              f"{value.digest}, not {meta.digest}")
            finally:
                call.cancel()  # a no-op once the stream ended; stops it when this range failed
            if got != length:
                raise ConnectionError(f"range {offset}+{length} of {meta.name!r} v{meta.version} ended after "
                                      f"{got} bytes")
            if hasher is not None:
                hasher.finish(r)
            else:
                checks[r] = (verify_pool or pool).submit(_range_matches, range_pieces[r], range_sha[1][r * k:(r + 1) * k],
                                                         unit)
                if placing:
                    range_pieces[r] = []  # (the check holds them until it ran)

    order = list(range(len(ranges)))
    if len(order) > 2:
        order = [0, order[-1], *order[1:-1]]
    tasks = [asyncio.ensure_future(fetch(r, *ranges[r])) for r in order]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # one range failed: the others stop now, not after their bytes arrived
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if first is not None:
            first[0].cancel()  # (a no-op once range 0 ended)
        if placer is not None:  # no copy may still write into dest once this returns (or raises)
            await asyncio.gather(placer.wait(), return_exceptions=True)
    if placer is not None:
        await placer.wait()  # raises what a copy or write raised
    if hasher is not None:
        return (None if placing else hasher.ordered()), await hasher.digest()
    ok = await asyncio.gather(*(asyncio.wrap_future(c) for c in checks))
    bad = [r for r, good in enumerate(ok) if not good]
    got = meta.digest if not bad else f"sha256:<ranges {bad} do not match the registry's range digests>"
    return (None if placing else [p for pieces in range_pieces for p in pieces]), got


def _range_matches(pieces: list, wants: list[bytes], unit: int) -> bool:
    """Whether the pieces (one range, in order) hash to `wants`, one sha256 per `unit` bytes (the last shorter)."""
    got, h, left = [], hashlib.sha256(), unit
    for p in pieces:
        view = memoryview(p).cast("B")
        while len(view):
            take = min(left, len(view))
            h.update(view[:take])
            view, left = view[take:], left - take
            if left == 0:
                got.append(h.digest())
                h, left = hashlib.sha256(), unit
    if left != unit:
        got.append(h.digest())
    return got == list(wants)
