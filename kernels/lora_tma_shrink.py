"""Multi-LoRA shrink with A fed by TMA: each program streams its K chunk of A through shared memory.

Semantics (as lora_shrink_bgmv, the split-K partials the expands sum), for every token t with slot a >= 0, slice s
and K chunk j:
    out[j, s, t, :r_a] = x[t, Kj] @ lora_a[a, s, :r_a, Kj].T      (fp32 accumulate, fp32 store)
Kj = [j * BLOCK_K, (j + 1) * BLOCK_K), BLOCK_K and SPLIT_K = cdiv(H_in, BLOCK_K) those of the BGMV shrink (the
workspace lora_apply sizes); entries of tokens without an adapter and columns >= rank are left as they were.
x [T, H_in], lora_a [L, S, R, H_in] contiguous (R = 16 or 32), out [SPLIT_K, S, T, R] fp32.

Why: the BGMV shrink holds its [16, BLOCK_K] block of A in registers (down: BLOCK_K 2048 at 8 warps, ~250
registers a thread), so one program fits per SM and down's 224 programs at the 64-token / 32-adapter case run in two
waves (7.7 us for 14.7 MB of A, ~1.9 TB/s; qkv and gate_up: two waves at 2 programs per SM). Here the chunk comes
as [R, BOX_K] boxes (8 KB at rank 16, 256 columns) through a host TMA descriptor over A's [L * S * R, H_in] view,
the K loop pipelined by Triton with STAGES - 1 boxes in flight (all of a chunk's boxes by default) in shared memory:
few registers, so 2-3 programs fit per SM and the grid runs in one wave with the same bytes in flight.

Tiles of <= 2 rows (decode) multiply-sum per row ([R, BOX_K] * [BOX_K] -> [R], no padding rows), x's rows through
TMA too ([1, BOX_K] boxes) so Triton pipelines them with A's; larger tiles take tl.dot of their rows against the box
straight from shared memory (x through plain loads). Pools of R > 32 are not taken (the box spans R; a rank-r slot
reads R rows of A, r <= R, the rest meet the masked store).

Switch: LORASERVE_LORA_TMA_SHRINK (TMA_SHRINK, read at each launch; "0" = off, the default until the H200 figures
are in), taken by lora_shrink_bgmv's launcher on sm_90+ (or the interpreter).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch

if HAS_TRITON:

    @triton.jit
    def _lora_shrink_tma_kernel(
        a_desc, x_desc, x_ptr, out_ptr, ranks_ptr, a_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, R,
        stride_xm, stride_xk, stride_ok, stride_os, stride_om, stride_or,
        NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        BOX_K: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
        USE_PDL: tl.constexpr = False, X_TMA: tl.constexpr = False, ROWS2: tl.constexpr = True,
        PF_A: tl.constexpr = False,
    ):
        if USE_PDL:  # as lora_shrink_bgmv: the expand may launch now; x is waited for below
            tl.extra.cuda.gdc_launch_dependents()
        tile = tl.program_id(0)
        pid_k = tl.program_id(1)
        s = tl.program_id(2)
        slot = tl.load(tile_slots_ptr + tile)
        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        if slot < 0:
            if USE_PDL:  # every program waits: our completion implies the kernel's before us
                tl.extra.cuda.gdc_wait()
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        rows = tl.minimum(end - start, BLOCK_M)
        if rank <= 0:
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
            return
        k0 = pid_k * BLOCK_K
        nbox = (tl.minimum(K - k0, BLOCK_K) + BOX_K - 1) // BOX_K
        arow = (slot * NUM_SLICES + s) * BLOCK_R   # the slot's slice's first row in A's [L * S * R, K] view
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        out_base = out_ptr + pid_k * stride_ok + s * stride_os + offs_r * stride_or
        offs_kb = tl.arange(0, BOX_K)
        if PF_A:  # (with USE_PDL, on a GPU) our chunk of A into L2 while the kernel before us finishes, one bulk
            # prefetch per row of A (BLOCK_K * 2 contiguous bytes each): A is older than that kernel, so after the wait
            # the pipeline's TMA loads hit L2 (the BGMV shrink holds its block in registers there instead)
            kbytes = (tl.minimum(K - k0, BLOCK_K) * 2).to(tl.int32)
            rows_p = (a_ptr + (arow + offs_r).to(tl.int64) * K + k0).to(tl.pointer_type(tl.int8))
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [rows_p, tl.where(r_ok, kbytes, 0)], dtype=tl.int32, is_pure=False, pack=1)
        if USE_PDL:  # x is written by the kernel before us (A is older; the boxes are issued after this)
            tl.extra.cuda.gdc_wait()
        if ROWS2:
            if rows <= 2:   # decode tiles: one multiply-sum per row, no tl.dot in the loop
                tok0 = tl.load(sorted_ids_ptr + start).to(tl.int64)
                tok1 = tl.load(sorted_ids_ptr + start + rows - 1).to(tl.int64)
                acc0 = tl.zeros((BLOCK_R,), dtype=tl.float32)
                acc1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
                t0 = tok0.to(tl.int32)
                t1 = tok1.to(tl.int32)
                for i in tl.range(0, nbox, num_stages=STAGES):
                    kk = k0 + i * BOX_K
                    a = a_desc.load([arow, kk]).to(tl.float32)   # [BLOCK_R, BOX_K]
                    if X_TMA:
                        x0 = tl.reshape(x_desc.load([t0, kk]), [BOX_K])
                        x1 = tl.reshape(x_desc.load([t1, kk]), [BOX_K])
                    else:
                        offs_k = kk + offs_kb
                        k_ok = offs_k < K
                        x0 = tl.load(x_ptr + tok0 * stride_xm + offs_k * stride_xk, mask=k_ok, other=0.0)
                        x1 = tl.load(x_ptr + tok1 * stride_xm + offs_k * stride_xk, mask=k_ok, other=0.0)
                    acc0 += tl.sum(a * x0.to(tl.float32)[None, :], axis=1)
                    acc1 += tl.sum(a * x1.to(tl.float32)[None, :], axis=1)
                tl.store(out_base + tok0 * stride_om, acc0, mask=r_ok)
                if rows > 1:
                    tl.store(out_base + tok1 * stride_om, acc1, mask=r_ok)
                return
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        toks = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for i in tl.range(0, nbox, num_stages=STAGES):
            kk = k0 + i * BOX_K
            a = a_desc.load([arow, kk])   # [BLOCK_R, BOX_K]
            offs_k = kk + offs_kb
            xt = tl.load(x_ptr + toks[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, tl.trans(a), input_precision="ieee")   # [BLOCK_M, BLOCK_R]
            else:
                acc += tl.dot(xt, tl.trans(a))
        tl.store(out_base[None, :] + toks[:, None] * stride_om, acc, mask=row_ok[:, None] & r_ok[None, :])


TMA_SHRINK = os.environ.get("LORASERVE_LORA_TMA_SHRINK", "0").strip().lower() not in ("", "0", "false", "off", "no")
TMA_SHRINK_MIN_TOKENS = int(os.environ.get("LORASERVE_LORA_TMA_SHRINK_MIN_TOKENS", "1"))  # (fewer: the BGMV shrink)
TMA_SHRINK_BOX_K = int(os.environ.get("LORASERVE_LORA_TMA_SHRINK_BOX_K", "256"))
# pipeline stages: all of a chunk's boxes in flight (nbox + 1), at most this many (shared memory: 8 x 9 KB a program)
TMA_SHRINK_MAX_STAGES = int(os.environ.get("LORASERVE_LORA_TMA_SHRINK_MAX_STAGES", "9"))
TMA_SHRINK_WARPS = int(os.environ.get("LORASERVE_LORA_TMA_SHRINK_WARPS", "4"))
TMA_SHRINK_X = os.environ.get("LORASERVE_LORA_TMA_SHRINK_X", "1").strip().lower() not in ("", "0", "false", "off", "no")
# each program bulk-prefetches its chunk of A into L2 before griddepcontrol.wait (LORASERVE_LORA_TMA_SHRINK_PF)
TMA_SHRINK_PF = os.environ.get("LORASERVE_LORA_TMA_SHRINK_PF", "0").strip().lower() not in ("", "0", "false", "off", "no")
_TMA_SHRINK_FAILED: set[tuple] = set()   # (S, R, device) whose TMA shrink failed: the BGMV shrink there


def tma_shrink_applies(x: Tensor, lora_a: Tensor, block_k: int) -> bool:
    """TMA_SHRINK is on and this launch fits: a contiguous pool of rank 16 or 32, whole boxes per K chunk, 16-bit
    on a GPU, sm_90+ (or the interpreter)."""
    if not (TMA_SHRINK and HAS_TRITON) or x.shape[0] < TMA_SHRINK_MIN_TOKENS:
        return False
    L, S, R, H = lora_a.shape
    box = min(TMA_SHRINK_BOX_K, block_k)
    if R not in (16, 32) or not lora_a.is_contiguous() or block_k % box or L * S * R >= 2 ** 31 or lora_a.data_ptr() % 16:
        return False
    if (S, R, x.device) in _TMA_SHRINK_FAILED:
        return False
    if x.is_cuda and x.dtype not in (torch.bfloat16, torch.float16):
        return False
    from .lora_tma_expand import _device_ok

    return _device_ok(x.device)


def _x_tma_ok(x: Tensor, box_k: int) -> bool:
    es = x.element_size()
    return x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * es) % 16 == 0 and box_k <= 256


def lora_shrink_tma(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor, block_k: int,
                    *, config: dict | None = None) -> Tensor:
    """out [SPLIT_K, S, T, R] float32 <- the per-chunk partials (module docstring); SPLIT_K = cdiv(H_in, block_k)
    (the caller's: lora_shrink_bgmv checked the arguments and tma_shrink_applies). config: BOX_K, STAGES,
    num_warps, X_TMA, ROWS2 overrides (benchmarks, tests)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, H = x.shape
    L, S, R, _ = lora_a.shape
    SK = out.shape[0]
    assert SK == -(-H // block_k), f"out has {SK} K splits, BLOCK_K {block_k} needs {-(-H // block_k)}"
    box = (config or {}).get("BOX_K", min(TMA_SHRINK_BOX_K, block_k))
    cfg = dict(dict(STAGES=max(2, min(TMA_SHRINK_MAX_STAGES, block_k // box + 1)), num_warps=TMA_SHRINK_WARPS,
                    X_TMA=TMA_SHRINK_X, ROWS2=True, PF_A=TMA_SHRINK_PF), **(config or {}))
    assert block_k % box == 0, f"BLOCK_K {block_k} must be whole boxes of {box}"
    a_view = lora_a.view(L * S * R, H)
    a_desc = TensorDescriptor(a_view, [L * S * R, H], [H, 1], [R, box])
    x_tma = cfg["X_TMA"] and cfg["ROWS2"] and _x_tma_ok(x, box)
    x_desc = TensorDescriptor(x, [T, H], [x.stride(0), 1], [1, box]) if x_tma else None
    grid = (meta.grid_tiles, SK, S)
    pdl = pdl_launch(x.device)
    _lora_shrink_tma_kernel[grid](
        a_desc, x_desc, x, out, ranks, lora_a,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        H, R, x.stride(0), x.stride(1), *out.stride(),
        NUM_SLICES=S, BLOCK_M=meta.block_m, BLOCK_R=R, BLOCK_K=block_k, BOX_K=box, STAGES=cfg["STAGES"],
        IEEE=x.dtype == torch.float32, X_TMA=x_tma, ROWS2=cfg["ROWS2"],
        PF_A=bool(cfg["PF_A"]) and bool(pdl.get("USE_PDL")) and x.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["STAGES"], **pdl,
    )
    return out
