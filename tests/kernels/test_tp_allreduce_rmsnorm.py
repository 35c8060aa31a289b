"""The fused one-shot all-reduce + residual add + RMSNorm of tensor parallelism (kernels/allreduce_rmsnorm.py):
the protocol and the math on the CPU through Triton's interpreter (ranks emulated in one process,
tp_allreduce_rmsnorm_cases.py). On 2 GPUs against NCCL + the separate norm: tests/inference/test_tp_allreduce.py."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from loraserve.kernels import triton_available

from . import tp_allreduce_rmsnorm_cases as cases
from .interpreter import interpreter_pool


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(cases.ready)


@pytest.mark.parametrize("dtype,world,rows,hidden", [
    ("float16", 2, 1, 64), ("float16", 2, 5, 96), ("float16", 4, 3, 64), ("bfloat16", 2, 2, 64)])
def test_allreduce_rmsnorm_interp(interp, dtype, world, rows, hidden) -> None:
    interp.submit(cases.check_ranks, dtype, world, rows, hidden).result(timeout=300)


def test_allreduce_rmsnorm_missing_peer_interp(interp) -> None:
    interp.submit(cases.check_missing_peer_gives_up).result(timeout=300)
