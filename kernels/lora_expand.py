"""Batched multi-LoRA expand (SGMV/BGMV "B" side) as one Triton launch for all slices.

Semantics, for every token t with slot a = token_slot[t] >= 0 and every slice s with output
columns [off_s, off_{s+1}) of y:
    y[t, off_s:off_{s+1}] += buf[s, t, :r_a] @ lora_b[a, off_s:off_{s+1}, :r_a].T
r_a = min(ranks[a], R). buf (fp32) is rounded to lora_b's dtype before the product (as
punica/vLLM do), the product accumulates in fp32, and y is updated as (y + acc) rounded to
y's dtype. Rows of tokens without an adapter (or with r_a = 0) are never touched.

DoRA epilogue (optional `scale` [L, N] fp32): y[t] = (y[t] + acc[t]) * scale[a], in fp32 and
rounded once. y holds x W^T on entry, so the base output is scaled too: the whole row becomes
g * (x W^T + s * x A^T B^T), DoRA's output for an adapter with factor g (dora.py in lora/).
Slots of plain LoRA adapters hold g = 1, which leaves their rows bit-identical. An optional
`shift` [L, N] is added after the scale: (1 - g) * bias for a projection with a bias, which
DoRA leaves unscaled (y holds x W^T + bias on entry there).

Work split: program (tile, column block). Column blocks run over the concatenated N of all
slices, so the grid needs no host knowledge of the slice widths (slice_offsets stays on the
device); a block that straddles a slice boundary loops over the (usually one) slices it
covers, masking B's rows to each slice. The rank loop stops at r_a in steps of BLOCK_K=16:
B's rank axis is contiguous, so only buf is masked at r_a (B columns in [r_a, ceil16(r_a))
are read but meet a zero), which keeps B's loads vectorised.

buf may also be the shrink's un-reduced split-K partials [SPLIT_K, S, T, R]: the kernel sums
them in a fixed order while loading (bitwise reproducible), which saves the separate
reduction launch between shrink and expand.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, stream_enabled

if HAS_TRITON:

    @triton.jit
    def _lora_expand_kernel(
        buf_ptr, b_ptr, y_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        N, R,
        stride_bsplit, stride_bs, stride_bm, stride_br,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, BOUNDS_P2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_R: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
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

        # Slices covered by columns [n0, min(n0 + BLOCK_N, N)): count interior boundaries.
        if NUM_SLICES == 1:
            s_first = 0
            s_last = 0
        else:
            bi = tl.arange(0, BOUNDS_P2)
            bounds = tl.load(slice_off_ptr + 1 + bi, mask=bi < NUM_SLICES - 1, other=2147483647)
            n_last = tl.minimum(n0 + BLOCK_N, N) - 1
            s_first = tl.sum((bounds <= n0).to(tl.int32), axis=0)
            s_last = tl.sum((bounds <= n_last).to(tl.int32), axis=0)

        b_base = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(s_first, s_last + 1):
            if NUM_SLICES == 1:
                col_ok = n_ok
            else:
                lo = tl.load(slice_off_ptr + s)
                hi = tl.load(slice_off_ptr + s + 1)
                col_ok = (offs_n >= lo) & (offs_n < hi)
            h_base = buf_ptr + s * stride_bs + tok[:, None] * stride_bm
            for k0 in range(0, rank, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                h_mask = row_ok[:, None] & (offs_k[None, :] < rank)
                h = tl.load(h_base + offs_k[None, :] * stride_br, mask=h_mask, other=0.0)
                for j in range(1, SPLIT_K):  # split-K partials, summed in a fixed order
                    h += tl.load(h_base + j * stride_bsplit + offs_k[None, :] * stride_br, mask=h_mask, other=0.0)
                if EVEN_R:
                    bt = tl.load(b_base + offs_k[None, :] * stride_bk, mask=col_ok[:, None], other=0.0)
                else:
                    bt = tl.load(b_base + offs_k[None, :] * stride_bk,
                                 mask=col_ok[:, None] & (offs_k[None, :] < R), other=0.0)
                if CAST:
                    h = h.to(bt.dtype)
                if IEEE:
                    acc += tl.dot(h, tl.trans(bt), input_precision="ieee")
                else:
                    acc += tl.dot(h, tl.trans(bt))

        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_ok = row_ok[:, None] & n_ok[None, :]
        yv = tl.load(y_ptrs, mask=y_ok, other=0.0)
        out = yv.to(tl.float32) + acc
        if HAS_SCALE:  # DoRA: g of this slot for these columns, one [BLOCK_N] load per program
            g = tl.load(scale_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn, mask=n_ok, other=1.0)
            out = out * g[None, :]
            if HAS_SHIFT:  # same layout as scale (asserted by the launcher)
                c = tl.load(shift_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn, mask=n_ok, other=0.0)
                out = out + c[None, :]
        tl.store(y_ptrs, out.to(yv.dtype), mask=y_ok)


_STREAM_FAILED: set[tuple] = set()  # (S, R, device) whose streaming kernel failed to compile
# The BGMV-style expand (lora_expand_bgmv.py: one wide B block per iteration, no tl.dot) for steps of
# <= EXPAND_BGMV_MAX_TOKENS tokens and projections of <= EXPAND_BGMV_MAX_SLICES slices (DoRA's epilogue included).
# On by default for single-slice projections (o, down): H200 probe 2026-12-01 00:53, 64 tokens / 32 adapters / r16,
# 512 columns x 8 warps, expand alone o 4.2 -> 3.0 us, down 4.9 -> 3.9 (pairs 7.05 -> 5.72, 12.37 -> 11.78), 1 token
# o 2.96 -> 2.64; but qkv 6.7 -> 7.7 and gate_up 15.7 -> 15.5 (3 / 2 slices: the stream kernel stays there).
# LORASERVE_LORA_EXPAND_BGMV=0: off; LORASERVE_LORA_EXPAND_BGMV_MAX_SLICES=3: every projection. Read at each call;
# a compile failure falls back to the streaming expand.
EXPAND_BGMV = os.environ.get("LORASERVE_LORA_EXPAND_BGMV", "1").strip().lower() not in ("", "0", "false", "off", "no")
EXPAND_BGMV_MAX_SLICES = int(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_MAX_SLICES", "1"))
EXPAND_BGMV_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_MAX_TOKENS", "64"))
EXPAND_BGMV_MIN_TOKENS = int(os.environ.get("LORASERVE_LORA_EXPAND_BGMV_MIN_TOKENS", "1"))
_BGMV_FAILED: set[tuple] = set()  # (S, R, device) whose BGMV expand failed to compile
_PIPE_FAILED: set[tuple] = set()  # (S, R, device) whose default column loop failed: the rotating one then


def _stream_ok(num_slices: int, rank: int, device: torch.device) -> bool:
    from .lora_expand_stream import stream_applies

    return stream_applies(num_slices, rank) and (num_slices, rank, device) not in _STREAM_FAILED


def _num_sms(device: torch.device) -> int:
    from .lora_shrink import _num_sms as sms

    return sms(device.index if device.type == "cuda" else None)


def expand_config(num_tokens: int, n_total: int, block_m: int = 16) -> dict:
    """Launch parameters: BLOCK_K=16 keeps mixed ranks cheap (see module docstring).

    32-128 tokens in 16-row tiles: 256 columns x 8 warps per program, measured on an H200
    at 64 tokens / 32 adapters / rank 16: qkv 19.2 -> 18.4 us, o 11.9 -> 10.2, gate_up
    37.7 -> 33.9, down 16.7 -> 14.9 (vs 128 x 4). Elsewhere 128 x 4 (an earlier sweep at
    block_m 64 found 8 warps slower; decode sizes not re-measured).
    """
    if n_total < 128:
        return dict(BLOCK_N=max(16, 1 << (n_total - 1).bit_length()), BLOCK_K=16, num_warps=4, num_stages=3)
    if block_m <= 16 and 32 <= num_tokens <= 128 and n_total >= 256:
        return dict(BLOCK_N=256, BLOCK_K=16, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=3)


def lora_expand(buf: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                ranks: Tensor, y: Tensor, *, config: dict | None = None,
                scale: Tensor | None = None, shift: Tensor | None = None,
                stream: bool | None = None, dense_slots: bool = False, scale_on: Tensor | None = None) -> Tensor:
    """y[t, off_s:off_s+1] += buf[s, t, :r] @ lora_b[slot(t), off_s:off_s+1, :r].T, one launch.

    buf:           [S, T, R] float32 from :func:`lora_shrink` (any strides), or its
                   un-reduced split-K partials [SPLIT_K, S, T, R] (summed here).
    lora_b:        [L, N, R] fp16/bf16/fp32, scale folded in; N = sum of slice widths.
    slice_offsets: [S+1] int32 on the device: 0 = off_0 <= off_1 <= ... <= off_S = N.
    meta, ranks:   as for lora_shrink.
    y:             [T, N] with y.dtype == lora_b.dtype; may be a column view of a wider
                   output (any row stride). Updated in place and returned; rows of tokens
                   without an adapter are untouched.
    config:        optional override of :func:`expand_config` (benchmarks).
    scale:         optional [L, N] float32, DoRA's factor g per slot and output column: adapted
                   rows become (y + delta) * g[slot] (see the module docstring).
    shift:         optional, with scale: [L, N] float32 with scale's strides, added after it.
    stream:        kernel variant; None: lora_meta.LORA_STREAM (env LORASERVE_LORA_STREAM,
                   on by default). True runs lora_expand_stream where it applies (<= 3 slices,
                   rank <= 128, fp16/bf16 on a GPU; config then overrides stream_expand_config), else this
                   module's classic kernel (config overrides expand_config).
    scale_on:      optional [L] int32 with scale: 0 where the slot's scale is all ones (plain LoRA), so the
                   streaming and BGMV expands skip its epilogue loads (one flag per program; any other
                   kernel applies g = 1, the same result).
    dense_slots:   buf is lora_shrink_dense.dense_partials (every token against every slot, [SPLIT_K,
                   S, T, R] at slot 0, slot stride S * R): the streaming kernel only.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    partials = buf if buf.dim() == 4 else buf.unsqueeze(0)
    SK, S, T, R = partials.shape
    L, N, R2 = lora_b.shape
    assert R2 == R, f"lora_b rank dim {R2} != buf rank dim {R}"
    assert buf.dtype == torch.float32, f"buf must be float32, got {buf.dtype}"
    assert y.shape == (T, N), f"y must be [T={T}, N={N}], got {tuple(y.shape)}"
    assert y.dtype == lora_b.dtype, f"y {y.dtype} and lora_b {lora_b.dtype} must match"
    assert slice_offsets.shape == (S + 1,) and slice_offsets.dtype == torch.int32, \
        f"slice_offsets must be int32 [S+1={S + 1}]"
    assert meta.num_tokens == T, f"meta built for {meta.num_tokens} tokens, buf has {T}"
    assert ranks.shape == (L,) and ranks.dtype == torch.int32, "ranks must be int32 [L]"
    if scale is not None:
        assert scale.shape == (L, N) and scale.dtype == torch.float32 and scale.device == y.device, \
            f"scale must be float32 [L={L}, N={N}] on y's device, got {scale.dtype} {tuple(scale.shape)}"
    if shift is not None:
        assert scale is not None and shift.shape == scale.shape and shift.stride() == scale.stride() \
            and shift.dtype == torch.float32 and shift.device == y.device, "shift must match scale (float32 [L, N])"
    if T == 0 or N == 0:
        return y
    assert meta.tile_slots.device == buf.device == lora_b.device == y.device == slice_offsets.device \
        == ranks.device, "buf, lora_b, y, slice_offsets, ranks and meta must be on one device"
    # fp32 on a GPU stays classic: its FMA dots spill registers in the streaming kernel (sm_90,
    # offline compile); the interpreter runs fp32 through it (the exact-arithmetic tests).
    if (EXPAND_BGMV and stream_enabled(stream) and not dense_slots and config is None
            and EXPAND_BGMV_MIN_TOKENS <= T <= EXPAND_BGMV_MAX_TOKENS and S <= EXPAND_BGMV_MAX_SLICES
            and (S, R, y.device) not in _BGMV_FAILED):
        from .lora_expand_bgmv import expand_bgmv_applies, lora_expand_bgmv

        if expand_bgmv_applies(S, R, SK):
            try:
                return lora_expand_bgmv(partials, lora_b, slice_offsets, meta, ranks, y, num_sms=_num_sms(y.device),
                                        scale=scale, shift=shift, scale_on=scale_on)
            except Exception as exc:  # noqa: BLE001 - compile/resources failure: the streaming expand instead
                if not y.is_cuda:
                    raise
                _BGMV_FAILED.add((S, R, y.device))
                warnings.warn(f"BGMV LoRA expand failed for S={S}, R={R} ({exc!r}); using the streaming expand")
    if stream_enabled(stream) and _stream_ok(S, R, y.device) and not (y.is_cuda and y.dtype == torch.float32):
        from .lora_expand_stream import lora_expand_stream, rotating_loop_config

        key = (S, R, y.device)
        try:
            return lora_expand_stream(partials, lora_b, slice_offsets, meta, ranks, y,
                                      config=rotating_loop_config(meta.block_m, R, S)
                                      if key in _PIPE_FAILED and not config else config,
                                      scale=scale, shift=shift, num_sms=_num_sms(y.device),
                                      dense_slots=dense_slots, scale_on=scale_on)
        except Exception as exc:  # noqa: BLE001 - compile/resources failure: classic kernel instead
            if not y.is_cuda or config:  # interpreter bugs and explicit configs must surface
                raise
            if key not in _PIPE_FAILED:  # first the hand-rotated column loop (timed on the H200), then classic
                _PIPE_FAILED.add(key)
                warnings.warn(f"streaming LoRA expand (default column loop) failed for S={S}, R={R} ({exc!r}); "
                              "using the hand-rotated loop")
                return lora_expand(buf, lora_b, slice_offsets, meta, ranks, y, scale=scale, shift=shift,
                                   stream=stream, dense_slots=dense_slots, scale_on=scale_on)
            _STREAM_FAILED.add(key)
            warnings.warn(f"streaming LoRA expand failed for S={S}, R={R} ({exc!r}); using the classic kernel")
            config = None
    if dense_slots:
        raise RuntimeError(f"dense-shrink partials need the streaming expand (S={S}, R={R}, {y.dtype} on {y.device})")
    cfg = dict(expand_config(T, N, meta.block_m), **(config or {}))
    BN, BK = cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (meta.grid_tiles, triton.cdiv(N, BN))
    _lora_expand_kernel[grid](
        partials, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        N, R,
        *partials.stride(), *lora_b.stride(), y.stride(0), y.stride(1),
        *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BOUNDS_P2=max(2, 1 << max(0, (S - 2).bit_length())),
        BLOCK_M=meta.block_m, BLOCK_N=BN, BLOCK_K=BK,
        EVEN_R=R % BK == 0, CAST=lora_b.dtype != torch.float32, IEEE=lora_b.dtype == torch.float32,
        SPLIT_K=SK, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
