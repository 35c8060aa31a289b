"""Decode attention over a paged KV cache (one query token per sequence), Triton.

Semantics, for sequence b, query head h, its KV head k = h // G (G = H / KVH):
    L = context_lens[b];  key j lives in block block_tables[b, j // BS] at offset j % BS
    out[b, h] = softmax_j(q[b, h] . K[j, k] * scale) @ V[j, k]        j < L
q: [B, H, D]; k_cache, v_cache: [num_blocks, BS, KVH, D]; block_tables: [B, max_blocks] int;
context_lens: [B] int; out: [B, H, D]. An FP8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale
with per-tensor scales read from device memory, as in unified_attention.py.

One program per (sequence, KV head, split) computes all G query heads of the group against
each KV block once (the GQA reuse), with an online softmax in fp32. The loop bound is read
from context_lens on the device, and the grid depends only on B, KVH and the split count
(itself chosen from B, KVH and the block table's width), so the op can be captured in a CUDA
graph and replayed for any context lengths.

Split-KV (flash-decoding): B x KVH programs leave most of the GPU idle at small batch (8 of
132 SMs for one Llama-3-8B sequence), so each sequence's blocks are cut into NUM_SPLITS
contiguous ranges whose unnormalised partials are merged by unified_attention's merge kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .unified_attention import (FP8_KV_DTYPE, LOG2E, check_kv_dtype, choose_num_splits, kv_scale_tensor,
                                merge_attention_splits)

if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                             k_scale_ptr, v_scale_ptr, scale_log2, num_tokens,
                             stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, stride_tb, stride_ob, stride_oh,
                             H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr,
                             D: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             FP8_KV: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BS)
        g_mask = offs_g < G
        heads = kvh * G + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)                                   # (G_PAD, D)
        length = tl.load(lens_ptr + b).to(tl.int32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        num_blocks = tl.cdiv(length, BS)
        if FP8_KV:  # e4m3 codes: k_scale folded into the score scale, v_scale into acc below
            scale_log2 = scale_log2 * tl.load(k_scale_ptr).to(tl.float32)
        if NUM_SPLITS == 1:
            j_lo = 0
            j_hi = num_blocks
        else:
            per_split = tl.cdiv(num_blocks, NUM_SPLITS)
            j_lo = split * per_split
            j_hi = tl.minimum(j_lo + per_split, num_blocks)
        for j in range(j_lo, j_hi):
            block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
            pos = j * BS + offs_n
            valid = pos < length
            k = tl.load(k_ptr + block * stride_kb + offs_n[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)                               # (BS, D)
            if FP8_KV:
                k = k.to(q.dtype)  # exact widening of the e4m3 codes
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scale_log2                    # (G_PAD, BS)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + block * stride_vb + offs_n[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)                               # (BS, D)
            if FP8_KV:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
            m_i = m_new
        if FP8_KV:
            acc = acc * tl.load(v_scale_ptr).to(tl.float32)
        if NUM_SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            # an empty split (j_lo >= j_hi) stores m = -inf, l = 0, acc = 0: weight 0 in the merge
            row = (split * num_tokens + b).to(tl.int64) * H + heads                  # (G_PAD,)
            tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])
            tl.store(part_ml_ptr + row, m_i, mask=g_mask)
            tl.store(part_ml_ptr + NUM_SPLITS * num_tokens * H + row, l_i, mask=g_mask)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, out: Tensor | None = None,
                           num_splits: int | None = None, max_seq_len: int | None = None,
                           k_scale: Tensor | float | None = None, v_scale: Tensor | float | None = None) -> Tensor:
    """See the module docstring. Every context length must be >= 1. k_scale, v_scale: the scales of an
    FP8 cache ([1] fp32 on q's device; floats outside graphs), ignored for a cache in q's dtype.

    num_splits: None picks from B, KVH and max_seq_len (default: the block table's width x BS,
    a static bound, so the choice is the same at graph capture and replay)."""
    B, H, D = q.shape
    _, BS, KVH, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % KVH == 0, f"{H} query heads not a multiple of {KVH} KV heads"
    assert D & (D - 1) == 0 and D >= 16, f"head_dim {D} must be a power of two >= 16"
    assert BS >= 16 and BS & (BS - 1) == 0, f"block size {BS} must be a power of two >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride()
    fp8_kv = check_kv_dtype(q, k_cache, v_cache)
    if fp8_kv:
        k_scale, v_scale = kv_scale_tensor(k_scale, "k_scale", q.device), kv_scale_tensor(v_scale, "v_scale", q.device)
    else:
        k_scale = v_scale = q  # unused pointers
    assert block_tables.shape[0] >= B and context_lens.shape[0] >= B
    G = H // KVH
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * BS
        num_splits = choose_num_splits(B * KVH, -(-bound // BS), q.device)
    out = torch.empty_like(q) if out is None else out
    if num_splits > 1:
        part_acc = torch.empty(num_splits, B, H, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2, num_splits, B, H, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _paged_decode_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml, k_scale, v_scale, scale * LOG2E, B,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        H=H, G=G, G_PAD=max(16, triton.next_power_of_2(G)), BS=BS, D=D, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8_KV=fp8_kv)
    if num_splits > 1:
        merge_attention_splits(part_acc, part_ml, out)
    return out


def paged_decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, scale: float, k_scale: Tensor | float | None = None,
                               v_scale: Tensor | float | None = None) -> Tensor:
    """Obviously-right version: gather each sequence's keys, softmax in fp32 (an FP8 cache dequantized first)."""
    if k_cache.dtype == FP8_KV_DTYPE:
        k_cache, v_cache = k_cache.float() * float(k_scale), v_cache.float() * float(v_scale)
    B, H, D = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        L = int(context_lens[b])
        blocks = block_tables[b, : (L + BS - 1) // BS].long()
        k = k_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(H // KVH, dim=1)  # (L, H, D)
        v = v_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v).to(q.dtype)
    return out
