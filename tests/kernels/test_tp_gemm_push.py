"""The GEMM that pushes its tiles into the peers' Lamport buffers (kernels/tp_gemm_push.py) + the fused
all-reduce + RMSNorm that then only waits (pushed=True): protocol and math on the CPU through Triton's
interpreter, ranks emulated in one process (tp_gemm_push_cases.py). On 2 GPUs against NCCL: the engine's
start-up self-check (services/inference/tp/fused_norm.py) and tests/inference/test_tp_allreduce.py."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from loraserve.kernels import triton_available

from . import tp_gemm_push_cases as cases
from .interpreter import interpreter_pool


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(cases.ready)


# config: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, REGPRE); split-K 2 sums in the tile's last program;
# None with one row: the GEMV
@pytest.mark.parametrize("dtype,world,rows,hidden,K,config", [
    ("float16", 2, 3, 64, 64, (32, 16, 1, 4, 1, 0)),
    ("float16", 2, 5, 96, 64, (32, 16, 2, 4, 1, 1)),
    ("float16", 4, 2, 64, 32, (64, 16, 2, 4, 1, 0)),
    ("float16", 2, 17, 64, 32, (32, 16, 1, 4, 1, 1)),
    ("float16", 2, 1, 64, 64, None),      # one row: the GEMV with the push (K not a multiple of its BLOCK_K)
    ("float16", 2, 1, 72, 1024, None),    # ... K a multiple of it; N not a multiple of the GEMV's 4-row tiles
    ("bfloat16", 4, 1, 64, 1024, None)])   # bf16: the interpreter's tl.dot mis-computes bf16 (skinny_gemm too)
def test_gemm_push_then_norm_interp(interp, dtype, world, rows, hidden, K, config) -> None:
    interp.submit(cases.check_push_then_norm, dtype, world, rows, hidden, K, config).result(timeout=300)
