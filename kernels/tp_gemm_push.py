"""Row-parallel decode GEMM that also pushes its output into the peers' Lamport buffers (tensor parallelism).

    Semantics (rank q of W): y[m, n] = sum_k x[m, k] * w[n, k]   (fp32 accumulate, one rounding to x's dtype)
    and, for every peer p != q:  buf_p[c[m] % 2, q, m, n] = y[m, n]   (a -0.0 sent as +0.0)
    x: [M, K] (unit column stride), 1 <= M <= 64; w: [N, K] contiguous; y: [M, N] contiguous, N = hidden;
    buf_p: rank p's symmetric buffer [2, W, max_rows, N]; c: this rank's per-row call counters [max_rows] int32

Why: a TP decode layer's o_proj and down_proj are row-parallel; their partial outputs go to the fused
all-reduce + RMSNorm (kernels/allreduce_rmsnorm.py), whose first step pushes the row to every peer and then
waits for the peers' rows to land. Here each output tile is pushed by the GEMM program that computed it, so the
NVLink transfer overlaps the rest of the GEMM instead of following it, and the norm kernel (PUSHED=True) only
waits for the peers' last tiles. The protocol is the norm kernel's, unchanged: the slot of row m is c[m] % 2
(the norm kernel advances c after the GEMM; a peer reuses a slot only two calls later), -0.0 marks "empty".

The GEMM is kernels/skinny_gemm.py's (swap-AB tensor-core tiles for 2..64 rows, split-K summed in the kernel by
the tile's last program, a programmatic dependent of the kernel before it), and for one row kernels/gemv.py's
weight-streaming GEMV: the push is their epilogue.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .allreduce_rmsnorm import EMPTY_BITS
from .gemv import gemv_config
from .pdl import pdl_kwargs
from .skinny_gemm import MAX_M, _workspace, skinny_config

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, REGPRE) by (N, K): the TP=2 8B shards' best skinny tiles in
# norm -> GEMM chains on an H200 (benchmarks/tp_layer_sweep.py --only skinny, probe 2026-11-30 22:04:
# o [4096, 2048] 9.36 us vs cuBLAS 9.17; down [4096, 7168] 21.62 vs 21.05); other shapes: skinny_config's rule
PUSH_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int, int]] = {
    (4096, 2048): (64, 128, 1, 4, 4, 0),
    (4096, 7168): (64, 128, 2, 4, 4, 0),
}


def push_config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    return PUSH_CONFIGS.get((N, K)) or skinny_config(M, N, K, device)


def gemm_push_fits(x: Tensor, w: Tensor) -> bool:
    """x [M, K] @ w [N, K]^T fits the kernel's tiles (the caller falls back to its GEMM + the norm's push)."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv_push_fits(x, w)
    if not (HAS_TRITON and x.is_cuda and x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= MAX_M
            and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1
            and w.is_contiguous() and x.shape[1] == w.shape[1] and w.shape[0] % 8 == 0):
        return False
    bn, bk, split = push_config(x.shape[0], w.shape[0], w.shape[1], x.device)[:3]
    return w.shape[1] % (split * bk) == 0


