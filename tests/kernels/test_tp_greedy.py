"""kernels/tp_greedy.py (greedy sampling over tensor-parallel vocabulary shards) against sampler.sample() on the
whole rows and tp/sampling.py's torch stats: ranks emulated in one process, the interpreter on the CPU (small
chunks: several per shard), the GPU at the Llama-3 vocabulary; NaN / +inf / all -inf rows, ties across shards,
a vocabulary that does not split evenly (padding columns in the last shard)."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from . import tp_greedy_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("T,V,world,dtype", [(9, 301, 2, "float32"), (1, 200, 2, "bfloat16"),
                                             (8, 250, 3, "bfloat16")])
def test_tp_greedy_interp(interp, T, V, world, dtype) -> None:
    interp.submit(cases.check_ranks, T, V, world, dtype, "cpu", 64).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,world", [(1, 2), (9, 2), (64, 2), (8, 4)])
def test_tp_greedy_gpu(T, world) -> None:
    cases.check_ranks(T, 128256, world, "bfloat16", "cuda", None)
