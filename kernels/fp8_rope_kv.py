"""RoPE on q and k, and the step's K/V quantized into an FP8 (e4m3) paged KV cache, in one launch.

    Semantics, for token t with p = positions[t], s = slot_mapping[t]:
        q_out[t]                     = rope(q[t], p)                                      (q's dtype)
        k_cache.view(-1, KVH, D)[s]  = e4m3(clamp(dtype(rope(k[t], p)) / k_scale, -448, 448))
        v_cache.view(-1, KVH, D)[s]  = e4m3(clamp(v[t] / v_scale, -448, 448))
    q [T, H, D], k / v [T, KVH, D] bf16/fp16/fp32 (token and head strides free: views of the fused qkv; last dim
    contiguous); k_cache / v_cache [num_blocks, BS, KVH, D] float8_e4m3fn contiguous; slot_mapping, positions [T];
    cos_sin_cache [P, D] fp32 (kernels/rope.py); k_scale, v_scale [1] fp32 on the device (read at run time, so a
    CUDA graph captured before calibration writes with the calibrated scales).

The FP8 cache's form of kernels/rope.py rope_store_kv (the bf16 engine's fused decode op): it replaces
apply_rope + store_kv_fp8 (two launches per layer, neither a programmatic dependent). The rotation is written with
explicit FMAs (_rot), shared with the qkv-GEMV-fused form (kernels/fp8_qkv_rope.py), so both write the same bits. The rotated k is rounded
to k's dtype before the division, as the two-launch path rounds it when apply_rope writes it back, so both
write the same codes (division div_rn and round-to-nearest-even cast, as torch and kernels/kv_store.py).
vLLM does the same in one op (rotary_embedding, then reshape_and_cache_flash with kv_cache_dtype="fp8",
fused in its FlashInfer path).
"""
from __future__ import annotations


import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs

FP8_MAX = 448.0

