"""FP8 (e4m3) weight GEMMs for the FP8 base model (services/inference/models/fp8.py).

Two kernels, one per regime of the decode/prefill GEMM ``y = x @ (w_q * w_scale[:, None])^T``:

* ``fp8_w8a16_gemm`` (decode: M <= ~64 tokens, memory bound). Weight-only: bf16/fp16 activations
  times e4m3 weights with one fp32 scale per output channel; the weight tile is converted to the
  activation dtype in registers, the dot accumulates in fp32 and the per-channel scale is applied
  once in the epilogue (exact: the scale does not depend on k). No activation quantization at all,
  so it is also more accurate than W8A8. What matters at small M is streaming N*K weight bytes, half
  of bf16's; tiles are picked so that the grid covers the SMs without split-K (no atomics, so the
  result is deterministic and the launch is one kernel, CUDA-graph capturable).

      Semantics: y[m, n] = (sum_k x[m, k] * float(w_q[n, k])) * w_scale[n] (+ bias[n])
      x: [M, K] bf16/fp16/fp32 (row stride free, unit column stride); w_q: [N, K] e4m3 contiguous;
      w_scale: [N] fp32; bias: [N] or None; y: [M, N] in x's dtype. Grid (cdiv(N, BN), cdiv(M, BM)).

* ``per_token_quant_fp8`` (prefill: large M goes to torch._scaled_mm on FP8 tensor cores, which needs
  x in e4m3). One launch instead of torch's abs/amax/div/clamp/cast chain:

      Semantics: s[m] = max(amax_k |x[m, k]|, 448 * 1e-12) / 448; x_q[m, k] = e4m3(clamp(x / s[m], +-448))
      x: [M, K]; x_q: [M, K] e4m3; s: [M, 1] fp32. Grid (M,).

Both have pure-torch references (``*_ref``) that round where the kernels round. The W8A16 scheme is
what TensorRT-LLM calls weight-only FP8 and Marlin/Machete do for int4/fp8 in vLLM; the per-token
quantization is vLLM's ``dynamic_per_token_scaled_fp8_quant``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12


# --- references ------------------------------------------------------------------------------------

def fp8_w8a16_gemm_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """[M, N] = (x.f32 @ w_q.f32^T) * w_scale, + bias, in x's dtype (fp32 accumulate, one rounding)."""
    y = (x.float() @ w_q.float().t()) * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def per_token_quant_fp8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scale [M, 1] fp32), x ~= x_q * scale (one scale per row)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# --- kernels ---------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _fp8_w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                               HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        # rows past N/M read row 0 (always valid) instead of masking every load of the K loop
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
        safe_m = tl.where(m_ok, offs_m, 0).to(tl.int64)
        x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :]     # [BM, BK]
        w_ptrs = w_ptr + safe_n[None, :] * K + offs_k[:, None]             # [BK, BN]: w^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + offs_k) < K
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            # e4m3 -> the activation dtype in registers (exact: every e4m3 value is a bf16/fp16 value)
            acc = tl.dot(x, w.to(x.dtype), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _per_token_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                                    FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):   # pass 1: row amax (the row is re-read from L2 in pass 2)
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=(k0 + offs) < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):   # pass 2: x / scale, saturate, round to e4m3
            ok = (k0 + offs) < K
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(v / scale, -FP8_MAX_C), FP8_MAX_C)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def w8a16_config(M: int, N: int, K: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the W8A16 kernel. One M tile (the weights
    are streamed once); the widest N tile that still gives >= 2 CTAs per SM (a GEMV is bound by how
    many weight bytes are in flight, and there is no split-K); BLOCK_K large enough that each weight
    row segment is a long coalesced read."""
    block_m = max(16, min(64, triton.next_power_of_2(M)))
    block_n = 16
    for bn in (64, 32):
        if triton.cdiv(N, bn) * triton.cdiv(M, block_m) >= 2 * num_sms:
            block_n = bn
            break
    block_k = 256 if block_m <= 32 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    num_warps = 4
    num_stages = 4 if block_m <= 32 else 3
    return block_m, block_n, block_k, num_warps, num_stages


def fp8_w8a16_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
    """[M, K] x [N, K] e4m3 (per-channel fp32 scales) -> [M, N] in x's dtype, one launch, no host sync."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use fp8_w8a16_gemm_ref")
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    assert w_q.dim() == 2 and w_q.dtype == FP8 and w_q.is_contiguous(), "w_q must be a contiguous [N, K] e4m3 tensor"
    M, K = x.shape
    N = w_q.shape[0]
    assert w_q.shape[1] == K, f"x has K={K}, w_q has K={w_q.shape[1]}"
    assert w_scale.dtype == torch.float32 and w_scale.numel() == N and w_scale.is_contiguous()
    assert bias is None or (bias.numel() == N and bias.is_contiguous())
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(-1) == 1
    if M == 0:
        return out
    bm, bn, bk, warps, stages = w8a16_config(M, N, K, _num_sms(x.device))
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _fp8_w8a16_gemm_kernel[grid](x, w_q, w_scale, bias if bias is not None else w_scale, out, M, N, K,
                                 x.stride(0), out.stride(0), HAS_BIAS=bias is not None, EVEN_K=K % bk == 0,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def per_token_quant_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scale [M, 1] fp32) in one launch (see per_token_quant_fp8_ref)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use per_token_quant_fp8_ref")
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    M, K = x.shape
    x_q = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return x_q, scale
    block = min(2048, max(16, triton.next_power_of_2(K)))
    _per_token_quant_fp8_kernel[(M,)](x, x_q, scale, K, x.stride(0), x_q.stride(0), FP8_MAX_C=FP8_MAX,
                                      MIN_SCALE_C=MIN_SCALE, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return x_q, scale
