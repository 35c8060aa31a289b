"""FP8 (e4m3) quantization math of the FP8 model path (models/fp8.py): per output channel for weights, per token
for activations, per tensor for the KV cache; saturating at +-448. Pure torch: the CPU path and the tests' oracle."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_MIN_SCALE = 1e-12


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (w_q [out, in] e4m3, scale [out] fp32), w ~= w_q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] -> (x_q [N, in] e4m3, scale [N, 1] fp32): one scale per token (row)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x (any shape) / a per-tensor scale -> e4m3, saturating at +-448 (KV cache, static activations)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x_q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values times their scale (broadcast: [out, 1] per row, [N, 1] per token, or a scalar)."""
    return (x_q.float() * scale).to(dtype)
