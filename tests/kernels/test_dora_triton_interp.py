"""DoRA's expand epilogue (y = (y + delta) * g[slot]) in Triton vs the torch reference, on the
CPU through Triton's interpreter (one spawned worker, as test_lora_triton_interp.py explains)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import dora_interp_cases
from .interpreter import interpreter_pool

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    from . import interp_cases
    yield from interpreter_pool(interp_cases.worker_ready)


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
