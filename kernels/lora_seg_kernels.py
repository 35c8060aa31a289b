"""Triton kernels of the segment-tiled LoRA pair (the launchers, configs and the math: lora_seg.py).

_seg_shrink_kernel: program (row block of GROUP meta tiles, K chunk); per slot run of the block one pass
(_shrink_pass) x [rows, K chunk] @ A[slot, all slices, ranks, K chunk].T -> partial plane pid_k; with REDUCE the
block's last K split to arrive (an arrival counter per block, reset by it) sums the planes in a fixed order into
one more plane. _seg_expand_kernel: program (row block, column group); per slot run one pass (_expand_pass): h of
each slice from the partials once, then per column block one B load, one tl.dot, y read + written.
"""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .lora_prefetch import l2_prefetch

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
        REDUCE: tl.constexpr = False, ADAPT: tl.constexpr = False, RED_UNROLL: tl.constexpr = 4,
        USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
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
        # EARLY (PDL only): the metadata chain (tile -> slot, rank, token ids: older than the kernel before us) before
        # the wait, and the expand may launch right after it (it waits for our completion; its metadata before that)
        if USE_PDL and not (EARLY and not (ADAPT and GROUP > 1)):  # x is the kernel before us'
            tl.extra.cuda.gdc_wait()
        # the whole block's rows (slot per row, token ids): the passes' rows, and the reduction's
        blk_slot, blk_tok = _row_block(tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, sorted_ids_ptr, pid, num_tiles,
                                       TILE_M, GROUP)
        slot0 = _run_slot(tile_slots_ptr, pid, 0, num_tiles, GROUP)
        rank0 = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot0, 0)), R)
        if USE_PDL and EARLY and not (ADAPT and GROUP > 1):
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if ADAPT and GROUP > 1:
            # one pass over the whole row block when its tiles share one slot (a long segment), else one pass per
            # meta tile at TILE_M rows (short segments pay no masked rows in their dots)
            first = tl.load(tile_slots_ptr + pid * GROUP)
            last = tl.load(tile_slots_ptr + tl.minimum(pid * GROUP + GROUP - 1, num_tiles - 1))
            rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(first, 0)), R)
            if (first == last) & (first >= 0):
                if rank > 0:
                    _shrink_pass(x_ptr, a_ptr, out_ptr, first, rank, blk_slot == first, blk_tok, s_j, r_j, offs_k, k_lo,
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
            for g in tl.static_range(GROUP):
                if g == 0:
                    slot = slot0
                    rank = rank0
                else:
                    slot = _run_slot(tile_slots_ptr, pid, g, num_tiles, GROUP)
                    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                if (slot >= 0) & (rank > 0):
                    _shrink_pass(x_ptr, a_ptr, out_ptr, slot, rank, blk_slot == slot, blk_tok, s_j, r_j, offs_k, k_lo,
                                 pid_k, K, K_CHUNK, stride_xm, stride_xk, stride_al, stride_as, stride_ar, stride_ak,
                                 stride_ok, stride_os, stride_om, stride_or,
                                 NUM_SLICES, TILE_M * GROUP, BLOCK_N, BLOCK_K, EVEN_K, IEEE)
        if REDUCE:  # the row block's last K split to finish sums all SPLIT_K partials (fixed order: j = 0, 1, ...)
            # into plane SPLIT_K of out, so the expand reads one plane, once per column group, not SPLIT_K
            tl.debug_barrier()   # every thread's partial store precedes the release (cumulative)
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") + 1
            if arrived == SPLIT_K:
                tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed")   # ready for the next launch / graph replay
                ready = (tl.zeros((TILE_M * GROUP,), tl.int32) + arrived) == SPLIT_K   # keeps loads below the atomic
                m = (ready & (blk_slot >= 0))[:, None] & ((s_j < NUM_SLICES) & (r_j < R))[None, :]
                p = out_ptr + s_j[None, :] * stride_os + blk_tok[:, None] * stride_om + r_j[None, :] * stride_or
                h = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
                for j0 in range(1, SPLIT_K, RED_UNROLL):   # RED_UNROLL planes' loads in flight at once, added in order
                    for u in tl.static_range(RED_UNROLL):
                        live = (tl.zeros((TILE_M * GROUP,), tl.int32) + (j0 + u)) < SPLIT_K   # [rows] plane exists
                        h += tl.load(p + (j0 + u) * stride_ok, mask=m & live[:, None], other=0.0,
                                     cache_modifier=".cg")
                tl.store(p + SPLIT_K * stride_ok, h, mask=m)
        if USE_PDL and not (EARLY and not (ADAPT and GROUP > 1)):  # the expand may launch once every program got
            # here (it waits for our completion)
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
        for j in tl.static_range(1, SPLIT_K):   # (unrolled: the planes' loads in flight at once, added in order)
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
        ADAPT: tl.constexpr = False, USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
        TRIGGER_EARLY: tl.constexpr = False, PREFETCH_B: tl.constexpr = False, PF_THREADS: tl.constexpr = 256,
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
        # EARLY (PDL only): the metadata chain before the wait (the partials after it); TRIGGER_EARLY: the next kernel
        # may launch once every program passed the wait (its own wait still orders it after our completion)
        if USE_PDL and not (EARLY and not (ADAPT and GROUP > 1)):  # the partials are the shrink's (PDL launch)
            tl.extra.cuda.gdc_wait()
            if TRIGGER_EARLY:
                tl.extra.cuda.gdc_launch_dependents()
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
            slot0 = _run_slot(tile_slots_ptr, pid, 0, num_tiles, GROUP)
            rank0 = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot0, 0)), R)
            if USE_PDL and EARLY and not (ADAPT and GROUP > 1):
                if PREFETCH_B:   # this program's B run into L2 while the shrink still runs (one bulk prefetch a thread)
                    n_lo = blk_lo * BLOCK_N
                    n_hi = tl.minimum(N, blk_hi * BLOCK_N)
                    run = tl.where((slot0 >= 0) & (rank0 > 0) & (n_hi > n_lo), n_hi - n_lo, 0).to(tl.int64)
                    l2_prefetch(b_ptr + tl.maximum(slot0, 0).to(tl.int64) * stride_bl + n_lo.to(tl.int64) * stride_bn,
                                run * stride_bn * 2, PF_THREADS)
                tl.extra.cuda.gdc_wait()
                if TRIGGER_EARLY:
                    tl.extra.cuda.gdc_launch_dependents()
            for g in tl.static_range(GROUP):
                if g == 0:
                    slot = slot0
                    rank = rank0
                else:
                    slot = _run_slot(tile_slots_ptr, pid, g, num_tiles, GROUP)
                    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
                if (slot >= 0) & (rank > 0):   # rank 0: the adapter does not target this module, rows untouched
                    _expand_pass(parts_ptr, b_ptr, y_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr, slot,
                                 rank, row_slot == slot, tok, bounds, offs_r, offs_bn, blk_lo, blk_hi, N, R,
                                 stride_pk, stride_ps, stride_pm, stride_pr, stride_bl, stride_bn, stride_bk,
                                 stride_ym, stride_yn, stride_sl, stride_sn, NUM_SLICES, BLOCK_N, SPLIT_K, EVEN_N,
                                 EVEN_R, HAS_SCALE, HAS_SHIFT, HAS_FLAGS, Y_AHEAD)
        if USE_PDL and not TRIGGER_EARLY:
            tl.extra.cuda.gdc_launch_dependents()
