"""BGMV-style multi-LoRA shrink for small steps: A straight into registers, x row by row, no tl.dot.

Semantics (as :func:`lora_shrink` with split-K partials), for every token t with slot
a = token_slot[t] >= 0, slice s and K chunk j:
    out[j, s, t, :r_a] = x[t, Kj] @ lora_a[a, s, :r_a, Kj].T      (fp32 accumulate, fp32 store)
Kj = [j * BLOCK_K, (j + 1) * BLOCK_K) and SPLIT_K = cdiv(H_in, BLOCK_K): every program reads ONE
[16, BLOCK_K] block of A, all of it issued at once (16-32 KB in flight per program, no loop to
pipeline), and the expand sums the SPLIT_K partials while loading them (lora_expand_stream).

Why: at decode-like steps a tile holds 1-4 tokens of one adapter (64 tokens / 32 adapters: 2).
The tl.dot shrink pads x to 16 rows (BLOCK_M), stages x and A through shared memory in a
pipelined K loop of 8 KB steps, and keeps 2-3 programs per SM with ~24 KB in flight each: it
streamed A at 1.3-1.5 TB/s (PERF_NOTES). Here the only large operand is A; x rows (BLOCK_K * 2
bytes each, from L2: every adapter's tile reads the same x chunk only if it holds that token) are
loaded per real row, and the product is a broadcast-multiply-sum over K ([16, BLOCK_K] * [BLOCK_K]
-> [16]), so padding rows cost nothing. x of the tile's first 4 rows is issued with A (all loads at
once); a tile with more than BGMV_MAX_ROWS = 4 rows (one adapter with many tokens) instead takes
tl.dot of all its rows against A, re-read in 128-column chunks from cache.

Grid (meta.grid_tiles, rank_blocks * SPLIT_K, S): host-known sizes only (CUDA graphs).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch
from .lora_prefetch import prefetch_on

if HAS_TRITON:

    @triton.jit
    def _a_chunk(a_rows, n_ok, kc, K, stride_ak, CK: tl.constexpr, EVEN_K: tl.constexpr):
        """[BLOCK_N, CK] of A from column kc (masked past K unless EVEN_K)."""
        offs = kc + tl.arange(0, CK)
        if EVEN_K:
            return tl.load(a_rows + offs[None, :] * stride_ak, mask=n_ok[:, None], other=0.0)
        return tl.load(a_rows + offs[None, :] * stride_ak, mask=n_ok[:, None] & (offs < K)[None, :], other=0.0)

    @triton.jit
    def _chunk_rows(a, kc, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm, stride_xk, acc0, acc1, acc2, acc3,
                    CK: tl.constexpr, ROWS: tl.constexpr = 4):
        """acc_r += A chunk [BLOCK_N, CK] (fp32) . x_r[kc : kc + CK] for the tile's <= ROWS rows (rows past it: x = 0)."""
        offs = kc + tl.arange(0, CK)
        k_ok = offs < K
        rows_k = tl.zeros_like(offs) + rows
        x_row = x_ptr + offs * stride_xk
        x0 = tl.load(x_row + tok * stride_xm, mask=k_ok, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + tok1 * stride_xm, mask=k_ok & (rows_k > 1), other=0.0).to(tl.float32)
        af = a.to(tl.float32)
        acc0 += tl.sum(af * x0[None, :], axis=1)
        acc1 += tl.sum(af * x1[None, :], axis=1)
        if ROWS == 4:
            x2 = tl.load(x_row + tok2 * stride_xm, mask=k_ok & (rows_k > 2), other=0.0).to(tl.float32)
            x3 = tl.load(x_row + tok3 * stride_xm, mask=k_ok & (rows_k > 3), other=0.0).to(tl.float32)
            acc2 += tl.sum(af * x2[None, :], axis=1)
            acc3 += tl.sum(af * x3[None, :], axis=1)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _x2(x_ptr, kc, K, tok, tok1, rows, stride_xm, stride_xk, CK: tl.constexpr):
        """x of a tile's two rows at columns [kc, kc + CK) (bf16; the second row 0 past a one-row tile)."""
        offs = kc + tl.arange(0, CK)
        k_ok = offs < K
        x_row = x_ptr + offs * stride_xk
        x0 = tl.load(x_row + tok * stride_xm, mask=k_ok, other=0.0)
        x1 = tl.load(x_row + tok1 * stride_xm, mask=k_ok & ((tl.zeros_like(offs) + rows) > 1), other=0.0)
        return x0, x1

    @triton.jit
    def _mac2(a, x0, x1, acc0, acc1):
        af = a.to(tl.float32)
        return acc0 + tl.sum(af * x0.to(tl.float32)[None, :], axis=1), acc1 + tl.sum(af * x1.to(tl.float32)[None, :],
                                                                                     axis=1)

    @triton.jit
    def _rows2_chunks(a0, a1, a2, a3, a4, a5, a6, a7, kb, K, x_ptr, tok, tok1, rows, stride_xm, stride_xk, acc0, acc1,
                      CK: tl.constexpr, KCHUNKS: tl.constexpr):
        """acc_r += A . x_r over the KCHUNKS chunks of a <= 2-row tile, x one chunk ahead of its products (each
        chunk's x issued before the previous chunk's math: one L2 round trip in all, not one a chunk)."""
        xa0, xa1 = _x2(x_ptr, kb, K, tok, tok1, rows, stride_xm, stride_xk, CK)
        for j in tl.static_range(KCHUNKS):
            if j + 1 < KCHUNKS:
                xb0, xb1 = _x2(x_ptr, kb + (j + 1) * CK, K, tok, tok1, rows, stride_xm, stride_xk, CK)
            if j == 0:
                acc0, acc1 = _mac2(a0, xa0, xa1, acc0, acc1)
            elif j == 1:
                acc0, acc1 = _mac2(a1, xa0, xa1, acc0, acc1)
            elif j == 2:
                acc0, acc1 = _mac2(a2, xa0, xa1, acc0, acc1)
            elif j == 3:
                acc0, acc1 = _mac2(a3, xa0, xa1, acc0, acc1)
            elif j == 4:
                acc0, acc1 = _mac2(a4, xa0, xa1, acc0, acc1)
            elif j == 5:
                acc0, acc1 = _mac2(a5, xa0, xa1, acc0, acc1)
            elif j == 6:
                acc0, acc1 = _mac2(a6, xa0, xa1, acc0, acc1)
            else:
                acc0, acc1 = _mac2(a7, xa0, xa1, acc0, acc1)
            if j + 1 < KCHUNKS:
                xa0 = xb0
                xa1 = xb1
        return acc0, acc1

    @triton.jit
    def _rows_chunked(x_ptr, a_ptr, out_ptr, slot, s, pid_k, n_ok, offs_n, tok, tok1, tok2, tok3, rows, K,
                      stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                      stride_ok, stride_os, stride_om, stride_or,
                      BLOCK_K: tl.constexpr, KCHUNKS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      PREFETCH_A: tl.constexpr, ROWS: tl.constexpr = 4):
        """The <= 4-row tile of the kernel below with A's block as KCHUNKS (2, 4 or 8) loads, all issued before the
        wait, each converted to fp32 only while its products are summed (one fp32 chunk live, not the whole block:
        down's 2048-column block compiled to 249 registers, one program per SM, two waves at the layer case)."""
        CK: tl.constexpr = BLOCK_K // KCHUNKS
        kb = pid_k * BLOCK_K
        a_rows = a_ptr + slot.to(tl.int64) * stride_al + s * stride_as + offs_n[:, None] * stride_ar
        a0 = _a_chunk(a_rows, n_ok, kb, K, stride_ak, CK, EVEN_K)
        a1 = _a_chunk(a_rows, n_ok, kb + CK, K, stride_ak, CK, EVEN_K)
        if KCHUNKS >= 4:
            a2 = _a_chunk(a_rows, n_ok, kb + 2 * CK, K, stride_ak, CK, EVEN_K)
            a3 = _a_chunk(a_rows, n_ok, kb + 3 * CK, K, stride_ak, CK, EVEN_K)
        if KCHUNKS == 8:
            a4 = _a_chunk(a_rows, n_ok, kb + 4 * CK, K, stride_ak, CK, EVEN_K)
            a5 = _a_chunk(a_rows, n_ok, kb + 5 * CK, K, stride_ak, CK, EVEN_K)
            a6 = _a_chunk(a_rows, n_ok, kb + 6 * CK, K, stride_ak, CK, EVEN_K)
            a7 = _a_chunk(a_rows, n_ok, kb + 7 * CK, K, stride_ak, CK, EVEN_K)
        if PREFETCH_A:  # A in flight while the kernel before us finishes; x after the wait
            tl.extra.cuda.gdc_wait()
        acc0 = tl.zeros_like(offs_n).to(tl.float32)
        acc1 = tl.zeros_like(acc0)
        acc2 = tl.zeros_like(acc0)
        acc3 = tl.zeros_like(acc0)
        if ROWS == 2:  # (chunks past KCHUNKS: a0, never read)
            if KCHUNKS == 2:
                acc0, acc1 = _rows2_chunks(a0, a1, a0, a0, a0, a0, a0, a0, kb, K, x_ptr, tok, tok1, rows, stride_xm,
                                           stride_xk, acc0, acc1, CK, KCHUNKS)
            elif KCHUNKS == 4:
                acc0, acc1 = _rows2_chunks(a0, a1, a2, a3, a0, a0, a0, a0, kb, K, x_ptr, tok, tok1, rows, stride_xm,
                                           stride_xk, acc0, acc1, CK, KCHUNKS)
            else:
                acc0, acc1 = _rows2_chunks(a0, a1, a2, a3, a4, a5, a6, a7, kb, K, x_ptr, tok, tok1, rows, stride_xm,
                                           stride_xk, acc0, acc1, CK, KCHUNKS)
            out_base = out_ptr + pid_k * stride_ok + s * stride_os + offs_n * stride_or
            tl.store(out_base + tok * stride_om, acc0, mask=n_ok)
            if rows > 1:
                tl.store(out_base + tok1 * stride_om, acc1, mask=n_ok)
            return
        acc0, acc1, acc2, acc3 = _chunk_rows(a0, kb, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm, stride_xk,
                                             acc0, acc1, acc2, acc3, CK, ROWS)
        acc0, acc1, acc2, acc3 = _chunk_rows(a1, kb + CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                             stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
        if KCHUNKS >= 4:
            acc0, acc1, acc2, acc3 = _chunk_rows(a2, kb + 2 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
            acc0, acc1, acc2, acc3 = _chunk_rows(a3, kb + 3 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
        if KCHUNKS == 8:
            acc0, acc1, acc2, acc3 = _chunk_rows(a4, kb + 4 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
            acc0, acc1, acc2, acc3 = _chunk_rows(a5, kb + 5 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
            acc0, acc1, acc2, acc3 = _chunk_rows(a6, kb + 6 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
            acc0, acc1, acc2, acc3 = _chunk_rows(a7, kb + 7 * CK, K, x_ptr, tok, tok1, tok2, tok3, rows, stride_xm,
                                                 stride_xk, acc0, acc1, acc2, acc3, CK, ROWS)
        out_base = out_ptr + pid_k * stride_ok + s * stride_os + offs_n * stride_or
        tl.store(out_base + tok * stride_om, acc0, mask=n_ok)
        if rows > 1:
            tl.store(out_base + tok1 * stride_om, acc1, mask=n_ok)
        if ROWS == 4:
            if rows > 2:
                tl.store(out_base + tok2 * stride_om, acc2, mask=n_ok)
            if rows > 3:
                tl.store(out_base + tok3 * stride_om, acc3, mask=n_ok)

    @triton.jit
    def _lora_shrink_bgmv_kernel(
        x_ptr, a_ptr, out_ptr, ranks_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, R,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_ok, stride_os, stride_om, stride_or,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
        DOT_K: tl.constexpr = 128, KCHUNKS: tl.constexpr = 1,
        USE_PDL: tl.constexpr = False, PREFETCH_A: tl.constexpr = False, K_MAJOR: tl.constexpr = False,
        ROWS: tl.constexpr = 4,
    ):
        if USE_PDL:  # as lora_shrink: let the expand launch now; wait for the kernel before us (x)
            tl.extra.cuda.gdc_launch_dependents()
            if not PREFETCH_A:  # else after the metadata and A's load (lora_prefetch.py: both are older
                tl.extra.cuda.gdc_wait()  # than the kernel before us), still in every program
        if K_MAJOR:  # grid (rank blocks x K chunks, tiles, S): programs launched together read one adapter's A
            tile = tl.program_id(1)
            pid_n = tl.program_id(0) // SPLIT_K
            pid_k = tl.program_id(0) % SPLIT_K
        else:
            tile = tl.program_id(0)
            pid_n = tl.program_id(1) // SPLIT_K
            pid_k = tl.program_id(1) % SPLIT_K
        s = tl.program_id(2)
        n0 = pid_n * BLOCK_N
        slot = tl.load(tile_slots_ptr + tile)
        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        if slot < 0:
            if PREFETCH_A:
                tl.extra.cuda.gdc_wait()
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        rows = tl.minimum(end - start, BLOCK_M)
        last = start + rows - 1
        tok = tl.load(sorted_ids_ptr + start).to(tl.int64)  # the tile's first 4 rows (tiles are non-empty;
        tok1 = tl.load(sorted_ids_ptr + tl.minimum(start + 1, last)).to(tl.int64)  # rows past the tile
        if ROWS == 4:
            tok2 = tl.load(sorted_ids_ptr + tl.minimum(start + 2, last)).to(tl.int64)  # repeat its last row,
            tok3 = tl.load(sorted_ids_ptr + tl.minimum(start + 3, last)).to(tl.int64)  # never stored)
        else:
            tok2 = tok1
            tok3 = tok1
        if n0 >= rank:
            if PREFETCH_A:
                tl.extra.cuda.gdc_wait()
            return
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < rank
        if KCHUNKS > 1:  # A as KCHUNKS separate [BLOCK_N, BLOCK_K / KCHUNKS] loads (module docstring: registers)
            if rows <= ROWS:
                _rows_chunked(x_ptr, a_ptr, out_ptr, slot, s, pid_k, n_ok, offs_n, tok, tok1, tok2, tok3, rows, K,
                              stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                              stride_ok, stride_os, stride_om, stride_or,
                              BLOCK_K, KCHUNKS, EVEN_K, SPLIT_K, PREFETCH_A, ROWS)
                return
            if PREFETCH_A:  # (the dense tile path below loads A after the wait)
                tl.extra.cuda.gdc_wait()
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        # A block [BLOCK_N, BLOCK_K] and the first x row issued together: the whole block in flight.
        a_ptrs = (a_ptr + slot.to(tl.int64) * stride_al + s * stride_as
                  + offs_n[:, None] * stride_ar + offs_k[None, :] * stride_ak)
        if EVEN_K:
            k_ok = offs_k < BLOCK_K * SPLIT_K  # all true
        else:
            k_ok = offs_k < K
        a = tl.load(a_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PREFETCH_A and KCHUNKS == 1:  # A in flight into registers while the kernel before us finishes; x after
            tl.extra.cuda.gdc_wait()
        # x of up to 4 rows issued with A, all at once (a prefetching row loop waited a round trip per
        # row in its sm_90 SASS: the loop-carried copy of the next row's x waits for its load)
        x_row = x_ptr + offs_k * stride_xk
        xv = tl.load(x_row + tok * stride_xm, mask=k_ok, other=0.0)
        rows_k = tl.zeros_like(offs_k) + rows  # [BLOCK_K] (a scalar-and-block mask upsets the interpreter)
        x1 = tl.load(x_row + tok1 * stride_xm, mask=k_ok & (rows_k > 1), other=0.0)
        if ROWS == 4:  # (2: x of two rows live, not four: registers, lora_shrink_bgmv.BGMV_ROWS)
            x2 = tl.load(x_row + tok2 * stride_xm, mask=k_ok & (rows_k > 2), other=0.0)
            x3 = tl.load(x_row + tok3 * stride_xm, mask=k_ok & (rows_k > 3), other=0.0)
        out_base = out_ptr + pid_k * stride_ok + s * stride_os + offs_n * stride_or
        if rows > ROWS:  # a dense tile (one adapter, many tokens): all rows through tl.dot,
            offs_m = start + tl.arange(0, BLOCK_M)  # A re-read in DOT_K chunks from L1/L2 (the block
            row_ok = offs_m < end  # above is already in flight), so `a` is dead here: registers
            toks = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in tl.static_range(0, BLOCK_K, DOT_K):
                offs_kc = pid_k * BLOCK_K + kk + tl.arange(0, DOT_K)
                kc_ok = offs_kc < K
                xt = tl.load(x_ptr + toks[:, None] * stride_xm + offs_kc[None, :] * stride_xk,
                             mask=row_ok[:, None] & kc_ok[None, :], other=0.0)
                ac = tl.load(a_ptr + slot.to(tl.int64) * stride_al + s * stride_as + offs_n[:, None] * stride_ar
                             + offs_kc[None, :] * stride_ak, mask=n_ok[:, None] & kc_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(xt, tl.trans(ac), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
                else:
                    acc += tl.dot(xt, tl.trans(ac))
            tl.store(out_base[None, :] + toks[:, None] * stride_om, acc, mask=row_ok[:, None] & n_ok[None, :])
            return
        # Few rows (decode: 1-4 tokens per adapter): one broadcast-multiply-sum per row, no padding.
        af = a.to(tl.float32)
        tl.store(out_base + tok * stride_om, tl.sum(af * xv.to(tl.float32)[None, :], axis=1), mask=n_ok)
        if rows > 1:
            tl.store(out_base + tok1 * stride_om, tl.sum(af * x1.to(tl.float32)[None, :], axis=1), mask=n_ok)
        if ROWS == 4:
            if rows > 2:
                tl.store(out_base + tok2 * stride_om, tl.sum(af * x2.to(tl.float32)[None, :], axis=1), mask=n_ok)
            if rows > 3:
                tl.store(out_base + tok3 * stride_om, tl.sum(af * x3.to(tl.float32)[None, :], axis=1), mask=n_ok)


# Tiles with more rows than this (fixed in the kernel) take one tl.dot over all their rows; up to
# this many rows take one broadcast-multiply-sum each, their x loaded with A (a runtime branch: the
# row count lives on the device).
BGMV_MAX_ROWS = 4


# SPLIT_K the config aims at (BLOCK_K = the power of two in [256, 1024] nearest above H_in / target):
# every partial is re-read by each expand program of its tile, and a big shrink grid crowds out the
# expand programs that programmatic dependent launch would start early. BGMV_BLOCK_K: a fixed BLOCK_K
# instead (benchmarks). Both read at each call.
BGMV_TARGET_SPLIT = 4
BGMV_BLOCK_K: int | None = None
# Inputs wider than 8192 (down_proj, 14336) take BLOCK_K BGMV_WIDE_BLOCK_K (0: the target-split rule, capped at
# 1024: 14 partials for down). H200 probe (2026-11-30 22:26, loads before the wait, us): with 2048 down's pair at
# 64 tokens / 32 adapters 13.7 -> 12.6 (its expand sums 7 partials, not 14) and at 1 token 4.57 -> 3.65; on the
# 4096-wide inputs 2048 was mixed (qkv 12.0 -> 12.5 at 64 tokens, o 2.91 -> 3.22 at 1 token), so only wide ones.
BGMV_WIDE_BLOCK_K = 2048
# ... at rank > 32 instead (0: BGMV_WIDE_BLOCK_K). LORASERVE_LORA_BGMV_WIDE_BLOCK_K_R64, default 1024: H200 2026-12-01
# 12:32, down r64 / 16 adapters / 16 tokens, shrink alone 11.9 us at 2048 vs 10.15 at 1024; probe 22:04 (same run, with
# one partial a round in the streaming expand, STREAM_SK_CHUNK_MAX): pair 17.8 at 2048 vs 15.1 / 15.4 / 15.5 at 1024
# (shrink 11.7 -> 9.9-10.2, expand 6.3 -> 5.7-6.1; 14.9 at 512, one sample). Read at each call.
BGMV_WIDE_BLOCK_K_R64 = int(os.environ.get("LORASERVE_LORA_BGMV_WIDE_BLOCK_K_R64", "1024"))


# A's block as this many separate loads (1, 2 or 4) for blocks of >= BGMV_KCHUNK_MIN_K columns (LORASERVE_LORA_BGMV_
# KCHUNKS; 1: one load and one fp32 copy of the whole block, as before). Read at each launch.
BGMV_KCHUNKS = int(os.environ.get("LORASERVE_LORA_BGMV_KCHUNKS", "1"))
BGMV_KCHUNK_MIN_K = int(os.environ.get("LORASERVE_LORA_BGMV_KCHUNK_MIN_K", "1024"))
# ... for blocks wider than 1024 columns (down's 2048) instead, and a register cap for those launches (0: none).
# sm_90 offline compile, 8 warps (registers a thread; <= 128 lets 2 programs share an SM): 1024 columns 128 -> 80
# (4 chunks) / 104 (8); 2048 columns 249 -> 165 (4) / 134 (8) / 128 with the cap (8 bytes of stack).
BGMV_KCHUNKS_WIDE = int(os.environ.get("LORASERVE_LORA_BGMV_KCHUNKS_WIDE", "1"))
BGMV_MAXNREG_WIDE = int(os.environ.get("LORASERVE_LORA_BGMV_MAXNREG_WIDE", "0"))
# Rows a tile takes on the multiply-sum path (4 or 2; tiles with more take the tl.dot path). 2: x of two rows live, not
# four, and with KCHUNKS the chunks' x one chunk ahead (sm_90 offline, registers at 8 warps: qkv's 1024-column block
# in 4 chunks 87 -> 75, i.e. 3 programs per SM; down's 2048 in 4 chunks 165 -> 128, 2 per SM: one wave at the layer
# case). Probe knob (LORASERVE_LORA_BGMV_ROWS); read at each launch.
BGMV_ROWS = int(os.environ.get("LORASERVE_LORA_BGMV_ROWS", "4"))
# A grid that needs more than one wave of the unchunked kernel (1024-column blocks at 8 warps: ~128 registers, 2
# programs per SM; 2048: ~250, 1) but fits one wave of the chunked one instead takes ROWS 2 with A in BGMV_WAVE_CHUNKS
# chunks (blocks of <= 1024 columns, wider ones; triton 3.6 on the H200: 72 / 124-128 registers, 3 / 2 programs per
# SM). Counted over the tiles a step can use (the grid's partial-segment bound aside). The 64-token / 32-adapter layer
# case: qkv's 384 and down's 224 programs (gate_up's 256 and o's 128 fit one unchunked wave). H200, same runs as the
# old default (us): probe 2026-12-01 07:25 (4 / 8 chunks wherever >= 1024 columns) shrinks qkv 6.3 -> 5.0, down 7.9 ->
# 6.4, but o 3.1 -> 3.4 and 1 token down 3.55 -> 4.73; probe 08:10 (one-wave rule over grid tiles) layer 46.1 -> 43.9
# (qkv shrink 6.1 -> 5.1, down 7.7 -> 6.3, 1 token 3.37 -> 3.36), but 16 tokens / 16 adapters at rank 64 (two chunked
# waves) qkv 15.6 -> 17.2: hence the upper bound. LORASERVE_LORA_BGMV_WAVE_CHUNKS="1,1": off. Read at each launch.
BGMV_WAVE_CHUNKS = tuple(int(v) for v in os.environ.get("LORASERVE_LORA_BGMV_WAVE_CHUNKS", "4,8").split(","))


def wave_chunks(block_k: int, programs: int, num_sms: int = 132) -> int:
    """KCHUNKS for `programs` BGMV shrink programs with this BLOCK_K: BGMV_WAVE_CHUNKS' entry where the unchunked
    kernel (2 programs per SM at 1024 columns, 1 above) needs more than one wave and the chunked one (3 / 2) fits
    one, else 1."""
    wide = block_k > 1024
    if block_k < 1024 or not (1 if wide else 2) * num_sms < programs <= (2 if wide else 3) * num_sms:
        return 1
    want = BGMV_WAVE_CHUNKS[1 if wide else 0]
    for k in (8, 4, 2):
        if want >= k and block_k // k >= 128:
            return k
    return 1


def bgmv_kchunks(block_k: int) -> int:
    """KCHUNKS for a BLOCK_K: BGMV_KCHUNKS (BGMV_KCHUNKS_WIDE above 1024 columns) from BGMV_KCHUNK_MIN_K columns on,
    chunks of >= 128 columns; else 1."""
    want = BGMV_KCHUNKS_WIDE if block_k > 1024 else BGMV_KCHUNKS
    if want <= 1 or block_k < BGMV_KCHUNK_MIN_K:
        return 1
    for k in (8, 4, 2):
        if want >= k and block_k // k >= 128:
            return k
    return 1


def _kchunks_ok(k: int) -> int:
    assert k in (1, 2, 4, 8), f"KCHUNKS must be 1, 2, 4 or 8, got {k}"
    return k


def bgmv_shrink_config(num_tokens: int, rank: int, hidden_in: int, num_slices: int, grid_tiles: int,
                       num_sms: int = 132) -> dict:
    """BLOCK_K (one A block per program; SPLIT_K = cdiv(H_in, BLOCK_K)) and warps from host sizes.

    H200 probe (64 tokens / 32 adapters / rank 16, shrink alone, us): BLOCK_K 256 is the fastest
    shrink (qkv 6.6, o 4.2, gate_up 5.4, down 7.1 vs the dot shrink's 8.3 / 5.2 / 8.1 / 11.6) but its
    16-56 partials cost the expand 1-1.5 us and its grid leaves no room for the early-launched
    expand, so the pair lost (o 8.2 -> 11.2 us); hence a target split (BGMV_TARGET_SPLIT) of a few
    K chunks. 8 warps from 1024 columns (A stays bf16 in registers until the product)."""
    block_n = 16
    if BGMV_BLOCK_K:
        block_k = BGMV_BLOCK_K
    elif BGMV_WIDE_BLOCK_K_R64 and hidden_in > 8192 and rank > 32:
        block_k = BGMV_WIDE_BLOCK_K_R64
    elif BGMV_WIDE_BLOCK_K and hidden_in > 8192:
        block_k = BGMV_WIDE_BLOCK_K
    else:
        want = -(-hidden_in // max(1, BGMV_TARGET_SPLIT))
        block_k = min(1024, max(256, 1 << max(0, (want - 1).bit_length())))  # 2048: 252 registers
    block_k = min(block_k, max(16, 1 << max(0, (hidden_in - 1).bit_length())))
    split = -(-hidden_in // block_k)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=8 if block_k >= 1024 else 4)


def lora_shrink_bgmv(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor,
                     *, config: dict | None = None, num_sms: int = 132) -> Tensor:
    """out [SPLIT_K, S, T, R] float32 <- the per-chunk partials (see the module docstring).

    x [T, H_in] fp16/bf16/fp32; lora_a [L, S, R, H_in] (x's dtype); ranks [L] int32; out's
    SPLIT_K must equal cdiv(H_in, BLOCK_K) of the config (bgmv_shrink_config, or config's
    BLOCK_K). Entries of tokens without an adapter and columns >= rank are left as they were.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    assert H2 == H and x.dtype == lora_a.dtype, f"x {tuple(x.shape)} {x.dtype} vs lora_a {tuple(lora_a.shape)} {lora_a.dtype}"
    assert out.dim() == 4 and out.shape[1:] == (S, T, R) and out.dtype == torch.float32, \
        f"out must be float32 [SPLIT_K, S={S}, T={T}, R={R}], got {out.dtype} {tuple(out.shape)}"
    assert meta.num_tokens == T and ranks.shape == (L,) and ranks.dtype == torch.int32
    if T == 0:
        return out
    cfg = dict(bgmv_shrink_config(T, R, H, S, meta.grid_tiles, num_sms), **(config or {}))
    BN, BK = cfg["BLOCK_N"], cfg["BLOCK_K"]
    SK = -(-H // BK)
    assert out.shape[0] == SK, f"out has {out.shape[0]} K splits, BLOCK_K {BK} needs {SK}"
    assert BK & (BK - 1) == 0 and BK >= 16, f"BLOCK_K must be a power of two >= 16, got {BK}"
    from . import lora_meta

    kmajor = lora_meta.LORA_SHRINK_K_MAJOR
    kch = _kchunks_ok(cfg.get("KCHUNKS", bgmv_kchunks(BK)))
    rows = cfg.get("ROWS", BGMV_ROWS)
    if kch == 1 and "KCHUNKS" not in cfg:   # the one-wave rule (BGMV_WAVE_CHUNKS)
        bound = -(-T // meta.block_m)   # (the grid's tiles: this bound + one per segment; a step uses at most
        used = min(meta.grid_tiles, max(bound, meta.grid_tiles - bound))   # the larger part: T tiles or one a segment)
        kch = wave_chunks(BK, used * triton.cdiv(R, BN) * SK * S, num_sms)
        rows = 2 if kch > 1 else rows
    grid = (triton.cdiv(R, BN) * SK, meta.grid_tiles, S) if kmajor else (meta.grid_tiles, triton.cdiv(R, BN) * SK, S)
    pdl = pdl_launch(x.device)
    _lora_shrink_bgmv_kernel[grid](
        x, lora_a, out, ranks,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        H, R, x.stride(0), x.stride(1), *lora_a.stride(), *out.stride(),
        BLOCK_M=meta.block_m, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK, EVEN_K=H % BK == 0,
        IEEE=x.dtype == torch.float32,
        DOT_K=min(128, BK), num_warps=cfg["num_warps"], num_stages=1, PREFETCH_A=prefetch_on("a", x.device, pdl),
        KCHUNKS=kch, **({"maxnreg": BGMV_MAXNREG_WIDE} if kch > 1 and BK > 1024 and BGMV_MAXNREG_WIDE else {}),
        K_MAJOR=kmajor, ROWS=rows,
        **pdl,
    )
    return out
