"""The one-token qkv GEMV with RoPE and the e4m3 K/V cache write in its epilogue (FP8 decode, batch of 1-4 rows).

    Semantics, for token t (one x row per program row), p = positions[t], s = slot_mapping[t]:
        qkv[t] = x[t] @ dequant(w_q)^T (+ bias), rounded to x's dtype           (kernels/fp8_gemv.py, kind gemvh2/4)
        q_out[t]  = rope(qkv[t, :Q], p)                                           (x's dtype)
        k_cache.view(-1, KV)[s] = e4m3(dtype(rope(qkv[t, Q:Q+KV], p)) / k_scale)  (saturating at +-448)
        v_cache.view(-1, KV)[s] = e4m3(qkv[t, Q+KV:] / v_scale)
    x [M, K]; w_q [Q + 2 KV, K] e4m3 (the fused qkv_proj, heads of D = 2 HALF rows); w_scale [N] fp32; q_out [M, Q];
    k_cache / v_cache [blocks, BS, KVH, D] e4m3 contiguous; cos_sin_cache [P, D] fp32; k_scale, v_scale [1] fp32.

Why: at one token a decoder layer is a chain of short kernels and each boundary costs a launch and a ramp
(kernels/PERF_NOTES.md). kernels/fp8_rope_kv.py is already the RoPE + cache write in one launch after the qkv GEMV;
here it moves into the GEMV: the program that holds output row d of a head also holds row d + D/2 (its RoPE partner),
so it rotates its pair and writes q, or the k / v codes, itself. Its loop is the fp16-product GEMV's (_half_chunk:
same tiles, same order), the roundings those of the GEMV's store and of fp8_rope_kv: the same bits as the two launches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs  # noqa: F401  (the launcher's WAIT decision is fp8_gemv's)

if HAS_TRITON:
    from .fp8_gemv_half import _half_chunk
    from .fp8_rope_kv import _quant_store, _rot

    @triton.jit
    def _rope_pair_store(acc_a, acc_b, t, row0, offs_a, jcol, s_ptr, b_ptr, pos_ptr, cs_ptr, stride_c, num_positions,
                         slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE, KV_SIZE,
                         HAS_BIAS: tl.constexpr, HALF: tl.constexpr):
        # acc_a / acc_b [BLOCK_N, BLOCK_K]: rows offs_a (columns jcol < HALF of a head starting at row0) and offs_a + HALF
        offs_b = offs_a + HALF
        ya = tl.sum(acc_a, axis=1) * tl.load(s_ptr + offs_a)
        yb = tl.sum(acc_b, axis=1) * tl.load(s_ptr + offs_b)
        if HAS_BIAS:
            ya = ya + tl.load(b_ptr + offs_a).to(tl.float32)
            yb = yb + tl.load(b_ptr + offs_b).to(tl.float32)
        dt = qo_ptr.dtype.element_ty
        ya = ya.to(dt).to(tl.float32)   # the GEMV's store rounding (what fp8_rope_kv reads back)
        yb = yb.to(dt).to(tl.float32)
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        c = tl.load(cs_ptr + p * stride_c + jcol)
        sn = tl.load(cs_ptr + p * stride_c + HALF + jcol)
        ra, rb = _rot(ya, yb, c, sn)   # fp8_rope_kv's arithmetic (explicit FMAs)
        if row0 < Q_SIZE:   # q: rotated, stored in x's dtype
            tl.store(qo_ptr + t * stride_qo + offs_a, ra.to(dt))
            tl.store(qo_ptr + t * stride_qo + offs_b, rb.to(dt))
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            ok = offs_a >= 0
            if row0 < Q_SIZE + KV_SIZE:   # k: rotated, rounded to the dtype, then the e4m3 code (fp8_rope_kv)
                dst = kc_ptr + slot * KV_SIZE + (offs_a - Q_SIZE)
                k_scale = tl.load(ks_ptr)
                _quant_store(ra.to(dt).to(tl.float32), k_scale, dst, ok)
                _quant_store(rb.to(dt).to(tl.float32), k_scale, dst + HALF, ok)
            else:   # v: the e4m3 code of the rounded GEMV output
                dst = vc_ptr + slot * KV_SIZE + (offs_a - Q_SIZE - KV_SIZE)
                v_scale = tl.load(vs_ptr)
                _quant_store(ya, v_scale, dst, ok)
                _quant_store(yb, v_scale, dst + HALF, ok)

    @triton.jit(do_not_specialize=["M"])
    def _fp8_qkv_rope_kernel(x_ptr, w_ptr, s_ptr, b_ptr, M, K, stride_xm, x16_scale, pos_ptr, cs_ptr, stride_c,
                             num_positions, slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE,
                             KV_SIZE, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, FLUSH: tl.constexpr, HALF: tl.constexpr, WAIT: tl.constexpr,
                             EARLY: tl.constexpr):
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_k = tl.arange(0, BLOCK_K)
        # this program's rows: GROUPS / 2 blocks of BLOCK_N columns in the first half of one head, and their partners
        PAIRS: tl.constexpr = GROUPS // 2
        per_head = HALF // (PAIRS * BLOCK_N)
        row0 = (pid_n // per_head) * (2 * HALF)
        j = (pid_n % per_head) * (PAIRS * BLOCK_N)
        cols = j + tl.arange(0, BLOCK_N)
        offs_0 = row0 + cols
        if GROUPS == 2:
            offs_1 = offs_0 + HALF
            offs_2 = offs_0
            offs_3 = offs_0
        else:
            offs_1 = offs_0 + BLOCK_N
            offs_2 = offs_0 + HALF
            offs_3 = offs_1 + HALF
        p0 = w_ptr + offs_0.to(tl.int64)[:, None] * K + offs_k[None, :]
        p1 = w_ptr + offs_1.to(tl.int64)[:, None] * K + offs_k[None, :]
        p2 = w_ptr + offs_2.to(tl.int64)[:, None] * K + offs_k[None, :]
        p3 = w_ptr + offs_3.to(tl.int64)[:, None] * K + offs_k[None, :]
        x_ptrs = x_ptr + row.to(tl.int64) * stride_xm + offs_k[None, :] + tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if EARLY:   # as _fp8_gemv_half_kernel: the first weight tiles load while the kernel before us finishes
            f0 = tl.load(p0, eviction_policy="evict_first")
            f1 = tl.load(p1, eviction_policy="evict_first")
            f2 = tl.load(p2, eviction_policy="evict_first") if GROUPS >= 4 else f0
            f3 = tl.load(p3, eviction_policy="evict_first") if GROUPS >= 4 else f0
        else:
            f0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)
            f1 = f0
            f2 = f0
            f3 = f0
        if WAIT:   # a programmatic dependent (kernels/pdl.py): x, positions and slots come from kernels before us
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        k_first = 0
        if EARLY:
            acc0, acc1, acc2, acc3 = _half_chunk(acc0, acc1, acc2, acc3, p0, p1, p2, p3, x_ptrs, x16_scale,
                                                 f0, f1, f2, f3, True, GROUPS, BLOCK_K, FLUSH)
            p0 += FLUSH * BLOCK_K
            p1 += FLUSH * BLOCK_K
            p2 += FLUSH * BLOCK_K
            p3 += FLUSH * BLOCK_K
            x_ptrs += FLUSH * BLOCK_K
            k_first = FLUSH * BLOCK_K
        for k0 in range(k_first, K, FLUSH * BLOCK_K):
            acc0, acc1, acc2, acc3 = _half_chunk(acc0, acc1, acc2, acc3, p0, p1, p2, p3, x_ptrs, x16_scale,
                                                 f0, f1, f2, f3, False, GROUPS, BLOCK_K, FLUSH)
            p0 += FLUSH * BLOCK_K
            p1 += FLUSH * BLOCK_K
            p2 += FLUSH * BLOCK_K
            p3 += FLUSH * BLOCK_K
            x_ptrs += FLUSH * BLOCK_K
        inv = 1.0 / x16_scale
        t = row.to(tl.int64)
        if GROUPS == 2:
            _rope_pair_store(acc0 * inv, acc1 * inv, t, row0, offs_0, cols, s_ptr, b_ptr, pos_ptr, cs_ptr, stride_c,
                             num_positions, slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE,
                             KV_SIZE, HAS_BIAS, HALF)
        else:
            _rope_pair_store(acc0 * inv, acc2 * inv, t, row0, offs_0, cols, s_ptr, b_ptr, pos_ptr, cs_ptr, stride_c,
                             num_positions, slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr, Q_SIZE,
                             KV_SIZE, HAS_BIAS, HALF)
            _rope_pair_store(acc1 * inv, acc3 * inv, t, row0, offs_1, cols + BLOCK_N, s_ptr, b_ptr, pos_ptr, cs_ptr,
                             stride_c, num_positions, slot_ptr, qo_ptr, stride_qo, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                             Q_SIZE, KV_SIZE, HAS_BIAS, HALF)


def qkv_rope_config_ok(cfg: tuple, K: int, head_dim: int) -> bool:
    """A GEMV config this kernel runs: an fp16-product grouped kind (gemvh2 / gemvh4) without split-K, whose K splits
    into whole chunks of BLOCK_K x FLUSH, and whose column block (BLOCK_N x GROUPS / 2) divides head_dim / 2."""
    kind, bn, bk, split, stages = cfg[0], cfg[2], cfg[3], cfg[4], cfg[6]
    if kind not in ("gemvh2", "gemvh4") or split != 1 or head_dim % 2:
        return False
    return K % (bk * stages) == 0 and (head_dim // 2) % (bn * int(kind[-1]) // 2) == 0


def fp8_qkv_rope_kv(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, cfg: tuple, positions: Tensor,
                    cos_sin_cache: Tensor, slot_mapping: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor,
                    v_scale: Tensor, q_size: int, kv_size: int, wait: bool = False, early: bool = False) -> Tensor:
    """See the module docstring: returns q_out [M, q_size] (RoPE applied), writes k_cache / v_cache in place. One
    launch, no host sync (graph-safe). cfg must pass qkv_rope_config_ok; wait / early: fp8_gemv's PDL decision."""
    from .fp8_gemv_half import GEMVH_X_SCALE

    M, K = x.shape
    N = w_q.shape[0]
    D = k_cache.shape[-1]
    assert x.stride(-1) == 1 and w_q.is_contiguous() and N == q_size + 2 * kv_size and w_q.shape[1] == K
    assert qkv_rope_config_ok(cfg, K, D) and q_size % D == 0 and kv_size % D == 0, (cfg, K, D)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2] * D == kv_size
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.shape[1] == D and cos_sin_cache.stride(1) == 1
    q_out = torch.empty((M, q_size), dtype=x.dtype, device=x.device)
    if M == 0:
        return q_out
    kind, _, bn, bk, _, warps, stages = cfg[:7]
    groups = int(kind[-1])
    grid = (M, N // (groups * bn))
    _fp8_qkv_rope_kernel[grid](
        x, w_q, w_scale, bias if bias is not None else w_scale, M, K, x.stride(0), GEMVH_X_SCALE, positions,
        cos_sin_cache, cos_sin_cache.stride(0), cos_sin_cache.shape[0], slot_mapping, q_out, q_out.stride(0), k_cache,
        v_cache, k_scale, v_scale, q_size, kv_size, HAS_BIAS=bias is not None, GROUPS=groups, BLOCK_N=bn, BLOCK_K=bk,
        FLUSH=stages, HALF=D // 2, WAIT=wait, EARLY=early, num_warps=warps, num_stages=1,
        **({"launch_pdl": True} if wait else {}))
    return q_out
