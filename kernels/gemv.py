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
grid cdiv(N, BLOCK_N); each program owns BLOCK_N weight rows and walks K in BLOCK_K steps, keeping a
fp32 [M_PAD, BLOCK_N, BLOCK_K] accumulator of broadcast products (no cross-thread reduction inside
the loop), reduced over K once at the end; the next weight tile is loaded one step ahead. No split-K:
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
    """Tokens up to which Proj uses this kernel: LORASERVE_GEMV_MAX_M (0 = off, the default; at most 4)."""
    try:
        return max(0, min(MAX_M, int(os.environ.get("LORASERVE_GEMV_MAX_M", "0"))))
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


# (BLOCK_N, BLOCK_K, num_warps) by K; measured choices go here (benchmarks/bench_gemv.py)
DEFAULT_CONFIG = (8, 512, 4)


def gemv_config(M: int, N: int, K: int) -> tuple[int, int, int]:
    env = os.environ.get("LORASERVE_GEMV_CONFIG")   # "BLOCK_N,BLOCK_K,warps": sweeps
    if env:
        bn, bk, nw = (int(v) for v in env.split(","))
        return bn, bk, nw
    bn, bk, nw = DEFAULT_CONFIG
    if M > 2:
        bk = 256   # the [4, BLOCK_N, BLOCK_K] accumulator: half the registers
    return bn, bk, nw


if HAS_TRITON:

    @triton.jit
    def _load_x(x_ptr, offs_m, m_ok, kk, k_ok, stride_xm, K, SILU_MUL: tl.constexpr):
        ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
        ok = m_ok[:, None] & k_ok[None, :]
        x = tl.load(ptrs, mask=ok, other=0.0)
        if SILU_MUL:   # x_ptr is gate_up [M, 2K]: gate at k, up at K + k; silu_and_mul's roundings
            u = tl.load(ptrs + K, mask=ok, other=0.0)
            gf = x.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(x.dtype).to(tl.float32)
            x = (act * u.to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, M_PAD)
        m_ok = offs_m < M
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        # the first weight tile [BLOCK_N, BLOCK_K]: weights are no kernel's output, so it is issued before
        # the wait and its DRAM latency overlaps the previous kernel
        w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()   # x (and y's old readers) belong to the kernels before us
        acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = _load_x(x_ptr, offs_m, m_ok, kk, kk < K, stride_xm, K, SILU_MUL)   # (M_PAD, BLOCK_K)
            nk = kk + BLOCK_K   # the next tile, one step ahead (fully masked after the last)
            w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=n_ok[:, None] & (nk < K)[None, :], other=0.0,
                             eviction_policy="evict_first")
            acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
            w = w_next
        y = tl.sum(acc, axis=2)   # (M_PAD, BLOCK_N)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, silu_mul: bool = False,
         out: Tensor | None = None, config: tuple[int, int, int] | None = None) -> Tensor:
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
    bn, bk, nw = config or gemv_config(M, N, K)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        M_PAD=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul, num_warps=nw, **pdl_kwargs(x.device))
    return y
