"""The pushing row-parallel GEMM (kernels/tp_gemm_push.py) and the fused norm's pushed=True variant compiled
offline for sm_90 on a machine without a GPU: tensor-core MMA, no spills, 16-byte vector stores into the peers'
buffers (2-byte scalar stores over NVLink would be 8x the transactions), the PDL intrinsics, and the norm with
pushed=True stores nothing to a peer."""
from __future__ import annotations

import re

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, has_mma

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real"),
]


@pytest.mark.parametrize("config,block_m,rank", [((64, 128, 1, 4, 4, 0), 64, 0), ((64, 128, 2, 4, 4, 0), 64, 1),
                                                 ((64, 128, 2, 4, 4, 0), 16, 0)])
def test_gemm_push_compiles_for_sm90(config, block_m, rank) -> None:
    from loraserve.kernels.tp_gemm_push import _gemm_push_kernel

    bn, bk, split, warps, stages, regpre = config
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           "buf_ptr": "*bf16", "deltas_ptr": "*i64", "counter_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ym": "i32", "slot_stride": "i32", "region_stride": "i32"}
    const = dict(RANK=rank, WORLD=2, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, REGPRE=bool(regpre),
                 USE_PDL=True)
    k = compile_sm90(_gemm_push_kernel, sig, const, div16_except=("M",), num_warps=warps, num_stages=stages)
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "no tensor-core MMA"
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert "st.global.b16" not in ptx, "2-byte scalar stores"
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    assert_no_spills(k, str(config))


def test_pushed_norm_compiles_without_peer_stores() -> None:
    import triton

    from loraserve.kernels.allreduce_rmsnorm import _allreduce_rms_norm_kernel

    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "buf_ptr": "*bf16", "deltas_ptr": "*i64",
           "counter_ptr": "*i32", "H": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32",
           "slot_stride": "i32", "region_stride": "i32"}
    stores = {}
    for pushed in (False, True):
        const = dict(RANK=0, WORLD=2, BLOCK=triton.next_power_of_2(4096), MAX_SPIN=1 << 28, USE_PDL=True,
                     PUSHED=pushed)
        ptx = compile_sm90(_allreduce_rms_norm_kernel, sig, const, div16_except=("eps",), num_warps=8).asm["ptx"]
        assert "ld.volatile.global" in ptx
        stores[pushed] = len(re.findall(r"\bst\.global", ptx))
    assert stores[True] < stores[False], stores   # the push's stores gone, the clear / outputs kept


@pytest.mark.parametrize("N,K,rank", [(4096, 2048, 0), (4096, 7168, 1), (8192, 14336, 0)])
def test_gemv_push_compiles_for_sm90(N, K, rank) -> None:
    """The one-row variant (kernels/gemv.py's tiles): the PDL intrinsics, the weight tile before the wait, the push in
    8-byte words, no spills."""
    from loraserve.kernels.tp_gemm_push import _gemv_push_kernel, _gemv_tiles

    bn, bk, warps = _gemv_tiles(N, K)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "buf_ptr": "*bf16", "deltas_ptr": "*i64",
           "counter_ptr": "*i32", "N": "i32", "K": "i32", "slot_stride": "i32", "region_stride": "i32"}
    const = dict(RANK=rank, WORLD=2, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, USE_PDL=True)
    k = compile_sm90(_gemv_push_kernel, sig, const, div16_except=(), num_warps=warps)
    ptx = k.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "the first weight tile after the wait"
    # the push as 8-byte words (BLOCK_N 4: one store a program), not BLOCK_N 2-byte writes over NVLink
    assert re.search(r"st\.global(\.v2)?\.b64", ptx), "the push is not in 8-byte words"
    assert len(re.findall(r"st\.global\.b16", ptx)) <= 1, "2-byte stores besides the local output's"
    assert_no_spills(k, f"{N}x{K}")
