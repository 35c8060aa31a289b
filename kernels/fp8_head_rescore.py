"""The FP8 LM head's top-k rescoring in two launches (models/fp8_head.py Fp8Head, decode steps of 1-4 rows).

    Semantics, row r of logits [M, V] (V = NCHUNK x CHUNK):
        logits[r] = (sum over the splits of ws[:, r]) * w_scale, rounded to the dtype        (the GEMV's split-K sum)
        c = the K chunks (CHUNK ids each) with the largest maxima of logits[r]; t(c) = each chunk's argmax id
        logits[r, t(c)] = dot(exact[t(c)], x[r]) in fp32, rounded to the dtype              (the bf16 head's logit)
    ws [SPLIT, M, V] fp32 (fp8_gemv(..., defer_sum=True)); w_scale [V] fp32; exact [V, H] bf16/fp16 (the bf16 head or
    tied embedding); x [M, H]; best / arg [M, NCHUNK] scratch (fp32 chunk maxima, int32 their ids).

Why: Fp8Head._candidates + gather + bmm + scatter are ~9 small torch launches after the GEMV (33 us of a 169 us head
on the H200, 20:30 probe). Here the split-K sum, which reads every logit anyway, also writes each 128-id chunk's
maximum and argmax, and one launch of K programs per row picks the K best chunks (K passes over ~1000 maxima) and
recomputes one logit each from the bf16 row. Same candidates as _candidates (the chunk argmaxes of the K best chunks);
the rescored logits are fp32 dot products rounded once (torch.bmm's may differ in the last bit).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def _splitk_sum_chunkmax_kernel(ws_ptr, s_ptr, y_ptr, best_ptr, arg_ptr, M, N, SPLITS, NCHUNK, stride_ym,
                                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # _splitk_sum_kernel's sum (split order, then * s, one rounding), plus the max / argmax of each CHUNK ids
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLITS):
            acc += tl.load(ws_ptr + (split * M + row) * N + offs, mask=ok, other=0.0)
        y = (acc * tl.load(s_ptr + offs, mask=ok, other=0.0)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_ym + offs, y, mask=ok)
        yf = tl.reshape(tl.where(ok, y.to(tl.float32), float("-inf")), (BLOCK // CHUNK, CHUNK))
        cmax = tl.max(yf, axis=1)                                                      # [BLOCK / CHUNK]
        carg = tl.argmax(yf, axis=1).to(tl.int32)
        chunk = tl.program_id(1) * (BLOCK // CHUNK) + tl.arange(0, BLOCK // CHUNK)
        cok = chunk < NCHUNK
        tl.store(best_ptr + row * NCHUNK + chunk, cmax, mask=cok)
        tl.store(arg_ptr + row * NCHUNK + chunk, chunk * CHUNK + carg, mask=cok)

    @triton.jit
    def _head_rescore_kernel(y_ptr, best_ptr, arg_ptr, x_ptr, e_ptr, NCHUNK, V, H, stride_ym, stride_xm, stride_e,
                             K: tl.constexpr, NCHUNK_P2: tl.constexpr, BLOCK_H: tl.constexpr):
        # program (row, k): the k-th best chunk of the row (K passes of max-and-remove), its argmax id's logit from
        # the exact row in fp32
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        idx = tl.arange(0, NCHUNK_P2)
        b = tl.load(best_ptr + row * NCHUNK + idx, mask=idx < NCHUNK, other=float("-inf"))
        chosen = 0
        for j in tl.static_range(K):
            pos = tl.argmax(b, axis=0)
            chosen = tl.where(k == j, pos, chosen)
            b = tl.where(idx == pos, float("-inf"), b)
        chosen = tl.minimum(chosen, NCHUNK - 1)   # (NaN logits could leave the argmax in the padding)
        tok = tl.minimum(tl.maximum(tl.load(arg_ptr + row * NCHUNK + chosen).to(tl.int64), 0), V - 1)
        offs = tl.arange(0, BLOCK_H)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            ok = (h0 + offs) < H
            w = tl.load(e_ptr + tok * stride_e + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            acc += w * tl.load(x_ptr + row * stride_xm + h0 + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + tok, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty))


def head_rescore_ok(ws: Tensor, chunk: int, k: int) -> bool:
    """Whether ws (fp8_gemv's deferred result) is split-K partials this path takes: [SPLIT, M, V] with V a multiple of
    `chunk` and at least 4 k chunks (as Fp8Head._candidates's fast form)."""
    return ws.dim() == 3 and ws.dtype == torch.float32 and ws.shape[2] % chunk == 0 and ws.shape[2] // chunk >= 4 * k


def fp8_head_rescored(ws: Tensor, w_scale: Tensor, x: Tensor, exact: Tensor, k: int, chunk: int = 128) -> Tensor:
    """logits [M, V] in x's dtype: the split-K sum of ws with each row's k best chunk argmaxes recomputed from `exact`
    (module docstring). Two launches, no host sync (graph-safe)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    splits, M, V = ws.shape
    H = x.shape[1]
    assert head_rescore_ok(ws, chunk, k) and ws.is_contiguous() and w_scale.shape == (V,)
    assert exact.shape == (V, H) and exact.stride(-1) == 1 and x.stride(-1) == 1 and x.shape[0] == M
    nchunk = V // chunk
    y = torch.empty((M, V), dtype=x.dtype, device=x.device)
    best = torch.empty((M, nchunk), dtype=torch.float32, device=x.device)
    arg = torch.empty((M, nchunk), dtype=torch.int32, device=x.device)
    if M == 0:
        return y
    block = max(chunk, min(1024, triton.next_power_of_2(V)))
    _splitk_sum_chunkmax_kernel[(M, triton.cdiv(V, block))](ws, w_scale, y, best, arg, M, V, splits, nchunk, y.stride(0),
                                                            BLOCK=block, CHUNK=chunk, num_warps=4)
    _head_rescore_kernel[(M, k)](y, best, arg, x, exact, nchunk, V, H, y.stride(0), x.stride(0), exact.stride(0), K=k,
                                 NCHUNK_P2=triton.next_power_of_2(nchunk), BLOCK_H=min(1024, triton.next_power_of_2(H)),
                                 num_warps=4)
    return y
