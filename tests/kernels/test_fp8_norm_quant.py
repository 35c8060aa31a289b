"""RMSNorm / SiLU-and-mul fused with the per-token e4m3 quantization (kernels/fp8_norm_quant.py): the interpreter on
the CPU (tails, a row past one 2048-wide chunk), the GPU at Llama-3-8B widths."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_norm_quant_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
@pytest.mark.parametrize("t,h,residual", [(3, 96, False), (5, 100, True)])
def test_rms_norm_quant_interp(interp, dtype, t, h, residual) -> None:
    interp.submit(cases.check_rms_norm_quant, dtype, t, h, residual).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("t,i", [(2, 200), (1, 2100)])   # 2100: two 2048-wide chunks, the second short
def test_silu_mul_quant_interp(interp, dtype, t, i) -> None:
    interp.submit(cases.check_silu_mul_quant, dtype, t, i).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("splits,t,h", [(2, 1, 96), (3, 2, 100)])
def test_splitk_add_rms_norm_interp(interp, dtype, splits, t, h) -> None:
    interp.submit(cases.check_splitk_add_rms_norm, dtype, splits, t, h).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 48, 64, 300])
def test_norm_quant_gpu(t) -> None:
    cases.check_rms_norm_quant("bfloat16", t, 4096, True, "cuda")
    cases.check_rms_norm_quant("bfloat16", t, 4096, False, "cuda")
    cases.check_silu_mul_quant("bfloat16", t, 14336, "cuda")
    cases.check_splitk_add_rms_norm("bfloat16", 2, t, 4096, "cuda")
