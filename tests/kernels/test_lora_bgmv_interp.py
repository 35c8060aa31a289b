"""The BGMV shrink (kernels/lora_shrink_bgmv.py) vs the torch reference, on the CPU through Triton's
interpreter (a spawned worker, see interpreter.py): ragged K chunks, mixed ranks (incl. 0) in
max-rank slots, rank 64 (4 rank blocks), rows without an adapter, 1-3 slices, tiles of many rows
(the runtime row loop) and lora_apply end to end with the streaming expand summing the partials."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import bgmv_interp_cases as cases
from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks", "identical"])
@pytest.mark.parametrize("num_slices", [1, 3])
def test_bgmv_shrink_matches_reference(interp, num_slices, composition) -> None:
    widths = [40] if num_slices == 1 else [40, 24, 24]
    # hidden 600 with 256-column chunks: 3 chunks, the last ragged (EVEN_K False)
    _run(interp, cases.check_bgmv_shrink, "float32", 600, 32, widths, 21, 5, composition)


@pytest.mark.parametrize("kchunks", [2, 8])
@pytest.mark.parametrize("composition", ["no-adapter-rows", "mixed-ranks"])
def test_bgmv_shrink_chunked_a(interp, kchunks, composition) -> None:
    # A's 256-column block as 2 / 4 loads (KCHUNKS): hidden 600 (a ragged last block), 1-4 row tiles (21 tokens over
    # 5 slots) and a 16-row tile (40 tokens over 2 slots: the dot path after the chunked branch)
    widths = [40, 24, 24]
    _run(interp, cases.check_bgmv_shrink, "float32", 600, 32, widths, 21, 5, composition, block_k=256, kchunks=kchunks)
    _run(interp, cases.check_bgmv_shrink, "float32", 600, 16, [48], 40, 2, composition, block_k=256, kchunks=kchunks)


@pytest.mark.parametrize("kchunks", [None, 2, 4, 8])
def test_bgmv_shrink_two_rows(interp, kchunks) -> None:
    # ROWS 2 (lora_shrink_bgmv.BGMV_ROWS): 1-2 row tiles on the multiply-sum path (with KCHUNKS: x one chunk ahead),
    # 3-4 row tiles (21 tokens over 5 slots) and 16-row ones (40 tokens over 2 slots) on the tl.dot path
    widths = [40, 24, 24]
    for composition in ("distinct", "mixed-ranks"):
        _run(interp, cases.check_bgmv_shrink, "float32", 600, 32, widths, 21, 5, composition, block_k=256,
             kchunks=kchunks, rows=2)
        _run(interp, cases.check_bgmv_shrink, "float16", 512, 16, widths, 10, 5, composition, block_k=256,
             kchunks=kchunks, rows=2)
    _run(interp, cases.check_bgmv_shrink, "float32", 600, 16, [48], 40, 2, "mixed-ranks", block_k=256, kchunks=kchunks,
         rows=2)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bgmv_shrink_rank64_long_tiles(interp, dtype) -> None:
    # 40 tokens over 2 slots: tiles of 16 rows (the row loop), 4 rank blocks; even K (512 / 256)
    _run(interp, cases.check_bgmv_shrink, dtype, 512, 64, [48], 40, 2, "mixed-ranks")


@pytest.mark.parametrize("num_tokens", [1, 6, 33])
def test_lora_apply_bgmv_matches_reference(interp, num_tokens) -> None:
    _run(interp, cases.check_bgmv_apply, "float32", 768, 16, [48, 16, 16], num_tokens, 4, "no-adapter-rows")
    _run(interp, cases.check_bgmv_apply, "float16", 512, 32, [40], num_tokens, 3, "mixed-ranks")


def test_bgmv_wave_chunks_rule() -> None:
    """lora_shrink_bgmv.wave_chunks: chunks (4 at <= 1024 columns, 8 above) only where the unchunked grid needs more
    than one wave (2 programs per SM at 1024 columns, 1 at 2048) and the chunked one fits one (3 / 2); the 64-token /
    32-adapter layer case (32 used tiles): qkv and down."""
    from loraserve.kernels import lora_shrink_bgmv as sb

    old = sb.BGMV_WAVE_CHUNKS
    try:
        sb.BGMV_WAVE_CHUNKS = (4, 8)
        assert sb.wave_chunks(1024, 32 * 4 * 3) == 4   # qkv: 384 programs > 264, <= 396
        assert sb.wave_chunks(2048, 32 * 7) == 8   # down: 224 > 132, <= 264
        assert sb.wave_chunks(1024, 32 * 4 * 2) == 1   # gate_up: 256 <= 264
        assert sb.wave_chunks(1024, 32 * 4) == 1   # o
        assert sb.wave_chunks(1024, 2 * 4 * 3) == 1   # 1 token
        assert sb.wave_chunks(1024, 16 * 4 * 4 * 3) == 1   # qkv r64 / 16 adapters / 16 tokens: two chunked waves
        assert sb.wave_chunks(512, 10_000) == 1   # smaller blocks: never
        sb.BGMV_WAVE_CHUNKS = (1, 1)
        assert sb.wave_chunks(1024, 32 * 4 * 3) == 1
    finally:
        sb.BGMV_WAVE_CHUNKS = old


def test_bgmv_wide_block_k_rank64_knob() -> None:
    """lora_shrink_bgmv.BGMV_WIDE_BLOCK_K_R64: BLOCK_K for inputs wider than 8192 at rank > 32 only (0: the wide rule's
    2048 at every rank); 4096-wide inputs and rank <= 32 keep their BLOCK_K."""
    from loraserve.kernels import lora_shrink_bgmv as sb

    old = sb.BGMV_WIDE_BLOCK_K_R64, sb.BGMV_WIDE_BLOCK_K, sb.BGMV_BLOCK_K
    try:
        sb.BGMV_WIDE_BLOCK_K, sb.BGMV_BLOCK_K = 2048, None
        sb.BGMV_WIDE_BLOCK_K_R64 = 0
        assert sb.bgmv_shrink_config(16, 64, 14336, 1, 32)["SPLIT_K"] == 7
        sb.BGMV_WIDE_BLOCK_K_R64 = 1024
        cfg = sb.bgmv_shrink_config(16, 64, 14336, 1, 32)
        assert (cfg["BLOCK_K"], cfg["SPLIT_K"]) == (1024, 14), cfg
        assert sb.bgmv_shrink_config(16, 16, 14336, 1, 32)["BLOCK_K"] == 2048   # rank <= 32: the wide rule
        assert sb.bgmv_shrink_config(16, 64, 4096, 3, 32)["BLOCK_K"] == 1024    # 4096 wide: the target split
    finally:
        sb.BGMV_WIDE_BLOCK_K_R64, sb.BGMV_WIDE_BLOCK_K, sb.BGMV_BLOCK_K = old
