"""Per-block pieces of the streaming multi-LoRA expand (lora_expand_stream.py), as Triton device functions.

Split out of lora_expand_stream.py (files under ~500 lines).
  _load_parts:    [SK_CHUNK, BLOCK_M, BLOCK_R] fp32 split-K partials of one slice (0 where masked);
  _expand_block:  y[rows, n0:n0+BLOCK_N] = y + h @ b.T (each column its own slice's h), DoRA epilogue, store;
  _block_acc_one: the product with one dot (the block's slice's h; per column only where a block straddles a bound);
  _store_block:   y + acc, DoRA epilogue, store (_expand_block's second half).
b: [BLOCK_N, BLOCK_R] B block (rows = output columns); h0..h2: [BLOCK_M, BLOCK_R] in B's dtype; yv: [BLOCK_M, BLOCK_N].
"""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _load_parts(buf_ptr, s, j0, tok, h_mask, offs_r, stride_bsplit, stride_bs, stride_bm, stride_br,
                    SPLIT_K: tl.constexpr, SK_CHUNK: tl.constexpr):
        """[SK_CHUNK, BLOCK_M, BLOCK_R] fp32: partials j0 .. j0 + SK_CHUNK of slice s (0 where masked)."""
        jj = j0 + tl.arange(0, SK_CHUNK)
        ptrs = (buf_ptr + s * stride_bs + jj[:, None, None] * stride_bsplit + tok[None, :, None] * stride_bm
                + offs_r[None, None, :] * stride_br)
        return tl.load(ptrs, mask=(jj < SPLIT_K)[:, None, None] & h_mask[None, :, :], other=0.0)

    @triton.jit
    def _expand_block(b, yv, n0, h0, h1, h2, lo1, lo2, y_rows, offs_nb, col_end, row_ok, scale_ptr, shift_ptr,
                      slot64, stride_yn, stride_sl, stride_sn, NUM_SLICES: tl.constexpr, IEEE: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, g_on=1):
        """y[rows, n0:n0+BLOCK_N] = yv + h @ b.T (per column, the column's slice), DoRA epilogue, store."""
        offs_n = n0 + offs_nb
        n_ok = offs_n < col_end
        btt = tl.trans(b)
        if IEEE:
            acc = tl.dot(h0, btt, input_precision="ieee")
        else:
            acc = tl.dot(h0, btt)
        if NUM_SLICES >= 2:
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
        out = yv.to(tl.float32) + acc
        if HAS_SCALE:
            if g_on != 0:  # (a DoRA slot: scale_on; plain LoRA slots skip g's loads, a per-program branch)
                g = tl.load(scale_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=1.0)
                out = out * g[None, :]
                if HAS_SHIFT:
                    c = tl.load(shift_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=0.0)
                    out = out + c[None, :]
        tl.store(y_rows + offs_n[None, :] * stride_yn, out.to(yv.dtype), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _block_acc_one(b, n0, h0, h1, h2, lo1, lo2, offs_nb, NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr):
        """[BLOCK_M, BLOCK_N] fp32 = h @ b.T with one dot, the h of the block's first column's slice (a scalar
        select); a block straddling a slice bound (rare: Llama widths are multiples of 128) redoes it per column."""
        btt = tl.trans(b)
        hs = tl.where(n0 >= lo2, h2, tl.where(n0 >= lo1, h1, h0))
        if IEEE:
            acc = tl.dot(hs, btt, input_precision="ieee")
        else:
            acc = tl.dot(hs, btt)
        straddle = ((n0 < lo1) & (n0 + BLOCK_N > lo1)) | ((n0 < lo2) & (n0 + BLOCK_N > lo2))
        if straddle:
            offs_n = n0 + offs_nb
            if IEEE:
                acc = tl.dot(h0, btt, input_precision="ieee")
                d1 = tl.dot(h1, btt, input_precision="ieee")
            else:
                acc = tl.dot(h0, btt)
                d1 = tl.dot(h1, btt)
            acc = tl.where(offs_n[None, :] >= lo1, d1, acc)
            if NUM_SLICES == 3:
                if IEEE:
                    d2 = tl.dot(h2, btt, input_precision="ieee")
                else:
                    d2 = tl.dot(h2, btt)
                acc = tl.where(offs_n[None, :] >= lo2, d2, acc)
        return acc

    @triton.jit
    def _store_block(acc, yv, n0, y_rows, offs_nb, col_end, row_ok, scale_ptr, shift_ptr, slot64, stride_yn,
                     stride_sl, stride_sn, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, g_on=1):
        """y[rows, n0:n0+BLOCK_N] = yv + acc, DoRA epilogue, store (_expand_block's second half)."""
        offs_n = n0 + offs_nb
        n_ok = offs_n < col_end
        out = yv.to(tl.float32) + acc
        if HAS_SCALE:
            if g_on != 0:
                g = tl.load(scale_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=1.0)
                out = out * g[None, :]
                if HAS_SHIFT:
                    c = tl.load(shift_ptr + slot64 * stride_sl + offs_n * stride_sn, mask=n_ok, other=0.0)
                    out = out + c[None, :]
        tl.store(y_rows + offs_n[None, :] * stride_yn, out.to(yv.dtype), mask=row_ok[:, None] & n_ok[None, :])
