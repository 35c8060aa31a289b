"""Dense multi-LoRA expand for wide projections at decode-size steps (issue 10, opt-in).

Semantics (as lora_expand, DoRA epilogue included), for every token t with slot a = slot(t) >= 0 and
rank r_a = min(ranks[a], R) > 0, and column n of slice s(n):
    y[t, n] = (y[t, n] + sum_{r < r_a} h[t, s(n), r] * lora_b[a, n, r]) (* scale[a, n] (+ shift[a, n]))
    h[t, s, :] = sum_j buf[j, s, t, :] (+ slot * stride_bl: the dense shrink's every-slot layout)
Rows of tokens without an adapter (or on a rank-0 slot) are not written.

One program owns BLOCK_N columns for ALL tokens (T <= BLOCK_M; a block straddling a slice boundary
runs once per slice, each with its columns masked) and walks the slots G at a time: per step it loads B
of G slots for its columns ([BLOCK_N, G, BLOCK_R], rank contiguous: vectorised loads staged through
cp.async by the pipelined slot loop, sm_90 offline compile; 8 warps, no spills) and multiplies it with
z [T, G * BLOCK_R]: each token's h placed in its own slot's columns, zero elsewhere, so one tl.dot sums
every token's own adapter. B of slots no token uses, and rank columns past each slot's rank, are
masked off (never read: no bytes moved, and whatever an unused slot holds cannot leak into y). y is
read and written once per program.

Why: the tiled streaming expand (lora_expand_stream) gives each (adapter tile, column group) its own
program: a metadata chain, then 4 KB blocks of one adapter's B for 1-2 valid rows; at 64 tokens / 32
adapters gate_up (29 MB of B) ran at ~2 TB/s (kernels/PERF_NOTES.md). Here a program streams up to
G * 4 KB per step with no metadata chain; the FLOPs of multiplying every token against every slot's
columns (2 * T * N * L * R: 1.9 GFLOP for gate_up at 64 tokens / 32 slots) stay under the bytes' time
only for T <= 64, hence the token bound (lora_apply.DENSE_EXPAND_*).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch

if HAS_TRITON:

    @triton.jit
    def _lora_expand_dense_kernel(
        buf_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr, token_slot_ptr,
        T, L, R,
        stride_bk, stride_bs, stride_bm, stride_br, stride_bl,
        stride_wl, stride_wn, stride_wr,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_R: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        n0 = pid * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_end = tl.load(slice_off_ptr + NUM_SLICES)
        n_ok = offs_n < n_end
        # each column's slice; a block inside one slice (the usual case) runs the slot loop once
        s_col = tl.zeros((BLOCK_N,), dtype=tl.int32)
        if NUM_SLICES >= 2:
            s_col += (offs_n >= tl.load(slice_off_ptr + 1)).to(tl.int32)
        if NUM_SLICES == 3:
            s_col += (offs_n >= tl.load(slice_off_ptr + 2)).to(tl.int32)
        s_lo = tl.min(tl.where(n_ok, s_col, NUM_SLICES), axis=0)
        s_hi = tl.max(tl.where(n_ok, s_col, -1), axis=0)
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        tslot = tl.load(token_slot_ptr + offs_m, mask=m_ok, other=-1)            # [BLOCK_M]
        trank = tl.minimum(tl.load(ranks_ptr + tslot, mask=tslot >= 0, other=0), R)
        row_ok = trank > 0                                                       # rows written
        offs_r = tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, GROUP * BLOCK_R)   # z / B columns of one step: slot l0 + c // BLOCK_R, rank c % BLOCK_R
        c_slot = offs_c // BLOCK_R
        h_mask = row_ok[:, None] & (offs_r[None, :] < trank[:, None])
        h_ptrs = (buf_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br
                  + tl.maximum(tslot, 0).to(tl.int64)[:, None] * stride_bl)
        # B of GROUP slots as [BLOCK_N, GROUP, BLOCK_R] (rank contiguous: vectorised, cp.async-staged loads),
        # rank masked in whole 16-wide chunks (a mask constant over the vector; the pool stores zeros past
        # a slot's rank within its last chunk, which meet h = 0), then flattened to [BLOCK_N, GROUP * BLOCK_R]
        offs_g = tl.arange(0, GROUP)
        b_rows = b_ptr + offs_n[:, None, None].to(tl.int64) * stride_wn + offs_r[None, None, :] * stride_wr
        r_chunk = offs_r // 16 * 16
        if USE_PDL:  # B, token slots and ranks are older than the kernel before us; its partials and y are not
            tl.extra.cuda.gdc_wait()

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(s_lo, s_hi + 1):
            col_ok = n_ok & (s_col == s)
            # h [BLOCK_M, BLOCK_R]: each token's intermediate of slice s, split-K partials in a fixed order
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if SPLIT_K * BLOCK_R <= 256:  # all partials' loads issued at once
                for j in tl.static_range(SPLIT_K):
                    h += tl.load(h_ptrs + s * stride_bs + j * stride_bk, mask=h_mask, other=0.0)
            else:  # a loop (same order): 16 [64, 64] partials at once spill (sm_90 offline compile)
                for j in range(SPLIT_K):
                    h += tl.load(h_ptrs + s * stride_bs + j * stride_bk, mask=h_mask, other=0.0)
            if CAST:  # rounded to B's dtype before the product, as the tiled kernels do
                h = h.to(b_ptr.dtype.element_ty)
            # h repeated for the GROUP slots of a step: hz[t, c] = h[t, c % BLOCK_R]
            hz = tl.reshape(tl.broadcast_to(h[:, None, :], (BLOCK_M, GROUP, BLOCK_R)), (BLOCK_M, GROUP * BLOCK_R))
            for l0 in range(0, L, GROUP):
                gslot = l0 + offs_g                                               # [GROUP]
                used = tl.max((tslot[:, None] == gslot[None, :]).to(tl.int32), axis=0) > 0  # a token of it here
                grank = tl.minimum(tl.load(ranks_ptr + gslot, mask=used, other=0), R)
                b_ok = used[:, None] & (r_chunk[None, :] < grank[:, None])        # [GROUP, BLOCK_R]
                if not EVEN_R:  # R not a multiple of 16: the last chunk would run into the next column's row
                    b_ok = b_ok & (offs_r < R)[None, :]
                b3 = tl.load(b_rows + gslot.to(tl.int64)[None, :, None] * stride_wl,
                             mask=col_ok[:, None, None] & b_ok[None, :, :], other=0.0)  # [BLOCK_N, GROUP, BLOCK_R]
                b = tl.reshape(b3, (BLOCK_N, GROUP * BLOCK_R))
                hit = tslot[:, None] == (l0 + c_slot)[None, :]                    # [BLOCK_M, GROUP * BLOCK_R]
                z = tl.where(hit, hz, tl.zeros_like(hz))
                if IEEE:
                    acc += tl.dot(z, tl.trans(b), input_precision="ieee")
                else:
                    acc += tl.dot(z, tl.trans(b))

        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        out_mask = row_ok[:, None] & n_ok[None, :]
        yv = tl.load(y_ptrs, mask=out_mask, other=0.0)
        out = yv.to(tl.float32) + acc
        if HAS_SCALE:  # DoRA: g of each row's slot for these columns
            sl = tl.maximum(tslot, 0).to(tl.int64)[:, None] * stride_sl + offs_n[None, :] * stride_sn
            out = out * tl.load(scale_ptr + sl, mask=out_mask, other=1.0)
            if HAS_SHIFT:
                out = out + tl.load(shift_ptr + sl, mask=out_mask, other=0.0)
        tl.store(y_ptrs, out.to(yv.dtype), mask=out_mask)


DENSE_EXPAND_BLOCK_N = 128
DENSE_EXPAND_GROUP = 4  # slots per step at rank 16 (4 x 4 KB of B at BLOCK_N 128); GROUP * 16 // BLOCK_R above
DENSE_EXPAND_NUM_WARPS = 8  # 4 warps: 255 registers and a 16-byte stack (sm_90 offline compile)


def dense_expand_config(n_total: int, num_sms: int = 132) -> dict:
    """128 columns x 4 slots a step (16 KB of B at rank 16) when that gives >= 1.5 programs per SM
    (gate_up: 224 programs); narrower projections 64 columns x 8 slots (qkv 96 programs, o / down 64):
    the grid is N / BLOCK_N programs, each streaming every used slot's B for its columns."""
    if n_total >= 1.5 * num_sms * DENSE_EXPAND_BLOCK_N:
        return dict(BLOCK_N=DENSE_EXPAND_BLOCK_N, GROUP=DENSE_EXPAND_GROUP, num_warps=DENSE_EXPAND_NUM_WARPS,
                    num_stages=4)
    return dict(BLOCK_N=64, GROUP=8, num_warps=DENSE_EXPAND_NUM_WARPS, num_stages=4)


