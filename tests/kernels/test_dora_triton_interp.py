"""DoRA's expand epilogue (y = (y + delta) * g[slot]) in Triton vs the torch reference, on the
CPU through Triton's interpreter (one spawned worker, as test_lora_triton_interp.py explains)."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import dora_interp_cases

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned worker only
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        from . import interp_cases
        assert pool.submit(interp_cases.worker_ready).result(timeout=300)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield pool
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("composition", ["distinct", "no-adapter-rows", "mixed-ranks"])
@pytest.mark.parametrize("widths", [[40], [48, 40, 24]])  # one slice; q/k/v-like fused slices
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dora_epilogue_matches_reference(interp, dtype, widths, composition) -> None:
    interp.submit(dora_interp_cases.check_dora_epilogue, dtype, widths, composition).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dora_epilogue_with_bias_shift(interp, dtype) -> None:
    """(y + delta) * g + (1 - g) * bias: the shift that keeps a biased projection's bias unscaled."""
    interp.submit(dora_interp_cases.check_dora_epilogue, dtype, [48, 40, 24], "no-adapter-rows",
                  with_shift=True).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_lora_apply_with_dora_scale(interp, dtype) -> None:
    interp.submit(dora_interp_cases.check_lora_apply_paths_scale, dtype).result(timeout=300)
