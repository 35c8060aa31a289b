"""BGMV-style multi-LoRA expand for decode-like tiles: one wide B block per program, no tl.dot.

Semantics (as :func:`lora_expand` from split-K partials, DoRA's scale / shift epilogue included):
    y[t, off_s:off_{s+1}] += (sum_j buf[j, s, t, :r_a]).to(B.dtype) @ lora_b[a, off_s:off_{s+1}, :r_a].T
for every token t of a tile with slot a >= 0 (fp32 products and sum, one rounding into y); with scale, rows
become (y + delta) * scale[a] (+ shift[a]), skipped for slots whose scale_on flag is 0 (plain LoRA).

Why another expand: the streaming expand (lora_expand_stream.py) walks a run of 4 KB column blocks
per program through tl.dot, whose B operand goes through a shared-memory layout conversion (a barrier
per block), and stayed at ~2.3 TB/s whatever its tile, depth, stages or programs per SM (H200 sweeps,
kernels/PERF_NOTES.md: gate_up at 64 tokens / 32 adapters 15-17 us for 29.4 MB of B + 7.3 MB of y).
At decode a tile holds 1-4 rows, so the product is a [BLOCK_N, R] x [R] matrix-vector per row: here
each program loads ONE [BLOCK_N, BLOCK_R] block of B (8 KB at rank 16) with a single load, issued
before griddepcontrol.wait (B is older than the kernel before us), and then, two rows at a time,
reads the rows' partials and y, multiplies in registers (a broadcast-multiply-sum over the rank,
no shared memory, no barrier) and stores y. No column loop: the grid is (grid_tiles, cdiv(N, BLOCK_N))
and the whole block is in flight at once (5 programs x 8 KB per SM at rank 16).

Columns take the intermediate of their own slice (per column select of h_0 / h_1 / h_2), as the
classic kernel's masked sum does. B is read only up to ceil16(r_a) of its rank axis.
Default for single-slice projections at <= 64 tokens (lora_expand.EXPAND_BGMV, _MAX_SLICES; H200 figures there).
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
    def _hs(buf_ptr, tok, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm, stride_br,
            NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, CAST: tl.constexpr, B_DTYPE: tl.constexpr):
        """(h_0, h_1, h_2) [BLOCK_R] fp32 of one token: per slice the fixed-order sum of its SPLIT_K partials,
        rounded to B's dtype (CAST) as the tl.dot kernels do; slices past NUM_SLICES repeat h_0."""
        base = buf_ptr + tok * stride_bm + offs_k[:, None] * stride_bsplit + offs_r[None, :] * stride_br
        m = (offs_k < SPLIT_K)[:, None] & h_ok[None, :]
        h0 = tl.sum(tl.load(base, mask=m, other=0.0), axis=0)
        h1 = h0
        h2 = h0
        if NUM_SLICES >= 2:
            h1 = tl.sum(tl.load(base + stride_bs, mask=m, other=0.0), axis=0)
        if NUM_SLICES == 3:
            h2 = tl.sum(tl.load(base + 2 * stride_bs, mask=m, other=0.0), axis=0)
        if CAST:
            h0 = h0.to(B_DTYPE).to(tl.float32)
            h1 = h1.to(B_DTYPE).to(tl.float32)
            h2 = h2.to(B_DTYPE).to(tl.float32)
        return h0, h1, h2

    @triton.jit
    def _delta(bf, h0, h1, h2, sel1, sel2, NUM_SLICES: tl.constexpr):
        """[BLOCK_N] fp32: bf [BLOCK_N, BLOCK_R] (B in fp32) times each column's own slice's h (sel1 / sel2:
        column in slice >= 1 / >= 2): one multiply-sum per slice, no [BLOCK_N, BLOCK_R] select of h."""
        d = tl.sum(bf * h0[None, :], axis=1)
        if NUM_SLICES >= 2:
            d = tl.where(sel1, tl.sum(bf * h1[None, :], axis=1), d)
        if NUM_SLICES == 3:
            d = tl.where(sel2, tl.sum(bf * h2[None, :], axis=1), d)
        return d

    @triton.jit
    def _epilogue(out, offs_n, n_ok, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """DoRA: (y + delta) * g[slot] (+ shift[slot]) per column, only for a flagged slot (g_on != 0)."""
        if HAS_SCALE:
            if g_on != 0:
                g = tl.load(scale_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=1.0)
                out = out * g
                if HAS_SHIFT:
                    out = out + tl.load(shift_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=0.0)
        return out

    @triton.jit
    def _sels(offs_n, lo1, lo2, NUM_SLICES: tl.constexpr):
        """[BLOCK_N] masks: column in slice >= 1, column in slice >= 2 (all false past NUM_SLICES)."""
        sel1 = offs_n < 0
        sel2 = offs_n < 0
        if NUM_SLICES >= 2:
            sel1 = offs_n >= lo1
        if NUM_SLICES == 3:
            sel2 = offs_n >= lo2
        return sel1, sel2

    @triton.jit
    def _block2(b, n0, N, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2, stride_ym, stride_yn,
                scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
                NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """A tile of <= 2 rows (decode), h hoisted: y[tok0 / tok1, n0 : n0 + BLOCK_N] += B h; both y rows are
        issued right behind b's load."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        m1 = n_ok & ((tl.zeros_like(offs_n) + has1) > 0)  # (a scalar-and-block mask upsets the interpreter)
        y_cols = offs_n * stride_yn
        y0 = tl.load(y_ptr + tok0 * stride_ym + y_cols, mask=n_ok, other=0.0)
        y1 = tl.load(y_ptr + tok1 * stride_ym + y_cols, mask=m1, other=0.0)
        sel1, sel2 = _sels(offs_n, lo1, lo2, NUM_SLICES)
        bf = b.to(tl.float32)
        o0 = _epilogue(y0.to(tl.float32) + _delta(bf, ha0, ha1, ha2, sel1, sel2, NUM_SLICES), offs_n, n_ok,
                       scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, HAS_SCALE, HAS_SHIFT)
        o1 = _epilogue(y1.to(tl.float32) + _delta(bf, hb0, hb1, hb2, sel1, sel2, NUM_SLICES), offs_n, n_ok,
                       scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, HAS_SCALE, HAS_SHIFT)
        tl.store(y_ptr + tok0 * stride_ym + y_cols, o0.to(y0.dtype), mask=n_ok)
        tl.store(y_ptr + tok1 * stride_ym + y_cols, o1.to(y1.dtype), mask=m1)

    @triton.jit
    def _block(b, n0, N, start, end, buf_ptr, y_ptr, sorted_ids_ptr, lo1, lo2, rank, offs_r,
               stride_bsplit, stride_bs, stride_bm, stride_br, stride_ym, stride_yn,
               scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on,
               NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SK_P: tl.constexpr,
               CAST: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """Any tile: y[rows, n0 : n0 + BLOCK_N] += h_row @ b.T, two rows at a time (each pair's y rows and
        partials issued together, right behind b's load: no dependence on it)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        sel1, sel2 = _sels(offs_n, lo1, lo2, NUM_SLICES)
        h_ok = offs_r < rank
        offs_k = tl.arange(0, SK_P)
        y_cols = offs_n * stride_yn
        bf = b.to(tl.float32)
        for r0 in range(start, end, 2):
            m1 = n_ok & ((tl.zeros_like(offs_n) + r0 + 1) < end)  # (a scalar-and-block mask upsets the interpreter)
            tok0 = tl.load(sorted_ids_ptr + r0).to(tl.int64)
            tok1 = tl.load(sorted_ids_ptr + tl.minimum(r0 + 1, end - 1)).to(tl.int64)
            y0 = tl.load(y_ptr + tok0 * stride_ym + y_cols, mask=n_ok, other=0.0)
            y1 = tl.load(y_ptr + tok1 * stride_ym + y_cols, mask=m1, other=0.0)
            ha0, ha1, ha2 = _hs(buf_ptr, tok0, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm, stride_br,
                                NUM_SLICES, SPLIT_K, CAST, b.dtype)
            hb0, hb1, hb2 = _hs(buf_ptr, tok1, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm, stride_br,
                                NUM_SLICES, SPLIT_K, CAST, b.dtype)
            o0 = _epilogue(y0.to(tl.float32) + _delta(bf, ha0, ha1, ha2, sel1, sel2, NUM_SLICES), offs_n, n_ok,
                           scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, HAS_SCALE, HAS_SHIFT)
            o1 = _epilogue(y1.to(tl.float32) + _delta(bf, hb0, hb1, hb2, sel1, sel2, NUM_SLICES), offs_n, n_ok,
                           scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, HAS_SCALE, HAS_SHIFT)
            tl.store(y_ptr + tok0 * stride_ym + y_cols, o0.to(y0.dtype), mask=n_ok)
            tl.store(y_ptr + tok1 * stride_ym + y_cols, o1.to(y1.dtype), mask=m1)

    @triton.jit
    def _lora_expand_bgmv_kernel(
        buf_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr, scale_on_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        N, R, COLS_PER_PROG,
        stride_bsplit, stride_bs, stride_bm, stride_br,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        SPLIT_K: tl.constexpr, SK_P: tl.constexpr, EVEN_R: tl.constexpr, CAST: tl.constexpr,
        HAS_SCALE: tl.constexpr = False, HAS_SHIFT: tl.constexpr = False, SCALE_FLAG: tl.constexpr = False,
        USE_PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False, GROUP_MAJOR: tl.constexpr = False,
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
        end = tl.minimum(tl.load(tile_ends_ptr + tile), start + BLOCK_M)  # tile_ends: the segment's end
        if slot < 0:
            if USE_PDL:  # every program waits: our completion implies the shrink's (see lora_expand_stream)
                tl.extra.cuda.gdc_wait()
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        g_on = 1
        if SCALE_FLAG:  # scale_on [L] int32: 0 = a plain LoRA slot, its programs skip the DoRA epilogue
            g_on = tl.load(scale_on_ptr + slot)
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
        b_r_ok = offs_r // 16 * 16 < rank  # whole 16-wide chunks (vector loads); the extra columns meet h = 0
        if not EVEN_R:
            b_r_ok = b_r_ok & (offs_r < R)
        offs_nb = tl.arange(0, BLOCK_N)
        slot64 = slot.to(tl.int64)
        b_rows = b_ptr + slot64 * stride_bl + offs_r[None, :] * stride_bk
        # The first [BLOCK_N, BLOCK_R] block in one load before the wait (B is older than the shrink); y and
        # the partials after it. Then one block per iteration, B, y and partials issued together.
        b = tl.load(b_rows + (col0 + offs_nb)[:, None] * stride_bn,
                    mask=((col0 + offs_nb) < col_end)[:, None] & b_r_ok[None, :], other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        if end - start <= 2:  # decode tiles: token ids and h once per program, then B and y per block
            tok0 = tl.load(sorted_ids_ptr + start).to(tl.int64)
            tok1 = tl.load(sorted_ids_ptr + end - 1).to(tl.int64)
            has1 = (end - start > 1).to(tl.int32)
            offs_k = tl.arange(0, SK_P)
            h_ok = offs_r < rank
            ha0, ha1, ha2 = _hs(buf_ptr, tok0, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm, stride_br,
                                NUM_SLICES, SPLIT_K, CAST, b.dtype)
            hb0, hb1, hb2 = _hs(buf_ptr, tok1, offs_k, offs_r, h_ok, stride_bsplit, stride_bs, stride_bm, stride_br,
                                NUM_SLICES, SPLIT_K, CAST, b.dtype)
            _block2(b, col0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2, stride_ym,
                    stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, NUM_SLICES, BLOCK_N,
                    HAS_SCALE, HAS_SHIFT)
            for n0 in range(col0 + BLOCK_N, col_end, BLOCK_N):
                b = tl.load(b_rows + (n0 + offs_nb)[:, None] * stride_bn,
                            mask=((n0 + offs_nb) < col_end)[:, None] & b_r_ok[None, :], other=0.0)
                _block2(b, n0, col_end, tok0, tok1, has1, ha0, ha1, ha2, hb0, hb1, hb2, y_ptr, lo1, lo2, stride_ym,
                        stride_yn, scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, NUM_SLICES, BLOCK_N,
                        HAS_SCALE, HAS_SHIFT)
            return
        _block(b, col0, col_end, start, end, buf_ptr, y_ptr, sorted_ids_ptr, lo1, lo2, rank, offs_r,
               stride_bsplit, stride_bs, stride_bm, stride_br, stride_ym, stride_yn,
               scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, NUM_SLICES, BLOCK_N, SPLIT_K, SK_P, CAST,
               HAS_SCALE, HAS_SHIFT)
        for n0 in range(col0 + BLOCK_N, col_end, BLOCK_N):
            b = tl.load(b_rows + (n0 + offs_nb)[:, None] * stride_bn,
                        mask=((n0 + offs_nb) < col_end)[:, None] & b_r_ok[None, :], other=0.0)
            _block(b, n0, col_end, start, end, buf_ptr, y_ptr, sorted_ids_ptr, lo1, lo2, rank, offs_r,
                   stride_bsplit, stride_bs, stride_bm, stride_br, stride_ym, stride_yn,
                   scale_ptr, shift_ptr, slot64, stride_sl, stride_sn, g_on, NUM_SLICES, BLOCK_N, SPLIT_K, SK_P, CAST,
                   HAS_SCALE, HAS_SHIFT)


# Columns per program at rank <= 16 (one B load: BLOCK_N x 16 elements) and warps; 4096 // BLOCK_R columns at
# higher ranks. sm_90 offline compile (registers, no spills): rank 16, 256 columns x 4 warps 86-96; 512 x 8
# warps 73-96; 128 x 4 warps 56-63; rank 64, 128 x 4 warps 255 (hence 64 columns there). Env for the probes.
EXPAND_BGMV_BLOCK_N = int(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_BLOCK_N", "512"))   # H200 00:53: 512 x 8 warps best
EXPAND_BGMV_WARPS = int(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_WARPS", "0"))   # 0: by the block size
EXPAND_BGMV_PPS = float(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_PPS", "4"))  # programs per SM (grid target)
EXPAND_BGMV_MAX_RANK = 32  # rank 64 compiled to 180-255 registers (sm_90 offline): the streaming expand there


def expand_bgmv_applies(num_slices: int, rank: int, split_k: int) -> bool:
    """Shapes this kernel takes: <= 3 slices, rank <= EXPAND_BGMV_MAX_RANK, <= 64 split-K partials."""
    return num_slices <= 3 and rank <= EXPAND_BGMV_MAX_RANK and split_k <= 64


def expand_bgmv_config(n_total: int, rank: int, grid_tiles: int, num_sms: int = 132) -> dict:
    """BLOCK_N (B block [BLOCK_N, BLOCK_R] per iteration: 16 KB at rank 16 and 512 columns), warps, and the
    columns per program: enough programs for EXPAND_BGMV_PPS per SM counting every grid tile active (as
    lora_expand_stream: the per-program metadata chain is paid once per run of blocks)."""
    block_r = max(16, 1 << max(0, (rank - 1).bit_length()))
    block_n = max(32, min(EXPAND_BGMV_BLOCK_N, 4096 // block_r if block_r > 16 else EXPAND_BGMV_BLOCK_N))
    block_n = min(block_n, max(32, 1 << max(0, (n_total - 1).bit_length())))
    while block_n > 64 and -(-n_total // block_n) * grid_tiles < 2 * num_sms:  # small steps: more, smaller loads
        block_n //= 2   # (1 token, o / down: 16 blocks of 256 would leave 116 SMs idle)
    warps = EXPAND_BGMV_WARPS or (4 if block_n * block_r <= 4096 else 8)
    n_blocks = -(-n_total // block_n)
    groups = max(1, min(n_blocks, round(EXPAND_BGMV_PPS * num_sms / max(1, grid_tiles))))
    per_prog = -(-n_blocks // groups)
    return dict(BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, COLS_PER_PROG=per_prog * block_n,
                groups=-(-n_blocks // per_prog))


def lora_expand_bgmv(partials: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor,
                     y: Tensor, *, config: dict | None = None, num_sms: int = 132, scale: Tensor | None = None,
                     shift: Tensor | None = None, scale_on: Tensor | None = None) -> Tensor:
    """y += the LoRA expand (module docstring). partials [SPLIT_K, S, T, R] float32 (from the shrink);
    lora_b [L, N, R] (y's dtype); slice_offsets [S+1] int32; ranks [L] int32; y [T, N] (row stride
    free). Arguments are checked by lora_expand, which calls this when EXPAND_BGMV is on."""
    SK, S, T, R = partials.shape
    N = lora_b.shape[1]
    cfg = dict(expand_bgmv_config(N, R, meta.grid_tiles, num_sms), **(config or {}))
    BN = cfg["BLOCK_N"]
    if config and ("BLOCK_N" in config or "COLS_PER_PROG" in config):  # keep the grid consistent
        cfg["COLS_PER_PROG"] = config.get("COLS_PER_PROG", BN)
        cfg["groups"] = -(-N // cfg["COLS_PER_PROG"])
    assert cfg["COLS_PER_PROG"] % BN == 0, "COLS_PER_PROG must be a multiple of BLOCK_N"
    from . import lora_meta

    gmajor = lora_meta.LORA_GROUP_MAJOR
    grid = (cfg["groups"], meta.grid_tiles) if gmajor else (meta.grid_tiles, cfg["groups"])
    pdl = pdl_launch(y.device)
    _lora_expand_bgmv_kernel[grid](
        partials, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        ranks if scale_on is None else scale_on,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        N, R, cfg["COLS_PER_PROG"], *partials.stride(), *lora_b.stride(), y.stride(0), y.stride(1),
        *((0, 0) if scale is None else scale.stride()),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SCALE_FLAG=scale is not None and scale_on is not None,
        NUM_SLICES=S, BLOCK_M=meta.block_m, BLOCK_N=BN, BLOCK_R=cfg["BLOCK_R"], SPLIT_K=SK,
        SK_P=max(1, 1 << max(0, (SK - 1).bit_length())), EVEN_R=R % 16 == 0,
        CAST=lora_b.dtype != torch.float32, TRIGGER=prefetch_on("t", y.device, pdl),
        GROUP_MAJOR=gmajor, num_warps=cfg["num_warps"], num_stages=1, **pdl,
    )
    return y
