"""The BGMV shrink (kernels/lora_shrink_bgmv.py) compiled offline for sm_90 with A's block as separate loads
(KCHUNKS): registers drop enough for 2-3 programs per SM (down's 2048-column block: 249 as one load), A's loads stay
before griddepcontrol.wait, no spills (or the 8 bytes the 128-register cap allows on the 2048-column block)."""
from __future__ import annotations

import re

import pytest

from .sm90 import compile_sm90, resource_usage

META = {"ranks_ptr": "*i32", "sorted_ids_ptr": "*i32", "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32",
        "tile_ends_ptr": "*i32"}
STRIDES = ["stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak", "stride_ok", "stride_os",
           "stride_om", "stride_or"]


@pytest.mark.parametrize("block_k,kchunks,maxnreg,max_regs,max_stack", [(1024, 4, 0, 96, 0), (2048, 8, 128, 128, 16)])
def test_bgmv_shrink_chunked_a_registers(block_k, kchunks, maxnreg, max_regs, max_stack) -> None:
    from loraserve.kernels.lora_shrink_bgmv import _lora_shrink_bgmv_kernel

    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32", **{n: "i32" for n in STRIDES})
    const = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=-(-14336 // block_k), EVEN_K=True, IEEE=False,
                 DOT_K=128, USE_PDL=True, PREFETCH_A=True, KCHUNKS=kchunks)
    kernel = compile_sm90(_lora_shrink_bgmv_kernel, sig, const, unit=("stride_xk", "stride_ak", "stride_or"),
                          div16_except=("R", "K"), num_warps=8, num_stages=1, launch_pdl=True,
                          **({"maxnreg": maxnreg} if maxnreg else {}))
    usage = resource_usage(kernel)
    regs = max(int(r) for r in re.findall(r"REG:(\d+)", usage))
    stack = max(int(r) for r in re.findall(r"STACK:(\d+)", usage))
    assert regs <= max_regs and stack <= max_stack, usage
    ptx = kernel.asm["ptx"]
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "A's loads should come before the wait"


@pytest.mark.parametrize("hidden,block_k,kchunks,max_regs", [(4096, 1024, 4, 80), (14336, 2048, 4, 128),
                                                            (14336, 2048, 8, 128)])
def test_bgmv_shrink_two_rows_registers(hidden, block_k, kchunks, max_regs) -> None:
    """ROWS 2 with A's block in chunks (lora_shrink_bgmv.BGMV_ROWS): <= 80 registers at 8 warps for the 4096-wide
    inputs (3 programs per SM), <= 128 for down's 2048 columns (2 per SM), no stack, A's loads before the wait."""
    from loraserve.kernels.lora_shrink_bgmv import _lora_shrink_bgmv_kernel

    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32", **{n: "i32" for n in STRIDES})
    const = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=-(-hidden // block_k), EVEN_K=True, IEEE=False,
                 DOT_K=128, USE_PDL=True, PREFETCH_A=True, KCHUNKS=kchunks, ROWS=2)
    kernel = compile_sm90(_lora_shrink_bgmv_kernel, sig, const, unit=("stride_xk", "stride_ak", "stride_or"),
                          div16_except=("R", "K"), num_warps=8, num_stages=1, launch_pdl=True)
    usage = resource_usage(kernel)
    regs = max(int(r) for r in re.findall(r"REG:(\d+)", usage))
    stack = max(int(r) for r in re.findall(r"STACK:(\d+)", usage))
    assert regs <= max_regs and stack == 0, usage
    ptx = kernel.asm["ptx"]
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "A's loads should come before the wait"
