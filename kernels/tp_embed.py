"""Vocabulary-parallel embedding lookup in one launch (tensor parallelism; Megatron-LM's VocabParallelEmbedding).

    Semantics: out[t] = weight[ids[t] - vocab_start] if vocab_start <= ids[t] < vocab_start + rows else 0
    ids: [N] int64 (or int32); weight: [rows, H] (this rank's shard of the table); out: [N, H] weight's dtype.
The all-reduce that follows (tp/parallel.py) sums the ranks' outputs into the full embeddings (exact: one
rank holds each row, the others add zeros).

Why: the torch form is six launches (shift, two compares, or, masked index, masked fill) around the lookup;
inside a batch-1 decode graph each costs ~2 us, as much as the lookup of one 8 KB row itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton


def vocab_parallel_embed_ref(ids: Tensor, weight: Tensor, vocab_start: int) -> Tensor:
    local = ids - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill_(outside[:, None], 0)


if HAS_TRITON:

    @triton.jit
    def _vocab_parallel_embed_kernel(ids_ptr, w_ptr, out_ptr, vocab_start, rows, H, stride_w, stride_o,
                                     BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        # the row as a [BLOCK] vector (a scalar predicate in the mask: the interpreter refuses it)
        local = tl.load(ids_ptr + t).to(tl.int64) - vocab_start + tl.zeros([BLOCK], tl.int64)
        mine = (local >= 0) & (local < rows)
        safe = tl.where(mine, local, 0)
        v = tl.load(w_ptr + safe * stride_w + cols, mask=ok & mine, other=0.0)
        tl.store(out_ptr + t * stride_o + cols, v, mask=ok)


def vocab_parallel_embed(ids: Tensor, weight: Tensor, vocab_start: int, out: Tensor | None = None) -> Tensor:
    """out [N, H] (module doc); one launch, no host sync (CUDA-graph capturable)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use vocab_parallel_embed_ref")
    assert ids.dim() == 1 and ids.stride(0) == 1 and weight.dim() == 2 and weight.stride(1) == 1, (ids.shape, weight.shape)
    N, H = ids.shape[0], weight.shape[1]
    if out is None:
        out = torch.empty(N, H, dtype=weight.dtype, device=weight.device)
    assert out.shape == (N, H) and out.stride(1) == 1 and out.dtype == weight.dtype
    if N == 0:
        return out
    block = min(2048, triton.next_power_of_2(H))
    _vocab_parallel_embed_kernel[(N, triton.cdiv(H, block))](ids, weight, out, vocab_start, weight.shape[0], H,
                                                            weight.stride(0), out.stride(0), BLOCK=block,
                                                            num_warps=4)
    return out
