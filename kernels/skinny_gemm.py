"""bf16/fp16 GEMM for decode batches of 5..64 tokens on tensor cores, swap-AB, split-K summed in the kernel (Triton).

    Semantics: y[m, n] = sum_k x[m, k] * w[n, k]          (fp32 accumulate, one rounding to x's dtype)
    x: [M, K] (unit column stride), 1 <= M <= 64; w: [N, K] contiguous (nn.Linear's weight); y: [M, N] contiguous

Why: at 64 tokens a decode step's GEMMs are weight-bandwidth bound, and a tensor-parallel rank's shards are
small: TP=2's qkv [3072, 4096] and o [4096, 2048] weigh 25 / 17 MB, 6 / 4 us of HBM time at 4.3 TB/s, while
cuBLAS took ~10 / ~7 us for them at M = 64 (ramp, tail and the launch boundary the next kernel waits for;
kernels/PERF_NOTES.md). This kernel (a) launches as a programmatic dependent of the kernel before it (its
launch and set-up overlap that kernel's tail; REGPRE: its first weight tile is loaded before it waits, the
weights being no kernel's output), and (b) lets its successor launch early.

Shape of the kernel (vLLM's / SGLang's skinny "swap AB" tiles, the FP8 helper's fp8_skinny_dot.py): the weight
rows are the MMA's M side (BLOCK_N >= 64), the tokens its N side (BLOCK_M = M padded to 16 / 32 / 64), so a
64-token batch does not waste MMA rows. grid (cdiv(N, BLOCK_N), SPLIT_K): a program owns BLOCK_N weight rows
and a K range; with SPLIT_K > 1 each writes an fp32 partial [BLOCK_N, M] and the tile's last program to finish
(an acq_rel counter per N tile, reset by that program) adds the partials in split order: deterministic, one
launch, and every x row still reads only its own K slice (x is re-read once per N tile from L2, not per split).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs

MAX_M = 64


def skinny_gemm_ref(x: Tensor, w: Tensor) -> Tensor:
    """Obviously right: fp32 matmul, one rounding."""
    return (x.float() @ w.float().t()).to(x.dtype)


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, REGPRE) by (N, K): H200 sweeps go here
# (benchmarks/tp_layer_sweep.py --only skinny); a shape not in the table takes default_config's rule
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int, int]] = {}


def default_config(M: int, N: int, K: int, num_sms: int = 132) -> tuple[int, int, int, int, int, int]:
    """About 1-2 programs per SM: BLOCK_N 128 (64 for narrow N), K split until the tiles fill the SMs."""
    bn = 128 if N >= 128 * num_sms // 2 else 64
    bk = 128
    tiles = -(-N // bn)
    split = 1
    while tiles * split * 2 <= 2 * num_sms and K % (split * 2 * bk) == 0 and split < 8:
        split *= 2
    return bn, bk, split, 4, 4, 0


def skinny_config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    env = os.environ.get("LORASERVE_SKINNY_CONFIG")   # "BLOCK_N,BLOCK_K,SPLIT_K,warps,stages,regpre": sweeps
    if env:
        return tuple(int(v) for v in env.split(","))  # type: ignore[return-value]
    if (N, K) in CONFIGS:
        return CONFIGS[N, K]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return default_config(M, N, K, sms)


def skinny_mode() -> str:
    """LORASERVE_SKINNY_GEMM: "0" (off), "auto" (only the [N, K] shapes in CONFIGS: measured wins), "1" (every
    shape the tiles fit, default_config for those not in CONFIGS). Read at each call: graphs keep what they captured."""
    mode = os.environ.get("LORASERVE_SKINNY_GEMM", "0").strip().lower()
    return "0" if mode in ("", "0", "off", "false", "no") else "auto" if mode == "auto" else "1"


def skinny_gemm_ok(x: Tensor, w: Tensor) -> bool:
    """True when skinny_gemm takes x [M, K] @ w [N, K]^T with its configured tiles (callers fall back otherwise)."""
    mode = skinny_mode()
    if mode == "0" or (mode == "auto" and (w.shape[0], w.shape[1]) not in CONFIGS):
        return False
    if not (HAS_TRITON and x.is_cuda and x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= MAX_M
            and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1
            and w.is_contiguous() and x.shape[1] == w.shape[1]):
        return False
    bn, bk, split = skinny_config(x.shape[0], w.shape[0], w.shape[1], x.device)[:3]
    return w.shape[1] % (split * bk) == 0


_WORKSPACES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _workspace(device: torch.device, split: int, block_m: int, n: int, tiles: int) -> tuple[Tensor, Tensor]:
    """fp32 partials [split, block_m, n] and the per-tile counters [tiles] (int32, zero; every launch leaves
    them zero), kept per shape: calls on one stream reuse them in turn. Allocate before a graph capture."""
    key = (device, split, block_m, n, tiles)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (torch.empty(split * block_m * n, dtype=torch.float32, device=device),
                                 torch.zeros(tiles, dtype=torch.int32, device=device))
    return ws


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _skinny_gemm_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr, REGPRE: tl.constexpr, USE_PDL: tl.constexpr = False):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)   # rows past N re-read row 0: no N mask in the loop
        k_start = pid_k * K_PER_SPLIT
        w_ptrs = w_ptr + safe_n[:, None] * K + (k_start + offs_k)[None, :]                       # [BN, BK]
        xt_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + offs_k)[:, None]  # [BK, BM]: x^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                                     # y^T tile
        if REGPRE:   # the first weight tile in flight before the wait: no kernel of the step writes weights
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_wait()   # x is the kernels-before-us' output
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):   # K_PER_SPLIT % BLOCK_K == 0 (the launcher checks)
            if not REGPRE:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc)
            w_ptrs += BLOCK_K
            xt_ptrs += BLOCK_K
            if REGPRE:   # the next tile (past the slice on the last step: masked off, no bytes)
                w = tl.load(w_ptrs, mask=(offs_k * 0 + k0 + BLOCK_K < K_PER_SPLIT)[None, :], other=0.0,
                            eviction_policy="evict_first")
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        ok = n_ok[:, None] & m_ok[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            part = ws_ptr + (pid_k * BLOCK_M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
            tl.store(part, acc, mask=ok)
            tl.debug_barrier()   # every thread's partial stored before the counter moves
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")   # release ours, acquire the others'
            if done == SPLIT_K - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(0, SPLIT_K):   # split order whoever finishes last: deterministic
                    total += tl.load(ws_ptr + (s * BLOCK_M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None],
                                     mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)   # zero for the next launch (graph replays too)


def skinny_gemm(x: Tensor, w: Tensor, out: Tensor | None = None, config: tuple[int, ...] | None = None) -> Tensor:
    """y [M, N] = x [M, K] @ w [N, K]^T, 1 <= M <= 64, one launch (see the module docstring).
    config: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, REGPRE); default skinny_config."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use skinny_gemm_ref")
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    M, K = x.shape
    N = w.shape[0]
    assert 1 <= M <= MAX_M, f"skinny_gemm serves 1..{MAX_M} rows, got {M}"
    assert x.stride(1) == 1 and w.is_contiguous() and x.dtype == w.dtype, (x.stride(), x.dtype, w.dtype)
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    bn, bk, split, warps, stages, regpre = config or skinny_config(M, N, K, x.device)
    assert K % (split * bk) == 0, f"K={K} is not a multiple of SPLIT_K x BLOCK_K = {split} x {bk}"
    block_m = max(16, triton.next_power_of_2(M))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (M, N) and y.stride(1) == 1 and y.dtype == x.dtype
    tiles = triton.cdiv(N, bn)
    ws, cnt = _workspace(x.device, split, block_m, N, tiles) if split > 1 else (y, y)
    _skinny_gemm_kernel[(tiles, split)](
        x, w, y, ws, cnt, M, N, K, K // split, x.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, REGPRE=bool(regpre),
        num_warps=warps, num_stages=stages, **pdl_kwargs(x.device))
    return y
