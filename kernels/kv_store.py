"""Write a step's K/V into an FP8 (e4m3) paged KV cache, quantizing with per-tensor scales, Triton.

Semantics, for token n of the step and its cache slot s = slot_mapping[n]:
    k_cache.view(-1, KVH, D)[s] = e4m3(clamp(k[n] / k_scale, -448, 448))     (the same for v)
k, v: [N, KVH, D] (bf16/fp16/fp32, each row's KVH x D contiguous); k_cache, v_cache: [num_blocks, BS,
KVH, D] float8_e4m3fn, contiguous; slot_mapping: [N] int; k_scale, v_scale: [1] fp32 on the device.

vLLM's reshape_and_cache_flash with kv_cache_dtype="fp8" as one launch: the torch version (divide,
clamp, cast, then an index_copy_ per cache) is ~10 small kernels per layer, which inside a decode
step's CUDA graph cost more than the attention they feed at batch 1. The division is IEEE (div_rn)
and the cast rounds to nearest even, as torch's, so both write the same codes. Scales are read from
device memory: a graph captured before calibration writes with the calibrated scales at replay.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, no_specialize, tl, triton

FP8_MAX = 448.0

if HAS_TRITON:

    @triton.jit(**no_specialize(pointers=("slot_ptr",)))   # slots: a view into the step's input buffer
    def _store_kv_fp8_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                             stride_kn, stride_vn, ROW: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = offs < ROW
        k = tl.load(k_ptr + n.to(tl.int64) * stride_kn + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + n.to(tl.int64) * stride_vn + offs, mask=ok, other=0.0).to(tl.float32)
        k = tl.minimum(tl.maximum(tl.math.div_rn(k, tl.load(k_scale_ptr)), -448.0), 448.0)   # e4m3's max
        v = tl.minimum(tl.maximum(tl.math.div_rn(v, tl.load(v_scale_ptr)), -448.0), 448.0)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv_fp8(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                 k_scale: Tensor, v_scale: Tensor) -> None:
    """See the module docstring. Writes k_cache / v_cache in place; no host sync (graph-safe)."""
    N, KVH, D = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (N,), (k.shape, v.shape, slot_mapping.shape)
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn, k_cache.dtype
    assert k_cache.shape[2:] == (KVH, D) and v_cache.shape == k_cache.shape, (k_cache.shape, k.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    for scale in (k_scale, v_scale):
        assert scale.numel() == 1 and scale.dtype == torch.float32 and scale.device == k.device
    if k.stride(2) != 1 or k.stride(1) != D:
        k = k.contiguous()
    if v.stride(2) != 1 or v.stride(1) != D:
        v = v.contiguous()
    if N == 0:
        return
    row = KVH * D
    block = min(1024, triton.next_power_of_2(row))
    _store_kv_fp8_kernel[(N, triton.cdiv(row, block))](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, k.stride(0), v.stride(0),
        ROW=row, BLOCK=block, num_warps=4)


def store_kv_fp8_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                     k_scale: Tensor | float, v_scale: Tensor | float) -> None:
    """Obviously-right version (torch): quantize, then copy the bytes (index_copy_ has no float8 CPU kernel)."""
    KVH, D = k.shape[1], k.shape[2]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        cache.view(torch.uint8).view(-1, KVH, D).index_copy_(0, slot_mapping, codes.view(torch.uint8))
