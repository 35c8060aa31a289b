"""The BGMV-style expand (kernels/lora_expand_bgmv.py, LORASERVE_LORA_EXPAND_BGMV) vs the torch reference on
the CPU through Triton's interpreter (a spawned worker): 1-3 slices of unequal widths (column blocks that
straddle slice boundaries, a ragged last block), split-K partials with NaN where undefined, mixed ranks
(incl. 0) in max-rank slots, tokens without an adapter, tiles of 1, 2, 3 and 16 rows (the two-row loop's
odd tail and a long segment)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import expand_bgmv_cases as cases
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
def test_expand_bgmv_matches_reference(interp, num_slices, composition) -> None:
    _run(interp, cases.check_expand_bgmv, "float16", 32, WIDTHS[num_slices], num_tokens=24, num_slots=5,
         composition=composition, split_k=3, block_n=32)


@pytest.mark.parametrize("num_slices", [1, 3])
def test_expand_bgmv_column_loop(interp, num_slices) -> None:
    # 16-column blocks, 3 per program: the peeled first block, the loop, a ragged last run
    _run(interp, cases.check_expand_bgmv, "float32", 16, WIDTHS[num_slices], num_tokens=12, num_slots=4,
         composition="mixed-ranks", split_k=2, block_n=16, cols=48)


@pytest.mark.parametrize("num_tokens,num_slots", [(1, 1), (3, 3), (6, 3), (6, 2), (40, 2)])
def test_expand_bgmv_rows_per_tile(interp, num_tokens, num_slots) -> None:
    # 1 row; 1 row a tile; 2 rows a tile (the hoisted decode path); 3 rows (the odd tail); 16-row tiles
    _run(interp, cases.check_expand_bgmv, "float32", 16, WIDTHS[3], num_tokens=num_tokens, num_slots=num_slots,
         composition="distinct", split_k=2, block_n=64)


@pytest.mark.parametrize("split_k", [1, 7])
def test_expand_bgmv_through_lora_expand(interp, split_k) -> None:
    _run(interp, cases.check_expand_bgmv, "float16", 32, WIDTHS[2], num_tokens=10, num_slots=4,
         composition="mixed-ranks", split_k=split_k, via_switch=True)


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "COLS_PER_PROG": 48, "SLOTS": 0, "B_AHEAD": 2},
                                    {"BLOCK_N": 16, "COLS_PER_PROG": 32, "SLOTS": -2}])
@pytest.mark.parametrize("num_slices", [1, 3])
def test_stream_expand_scale_on_flags(interp, num_slices, config) -> None:
    """The streaming expand's per-slot DoRA flag (scale_on): the rotating, pipelined and default column loops."""
    _run(interp, cases.check_scale_on, "float32", 16, WIDTHS[num_slices], num_tokens=12, num_slots=4, config=config)


@pytest.mark.parametrize("num_tokens,num_slots", [(8, 4), (24, 3)])   # 2-row tiles (hoisted path); 8-row tiles
@pytest.mark.parametrize("num_slices", [1, 3])
def test_expand_bgmv_scale_on_flags(interp, num_slices, num_tokens, num_slots) -> None:
    """The BGMV expand's DoRA epilogue, per-slot flag (scale_on): vs the reference; flags off == no epilogue."""
    _run(interp, cases.check_scale_on, "float32", 16, WIDTHS[num_slices], num_tokens=num_tokens, num_slots=num_slots,
         bgmv=True)


def test_group_major_and_k_major_launch_orders(interp) -> None:
    _run(interp, cases.check_launch_orders)
