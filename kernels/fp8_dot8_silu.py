"""The MLP's gate_up GEMM at 33..64 tokens (W8A8 dot8) with SiLU-and-mul in its epilogue, then down's per-token codes.

    h [M, I]               = silu_and_mul(dot8(x, w_q [2I, K], w_scale))  bit for bit (kernels/activation.py's roundings)
    (x_q [M, I], s [M, 1]) = per_token_quant_fp8(h)                        bit for bit (the amax is exact in any order)

Two launches where there were two (the dot8 GEMM, then _silu_mul_quant_kernel: one program per row reading the
[M, 2I] GEMM output, 6.8 us a layer at 64 x 14336 on the H200, FP8 sixth pass), but neither is a row kernel:
* the GEMM (kernels/fp8_skinny_dot.py, SILU) holds gate rows n and up rows I + n in one program (two weight tiles,
  one x tile, two FP8 dots per K step), applies SiLU-and-mul before its store (h, half the bytes of gate_up) and
  writes each row's |max| over its BLOCK_N columns to pmax [M, P] (P = I / BLOCK_N programs; no atomics, no zeroing);
* _row_codes_kernel: (row, chunk) programs, each takes its row's max over the P partials (P floats) and writes the
  codes of its chunk from h (L2-resident): no reduction across programs, no counters (the row split's costs).
Why: issue #14's batch-64 target; the one-program-per-row kernel is latency-bound (64 of 132 SMs, a serial
load -> exp -> store -> block max -> codes chain), the GEMM's tiles are where the values are made anyway.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .fp8_gemm import FP8, FP8_MAX, MIN_SCALE, per_token_quant_fp8
from .pdl import pdl_kwargs

DOT8_SILU_KINDS = ("dot8", "dot8f")


def dot8_silu_config_ok(cfg: tuple) -> bool:
    """Whether a GEMV config can run gate_up with the SiLU epilogue here: a per-token W8A8 tensor-core kind without
    split-K (the epilogue needs each output's whole K sum)."""
    return cfg[0] in DOT8_SILU_KINDS and cfg[4] == 1


if HAS_TRITON:
    from .fp8_norm_quant import _delta_kwargs, _quant_regs

    @triton.jit
    def _row_codes_kernel(h_ptr, pm_ptr, q_ptr, s_ptr, N, P, fp8_max, stride_h, stride_q, BLOCK: tl.constexpr,
                          P_BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
        # program (row, c): amax = max(pm[row, :P]) (the GEMM programs' row maxima), then per_token_quant_fp8's
        # scale and the e4m3 codes of h[row, c BLOCK : (c + 1) BLOCK] (every program of the row stores the same scale)
        if USE_PDL:   # kernels/pdl.py: h and pm are the GEMM's, launched just before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        p_offs = tl.arange(0, P_BLOCK)
        amax = tl.max(tl.load(pm_ptr + row * P + p_offs, mask=p_offs < P, other=0.0), axis=0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
        _quant_regs(h, q_ptr + row * stride_q + offs, s_ptr + row, ok, amax, fp8_max, FP8_MAX_C, MIN_SCALE_C)


def row_codes(h: Tensor, pmax: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """(x_q [M, N] e4m3, scale [M, 1] fp32) = per_token_quant_fp8(h [M, N]) given pmax [M, P] fp32 whose row maxima
    are h's row amax (max |h[m, :]| = max pmax[m, :]); one launch of (M, N / block) programs (block: default 1024,
    LORASERVE_FP8_ROW_CODES_BLOCK for probes)."""
    if block is None:
        block = int(os.environ.get("LORASERVE_FP8_ROW_CODES_BLOCK", "1024"))
    M, N = h.shape
    P = pmax.shape[1]
    x_q = torch.empty((M, N), dtype=FP8, device=h.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=h.device)
    if M == 0:
        return x_q, scale
    block = min(block, triton.next_power_of_2(N))
    _row_codes_kernel[(M, triton.cdiv(N, block))](h, pmax, x_q, scale, N, P, FP8_MAX, h.stride(0), x_q.stride(0),
                                                  BLOCK=block, P_BLOCK=max(2, triton.next_power_of_2(P)),
                                                  FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE, num_warps=4,
                                                  **pdl_kwargs(h.device))
    return x_q, scale


def dot8_silu_quant(x: Tensor, w_q: Tensor, w_scale: Tensor, config: tuple,
                    x_q: tuple[Tensor, Tensor] | None = None, codes: bool = True, delta: Tensor | None = None,
                    dora: tuple | None = None):
    """x [M, K] bf16/fp16, w_q [2I, K] e4m3 (gate rows, then up rows), w_scale [2I] fp32; config: a dot8 / dot8f
    GemvConfig without split-K (dot8_silu_config_ok). x_q: x's per-token (codes, scale) from its producer, else
    quantized here (per_token_quant_fp8). Returns (h [M, I], x_q [M, I] e4m3, scale [M, 1]) = silu_and_mul of the
    dot8 GEMM and per_token_quant_fp8 of it; codes=False: (h, None, None) (one launch).
    delta [M, 2I] / dora (token_slot, g [L, 2I], on [L] or None): gate_up's LoRA delta added to both halves before the
    activation, DoRA's g on the adapted rows (fp8_norm_quant.splitk_add_rms_norm's arguments of the same names)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    from .fp8_gemv import X16_SCALE, pdl_supported

    assert dot8_silu_config_ok(config), f"not a dot8 config without split-K: {config}"
    assert x.dim() == 2 and x.stride(-1) == 1 and w_q.dtype == torch.float8_e4m3fn and w_q.is_contiguous()
    M, K = x.shape
    N2 = w_q.shape[0]
    assert w_q.shape[1] == K and N2 % 2 == 0 and w_scale.dtype == torch.float32 and w_scale.numel() == N2
    kind, bm, bn, bk, _, warps, stages = config[:7]
    N = N2 // 2
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return (h, *per_token_quant_fp8(h)) if codes else (h, None, None)
    xq, xs = x_q if x_q is not None else per_token_quant_fp8(x)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), 1)
    pmax = torch.empty((M, grid[1]), dtype=torch.float32, device=x.device)
    # the codes kernel (a programmatic dependent) may launch once our main loops are done (PDL: the trigger after them)
    pdl = codes and pdl_supported(x.device) and bool(pdl_kwargs(x.device))
    from .fp8_skinny_dot import _fp8_skinny_dot_kernel

    _fp8_skinny_dot_kernel[grid](xq, w_q, w_scale, w_scale, h, pmax, M, N, K, K, xq.stride(0), h.stride(0), X16_SCALE,
                                 xs, w_scale, 1, HAS_BIAS=False, EVEN_K=K % bk == 0, USE_WS=False, F16=False,
                                 FP8X=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, WAIT=False, FIXUP=False,
                                 PRECISE=kind == "dot8", SILU=True, num_warps=warps, num_stages=stages,
                                 **_delta_kwargs(delta, dora, M, N2))
    if not codes:
        return h, None, None
    return (h, *row_codes(h, pmax))


def dot8_silu_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, x_q: tuple[Tensor, Tensor] | None = None,
                  delta: Tensor | None = None, factor: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pure torch: x rounded per token to e4m3 (per_token_quant_fp8_ref, or the given x_q), the fp32 GEMM with both
    scales (+ delta, times factor: the LoRA delta and DoRA's per-row g), rounded to x's dtype, HF's SiLU-and-mul with
    activation.py's roundings, then per_token_quant_fp8_ref."""
    from .fp8_gemm import per_token_quant_fp8_ref

    xq, xs = x_q if x_q is not None else per_token_quant_fp8_ref(x)
    # float64 (a CUDA fp32 matmul may run in TF32: a worse reference than the kernel)
    y = (xq.double() * xs.double()) @ w_q.double().t() * w_scale.double()[None, :]
    if delta is not None:
        y = (y + delta.double()) * (factor.double() if factor is not None else 1.0)
    y = y.to(x.dtype)
    gate, up = y.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    return (h, *per_token_quant_fp8_ref(h))
