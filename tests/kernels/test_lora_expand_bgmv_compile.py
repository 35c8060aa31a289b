"""The BGMV-style expand (kernels/lora_expand_bgmv.py) compiled offline for sm_90 (tests/kernels/sm90.py) at the
Llama-3-8B projections' configs (64 tokens / 32 adapters / rank 16 and rank 64; 1-3 slices, split-K partials of
the BGMV shrink): no register spills, and with programmatic dependent launch the B load sits before
griddepcontrol.wait. Skipped on a GPU machine (the GPU tests compile for real) and where this Triton cannot build
for sm_90 offline."""
from __future__ import annotations

import pytest
import torch

from . import sm90

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real")

TYPES = {"buf_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ranks_ptr": "*i32", "slice_off_ptr": "*i32",
         "scale_ptr": "*fp32", "shift_ptr": "*fp32", "scale_on_ptr": "*i32", "stride_sl": "i32", "stride_sn": "i32",
         "sorted_ids_ptr": "*i32", "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32",
         "N": "i32", "R": "i32", "COLS_PER_PROG": "i32", "stride_bsplit": "i32", "stride_bs": "i32", "stride_bm": "i32", "stride_br": "i32",
         "stride_bl": "i32", "stride_bn": "i32", "stride_bk": "i32", "stride_ym": "i32", "stride_yn": "i32"}


def compile_expand_bgmv(widths: list[int], rank: int, split_k: int, pdl: bool = True, block_n: int | None = None,
                        grid_tiles: int = 36, dora: bool = True):
    from loraserve.kernels.lora_expand_bgmv import _lora_expand_bgmv_kernel, expand_bgmv_config

    cfg = expand_bgmv_config(sum(widths), rank, grid_tiles)
    bn = block_n or cfg["BLOCK_N"]
    const = dict(NUM_SLICES=len(widths), BLOCK_M=16, BLOCK_N=bn, BLOCK_R=cfg["BLOCK_R"], SPLIT_K=split_k,
                 SK_P=1 << max(0, (split_k - 1).bit_length()), EVEN_R=True, CAST=True, USE_PDL=pdl, TRIGGER=pdl,
                 HAS_SCALE=dora, HAS_SHIFT=dora, SCALE_FLAG=dora, GROUP_MAJOR=False)   # the engine's call: DoRA vectors, per-slot flag
    return sm90.compile_sm90(_lora_expand_bgmv_kernel, TYPES, const, unit=("stride_br", "stride_bk", "stride_yn", "stride_sn"),
                             div16_except=("R", "stride_bsplit", "stride_bs", "stride_sl"), num_warps=cfg["num_warps"],
                             num_stages=1, launch_pdl=pdl)


@pytest.mark.parametrize("widths,split_k", [([4096, 1024, 1024], 4), ([4096], 4), ([14336, 14336], 2), ([4096], 7)])
@pytest.mark.parametrize("rank,grid_tiles", [(16, 36), (32, 36), (16, 2)])   # 64 tokens / 32 adapters; 1 token
def test_expand_bgmv_compiles_without_spills(widths, split_k, rank, grid_tiles) -> None:
    k = compile_expand_bgmv(widths, rank, split_k, grid_tiles=grid_tiles)
    # gate_up's 2-slice config keeps an 8-byte stack frame in Triton 3.9 (LOCAL:0); more would be spilling
    assert sm90.stack_bytes(k) <= 8, sm90.resource_usage(k)
    ptx = k.asm["ptx"]
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "B should load before the wait"
