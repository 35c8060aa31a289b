"""Segment-tiled multi-LoRA shrink and expand for large steps (SGMV style, > 64 tokens).

Semantics (as lora_shrink + lora_expand), for every token t with slot a = token_slot[t] >= 0:
    parts[k, s, t, :r_a] = x[t, K_k] @ lora_a[a, s, :r_a, K_k].T        (K_k: the k-th K chunk, fp32)
    y[t, off_s:off_{s+1}] += (sum_k parts[k, s, t, :r_a]) @ lora_b[a, off_s:off_{s+1}, :r_a].T
r_a = min(ranks[a], R); the partial sum is rounded to lora_b's dtype before the product, the product
accumulates in fp32 and y is rounded once (as punica / vLLM and our other expands). DoRA's epilogue
(scale / shift / scale_on) as in lora_expand.

Why another pair: at 256-1024 tokens the LoRA step is a pair of skinny GEMMs whose bytes are x (shrink)
and y read + written (expand). The tile kernels (lora_shrink / lora_expand_stream) run one program per
(16-32-row tile, rank block, slice) for the shrink, so x is read once per slice and A once per 16-32
rows, and the 1024-token "reduced" path adds a torch.sum launch between them.
Here:
  * shrink: program (row block, K chunk); a row block is GROUP consecutive meta tiles (GROUP * block_m
    rows); ALL slices and ranks in one [BLOCK_M, BLOCK_N >= S * R] accumulator, so x is read once per
    K chunk and A once per row block; the split-K partials go to [SPLIT_K, S, T, R] (no torch.sum).
  * expand: program (row block, column group); the row block's partials are summed once (fixed order)
    into h [BLOCK_M, R] per slice, kept in registers while the program walks its column blocks: per
    block one B load [BLOCK_N, R], one tl.dot, one y tile read and written.
A row block whose tiles belong to several slots runs one pass per slot over the whole block, rows of
other slots masked off (masked lanes move no bytes; the MMA work is repeated, so GROUP > 1 is for long
segments: 1 token run per block).
Switched by LORASERVE_LORA_SEG (lora_apply's "seg" path; see seg_applies).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch

# lora_apply takes the "seg" path for steps of SEG_MIN_TOKENS.. tokens (LORASERVE_LORA_SEG=1: on; off until measured
# on an H200); read at each call.
SEG_ENABLED = os.environ.get("LORASERVE_LORA_SEG", "0").strip().lower() not in ("", "0", "false", "off", "no")
SEG_MIN_TOKENS = max(65, int(os.environ.get("LORASERVE_LORA_SEG_MIN_TOKENS", "512")))
SEG_MAX_RANK = 128
_SEG_FAILED: set[tuple] = set()   # (S, R, device) whose seg kernels failed to compile: the tile path then

if HAS_TRITON:

    @triton.jit
    def _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid, num_tiles,
                   TILE_M: tl.constexpr, GROUP: tl.constexpr):
        """Rows of row block pid (GROUP meta tiles of TILE_M rows): per row its slot (-1: none), token id."""
        offs = tl.arange(0, TILE_M * GROUP)
        tile = pid * GROUP + offs // TILE_M
        in_grid = tile < num_tiles
        t_slot = tl.load(tile_slots_ptr + tile, mask=in_grid, other=-1)
        t_start = tl.load(tile_starts_ptr + tile, mask=in_grid, other=0)
        t_end = tl.load(tile_ends_ptr + tile, mask=in_grid, other=0)
        pos = t_start + offs % TILE_M
        ok = (pos < t_end) & (t_slot >= 0)
        tok = tl.load(sorted_ids_ptr + pos, mask=ok, other=0).to(tl.int64)
        return tl.where(ok, t_slot, -1), tok

    @triton.jit
    def _run_slot(tile_slots_ptr, pid, g, num_tiles, GROUP: tl.constexpr):
        """Slot of the g-th tile of row block pid if a new slot run starts there, else -1."""
        tile = pid * GROUP + g
        slot = tl.load(tile_slots_ptr + tl.minimum(tile, num_tiles - 1))
        slot = tl.where(tile < num_tiles, slot, -1)
        if g > 0:
            prev = tl.load(tile_slots_ptr + tl.minimum(tile - 1, num_tiles - 1))
            slot = tl.where(prev == slot, -1, slot)
        return slot

    @triton.jit
    def _shrink_pass(x_ptr, a_ptr, out_ptr, slot, rank, rows, tok, s_j, r_j, offs_k, k_lo, pid_k, K, K_CHUNK,
                     stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                     stride_ok, stride_os, stride_om, stride_or,
                     NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, IEEE: tl.constexpr):
        """One slot's rows (rows [BLOCK_M] mask, tok ids) x its A over this program's K chunk -> partial plane pid_k."""
        j_ok = (s_j < NUM_SLICES) & (r_j < rank)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
        a_ptrs = (a_ptr + slot.to(tl.int64) * stride_al + s_j[:, None] * stride_as + r_j[:, None] * stride_ar
                  + (k_lo + offs_k)[None, :] * stride_ak)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K_CHUNK, BLOCK_K):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=rows[:, None], other=0.0)
                at = tl.load(a_ptrs, mask=j_ok[:, None], other=0.0)
            else:
                k_ok = (k_lo + k + offs_k) < tl.minimum(K, k_lo + K_CHUNK)
                xt = tl.load(x_ptrs, mask=rows[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(at))
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        out_ptrs = out_ptr + pid_k * stride_ok + s_j[None, :] * stride_os + tok[:, None] * stride_om + r_j[None, :] * stride_or
        tl.store(out_ptrs, acc, mask=rows[:, None] & j_ok[None, :])

    @triton.jit
    def _seg_shrink_kernel(
        x_ptr, a_ptr, out_ptr, ranks_ptr, count_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        num_tiles, K, R, K_CHUNK,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_ok, stride_os, stride_om, stride_or,
        NUM_SLICES: tl.constexpr, RP: tl.constexpr, TILE_M: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
        REDUCE: tl.constexpr = False, ADAPT: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        SPLIT_K = tl.num_programs(1)
        # accumulator column j = slice j // RP, rank row j % RP of that slice's A
        offs_j = tl.arange(0, BLOCK_N)
        s_j = offs_j // RP
        r_j = offs_j % RP
        k_lo = pid_k * K_CHUNK
        offs_k = tl.arange(0, BLOCK_K)
        if USE_PDL:  # x is the kernel before us'
            tl.extra.cuda.gdc_wait()
        if ADAPT and GROUP > 1:
            # one pass over the whole row block when its tiles share one slot (a long segment), else one pass per
            # meta tile at TILE_M rows (short segments pay no masked rows in their dots)
            first = tl.load(tile_slots_ptr + pid * GROUP)
            last = tl.load(tile_slots_ptr + tl.minimum(pid * GROUP + GROUP - 1, num_tiles - 1))
            rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(first, 0)), R)
            if (first == last) & (first >= 0):
                if rank > 0:
                    row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid,
                                               num_tiles, TILE_M, GROUP)
                    _shrink_pass(x_ptr, a_ptr, out_ptr, first, rank, row_slot == first, tok, s_j, r_j, offs_k, k_lo,
                                 pid_k, K, K_CHUNK, stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                                 stride_ok, stride_os, stride_om, stride_or,
                                 NUM_SLICES, TILE_M * GROUP, BLOCK_N, BLOCK_K, EVEN_K, IEEE)
            else:
                for g in tl.static_range(GROUP):
                    tile = pid * GROUP + g
                    slot = _run_slot(tile_slots_ptr, tile, 0, num_tiles, 1)
                    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                    if (slot >= 0) & (rank > 0):
                        row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr,
                                                   tile, num_tiles, TILE_M, 1)
                        _shrink_pass(x_ptr, a_ptr, out_ptr, slot, rank, row_slot == slot, tok, s_j, r_j, offs_k, k_lo,
                                     pid_k, K, K_CHUNK, stride_xm, stride_xk, stride_al, stride_as, stride_ar,
                                     stride_ak, stride_ok, stride_os, stride_om, stride_or,
                                     NUM_SLICES, TILE_M, BLOCK_N, BLOCK_K, EVEN_K, IEEE)
        else:
            row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid, num_tiles,
                                       TILE_M, GROUP)
            for g in tl.static_range(GROUP):
                slot = _run_slot(tile_slots_ptr, pid, g, num_tiles, GROUP)
                rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                if (slot >= 0) & (rank > 0):
                    _shrink_pass(x_ptr, a_ptr, out_ptr, slot, rank, row_slot == slot, tok, s_j, r_j, offs_k, k_lo,
                                 pid_k, K, K_CHUNK, stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                                 stride_ok, stride_os, stride_om, stride_or,
                                 NUM_SLICES, TILE_M * GROUP, BLOCK_N, BLOCK_K, EVEN_K, IEEE)
        if REDUCE:  # the row block's last K split to finish sums all SPLIT_K partials (fixed order: j = 0, 1, ...)
            # into plane SPLIT_K of out, so the expand reads one plane, once per column group, not SPLIT_K
            tl.debug_barrier()   # every thread's partial store precedes the release (cumulative)
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") + 1
            if arrived == SPLIT_K:
                tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed")   # ready for the next launch / graph replay
                row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid,
                                           num_tiles, TILE_M, GROUP)
                ready = (tl.zeros((TILE_M * GROUP,), tl.int32) + arrived) == SPLIT_K   # keeps loads below the atomic
                m = (ready & (row_slot >= 0))[:, None] & ((s_j < NUM_SLICES) & (r_j < R))[None, :]
                p = out_ptr + s_j[None, :] * stride_os + tok[:, None] * stride_om + r_j[None, :] * stride_or
                h = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
                for j in range(1, SPLIT_K):
                    h += tl.load(p + j * stride_ok, mask=m, other=0.0, cache_modifier=".cg")
                tl.store(p + SPLIT_K * stride_ok, h, mask=m)
        if USE_PDL:  # the expand may launch once every program got here (it waits for our completion)
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pick(h0, h1, h2, s, NUM_SLICES: tl.constexpr):
        if NUM_SLICES == 1:
            return h0
        elif NUM_SLICES == 2:
            return tl.where(s == 0, h0, h1)
        else:
            return tl.where(s == 0, h0, tl.where(s == 1, h1, h2))

    @triton.jit
    def _sum_parts(parts_ptr, s, tok, rows, offs_r, rank, stride_pk, stride_ps, stride_pm, stride_pr,
                   SPLIT_K: tl.constexpr):
        """h [BLOCK_M, RP] fp32 = sum over the K splits (fixed order) of slice s's partials; 0 off-rank / off-run."""
        m = rows[:, None] & (offs_r[None, :] < rank)
        p = parts_ptr + s * stride_ps + tok[:, None] * stride_pm + offs_r[None, :] * stride_pr
        h = tl.load(p, mask=m, other=0.0)
        for j in range(1, SPLIT_K):
            h += tl.load(p + j * stride_pk, mask=m, other=0.0)
        return h

    @triton.jit
    def _expand_pass(parts_ptr, b_ptr, y_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr, slot, rank, rows, tok,
                     bounds, offs_r, offs_bn, blk_lo, blk_hi, N, R,
                     stride_pk, stride_ps, stride_pm, stride_pr, stride_bl, stride_bn, stride_bk,
                     stride_ym, stride_yn, stride_sl, stride_sn,
                     NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr,
                     EVEN_R: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_FLAGS: tl.constexpr,
                     Y_AHEAD: tl.constexpr):
        """One slot's rows (rows mask, tok ids): h from the partials once, then this program's column blocks."""
        h0 = _sum_parts(parts_ptr, 0, tok, rows, offs_r, rank, stride_pk, stride_ps, stride_pm, stride_pr,
                        SPLIT_K).to(b_ptr.dtype.element_ty)
        h1 = h0
        h2 = h0
        if NUM_SLICES > 1:
            h1 = _sum_parts(parts_ptr, 1, tok, rows, offs_r, rank, stride_pk, stride_ps, stride_pm,
                            stride_pr, SPLIT_K).to(b_ptr.dtype.element_ty)
        if NUM_SLICES > 2:
            h2 = _sum_parts(parts_ptr, 2, tok, rows, offs_r, rank, stride_pk, stride_ps, stride_pm,
                            stride_pr, SPLIT_K).to(b_ptr.dtype.element_ty)
        scaled = HAS_SCALE
        if HAS_FLAGS:
            scaled = tl.load(scale_on_ptr + slot) != 0
        b_base = b_ptr + slot.to(tl.int64) * stride_bl + offs_r[None, :] * stride_bk
        b_r_ok = offs_r // 16 * 16 < rank
        y_rows = y_ptr + tok[:, None] * stride_ym
        if Y_AHEAD:   # y of the first block now; each iteration loads the next block's y before its dot
            offs_f = blk_lo * BLOCK_N + offs_bn
            col_end = tl.minimum(N, blk_hi * BLOCK_N)   # this program's columns end here
            y_nxt = tl.load(y_rows + offs_f[None, :] * stride_yn, mask=rows[:, None] & (offs_f < col_end)[None, :],
                            other=0.0)
        for blk in range(blk_lo, blk_hi):
            offs_n = blk * BLOCK_N + offs_bn
            if Y_AHEAD:
                yv = y_nxt
                offs_f = offs_n + BLOCK_N
                y_nxt = tl.load(y_rows + offs_f[None, :] * stride_yn,
                                mask=rows[:, None] & (offs_f < col_end)[None, :], other=0.0)
            # B's rank columns in 16-wide blocks up to r_a (h is 0 past r_a; the pool keeps B finite there,
            # zero-filled as in lora_expand_stream); a mask constant over 16 elements keeps the loads wide
            if EVEN_N and EVEN_R:
                bt = tl.load(b_base + offs_n[:, None] * stride_bn, mask=b_r_ok[None, :], other=0.0)
            else:   # (RP > R: the pool's rank is no power of two)
                bt = tl.load(b_base + offs_n[:, None] * stride_bn,
                             mask=(offs_n < N)[:, None] & (b_r_ok & (offs_r < R))[None, :], other=0.0)
            if NUM_SLICES == 1:
                acc = tl.dot(h0, tl.trans(bt))
            else:
                n0 = blk * BLOCK_N
                s_first = tl.sum((bounds <= n0).to(tl.int32), axis=0)
                s_last = tl.sum((bounds <= tl.minimum(n0 + BLOCK_N, N) - 1).to(tl.int32), axis=0)
                acc = tl.dot(_pick(h0, h1, h2, s_first, NUM_SLICES), tl.trans(bt))
                # a block across slice boundaries (rare): the next slice(s)' columns from their own h; no
                # inner loop, which would keep Triton from pipelining this column loop
                if s_last > s_first:
                    lo = tl.load(slice_off_ptr + s_first + 1)
                    acc = tl.where(offs_n[None, :] >= lo, tl.dot(_pick(h0, h1, h2, s_first + 1, NUM_SLICES),
                                                                 tl.trans(bt)), acc)
                    if NUM_SLICES > 2:
                        if s_last > s_first + 1:
                            lo = tl.load(slice_off_ptr + s_first + 2)
                            acc = tl.where(offs_n[None, :] >= lo, tl.dot(h2, tl.trans(bt)), acc)
            y_ptrs = y_rows + offs_n[None, :] * stride_yn
            if EVEN_N:
                y_ok = rows[:, None]
            else:
                y_ok = rows[:, None] & (offs_n < N)[None, :]
            if not Y_AHEAD:
                yv = tl.load(y_ptrs, mask=y_ok, other=0.0)
            out = yv.to(tl.float32) + acc
            if HAS_SCALE:
                if scaled:
                    gv = tl.load(scale_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn,
                                 mask=offs_n < N, other=1.0)
                    out = out * gv[None, :]
                    if HAS_SHIFT:
                        cv = tl.load(shift_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn,
                                     mask=offs_n < N, other=0.0)
                        out = out + cv[None, :]
            tl.store(y_ptrs, out.to(yv.dtype), mask=y_ok)

    @triton.jit
    def _seg_expand_kernel(
        parts_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        num_tiles, N, R, BLOCKS_PER_PROG,
        stride_pk, stride_ps, stride_pm, stride_pr,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BOUNDS_P2: tl.constexpr, RP: tl.constexpr, TILE_M: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_R: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_FLAGS: tl.constexpr, Y_AHEAD: tl.constexpr = False,
        ADAPT: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        pid_g = tl.program_id(1)
        offs_r = tl.arange(0, RP)
        offs_bn = tl.arange(0, BLOCK_N)
        blk_lo = pid_g * BLOCKS_PER_PROG
        blk_hi = tl.minimum(blk_lo + BLOCKS_PER_PROG, tl.cdiv(N, BLOCK_N))
        bounds = offs_r   # (unused with one slice)
        if NUM_SLICES > 1:
            bi = tl.arange(0, BOUNDS_P2)
            bounds = tl.load(slice_off_ptr + 1 + bi, mask=bi < NUM_SLICES - 1, other=2147483647)
        if USE_PDL:  # the partials are the shrink's (launched just before us with PDL)
            tl.extra.cuda.gdc_wait()
        if ADAPT and GROUP > 1:   # as in the shrink: one pass when the block's tiles share a slot, else per tile
            first = tl.load(tile_slots_ptr + pid * GROUP)
            last = tl.load(tile_slots_ptr + tl.minimum(pid * GROUP + GROUP - 1, num_tiles - 1))
            rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(first, 0)), R)
            if (first == last) & (first >= 0):
                if rank > 0:
                    row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid,
                                               num_tiles, TILE_M, GROUP)
                    _expand_pass(parts_ptr, b_ptr, y_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr, first,
                                 rank, row_slot == first, tok, bounds, offs_r, offs_bn, blk_lo, blk_hi, N, R,
                                 stride_pk, stride_ps, stride_pm, stride_pr, stride_bl, stride_bn, stride_bk,
                                 stride_ym, stride_yn, stride_sl, stride_sn, NUM_SLICES, BLOCK_N, SPLIT_K, EVEN_N,
                                 EVEN_R, HAS_SCALE, HAS_SHIFT, HAS_FLAGS, Y_AHEAD)
            else:
                for g in tl.static_range(GROUP):
                    tile = pid * GROUP + g
                    slot = _run_slot(tile_slots_ptr, tile, 0, num_tiles, 1)
                    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                    if (slot >= 0) & (rank > 0):
                        row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr,
                                                   tile, num_tiles, TILE_M, 1)
                        _expand_pass(parts_ptr, b_ptr, y_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr, slot,
                                     rank, row_slot == slot, tok, bounds, offs_r, offs_bn, blk_lo, blk_hi, N, R,
                                     stride_pk, stride_ps, stride_pm, stride_pr, stride_bl, stride_bn, stride_bk,
                                     stride_ym, stride_yn, stride_sl, stride_sn, NUM_SLICES, BLOCK_N, SPLIT_K, EVEN_N,
                                     EVEN_R, HAS_SCALE, HAS_SHIFT, HAS_FLAGS, Y_AHEAD)
        else:
            row_slot, tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid, num_tiles,
                                       TILE_M, GROUP)
            for g in tl.static_range(GROUP):
                slot = _run_slot(tile_slots_ptr, pid, g, num_tiles, GROUP)
                rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                if (slot >= 0) & (rank > 0):   # rank 0: the adapter does not target this module, rows untouched
                    _expand_pass(parts_ptr, b_ptr, y_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr, slot,
                                 rank, row_slot == slot, tok, bounds, offs_r, offs_bn, blk_lo, blk_hi, N, R,
                                 stride_pk, stride_ps, stride_pm, stride_pr, stride_bl, stride_bn, stride_bk,
                                 stride_ym, stride_yn, stride_sl, stride_sn, NUM_SLICES, BLOCK_N, SPLIT_K, EVEN_N,
                                 EVEN_R, HAS_SCALE, HAS_SHIFT, HAS_FLAGS, Y_AHEAD)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    from .lora_shrink import _num_sms as sms

    return sms(device.index if device.type == "cuda" else None)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def seg_applies(num_tokens: int, rank: int, num_slices: int, x: Tensor) -> bool:
    """lora_apply takes the "seg" path: on, >= SEG_MIN_TOKENS tokens, rank <= 128, <= 3 slices, bf16/fp16 on a GPU
    (fp32 only under the interpreter) and no earlier compile failure for these shapes."""
    return (SEG_ENABLED and num_tokens >= SEG_MIN_TOKENS and rank <= SEG_MAX_RANK and num_slices <= 3
            and not (x.is_cuda and x.dtype == torch.float32) and (num_slices, rank, x.device) not in _SEG_FAILED)


