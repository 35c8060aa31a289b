"""kernels/gemv.py (decode GEMV, 1-4 tokens, optional fused SiLU-mul) vs its fp32 torch reference:
on the CPU through Triton's interpreter, on the GPU at Llama-3-8B projection shapes."""
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


@pytest.mark.parametrize("M,N,K,bias,silu_mul,prefetch", [
    (1, 40, 96, False, False, 1),    # N not a multiple of BLOCK_N, K a multiple of BLOCK_K (EVEN_K)
    (1, 40, 80, False, False, 0),    # K not a multiple of BLOCK_K, no prefetch
    (3, 24, 64, True, False, 1),     # M padded to 4, bias
    (2, 16, 48, False, True, 0),     # SiLU-mul on the fly (x = gate_up [M, 2K])
    (4, 33, 80, True, True, 1),
])
def test_gemv_interp(interp, M, N, K, bias, silu_mul, prefetch) -> None:
    # float16 (the interpreter mishandles bf16); small tiles so the K loop and the prefetch run several steps
    interp.submit(cases.check_gemv, "float16", M, N, K, bias, silu_mul, "cpu", (8, 16, 4, prefetch)).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("N,K,silu_mul", [(6144, 4096, False), (4096, 4096, False), (4096, 14336, True),
                                          (1000, 4096, False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gemv_gpu(M, N, K, silu_mul, dtype) -> None:
    cases.check_gemv(dtype, M, N, K, bias=N == 1000, silu_mul=silu_mul, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemv_graph_replay_equals_eager(monkeypatch) -> None:
    """With programmatic dependent launch on (LORASERVE_PDL=1) inside a CUDA graph, after RMSNorm: replay
    equals eager bit for bit and both equal the reference."""
    from loraserve.kernels.gemv import gemv, gemv_ref
    from loraserve.kernels.rmsnorm import rms_norm

    monkeypatch.setenv("LORASERVE_PDL", "1")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4096, device="cuda", generator=g).bfloat16()
    w = (torch.randn(6144, 4096, device="cuda", generator=g) / 64).bfloat16()
    norm_w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    eager = gemv(rms_norm(x, norm_w, 1e-5), w)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gemv(rms_norm(x, norm_w, 1e-5), w)   # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = gemv(rms_norm(x, norm_w, 1e-5), w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    torch.testing.assert_close(out, gemv_ref(rms_norm(x, norm_w, 1e-5), w), rtol=1.6e-2, atol=1.6e-2)
    x.copy_(-x)   # the graph follows its input
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gemv(rms_norm(x, norm_w, 1e-5), w))
