"""Rotary position embedding (rotate-half, as HF Llama) on q and k in one launch per layer.

cos/sin are not recomputed per layer: ``rope_cos_sin_cache`` builds a table once per model
(vLLM's ``cos_sin_cache``), [P, D] fp32 with row p = [cos(p * inv_freq), sin(p * inv_freq)]
(each D/2 wide; rope scaling such as llama3/linear lives in inv_freq), and the kernel reads
the row of each token's position. No per-step work, and graph-capturable (positions are
device data).

Semantics, for each token t with p = positions[t], every head h and i < D/2:
    c, s = cache[p, i], cache[p, D/2 + i]
    out[t, h, i]       = (x1 * c - x2 * s).to(dtype)      x1 = x[t, h, i].f32
    out[t, h, D/2 + i] = (x2 * c + x1 * s).to(dtype)      x2 = x[t, h, D/2 + i].f32
for x = q [T, H, D] and k [T, KVH, D] (token and head strides free, last dim contiguous).
Outputs default to the inputs (in place); fp32 math with one rounding, as vLLM does (HF
rounds cos/sin and each product to the dtype first: equal in fp32, within bf16 noise).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton


def rope_cos_sin_cache(inv_freq: Tensor, num_positions: int) -> Tensor:
    """[P, D] fp32 table: [:, :D/2] = cos(p * inv_freq), [:, D/2:] = sin(p * inv_freq).

    Same fp32 product as HF's per-step ``inv_freq @ positions``, so the values match it.
    """
    pos = torch.arange(num_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]  # (P, D/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-torch reference (out of place): returns (q_rot, k_rot)."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())   # (T, D)
    cos, sin = cs[:, None, :half], cs[:, None, half:]       # (T, 1, D/2)

    def rot(x: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


if HAS_TRITON:

    @triton.jit
    def _rope_one(x_ptr, o_ptr, t, stride_xt, stride_xh, stride_ot, stride_oh, NH, c, s,
                  HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, HALF_P2)
        ok = (heads < NH)[:, None] & (cols < HALF)[None, :]
        x_row = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
        x1 = tl.load(x_row, mask=ok, other=0.0)
        x2 = tl.load(x_row + HALF, mask=ok, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        o_row = o_ptr + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        tl.store(o_row, (f1 * c[None, :] - f2 * s[None, :]).to(x1.dtype), mask=ok)
        tl.store(o_row + HALF, (f2 * c[None, :] + f1 * s[None, :]).to(x1.dtype), mask=ok)

    @triton.jit
    def _rope_kernel(pos_ptr, cache_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, H, KVH,
                     stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_qot, stride_qoh, stride_kot, stride_koh, stride_c, num_positions,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_KVH: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        # Clamped: a position past the table must not read out of bounds (callers size it).
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        cols = tl.arange(0, HALF_P2)
        c = tl.load(cache_ptr + p * stride_c + cols, mask=cols < HALF, other=0.0)
        s = tl.load(cache_ptr + p * stride_c + HALF + cols, mask=cols < HALF, other=0.0)
        _rope_one(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, H, c, s, HALF, HALF_P2, BLOCK_H)
        _rope_one(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, KVH, c, s, HALF, HALF_P2,
                  BLOCK_KVH)


def apply_rope(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
               q_out: Tensor | None = None, k_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by positions [T] (int32/int64 < P), one launch.

    cos_sin_cache: [P, D] fp32 from :func:`rope_cos_sin_cache`; positions >= P are clamped
    to P - 1 (size the table to the longest sequence). q_out/k_out (same shapes,
    e.g. fresh contiguous tensors) default to q/k: in place. Returns (q_out, k_out).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use apply_rope_ref")
    q_out = q if q_out is None else q_out
    k_out = k if k_out is None else k_out
    T, H, D = q.shape
    KVH = k.shape[1]
    assert k.shape == (T, KVH, D) and q_out.shape == q.shape and k_out.shape == k.shape
    assert D % 2 == 0, f"head_dim must be even, got D={D}"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D and cos_sin_cache.dtype == torch.float32 \
        and cos_sin_cache.stride(1) == 1, f"cos_sin_cache must be fp32 [P, {D}]"
    assert all(x.stride(-1) == 1 for x in (q, k, q_out, k_out)), "last dim must be contiguous"
    assert positions.shape == (T,), f"positions must be [T={T}]"
    if T == 0:
        return q_out, k_out
    _rope_kernel[(T,)](positions, cos_sin_cache, q, k, q_out, k_out, H, KVH,
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                       cos_sin_cache.stride(0), cos_sin_cache.shape[0], HALF=D // 2,
                       HALF_P2=triton.next_power_of_2(D // 2), BLOCK_H=triton.next_power_of_2(H),
                       BLOCK_KVH=triton.next_power_of_2(KVH), num_warps=4)
    return q_out, k_out
