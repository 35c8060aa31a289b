"""The streaming expand and the streaming shrink configs (LORASERVE_LORA_STREAM, on by default)
vs the torch reference, on the CPU through Triton's interpreter (a spawned worker, see
interpreter.py). Small shapes, chosen so the new loop structure is exercised: several column
blocks per program with a ragged last block, blocks straddling slice boundaries (1-3 slices),
mixed ranks (incl. 0) in max-rank slots, tokens without an adapter, split-K partials summed in
chunks, tiles of 16/32/64 rows and the DoRA scale/shift epilogue."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import stream_interp_cases as cases
from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

WIDTHS = {1: [72], 2: [48, 40], 3: [40, 24, 24]}  # unequal, not multiples of the column block


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks", "identical"])
@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stream_expand_multi_block_programs(interp, dtype, num_slices, composition) -> None:
    # 32-column blocks, 2 per program: 3-4 groups per tile, ragged ends, straddled slices.
    _run(interp, cases.check_stream_expand, dtype, 32, 32, WIDTHS[num_slices], num_tokens=24, num_slots=5,
         composition=composition, config={"BLOCK_N": 32, "COLS_PER_PROG": 64})


@pytest.mark.parametrize("split_k", [2, 5, 32])  # 5: a chunk with masked partials; 32: two chunks
@pytest.mark.parametrize("composition", ["no-adapter-rows", "mixed-ranks"])
def test_stream_expand_sums_split_k_partials(interp, split_k, composition) -> None:
    _run(interp, cases.check_stream_expand, "float32", 32, 16, WIDTHS[3], num_tokens=20, num_slots=4,
         composition=composition, split_k=split_k, config={"SK_CHUNK": 4} if split_k == 32 else None)


@pytest.mark.parametrize("block_m", [32, 64])
def test_stream_expand_prefill_tiles(interp, block_m) -> None:
    _run(interp, cases.check_stream_expand, "float16", 32, 64, WIDTHS[2], num_tokens=150, num_slots=3,
         composition="mixed-ranks", block_m=block_m)


@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3])
def test_stream_expand_dora_epilogue(interp, num_slices, split_k) -> None:
    _run(interp, cases.check_stream_expand, "float32", 32, 16, WIDTHS[num_slices], num_tokens=24, num_slots=4,
         composition="no-adapter-rows", split_k=split_k, with_scale=True,
         config={"BLOCK_N": 32, "COLS_PER_PROG": 32})


@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_lora_apply_stream_and_classic_match_reference(interp, num_tokens) -> None:
    _run(interp, cases.check_stream_apply, "float32", 256, 16, [48, 16, 16], num_tokens, 4, "no-adapter-rows")
    _run(interp, cases.check_stream_apply, "float16", 256, 32, [48, 16], num_tokens, 4, "mixed-ranks")


@pytest.mark.parametrize("num_tokens", [3, 20])
def test_lora_apply_stream_rank64_partials(interp, num_tokens) -> None:
    """Rank 64 takes the partials path with the streaming variant (the classic: reduced)."""
    _run(interp, cases.check_stream_apply, "float32", 512, 64, [40, 24, 24], num_tokens, 3, "mixed-ranks")


def test_stream_shrink_split_k_partials(interp) -> None:
    _run(interp, cases.check_stream_shrink_split, "float32", 1024, 16, [40, 24], 24, 4, "distinct")


@pytest.mark.parametrize("b_ahead,y_ahead", [(2, 2), (3, 3), (4, 1), (4, 3)])
@pytest.mark.parametrize("num_slices", [1, 3])
def test_stream_expand_prefetch_depths(interp, b_ahead, y_ahead, num_slices) -> None:
    # one program walks all 3 blocks (the last ragged): every prefetch depth reaches past col_end.
    _run(interp, cases.check_stream_expand, "float32", 32, 16, WIDTHS[num_slices], num_tokens=24, num_slots=5,
         composition="no-adapter-rows", split_k=3, with_scale=num_slices == 3,
         config={"BLOCK_N": 32, "COLS_PER_PROG": 128, "B_AHEAD": b_ahead, "Y_AHEAD": y_ahead})


@pytest.mark.parametrize("slots", [-3, 2, 3])
@pytest.mark.parametrize("num_slices", [1, 2, 3])
def test_stream_expand_column_loops(interp, slots, num_slices) -> None:
    # fixed slots (2, 3) and the plain loop for Triton's pipeliner (-3): 4 blocks per program in 2 groups,
    # ragged ends, blocks straddling slices, split-K partials, the DoRA epilogue on 3 slices.
    _run(interp, cases.check_stream_expand, "float32", 32, 16, WIDTHS[num_slices], num_tokens=24, num_slots=5,
         composition="mixed-ranks", split_k=2, with_scale=num_slices == 3,
         config={"BLOCK_N": 16, "COLS_PER_PROG": 64, "SLOTS": slots, "B_AHEAD": max(slots, 2),
                 "Y_AHEAD": max(slots, 1)})


@pytest.mark.parametrize("widths,block_n", [([64, 32, 32], 16), ([40, 24, 24], 16), ([48, 48], 32)])
def test_stream_expand_one_slice_per_block(interp, widths, block_n) -> None:
    # blocks inside one slice (one dot) and blocks straddling a bound (40 / 64 in 16-column blocks: the select)
    _run(interp, cases.check_stream_one_slice, widths, 12, 4, block_n)


@pytest.mark.parametrize("sk_chunk", [1, 2])
def test_stream_expand_partials_per_round(interp, sk_chunk) -> None:
    # lora_expand_stream.STREAM_SK_CHUNK_MAX: the split-K partials summed 1 / 2 per load round (7 partials, rank 64)
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    cfg = stream_expand_config(16, 40, 64, 1, 16, 17, 7)
    _run(interp, cases.check_stream_expand, "float32", 64, 64, [40], 16, 16, "mixed-ranks", split_k=7,
         config=dict(cfg, SK_CHUNK=sk_chunk))
    _run(interp, cases.check_stream_expand, "float16", 64, 64, [24, 8, 8], 9, 4, "no-adapter-rows", split_k=7,
         config=dict(stream_expand_config(9, 40, 64, 3, 16, 5, 7), SK_CHUNK=sk_chunk))


def test_stream_sk_chunk_cap_rule() -> None:
    from loraserve.kernels import lora_expand_stream as les

    old = les.STREAM_SK_CHUNK_MAX
    try:
        les.STREAM_SK_CHUNK_MAX = 0
        assert les.stream_expand_config(16, 4096, 64, 1, 16, 17, 7)["SK_CHUNK"] == 8   # down r64 / 16 tokens
        les.STREAM_SK_CHUNK_MAX = 1
        assert les.stream_expand_config(16, 4096, 64, 1, 16, 17, 7)["SK_CHUNK"] == 1
        les.STREAM_SK_CHUNK_MAX = 3
        assert les.stream_expand_config(16, 4096, 64, 1, 16, 17, 7)["SK_CHUNK"] == 2
    finally:
        les.STREAM_SK_CHUNK_MAX = old
