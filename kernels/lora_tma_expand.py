"""Multi-LoRA expand with B fed by TMA: each program streams its run of B boxes through shared memory.

Semantics (as :func:`lora_expand` from split-K partials, DoRA's scale / shift epilogue included):
    y[t, off_s:off_{s+1}] += (sum_j buf[j, s, t, :r_a]).to(B.dtype) @ lora_b[a, off_s:off_{s+1}, :r_a].T
buf [SPLIT_K, S, T, R] fp32, lora_b [L, N, R] bf16/fp16 (contiguous), y [T, N] (row stride free).

Why: every LoRA kernel so far streams its adapter bytes at ~1.9-2.0 TB/s at the 64-token / 32-adapter
layer case (gate_up's expand: 29.4 MB of B in ~15 us) while a copy moves ~4.2 TB/s; all of them hold
their bytes in flight in registers or <= 12-64 KB of cp.async stages per program (Little's law: too few
bytes in flight per SM, kernels/PERF_NOTES.md). Here B is read through a host TMA descriptor over the
pool's [L * N, R] view in [BLOCK_N, R] boxes (8 KB at 256 columns x rank 16), and the column loop goes to
Triton's pipeliner (num_stages = STAGES): STAGES - 1 boxes of B (and cp.async stages of y) in flight per
program, in shared memory, without holding a register; the boxes feed tl.dot straight from shared memory.
Otherwise the program is lora_expand_stream's: program (tile, column group), the tile's metadata, h =
the fixed-order sum of the split-K partials (bitwise reproducible: graph replay == eager), one dot per
slice with each column taking its own slice's product, y updated block by block.

B's box always spans the pool's whole rank axis R (a TMA box is a compile-time shape): a slot of rank
r < R reads R columns, not ceil16(r) as the other expands do; those columns meet h = 0. Hence only
pools of R <= 32 (TMA_MAX_RANK). A box past the slot's N reads the next slot's rows (zeros past the pool:
TMA's bounds); their columns are never stored.

Switch: LORASERVE_LORA_TMA_EXPAND (read at each launch through TMA_EXPAND; "0" = off, the default until
the H200 figures are in), taken by lora_expand_stream's launcher for the shapes it gets (qkv, gate_up;
o and down go to the BGMV expand first) up to TMA_MAX_TOKENS tokens, on sm_90+ (or the interpreter).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, interpret_mode, tl, triton
from .lora_meta import LoRAMeta, pdl_launch
from .lora_prefetch import prefetch_on

if HAS_TRITON:
    from .lora_prefetch import l2_prefetch
    from .lora_expand_bgmv import _block2, _delta, _epilogue, _hs, _sels
    from .lora_stream_blocks import _expand_block, _load_parts

    @triton.jit
    def _tile_h(buf_ptr, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm, stride_br,
                NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
                SK_CHUNK: tl.constexpr):
        """(h0, h1, h2) [BLOCK_M, BLOCK_R] fp32: per slice, the fixed-order sum of the tile rows' partials
        (slices past NUM_SLICES: zeros, unused)."""
        h0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        h1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        h2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j0 in tl.static_range(0, SPLIT_K, SK_CHUNK):  # fixed order: replay == eager
            p0 = _load_parts(buf_ptr, 0, j0, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm, stride_br,
                             SPLIT_K, SK_CHUNK)
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
        return h0, h1, h2

    @triton.jit
    def _load_b(b_desc, row, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, B_WIDE: tl.constexpr):
        """B's rows [row, row + BLOCK_N) of the [L * N, R] view: one box; B_WIDE: the same bytes as a box of 128-byte
        rows of the [L * N * R / 64, 64] view, reshaped (row-major) to [BLOCK_N, BLOCK_R]."""
        if B_WIDE:
            b = tl.reshape(b_desc.load([row * BLOCK_R // 64, 0]), [BLOCK_N, BLOCK_R])
        else:
            b = b_desc.load([row, 0])
        return b

    @triton.jit
    def _block2y(b, y0, y1, n0, N, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2, stride_ym,
                 stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                 NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 ONE_SLICE: tl.constexpr):
        """lora_expand_bgmv._block2 with y's two rows already loaded (y0, y1 [BLOCK_N]; y1 = y0's row when the
        tile has one row: its store is masked off)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        m1 = n_ok & ((tl.zeros_like(offs_n) + has1) > 0)
        y_cols = offs_n * stride_yn
        bf = b.to(tl.float32)
        if NUM_SLICES >= 2 and ONE_SLICE:
            # a box inside one slice (gate_up: 14336 = 56 x 256) multiplies by that slice's h only: one
            # multiply-sum per row, not one per slice and a per-column select (the loop is issue-bound)
            inside = ((n0 >= lo1) | (n0 + BLOCK_N <= lo1)) & ((n0 >= lo2) | (n0 + BLOCK_N <= lo2))
            if inside:
                ha = tl.where(n0 >= lo2, ha2, tl.where(n0 >= lo1, ha1, ha0))
                hb = tl.where(n0 >= lo2, hb2, tl.where(n0 >= lo1, hb1, hb0))
                d0 = tl.sum(bf * ha[None, :], axis=1)
                d1 = tl.sum(bf * hb[None, :], axis=1)
            else:
                sel1, sel2 = _sels(offs_n, lo1, lo2, NUM_SLICES)
                d0 = _delta(bf, ha0, ha1, ha2, sel1, sel2, NUM_SLICES)
                d1 = _delta(bf, hb0, hb1, hb2, sel1, sel2, NUM_SLICES)
        else:
            sel1, sel2 = _sels(offs_n, lo1, lo2, NUM_SLICES)
            d0 = _delta(bf, ha0, ha1, ha2, sel1, sel2, NUM_SLICES)
            d1 = _delta(bf, hb0, hb1, hb2, sel1, sel2, NUM_SLICES)
        o0 = _epilogue(y0.to(tl.float32) + d0, offs_n, n_ok, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                       HAS_SCALE, HAS_SHIFT)
        o1 = _epilogue(y1.to(tl.float32) + d1, offs_n, n_ok, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                       HAS_SCALE, HAS_SHIFT)
        tl.store(y_ptr + tok0 * stride_ym + y_cols, o0.to(y0.dtype), mask=n_ok)
        tl.store(y_ptr + tok1 * stride_ym + y_cols, o1.to(y1.dtype), mask=m1)

    @triton.jit
    def _lora_expand_tma_kernel(
        buf_ptr, b_desc, y_desc, y_ptr, b_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        N, R, COLS_PER_PROG,
        stride_bsplit, stride_bs, stride_bm, stride_br,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        SPLIT_K: tl.constexpr, SK_CHUNK: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STAGES: tl.constexpr = 4, ROWS2: tl.constexpr = True,
        SK_P: tl.constexpr = 1, Y_TMA: tl.constexpr = False, B_WIDE: tl.constexpr = False,
        PF_BOXES: tl.constexpr = 0, PF_THREADS: tl.constexpr = 128, ONE_SLICE: tl.constexpr = True,
        PAIRS: tl.constexpr = False,
        USE_PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False, SCALE_FLAG: tl.constexpr = False,
        GROUP_MAJOR: tl.constexpr = False,
    ):
        if TRIGGER:  # (with USE_PDL) the next kernel may launch once all our programs started
            tl.extra.cuda.gdc_launch_dependents()
        if GROUP_MAJOR:  # grid (groups, tiles), see lora_meta.LORA_GROUP_MAJOR
            tile = tl.program_id(1)
            col0 = tl.program_id(0) * COLS_PER_PROG
        else:
            tile = tl.program_id(0)
            col0 = tl.program_id(1) * COLS_PER_PROG
        slot = tl.load(tile_slots_ptr + tile)
        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        if slot < 0:
            if USE_PDL:  # every program waits: our completion implies the shrink's (see lora_expand_stream)
                tl.extra.cuda.gdc_wait()
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        g_on = 1
        if SCALE_FLAG:  # scale_on [L] int32: 0 = a plain LoRA slot, its programs skip the DoRA epilogue
            g_on = tl.load(scale_on_ptr + slot)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        lo1 = N
        lo2 = N
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
        slot64 = slot.to(tl.int64)
        if PF_BOXES > 0:  # (with USE_PDL, on a GPU) our first boxes of B into L2 while the shrink finishes: B is
            # older than it; after the wait the TMA loads of the pipeline's prologue hit L2
            pf_rows = tl.minimum(col_end - col0, PF_BOXES * BLOCK_N)
            l2_prefetch(b_ptr + (slot64 * N + col0) * BLOCK_R, pf_rows.to(tl.int64) * (BLOCK_R * 2), PF_THREADS)
        if USE_PDL:  # the partials and y are written by the kernels before us
            tl.extra.cuda.gdc_wait()
        row0 = slot * N   # this slot's first row in B's [L * N, R] view
        if PAIRS:   # every tile as pairs of rows, each pair one pipelined pass over the run (no tl.dot path: its
            # registers set the kernel's, ~165 -> fewer programs per SM); a tile of 2k rows re-reads its run k times
            # (from L2 after the first): decode tiles (<= 2 rows) pass once
            rows_end = tl.minimum(end, start + BLOCK_M)
            offs_k = tl.arange(0, SK_P)
            h_ok = offs_r < rank
            for r0 in range(start, rows_end, 2):
                tok0 = tl.load(sorted_ids_ptr + r0).to(tl.int64)
                tok1 = tl.load(sorted_ids_ptr + tl.minimum(r0 + 1, rows_end - 1)).to(tl.int64)
                has1 = (r0 + 1 < rows_end).to(tl.int32)
                ha0, ha1, ha2 = _hs(buf_ptr, tok0, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm,
                                    stride_br, NUM_SLICES, SPLIT_K, CAST, y_ptr.dtype.element_ty)
                hb0, hb1, hb2 = _hs(buf_ptr, tok1, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm,
                                    stride_br, NUM_SLICES, SPLIT_K, CAST, y_ptr.dtype.element_ty)
                t0 = tok0.to(tl.int32)
                t1 = tok1.to(tl.int32)
                for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=STAGES):
                    n0 = col0 + i * BLOCK_N
                    b = _load_b(b_desc, row0 + n0, BLOCK_N, BLOCK_R, B_WIDE)   # [BLOCK_N, BLOCK_R]
                    if Y_TMA:
                        y0 = tl.reshape(y_desc.load([t0, n0]), [BLOCK_N])
                        y1 = tl.reshape(y_desc.load([t1, n0]), [BLOCK_N])
                        _block2y(b, y0, y1, n0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1,
                                 lo2, stride_ym, stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                                 NUM_SLICES, BLOCK_N, HAS_SCALE, HAS_SHIFT, ONE_SLICE)
                    else:
                        _block2(b, n0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2,
                                stride_ym, stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                                NUM_SLICES, BLOCK_N, HAS_SCALE, HAS_SHIFT)
            return
        if ROWS2:
            if end - start <= 2:   # decode tiles: no tl.dot in the loop, so Triton pipelines y's loads too
                tok0 = tl.load(sorted_ids_ptr + start).to(tl.int64)
                tok1 = tl.load(sorted_ids_ptr + end - 1).to(tl.int64)
                has1 = (end - start > 1).to(tl.int32)
                offs_k = tl.arange(0, SK_P)
                h_ok = offs_r < rank
                ha0, ha1, ha2 = _hs(buf_ptr, tok0, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm,
                                    stride_br, NUM_SLICES, SPLIT_K, CAST, y_ptr.dtype.element_ty)
                hb0, hb1, hb2 = _hs(buf_ptr, tok1, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm,
                                    stride_br, NUM_SLICES, SPLIT_K, CAST, y_ptr.dtype.element_ty)
                if Y_TMA:  # y's two rows through TMA too ([1, BLOCK_N] boxes), pipelined with B's
                    t0 = tok0.to(tl.int32)
                    t1 = tok1.to(tl.int32)
                    for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=STAGES):
                        n0 = col0 + i * BLOCK_N
                        b = _load_b(b_desc, row0 + n0, BLOCK_N, BLOCK_R, B_WIDE)   # [BLOCK_N, BLOCK_R]
                        y0 = tl.reshape(y_desc.load([t0, n0]), [BLOCK_N])
                        y1 = tl.reshape(y_desc.load([t1, n0]), [BLOCK_N])
                        _block2y(b, y0, y1, n0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1,
                                 lo2, stride_ym, stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                                 NUM_SLICES, BLOCK_N, HAS_SCALE, HAS_SHIFT, ONE_SLICE)
                    return
                for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=STAGES):
                    n0 = col0 + i * BLOCK_N
                    b = _load_b(b_desc, row0 + n0, BLOCK_N, BLOCK_R, B_WIDE)   # [BLOCK_N, BLOCK_R]
                    _block2(b, n0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2,
                            stride_ym, stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                            NUM_SLICES, BLOCK_N, HAS_SCALE, HAS_SHIFT)
                return
        h_mask = row_ok[:, None] & (offs_r < rank)[None, :]   # h = 0 past the rank: B's extra columns drop out
        h0, h1, h2 = _tile_h(buf_ptr, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm, stride_br,
                             NUM_SLICES, BLOCK_M, BLOCK_R, SPLIT_K, SK_CHUNK)
        if CAST:  # h rounded to B's dtype before the product, as punica / vLLM do
            h0 = h0.to(y_ptr.dtype.element_ty)   # (y's dtype is B's: lora_expand checks)
            h1 = h1.to(y_ptr.dtype.element_ty)
            h2 = h2.to(y_ptr.dtype.element_ty)
        y_rows = y_ptr + tok[:, None] * stride_ym
        offs_nb = tl.arange(0, BLOCK_N)
        # B boxes through TMA and y blocks through cp.async, STAGES - 1 of each in flight (Triton's pipeliner)
        for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=STAGES):
            n0 = col0 + i * BLOCK_N
            b = _load_b(b_desc, row0 + n0, BLOCK_N, BLOCK_R, B_WIDE)   # [BLOCK_N, BLOCK_R]
            offs_p = n0 + offs_nb
            yp = tl.load(y_rows + offs_p[None, :] * stride_yn, mask=row_ok[:, None] & (offs_p < col_end)[None, :],
                         other=0.0)
            _expand_block(b, yp, n0, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end, row_ok, scale_ptr,
                          shift_ptr, slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES, IEEE, HAS_SCALE,
                          HAS_SHIFT, g_on)


