"""The streaming LoRA expand compiled offline for an H100/H200 (sm_90) on a machine without a GPU:
triton.compile with a GPUTarget runs the whole NVIDIA pipeline (TTGIR, PTX, ptxas), so a kernel
that would not compile, or would spill registers, fails here in CPU CI rather than on the GPU.
Configs are those stream_expand_config picks for Llama-3-8B projections at decode, the 64-token
layer case and prefill tiles. Skipped on a GPU machine (the GPU tests compile for real) and where
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

STRIDES = ["stride_bsplit", "stride_bs", "stride_bm", "stride_br", "stride_bl", "stride_bn", "stride_bk",
           "stride_ym", "stride_yn", "stride_sl", "stride_sn"]
UNIT_STRIDES = ("stride_br", "stride_bk", "stride_yn", "stride_sn")  # Triton specialises == 1


def _compile_sm90(num_slices: int, block_m: int, cfg: dict, split_k: int, one_slice: bool = False):
    from loraserve.kernels.lora_expand_stream import _lora_expand_stream_kernel

    sig = {"buf_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ranks_ptr": "*i32", "slice_off_ptr": "*i32",
           "scale_ptr": "*fp32", "shift_ptr": "*fp32", "scale_on_ptr": "*i32", "sorted_ids_ptr": "*i32", "tile_slots_ptr": "*i32",
           "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32", "N": "i32", "R": "i32", "COLS_PER_PROG": "i32"}
    sig.update({n: "i32" for n in STRIDES})
    const = dict(NUM_SLICES=num_slices, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
                 SPLIT_K=split_k, SK_CHUNK=cfg["SK_CHUNK"], EVEN_R=True, CAST=True, IEEE=False,
                 HAS_SCALE=True, HAS_SHIFT=True, USE_PDL=False,
                 B_AHEAD=cfg.get("B_AHEAD", 2), Y_AHEAD=cfg.get("Y_AHEAD", 1), SLOTS=cfg.get("SLOTS", 0),
                 DENSE_SLOTS=False, PREFETCH_B=False, TRIGGER=False, PF_THREADS=32 * cfg["num_warps"],
                 SCALE_FLAG=True, GROUP_MAJOR=False, ONE_SLICE=one_slice)
    return compile_sm90(_lora_expand_stream_kernel, sig, const, unit=UNIT_STRIDES, div16_except=("R",),
                        num_warps=cfg["num_warps"], num_stages=1)


@pytest.mark.parametrize("num_tokens,grid_tiles,block_m,rank,split_k", [
    (1, 2, 16, 16, 32), (64, 36, 16, 16, 4), (64, 36, 16, 64, 1), (1024, 64, 32, 64, 1), (2048, 96, 64, 16, 1)])
@pytest.mark.parametrize("widths", [[4096, 1024, 1024], [14336, 14336], [4096]])
def test_stream_expand_compiles_for_sm90_without_spills(num_tokens, grid_tiles, block_m, rank, split_k, widths):
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    cfg = stream_expand_config(num_tokens, sum(widths), rank, len(widths), block_m, grid_tiles, split_k)
    k = _compile_sm90(len(widths), block_m, cfg, split_k)
    ptx = k.asm["ptx"]
    assert has_mma(ptx), "expected tensor-core dots"
    if cfg.get("SLOTS", 0) < 0:  # the default column loop: Triton's pipeliner must have engaged
        assert "cp.async" in ptx, "the pipelined column loop should stage B and y through cp.async"
    else:
        assert "ld.global.v4" in ptx, "expected v4 loads"
    assert k.metadata.shared <= 64 * 1024, f"shared memory {k.metadata.shared} B"
    assert_no_spills(k)


@pytest.mark.parametrize("widths", [[4096, 1024, 1024], [14336, 14336]])
def test_stream_expand_one_slice_dot_compiles(widths):
    """The one-slice dot (default at <= 16 tokens: lora_expand_stream.STREAM_ONE_SLICE_MAX_TOKENS) at 1 token, BGMV
    shrink partials (4 K chunks): still Triton-pipelined (cp.async), no spills."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    cfg = stream_expand_config(1, sum(widths), 16, len(widths), 16, 2, 4)
    assert cfg["SLOTS"] < 0
    k = _compile_sm90(len(widths), 16, cfg, 4, one_slice=True)
    assert "cp.async" in k.asm["ptx"], "the pipelined column loop should stage B and y through cp.async"
    assert_no_spills(k)
