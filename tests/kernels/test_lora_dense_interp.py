"""The dense shrink (kernels/lora_shrink_dense.py) and lora_apply's dense path vs float64 references, on
the CPU through Triton's interpreter (a spawned worker, see interpreter.py): ragged K (hidden 600 over
128-column steps), split K, 1-3 slices, rows without an adapter, mixed ranks incl. 0 in max-rank slots,
a pool slice with an offset, both backends (our kernel, and torch.mm standing in for cuBLAS)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import dense_interp_cases as cases
from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


@pytest.mark.parametrize("backend", ["triton", "mm"])
def test_dense_shrink_matches_reference(interp, backend) -> None:
    _run(interp, cases.check_dense_shrink, "float32", 600, 16, [40, 24, 24], 37, 4, backend)
    _run(interp, cases.check_dense_shrink, "float16", 2048, 32, [48], 70, 3, backend)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks"])
def test_lora_apply_dense_matches_reference(interp, composition) -> None:
    _run(interp, cases.check_dense_apply, "float32", 600, 16, [48, 16, 16], 40, 5, composition, "triton")
    _run(interp, cases.check_dense_apply, "float16", 512, 32, [40], 33, 3, composition, "triton")


def test_lora_apply_dense_mm_backend(interp) -> None:
    _run(interp, cases.check_dense_apply, "float32", 600, 16, [48, 16], 36, 4, "no-adapter-rows", "mm")


@pytest.mark.parametrize("shrink", ["", "triton"])
@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks"])
def test_dense_expand_matches_reference(interp, composition, shrink) -> None:
    # widths 200 / 72 / 40: 128-column blocks straddle slice boundaries; 40 tokens over 6 slots
    _run(interp, cases.check_dense_expand_apply, "float32", 256, 16, [200, 72, 40], 40, 6, composition, shrink)
    _run(interp, cases.check_dense_expand_apply, "float16", 512, 32, [384], 33, 9, composition, shrink)
    _run(interp, cases.check_dense_expand_apply, "float32", 256, 16, [200, 72, 40], 40, 6, composition, shrink,
         wide=True)


def test_dense_expand_dora_and_few_tokens(interp) -> None:
    # DoRA epilogue; 5 tokens (BLOCK_M 16) over 4 slots with the tiled shrink (32 slots > 5 tokens: no dense shrink)
    _run(interp, cases.check_dense_expand_apply, "float32", 256, 16, [256, 128], 40, 5, "no-adapter-rows", "triton",
         with_scale=True)
    _run(interp, cases.check_dense_expand_apply, "float32", 256, 8, [130, 126], 5, 4, "uniform", "")


@pytest.mark.parametrize("rank,wide", [(64, False), (48, True), (32, False)])
def test_dense_expand_larger_ranks(interp, rank, wide) -> None:
    # 1-2 slots a step (GROUP * 16 // BLOCK_R), mixed ranks in max-rank slots (48: ragged last chunk)
    _run(interp, cases.check_dense_expand_apply, "float32", 128, rank, [96, 64], 20, 5, "mixed-ranks", "",
         wide=wide)