def _env_on(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "off", "no")


TMA_EXPAND = _env_on("LORASERVE_LORA_TMA_EXPAND", "0")
TMA_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_TMA_MAX_TOKENS", "64"))
TMA_MIN_TOKENS = int(os.environ.get("LORASERVE_LORA_TMA_MIN_TOKENS", "1"))   # (smaller steps: the streaming expand)
# ... and only for projections at least this wide (LORASERVE_LORA_TMA_MIN_N; 16384: gate_up only, whose programs walk
# long runs of boxes; qkv's 6144 columns give 2 boxes a program at 4 programs per SM: nothing to pipeline)
TMA_MIN_N = int(os.environ.get("LORASERVE_LORA_TMA_MIN_N", "0"))
TMA_MAX_RANK = 32      # the box spans the pool's whole rank axis (module docstring)
# Launch knobs (env for the probes): columns per box, pipeline stages (STAGES - 1 boxes in flight), programs per SM
# the grid aims at (counting every grid tile active, as lora_expand_stream), warps.
TMA_BLOCK_N = int(os.environ.get("LORASERVE_LORA_TMA_BLOCK_N", "256"))
TMA_STAGES = int(os.environ.get("LORASERVE_LORA_TMA_STAGES", "4"))
TMA_PPS = float(os.environ.get("LORASERVE_LORA_TMA_PPS", "2"))
TMA_WARPS = int(os.environ.get("LORASERVE_LORA_TMA_WARPS", "4"))
# Tiles of <= 2 rows (decode: 64 tokens over 32 adapters) take a loop without tl.dot (lora_expand_bgmv's per-row
# multiply-sum): with a dot in the loop Triton's pipeliner leaves y's loads out (sm_90 TTGIR: a plain load waited on
# every iteration); without, y's blocks are pipelined with B's boxes. LORASERVE_LORA_TMA_ROWS2=0: the dot loop always.
TMA_ROWS2 = _env_on("LORASERVE_LORA_TMA_ROWS2", "1")
# ... and there y's two rows through TMA boxes too (LORASERVE_LORA_TMA_Y; needs y_tma_ok): without, y's loads (512 B
# a row at 256 columns: 4 B a thread) were still plain loads waited on every iteration in the sm_90 TTGIR.
TMA_Y = _env_on("LORASERVE_LORA_TMA_Y", "1")
# B's boxes as 128-byte rows of its [L * N * R / 64, 64] view (LORASERVE_LORA_TMA_B_WIDE; b_wide_ok), not [BLOCK_N, R]
# boxes of 32-byte rows (rank 16): the same bytes, fewer, wider rows for the TMA unit; reshaped in registers.
TMA_B_WIDE = _env_on("LORASERVE_LORA_TMA_B_WIDE", "0")
# Boxes of B each program bulk-prefetches into L2 before griddepcontrol.wait (LORASERVE_LORA_TMA_PF_BOXES; 0: none).
# The pipeline's TMA loads can only start after the wait (y's boxes ride in the same pipeline); B is older than the
# kernel before us. (The streaming expand's whole-run L2 prefetch, letter "b", lost: this is its first boxes only.)
TMA_PF_BOXES = int(os.environ.get("LORASERVE_LORA_TMA_PF_BOXES", "0"))
# Decode loop: a box inside one slice takes that slice's h alone (LORASERVE_LORA_TMA_ONE_SLICE; 0: every slice's
# product and a per-column select, as lora_expand_bgmv). H200 probe 1 (04:10): the loop is issue-bound, not
# memory-bound (8 stages in flight no faster than 4; more programs per SM faster).
TMA_ONE_SLICE = _env_on("LORASERVE_LORA_TMA_ONE_SLICE", "0")   # (H200 04:33: 4 programs/SM 14.3 -> 24.9 us with it)
# A register cap for the compile (LORASERVE_LORA_TMA_MAXNREG; 0: none): 128 lets 4 programs of 4 warps share an SM
# (the decode loop compiled to ~165 registers, 3 per SM; 128 spills 16-72 bytes in the sm_90 offline compile).
TMA_MAXNREG = int(os.environ.get("LORASERVE_LORA_TMA_MAXNREG", "0"))
# Every tile as pairs of rows through the decode loop, no tl.dot path (LORASERVE_LORA_TMA_PAIRS): the kernel's
# registers are the max over its paths, and the dot path's [16, BLOCK_N] tiles set them.
TMA_PAIRS = _env_on("LORASERVE_LORA_TMA_PAIRS", "0")
_TMA_OK: dict[int, bool] = {}
_TMA_FAILED: set[tuple] = set()   # (S, R, device) whose TMA expand failed: the streaming expand there


