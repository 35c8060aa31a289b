"""kernels/gemv.py and rope_store_kv compiled offline for an H100/H200 (sm_90) on a machine without a GPU
(triton.compile with a GPUTarget: TTGIR, PTX, ptxas), so a kernel that would not compile, spill registers,
or broadcast x through shared memory fails in CPU CI rather than on the GPU. Skipped on a GPU machine
(the GPU tests compile for real) and where this Triton cannot build for sm_90 offline."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from loraserve.kernels import triton_available

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real"),
]


def _compile(fn, sig: dict, const: dict, num_warps: int, div16: tuple[str, ...] = ()):
    """div16: integer arguments the JIT would see as multiples of 16 (it specialises them so)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(sig)
    sig.update({n: "constexpr" for n in const})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in div16}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    except (TypeError, KeyError, AttributeError, ImportError) as exc:  # another Triton's offline API
        pytest.skip(f"offline sm_90 compile unavailable in this Triton: {exc!r}")


def _no_spills(k, tag: str) -> None:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return
    path = f"/tmp/{tag}_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    os.unlink(path)
    assert "STACK:0" in usage and "LOCAL:0" in usage, f"register spills: {usage}"


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
    k = _compile(_gemv_kernel, sig, const, nw, ("N", "K", "stride_xm", "stride_ym"))
    ptx = k.asm["ptx"]
    assert "ld.global" in ptx and ("v4.b32" in ptx or "v4.u32" in ptx), "expected 16-byte weight loads"
    assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
    assert k.metadata.shared <= 16 * 1024, f"x broadcast through {k.metadata.shared} B of shared memory"
    _no_spills(k, "gemv")


@pytest.mark.parametrize("pdl", [False, True])
def test_rope_store_kv_compiles_for_sm90(pdl) -> None:
    from loraserve.kernels.rope import _rope_store_kv_kernel

    sig = {"pos_ptr": "*i64", "cache_ptr": "*fp32", "slot_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16",
           "v_ptr": "*bf16", "qo_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "H": "i32",
           "KVH": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
           "stride_vt": "i32", "stride_vh": "i32", "stride_qot": "i32", "stride_qoh": "i32", "stride_c": "i32",
           "num_positions": "i32"}
    const = dict(HALF=64, HALF_P2=64, BLOCK_H=32, BLOCK_KVH=8, USE_PDL=pdl)
    k = _compile(_rope_store_kv_kernel, sig, const, 4)
    assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
    _no_spills(k, "rope_store")


def test_greedy_compiles_for_sm90() -> None:
    from loraserve.kernels.greedy import CHUNK, _greedy_chunk_kernel, _greedy_merge_kernel

    k = _compile(_greedy_chunk_kernel, {"x_ptr": "*fp32", "wsf_ptr": "*fp32", "wsi_ptr": "*i32", "V": "i32",
                                        "stride_x": "i32", "num_chunks": "i32"}, dict(CHUNK=CHUNK, USE_PDL=True), 8)
    _no_spills(k, "greedy_chunk")
    k = _compile(_greedy_merge_kernel, {"wsf_ptr": "*fp32", "wsi_ptr": "*i32", "tok_ptr": "*i64", "lp_ptr": "*fp32",
                                        "ok_ptr": "*i8", "num_chunks": "i32"}, dict(C_PAD=32, USE_PDL=True), 1)
    _no_spills(k, "greedy_merge")
