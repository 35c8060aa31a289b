"""FP8 (e4m3) weight GEMMs for the FP8 base model (services/inference/models/fp8.py).

Two kernels, one per regime of the decode/prefill GEMM ``y = x @ (w_q * w_scale[:, None])^T``:

* ``fp8_w8a16_gemm`` (decode: M <= ~64 tokens, memory bound). Weight-only: bf16/fp16 activations
  times e4m3 weights with one fp32 scale per output channel; the weight tile is converted to the
  activation dtype in registers, the dot accumulates in fp32 and the per-channel scale is applied
  once in the epilogue (exact: the scale does not depend on k). No activation quantization at all,
  so it is also more accurate than W8A8. What matters at small M is streaming N*K weight bytes, half
  of bf16's: tiles are picked so the grid covers the SMs, with split-K where N alone does not (fp32
  partial sums reduced by a second launch in a fixed order: deterministic, no atomics, no host sync,
  CUDA-graph capturable).

      Semantics: y[m, n] = (sum_k x[m, k] * float(w_q[n, k])) * w_scale[n] (+ bias[n])
      x: [M, K] bf16/fp16/fp32 (row stride free, unit column stride); w_q: [N, K] e4m3 contiguous;
      w_scale: [N] fp32; bias: [N] or None; y: [M, N] in x's dtype. Grid (cdiv(N, BN), cdiv(M, BM), SPLIT_K).

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

    # M, strides and the split length vary with the batch: one compiled variant per tile config, not per M
    @triton.jit(do_not_specialize=["M", "K_PER_SPLIT", "stride_xm", "stride_ym"])
    def _fp8_w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_ym,
                               HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        # weight rows past N read row 0 (always valid) instead of masking every load of the K loop; x rows
        # past M are masked (no memory traffic: at M = 1 the 16-row tile reads one row)
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
        k_start = pid_k * K_PER_SPLIT                                       # a multiple of BLOCK_K
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]   # [BM, BK]
        w_ptrs = w_ptr + safe_n[None, :] * K + (k_start + offs_k)[:, None]                          # [BK, BN]: w^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + offs_k) < k_end
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            # e4m3 -> the activation dtype in registers (exact: every e4m3 value is a bf16/fp16 value)
            acc = tl.dot(x, w.to(x.dtype), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SPLIT_K == 1:
            acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            if HAS_BIAS:
                acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        else:   # fp32 partial sums [SPLIT_K, M, N]; _splitk_reduce_kernel adds them in a fixed order
            ws_ptrs = ws_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
            tl.store(ws_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym,
                              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLIT_K):   # deterministic: the same order every launch (CUDA-graph replays match)
            acc += tl.load(ws_ptr + (split * M + row) * N + offs, mask=ok, other=0.0)
        acc = acc * tl.load(s_ptr + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _per_token_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, fp8_max,
                                    FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr, BLOCK: tl.constexpr,
                                    WAIT: tl.constexpr):
        # fp8_max: 448 as a runtime fp32 scalar (div_rn wants two fp32 tensors on every Triton version)
        if WAIT:   # launched as a programmatic dependent (kernels/pdl.py's rules): x is our predecessor's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):   # pass 1: row amax (the row is re-read from L2 in pass 2)
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=(k0 + offs) < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), fp8_max), MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):   # pass 2: x / scale, saturate, round to e4m3
            ok = (k0 + offs) < K
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=ok, other=0.0).to(tl.float32)
            # IEEE division as torch's (Triton's `/` is the approximate div.full.f32 on NVIDIA)
            q = tl.minimum(tl.maximum(tl.div_rn(v, scale), -FP8_MAX_C), FP8_MAX_C)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _rescale_rows_cols_kernel(a_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, N, stride_am, stride_ym,
                                  HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # y[row, n] = a[row, n] * xs[row] * ws[n] (+ b[n]): the scales of a unit-scale FP8 GEMM applied after it
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        y = tl.load(a_ptr + row * stride_am + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(xs_ptr + row)
        y = y * tl.load(ws_ptr + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


_UNIT_SCALES: dict[torch.device, Tensor] = {}


def tensorwise_acc(x_q: Tensor, w_q: Tensor, acc_dtype: torch.dtype = torch.float32, fast_accum: bool = False) -> Tensor:
    """[M, N] = x_q @ w_q^T on cuBLASLt's tensor-wise FP8 GEMM with unit scales (the scales come after it)."""
    one = _UNIT_SCALES.get(x_q.device)
    if one is None:   # made once per device (inside a CUDA-graph capture it would be a fill launch per call)
        one = _UNIT_SCALES[x_q.device] = torch.ones((), device=x_q.device, dtype=torch.float32)
    return torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=acc_dtype, use_fast_accum=fast_accum)


