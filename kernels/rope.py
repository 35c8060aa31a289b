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

from ._triton import HAS_TRITON, no_specialize, tl, triton
from .pdl import pdl_kwargs


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

    @triton.jit(**no_specialize(pointers=("pos_ptr",)))
    def _rope_kernel(pos_ptr, cache_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, H, KVH,
                     stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_qot, stride_qoh, stride_kot, stride_koh, stride_c, num_positions,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_KVH: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: q, k and positions come from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        # Clamped: a position past the table must not read out of bounds (callers size it).
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        cols = tl.arange(0, HALF_P2)
        c = tl.load(cache_ptr + p * stride_c + cols, mask=cols < HALF, other=0.0)
        s = tl.load(cache_ptr + p * stride_c + HALF + cols, mask=cols < HALF, other=0.0)
        _rope_one(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, H, c, s, HALF, HALF_P2, BLOCK_H)
        _rope_one(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, KVH, c, s, HALF, HALF_P2,
                  BLOCK_KVH)

    @triton.jit(**no_specialize(pointers=("pos_ptr", "slot_ptr")))
    def _rope_store_kv_kernel(pos_ptr, cache_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qo_ptr, k_cache_ptr, v_cache_ptr,
                              H, KVH, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_qot, stride_qoh, stride_c, num_positions,
                              HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_KVH: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: q, k, v, positions and slots come from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cols = tl.arange(0, HALF_P2)
        c = tl.load(cache_ptr + p * stride_c + cols, mask=cols < HALF, other=0.0)
        s = tl.load(cache_ptr + p * stride_c + HALF + cols, mask=cols < HALF, other=0.0)
        _rope_one(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, H, c, s, HALF, HALF_P2, BLOCK_H)
        # the cache row of this token: [KVH, D] contiguous at slot * KVH * D (the cache's layout)
        row = KVH * 2 * HALF
        _rope_one(k_ptr, k_cache_ptr + slot * row, t, stride_kt, stride_kh, 0, 2 * HALF, KVH, c, s, HALF, HALF_P2,
                  BLOCK_KVH)
        heads = tl.arange(0, BLOCK_KVH)
        ok = (heads < KVH)[:, None] & (cols < HALF)[None, :]
        v_row = v_ptr + t * stride_vt + heads[:, None] * stride_vh + cols[None, :]
        o_row = v_cache_ptr + slot * row + heads[:, None] * (2 * HALF) + cols[None, :]
        tl.store(o_row, tl.load(v_row, mask=ok, other=0.0), mask=ok)
        tl.store(o_row + HALF, tl.load(v_row + HALF, mask=ok, other=0.0), mask=ok)


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
                       BLOCK_KVH=triton.next_power_of_2(KVH), num_warps=4, **pdl_kwargs(q.device))
    return q_out, k_out


def rope_store_kv_ref(positions: Tensor, q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor,
                      k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """Reference of rope_store_kv: RoPE (apply_rope_ref), then the rotated k and v written at their slots."""
    q_rot, k_rot = apply_rope_ref(positions, q, k, cos_sin_cache)
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping.long(), k_rot)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping.long(), v)
    return q_rot


def rope_store_kv(positions: Tensor, q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, q_out: Tensor | None = None) -> Tensor:
    """RoPE on q and k, and the step's K/V written into the paged cache, in one launch.

    Semantics, for token t with p = positions[t], s = slot_mapping[t]:
        q_out[t]                          = rope(q[t], p)
        k_cache.view(-1, KVH, D)[s]       = rope(k[t], p)
        v_cache.view(-1, KVH, D)[s]       = v[t]
    q [T, H, D], k / v [T, KVH, D] (token and head strides free: views of the fused qkv; last dim
    contiguous); k_cache / v_cache [num_blocks, BS, KVH, D] contiguous, q's dtype; slot_mapping [T].
    Replaces apply_rope + v.contiguous() + two index_copy_ (4 launches per layer). Returns q_out
    (a fresh contiguous [T, H, D] unless given).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use rope_store_kv_ref")
    T, H, D = q.shape
    KVH = k.shape[1]
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if q_out is None else q_out
    assert k.shape == (T, KVH, D) and v.shape == (T, KVH, D) and q_out.shape == q.shape, (q.shape, k.shape, v.shape)
    assert D % 2 == 0, f"head_dim must be even, got D={D}"
    assert k_cache.shape[2:] == (KVH, D) and v_cache.shape == k_cache.shape, (k_cache.shape, k.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype == q.dtype == k.dtype == v.dtype, (q.dtype, k_cache.dtype)
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D and cos_sin_cache.dtype == torch.float32 \
        and cos_sin_cache.stride(1) == 1, f"cos_sin_cache must be fp32 [P, {D}]"
    assert all(x.stride(-1) == 1 for x in (q, k, v, q_out)), "last dim must be contiguous"
    assert positions.shape == (T,) and slot_mapping.shape == (T,), (positions.shape, slot_mapping.shape)
    if T == 0:
        return q_out
    _rope_store_kv_kernel[(T,)](positions, cos_sin_cache, slot_mapping, q, k, v, q_out, k_cache, v_cache, H, KVH,
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0), cos_sin_cache.shape[0],
                                HALF=D // 2, HALF_P2=triton.next_power_of_2(D // 2),
                                BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH),
                                num_warps=4, **pdl_kwargs(q.device))
    return q_out
