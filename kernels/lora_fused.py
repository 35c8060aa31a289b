"""Multi-LoRA shrink + expand in ONE launch, for small steps (decode at a handful of tokens).

Semantics: as lora_shrink followed by lora_expand (see those modules), for every token t with
slot a = token_slot[t] >= 0 and slice s with columns [off_s, off_{s+1}) of y:
    h = x[t] @ lora_a[a, s, :r_a].T                     (fp32 accumulate, rounded to B's dtype)
    y[t, off_s:off_{s+1}] += h @ lora_b[a, off_s:off_{s+1}, :r_a].T
Rows of tokens without an adapter (or r_a = 0) are never touched.

Why: at 1-16 tokens the unfused pair is 2-3 dependent launches (shrink, split-K partials,
expand), each a few microseconds of launch and tail for well under a megabyte of weights.
Here program (tile, column block) recomputes the whole rank-r intermediate of its rows
(r <= 64: a [BLOCK_M, r] fp32 tile) for the slice(s) its columns cover, then its column block
of the expand. A is re-read once per column block, but from L2 (all programs of a tile read
the same rows at the same time), so HBM still sees each adapter's A and B once. The price
grows with tiles x column blocks x rank x H_in: lora_apply picks this kernel only below the
measured cross-over (``use_fused``). No partials, no atomics: bitwise reproducible.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta

if HAS_TRITON:

    @triton.jit
    def _lora_fused_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, N, R,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn,
        NUM_SLICES: tl.constexpr, BOUNDS_P2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        EVEN_K: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slots_ptr + tile)
        if slot < 0:
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        if rank <= 0:
            return

        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank

        if NUM_SLICES == 1:
            s_first = 0
            s_last = 0
        else:  # slices covered by columns [n0, min(n0 + BLOCK_N, N)), as in lora_expand
            bi = tl.arange(0, BOUNDS_P2)
            bounds = tl.load(slice_off_ptr + 1 + bi, mask=bi < NUM_SLICES - 1, other=2147483647)
            n_last = tl.minimum(n0 + BLOCK_N, N) - 1
            s_first = tl.sum((bounds <= n0).to(tl.int32), axis=0)
            s_last = tl.sum((bounds <= n_last).to(tl.int32), axis=0)

        a_slot = a_ptr + slot.to(tl.int64) * stride_al
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(s_first, s_last + 1):
            if NUM_SLICES == 1:
                col_ok = n_ok
            else:
                lo = tl.load(slice_off_ptr + s)
                hi = tl.load(slice_off_ptr + s + 1)
                col_ok = (offs_n >= lo) & (offs_n < hi)
            # Shrink: h [BLOCK_M, BLOCK_R] = x[tok] @ A[slot, s, :rank].T over the whole H_in.
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
            a_ptrs = a_slot + s * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                    at = tl.load(a_ptrs, mask=r_ok[:, None], other=0.0)
                else:
                    k_ok = offs_k < K - k * BLOCK_K
                    xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    h += tl.dot(xt, tl.trans(at), input_precision="ieee")
                else:
                    h += tl.dot(xt, tl.trans(at))
                x_ptrs += BLOCK_K * stride_xk
                a_ptrs += BLOCK_K * stride_ak
            # Expand: this column block of B [BLOCK_N, BLOCK_R]; ranks past r_a masked to 0.
            bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None] * stride_bn
                         + offs_r[None, :] * stride_bk, mask=col_ok[:, None] & r_ok[None, :], other=0.0)
            if CAST:
                hb = h.to(bt.dtype)
            else:
                hb = h
            if IEEE:
                acc += tl.dot(hb, tl.trans(bt), input_precision="ieee")
            else:
                acc += tl.dot(hb, tl.trans(bt))

        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_ok = row_ok[:, None] & n_ok[None, :]
        yv = tl.load(y_ptrs, mask=y_ok, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=y_ok)


# Tuned on an H200 (benchmarks/bench_lora_kernels.py --sweep-fused), Llama-3-8B shapes, bf16.
FUSED_CONFIG = dict(BLOCK_N=128, BLOCK_K=256, num_warps=4, num_stages=3)
# Use the fused kernel while (tiles x column blocks) x (rank x H_in) stays under this many
# A elements re-read from L2, and the step is small (see use_fused).
FUSED_MAX_TOKENS = 16
FUSED_MAX_A_ELEMS_PER_PROGRAM = 16 * 16384


def fused_config(num_tokens: int, rank: int, hidden_in: int, n_total: int) -> dict:
    cfg = dict(FUSED_CONFIG)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n_total) if HAS_TRITON else 16))
    return cfg


def use_fused(num_tokens: int, rank: int, hidden_in: int) -> bool:
    """Host-side choice (a function of shapes only, so a CUDA graph keeps its kernel)."""
    return num_tokens <= FUSED_MAX_TOKENS and max(16, rank) * hidden_in <= FUSED_MAX_A_ELEMS_PER_PROGRAM


def lora_shrink_expand(x: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                       ranks: Tensor, y: Tensor, *, config: dict | None = None) -> Tensor:
    """y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T in one launch.

    x [T, H_in]; lora_a [L, S, R, H_in]; lora_b [L, N, R] (R <= 128), all one dtype;
    slice_offsets [S+1] int32; meta for T tokens; ranks [L] int32; y [T, N] (column view
    allowed), updated in place and returned. config: override of :func:`fused_config`.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    L2, N, R2 = lora_b.shape
    assert H2 == H and L2 == L and R2 == R, f"shapes x {tuple(x.shape)} A {tuple(lora_a.shape)} B {tuple(lora_b.shape)}"
    assert R <= 128, f"the fused kernel keeps [BLOCK_M, R] in registers: R={R} > 128"
    assert x.dtype == lora_a.dtype == lora_b.dtype == y.dtype, "x, lora_a, lora_b and y must share a dtype"
    assert y.shape == (T, N), f"y must be [T={T}, N={N}], got {tuple(y.shape)}"
    assert slice_offsets.shape == (S + 1,) and slice_offsets.dtype == torch.int32
    assert ranks.shape == (L,) and ranks.dtype == torch.int32, "ranks must be int32 [L]"
    assert meta.num_tokens == T, f"meta built for {meta.num_tokens} tokens, x has {T}"
    if T == 0 or N == 0:
        return y
    cfg = dict(fused_config(T, R, H, N), **(config or {}))
    BN, BK = cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (meta.grid_tiles, triton.cdiv(N, BN))
    _lora_fused_kernel[grid](
        x, lora_a, lora_b, y, ranks, slice_offsets,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        H, N, R,
        x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), y.stride(0), y.stride(1),
        NUM_SLICES=S, BOUNDS_P2=max(2, 1 << max(0, (S - 2).bit_length())),
        BLOCK_M=meta.block_m, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=max(16, triton.next_power_of_2(R)),
        EVEN_K=H % BK == 0, CAST=lora_b.dtype != torch.float32, IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