if HAS_TRITON:
    from .gemv import _gemv_row

    _EMPTY = tl.constexpr(EMPTY_BITS)

    @triton.jit
    def _push_tile(val, y_ptr, stride_ym, buf_ptr, deltas_ptr, counter_ptr, offs_n, offs_m, ok, m_ok, N,
                   slot_stride, region_stride, RANK: tl.constexpr, WORLD: tl.constexpr):
        """val [BLOCK_N, BLOCK_M] (y^T, x's dtype): store into y and into region RANK of every peer's buffer."""
        tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None], val, mask=ok)
        send = tl.where(val.to(tl.int16, bitcast=True) == _EMPTY, tl.zeros_like(val), val)
        count = tl.load(counter_ptr + offs_m, mask=m_ok, other=0)
        at = (count % 2).to(tl.int64)[None, :] * slot_stride + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        for p in tl.static_range(WORLD):
            if p != RANK:
                delta = tl.multiple_of(tl.load(deltas_ptr + p), 8)   # 16-byte aligned: vector stores
                tl.store(buf_ptr + delta + at + RANK * region_stride, send, mask=ok)

    @triton.jit(do_not_specialize=["M"])
    def _gemm_push_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, buf_ptr, deltas_ptr, counter_ptr, M, N, K, K_PER_SPLIT,
                          stride_xm, stride_ym, slot_stride, region_stride,
                          RANK: tl.constexpr, WORLD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, REGPRE: tl.constexpr, USE_PDL: tl.constexpr = False):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
        k_start = pid_k * K_PER_SPLIT
        w_ptrs = w_ptr + safe_n[:, None] * K + (k_start + offs_k)[None, :]                       # [BN, BK]
        xt_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + offs_k)[:, None]  # [BK, BM]: x^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                                     # y^T tile
        if REGPRE:   # the first weight tile before the wait: weights are no kernel's output
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_wait()   # x (and the counters, the peers' cleared slots) come from kernels before us
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            if not REGPRE:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc)
            w_ptrs += BLOCK_K
            xt_ptrs += BLOCK_K
            if REGPRE:
                w = tl.load(w_ptrs, mask=(offs_k * 0 + k0 + BLOCK_K < K_PER_SPLIT)[None, :], other=0.0,
                            eviction_policy="evict_first")
        if USE_PDL:   # the norm kernel may launch; its gdc_wait still waits for all of this grid
            tl.extra.cuda.gdc_launch_dependents()
        ok = n_ok[:, None] & m_ok[None, :]
        dtype = y_ptr.dtype.element_ty
        if SPLIT_K == 1:
            _push_tile(acc.to(dtype), y_ptr, stride_ym, buf_ptr, deltas_ptr, counter_ptr, offs_n, offs_m, ok, m_ok,
                       N, slot_stride, region_stride, RANK, WORLD)
        else:
            part = ws_ptr + (pid_k * BLOCK_M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
            tl.store(part, acc, mask=ok)
            tl.debug_barrier()   # every thread's partial stored before the counter moves
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if done == SPLIT_K - 1:   # the tile's last program: sums the splits in order, stores and pushes
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    total += tl.load(ws_ptr + (s * BLOCK_M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None],
                                     mask=ok, other=0.0, cache_modifier=".cg")
                _push_tile(total.to(dtype), y_ptr, stride_ym, buf_ptr, deltas_ptr, counter_ptr, offs_n, offs_m, ok,
                           m_ok, N, slot_stride, region_stride, RANK, WORLD)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)   # zero for the next launch (graph replays too)


    # batch 1: kernels/gemv.py's weight-streaming GEMV (M = 1, no bias, no SiLU) with the push in its store
    @triton.jit
    def _gemv_push_kernel(x_ptr, w_ptr, y_ptr, buf_ptr, deltas_ptr, counter_ptr, N, K, slot_stride, region_stride,
                          RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + safe_n[:, None] * K + offs_k[None, :]   # [BLOCK_N, BLOCK_K]
        if EVEN_K:   # the first weight tile in flight before the wait (weights are no kernel's output)
            w_next = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w_next = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()   # x, the counters and the peers' cleared slots come from kernels before us
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_row = x_ptr
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w = w_next.to(tl.float32)
            step = BLOCK_K * (k0 + BLOCK_K < K).to(tl.int32)   # the next tile in flight (this one again at the end)
            w_ptrs += step
            if EVEN_K:
                w_next = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w_next = tl.load(w_ptrs, mask=((k0 + step + offs_k) < K)[None, :], other=0.0,
                                 eviction_policy="evict_first")
            acc = _gemv_row(acc, w, x_row, 0, 1, K, offs_k, k_ok, EVEN_K, False)
            x_row += BLOCK_K
        y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)   # [BLOCK_N]
        tl.store(y_ptr + offs_n, y, mask=n_ok)
        # the push as BLOCK_N / 4 eight-byte words (the launcher checks N % BLOCK_N == 0): y's [BLOCK_N] elements
        # sit one per thread, so a plain store would send BLOCK_N 2-byte writes over NVLink per program
        bits = y.to(tl.int16, bitcast=True)
        bits = tl.where(bits == _EMPTY, tl.zeros_like(bits), bits).to(tl.int64) & 0xFFFF   # a -0.0 sent as +0.0
        shift = (tl.arange(0, BLOCK_N) % 4).to(tl.int64) * 16
        words = tl.sum(tl.reshape(bits << shift, [BLOCK_N // 4, 4]), axis=1)   # [BLOCK_N // 4] int64, disjoint bits
        at = ((tl.load(counter_ptr) % 2).to(tl.int64) * slot_stride + pid * BLOCK_N) // 4 \
            + tl.arange(0, BLOCK_N // 4)   # row 0, in words
        for p in tl.static_range(WORLD):
            if p != RANK:
                delta = tl.multiple_of(tl.load(deltas_ptr + p), 8)
                peer = (buf_ptr + delta + RANK * region_stride).to(tl.pointer_type(tl.int64))
                tl.store(peer + at, words)


def gemv_push_fits(x: Tensor, w: Tensor) -> bool:
    """One row: the GEMV with the push (gemm_push picks it for M = 1)."""
    return (HAS_TRITON and x.is_cuda and x.dim() == 2 and w.dim() == 2 and x.shape[0] == 1 and x.dtype == w.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1 and w.is_contiguous()
            and x.shape[1] == w.shape[1] and w.shape[0] % _gemv_tiles(w.shape[0], w.shape[1])[0] == 0)


def _gemv_tiles(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the one-row push: kernels/gemv.py's rule, BLOCK_N a multiple of 4 (words)."""
    bn, bk, warps, _ = gemv_config(1, N, K)
    return max(4, bn - bn % 4), bk, warps


def gemm_push(x: Tensor, w: Tensor, out: Tensor, buffer: Tensor, deltas: Tensor, counters: Tensor, rank: int,
              world: int, max_rows: int, config: tuple[int, ...] | None = None) -> Tensor:
    """out [M, N] = x [M, K] @ w [N, K]^T, also pushed into region `rank` of every peer's buffer (module doc).
    buffer: this rank's symmetric buffer [2, world, max_rows, N] (16-bit elements); deltas: int64 [world], rank p's
    buffer minus this one's in elements; counters: int32 [max_rows]. The next kernel on this rank must be
    allreduce_add_rms_norm(out, ..., pushed=True) with the same buffer and counters."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    M, K = x.shape
    N = w.shape[0]
    assert 1 <= M <= MAX_M and M <= max_rows, f"1..{min(MAX_M, max_rows)} rows, got {M}"
    assert x.stride(1) == 1 and w.is_contiguous() and x.dtype == w.dtype and w.shape[1] == K, (x.stride(), w.shape)
    assert x.dtype in (torch.bfloat16, torch.float16) and N % 8 == 0, (x.dtype, N)
    assert out.shape == (M, N) and out.is_contiguous() and out.dtype == x.dtype
    assert deltas.numel() == world and deltas.dtype == torch.int64 and counters.numel() >= M
    assert buffer.numel() >= 2 * world * max_rows * N and buffer.element_size() == 2
    region = max_rows * N
    if M == 1 and config is None:   # the GEMV's tiles (kernels/gemv.py's rule)
        bn, bk, warps = _gemv_tiles(N, K)
        assert N % bn == 0, f"N={N} is not a multiple of the GEMV's {bn} rows"
        _gemv_push_kernel[(triton.cdiv(N, bn),)](
            x, w, out, buffer.view(x.dtype), deltas, counters, N, K, world * region, region, RANK=rank, WORLD=world,
            BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, num_warps=warps, **pdl_kwargs(x.device))
        return out
    bn, bk, split, warps, stages, regpre = config or push_config(M, N, K, x.device)
    assert K % (split * bk) == 0, f"K={K} is not a multiple of SPLIT_K x BLOCK_K = {split} x {bk}"
    block_m = max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(N, bn)
    ws, cnt = _workspace(x.device, split, block_m, N, tiles) if split > 1 else (out, out)
    _gemm_push_kernel[(tiles, split)](
        x, w, out, ws, cnt, buffer.view(x.dtype), deltas, counters, M, N, K, K // split, x.stride(0), out.stride(0),
        world * region, region, RANK=rank, WORLD=world,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, REGPRE=bool(regpre),
        num_warps=warps, num_stages=stages, **pdl_kwargs(x.device))
    return out
