"""The TMA-fed expand (kernels/lora_tma_expand.py, LORASERVE_LORA_TMA_EXPAND) and the pure-read kernels
(lora_tma_read.py) vs torch references on the CPU through Triton's interpreter (a spawned worker, host TMA
descriptors emulated): 1-3 slices of unequal widths (boxes straddling slice boundaries and the slot's end, a ragged
last run), split-K partials with NaN where undefined, mixed ranks (incl. 0) in rank-16/32 slots, rows without an
adapter, 1-row to 16-row tiles, DoRA's epilogue with per-slot flags, and the dispatch through lora_expand."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import tma_interp_cases as cases
from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

WIDTHS = {1: [72], 2: [48, 40], 3: [40, 24, 24]}


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks", "identical"])
@pytest.mark.parametrize("num_slices", [1, 2, 3])
def test_tma_expand_matches_reference(interp, num_slices, composition) -> None:
    # 16-column boxes, 2 per program: boxes straddle the slice bounds and the slot's end (N = 72 / 88)
    _run(interp, cases.check_tma_expand, "float16", 16, WIDTHS[num_slices], num_tokens=24, num_slots=5,
         composition=composition, split_k=3, config=dict(BLOCK_N=16, COLS_PER_PROG=32, STAGES=3))


@pytest.mark.parametrize("y_tma", [True, False])
@pytest.mark.parametrize("num_tokens,num_slots", [(1, 1), (6, 3), (40, 2)])
def test_tma_expand_rows_per_tile(interp, num_tokens, num_slots, y_tma) -> None:
    # 1 row; 2 rows a tile (the decode loop, y through TMA boxes or plain loads); 16-row tiles (the dot loop, a long
    # segment over several tiles); rank 32 slots
    _run(interp, cases.check_tma_expand, "float32", 32, WIDTHS[2], num_tokens=num_tokens, num_slots=num_slots,
         composition="distinct", split_k=2, config=dict(BLOCK_N=32, COLS_PER_PROG=64, STAGES=2, Y_TMA=y_tma))


@pytest.mark.parametrize("num_slices", [1, 2])
def test_tma_expand_wide_b_rows(interp, num_slices) -> None:
    # B's boxes as 64-wide rows of its flat view (B_WIDE), reshaped: 16-column boxes at rank 16 (4 rows a box)
    _run(interp, cases.check_tma_expand, "float16", 16, [64, 64][:num_slices], num_tokens=12, num_slots=6,
         composition="mixed-ranks", split_k=2, config=dict(BLOCK_N=16, COLS_PER_PROG=48, STAGES=3, B_WIDE=True))


@pytest.mark.parametrize("num_tokens,num_slots,y_tma", [(6, 3, True), (40, 2, True), (40, 2, False), (9, 4, True)])
def test_tma_expand_row_pairs(interp, num_tokens, num_slots, y_tma) -> None:
    # PAIRS: every tile as row pairs through the decode loop (odd tails, 16-row tiles, y with or without TMA), no dot
    _run(interp, cases.check_tma_expand, "float16", 16, WIDTHS[3], num_tokens=num_tokens, num_slots=num_slots,
         composition="mixed-ranks", split_k=2, config=dict(BLOCK_N=16, COLS_PER_PROG=48, STAGES=3, PAIRS=True,
                                                           Y_TMA=y_tma), with_scale=True)


def test_tma_expand_dora_flags(interp) -> None:
    _run(interp, cases.check_tma_expand, "float16", 16, WIDTHS[3], num_tokens=12, num_slots=4,
         composition="mixed-ranks", split_k=1, with_scale=True)


@pytest.mark.parametrize("split_k", [1, 5])
def test_tma_expand_through_lora_expand(interp, split_k) -> None:
    _run(interp, cases.check_tma_expand, "float16", 16, WIDTHS[2], num_tokens=10, num_slots=4,
         composition="mixed-ranks", split_k=split_k, via_switch=True)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks"])
@pytest.mark.parametrize("num_slices,num_tokens,num_slots", [(1, 6, 3), (3, 8, 4), (2, 40, 2), (1, 1, 1)])
def test_tma_shrink_matches_reference(interp, num_slices, num_tokens, num_slots, composition) -> None:
    # K 160 in chunks of 64 (boxes of 32: two chunks of 2 boxes, a ragged last chunk of one box); 1-2 row tiles
    # (the per-row loop, x through TMA or not), 16-row tiles (the dot loop)
    for x_tma in (True, False):
        _run(interp, cases.check_tma_shrink, "float32", 16, WIDTHS[num_slices], 160, num_tokens, num_slots,
             composition, block_k=64, config=dict(BOX_K=32, STAGES=3, X_TMA=x_tma))


@pytest.mark.parametrize("max_rank", [16, 32])
def test_tma_shrink_through_bgmv_launcher(interp, max_rank) -> None:
    _run(interp, cases.check_tma_shrink, "float16", max_rank, WIDTHS[3], 256, 10, 4, "mixed-ranks", block_k=128,
         via_switch=True)


def test_read_kernels_match_torch_sums(interp) -> None:
    _run(interp, cases.check_reads)
