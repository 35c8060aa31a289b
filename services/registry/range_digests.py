"""Range digests: the sha256 of each RANGE_BYTES-long piece of an artifact, kept beside its blob.

Computed at upload from the verified staged file (the same bytes its sha256 digest names) and sent
with a download's first message, so a client downloading ranges in parallel can check each range
on its own thread: one thread hashes ~1 GB/s on the H200 host (84 MB in 85 ms, the floor of a cold
adapter's path when the whole artifact is hashed in order). A blob without them (uploaded before)
is downloaded and verified as before. Format: b"LRD1", range_bytes (8 bytes little-endian), then
32 bytes per range.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# the range size clients ask for by default (services/inference/ranged_download.py); a client checks digests
# of any size that divides its ranges (LORASERVE_RANGE_DIGEST_BYTES, e.g. 1 MiB: a parser reading a download
# as it arrives gets verified bytes 1 MiB at a time instead of 4)
RANGE_BYTES = max(64 << 10, int(os.environ.get("LORASERVE_RANGE_DIGEST_BYTES", 4 << 20)))
_MAGIC = b"LRD1"


def compute(path: Path, range_bytes: int | None = None) -> bytes:
    """The encoded range digests of the file at `path` (range_bytes: RANGE_BYTES when called)."""
    range_bytes = range_bytes or RANGE_BYTES
    out = [_MAGIC, range_bytes.to_bytes(8, "little")]
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(range_bytes):
            out.append(hashlib.sha256(piece).digest())
    return b"".join(out)


def decode(data: bytes | None, size: int) -> tuple[int, list[bytes]] | None:
    """(range_bytes, [32-byte digest per range]) if `data` is well formed for an artifact of `size`
    bytes, else None (then the client hashes the whole artifact)."""
    if not data or len(data) < 12 or data[:4] != _MAGIC:
        return None
    range_bytes = int.from_bytes(data[4:12], "little")
    body = data[12:]
    if range_bytes <= 0 or len(body) % 32 or len(body) // 32 != -(-size // range_bytes):
        return None
    return range_bytes, [body[i:i + 32] for i in range(0, len(body), 32)]
