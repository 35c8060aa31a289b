"""Add a LoRA delta computed elsewhere into the base output, with DoRA's epilogue, in one launch.

Semantics, for every token t with slot a = token_slot[t] >= 0 and ranks[a] > 0:
    y[t] = (y[t] + d[t]) * scale[a] + shift[a]     (fp32, rounded once to y's dtype)
scale / shift optional ([L, N] float32; absent: 1 / 0). Rows of other tokens are never touched.

Why: lora/batch.py can compute the whole LoRA delta d = (x A^T) B^T on a side stream while the
base GEMM y = x W^T runs (LORASERVE_LORA_OVERLAP=full); this kernel joins the two after both are
done. d is in y's dtype (the expand kernels write their operand's dtype), so the delta is rounded
once more than on the sequential path (within bf16 tolerance of it, not bit-identical).

Work split: program (token, column block of BLOCK_N); a token without an adapter exits after one load.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta

if HAS_TRITON:

    @triton.jit
    def _lora_add_kernel(
        y_ptr, d_ptr, scale_ptr, shift_ptr, token_slot_ptr, ranks_ptr,
        N, stride_ym, stride_yn, stride_dm, stride_dn, stride_sl, stride_sn,
        BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(token_slot_ptr + t)
        if slot < 0:
            return
        if tl.load(ranks_ptr + slot) <= 0:
            return
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < N
        yv = tl.load(y_ptr + t * stride_ym + offs * stride_yn, mask=ok, other=0.0)
        dv = tl.load(d_ptr + t * stride_dm + offs * stride_dn, mask=ok, other=0.0)
        out = yv.to(tl.float32) + dv.to(tl.float32)
        if HAS_SCALE:
            slot64 = slot.to(tl.int64)
            out = out * tl.load(scale_ptr + slot64 * stride_sl + offs * stride_sn, mask=ok, other=1.0)
            if HAS_SHIFT:
                out = out + tl.load(shift_ptr + slot64 * stride_sl + offs * stride_sn, mask=ok, other=0.0)
        tl.store(y_ptr + t * stride_ym + offs * stride_yn, out.to(yv.dtype), mask=ok)


def lora_add_ref(y: Tensor, d: Tensor, meta: LoRAMeta, ranks: Tensor, scale: Tensor | None = None,
                 shift: Tensor | None = None) -> Tensor:
    """Pure-torch reference of :func:`lora_add` (device ops only)."""
    slot = meta.token_slot[: y.shape[0]].long()                              # (T,)
    idx = slot.clamp(min=0)
    adapted = (slot >= 0) & (ranks.index_select(0, idx) > 0)                 # (T,)
    out = y.float() + d.float()                                              # (T, N)
    if scale is not None:
        out = out * scale.index_select(0, idx)
        if shift is not None:
            out = out + shift.index_select(0, idx)
    y.copy_(torch.where(adapted[:, None], out.to(y.dtype), y))
    return y


def lora_add(y: Tensor, d: Tensor, meta: LoRAMeta, ranks: Tensor, scale: Tensor | None = None,
             shift: Tensor | None = None, *, block_n: int = 1024) -> Tensor:
    """y[t] = (y[t] + d[t]) * scale[slot(t)] + shift[slot(t)] for adapted tokens, in place; returns y.

    y, d: [T, N], one dtype (column views allowed); meta for T tokens; ranks [L] int32;
    scale, shift: optional float32 [L, N] (shift only with scale, same strides).
    """
    T, N = y.shape
    assert d.shape == (T, N) and d.dtype == y.dtype, f"d must be {y.dtype} [{T}, {N}], got {d.dtype} {tuple(d.shape)}"
    assert meta.num_tokens == T, f"meta built for {meta.num_tokens} tokens, y has {T}"
    assert ranks.dtype == torch.int32 and ranks.dim() == 1, "ranks must be int32 [L]"
    if scale is not None:
        assert scale.shape == (ranks.shape[0], N) and scale.dtype == torch.float32, "scale must be float32 [L, N]"
    if shift is not None:
        assert scale is not None and shift.shape == scale.shape and shift.stride() == scale.stride() \
            and shift.dtype == torch.float32, "shift must match scale (float32 [L, N])"
    if T == 0 or N == 0:
        return y
    if not HAS_TRITON:
        return lora_add_ref(y, d, meta, ranks, scale, shift)
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    grid = (T, triton.cdiv(N, block_n))
    _lora_add_kernel[grid](
        y, d, y if scale is None else scale, y if shift is None else shift, meta.token_slot, ranks,
        N, y.stride(0), y.stride(1), d.stride(0), d.stride(1), *((0, 0) if scale is None else scale.stride()),
        BLOCK_N=block_n, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        num_warps=4 if block_n <= 1024 else 8,
    )
    return y
