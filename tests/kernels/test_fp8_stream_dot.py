"""The persistent W8A8 GEMM (kernels/fp8_stream_dot.py, fp8_gemv kind "dot8p"): on the CPU through Triton's
interpreter against the exact W8A8 product (fp32) and against dot8 at the same tile bit for bit (output and deferred
split-K partials), with fewer programs than units (each program walks several); offline sm_90 compiles of the tiles
the H200 sweep tries (FP8 wgmma, cp.async pipeline, no spills); on the GPU at the 8B shapes."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90, offline_triton, stack_bytes


def check_stream_dot(m: int, n: int, k: int, config: tuple, pps: int, device: str = "cpu") -> None:
    """dot8p == dot8 at the same tile bit for bit (y, and the deferred partials), and within fp32 rounding of the
    exact W8A8 product; `pps` programs per SM (LORASERVE_FP8_STREAM_PPS) with 8 SMs on the CPU: 8-16 programs over
    the units, so programs walk several (tile, split) units."""
    import os

    from loraserve.kernels.fp8_gemm import per_token_quant_fp8
    from loraserve.kernels.fp8_gemv import fp8_gemv

    from .fp8_gemm_cases import make_weight

    os.environ["LORASERVE_FP8_STREAM_PPS"] = str(pps)
    g = torch.Generator().manual_seed(m * 31 + n + k)
    w_q, w_scale = make_weight(n, k, n + 3 * k, device)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(device, torch.float16)
    x_q, x_scale = per_token_quant_fp8(x)
    ref = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t()
    y = fp8_gemv(x, w_q, w_scale, config=config, x_q=(x_q, x_scale))
    base = ("dot8",) + tuple(config[1:])
    y8 = fp8_gemv(x, w_q, w_scale, config=base, x_q=(x_q, x_scale))
    assert torch.equal(y, y8), f"dot8p != dot8 at {int((y != y8).sum())} of {y.numel()} ({config})"
    err = (y.float() - ref).abs()
    assert bool((err <= 2e-3 * ref.abs() + 2e-3 * ref.abs().amax(dim=1, keepdim=True)).all()), float(err.max())
    ws, scale = fp8_gemv(x, w_q, w_scale, config=config, x_q=(x_q, x_scale), defer_sum=True)
    ws8, _ = fp8_gemv(x, w_q, w_scale, config=base, x_q=(x_q, x_scale), defer_sum=True)
    assert scale is None and torch.equal(ws, ws8)
    if config[4] > 1:
        assert ws.shape == (config[4], m, n)
        assert torch.equal((ws.sum(0) * w_scale).to(y.dtype), y) or config[4] > 2   # (2 splits: one fp32 add)


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("m,n,k,config,pps", [
    (5, 40, 256, ("dot8p", 64, 16, 32, 2, 4, 2), 1),      # 3 tiles (N tail) x 2 splits = 6 units on 8 programs
    (64, 96, 256, ("dot8p", 64, 16, 32, 4, 4, 2), 1),     # 6 tiles x 4 splits = 24 units: programs walk 3 each
    (33, 64, 128, ("dot8p", 64, 16, 32, 1, 4, 2), 1),     # no split: y written with both scales; 4 units
    (17, 200, 128, ("dot8p", 64, 16, 64, 2, 4, 2), 2),    # 13 tiles x 2 = 26 units on 16 programs (pps 2)
])
def test_stream_dot_interp(interp, m, n, k, config, pps) -> None:
    interp.submit(check_stream_dot, m, n, k, config, pps).result(timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernels instead")
@pytest.mark.parametrize("flatten", [True, False])
def test_stream_dot_compiles_for_sm90(flatten) -> None:
    """The tiles benchmarks/fp8_bs64_gemm.py sweeps, compiled for sm_90 offline: FP8 wgmma, the weight tiles through
    cp.async into shared memory, no spills."""
    import re

    offline_triton()
    from loraserve.kernels.fp8_stream_dot import _fp8_stream_dot_kernel

    sig = {"xq_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": "*bf16",
           "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "NUM_TILES": "i32",
           "NUM_UNITS": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    # (128 x 256 tiles spill ~96 bytes: not swept)
    for bn, bk, stages, use_ws, wait in ((64, 128, 4, True, False), (128, 128, 3, True, True),
                                         (64, 256, 4, False, False), (64, 256, 5, True, True)):
        kernel = compile_sm90(_fp8_stream_dot_kernel, sig, dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, USE_WS=use_ws,
                                                                 FLATTEN=flatten, WAIT=wait),
                              div16_except=("M", "NUM_TILES", "NUM_UNITS"), num_warps=4, num_stages=stages,
                              launch_pdl=wait)
        ptx = kernel.asm["ptx"]
        # launched as a dependent (LORASERVE_FP8_GEMV_PDL=early / 1): L2 prefetches of the first weight tiles, then
        # the wait, before any load of x
        assert ("griddepcontrol.wait" in ptx) == wait and ("prefetch.global.L2" in ptx) == wait
        assert not wait or ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
        assert re.search(r"wgmma\.mma_async[\w.]*\.e4m3\.e4m3", ptx), (bn, bk, stages)
        assert re.search(r"cp\.async\.c[ag]\.shared\.global", ptx), (bn, bk, stages)
        # (unflattened, a comparison only: Triton 3.9 spills 8 bytes at 128 x 128 x 3 stages)
        assert stack_bytes(kernel) <= (0 if flatten else 16), (bn, bk, stages, use_ws)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,config", [(4096, 4096, ("dot8p", 64, 64, 128, 2, 4, 4)),
                                        (6144, 4096, ("dot8p", 64, 128, 128, 2, 4, 3)),
                                        (4096, 14336, ("dot8p", 64, 64, 256, 2, 4, 4))])
def test_stream_dot_gpu(n, k, config) -> None:
    check_stream_dot(64, n, k, config, 1, "cuda")