def scaled_mm_tensorwise(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                         out: Tensor, acc_dtype: torch.dtype = torch.float32, fast_accum: bool = False) -> Tensor:
    """out [M, N] = (x_q @ w_q^T) * x_scale * w_scale (+ bias) through cuBLASLt's tensor-wise FP8 GEMM with unit
    scales (torch._scaled_mm; its row-wise form is a slower CUTLASS kernel at decode M), the per-token and
    per-channel scales applied by one Triton launch after it. x_q [M, K] e4m3, x_scale [M, 1] fp32, w_q [N, K]
    e4m3, w_scale [N] fp32; acc_dtype: the GEMM's output (fp32: one rounding in all; bf16: half the bytes, two)."""
    acc = tensorwise_acc(x_q, w_q, acc_dtype, fast_accum)
    M, N = acc.shape
    block = min(1024, triton.next_power_of_2(N))
    _rescale_rows_cols_kernel[(M, triton.cdiv(N, block))](acc, x_scale, w_scale, bias if bias is not None else w_scale,
                                                         out, N, acc.stride(0), out.stride(0),
                                                         HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def w8a16_config(M: int, N: int, K: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for the W8A16 kernel.
    One M tile when M <= 64 (the weights are streamed once). Every N tile re-reads x [M, K] from L2, so
    x bytes / weight bytes per CTA = 2 M / BLOCK_N: BLOCK_N grows with M to keep that <= 1 (L2 would
    otherwise bound the GEMV before HBM does). Then split K until ~2 CTAs per SM (a GEMV
    is bound by how many weight bytes are in flight), keeping >= 2 K tiles per split."""
    block_m = max(16, min(64, triton.next_power_of_2(M)))
    block_n = 16 if M <= 8 else 32 if M <= 16 else 64 if M <= 32 else 128
    # bytes in flight: a 16 x 512 e4m3 tile per stage at M <= 8, >= 2 CTAs per SM (Little's law for HBM3e
    # wants ~36 KB per SM); the K tile shrinks as the x tile grows. These tiles compile for sm_90 with 8 warps
    # and no register spills (checked with triton.compile for GPUTarget("cuda", 90, 32), cuobjdump)
    block_k = 512 if M <= 8 else 256 if M <= 16 else 128 if M <= 32 else 64
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split_k = 1
    if tiles < num_sms:
        while tiles * split_k < 1.75 * num_sms and split_k < 16 and K >= 2 * split_k * 2 * block_k:
            split_k *= 2
    num_warps = 8
    num_stages = 4 if M <= 8 else 3
    return block_m, block_n, block_k, split_k, num_warps, num_stages


def check_gemm_args(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                    out: Tensor | None) -> tuple[int, int, int, Tensor]:
    """The FP8-weight GEMMs' shared argument checks (this module's and fp8_gemv's): x [M, K] (contiguous
    rows), w_q [N, K] e4m3, w_scale [N] fp32, bias [N] or None, out [M, N] in x's dtype (allocated if None).
    Returns M, N, K and out."""
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    assert w_q.dim() == 2 and w_q.dtype == FP8 and w_q.is_contiguous(), "w_q must be a contiguous [N, K] e4m3 tensor"
    M, K = x.shape
    N = w_q.shape[0]
    assert w_q.shape[1] == K, f"x has K={K}, w_q has K={w_q.shape[1]}"
    assert w_scale.dtype == torch.float32 and w_scale.numel() == N and w_scale.is_contiguous()
    assert bias is None or (bias.numel() == N and bias.is_contiguous())
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(-1) == 1
    return M, N, K, out


def fp8_w8a16_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                   out: Tensor | None = None, config: tuple | None = None) -> Tensor:
    """[M, K] x [N, K] e4m3 (per-channel fp32 scales) -> [M, N] in x's dtype; one launch (two with
    split-K: the partial sums' reduction), no host sync. config: w8a16_config's tuple (tests force one)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use fp8_w8a16_gemm_ref")
    M, N, K, out = check_gemm_args(x, w_q, w_scale, bias, out)
    if M == 0:
        return out
    bm, bn, bk, split, warps, stages = config or w8a16_config(M, N, K, _num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk           # whole K tiles per split
    split = triton.cdiv(K, k_per_split)                                  # no empty split
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
    b_arg = bias if bias is not None else w_scale
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    _fp8_w8a16_gemm_kernel[grid](x, w_q, w_scale, b_arg, out, ws, M, N, K, k_per_split, x.stride(0), out.stride(0),
                                 HAS_BIAS=bias is not None, EVEN_K=K % bk == 0, SPLIT_K=split,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        _splitk_reduce_kernel[(M, triton.cdiv(N, block))](ws, w_scale, b_arg, out, M, N, out.stride(0),
                                                          HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block,
                                                          num_warps=4)
    return out


def per_token_quant_fp8(x: Tensor, pdl: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scale [M, 1] fp32) in one launch (see per_token_quant_fp8_ref); pdl: launched
    as a programmatic dependent (the caller checked the device and Triton support it)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use per_token_quant_fp8_ref")
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    M, K = x.shape
    x_q = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return x_q, scale
    block = min(2048, max(16, triton.next_power_of_2(K)))
    _per_token_quant_fp8_kernel[(M,)](x, x_q, scale, K, x.stride(0), x_q.stride(0), FP8_MAX, FP8_MAX_C=FP8_MAX,
                                      MIN_SCALE_C=MIN_SCALE, BLOCK=block, num_warps=4 if block <= 1024 else 8,
                                      WAIT=pdl, **({"launch_pdl": True} if pdl else {}))
    return x_q, scale