def seg_adapt() -> bool:
    """Row blocks of GROUP > 1 tiles take one pass when their tiles share a slot, else one TILE_M-row pass per tile
    (decided on the device per block): LORASERVE_LORA_SEG_ADAPT (default off); read at each call."""
    return bool(_env_int("LORASERVE_LORA_SEG_ADAPT", 0))


def seg_group(num_tokens: int, block_m: int) -> int:
    """Meta tiles per row block (GROUP): LORASERVE_LORA_SEG_GROUP, else 1 (the tiles as built)."""
    return max(1, _env_int("LORASERVE_LORA_SEG_GROUP", 1))


def seg_shrink_config(num_tokens: int, rank: int, hidden_in: int, num_slices: int, block_m: int, grid_tiles: int,
                      num_sms: int = 132) -> dict:
    """Launch parameters from host-known sizes: K split until the grid holds ~SEG_SHRINK_PER_SM programs per SM
    (every tile assumed active), each K chunk a whole number of BLOCK_K, at least 2 blocks."""
    group = seg_group(num_tokens, block_m)
    rp = max(16, _pow2(rank))
    block_n = max(16, _pow2(num_slices * rp))
    group = max(1, min(group, 128 * 128 // (block_m * block_n)))   # the fp32 accumulator <= 64 KB (no spills)
    block_m_rows = block_m * group
    stages = _env_int("LORASERVE_LORA_SEG_SHRINK_STAGES", 4)
    block_k = 128 if block_n * block_m_rows <= 64 * 64 else 64
    while block_k > 32 and stages * (block_m_rows + block_n) * block_k * 2 > 160 * 1024:   # x + A stages in shared
        block_k //= 2
    block_k = _env_int("LORASERVE_LORA_SEG_SHRINK_BK", block_k)
    per_sm = _env_int("LORASERVE_LORA_SEG_SHRINK_PER_SM", 2)
    rows = -(-grid_tiles // group)
    k_blocks = -(-hidden_in // block_k)
    split = 1
    while rows * split < per_sm * num_sms and k_blocks >= 4 * split:
        split *= 2
    split = _env_int("LORASERVE_LORA_SEG_SPLIT", split)
    warps = _env_int("LORASERVE_LORA_SEG_SHRINK_WARPS", 8 if block_n * block_m_rows >= 128 * 64 else 4)
    return dict(GROUP=group, RP=rp, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, ADAPT=seg_adapt(),
                num_stages=stages)


def seg_reduce() -> bool:
    """The shrink's last K split of each row block sums the partials into one more plane of the workspace (the
    expand then reads that plane only): LORASERVE_LORA_SEG_REDUCE (default on); read at each call."""
    return os.environ.get("LORASERVE_LORA_SEG_REDUCE", "1").strip().lower() not in ("", "0", "false", "off", "no")


def seg_split_k(x: Tensor, lora_a: Tensor, meta: LoRAMeta) -> int:
    """The workspace's leading dim for lora_seg_shrink: SPLIT_K partial planes, plus the reduced plane when
    seg_reduce() is on and SPLIT_K > 1."""
    _, S, R, H = lora_a.shape
    sk = seg_shrink_config(x.shape[0], R, H, S, meta.block_m, meta.grid_tiles, _num_sms(x.device))["SPLIT_K"]
    return sk + 1 if sk > 1 and seg_reduce() else sk


_COUNTERS: dict[torch.device, Tensor] = {}


def _counters(device: torch.device, num: int) -> Tensor:
    """Zeroed int32 arrival counters, one per row block; every launch leaves them zero again."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < num:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora_seg: counters first needed inside CUDA graph capture; run this step eagerly first")
        cnt = _COUNTERS[device] = torch.zeros(max(num, 4096), dtype=torch.int32, device=device)
    return cnt


def seg_expand_config(num_tokens: int, n_total: int, rank: int, block_m: int, grid_tiles: int,
                      num_sms: int = 132, num_slices: int = 1) -> dict:
    """Column blocks of BLOCK_N (256; 128 at rank > 64), grouped so that the grid holds ~SEG_EXPAND_PER_SM programs
    per SM (every tile assumed active)."""
    group = seg_group(num_tokens, block_m)
    block_n = _env_int("LORASERVE_LORA_SEG_BN", 256 if rank <= 64 else 128)
    # accumulator <= 32 KB fp32 (with h of 3 slices and y, two blocks of it with Y_AHEAD: no spills at 8 warps)
    block_n = min(block_n, max(16, _pow2(n_total)), max(16, 128 * 64 // (block_m * group)))
    nblocks = -(-n_total // block_n)
    rows = -(-grid_tiles // group)
    per_sm = _env_int("LORASERVE_LORA_SEG_EXPAND_PER_SM", 8)
    groups = max(1, min(nblocks, -(-per_sm * num_sms // rows)))
    bpp = _env_int("LORASERVE_LORA_SEG_BPP", -(-nblocks // groups))
    return dict(GROUP=group, BLOCK_N=block_n, BLOCKS_PER_PROG=bpp, num_warps=_env_int("LORASERVE_LORA_SEG_WARPS", 8),
                # (not with 128-row blocks of 3 rank-64 slices: h alone takes 48 registers there, sm_90 spills)
                Y_AHEAD=bool(_env_int("LORASERVE_LORA_SEG_YAHEAD", 0)) and block_m * group * num_slices * rank < 128 * 192,
                ADAPT=seg_adapt(),
                num_stages=_env_int("LORASERVE_LORA_SEG_STAGES", 2))


def lora_seg_shrink(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor, *,
                    config: dict | None = None) -> Tensor:
    """out[k, s, t, :r] = x[t, K_k] @ lora_a[slot(t), s, :r, K_k].T: the split-K partials, one launch.

    x [T, H] fp16/bf16 (fp32 under the interpreter); lora_a [L, S, R, H] same dtype (any strides);
    out [P, S, T, R] float32 (seg_split_k gives P): P split-K partials, or with seg_reduce() on and P > 1,
    P - 1 partials and their fixed-order sum in out[P - 1]; entries of tokens without an adapter and columns
    >= rank undefined."""
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    assert H2 == H and x.dtype == lora_a.dtype, f"x [{T}, {H}] {x.dtype} vs lora_a {tuple(lora_a.shape)} {lora_a.dtype}"
    assert out.dim() == 4 and out.shape[1:] == (S, T, R) and out.dtype == torch.float32, \
        f"out must be float32 [SPLIT_K, S={S}, T={T}, R={R}], got {out.dtype} {tuple(out.shape)}"
    assert meta.num_tokens == T and ranks.shape == (L,) and ranks.dtype == torch.int32
    assert S <= 3 and R <= SEG_MAX_RANK, f"seg kernels take <= 3 slices and rank <= {SEG_MAX_RANK}"
    if T == 0:
        return out
    cfg = dict(seg_shrink_config(T, R, H, S, meta.block_m, meta.grid_tiles, _num_sms(x.device)), **(config or {}))
    reduce = out.shape[0] > 1 and seg_reduce()
    SK, BK = out.shape[0] - reduce, cfg["BLOCK_K"]
    k_chunk = -(-(-(-H // SK)) // BK) * BK
    grid = (-(-meta.grid_tiles // cfg["GROUP"]), SK)
    count = _counters(x.device, grid[0]) if reduce else ranks
    _seg_shrink_kernel[grid](
        x, lora_a, out, ranks, count, meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        meta.grid_tiles, H, R, k_chunk,
        x.stride(0), x.stride(1), *lora_a.stride(), *out.stride(),
        NUM_SLICES=S, RP=cfg["RP"], TILE_M=meta.block_m, GROUP=cfg["GROUP"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BK,
        EVEN_K=H == k_chunk * SK, IEEE=x.dtype == torch.float32, REDUCE=reduce, ADAPT=cfg["ADAPT"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(x.device),
    )
    return out


def lora_seg_expand(parts: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor, y: Tensor,
                    *, scale: Tensor | None = None, shift: Tensor | None = None, scale_on: Tensor | None = None,
                    config: dict | None = None) -> Tensor:
    """y[t, off_s:off_{s+1}] += (sum_k parts[k, s, t, :r]) @ lora_b[slot(t), off_s:off_{s+1}, :r].T, one launch.

    parts [P, S, T, R] float32 as lora_seg_shrink leaves it (with seg_reduce() on and P > 1 only the last plane,
    the sum, is read; else the P planes are summed here); [S, T, R] also taken; lora_b [L, N, R] with y's dtype;
    slice_offsets [S+1] int32 on the device; y [T, N] (column views allowed), updated in place, rows of tokens
    without an adapter untouched; scale / shift [L, N] float32 and scale_on [L] int32 as for lora_expand."""
    if parts.dim() == 3:
        parts = parts.unsqueeze(0)
    elif parts.shape[0] > 1 and seg_reduce():   # lora_seg_shrink left the sum in the last plane
        parts = parts[-1:]
    SK, S, T, R = parts.shape
    L, N, R2 = lora_b.shape
    assert R2 == R and parts.dtype == torch.float32, f"parts {parts.dtype} {tuple(parts.shape)} vs lora_b rank {R2}"
    assert y.shape == (T, N) and y.dtype == lora_b.dtype, f"y must be [{T}, {N}] {lora_b.dtype}"
    assert slice_offsets.shape == (S + 1,) and slice_offsets.dtype == torch.int32
    assert meta.num_tokens == T and ranks.shape == (L,) and ranks.dtype == torch.int32
    if scale is not None:
        assert scale.shape == (L, N) and scale.dtype == torch.float32, "scale must be float32 [L, N]"
    if shift is not None:
        assert scale is not None and shift.shape == scale.shape and shift.stride() == scale.stride() \
            and shift.dtype == torch.float32, "shift must match scale (float32 [L, N])"
    if T == 0 or N == 0:
        return y
    cfg = dict(seg_expand_config(T, N, R, meta.block_m, meta.grid_tiles, _num_sms(y.device), S), **(config or {}))
    BN, bpp = cfg["BLOCK_N"], cfg["BLOCKS_PER_PROG"]
    grid = (-(-meta.grid_tiles // cfg["GROUP"]), -(-(-(-N // BN)) // bpp))
    _seg_expand_kernel[grid](
        parts, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        ranks if scale_on is None else scale_on,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        meta.grid_tiles, N, R, bpp,
        *parts.stride(), *lora_b.stride(), y.stride(0), y.stride(1), *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BOUNDS_P2=max(2, _pow2(S - 1)), RP=max(16, _pow2(R)), TILE_M=meta.block_m, GROUP=cfg["GROUP"],
        BLOCK_N=BN, SPLIT_K=SK, EVEN_N=N % BN == 0, EVEN_R=R == max(16, _pow2(R)), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_FLAGS=scale is not None and scale_on is not None, Y_AHEAD=cfg["Y_AHEAD"], ADAPT=cfg["ADAPT"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(y.device),
    )
    return y


def seg_apply(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
              ranks: Tensor, buf: Tensor, scale: Tensor | None, shift: Tensor | None,
              scale_on: Tensor | None) -> bool:
    """lora_apply's "seg" path: shrink into buf (seg_split_k planes), expand into y. False (y untouched) when the
    kernels failed to compile for these shapes on a GPU: they are then off for them (seg_applies), and lora_apply
    takes the tile path."""
    try:
        lora_seg_shrink(x, lora_a, meta, ranks, buf)
    except Exception as exc:  # noqa: BLE001 - compile / resource failure: the tile kernels instead
        if not x.is_cuda:
            raise
        _fail(x, lora_a, exc)
        return False
    try:
        lora_seg_expand(buf, lora_b, slice_offsets, meta, ranks, y, scale=scale, shift=shift, scale_on=scale_on)
    except Exception as exc:  # noqa: BLE001 - (the shrink wrote only buf: nothing of y changed)
        if not x.is_cuda:
            raise
        _fail(x, lora_a, exc)
        return False
    return True


def _fail(x: Tensor, lora_a: Tensor, exc: Exception) -> None:
    import warnings

    _, S, R, _ = lora_a.shape
    _SEG_FAILED.add((S, R, x.device))
    warnings.warn(f"segment-tiled LoRA kernels failed for S={S}, R={R} ({exc!r}); using the tile kernels")

