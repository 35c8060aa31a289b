"""The torch reference of kernels/unified_attention.py: per sequence, gather its keys, causal mask, softmax in fp32.
It is the CPU path's test oracle for the Triton kernel (fp32 and bf16 tolerances, FP8 caches dequantized first)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_KV_DTYPE = torch.float8_e4m3fn


def unified_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                          query_start_loc: Tensor, scale: float, k_scale: Tensor | float | None = None,
                          v_scale: Tensor | float | None = None) -> Tensor:
    """Obviously-right version: per sequence, gather its keys, causal mask, softmax in fp32.
    An FP8 cache is dequantized first (codes x scale in fp32)."""
    if k_cache.dtype == FP8_KV_DTYPE:
        k_cache = k_cache.float() * float(k_scale)
        v_cache = v_cache.float() * float(v_scale)
    N, H, D = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        s0, s1 = qsl[b], qsl[b + 1]
        blocks = block_tables[b, : math.ceil(L / BS)].long()
        k = k_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(H // KVH, dim=1)  # (L, H, D)
        v = v_cache[blocks].flatten(0, 1)[:L].float().repeat_interleave(H // KVH, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[s0:s1].float(), k) * scale             # (H, Q, L)
        q_pos = torch.arange(L - (s1 - s0), L)
        visible = torch.arange(L)[None, :] <= q_pos[:, None]                          # (Q, L)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[s0:s1] = torch.einsum("hql,lhd->qhd", torch.softmax(scores, -1), v).to(q.dtype)
    return out
