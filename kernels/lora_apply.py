"""lora_apply: the LoRA delta of one (possibly fused) projection, Triton or reference.

    y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T   for a = slot(t) >= 0

Triton path, chosen from host-known shapes only (so a CUDA graph keeps its kernels):
  * small steps (lora_fused.use_fused): one launch, shrink + expand fused;
  * otherwise two launches: shrink writes its split-K partials [SPLIT_K, S, T, R] and expand
    sums them while loading (no separate reduction launch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import interpret_mode, triton_available
from .lora_meta import LoRAMeta


def use_triton(x: Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under TRITON_INTERPRET=1; else the torch reference."""
    return triton_available() and (x.is_cuda or interpret_mode())


def workspace_shape(x: Tensor, lora_a: Tensor, meta: LoRAMeta) -> tuple[int, ...]:
    """Shape of the float32 workspace ``lora_apply`` wants for these inputs ((0,) if none)."""
    T, (L, S, R, H) = x.shape[0], lora_a.shape
    if not use_triton(x):
        return (S, T, R)
    from .lora_fused import use_fused
    from .lora_shrink import shrink_split_k

    if use_fused(T, R, H):
        return (0,)
    return (shrink_split_k(x, lora_a, meta.block_m), S, T, R)


def lora_apply(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor,
               meta: LoRAMeta, ranks: Tensor, buf: Tensor | None = None) -> Tensor:
    """Add the LoRA deltas of every token to y in place and return y.

    x [T, H_in]; y [T, N] (column view allowed); lora_a [L, S, R, H_in]; lora_b [L, N, R];
    slice_offsets [S+1] int32; ranks [L] int32; buf optional float32 workspace of
    ``workspace_shape(x, lora_a, meta)`` (pass a static one under CUDA graphs; any other
    shape is replaced by a fresh allocation).
    """
    from .reference import lora_expand_ref, lora_shrink_ref

    shape = workspace_shape(x, lora_a, meta)
    if buf is None or tuple(buf.shape) != shape:
        buf = torch.empty(shape, dtype=torch.float32, device=x.device)
    if use_triton(x):
        if buf.numel() == 0 and shape == (0,):
            from .lora_fused import lora_shrink_expand

            return lora_shrink_expand(x, lora_a, lora_b, slice_offsets, meta, ranks, y)
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        lora_shrink(x, lora_a, meta, ranks, buf)   # [SPLIT_K, S, T, R] partials
        lora_expand(buf, lora_b, slice_offsets, meta, ranks, y)
    else:
        lora_shrink_ref(x, lora_a, meta, ranks, buf)
        lora_expand_ref(buf, lora_b, slice_offsets, meta, ranks, y)
    return y
