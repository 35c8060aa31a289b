"""Streaming multi-LoRA expand: each program walks a run of column blocks of ONE adapter's B.

Same semantics as :func:`lora_expand` (see lora_expand.py), incl. the DoRA scale/shift
epilogue and split-K partials in buf:
    y[t, off_s:off_{s+1}] += buf[s, t, :r_a] @ lora_b[a, off_s:off_{s+1}, :r_a].T

Why another kernel: the classic expand runs one program per (tile, column block). At rank 16
a column block is ONE 16-wide K step, so each program loads ~8 KB of B after a chain of
dependent metadata loads (slot -> rank -> rows -> h), does one tiny dot and leaves: every
program pays the full latency chain for 8 KB, and num_stages has no loop to pipeline.
Here program (tile, group) does, once:
  * the metadata chain, each level issuing every load it can (slot/start/end, then rank,
    token ids and slice bounds, then B's first blocks, y's first block and the partials);
  * h = the tile's rank-r intermediate of every slice (<= 3), split-K partials summed as
    [SK_CHUNK, BLOCK_M, BLOCK_R] loads reduced in a fixed order (bitwise reproducible for a
    compiled kernel, so graph replay == eager), rounded to B's dtype;
then streams the group's COLS_PER_PROG columns of B in BLOCK_N-column blocks (~4 KB) through
a manually software-pipelined loop: B B_AHEAD (2-4) blocks ahead and y Y_AHEAD (1-3) blocks ahead are issued
before a block's dots (Triton's own pipeliner does not take this loop: its sm_90 PTX has no
cp.async), and y is updated block by block. A block that straddles slice boundaries
computes one dot per slice and keeps, per column, the dot of the column's slice (exactly one
slice's product per column, as the classic kernel's masked sum gives). B is read only up to
ceil16(r_a) of its rank axis, with masks constant over 16-wide chunks so loads stay
vectorised, so mixed ranks in a max-rank layout cost no padding bytes. Compiled offline for
sm_90 (triton.compile with a GPUTarget, no GPU): 76-144 registers, no spills, <= 32 KB of
shared memory, v4 loads and stores in the loop.

The grid is (meta.grid_tiles, groups) with groups from host-known sizes only
(:func:`stream_expand_config`), so a CUDA graph captured for (T, N) stays valid.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch
from .lora_prefetch import prefetch_on

if HAS_TRITON:
    from .lora_prefetch import l2_prefetch
    from .lora_stream_blocks import _block_acc_one, _expand_block, _load_parts, _store_block  # noqa: F401

    @triton.jit
    def _lora_expand_stream_kernel(
        buf_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        N, R, COLS_PER_PROG,
        stride_bsplit, stride_bs, stride_bm, stride_br,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        SPLIT_K: tl.constexpr, SK_CHUNK: tl.constexpr, EVEN_R: tl.constexpr,
        CAST: tl.constexpr, IEEE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        USE_PDL: tl.constexpr = False, B_AHEAD: tl.constexpr = 2, Y_AHEAD: tl.constexpr = 1,
        SLOTS: tl.constexpr = 0, DENSE_SLOTS: tl.constexpr = False,
        PREFETCH_B: tl.constexpr = False, TRIGGER: tl.constexpr = False, PF_THREADS: tl.constexpr = 128,
        SCALE_FLAG: tl.constexpr = False, GROUP_MAJOR: tl.constexpr = False, ONE_SLICE: tl.constexpr = False,
    ):
        if TRIGGER:  # (with USE_PDL) the next kernel may launch once all our programs started: the next
            tl.extra.cuda.gdc_launch_dependents()  # shrink prefetches its A while we stream (lora_prefetch.py)
        if GROUP_MAJOR:  # grid (groups, tiles): programs launched together read one adapter's B, not 32 (lora_meta)
            tile = tl.program_id(1)
            col0 = tl.program_id(0) * COLS_PER_PROG
        else:
            tile = tl.program_id(0)
            col0 = tl.program_id(1) * COLS_PER_PROG
        # The metadata chain is the latency every program pays before its first byte of B, so
        # each level issues all the loads it can: (slot, start, end) -> (rank, token ids,
        # slice bounds) -> (B's first two blocks, y's first block, all slices' partials).
        slot = tl.load(tile_slots_ptr + tile)
        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        if slot < 0:
            if USE_PDL:  # every program waits for the shrink: our completion then implies its own
                tl.extra.cuda.gdc_wait()  # (and, through its wait, the kernels before it)
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        g_on = 1
        if SCALE_FLAG:  # scale_on [L] int32: 0 = a plain LoRA slot (g = 1): its programs skip the DoRA epilogue
            g_on = tl.load(scale_on_ptr + slot)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        if NUM_SLICES >= 2:
            lo1 = tl.load(slice_off_ptr + 1)
        if NUM_SLICES == 3:
            lo2 = tl.load(slice_off_ptr + 2)
        if rank <= 0:
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
            return
        col_end = tl.minimum(col0 + COLS_PER_PROG, N)
        offs_r = tl.arange(0, BLOCK_R)
        # B's rank axis is contiguous: read whole 16-wide chunks up to ceil16(rank), a mask
        # constant over each chunk so the loads stay vectorised; the extra columns meet h = 0.
        b_r_ok = offs_r // 16 * 16 < rank
        if not EVEN_R:
            b_r_ok = b_r_ok & (offs_r < R)
        slot64 = slot.to(tl.int64)
        if DENSE_SLOTS:  # partials of the dense shrink (lora_shrink_dense): [SK, T, L * S * R], this slot's
            buf_ptr += slot64 * (NUM_SLICES * stride_bs)  # S * R columns start at slot * S * R

        # Manual software pipeline (Triton's pipeliner leaves the column loop alone: no
        # cp.async in the sm_90 PTX): B B_AHEAD blocks ahead, y Y_AHEAD ahead, issued before a
        # block's math so their latency overlaps it. Loads past col_end are masked (no traffic).
        b_rows = b_ptr + slot64 * stride_bl + offs_r[None, :] * stride_bk
        b_mask_r = b_r_ok[None, :]
        offs_nb = tl.arange(0, BLOCK_N)
        offs_n = col0 + offs_nb
        b_cur = tl.load(b_rows + offs_n[:, None] * stride_bn, mask=(offs_n < col_end)[:, None] & b_mask_r, other=0.0)
        offs_n1 = offs_n + BLOCK_N
        b_nxt = tl.load(b_rows + offs_n1[:, None] * stride_bn, mask=(offs_n1 < col_end)[:, None] & b_mask_r, other=0.0)
        if B_AHEAD >= 3:  # a third block in flight: more bytes per program (Little's law, PERF_NOTES)
            offs_n2 = offs_n + 2 * BLOCK_N
            b_n2 = tl.load(b_rows + offs_n2[:, None] * stride_bn, mask=(offs_n2 < col_end)[:, None] & b_mask_r,
                           other=0.0)
        if B_AHEAD == 4:
            offs_n3 = offs_n + 3 * BLOCK_N
            b_n3 = tl.load(b_rows + offs_n3[:, None] * stride_bn, mask=(offs_n3 < col_end)[:, None] & b_mask_r,
                           other=0.0)
        y_rows = y_ptr + tok[:, None] * stride_ym
        if PREFETCH_B:  # the rest of our B run into L2 meanwhile: rows [col0, col_end) of the slot's B are
            # one byte range (launcher-checked), read up to R (not rank) of each row
            # (the segment's first tile only: the others read the same B)
            first = (tile == 0) | (tl.load(tile_slots_ptr + tl.maximum(tile - 1, 0)) != slot)
            b_run = b_ptr + slot64 * stride_bl + col0 * stride_bn
            run_bytes = (col_end - col0).to(tl.int64) * stride_bn * (b_ptr.dtype.element_ty.primitive_bitwidth // 8)
            l2_prefetch(b_run, tl.where(first, run_bytes, 0), PF_THREADS)
        if USE_PDL:  # launched early (programmatic dependent launch): B and the metadata are older
            tl.extra.cuda.gdc_wait()  # than the kernel before us; y and the partials are not
        y_cur = tl.load(y_rows + offs_n[None, :] * stride_yn, mask=row_ok[:, None] & (offs_n < col_end)[None, :],
                        other=0.0)
        # y ahead too: with y one block ahead each iteration waits a whole DRAM round trip for its y
        # block (one y load in flight per program bounds the loop at one block per latency).
        if Y_AHEAD >= 2:
            y_n1 = tl.load(y_rows + offs_n1[None, :] * stride_yn, mask=row_ok[:, None] & (offs_n1 < col_end)[None, :],
                           other=0.0)
        if Y_AHEAD == 3:
            offs_y2 = offs_n + 2 * BLOCK_N
            y_n2 = tl.load(y_rows + offs_y2[None, :] * stride_yn, mask=row_ok[:, None] & (offs_y2 < col_end)[None, :],
                           other=0.0)

        # h_s = sum of the split-K partials of slice s: every slice's chunk issued before any sum.
        h_mask = row_ok[:, None] & (offs_r < rank)[None, :]
        h_base = buf_ptr + tok[:, None] * stride_bm + offs_r[None, :] * stride_br
        if SPLIT_K == 1:
            h0 = tl.load(h_base, mask=h_mask, other=0.0)
            if NUM_SLICES >= 2:
                h1 = tl.load(h_base + stride_bs, mask=h_mask, other=0.0)
            if NUM_SLICES == 3:
                h2 = tl.load(h_base + 2 * stride_bs, mask=h_mask, other=0.0)
        else:
            h0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            h1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            h2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j0 in tl.static_range(0, SPLIT_K, SK_CHUNK):  # fixed order: replay == eager
                p0 = _load_parts(buf_ptr, 0, j0, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm,
                                 stride_br, SPLIT_K, SK_CHUNK)
                if NUM_SLICES >= 2:
                    p1 = _load_parts(buf_ptr, 1, j0, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm,
                                     stride_br, SPLIT_K, SK_CHUNK)
                if NUM_SLICES == 3:
                    p2 = _load_parts(buf_ptr, 2, j0, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm,
                                     stride_br, SPLIT_K, SK_CHUNK)
                h0 += tl.sum(p0, axis=0)
                if NUM_SLICES >= 2:
                    h1 += tl.sum(p1, axis=0)
                if NUM_SLICES == 3:
                    h2 += tl.sum(p2, axis=0)
        if CAST:  # h is rounded to B's dtype before the product, as punica / vLLM do
            h0 = h0.to(b_ptr.dtype.element_ty)
            if NUM_SLICES >= 2:
                h1 = h1.to(b_ptr.dtype.element_ty)
            if NUM_SLICES == 3:
                h2 = h2.to(b_ptr.dtype.element_ty)

        if SLOTS < 0:
            # Triton's pipeliner: a plain loop (B and y loaded and used in the same iteration), -SLOTS
            # stages: the B loads feed tl.dot, so it may stage them through shared memory (cp.async).
            if NUM_SLICES == 1:
                h1 = h0
                lo1 = N
            if NUM_SLICES <= 2:
                h2 = h0
                lo2 = N
            for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=-SLOTS):
                n0 = col0 + i * BLOCK_N
                offs_p = n0 + offs_nb
                bp = tl.load(b_rows + offs_p[:, None] * stride_bn, mask=(offs_p < col_end)[:, None] & b_mask_r,
                             other=0.0)
                yp = tl.load(y_rows + offs_p[None, :] * stride_yn, mask=row_ok[:, None] & (offs_p < col_end)[None, :],
                             other=0.0)
                if ONE_SLICE and NUM_SLICES >= 2:
                    # a block inside one slice (gate_up: 14336 = 112 x 128) takes one dot with that slice's h, not
                    # one per slice and a [BLOCK_M, BLOCK_N] select (the loop is issue-bound: PERF_NOTES, tenth
                    # session); only the dot is branched on, the y update is shared (a whole-block branch: 123
                    # registers in the sm_90 offline compile, 2 waves at 6 programs/SM on the H200)
                    acc = _block_acc_one(bp, n0, h0, h1, h2, lo1, lo2, offs_nb, NUM_SLICES, BLOCK_N, IEEE)
                    _store_block(acc, yp, n0, y_rows, offs_nb, col_end, row_ok, scale_ptr, shift_ptr, slot64,
                                 stride_yn, stride_sl, stride_sn, HAS_SCALE, HAS_SHIFT, g_on)
                else:
                    _expand_block(bp, yp, n0, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end, row_ok, scale_ptr,
                                  shift_ptr, slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES, IEEE, HAS_SCALE,
                                  HAS_SHIFT, g_on)
            return
        if SLOTS > 0:
            # Fixed slots (B_AHEAD == Y_AHEAD == SLOTS): slot j holds block it * SLOTS + j and is
            # refilled in place right after its block is stored, SLOTS blocks ahead. The rotating
            # loop below (b_cur = b_nxt = ...) made the register copies of the loads just issued wait
            # for them (sm_90 SASS: PRMT/MOV on the new loads' scoreboards in the same iteration), so
            # each iteration paid a whole DRAM round trip whatever the prefetch depth.
            if NUM_SLICES == 1:
                h1 = h0
                lo1 = N
            if NUM_SLICES <= 2:
                h2 = h0
                lo2 = N
            for it in tl.range(0, tl.cdiv(col_end - col0, SLOTS * BLOCK_N), num_stages=1):
                n0 = col0 + it * (SLOTS * BLOCK_N)
                _expand_block(b_cur, y_cur, n0, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end, row_ok, scale_ptr,
                              shift_ptr, slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES, IEEE, HAS_SCALE,
                              HAS_SHIFT, g_on)
                offs_f = n0 + SLOTS * BLOCK_N + offs_nb
                b_cur = tl.load(b_rows + offs_f[:, None] * stride_bn, mask=(offs_f < col_end)[:, None] & b_mask_r,
                                other=0.0)
                y_cur = tl.load(y_rows + offs_f[None, :] * stride_yn, mask=row_ok[:, None] & (offs_f < col_end)[None, :],
                                other=0.0)
                _expand_block(b_nxt, y_n1, n0 + BLOCK_N, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end, row_ok,
                              scale_ptr, shift_ptr, slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES, IEEE,
                              HAS_SCALE, HAS_SHIFT, g_on)
                offs_f1 = offs_f + BLOCK_N
                b_nxt = tl.load(b_rows + offs_f1[:, None] * stride_bn, mask=(offs_f1 < col_end)[:, None] & b_mask_r,
                                other=0.0)
                y_n1 = tl.load(y_rows + offs_f1[None, :] * stride_yn,
                               mask=row_ok[:, None] & (offs_f1 < col_end)[None, :], other=0.0)
                if SLOTS == 3:
                    _expand_block(b_n2, y_n2, n0 + 2 * BLOCK_N, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end,
                                  row_ok, scale_ptr, shift_ptr, slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES,
                                  IEEE, HAS_SCALE, HAS_SHIFT, g_on)
                    offs_f2 = offs_f + 2 * BLOCK_N
                    b_n2 = tl.load(b_rows + offs_f2[:, None] * stride_bn,
                                   mask=(offs_f2 < col_end)[:, None] & b_mask_r, other=0.0)
                    y_n2 = tl.load(y_rows + offs_f2[None, :] * stride_yn,
                                   mask=row_ok[:, None] & (offs_f2 < col_end)[None, :], other=0.0)
            return
        for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=1):
            n0 = col0 + i * BLOCK_N  # (not the loop variable: keeps its divisibility visible)
            offs_n = n0 + offs_nb
            n_ok = offs_n < col_end
            offs_nn = offs_n + B_AHEAD * BLOCK_N
            b_nn = tl.load(b_rows + offs_nn[:, None] * stride_bn, mask=(offs_nn < col_end)[:, None] & b_mask_r,
                           other=0.0)
            offs_yn = offs_n + Y_AHEAD * BLOCK_N
            y_nn = tl.load(y_rows + offs_yn[None, :] * stride_yn,
                           mask=row_ok[:, None] & (offs_yn < col_end)[None, :], other=0.0)
            btt = tl.trans(b_cur)
            if IEEE:
                acc = tl.dot(h0, btt, input_precision="ieee")
            else:
                acc = tl.dot(h0, btt)
            if NUM_SLICES >= 2:  # per column, the product of the column's own slice
                if IEEE:
                    d1 = tl.dot(h1, btt, input_precision="ieee")
                else:
                    d1 = tl.dot(h1, btt)
                acc = tl.where(offs_n[None, :] >= lo1, d1, acc)
            if NUM_SLICES == 3:
                if IEEE:
                    d2 = tl.dot(h2, btt, input_precision="ieee")
                else:
                    d2 = tl.dot(h2, btt)
                acc = tl.where(offs_n[None, :] >= lo2, d2, acc)
            out = y_cur.to(tl.float32) + acc
            if HAS_SCALE:  # DoRA: g of this slot for these columns (see lora_expand.py)
                if g_on != 0:
                    g = tl.load(scale_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=1.0)
                    out = out * g[None, :]
                    if HAS_SHIFT:
                        c = tl.load(shift_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=0.0)
                        out = out + c[None, :]
            tl.store(y_rows + offs_n[None, :] * stride_yn, out.to(y_cur.dtype), mask=row_ok[:, None] & n_ok[None, :])
            b_cur = b_nxt
            if B_AHEAD == 4:
                b_nxt = b_n2
                b_n2 = b_n3
                b_n3 = b_nn
            elif B_AHEAD == 3:
                b_nxt = b_n2
                b_n2 = b_nn
            else:
                b_nxt = b_nn
            if Y_AHEAD == 3:
                y_cur = y_n1
                y_n1 = y_n2
                y_n2 = y_nn
            elif Y_AHEAD == 2:
                y_cur = y_n1
                y_n1 = y_nn
            else:
                y_cur = y_nn


STREAM_MAX_SLICES = 3
STREAM_MAX_RANK = 128
STREAM_PROGRAMS_PER_SM = 4  # grid target; ~5 fit per SM at <= 96 registers x 4 warps
# ... at 33..64 tokens (decode at batch 64): 6 (LORASERVE_LORA_STREAM_PPS_DECODE; 4: as before). H200 probe
# 2026-12-01 04:33 (loratma, gate_up's expand alone, 64 tokens / 32 adapters / r16, same run): 14.91 -> 12.78 us. The
# pipelined loop is issue-bound, not memory-bound (PERF_NOTES, tenth session): more programs per SM hide its per-
# iteration latency; 6 x 84 registers x 4 warps still fit one wave (gate_up: 22 groups x 11 blocks, still >= 10 blocks
# a program, so the pipelined loop); 8 per SM fell to 8 blocks a program (the rotating loop): 15.94.
STREAM_PROGRAMS_PER_SM_DECODE = float(os.environ.get("LORASERVE_LORA_STREAM_PPS_DECODE", "6"))
# ... from 33 tokens (below, the pipelined loop runs at every run length: not measured there) and only where the runs
# stay >= STREAM_PIPE_MIN_BLOCKS blocks (qkv's 3-4-block runs keep 4 per SM: not measured at 6)
STREAM_PPS_DECODE_MIN_TOKENS, STREAM_PPS_DECODE_MAX_TOKENS = 33, 64
# ... and on runs too short for the pipelined loop at either grid (qkv's 3-4-block runs on the hand-rotated loop: 12
# -> 16 groups; a run that would stay pipelined at 4 per SM keeps that grid). H200, same runs as the old default:
# tenth session's final (05:28) qkv 12.1 -> 11.5 us (expand 6.6 -> 5.7), probes 2026-12-01 07:25 12.2 -> 11.4 (6.7
# -> 5.7) and 08:10 10.8 -> 10.1 (6.6 -> 5.6). LORASERVE_LORA_STREAM_PPS_DECODE_ANY=0: as before.
STREAM_PPS_DECODE_ANY = os.environ.get("LORASERVE_LORA_STREAM_PPS_DECODE_ANY", "1").strip() not in ("", "0")
# ... above 256 tokens (mixed steps, prefill): 8. Their grids hold many empty tiles (cdiv(T, BM) + a segment
# bound: a 352-token mixed step launches 93 tiles for 48 used), so 4 per grid tile left ~2 programs per SM of
# 16 column blocks each. H200 probe 19:59 (bench_lora_mixed pps8, q+v qkv, ranks 8-64, us per layer): mixed
# 352 tokens 92.3 -> 86.7, prefill 2056 tokens 119.7 -> 112.6, 608 tokens flat. LORASERVE_LORA_STREAM_PPS_LARGE.
STREAM_PROGRAMS_PER_SM_LARGE = int(os.environ.get("LORASERVE_LORA_STREAM_PPS_LARGE", "8"))
# B blocks in flight per program; None: 3 for decode-like tiles (<= 16 rows, rank <= 32, <= 2
# slices), else 2.
# Measured on an H200 (with PDL, 64 tokens / 32 adapters / rank 16): 3 ahead took the layer from
# 60.5 to 57.7 us (gate_up 24.3 -> 22.5), 1 token unchanged; larger tiles / ranks not measured.
STREAM_B_AHEAD: int | None = None
# y blocks in flight per expand program (1-3); None: the code's rule (stream_expand_config).
STREAM_Y_AHEAD: int | None = None
# Column loop: 0 = the hand-rotated prefetch; 2 or 3 = fixed slots (B and y that many blocks ahead,
# refilled in place); -S = a plain loop given to Triton's pipeliner with S stages (cp.async for B and
# y, DEPBAR-counted: no wait on the loads just issued). STREAM_SLOTS None: DEFAULT_STREAM_SLOTS, which
# LORASERVE_LORA_STREAM_SLOTS sets (default -4: the sm_90 SASS of the hand-rotated loop waits on the
# loads it has just issued before each back edge, one DRAM round trip per column block, see PERF_NOTES;
# the pipelined loop compiled to LDGSTS + DEPBAR.LE at 50-100 registers, no spills. Chosen from that
# SASS and the interpreter tests; its first H200 timing is the final run of 2026-11-30 15:05).
DEFAULT_STREAM_SLOTS = int(os.environ.get("LORASERVE_LORA_STREAM_SLOTS", "-4"))
STREAM_SLOTS: int | None = None
# Columns per block, overriding the rule below (0: the rule). With SLOTS -1 (a plain loop, one stage: B and y loaded
# and used in one iteration, nothing carried) a 256-column block keeps 8 KB of B + the y block in flight per program
# without the rotating loop's back-edge wait (probe variants plain256 / plain512). LORASERVE_LORA_STREAM_BLOCK_N.
STREAM_BLOCK_N = int(os.environ.get("LORASERVE_LORA_STREAM_BLOCK_N", "0"))
# ... but only for steps of <= this many tokens; larger steps take the hand-rotated loop (0). H200 final
# run (2026-11-30 15:02, same run): 1 token, BGMV shrink + pipelined loop 4.20 us per projection (median)
# vs 4.92 for the dot shrink + rotating loop; 64 tokens / 32 adapters, pipelined 66.8 us for the layer vs
# 58.5 rotating (PDL overlap lost: o 11.8 vs 8.2 us); gate_up 1 adapter x 1024 tokens 50.6 vs 49.4 us.
STREAM_SLOTS_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_STREAM_SLOTS_MAX_TOKENS", "32"))
# ... and, up to 256 tokens, for programs walking at least this many column blocks (0: off). The 23:43 final's pipe64
# (the pipelined loop at 33-64 tokens on every projection): gate_up's expand 15.7 -> 14.9 us (15 blocks a program),
# but qkv / o / down (3-4 blocks) lost 1.4-2.1 us: hence a rule by the run length. H200 probe 2026-12-01 00:53
# ("pipegu", >= 8 blocks): layer gate_up 19.81 -> 19.28 us, the others and 1 token unchanged; probe 01:58 (same run
# as the previous defaults): 256 tokens gate_up r16 / 16 adapters (14 blocks a program) 24.07 -> 23.29, gate_up r64 /
# 16 adapters (28 blocks) 51.51 -> 51.21 (expand 37.9 -> 33.4), but qkv r64 / 32 adapters (9 blocks) 36.69 -> 39.50:
# hence 10. LORASERVE_LORA_STREAM_PIPE_MIN_BLOCKS.
# The pipelined loop (SLOTS < 0): a block inside one slice takes one dot with that slice's h (LORASERVE_LORA_STREAM_
# ONE_SLICE; 0: a dot per slice and a per-column select, as before). Read at each launch.
STREAM_ONE_SLICE = os.environ.get("LORASERVE_LORA_STREAM_ONE_SLICE", "0").strip().lower() not in ("", "0", "false", "off",
                                                                                              "no")
# ... and, with it off, for steps of <= this many tokens (LORASERVE_LORA_STREAM_ONE_SLICE_MAX_TOKENS; 0: never). H200 probe
# 2026-12-01 04:57 (same run): 1 token qkv 3.74 -> 3.30 us, gate_up 4.19 -> 4.08 (median 3.61 -> 3.40); at 64 tokens it
# costs registers (84 -> 106: 4 programs per SM, not the decode grid's 6): gate_up 16.6 -> 19.5, hence small steps only.
STREAM_ONE_SLICE_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_STREAM_ONE_SLICE_MAX_TOKENS", "16"))
STREAM_PIPE_MIN_BLOCKS = int(os.environ.get("LORASERVE_LORA_STREAM_PIPE_MIN_BLOCKS", "10"))


# Split-K partials per load round in the streaming expand at most this (0: the register rule alone, up to 8 a round as
# [SK_CHUNK, BLOCK_M, BLOCK_R] loads summed over axis 0: what triton 3.6 makes of that costs every program). H200 probe
# 2026-12-01 12:32 (expand alone, down r64 / 16 adapters / 16 tokens, 7 partials): 8 a round 18.45 us, 2 a round 6.78,
# 1 a round 6.28. Default 1 since the probe of 2026-12-01 22:04 (same run, two samples each): layer 64 tokens / 32
# adapters / r16 44.1 / 44.5 -> 42.8-43.1 us (qkv expand 5.7 -> 4.9, gate_up 13.1 -> 12.7), 1 token median 3.44 ->
# 3.35 (qkv 3.37 -> 3.19, gate_up 4.09 -> 3.77), down r64 / 16 / 16 35.2 -> 17.8 (15.1-15.5 with the BGMV shrink's
# BLOCK_K 1024 there), no shape slower. LORASERVE_LORA_STREAM_SK_CHUNK_MAX=0: the register rule alone (as before).
STREAM_SK_CHUNK_MAX = int(os.environ.get("LORASERVE_LORA_STREAM_SK_CHUNK_MAX", "1"))


def rotating_loop_config(block_m: int, rank: int, num_slices: int) -> dict:
    """Config override for the hand-rotated column loop (the default before the pipelined one, timed
    on the H200): lora_expand's fallback when the default loop fails to compile."""
    block_r = max(16, 1 << max(0, (rank - 1).bit_length()))
    return dict(SLOTS=0, Y_AHEAD=1, B_AHEAD=3 if block_m <= 16 and block_r <= 32 and num_slices <= 2 else 2)


