"""kernels/gemv.py and rope_store_kv compiled offline for an H100/H200 (sm_90) on a machine without a GPU
(triton.compile with a GPUTarget: TTGIR, PTX, ptxas), so a kernel that would not compile, spill registers,
or broadcast x through shared memory fails in CPU CI rather than on the GPU. Skipped on a GPU machine
(the GPU tests compile for real) and where this Triton cannot build for sm_90 offline."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, pointers

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real"),
]


@pytest.mark.parametrize("m_pad,silu,prefetch,pdl", [(1, False, True, True), (1, True, True, True),
                                                      (1, False, False, False), (2, False, True, True),
                                                      (4, True, True, True)])
def test_gemv_compiles_for_sm90(m_pad, silu, prefetch, pdl) -> None:
    from loraserve.kernels.gemv import _gemv_kernel, gemv_config

    bn, bk, nw, _ = gemv_config(m_pad, 6144, 4096)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    const = dict(M_PAD=m_pad, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PREFETCH=prefetch, HAS_BIAS=False,
                 SILU_MUL=silu, USE_PDL=pdl)
    k = compile_sm90(_gemv_kernel, sig, const, div16=[*pointers(sig), "N", "K", "stride_xm", "stride_ym"],
                     num_warps=nw, num_stages=1)
    ptx = k.asm["ptx"]
    assert "ld.global" in ptx and ("v4.b32" in ptx or "v4.u32" in ptx), "expected 16-byte weight loads"
    assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
    assert k.metadata.shared <= 16 * 1024, f"x broadcast through {k.metadata.shared} B of shared memory"
    assert_no_spills(k, "gemv")


@pytest.mark.parametrize("pdl", [False, True])
def test_rope_store_kv_compiles_for_sm90(pdl) -> None:
    from loraserve.kernels.rope import _rope_store_kv_kernel

    sig = {"pos_ptr": "*i64", "cache_ptr": "*fp32", "slot_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16",
           "v_ptr": "*bf16", "qo_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "H": "i32",
           "KVH": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
           "stride_vt": "i32", "stride_vh": "i32", "stride_qot": "i32", "stride_qoh": "i32", "stride_c": "i32",
           "num_positions": "i32"}
    const = dict(HALF=64, HALF_P2=64, BLOCK_H=32, BLOCK_KVH=8, USE_PDL=pdl)
    k = compile_sm90(_rope_store_kv_kernel, sig, const, div16=pointers(sig), num_warps=4, num_stages=1)
    assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
    assert_no_spills(k, "rope_store")


def test_greedy_compiles_for_sm90() -> None:
    from loraserve.kernels.greedy import CHUNK, _greedy_chunk_kernel, _greedy_merge_kernel

    sig = {"x_ptr": "*fp32", "wsf_ptr": "*fp32", "wsi_ptr": "*i32", "V": "i32", "stride_x": "i32", "num_chunks": "i32"}
    k = compile_sm90(_greedy_chunk_kernel, sig, dict(CHUNK=CHUNK, USE_PDL=True), div16=pointers(sig), num_warps=8,
                     num_stages=1)
    assert_no_spills(k, "greedy_chunk")
    sig = {"wsf_ptr": "*fp32", "wsi_ptr": "*i32", "tok_ptr": "*i64", "lp_ptr": "*fp32", "ok_ptr": "*i8",
           "num_chunks": "i32"}
    k = compile_sm90(_greedy_merge_kernel, sig, dict(C_PAD=32, USE_PDL=True), div16=pointers(sig), num_warps=1,
                     num_stages=1)
    assert_no_spills(k, "greedy_merge")
