"""kernels/skinny_gemm.py (tensor-core GEMM for 5..64-token decode batches, split-K summed in the kernel) vs its
fp32 torch reference: on the CPU through Triton's interpreter, on the GPU at the TP=2 shard shapes of Llama-3-8B."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import skinny_gemm_cases as cases
from .interpreter import interpreter_pool, interpreting
from .sm90 import assert_no_spills, compile_sm90, has_mma


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("M,N,K,config", [
    (64, 96, 128, (64, 32, 1, 4, 2, 0)),     # N not a multiple of BLOCK_N, no split
    (33, 64, 128, (64, 32, 2, 4, 2, 1)),     # M padded to 64, split-K 2 summed in the kernel, weights prefetched
    (5, 130, 256, (64, 32, 4, 4, 2, 0)),     # M padded to 16, three N tiles (the last partial), split 4
    (17, 64, 192, (64, 64, 3, 4, 2, 1)),     # split 3 (not a power of two), one K step per split
])
def test_skinny_gemm_interp(interp, M, N, K, config) -> None:
    # float16 (the interpreter mishandles bf16)
    interp.submit(cases.check_skinny_gemm, "float16", M, N, K, config).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [8, 33, 64])
@pytest.mark.parametrize("N,K", [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)])
def test_skinny_gemm_gpu(M, N, K) -> None:
    from loraserve.kernels.skinny_gemm import skinny_config

    cases.check_skinny_gemm("bfloat16", M, N, K, skinny_config(M, N, K, torch.device("cuda")), "cuda")


@pytest.mark.skipif(not triton_available() or torch.cuda.is_available(), reason="CPU CI: offline sm_90 compile")
@pytest.mark.parametrize("config,block_m", [((128, 128, 2, 4, 4, 0), 64), ((64, 128, 4, 4, 4, 1), 64),
                                            ((128, 64, 1, 4, 3, 1), 16), ((256, 64, 2, 8, 3, 0), 64)])
def test_skinny_gemm_compiles_for_sm90(config, block_m) -> None:
    """The kernel built for an H100/H200 (TTGIR, PTX, ptxas) with PDL: wgmma, no spills, the PDL intrinsics."""
    from loraserve.kernels.skinny_gemm import _skinny_gemm_kernel

    bn, bk, split, warps, stages, regpre = config
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
           "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    const = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, REGPRE=bool(regpre), USE_PDL=True)
    k = compile_sm90(_skinny_gemm_kernel, sig, const, div16_except=("M",), num_warps=warps, num_stages=stages)
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "no tensor-core MMA"
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    assert_no_spills(k, str(config))