def stream_applies(num_slices: int, rank: int) -> bool:
    """Shapes the streaming kernel takes (else the classic kernel): <= 3 slices (qkv, gate_up,
    single projections) and ranks whose [BLOCK_M, BLOCK_R] intermediates fit in registers."""
    return num_slices <= STREAM_MAX_SLICES and rank <= STREAM_MAX_RANK


def stream_expand_config(num_tokens: int, n_total: int, rank: int, num_slices: int, block_m: int,
                         grid_tiles: int, split_k: int = 1, num_sms: int = 132) -> dict:
    """Launch parameters from host-known sizes only (the grid must be static for a given T, N).

    BLOCK_N: 128 columns (4 KB of B at rank 16, 3 blocks in flight per program), 64 at rank
    64 or 64-row tiles, so B blocks, fp32 [BLOCK_M, BLOCK_N] products and pointers fit in
    <= 144 registers with no spills (sm_90, offline compile). Groups per
    tile: enough programs for STREAM_PROGRAMS_PER_SM per SM, counting every grid tile as
    active (true for distinct adapters; fewer active tiles just give fewer, equally long
    programs); the columns are then split evenly in whole blocks. At 64 tokens / 32 adapters
    (36 tiles): gate_up 15 groups x 15 blocks (60 KB of B each), qkv 12 x 4, o and down 11 x 3.
    At 1 token (2 tiles) every block is its own program: latency, not bytes, bounds decode.
    """
    block_r = max(16, 1 << max(0, (rank - 1).bit_length()))
    block_n = max(32, min(128, 4096 // block_r, 4096 // block_m))
    if STREAM_BLOCK_N:   # (rank 64 at 512 columns spilled in the sm_90 offline compile: <= 16K B elements a block)
        block_n = min(STREAM_BLOCK_N, 16384 // block_r)
    block_n = min(block_n, max(32, 1 << max(0, (n_total - 1).bit_length())))
    num_warps = 4 if block_m * block_n <= 2048 else 8
    n_blocks = -(-n_total // block_n)
    pps = STREAM_PROGRAMS_PER_SM if num_tokens <= 256 else STREAM_PROGRAMS_PER_SM_LARGE
    groups = max(1, min(n_blocks, round(pps * num_sms / max(1, grid_tiles))))
    if STREAM_PPS_DECODE_MIN_TOKENS <= num_tokens <= STREAM_PPS_DECODE_MAX_TOKENS:
        # more programs per SM where each still walks a run long enough for the pipelined loop (gate_up)
        g6 = max(1, min(n_blocks, round(STREAM_PROGRAMS_PER_SM_DECODE * num_sms / max(1, grid_tiles))))
        long6 = STREAM_PIPE_MIN_BLOCKS and -(-n_blocks // g6) >= STREAM_PIPE_MIN_BLOCKS
        long4 = STREAM_PIPE_MIN_BLOCKS and -(-n_blocks // groups) >= STREAM_PIPE_MIN_BLOCKS
        if long6 or (STREAM_PPS_DECODE_ANY and not long4):
            groups = g6
    blocks_per_prog = -(-n_blocks // groups)
    groups = -(-n_blocks // blocks_per_prog)
    # Split-K partials summed in rounds of <= 8192 fp32 values over all slices (registers).
    sk_chunk = max(1, min(1 << max(0, (split_k - 1).bit_length()), 8192 // (num_slices * block_m * block_r)))
    sk_chunk = 1 << (sk_chunk.bit_length() - 1)  # a power of two (tl.arange)
    if STREAM_SK_CHUNK_MAX > 0:   # probe knob: partials per round at most this (H200 12:32: down r64 16 tok 18.5 -> 6.3 us at 1)
        sk_chunk = min(sk_chunk, 1 << (STREAM_SK_CHUNK_MAX.bit_length() - 1))
    # (3 slices at 3 ahead spilled 8 bytes in the sm_90 offline compile with the DoRA epilogue)
    b_ahead = STREAM_B_AHEAD or (3 if block_m <= 16 and block_r <= 32 and num_slices <= 2 else 2)
    if STREAM_SLOTS is not None:
        slots = STREAM_SLOTS
    else:
        slots = DEFAULT_STREAM_SLOTS if num_tokens <= STREAM_SLOTS_MAX_TOKENS else 0
        if (not slots and STREAM_PIPE_MIN_BLOCKS and num_tokens <= 256
                and blocks_per_prog >= STREAM_PIPE_MIN_BLOCKS):
            slots = DEFAULT_STREAM_SLOTS if DEFAULT_STREAM_SLOTS < 0 else -4
    if slots > 0:  # the fixed-slot loop: B and y exactly `slots` blocks ahead
        b_ahead = y_ahead = slots
    elif slots < 0:  # Triton's pipeliner (-slots stages); the hand prefetch is not used
        b_ahead, y_ahead = 2, 1
    else:
        y_ahead = STREAM_Y_AHEAD or 1
    return dict(BLOCK_N=block_n, BLOCK_R=block_r, COLS_PER_PROG=blocks_per_prog * block_n, groups=groups,
                SK_CHUNK=sk_chunk, num_warps=num_warps, B_AHEAD=b_ahead, Y_AHEAD=y_ahead, SLOTS=slots)


def lora_expand_stream(partials: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor,
                       y: Tensor, *, config: dict | None = None, scale: Tensor | None = None,
                       shift: Tensor | None = None, num_sms: int = 132, dense_slots: bool = False,
                       scale_on: Tensor | None = None) -> Tensor:
    """The launcher behind lora_expand (which checks the arguments): partials [SPLIT_K, S, T, R]
    float32; other arguments as for lora_expand. config overrides stream_expand_config. dense_slots:
    partials is lora_shrink_dense.dense_partials (slot 0's view of every token against every slot)."""
    SK, S, T, R = partials.shape
    N = lora_b.shape[1]
    cfg = dict(stream_expand_config(T, N, R, S, meta.block_m, meta.grid_tiles, SK, num_sms), **(config or {}))
    if config and "COLS_PER_PROG" in config:  # keep the grid consistent with an override
        cfg["groups"] = -(-N // cfg["COLS_PER_PROG"])
    assert cfg["COLS_PER_PROG"] % cfg["BLOCK_N"] == 0, "COLS_PER_PROG must be a multiple of BLOCK_N"
    from . import lora_meta

    gmajor = lora_meta.LORA_GROUP_MAJOR
    grid = (cfg["groups"], meta.grid_tiles) if gmajor else (meta.grid_tiles, cfg["groups"])
    pdl = pdl_launch(y.device)
    pf_b, trigger = prefetch_on("b", y.device, pdl), prefetch_on("t", y.device, pdl)
    from .lora_shrink import contiguous_rows

    pf_b = pf_b and contiguous_rows(lora_b)
    _lora_expand_stream_kernel[grid](
        partials, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        ranks if scale_on is None else scale_on,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        N, R, cfg["COLS_PER_PROG"],
        *partials.stride(), *lora_b.stride(), y.stride(0), y.stride(1),
        *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BLOCK_M=meta.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
        SPLIT_K=SK, SK_CHUNK=cfg["SK_CHUNK"], EVEN_R=R % 16 == 0,
        CAST=lora_b.dtype != torch.float32, IEEE=lora_b.dtype == torch.float32,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        B_AHEAD=cfg.get("B_AHEAD", 2), Y_AHEAD=cfg.get("Y_AHEAD", 1), SLOTS=cfg.get("SLOTS", 0), DENSE_SLOTS=dense_slots, num_warps=cfg["num_warps"], num_stages=1,
        PREFETCH_B=pf_b, TRIGGER=trigger, PF_THREADS=32 * cfg["num_warps"],
        SCALE_FLAG=scale is not None and scale_on is not None, GROUP_MAJOR=gmajor,
        ONE_SLICE=STREAM_ONE_SLICE or T <= STREAM_ONE_SLICE_MAX_TOKENS, **pdl,
    )
    return y
