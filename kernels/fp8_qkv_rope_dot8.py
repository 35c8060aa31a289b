"""The qkv GEMM at 33..64 tokens (W8A8 dot8) with RoPE and the e4m3 K/V cache write in its epilogue (FP8 decode).

    Semantics, for token t, p = positions[t], s = slot_mapping[t]:
        qkv[t] = dot8(x, w_q, w_scale)[t], rounded to the dtype      (kernels/fp8_gemv.py dot8: x per token in e4m3)
        q_out[t] = rope(qkv[t, :Q], p); k_cache / v_cache row s = e4m3 codes of rope(k) / v   (kernels/fp8_rope_kv.py)
    x_q [M, K] e4m3 + x_scale [M, 1] (the input norm's codes); w_q [Q + 2 KV, K] e4m3 (heads of D = 2 HALF rows);
    w_scale [N] fp32; q_out [M, Q] in `dtype`; caches [blocks, BS, KVH, D] e4m3; cos_sin_cache [P, D] fp32.

Why: at batch 64 the qkv projection was three launches (cuBLASLt's unit-scale FP8 GEMM 10.3 us, its scaling 2.5,
RoPE + K/V write 3.6; FP8 sixth pass). One program here holds rows d and d + D/2 of one head for BLOCK_M tokens
(fp8_skinny_dot._dot8_pair: two weight tiles, one x tile, dot8's K loop), so it rotates the pair and writes q or
the k / v codes itself (fp8_qkv_rope._rope_pair_out, the one-token form's epilogue): one launch. The bits are dot8's
GEMM + rope_store_kv_fp8's (tw sums K in cuBLASLt's order: another rounding of the same W8A8 product).
Grid (M / BLOCK_M, heads): 48 heads on the 8B shape, so BLOCK_M 16-32 for enough programs (each re-reads its
head's 1 MB of weights per row tile: from L2 after the first).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .fp8_qkv_rope import _rope_pair_out
    from .fp8_skinny_dot import _dot8_pair

    @triton.jit(do_not_specialize=["M"])
    def _fp8_qkv_rope_dot8_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, M, K, stride_xm, pos_ptr, cs_ptr, stride_c,
                                  num_positions, slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE,
                                  KV_SIZE, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                  EVEN_K: tl.constexpr, PRECISE: tl.constexpr, TRIGGER: tl.constexpr):
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        row0 = head * (2 * HALF)
        jcol = tl.arange(0, HALF)
        offs_a = row0 + jcol
        w_ptrs = w_ptr + offs_a.to(tl.int64)[:, None] * K + offs_k[None, :]                        # [HALF, BK]
        xt_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]                # [BK, BM]
        acc_a, acc_b = _dot8_pair(w_ptrs, w_ptrs + HALF * K, xt_ptrs, m_ok, 0, K, offs_k, HALF, BLOCK_M, BLOCK_K,
                                  EVEN_K, PRECISE)
        if TRIGGER:   # the attention after us (a programmatic dependent: it waits for our completion) may launch
            tl.extra.cuda.gdc_launch_dependents()
        xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
        dt = qo_ptr.dtype.element_ty
        # dot8's epilogue and store rounding: (acc * x_scale) * w_scale, to the dtype
        ya = ((acc_a * xs[None, :]) * tl.load(s_ptr + offs_a)[:, None]).to(dt).to(tl.float32)
        yb = ((acc_b * xs[None, :]) * tl.load(s_ptr + offs_a + HALF)[:, None]).to(dt).to(tl.float32)
        t = tl.where(m_ok, offs_m, 0).to(tl.int64)[None, :]
        ok = m_ok[None, :] & (jcol >= 0)[:, None]
        _rope_pair_out(ya, yb, t, ok, row0, offs_a[:, None], jcol[:, None], pos_ptr, cs_ptr, stride_c, num_positions,
                       slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE, KV_SIZE, HALF)


def qkv_rope_dot8_config(raw: str | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, warps, stages): LORASERVE_FP8_QKV_ROPE_DOT8_CFG="bm:bk:warps:stages" (probes), default
    32:128:4:3."""
    import os

    raw = raw if raw is not None else os.environ.get("LORASERVE_FP8_QKV_ROPE_DOT8_CFG", "")
    vals = [int(v) for v in raw.split(":")] if raw.strip() else [32, 128, 4, 3]
    assert len(vals) == 4, f"LORASERVE_FP8_QKV_ROPE_DOT8_CFG wants bm:bk:warps:stages, got {raw!r}"
    return tuple(vals)


def fp8_qkv_rope_dot8(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, positions: Tensor,
                      cos_sin_cache: Tensor, slot_mapping: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor,
                      v_scale: Tensor, q_size: int, kv_size: int, dtype: torch.dtype, config: tuple | None = None,
                      precise: bool = True, trigger: bool = False) -> Tensor:
    """See the module docstring: q_out [M, q_size] in `dtype` (RoPE applied); k_cache / v_cache written in place. One
    launch, no host sync (graph-safe). config: qkv_rope_dot8_config()'s form; trigger: let a programmatic dependent
    (the attention) launch after the main loop."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    M, K = x_q.shape
    N = w_q.shape[0]
    D = k_cache.shape[-1]
    assert x_q.dtype == torch.float8_e4m3fn and x_q.stride(-1) == 1 and x_scale.numel() == M
    assert w_q.is_contiguous() and w_q.shape[1] == K and N == q_size + 2 * kv_size and w_scale.numel() == N
    assert q_size % D == 0 and kv_size % D == 0 and D % 2 == 0 and (D // 2) >= 16 and (D // 2) & (D // 2 - 1) == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2] * D == kv_size
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.shape[1] == D and cos_sin_cache.stride(1) == 1
    q_out = torch.empty((M, q_size), dtype=dtype, device=x_q.device)
    if M == 0:
        return q_out
    bm, bk, warps, stages = config or qkv_rope_dot8_config()
    _fp8_qkv_rope_dot8_kernel[(triton.cdiv(M, bm), N // D)](
        x_q, x_scale, w_q, w_scale, M, K, x_q.stride(0), positions, cos_sin_cache, cos_sin_cache.stride(0),
        cos_sin_cache.shape[0], slot_mapping, q_out, q_out.stride(0), k_cache, v_cache, k_scale, v_scale, q_size,
        kv_size, HALF=D // 2, BLOCK_M=bm, BLOCK_K=bk, EVEN_K=K % bk == 0, PRECISE=precise, TRIGGER=trigger,
        num_warps=warps, num_stages=stages)
    return q_out
