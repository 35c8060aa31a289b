"""Persistent W8A8 skinny GEMM for 33..64-token decode steps (kind "dot8p" of kernels/fp8_gemv.py; issue 14).

    Semantics: y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n]     (fp32 accumulate)
    x_q: [M, K] e4m3 (per-token codes), x_scale: [M] fp32, 1 <= M <= BLOCK_M; w_q: [N, K] e4m3, w_scale: [N] fp32
    split-K > 1: partials [SPLIT, M, N] fp32 = the split's sum * x_scale (unsummed, as dot8's: the consumer adds them
    in split order and multiplies by w_scale: fp8_gemv's _splitk_sum_kernel, or the next norm when deferred)

Why: dot8 (kernels/fp8_skinny_dot.py) launches one program per (N tile, K split); at the narrow 8B shapes (N 4096 /
6144, 32-96 tiles of 64-128 weight rows) a program streams only 64-230 KB of weights, so every program's pipeline
fill (its first tiles' HBM round trip) and drain is a large part of its life, and split-K (for enough programs) adds
partials. Here a fixed grid (about one program per SM) walks the (tile, split) units u = pid, pid + G, ... and the
K loop nested in that walk is flattened (tl.range(flatten=True), Triton's persistent-matmul form), so the software
pipeline keeps loading the next unit's first tiles while the current unit finishes: one fill per program, not per
unit. Each unit's K loop is exactly dot8's (same tiles, same order, fp32 promotion every K tile:
max_num_imprecise_acc = BLOCK_K), so its partials equal dot8's at the same (BLOCK_N, BLOCK_K, SPLIT) bit for bit.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton


def stream_programs_per_sm() -> int:
    """LORASERVE_FP8_STREAM_PPS: persistent programs per SM (default 1; 2 keeps two pipelines per SM)."""
    try:
        return max(1, int(os.environ.get("LORASERVE_FP8_STREAM_PPS", "1")))
    except ValueError:
        raise ValueError("LORASERVE_FP8_STREAM_PPS must be a positive integer") from None


def stream_flatten_on() -> bool:
    """LORASERVE_FP8_STREAM_FLATTEN=0: the nested K loop not flattened (a pipeline fill per unit, for comparison)."""
    return os.environ.get("LORASERVE_FP8_STREAM_FLATTEN", "1").strip() != "0"


if HAS_TRITON:
    from .fp8_skinny_dot import _prefetch_rows_l2

    @triton.jit(do_not_specialize=["M", "NUM_TILES", "NUM_UNITS"])
    def _fp8_stream_dot_kernel(xq_ptr, w_ptr, xs_ptr, s_ptr, y_ptr, ws_ptr, M, N, K, K_PER_SPLIT, NUM_TILES,
                               NUM_UNITS, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, USE_WS: tl.constexpr, FLATTEN: tl.constexpr,
                               WAIT: tl.constexpr = False):
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        if WAIT:   # launched as a programmatic dependent: x and its scales are the kernel before us's output
            # (the first unit's first two weight tiles into L2 meanwhile: no kernel of the step writes weights)
            first = pid % NUM_TILES * BLOCK_N + tl.arange(0, BLOCK_N)
            _prefetch_rows_l2(w_ptr, tl.where(first < N, first, 0).to(tl.int64), K, pid // NUM_TILES * K_PER_SPLIT,
                              pid // NUM_TILES * K_PER_SPLIT + tl.minimum(2 * BLOCK_K, K_PER_SPLIT), BLOCK_K // 128)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)                                       # [BM]
        # units in tile-fastest order: the G programs' first units cover distinct weight rows of split 0
        for u in tl.range(pid, NUM_UNITS, G, flatten=FLATTEN):
            tile = u % NUM_TILES
            split = u // NUM_TILES
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)   # rows past N re-read row 0: no N mask in the loop
            k_start = split * K_PER_SPLIT
            w_ptrs = w_ptr + safe_n[:, None] * K + (k_start + offs_k)[None, :]                        # [BN, BK]
            xt_ptrs = xq_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + offs_k)[:, None]  # [BK, BM]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                                      # y^T tile
            for kk in range(0, K_PER_SPLIT, BLOCK_K):   # K_PER_SPLIT % BLOCK_K == 0 (the launcher checks)
                w = tl.load(w_ptrs + kk, eviction_policy="evict_first")
                xt = tl.load(xt_ptrs + kk, mask=m_ok[None, :], other=0.0)
                # FP8 MMA; each K tile's partial promoted into the fp32 acc (dot8's numerics, Hopper's reduced-
                # precision FP8 accumulation limited to one tile)
                acc = tl.dot(w, xt, acc, max_num_imprecise_acc=BLOCK_K)
            acc = acc * xs[None, :]
            ok = n_ok[:, None] & m_ok[None, :]
            if USE_WS:
                tl.store(ws_ptr + (split * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None], acc, mask=ok)
            else:
                acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
                tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None],
                         acc.to(y_ptr.dtype.element_ty), mask=ok)


def fp8_stream_dot(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, out: Tensor, block_n: int,
                   block_k: int, split: int, num_warps: int, num_stages: int, num_sms: int, wait: bool = False,
                   ws: Tensor | None = None) -> Tensor:
    """Launch (see the module docstring). out: [M, N] (x's dtype; written when split == 1). Returns out, or the
    partials [split, M, N] fp32 when split > 1 (the caller sums them). Grid: min(units, num_sms x
    LORASERVE_FP8_STREAM_PPS) persistent programs. wait: launched as a programmatic dependent (the caller checked
    pdl_supported): its launch and first weight tiles overlap the kernel before it, which it waits for in-kernel."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    M, K = x_q.shape
    N = w_q.shape[0]
    assert 1 <= M <= 64 and x_q.dtype == w_q.dtype == torch.float8_e4m3fn and x_q.stride(1) == 1, (x_q.shape, x_q.dtype)
    assert w_q.is_contiguous() and w_q.shape[1] == K and x_scale.numel() == M and w_scale.numel() == N
    assert K % (split * block_k) == 0, f"K={K} is not a multiple of SPLIT x BLOCK_K = {split} x {block_k}"
    assert out.shape == (M, N) and out.stride(1) == 1
    tiles = triton.cdiv(N, block_n)
    units = tiles * split
    if split == 1:
        ws = out
    elif ws is None or ws.shape != (split, M, N):   # (fp8_gemv passes its own [split, M, N] fp32 workspace)
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x_q.device)
    grid = (min(units, num_sms * stream_programs_per_sm()),)
    _fp8_stream_dot_kernel[grid](x_q, w_q, x_scale, w_scale, out, ws, M, N, K, K // split, tiles, units,
                                 x_q.stride(0), out.stride(0), BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k,
                                 USE_WS=split > 1, FLATTEN=stream_flatten_on(), WAIT=wait, num_warps=num_warps,
                                 num_stages=num_stages, **({"launch_pdl": True} if wait else {}))
    return ws if split > 1 else out
