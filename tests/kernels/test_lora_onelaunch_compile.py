"""The one-launch LoRA kernel (kernels/lora_onelaunch.py) compiled offline for sm_90 on a machine
without a GPU (as test_lora_stream_compile.py does for the streaming expand): the whole NVIDIA
pipeline runs, so a kernel that would not compile or would spill registers fails in CPU CI.
Plans are onelaunch_plan's for Llama-3-8B projections at 1 token, the 64-token / 32-adapter layer
case and 256 tokens at rank 64."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, has_mma

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real"),
]

INTS = ["K", "N", "R", "K_CHUNK", "COLS_PER_PROG", "NUM_TILES", "GROUPS", "NUM_PROGRAMS",
        "stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak", "stride_bl", "stride_bn",
        "stride_bk", "stride_ym", "stride_yn", "stride_wk", "stride_ws", "stride_wm", "stride_wr", "stride_sl",
        "stride_sn"]
UNIT = ("stride_xk", "stride_ak", "stride_bk", "stride_yn", "stride_wr", "stride_sn")  # Triton specialises == 1


def _compile_onelaunch(num_slices: int, block_m: int, plan: dict, grid_tiles: int):
    import triton

    from loraserve.kernels.lora_onelaunch import _lora_onelaunch_kernel

    sig = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
           "sync_ptr": "*i32", "ranks_ptr": "*i32", "slice_off_ptr": "*i32", "scale_ptr": "*fp32",
           "shift_ptr": "*fp32", "sorted_ids_ptr": "*i32",
           "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32"}
    sig.update({n: "i32" for n in INTS})
    const = dict(NUM_SLICES=num_slices, SPLIT_K=plan["SPLIT_K"], SK_CHUNK=plan["SK_CHUNK"], BLOCK_M=block_m,
                 BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"], BLOCK_R=plan["BLOCK_R"],
                 SYNC_P2=triton.next_power_of_2(2 + grid_tiles), CAST=True, IEEE=False, HAS_SCALE=True,
                 HAS_SHIFT=True)
    return compile_sm90(_lora_onelaunch_kernel, sig, const, unit=UNIT,
                        div16_except=("R", "NUM_TILES", "GROUPS", "NUM_PROGRAMS"),
                        num_warps=plan["num_warps"], num_stages=plan["num_stages"])


QKV, GATE_UP, DOWN = (4096, [4096, 1024, 1024]), (4096, [14336, 14336]), (14336, [4096])


@pytest.mark.parametrize("num_tokens,grid_tiles,rank,block_m,hidden,widths", [
    (1, 2, 16, 16, *QKV), (64, 36, 16, 16, *GATE_UP), (64, 36, 16, 16, *DOWN), (256, 48, 64, 16, *DOWN),
    (1024, 64, 64, 32, *QKV)])
def test_onelaunch_compiles_for_sm90_without_spills(num_tokens, grid_tiles, rank, block_m, hidden, widths):
    from loraserve.kernels.lora_onelaunch import onelaunch_plan

    plan = onelaunch_plan(num_tokens, rank, hidden, sum(widths), len(widths), block_m, grid_tiles)
    k = _compile_onelaunch(len(widths), block_m, plan, grid_tiles)
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "expected tensor-core dots"
    assert "atom.global" in ptx or "atom.acq_rel" in ptx or "atom." in ptx, "expected the ticket atomics"
    assert k.metadata.shared <= 100 * 1024, f"shared memory {k.metadata.shared} B"
    assert_no_spills(k)


def test_pdl_pair_compiles_for_sm90():
    """LORASERVE_LORA_PDL: the shrink (launch_dependents first, wait before x) and the streaming
    expand (wait before y and the partials) carry griddepcontrol in their sm_90 PTX."""
    from loraserve.kernels.lora_expand_stream import _lora_expand_stream_kernel, stream_expand_config
    from loraserve.kernels.lora_shrink import _lora_shrink_kernel

    from .test_lora_stream_compile import STRIDES, UNIT_STRIDES

    cfg = stream_expand_config(64, 6144, 16, 3, 16, 36, 4)
    sig = {"buf_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ranks_ptr": "*i32", "slice_off_ptr": "*i32",
           "scale_ptr": "*fp32", "shift_ptr": "*fp32", "scale_on_ptr": "*i32", "sorted_ids_ptr": "*i32",
           "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32", "N": "i32", "R": "i32",
           "COLS_PER_PROG": "i32", **{n: "i32" for n in STRIDES}}
    const = dict(NUM_SLICES=3, BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], SPLIT_K=4,
                 SK_CHUNK=cfg["SK_CHUNK"], EVEN_R=True, CAST=True, IEEE=False, HAS_SCALE=False, HAS_SHIFT=False,
                 USE_PDL=True, B_AHEAD=3, Y_AHEAD=1, SLOTS=0, DENSE_SLOTS=False, PREFETCH_B=False, TRIGGER=False,
                 PF_THREADS=32 * cfg["num_warps"], SCALE_FLAG=False, GROUP_MAJOR=False)
    expand = compile_sm90(_lora_expand_stream_kernel, sig, const, unit=UNIT_STRIDES, num_warps=cfg["num_warps"],
                          num_stages=1, launch_pdl=True)
    assert "griddepcontrol.wait" in expand.asm["ptx"]
    sig = {"x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*fp32", "ranks_ptr": "*i32", "sorted_ids_ptr": "*i32",
           "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32", "K": "i32", "R": "i32",
           **{n: "i32" for n in ("stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak",
                                 "stride_ok", "stride_os", "stride_om", "stride_or")}}
    const = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, EVEN_K=True, IEEE=False, EAGER_META=True,
                 USE_PDL=True, PREFETCH_A=False, PF_THREADS=128)
    ptx = compile_sm90(_lora_shrink_kernel, sig, const, num_warps=4, num_stages=4, launch_pdl=True).asm["ptx"]
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
