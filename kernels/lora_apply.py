"""lora_apply: shrink + expand for one (possibly fused) projection, Triton or reference.

    y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T   for a = slot(t) >= 0
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import interpret_mode, triton_available
from .lora_meta import LoRAMeta


def use_triton(x: Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under TRITON_INTERPRET=1; else the torch reference."""
    return triton_available() and (x.is_cuda or interpret_mode())


def lora_apply(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor,
               meta: LoRAMeta, ranks: Tensor, buf: Tensor | None = None) -> Tensor:
    """Add the LoRA deltas of every token to y in place and return y.

    x [T, H_in]; y [T, N] (column view allowed); lora_a [L, S, R, H_in]; lora_b [L, N, R];
    slice_offsets [S+1] int32; ranks [L] int32; buf optional float32 [S, T, R] workspace
    (pass a static one under CUDA graphs).
    """
    from .reference import lora_expand_ref, lora_shrink_ref

    S, R = lora_a.shape[1], lora_a.shape[2]
    if buf is None:
        buf = torch.empty(S, x.shape[0], R, dtype=torch.float32, device=x.device)
    if use_triton(x):
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        lora_shrink(x, lora_a, meta, ranks, buf)
        lora_expand(buf, lora_b, slice_offsets, meta, ranks, y)
    else:
        lora_shrink_ref(x, lora_a, meta, ranks, buf)
        lora_expand_ref(buf, lora_b, slice_offsets, meta, ranks, y)
    return y
