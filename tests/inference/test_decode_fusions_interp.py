"""The decode fusions' engine glue on the CPU through Triton's interpreter vs HF (decode_fusions_cases.py)."""
from __future__ import annotations

import pytest

from loraserve.kernels import triton_available
from tests.kernels.interpreter import interpreter_pool, interpreting


@pytest.mark.slow
def test_fused_engine_interp_matches_hf() -> None:
    if not triton_available():
        pytest.skip("triton not installed")
    from . import decode_fusions_cases as cases

    for pool in interpreter_pool(interpreting):
        pool.submit(cases.check_fused_engine_vs_hf).result(timeout=600)
