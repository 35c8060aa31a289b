"""The dense LoRA shrink (kernels/lora_shrink_dense.py) and the streaming expand in its dense_slots mode,
compiled offline for an H100/H200 (sm_90) on a machine without a GPU (triton.compile with a GPUTarget:
TTGIR, PTX, ptxas): the configs dense_shrink_config picks for the Llama-3-8B projections at 64 and 256
tokens must use tensor cores, stage W through cp.async (the pipelined K loop), fit 2 programs per SM
in shared memory and not spill. Skipped on a GPU machine (the GPU tests compile for real) and where
this Triton cannot build for sm_90 offline."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, has_mma

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real"),
]


def _compile_sm90(fn, sig: dict, const: dict, num_warps: int, num_stages: int, unit: tuple[str, ...]):
    return compile_sm90(fn, sig, const, unit=unit, div16_except=("T", "R", "SLOT_ROWS"), num_warps=num_warps,
                        num_stages=num_stages)


@pytest.mark.parametrize("num_tokens", [64, 256])
@pytest.mark.parametrize("num_rows,hidden", [(1536, 4096), (1024, 4096), (512, 4096), (512, 14336)])
def test_dense_shrink_compiles_for_sm90(num_tokens: int, num_rows: int, hidden: int) -> None:
    from loraserve.kernels.lora_shrink_dense import _lora_shrink_dense_kernel, dense_shrink_config

    cfg = dense_shrink_config(num_tokens, num_rows, hidden)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "token_slot_ptr": "*i32", "T": "i32", "NR": "i32",
           "K": "i32", "SLOT_ROWS": "i32",
           "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_wk": "i32", "stride_ok": "i32",
           "stride_om": "i32", "stride_on": "i32"}
    const = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], K_STEPS=cfg["K_STEPS"],
                 EVEN_K=True, IEEE=False, USE_PDL=True)
    k = _compile_sm90(_lora_shrink_dense_kernel, sig, const, cfg["num_warps"], cfg["num_stages"],
                      ("stride_xk", "stride_wk", "stride_on"))
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "expected tensor-core dots"
    if cfg["K_STEPS"] > 1:
        assert "cp.async" in ptx, "the K loop should stage W and x through cp.async (num_stages)"
    assert k.metadata.shared <= 110 * 1024, f"shared memory {k.metadata.shared} B: 2 programs per SM no longer fit"
    assert_no_spills(k)


def test_stream_expand_dense_slots_compiles_for_sm90() -> None:
    from loraserve.kernels.lora_expand_stream import _lora_expand_stream_kernel, stream_expand_config

    cfg = stream_expand_config(64, 6144, 16, 3, 16, 36, 8)
    sig = {"buf_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ranks_ptr": "*i32", "slice_off_ptr": "*i32",
           "scale_ptr": "*fp32", "shift_ptr": "*fp32", "scale_on_ptr": "*i32", "sorted_ids_ptr": "*i32",
           "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32", "N": "i32", "R": "i32",
           "COLS_PER_PROG": "i32"}
    sig.update({n: "i32" for n in ("stride_bsplit", "stride_bs", "stride_bm", "stride_bl", "stride_bn",
                                   "stride_ym", "stride_sl")})
    const = dict(NUM_SLICES=3, BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], SPLIT_K=8,
                 SK_CHUNK=cfg["SK_CHUNK"], EVEN_R=True, CAST=True, IEEE=False, HAS_SCALE=False, HAS_SHIFT=False,
                 USE_PDL=True, B_AHEAD=cfg["B_AHEAD"], Y_AHEAD=cfg["Y_AHEAD"], SLOTS=cfg["SLOTS"], DENSE_SLOTS=True,
                 PREFETCH_B=False, TRIGGER=False, PF_THREADS=32 * cfg["num_warps"], SCALE_FLAG=False,
                 GROUP_MAJOR=False)
    k = _compile_sm90(_lora_expand_stream_kernel, sig, const, cfg["num_warps"], 1,
                      ("stride_br", "stride_bk", "stride_yn", "stride_sn"))
    assert has_mma(k.asm["ptx"])
    assert_no_spills(k)


@pytest.mark.parametrize("num_slices,split_k,dora,n_total,block_r", [
    (2, 1, False, 28672, 16), (2, 16, False, 28672, 16), (3, 8, True, 6144, 16), (1, 16, False, 4096, 16),
    (3, 8, False, 6144, 16), (1, 16, False, 4096, 64), (2, 1, False, 28672, 64), (3, 4, False, 6144, 32)])
def test_dense_expand_compiles_for_sm90(num_slices: int, split_k: int, dora: bool, n_total: int, block_r: int) -> None:
    from loraserve.kernels.lora_expand_dense import _lora_expand_dense_kernel, dense_expand_config

    names = ["buf_ptr", "b_ptr", "y_ptr", "ranks_ptr", "slice_off_ptr", "scale_ptr", "shift_ptr", "token_slot_ptr",
             "T", "L", "R", "stride_bk", "stride_bs", "stride_bm", "stride_br", "stride_bl", "stride_wl", "stride_wn",
             "stride_wr", "stride_ym", "stride_yn", "stride_sl", "stride_sn"]
    types = {"buf_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "scale_ptr": "*fp32", "shift_ptr": "*fp32"}
    sig = {n: types.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in names}
    cfg = dense_expand_config(n_total)
    const = dict(NUM_SLICES=num_slices, BLOCK_M=64, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r,
                 GROUP=max(1, cfg["GROUP"] * 16 // block_r),
                 SPLIT_K=split_k, EVEN_R=True, CAST=True, IEEE=False, HAS_SCALE=dora, HAS_SHIFT=dora, USE_PDL=True)
    k = _compile_sm90(_lora_expand_dense_kernel, sig, const, cfg["num_warps"], cfg["num_stages"],
                      ("stride_br", "stride_wr", "stride_yn", "stride_sn"))
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "expected tensor-core dots"
    assert "cp.async" in ptx, "the slot loop should stage B through cp.async (num_stages)"
    assert k.metadata.shared <= 110 * 1024, f"shared memory {k.metadata.shared} B"
    assert_no_spills(k)
