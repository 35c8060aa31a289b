"""Fused RMSNorm(+residual), SiLU-and-mul and RoPE kernels vs their torch references: on the CPU
through Triton's interpreter (a spawned TRITON_INTERPRET=1 worker, as test_lora_triton_interp.py),
on the GPU in bf16/fp16/fp32 at Llama-3-8B sizes."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fused_interp_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args) -> None:
    pool.submit(fn, *args).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])  # the interpreter mishandles bf16
@pytest.mark.parametrize("hidden", [64, 96])  # 96: a masked block tail
def test_rms_norm_interp(interp, dtype, hidden) -> None:
    _run(interp, cases.check_rms_norm, dtype, 5, hidden)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_silu_and_mul_interp(interp, dtype) -> None:
    _run(interp, cases.check_silu_and_mul, dtype, 3, 80)


@pytest.mark.parametrize("heads,kv_heads,head_dim,scaling", [
    (4, 2, 16, "default"), (6, 6, 16, "linear"), (4, 1, 16, "llama3"), (3, 1, 24, "default")])  # 24: half not 2^k
def test_rope_interp(interp, heads, kv_heads, head_dim, scaling) -> None:
    _run(interp, cases.check_rope, "float32", 7, heads, kv_heads, head_dim, scaling)




@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("num_tokens", [1, 77, 1024])
@pytest.mark.parametrize("op", ["rms", "silu", "rope"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_ops_gpu(op, num_tokens, dtype) -> None:
    if op == "rms":
        cases.check_rms_norm(dtype, num_tokens, 4096, device="cuda")
    elif op == "silu":
        cases.check_silu_and_mul(dtype, num_tokens, 14336, device="cuda")
    else:
        for scaling in ("default", "llama3"):
            cases.check_rope(dtype, num_tokens, 32, 8, 128, scaling, device="cuda")
