"""The segment-tiled LoRA pair (kernels/lora_seg.py) compiled offline for an H100/H200 (sm_90) on a machine
without a GPU (the whole NVIDIA pipeline: TTGIR, PTX, ptxas), at the configs seg_*_config picks for Llama-3-8B
projections at 256-1024 tokens: tensor-core dots, no register spills, shared memory within a Hopper SM."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, has_mma

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real"),
]

META = {"count_ptr": "*i32", "sorted_ids_ptr": "*i32", "tile_slots_ptr": "*i32", "tile_starts_ptr": "*i32", "tile_ends_ptr": "*i32",
        "ranks_ptr": "*i32", "num_tiles": "i32"}
PROJ = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}


@pytest.mark.parametrize("group", ["1", "4"])   # row blocks of 4 tiles: the adaptive form (one pass or per tile)
@pytest.mark.parametrize("proj", list(PROJ))
@pytest.mark.parametrize("num_tokens,block_m,rank,y_ahead", [(1024, 32, 16, False), (1024, 32, 64, True),
                                                             (256, 16, 64, False)])
def test_seg_kernels_compile_for_sm90_without_spills(proj, num_tokens, block_m, rank, y_ahead, group, monkeypatch):
    from loraserve.kernels.lora_seg import _seg_expand_kernel, _seg_shrink_kernel, seg_expand_config, seg_shrink_config

    monkeypatch.setenv("LORASERVE_LORA_SEG_GROUP", group)
    monkeypatch.setenv("LORASERVE_LORA_SEG_ADAPT", "1")
    hidden, widths = PROJ[proj]
    S, N, tiles = len(widths), sum(widths), num_tokens // block_m + 32
    sc = seg_shrink_config(num_tokens, rank, hidden, S, block_m, tiles)
    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32", K_CHUNK="i32",
               **{n: "i32" for n in ("stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak",
                                     "stride_ok", "stride_os", "stride_om", "stride_or")})
    k = compile_sm90(_seg_shrink_kernel, sig, dict(NUM_SLICES=S, RP=sc["RP"], TILE_M=block_m, GROUP=sc["GROUP"],
                                                   BLOCK_N=sc["BLOCK_N"], BLOCK_K=sc["BLOCK_K"], EVEN_K=True,
                                                   IEEE=False, REDUCE=True, ADAPT=sc["ADAPT"],
                                                   RED_UNROLL=sc["RED_UNROLL"], USE_PDL=True),
                     unit=("stride_xk", "stride_ak", "stride_or"), div16_except=("R", "num_tiles"),
                     num_warps=sc["num_warps"], num_stages=sc["num_stages"], launch_pdl=True)
    assert has_mma(k.asm["ptx"]) and "griddepcontrol.wait" in k.asm["ptx"]
    assert k.metadata.shared <= 227 * 1024, f"shrink shared memory {k.metadata.shared} B"
    assert_no_spills(k)
    monkeypatch.setenv("LORASERVE_LORA_SEG_YAHEAD", str(int(y_ahead)))
    ec = seg_expand_config(num_tokens, N, rank, block_m, tiles, num_slices=S)
    sig = dict(META, parts_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", slice_off_ptr="*i32", scale_ptr="*fp32",
               shift_ptr="*fp32", scale_on_ptr="*i32", N="i32", R="i32", BLOCKS_PER_PROG="i32",
               **{n: "i32" for n in ("stride_pk", "stride_ps", "stride_pm", "stride_pr", "stride_bl", "stride_bn",
                                     "stride_bk", "stride_ym", "stride_yn", "stride_sl", "stride_sn")})
    k = compile_sm90(_seg_expand_kernel, sig, dict(NUM_SLICES=S, BOUNDS_P2=2, RP=max(16, rank), TILE_M=block_m,
                                                   GROUP=ec["GROUP"], BLOCK_N=ec["BLOCK_N"], SPLIT_K=2, EVEN_N=True,
                                                   EVEN_R=True, HAS_SCALE=True, HAS_SHIFT=True, HAS_FLAGS=True,
                                                   Y_AHEAD=ec["Y_AHEAD"], ADAPT=ec["ADAPT"], USE_PDL=True),
                     unit=("stride_pr", "stride_bk", "stride_yn", "stride_sn"),
                     div16_except=("R", "num_tiles", "BLOCKS_PER_PROG"),
                     num_warps=ec["num_warps"], num_stages=ec["num_stages"], launch_pdl=True)
    assert has_mma(k.asm["ptx"]) and "griddepcontrol.wait" in k.asm["ptx"]
    assert "cp.async" in k.asm["ptx"], "the column loop should be pipelined (B through cp.async)"
    assert k.metadata.shared <= 227 * 1024, f"expand shared memory {k.metadata.shared} B"
    assert_no_spills(k)


@pytest.mark.parametrize("trigger", [False, True])
def test_seg_early_metadata_and_trigger_compile_for_sm90(trigger):
    """lora_seg.seg_early's forms (qkv r64 at 256 tokens): the metadata loads before griddepcontrol.wait, the shrink's
    launch_dependents right after its wait (before its A / x stream), the expand's too with TRIGGER_EARLY (here with
    its B run's L2 prefetch before the wait, PREFETCH_B); no spills."""
    from loraserve.kernels.lora_seg import _seg_expand_kernel, _seg_shrink_kernel, seg_expand_config, seg_shrink_config

    hidden, widths = PROJ["qkv"]
    S, N, T, bm, R = len(widths), sum(widths), 256, 16, 64
    tiles = T // bm + 32
    sc = seg_shrink_config(T, R, hidden, S, bm, tiles)
    sig = dict(META, x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", K="i32", R="i32", K_CHUNK="i32",
               **{n: "i32" for n in ("stride_xm", "stride_xk", "stride_al", "stride_as", "stride_ar", "stride_ak",
                                     "stride_ok", "stride_os", "stride_om", "stride_or")})
    k = compile_sm90(_seg_shrink_kernel, sig, dict(NUM_SLICES=S, RP=sc["RP"], TILE_M=bm, GROUP=1, BLOCK_N=sc["BLOCK_N"],
                                                   BLOCK_K=sc["BLOCK_K"], EVEN_K=True, IEEE=False, REDUCE=True,
                                                   ADAPT=False, RED_UNROLL=sc["RED_UNROLL"], USE_PDL=True, EARLY=True),
                     unit=("stride_xk", "stride_ak", "stride_or"), div16_except=("R", "num_tiles"),
                     num_warps=sc["num_warps"], num_stages=sc["num_stages"], launch_pdl=True)
    lines = k.asm["ptx"].splitlines()
    first = {w: next(i for i, ln in enumerate(lines) if w in ln)
             for w in ("ld.global", "griddepcontrol.wait", "griddepcontrol.launch_dependents", "cp.async")}
    assert first["ld.global"] < first["griddepcontrol.wait"] < first["griddepcontrol.launch_dependents"] < first["cp.async"]
    assert_no_spills(k)
    ec = seg_expand_config(T, N, R, bm, tiles, num_slices=S)
    sig = dict(META, parts_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", slice_off_ptr="*i32", scale_ptr="*fp32",
               shift_ptr="*fp32", scale_on_ptr="*i32", N="i32", R="i32", BLOCKS_PER_PROG="i32",
               **{n: "i32" for n in ("stride_pk", "stride_ps", "stride_pm", "stride_pr", "stride_bl", "stride_bn",
                                     "stride_bk", "stride_ym", "stride_yn", "stride_sl", "stride_sn")})
    k = compile_sm90(_seg_expand_kernel, sig, dict(NUM_SLICES=S, BOUNDS_P2=2, RP=R, TILE_M=bm, GROUP=1,
                                                   BLOCK_N=ec["BLOCK_N"], SPLIT_K=1, EVEN_N=True, EVEN_R=True,
                                                   HAS_SCALE=True, HAS_SHIFT=True, HAS_FLAGS=True, Y_AHEAD=False,
                                                   ADAPT=False, USE_PDL=True, EARLY=True, TRIGGER_EARLY=trigger,
                                                   PREFETCH_B=trigger, PF_THREADS=32 * ec["num_warps"]),
                     unit=("stride_pr", "stride_bk", "stride_yn", "stride_sn"),
                     div16_except=("R", "num_tiles", "BLOCKS_PER_PROG"),
                     num_warps=ec["num_warps"], num_stages=ec["num_stages"], launch_pdl=True)
    ptx = k.asm["ptx"]
    lines = ptx.splitlines()
    wait = next(i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln)
    trig = [i for i, ln in enumerate(lines) if "griddepcontrol.launch_dependents" in ln]
    assert next(i for i, ln in enumerate(lines) if "ld.global" in ln) < wait and "cp.async" in ptx
    assert len(trig) == 1 and (trig[0] < wait + 10 if trigger else trig[0] > wait + 100), (wait, trig)
    if trigger:   # (with the B run's L2 prefetch before the wait)
        assert "cp.async.bulk.prefetch.L2" in "\n".join(lines[:wait])
    assert_no_spills(k)
