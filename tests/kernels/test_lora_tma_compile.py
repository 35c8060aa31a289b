"""The TMA-fed expand (kernels/lora_tma_expand.py) and shrink (lora_tma_shrink.py) compiled offline for sm_90 (tests/kernels/sm90.py): B's boxes and
y's rows are TMA copies (cp.async.bulk.tensor) that Triton's pipeliner issues ahead (one per stage in the prologue),
PDL's wait is there, and no register spills, at the probe's settings (2 / 3 slices, 4 / 8 stages, 4 / 8 warps)."""
from __future__ import annotations

import pytest

from .sm90 import assert_no_spills, compile_sm90

TYPES = {n: "*i32" for n in ("ranks_ptr", "slice_off_ptr", "scale_on_ptr", "sorted_ids_ptr", "tile_slots_ptr",
                             "tile_starts_ptr", "tile_ends_ptr")}
TYPES.update(buf_ptr="*fp32", y_ptr="*bf16", b_ptr="*bf16", scale_ptr="*fp32", shift_ptr="*fp32", N="i32", R="i32",
             COLS_PER_PROG="i32", stride_bsplit="i32", stride_bs="i32", stride_bm="i32", stride_br="i32",
             stride_ym="i32", stride_yn="i32", stride_sl="i32", stride_sn="i32")


@pytest.mark.parametrize("slices,stages,warps,scale,pf", [(2, 4, 4, False, 0), (3, 8, 8, True, 2)])
def test_tma_expand_compiles_for_sm90(slices: int, stages: int, warps: int, scale: bool, pf: int) -> None:
    from loraserve.kernels.lora_tma_expand import _lora_expand_tma_kernel

    bn = 256
    types = dict(TYPES, b_desc=f"tensordesc<bf16[{bn}, 16]>", y_desc=f"tensordesc<bf16[1, {bn}]>")
    kernel = compile_sm90(
        _lora_expand_tma_kernel, types,
        dict(NUM_SLICES=slices, BLOCK_M=16, BLOCK_N=bn, BLOCK_R=16, SPLIT_K=4, SK_CHUNK=4, SK_P=4, CAST=True,
             IEEE=False, HAS_SCALE=scale, HAS_SHIFT=scale, SCALE_FLAG=scale, STAGES=stages, Y_TMA=True,
             USE_PDL=True, TRIGGER=True, PF_BOXES=pf, PF_THREADS=32 * warps),
        unit=("stride_yn", "stride_br"),
        div16_except=("N", "R", "COLS_PER_PROG", "stride_sn", "stride_yn", "stride_br"),
        num_warps=warps, num_stages=stages, launch_pdl=True)
    ptx = kernel.asm["ptx"]
    # per loop (decode rows, dot): B's box + y's two rows at each of the stages - 1 prologue slots and in the body
    assert ptx.count("cp.async.bulk.tensor") >= 3 * stages, "the TMA loads are not pipelined"
    assert "griddepcontrol.wait" in ptx
    assert ("cp.async.bulk.prefetch.L2" in ptx) == (pf > 0)
    assert_no_spills(kernel, f"TMA expand S={slices} stages={stages} warps={warps}")


@pytest.mark.parametrize("slices,block_k,stages,pf", [(3, 1024, 5, False), (1, 2048, 9, True)])
def test_tma_shrink_compiles_for_sm90(slices: int, block_k: int, stages: int, pf: bool) -> None:
    from loraserve.kernels.lora_tma_shrink import _lora_shrink_tma_kernel

    types = {n: "*i32" for n in ("ranks_ptr", "sorted_ids_ptr", "tile_slots_ptr", "tile_starts_ptr", "tile_ends_ptr")}
    types.update(x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32", stride_xm="i32", stride_xk="i32", stride_ok="i32",
                 stride_os="i32", stride_om="i32", stride_or="i32", a_desc="tensordesc<bf16[16, 256]>",
                 x_desc="tensordesc<bf16[1, 256]>")
    kernel = compile_sm90(
        _lora_shrink_tma_kernel, types,
        dict(NUM_SLICES=slices, BLOCK_M=16, BLOCK_R=16, BLOCK_K=block_k, BOX_K=256, STAGES=stages, IEEE=False,
             USE_PDL=True, X_TMA=True, PF_A=pf),
        unit=("stride_xk", "stride_or"), div16_except=("K", "R", "stride_xk", "stride_or"),
        num_warps=4, num_stages=stages, launch_pdl=True)
    ptx = kernel.asm["ptx"]
    assert ptx.count("cp.async.bulk.tensor") >= 3 * (stages - 1), "the TMA loads are not pipelined"
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert ("cp.async.bulk.prefetch.L2" in ptx) == pf
    assert kernel.metadata.shared <= 76 * 1024, "more shared memory than 3 programs per SM allow"
    assert_no_spills(kernel, f"TMA shrink S={slices} BLOCK_K={block_k}")