def dense_expand_applies(num_tokens: int, num_slices: int, rank: int) -> bool:
    """The shapes this kernel takes: <= 64 tokens (one row block; FLOPs), <= 3 slices, ranks <= 64
    (a step's z / B tiles stay GROUP * 16 columns wide: fewer slots per step at larger ranks)."""
    return 1 <= num_tokens <= 64 and num_slices <= 3 and rank <= 64


def lora_expand_dense(partials: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor,
                      y: Tensor, *, slot_stride: int = 0, scale: Tensor | None = None, shift: Tensor | None = None,
                      config: dict | None = None) -> Tensor:
    """y [T, N] += the deltas (module docstring), in place; returns y.

    partials: [SPLIT_K, S, T, R] float32 (any strides; lora_shrink's partials, or the dense shrink's
    dense_partials view with slot_stride = S * R); lora_b [L, N, R] in y's dtype; slice_offsets [S+1]
    int32 on the device; meta: its token_slot; ranks [L] int32; scale, shift: DoRA's [L, N] float32 (as
    lora_expand). config overrides BLOCK_N / GROUP / num_warps / num_stages (benchmarks)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    SK, S, T, R = partials.shape
    L, N, R2 = lora_b.shape
    assert R2 == R and y.shape == (T, N) and y.dtype == lora_b.dtype and partials.dtype == torch.float32, \
        f"partials {tuple(partials.shape)} {partials.dtype}, lora_b {tuple(lora_b.shape)} {lora_b.dtype}, y {tuple(y.shape)}"
    assert slice_offsets.shape == (S + 1,) and meta.num_tokens == T and ranks.shape == (L,)
    assert dense_expand_applies(T, S, R), f"dense expand does not take T={T}, S={S}, R={R}"
    if T == 0 or N == 0:
        return y
    from .lora_shrink import _num_sms

    cfg = dict(dense_expand_config(N, _num_sms(y.device.index if y.is_cuda else None)), **(config or {}))
    block_r = max(16, 1 << max(0, (R - 1).bit_length()))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_expand_dense_kernel[grid](
        partials, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        meta.token_slot, T, L, R,
        *partials.stride(), slot_stride, *lora_b.stride(), y.stride(0), y.stride(1),
        *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BLOCK_M=64 if T > 32 else max(16, 1 << max(0, (T - 1).bit_length())),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r, GROUP=max(1, cfg["GROUP"] * 16 // block_r), SPLIT_K=SK,
        EVEN_R=R % 16 == 0,
        CAST=lora_b.dtype != torch.float32, IEEE=lora_b.dtype == torch.float32,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(y.device),
    )
    return y
