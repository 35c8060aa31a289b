"""RMSNorm, alone and fused with the residual add (vLLM's ``rms_norm`` / ``fused_add_rms_norm``).

Semantics (HF LlamaRMSNorm numerics: fp32 math, the normalised row rounded to the input
dtype *before* the weight multiply, which rounds again):
    rms_norm:            out = w * (x.f32 * rsqrt(mean(x.f32^2) + eps)).to(dtype)
    fused_add_rms_norm:  residual <- (x.f32 + residual.f32).to(dtype)     (in place)
                         x        <- rms_norm(residual)                   (in place)
x, residual, out: [T, H] (rows may be strided, the last dim contiguous); w: [H].
One program per row; H <= 16384 fits one block (Llama hidden sizes are 2k-8k).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Pure-torch reference, exactly HF's LlamaRMSNorm.forward."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Reference of the fused op, same in-place contract: returns (x, residual), both updated."""
    residual.copy_(x + residual)  # HF: hidden = residual + hidden, rounded to the model dtype
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, H, eps,
                         stride_x, stride_r, stride_o,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: every input comes from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        dtype = x.dtype
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # rounded like the torch add
            tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        normed = (xf * inv).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (w * normed).to(dtype), mask=ok)


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, out: Tensor, eps: float) -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use rms_norm_ref / fused_add_rms_norm_ref")
    assert x.dim() == 2 and x.stride(-1) == 1 and out.stride(-1) == 1, "x/out must be [T, H], last dim contiguous"
    T, H = x.shape
    assert weight.shape == (H,) and weight.dtype == x.dtype, f"weight must be {x.dtype} [{H}]"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    if T == 0:
        return
    block = triton.next_power_of_2(H)
    res = residual if residual is not None else x
    _rms_norm_kernel[(T,)](x, res, weight, out, H, eps, x.stride(0), res.stride(0), out.stride(0),
                           HAS_RESIDUAL=residual is not None, BLOCK=block,
                           num_warps=min(16, max(1, block // 512)), **pdl_kwargs(x.device))


def rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """out [T, H] = RMSNorm(x [T, H]) * weight [H], one launch."""
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """residual += x; x = RMSNorm(residual) * weight; both in place, one launch. Returns (x, residual)."""
    _launch(x, residual, weight, x, eps)
    return x, residual
