"""bf16/fp16 GEMV for decode at 1-4 tokens: stream the weights at HBM speed, Triton.

    Semantics: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])          (fp32 accumulate, one rounding)
    x: [M, K] (unit column stride), M <= 4; w: [N, K] contiguous (nn.Linear's weight); bias: [N] or None;
    y: [M, N] contiguous, x's dtype.
    With silu_mul=True, x is the fused gate_up output [M, 2K] and the kernel reads
        x[m, k] = (silu(g).to(dtype).f32 * u.f32).to(dtype),   g = x[m, k], u = x[m, K + k]
    exactly kernels/activation.py's silu_and_mul: the MLP's down projection without its own launch.

Why: at batch 1 a Llama-3-8B decode step reads 16 GB of weights through 4 GEMMs per layer. cuBLAS'
GEMV-shaped kernels pay a fixed ~6 us per call (ramp up, tail) on top of the bytes (H200: ~6 us + bytes /
4.8 TB/s, kernels/PERF_NOTES.md), i.e. ~0.8 ms of a ~5 ms step. This kernel issues its first weight tile
before it waits for the kernel before it (programmatic dependent launch, kernels/pdl.py), so that ramp
overlaps the previous kernel (RMSNorm, attention, SiLU) instead of following it.

Shape of the kernel (gpt-fast's / inductor's int8 GEMV, the FP8 helper's ``gemv`` in fp8_gemv.py):
grid cdiv(N, BLOCK_N); each program owns BLOCK_N weight rows and walks K in BLOCK_K steps, keeping one
fp32 [BLOCK_N, BLOCK_K] accumulator of broadcast products per x row (no cross-thread reduction inside
the loop), reduced over K once at the end; PREFETCH loads the next weight tile one step ahead. No split-K:
at the shapes it serves, N / BLOCK_N gives >= 512 programs (a few per SM) and no second launch.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs

MAX_M = 4


def gemv_max_m() -> int:
    """Tokens up to which Proj uses this kernel: LORASERVE_GEMV_MAX_M (default 1: batch-1 decode, the case
    measured on the H200; 0 = off, at most 4)."""
    try:
        return max(0, min(MAX_M, int(os.environ.get("LORASERVE_GEMV_MAX_M", "1"))))
    except ValueError:
        return 0


def gemv_ref(x: Tensor, w: Tensor, bias: Tensor | None = None, silu_mul: bool = False) -> Tensor:
    """Obviously right version: fp32 matmul, one rounding (the SiLU-mul input rounded as the kernel)."""
    if silu_mul:
        g, u = x.chunk(2, dim=-1)
        x = (F.silu(g.float()).to(x.dtype).float() * u.float()).to(x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# (BLOCK_N, BLOCK_K, num_warps, PREFETCH). H200, M=1 (benchmarks/bench_gemv.py, first probe): qkv
# [6144, 4096] 8 rows 15.5 us (4 rows 16.5, cuBLAS 16.0); o [4096, 4096] 4 rows 11.0 us (8 rows 11.9, cuBLAS
# 13.4); gate_up [28672, 4096] 59.4 (cuBLAS 58.3). PREFETCH made no difference (+-0.1 us). Second probe:
# o 4 rows 10.3 us / 2 rows x 1024 9.9 (cuBLAS 12.6); down [4096, 14336] 4 rows 29.7 (8 rows 36.0, cuBLAS 32.8).
# In the 32-layer decode chain with PDL the GEMV wins for all four, gate_up included (its first tile is in
# flight while the RMSNorm before it runs): 133.8 us per layer (cuBLAS) -> 125.8.
DEFAULT_CONFIG = (8, 512, 4, 1)


def gemv_config(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    env = os.environ.get("LORASERVE_GEMV_CONFIG")   # "BLOCK_N,BLOCK_K,warps,prefetch": sweeps
    if env:
        return tuple(int(v) for v in env.split(","))  # type: ignore[return-value]
    bn, bk, nw, pf = DEFAULT_CONFIG
    if N <= 4096:
        bn = 4   # N / 8 = 512 programs are under one wave of ~6 per SM: 1024 fill it
    if M > 2:
        bk = 256   # four [BLOCK_N, BLOCK_K] fp32 accumulators: half the registers
    return bn, bk, nw, pf


if HAS_TRITON:

    @triton.jit
    def _gemv_row(acc, w, x_ptr, row, M, K, offs_k, k_ok, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):
        # x row `row` for this K tile, loaded as a [BLOCK_N, BLOCK_K] tile of repeated addresses (L1 serves the
        # repeats) so that it shares w's register layout: a [BLOCK_K] vector broadcast over the rows went through
        # shared memory with barriers every K step (fp8_gemv.py's measurement)
        zero = tl.zeros_like(acc).to(tl.int32)
        ptrs = x_ptr + offs_k[None, :] + zero
        ok = (zero + row) < M
        if not EVEN_K:
            ok = ok & k_ok[None, :]
        x = tl.load(ptrs, mask=ok, other=0.0)
        if SILU_MUL:   # x_ptr is gate_up [M, 2K]: gate at k, up at K + k; silu_and_mul's roundings
            u = tl.load(ptrs + K, mask=ok, other=0.0)
            gf = x.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(x.dtype).to(tl.float32)
            x = (act * u.to(tl.float32)).to(x.dtype)
        return acc + w * x.to(tl.float32)

    @triton.jit
    def _gemv_store(acc, row, M, b_ptr, y_ptr, stride_ym, offs_n, n_ok, HAS_BIAS: tl.constexpr):
        y = tl.sum(acc, axis=1)   # [BLOCK_N]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok & ((offs_n * 0 + row) < M))

    # M varies with the step (1..4): one compiled variant per M_PAD, not per M
    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)   # rows past N re-read row 0: no N mask in the loop
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + safe_n[:, None] * K + offs_k[None, :]   # [BLOCK_N, BLOCK_K], K-major rows
        # the first weight tile: weights are no kernel's output, so it is in flight before the wait and its
        # DRAM latency overlaps the kernel before us (programmatic dependent launch)
        if EVEN_K:
            w_next = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w_next = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()   # x is the output of the kernels before us
        x_row = x_ptr
        stride_x = stride_xm
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w = w_next.to(tl.float32)
            if PREFETCH:   # the next tile in flight while this one is used (re-reads this one at the end)
                step = BLOCK_K * (k0 + BLOCK_K < K).to(tl.int32)
                w_ptrs += step
                if EVEN_K:
                    w_next = tl.load(w_ptrs, eviction_policy="evict_first")
                else:
                    w_next = tl.load(w_ptrs, mask=((k0 + step + offs_k) < K)[None, :], other=0.0,
                                     eviction_policy="evict_first")
            acc0 = _gemv_row(acc0, w, x_row, 0, M, K, offs_k, k_ok, EVEN_K, SILU_MUL)
            if M_PAD >= 2:
                acc1 = _gemv_row(acc1, w, x_row + stride_x, 1, M, K, offs_k, k_ok, EVEN_K, SILU_MUL)
            if M_PAD >= 4:
                acc2 = _gemv_row(acc2, w, x_row + 2 * stride_x, 2, M, K, offs_k, k_ok, EVEN_K, SILU_MUL)
                acc3 = _gemv_row(acc3, w, x_row + 3 * stride_x, 3, M, K, offs_k, k_ok, EVEN_K, SILU_MUL)
            if not PREFETCH:
                w_ptrs += BLOCK_K
                if EVEN_K:
                    w_next = tl.load(w_ptrs, mask=(offs_k * 0 + k0 + BLOCK_K) < K, other=0.0,
                                     eviction_policy="evict_first")
                else:
                    w_next = tl.load(w_ptrs, mask=((k0 + BLOCK_K + offs_k) < K)[None, :], other=0.0,
                                     eviction_policy="evict_first")
            x_row += BLOCK_K
        _gemv_store(acc0, 0, M, b_ptr, y_ptr, stride_ym, offs_n, n_ok, HAS_BIAS)
        if M_PAD >= 2:
            _gemv_store(acc1, 1, M, b_ptr, y_ptr, stride_ym, offs_n, n_ok, HAS_BIAS)
        if M_PAD >= 4:
            _gemv_store(acc2, 2, M, b_ptr, y_ptr, stride_ym, offs_n, n_ok, HAS_BIAS)
            _gemv_store(acc3, 3, M, b_ptr, y_ptr, stride_ym, offs_n, n_ok, HAS_BIAS)


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, silu_mul: bool = False,
         out: Tensor | None = None, config: tuple[int, ...] | None = None) -> Tensor:
    """y [M, N] = x [M, K] @ w [N, K]^T (+ bias), M <= 4, one launch (see the module docstring).
    silu_mul: x is gate_up [M, 2K] and silu(gate) * up is computed on the fly."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use gemv_ref")
    assert x.dim() == 2 and w.dim() == 2, (x.shape, w.shape)
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    assert 1 <= M <= MAX_M, f"gemv serves 1..{MAX_M} rows, got {M}"
    assert x.shape[1] == (2 * K if silu_mul else K), f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    assert x.stride(1) == 1 and w.is_contiguous() and x.dtype == w.dtype, (x.stride(), x.dtype, w.dtype)
    if bias is not None:
        assert bias.shape == (N,) and bias.is_contiguous(), bias.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (M, N) and y.stride(1) == 1 and y.dtype == x.dtype
    bn, bk, nw, pf = (tuple(config) + (1,))[:4] if config else gemv_config(M, N, K)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), y.stride(0),
        M_PAD=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, PREFETCH=bool(pf),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, num_warps=nw, **pdl_kwargs(x.device))
    return y
