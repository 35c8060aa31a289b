"""The ticketed one-launch LoRA kernel (kernels/lora_onelaunch.py), and the streaming expand's
B_AHEAD=3 knob, vs the torch reference under
Triton's interpreter (CPU), in a TRITON_INTERPRET=1 worker (see test_lora_triton_interp.py)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import interp_cases, onelaunch_cases
from .interpreter import interpreter_pool

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

WIDTHS = {1: [40], 2: [48, 40], 3: [40, 24, 24]}  # unequal, not multiples of the column block


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interp_cases.worker_ready)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


# Small per-SM targets so a 6-20 token problem still gets several K chunks and column groups.
SMALL_GRID = dict(block_k=32, block_n=16, shrink_per_sm=0.2, expand_per_sm=0.3)


@pytest.mark.parametrize("num_tokens,num_slices,composition", [
    (1, 3, "distinct"), (1, 1, "mixed-ranks"), (6, 3, "mixed-ranks"), (20, 2, "zipf:1.5"),
    (20, 3, "no-adapter-rows"), (20, 1, "identical"),  # identical: one slot, two 16-row tiles
])
def test_onelaunch_matches_reference(interp, num_tokens, num_slices, composition) -> None:
    # 80: a ragged K tail under BLOCK_K=32; BLOCK_N=16 makes column groups straddle slices.
    _run(interp, onelaunch_cases.check_onelaunch_matches_reference, "float32", 80, 32, WIDTHS[num_slices],
         num_tokens=num_tokens, num_slots=4, composition=composition, config=SMALL_GRID)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_onelaunch_default_plan(interp, dtype) -> None:
    _run(interp, onelaunch_cases.check_onelaunch_matches_reference, dtype, 512, 16, [48, 16, 16],
         num_tokens=2, num_slots=3, composition="mixed-ranks")


def test_onelaunch_through_lora_apply(interp) -> None:
    _run(interp, onelaunch_cases.check_lora_apply_onelaunch)


@pytest.mark.parametrize("num_slices,split_k", [(1, 1), (3, 5), (2, 2)])
def test_stream_expand_three_blocks_ahead(interp, num_slices, split_k) -> None:
    """The streaming expand with a third B block in flight (config B_AHEAD=3, a benchmark knob):
    32-column blocks, 3 per program (ragged ends, straddled slices), DoRA epilogue."""
    from . import stream_interp_cases

    _run(interp, stream_interp_cases.check_stream_expand, "float32", 32, 16, WIDTHS[num_slices], num_tokens=24,
         num_slots=4, composition="no-adapter-rows", split_k=split_k, with_scale=True,
         config={"BLOCK_N": 32, "COLS_PER_PROG": 96, "B_AHEAD": 3})


@pytest.mark.parametrize("dtype,with_scale", [("float32", True), ("float16", False)])
def test_lora_add_joins_the_delta(interp, dtype, with_scale) -> None:
    """kernels/lora_add.py (the join of LORASERVE_LORA_OVERLAP=full) vs a per-row loop."""
    _run(interp, onelaunch_cases.check_lora_add, dtype, with_scale)