if HAS_TRITON:

    @triton.jit
    def _rot(x1, x2, c, s):
        # rotate-half RoPE of the pairs (x1, x2) in fp32 with explicit FMAs: the same bits in every FP8 RoPE kernel
        # (this one, kernels/fp8_qkv_rope.py), whichever way the compiler would contract x1 * c - x2 * s (on the H200
        # the GEMV-fused and the separate kernel differed there by an ulp)
        return tl.fma(x1, c, -(x2 * s)), tl.fma(x2, c, x1 * s)

    @triton.jit
    def _rope_q(q_ptr, o_ptr, t, stride_xt, stride_xh, stride_ot, stride_oh, NH, c, s, HALF: tl.constexpr,
                HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr):
        # kernels/rope.py's _rope_one (q of one token, every head) on _rot
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, HALF_P2)
        ok = (heads < NH)[:, None] & (cols < HALF)[None, :]
        x_row = q_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
        x1 = tl.load(x_row, mask=ok, other=0.0)
        x2 = tl.load(x_row + HALF, mask=ok, other=0.0)
        r1, r2 = _rot(x1.to(tl.float32), x2.to(tl.float32), c[None, :], s[None, :])
        o_row = o_ptr + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        tl.store(o_row, r1.to(x1.dtype), mask=ok)
        tl.store(o_row + HALF, r2.to(x1.dtype), mask=ok)

    @triton.jit
    def _quant_store(vals, scale, dst_ptrs, ok):
        # vals: [BLOCK_KVH, HALF_P2] fp32 -> e4m3 codes of vals / scale, saturating at +-448 (e4m3's max)
        codes = tl.minimum(tl.maximum(tl.math.div_rn(vals, scale), -448.0), 448.0)
        tl.store(dst_ptrs, codes.to(dst_ptrs.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_store_kv_fp8_kernel(pos_ptr, cache_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qo_ptr, k_cache_ptr,
                                  v_cache_ptr, k_scale_ptr, v_scale_ptr, H, KVH, stride_qt, stride_qh, stride_kt,
                                  stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh, stride_c, num_positions,
                                  HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr,
                                  BLOCK_KVH: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: q, k, v, positions, slots and the scales come from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cols = tl.arange(0, HALF_P2)
        c = tl.load(cache_ptr + p * stride_c + cols, mask=cols < HALF, other=0.0)
        s = tl.load(cache_ptr + p * stride_c + HALF + cols, mask=cols < HALF, other=0.0)
        _rope_q(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, H, c, s, HALF, HALF_P2, BLOCK_H)
        heads = tl.arange(0, BLOCK_KVH)
        ok = (heads < KVH)[:, None] & (cols < HALF)[None, :]
        # this token's cache row: [KVH, D] contiguous at slot * KVH * D (the cache's layout)
        dst = slot * (KVH * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
        k_row = k_ptr + t * stride_kt + heads[:, None] * stride_kh + cols[None, :]
        k1 = tl.load(k_row, mask=ok, other=0.0)
        k2 = tl.load(k_row + HALF, mask=ok, other=0.0)
        f1, f2 = k1.to(tl.float32), k2.to(tl.float32)
        # rounded to k's dtype first: the codes the two-launch path (apply_rope, then store_kv_fp8) writes
        r1, r2 = _rot(f1, f2, c[None, :], s[None, :])
        r1 = r1.to(k1.dtype).to(tl.float32)
        r2 = r2.to(k1.dtype).to(tl.float32)
        k_scale = tl.load(k_scale_ptr)
        _quant_store(r1, k_scale, k_cache_ptr + dst, ok)
        _quant_store(r2, k_scale, k_cache_ptr + dst + HALF, ok)
        v_row = v_ptr + t * stride_vt + heads[:, None] * stride_vh + cols[None, :]
        v_scale = tl.load(v_scale_ptr)
        _quant_store(tl.load(v_row, mask=ok, other=0.0).to(tl.float32), v_scale, v_cache_ptr + dst, ok)
        _quant_store(tl.load(v_row + HALF, mask=ok, other=0.0).to(tl.float32), v_scale, v_cache_ptr + dst + HALF, ok)


    @triton.jit
    def _scaled_pair(a_ptr, t, stride_at, offs, xs, ws_ptr, b_ptr, SPLITS, stride_as, HALF: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, dt: tl.constexpr, lora=None,
                     HAS_DELTA: tl.constexpr = False, DORA: tl.constexpr = 0):
        # columns offs and offs + HALF of row t of a GEMM's fp32 result held back from its epilogue: SPLITS split-K
        # partials a[split, t, :] summed in split order (fp8_gemv's _splitk_sum_kernel: dot8's partials carry x's
        # scale already), or one unit-scale FP8 GEMM row (ROW_SCALE: times x_scale, as _rescale_rows_cols_kernel);
        # then * w_scale (+ bias), rounded to dt: the qkv values the unfused path stores
        a1 = tl.zeros(offs.shape, dtype=tl.float32)
        a2 = tl.zeros(offs.shape, dtype=tl.float32)
        for split in range(SPLITS):
            a1 += tl.load(a_ptr + split * stride_as + t * stride_at + offs)
            a2 += tl.load(a_ptr + split * stride_as + t * stride_at + offs + HALF)
        if ROW_SCALE:
            a1 = a1 * xs
            a2 = a2 * xs
        a1 = a1 * tl.load(ws_ptr + offs)
        a2 = a2 * tl.load(ws_ptr + offs + HALF)
        if HAS_BIAS:
            a1 = a1 + tl.load(b_ptr + offs).to(tl.float32)
            a2 = a2 + tl.load(b_ptr + offs + HALF).to(tl.float32)
        if HAS_DELTA:   # the step's LoRA delta of qkv (LoRABatch.around_delta), DoRA's g on the adapted rows
            d_ptr, stride_dt, tok_ptr, g_ptr, stride_g, on_ptr = lora
            a1 = a1 + tl.load(d_ptr + t * stride_dt + offs).to(tl.float32)
            a2 = a2 + tl.load(d_ptr + t * stride_dt + offs + HALF).to(tl.float32)
            if DORA > 0:   # g = 1 on plain LoRA slots; DORA 2: only where the slot's flag is set
                slot = tl.load(tok_ptr + t)
                use = slot >= 0
                slot = tl.maximum(slot, 0).to(tl.int64)
                if DORA == 2:
                    use = use & (tl.load(on_ptr + slot) != 0)
                use_b = (offs * 0 + use.to(tl.int32)) != 0   # (a block mask: the interpreter takes no scalar one)
                a1 = a1 * tl.load(g_ptr + slot * stride_g + offs, mask=use_b, other=1.0)
                a2 = a2 * tl.load(g_ptr + slot * stride_g + offs + HALF, mask=use_b, other=1.0)
        return a1.to(dt).to(tl.float32), a2.to(dt).to(tl.float32)

    @triton.jit(do_not_specialize=["SPLITS"])
    def _rope_store_kv_fp8_scaled_kernel(pos_ptr, cache_ptr, slot_ptr, a_ptr, xs_ptr, ws_ptr, b_ptr, qo_ptr, k_cache_ptr,
                                         v_cache_ptr, k_scale_ptr, v_scale_ptr, H, KVH, stride_at, stride_qot, stride_c,
                                         num_positions, SPLITS, stride_as, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                                         BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, HAS_BIAS: tl.constexpr,
                                         ROW_SCALE: tl.constexpr = True, USE_PDL: tl.constexpr = False, d_ptr=None,
                                         stride_d=0, tok_ptr=None, g_ptr=None, stride_g=0, on_ptr=None,
                                         HAS_DELTA: tl.constexpr = False, DORA: tl.constexpr = 0):
        # _rope_store_kv_fp8_kernel on qkv = a GEMM's held-back fp32 result with its epilogue applied here (_scaled_pair).
        # grid (T, Q groups + 1): program (t, g) rotates q heads [g BLOCK_H, (g + 1) BLOCK_H) of token t, the last
        # group writes its K (rotated) and V to the e4m3 cache: one program per token read ~25 KB of fp32 serially
        # (H200, 22:27 probe: 8.4 us a layer slower than the scaling launch + the bf16 RoPE kernel)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
        p = tl.minimum(tl.load(pos_ptr + t).to(tl.int64), num_positions - 1)
        xs = tl.load(xs_ptr + t * ROW_SCALE)   # (without ROW_SCALE a valid element, unused)
        lora = (d_ptr, stride_d, tok_ptr, g_ptr, stride_g, on_ptr)
        dt = qo_ptr.dtype.element_ty
        cols = tl.arange(0, HALF_P2)
        c = tl.load(cache_ptr + p * stride_c + cols, mask=cols < HALF, other=0.0)
        s = tl.load(cache_ptr + p * stride_c + HALF + cols, mask=cols < HALF, other=0.0)
        D = 2 * HALF
        if grp < tl.num_programs(1) - 1:
            hq = grp * BLOCK_H + tl.arange(0, BLOCK_H)
            ok_q = (hq < H)[:, None] & (cols < HALF)[None, :]
            offs_q = tl.where(ok_q, hq[:, None] * D + cols[None, :], 0)
            q1, q2 = _scaled_pair(a_ptr, t, stride_at, offs_q, xs, ws_ptr, b_ptr, SPLITS, stride_as, HALF, HAS_BIAS,
                                  ROW_SCALE, dt, lora, HAS_DELTA, DORA)
            r1, r2 = _rot(q1, q2, c[None, :], s[None, :])
            tl.store(qo_ptr + t * stride_qot + offs_q, r1.to(dt), mask=ok_q)
            tl.store(qo_ptr + t * stride_qot + offs_q + HALF, r2.to(dt), mask=ok_q)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            heads = tl.arange(0, BLOCK_KVH)
            ok = (heads < KVH)[:, None] & (cols < HALF)[None, :]
            offs_kv = tl.where(ok, heads[:, None] * D + cols[None, :], 0)
            dst = slot * (KVH * D) + offs_kv
            k1, k2 = _scaled_pair(a_ptr, t, stride_at, H * D + offs_kv, xs, ws_ptr, b_ptr, SPLITS, stride_as, HALF,
                                  HAS_BIAS, ROW_SCALE, dt, lora, HAS_DELTA, DORA)
            k_scale = tl.load(k_scale_ptr)
            kr1, kr2 = _rot(k1, k2, c[None, :], s[None, :])   # (own names: a variable of both branches needs one type)
            _quant_store(kr1.to(dt).to(tl.float32), k_scale, k_cache_ptr + dst, ok)
            _quant_store(kr2.to(dt).to(tl.float32), k_scale, k_cache_ptr + dst + HALF, ok)
            v1, v2 = _scaled_pair(a_ptr, t, stride_at, (H + KVH) * D + offs_kv, xs, ws_ptr, b_ptr, SPLITS, stride_as,
                                  HALF, HAS_BIAS, ROW_SCALE, dt, lora, HAS_DELTA, DORA)
            v_scale = tl.load(v_scale_ptr)
            _quant_store(v1, v_scale, v_cache_ptr + dst, ok)
            _quant_store(v2, v_scale, v_cache_ptr + dst + HALF, ok)


def _delta_kwargs(delta, dora, T, N):
    from .fp8_norm_quant import _delta_kwargs as kw

    return kw(delta, dora, T, N)


def rope_store_kv_fp8_scaled(positions: Tensor, acc: Tensor, x_scale: Tensor | None, w_scale: Tensor,
                             bias: Tensor | None, cos_sin_cache: Tensor, k_cache: Tensor, v_cache: Tensor,
                             slot_mapping: Tensor, k_scale: Tensor, v_scale: Tensor, num_heads: int, dtype: torch.dtype,
                             q_groups: int = 4, delta: Tensor | None = None, dora: tuple | None = None) -> Tensor:
    """rope_store_kv_fp8 on qkv = the qkv GEMM's epilogue applied here, rounded to `dtype`: acc [T, N] or [1, T, N]
    fp32 from cuBLASLt's unit-scale FP8 GEMM with x_scale [T, 1] (qkv = (acc * x_scale) * w_scale (+ bias), the
    scaling launch of kernels/fp8_gemm.py scaled_mm_tensorwise), or acc [SPLIT, T, N] = split-K partials of the dot8
    kinds with x_scale None (qkv = (their sum in split order) * w_scale (+ bias), fp8_gemv's sum launch). N =
    (H + 2 KVH) D, w_scale [N] fp32. Returns q_out [T, H, D] in `dtype`; one launch of T x (q_groups + 1) programs.
    delta [T, N] / dora (token_slot, g [L, N], on [L] or None): qkv's LoRA delta added before the rounding, DoRA's g on
    the adapted rows (fp8_norm_quant.splitk_add_rms_norm's arguments of the same names)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    acc3 = acc.unsqueeze(0) if acc.dim() == 2 else acc
    S, T, N = acc3.shape
    KVH, D = k_cache.shape[2], k_cache.shape[3]
    H = num_heads
    assert N == (H + 2 * KVH) * D and acc3.dtype == torch.float32 and acc3.stride(-1) == 1, (acc.shape, H, KVH, D)
    assert x_scale is None or (S == 1 and x_scale.numel() == T), "x_scale goes with one unit-scale GEMM result"
    assert w_scale.shape == (N,) and (bias is None or bias.shape == (N,))
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == torch.float8_e4m3fn
    assert cos_sin_cache.shape[1] == D and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    q_out = torch.empty((T, H, D), dtype=dtype, device=acc.device)
    if T == 0:
        return q_out
    q_groups = max(1, min(q_groups, H))
    block_h = triton.next_power_of_2(triton.cdiv(H, q_groups))
    q_groups = triton.cdiv(H, block_h)
    _rope_store_kv_fp8_scaled_kernel[(T, q_groups + 1)](
        positions, cos_sin_cache, slot_mapping, acc3, x_scale if x_scale is not None else w_scale, w_scale,
        bias if bias is not None else w_scale, q_out, k_cache, v_cache, k_scale, v_scale, H, KVH, acc3.stride(1),
        q_out.stride(0), cos_sin_cache.stride(0), cos_sin_cache.shape[0], S, acc3.stride(0), HALF=D // 2,
        HALF_P2=triton.next_power_of_2(D // 2), BLOCK_H=block_h, BLOCK_KVH=triton.next_power_of_2(KVH),
        HAS_BIAS=bias is not None, ROW_SCALE=x_scale is not None, num_warps=4, **_delta_kwargs(delta, dora, T, N),
        **pdl_kwargs(acc.device))
    return q_out


def rope_store_kv_fp8_ref(positions: Tensor, q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor,
                          k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k_scale: Tensor | float,
                          v_scale: Tensor | float) -> Tensor:
    """Reference: RoPE (kernels/rope.py apply_rope_ref), then the torch FP8 store (kernels/kv_store.py's ref)."""
    from .kv_store import store_kv_fp8_ref
    from .rope import apply_rope_ref

    q_rot, k_rot = apply_rope_ref(positions, q, k, cos_sin_cache)
    store_kv_fp8_ref(k_rot, v, k_cache, v_cache, slot_mapping.long(), k_scale, v_scale)
    return q_rot


def rope_store_kv_fp8(positions: Tensor, q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor, k_cache: Tensor,
                      v_cache: Tensor, slot_mapping: Tensor, k_scale: Tensor, v_scale: Tensor,
                      q_out: Tensor | None = None) -> Tensor:
    """See the module docstring. Writes k_cache / v_cache in place, returns q_out (a fresh contiguous [T, H, D]
    unless given). One launch, no host sync (graph-safe); a programmatic dependent launch where kernels/pdl.py
    allows it."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use rope_store_kv_fp8_ref")
    T, H, D = q.shape
    KVH = k.shape[1]
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if q_out is None else q_out
    assert k.shape == (T, KVH, D) and v.shape == (T, KVH, D) and q_out.shape == q.shape, (q.shape, k.shape, v.shape)
    assert D % 2 == 0, f"head_dim must be even, got D={D}"
    assert k_cache.shape[2:] == (KVH, D) and v_cache.shape == k_cache.shape, (k_cache.shape, k.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn, k_cache.dtype
    assert q.dtype == k.dtype == v.dtype == q_out.dtype, (q.dtype, k.dtype, v.dtype)
    for scale in (k_scale, v_scale):
        assert scale.numel() == 1 and scale.dtype == torch.float32 and scale.device == q.device, scale
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D and cos_sin_cache.dtype == torch.float32 \
        and cos_sin_cache.stride(1) == 1, f"cos_sin_cache must be fp32 [P, {D}]"
    assert all(x.stride(-1) == 1 for x in (q, k, v, q_out)), "last dim must be contiguous"
    assert positions.shape == (T,) and slot_mapping.shape == (T,), (positions.shape, slot_mapping.shape)
    if T == 0:
        return q_out
    _rope_store_kv_fp8_kernel[(T,)](
        positions, cos_sin_cache, slot_mapping, q, k, v, q_out, k_cache, v_cache, k_scale, v_scale, H, KVH,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), cos_sin_cache.stride(0), cos_sin_cache.shape[0], HALF=D // 2,
        HALF_P2=triton.next_power_of_2(D // 2), BLOCK_H=triton.next_power_of_2(H),
        BLOCK_KVH=triton.next_power_of_2(KVH), num_warps=4, **pdl_kwargs(q.device))
    return q_out