def _device_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return interpret_mode()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _TMA_OK.get(idx)
    if ok is None:
        ok = _TMA_OK[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return ok


def tma_expand_applies(lora_b: Tensor, y: Tensor, num_slices: int, num_tokens: int, dense_slots: bool = False) -> bool:
    """TMA_EXPAND is on and this launch fits the kernel: <= TMA_MAX_TOKENS tokens, <= 3 slices, a contiguous
    pool of rank 16 or 32 (16-bit on a GPU: fp32 dots spill there), rows addressable in int32, sm_90+."""
    if (not (TMA_EXPAND and HAS_TRITON) or dense_slots or not TMA_MIN_TOKENS <= num_tokens <= TMA_MAX_TOKENS
            or num_slices > 3):
        return False
    L, N, R = lora_b.shape
    if N < TMA_MIN_N:
        return False
    if R not in (16, 32) or not lora_b.is_contiguous() or L * N >= 2 ** 31 or lora_b.data_ptr() % 16:
        return False
    if y.is_cuda and lora_b.dtype not in (torch.bfloat16, torch.float16):
        return False
    return _device_ok(y.device)


def tma_expand_config(num_tokens: int, n_total: int, rank: int, num_slices: int, block_m: int, grid_tiles: int,
                      split_k: int = 1, num_sms: int = 132) -> dict:
    """Launch parameters from host-known sizes only (a CUDA graph captured for (T, N) stays valid): BLOCK_N
    columns a box, groups of whole boxes so the grid gives ~TMA_PPS programs per SM (every grid tile counted)."""
    block_n = max(16, min(TMA_BLOCK_N, 1 << max(0, (n_total - 1).bit_length())))
    n_blocks = -(-n_total // block_n)
    groups = max(1, min(n_blocks, round(TMA_PPS * num_sms / max(1, grid_tiles))))
    per_prog = -(-n_blocks // groups)
    sk_chunk = max(1, min(1 << max(0, (split_k - 1).bit_length()), 8192 // (num_slices * block_m * rank)))
    sk_chunk = 1 << (sk_chunk.bit_length() - 1)   # a power of two (tl.arange)
    return dict(BLOCK_N=block_n, COLS_PER_PROG=per_prog * block_n, groups=-(-n_blocks // per_prog),
                SK_CHUNK=sk_chunk, STAGES=TMA_STAGES, num_warps=TMA_WARPS, ROWS2=TMA_ROWS2,
                Y_TMA=TMA_Y, B_WIDE=TMA_B_WIDE, PF_BOXES=TMA_PF_BOXES, ONE_SLICE=TMA_ONE_SLICE,
                MAXNREG=TMA_MAXNREG, PAIRS=TMA_PAIRS)


def b_wide_ok(lora_b: Tensor, block_n: int) -> bool:
    """B can be read as 128-byte rows ([L * N * R / 64, 64]) in whole boxes: every slot's and box's start on a row."""
    L, N, R = lora_b.shape
    return (N * R) % 64 == 0 and (block_n * R) % 64 == 0 and block_n * R // 64 <= 256


def _b_desc(lora_b: Tensor, block_n: int, wide: bool = False):
    """Host TMA descriptor over lora_b's [L * N, R] view, [block_n, R] boxes (R * 2 bytes a row: 16-byte multiple);
    wide: over its [L * N * R / 64, 64] view, [block_n * R / 64, 64] boxes (the same bytes in 128-byte rows)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    L, N, R = lora_b.shape
    if wide:
        rows = L * N * R // 64
        return TensorDescriptor(lora_b.view(rows, 64), [rows, 64], [64, 1], [block_n * R // 64, 64])
    view = lora_b.view(L * N, R)
    return TensorDescriptor(view, [L * N, R], [R, 1], [block_n, R])


def y_tma_ok(y: Tensor, block_n: int) -> bool:
    """y can be read through [1, block_n] TMA boxes: unit column stride, 16-byte aligned base and row stride,
    block_n <= 256 (a box dimension's limit)."""
    es = y.element_size()
    return (y.stride(1) == 1 and y.data_ptr() % 16 == 0 and (y.stride(0) * es) % 16 == 0 and block_n <= 256
            and y.shape[0] < 2 ** 31)


def _y_desc(y: Tensor, block_n: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(y, list(y.shape), [y.stride(0), 1], [1, block_n])


def lora_expand_tma(partials: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor,
                    y: Tensor, *, config: dict | None = None, scale: Tensor | None = None,
                    shift: Tensor | None = None, num_sms: int = 132, scale_on: Tensor | None = None) -> Tensor:
    """y += the LoRA expand (module docstring); the caller checked the arguments (lora_expand) and
    tma_expand_applies. partials [SPLIT_K, S, T, R] float32; config overrides tma_expand_config."""
    SK, S, T, R = partials.shape
    N = lora_b.shape[1]
    cfg = dict(tma_expand_config(T, N, R, S, meta.block_m, meta.grid_tiles, SK, num_sms), **(config or {}))
    if config and ("BLOCK_N" in config or "COLS_PER_PROG" in config):  # keep the grid consistent
        cfg["COLS_PER_PROG"] = config.get("COLS_PER_PROG", cfg["COLS_PER_PROG"])
        cfg["groups"] = -(-N // cfg["COLS_PER_PROG"])
    assert cfg["COLS_PER_PROG"] % cfg["BLOCK_N"] == 0, "COLS_PER_PROG must be a multiple of BLOCK_N"
    from . import lora_meta

    gmajor = lora_meta.LORA_GROUP_MAJOR
    grid = (cfg["groups"], meta.grid_tiles) if gmajor else (meta.grid_tiles, cfg["groups"])
    y_tma = cfg["ROWS2"] and cfg["Y_TMA"] and y_tma_ok(y, cfg["BLOCK_N"])
    b_wide = cfg["B_WIDE"] and b_wide_ok(lora_b, cfg["BLOCK_N"])
    pdl = pdl_launch(y.device)
    pf = cfg["PF_BOXES"] if pdl.get("USE_PDL") and y.is_cuda and lora_b.element_size() == 2 else 0
    _lora_expand_tma_kernel[grid](
        partials, _b_desc(lora_b, cfg["BLOCK_N"], b_wide), _y_desc(y, cfg["BLOCK_N"]) if y_tma else None, y, lora_b, ranks, slice_offsets, y if scale is None else scale,
        y if shift is None else shift, ranks if scale_on is None else scale_on,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        N, R, cfg["COLS_PER_PROG"], *partials.stride(), y.stride(0), y.stride(1),
        *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BLOCK_M=meta.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=R, SPLIT_K=SK, SK_CHUNK=cfg["SK_CHUNK"],
        CAST=lora_b.dtype != torch.float32, IEEE=lora_b.dtype == torch.float32,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, STAGES=cfg["STAGES"], ROWS2=cfg["ROWS2"],
        SK_P=max(1, 1 << max(0, (SK - 1).bit_length())), Y_TMA=y_tma, B_WIDE=b_wide, PF_BOXES=pf, PF_THREADS=32 * cfg["num_warps"],
        ONE_SLICE=cfg["ONE_SLICE"], PAIRS=cfg["PAIRS"], **({"maxnreg": cfg["MAXNREG"]} if cfg["MAXNREG"] else {}),
        SCALE_FLAG=scale is not None and scale_on is not None, GROUP_MAJOR=gmajor,
        TRIGGER=prefetch_on("t", y.device, pdl), num_warps=cfg["num_warps"], num_stages=cfg["STAGES"], **pdl,
    )
    return y
