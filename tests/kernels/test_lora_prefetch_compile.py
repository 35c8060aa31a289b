"""The L2-prefetch variants of the LoRA kernels (kernels/lora_prefetch.py, LORASERVE_LORA_PREFETCH)
compiled offline for an H100/H200 (sm_90) on a machine without a GPU: the bulk prefetch's inline PTX
must assemble (ptxas), sit BEFORE griddepcontrol.wait, and cost no register spills. (The interpreter
cannot run inline PTX, so these switches are off there; the GPU test checks outputs bit-equal to the
switches off.) Skipped on a GPU machine and where this Triton cannot build for sm_90 offline."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real"),
]

META = {"ranks_ptr": "*i32", "sorted_ids_ptr": "*i32", "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32",
        "tile_ends_ptr": "*i32"}
SHRINK_STRIDES = ["stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak",
                  "stride_ok", "stride_os", "stride_om", "stride_or"]


def _compile(fn, sig: dict, const: dict, num_warps: int, num_stages: int, unit: tuple = ()):
    return compile_sm90(fn, sig, const, unit=unit, div16_except=("R", "K"), num_warps=num_warps,
                        num_stages=num_stages)


def _check(k, name: str):
    ptx = k.asm["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx, f"{name}: no bulk L2 prefetch in the PTX"
    assert "griddepcontrol.wait" in ptx, f"{name}: no griddepcontrol.wait"
    assert ptx.index("cp.async.bulk.prefetch.L2.global") < ptx.rindex("griddepcontrol.wait"), \
        f"{name}: the prefetch must be issued before the wait"
    assert_no_spills(k, name)


@pytest.mark.parametrize("num_slices,hidden,split_k", [(3, 4096, 4), (1, 14336, 8)])
def test_dot_shrink_with_a_prefetch_compiles_for_sm90(num_slices, hidden, split_k):
    from loraserve.kernels.lora_shrink import _lora_shrink_kernel

    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32",
               **{n: "i32" for n in SHRINK_STRIDES})
    const = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, SPLIT_K=split_k, EVEN_K=True, IEEE=False, EAGER_META=True,
                 USE_PDL=True, PREFETCH_A=True, PF_THREADS=128)
    k = _compile(_lora_shrink_kernel, sig, const, 4, 4, unit=("stride_xk", "stride_ak", "stride_or"))
    _check(k, "dot shrink")


@pytest.mark.parametrize("hidden,block_k", [(4096, 1024), (14336, 2048)])   # the default BLOCK_Ks (BGMV_WIDE_BLOCK_K)
def test_bgmv_shrink_with_a_before_the_wait_compiles_for_sm90(hidden, block_k):
    from loraserve.kernels.lora_shrink_bgmv import _lora_shrink_bgmv_kernel, bgmv_shrink_config

    cfg = bgmv_shrink_config(64, 16, hidden, 1, 36)
    assert cfg["BLOCK_K"] == block_k
    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32",
               **{n: "i32" for n in SHRINK_STRIDES})
    const = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=-(-hidden // block_k), EVEN_K=hidden % block_k == 0,
                 IEEE=False, DOT_K=128, USE_PDL=True, PREFETCH_A=True, K_MAJOR=False)
    k = _compile(_lora_shrink_bgmv_kernel, sig, const, cfg["num_warps"], 1, unit=("stride_xk", "stride_ak", "stride_or"))
    ptx = k.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert "ld.global.nc.v4" in ptx[:wait] or "ld.global.v4" in ptx[:wait], \
        "A's vector loads should be issued before griddepcontrol.wait"
    assert_no_spills(k)


@pytest.mark.parametrize("widths,slots", [([14336, 14336], 0), ([4096, 1024, 1024], 0), ([4096], -4)])
def test_stream_expand_with_b_prefetch_and_trigger_compiles_for_sm90(widths, slots):
    from loraserve.kernels.lora_expand_stream import _lora_expand_stream_kernel, stream_expand_config

    cfg = stream_expand_config(64, sum(widths), 16, len(widths), 16, 36, 4)
    strides = ["stride_bsplit", "stride_bs", "stride_bm", "stride_br", "stride_bl", "stride_bn", "stride_bk",
               "stride_ym", "stride_yn", "stride_sl", "stride_sn"]
    sig = dict(META, buf_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", slice_off_ptr="*i32", scale_ptr="*fp32",
               shift_ptr="*fp32", scale_on_ptr="*i32", N="i32", R="i32", COLS_PER_PROG="i32",
               **{n: "i32" for n in strides})
    const = dict(NUM_SLICES=len(widths), BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], SPLIT_K=4,
                 SK_CHUNK=cfg["SK_CHUNK"], EVEN_R=True, CAST=True, IEEE=False, HAS_SCALE=False, HAS_SHIFT=False,
                 USE_PDL=True, B_AHEAD=cfg["B_AHEAD"], Y_AHEAD=cfg["Y_AHEAD"], SLOTS=slots, DENSE_SLOTS=False,
                 PREFETCH_B=True, TRIGGER=True, PF_THREADS=32 * cfg["num_warps"], SCALE_FLAG=False,
                 GROUP_MAJOR=False)
    k = _compile(_lora_expand_stream_kernel, sig, const, cfg["num_warps"], 1,
                 unit=("stride_br", "stride_bk", "stride_yn", "stride_sn"))
    _check(k, "stream expand")
    ptx = k.asm["ptx"]
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait"), "trigger first"
