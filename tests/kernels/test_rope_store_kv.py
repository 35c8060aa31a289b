"""kernels/rope.py rope_store_kv (RoPE on q and k + the K/V cache write, one launch) vs the torch reference
(RoPE, then index_copy_ at the slots): interpreter on the CPU, Llama-3-8B heads on the GPU."""
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


@pytest.mark.parametrize("T,H,KVH,D", [(5, 4, 2, 16), (3, 6, 6, 16), (7, 3, 1, 24)])   # 24: half not 2^k
def test_rope_store_kv_interp(interp, T, H, KVH, D) -> None:
    interp.submit(cases.check_rope_store_kv, "float32", T, H, KVH, D, 4).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("T", [1, 77, 1024])
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_rope_store_kv_gpu(monkeypatch, dtype, T, pdl) -> None:
    monkeypatch.setenv("LORASERVE_PDL", pdl)
    cases.check_rope_store_kv(dtype, T, 32, 8, 128, 16, device="cuda")
