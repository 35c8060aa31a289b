"""kernels/greedy.py (fused greedy sampling) vs the torch ops of the engine's sampler: the interpreter on
the CPU with small chunks (several per row), the GPU at the Llama-3 vocabulary, incl. NaN / +inf / all -inf
rows and ties across chunks."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import engine_interp_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("B,V", [(1, 300), (7, 1000), (3, 64)])
def test_greedy_interp(interp, B, V) -> None:
    interp.submit(cases.check_greedy, B, V, "cpu", 128).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B", [1, 8, 64])
def test_greedy_gpu(B) -> None:
    cases.check_greedy(B, 128256, "cuda")
