"""The swap-AB tensor-core kernel of the FP8 decode GEMV (kernels/fp8_gemv.py launches it): kinds dot (bf16 operands),
dot16 (fp16 operands), dot8 / dot8f / dot8b (W8A8 on the FP8 MMA), with split-K partials and the optional in-kernel
split-K sum; and the weights' L2 prefetch the GEMV kinds share. Semantics and shapes: kernels/fp8_gemv.py.

    dot8b: y[m, n] = sum over K blocks b of (sum_{k in b} w_q[n, k] * e4m3(x[m, k] / s[m, b])) * s[m, b] * w_scale[n]
    s[m, b] = 2^(E - 7), E = floor(log2(max_{k in b} |x[m, k]|)) (w8a8_block_ref)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .fp8_gemm import fp8_w8a16_gemm_ref


def w8a8_block_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, block_k: int = 128) -> Tensor:
    """dot8b's math: x [M, K] rounded to e4m3 with one scale per (row, block_k-wide block of k): s = 2^(E - 7) for the
    block's amax in [2^E, 2^(E+1)) (|x / s| < 256: exact scaling, no saturation; s >= 2^-126), x_q = e4m3(x / s), a
    zero-padded tail block; then gemv_ref on x_q * s (fp32 accumulate)."""
    M, K = x.shape
    xb = torch.nn.functional.pad(x.float(), (0, (-K) % block_k)).view(M, -1, block_k)
    amax = xb.abs().amax(dim=-1, keepdim=True)                                               # [M, K / block_k, 1]
    s_exp = (((amax.view(torch.int32) >> 23) & 0xFF) - 7).clamp(min=1)                      # biased exponent
    scale, inv = (s_exp << 23).view(torch.float32), ((254 - s_exp) << 23).view(torch.float32)
    x_q = (xb * inv).to(torch.float8_e4m3fn)
    y = fp8_w8a16_gemm_ref((x_q.float() * scale).reshape(M, -1)[:, :K], w_q, w_scale, bias)
    return y.to(x.dtype)


if HAS_TRITON:
    from .fp8_gemv_silu import _silu_mul_rounded

    @triton.jit
    def _prefetch_rows_l2(w_ptr, rows, K, k_start, k_end, LINES: tl.constexpr):
        # w[rows, k_start:k_end] into L2, one prefetch per 128-byte line (rows: [R] int64, valid). Issued by a
        # GEMV launched as a programmatic dependent before its gdc_wait: the weights (no kernel of the step
        # writes them) stream from HBM while the kernel before it (a norm, the attention) still runs
        for k0 in range(k_start, k_end, LINES * 128):
            offs = tl.minimum(k0 + tl.arange(0, LINES) * 128, k_end - 1)
            ptrs = w_ptr + rows[:, None] * K + offs[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _dot8_pair(w_ptrs, w2_ptrs, xt_ptrs, m_ok, k_start, k_end, offs_k, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISE: tl.constexpr):
        # W8A8 dot8's K loop for two weight tiles [BLOCK_N, BLOCK_K] (rows w_ptrs and w2_ptrs) against one e4m3 x^T
        # tile [BLOCK_K, BLOCK_M] per step: (acc, acc2) [BLOCK_N, BLOCK_M] fp32, each exactly what dot8's loop makes
        # for its rows (the same tiles, order and fp32 promotion): the SiLU epilogue's gate row n and up row I + n
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                w2 = tl.load(w2_ptrs, eviction_policy="evict_first")
                xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                w2 = tl.load(w2_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                xt = tl.load(xt_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            if PRECISE:   # dot8: each K tile's FP8 MMA partial promoted to fp32 (see _fp8_skinny_dot_kernel)
                acc = tl.dot(w, xt, acc, max_num_imprecise_acc=BLOCK_K)
                acc2 = tl.dot(w2, xt, acc2, max_num_imprecise_acc=BLOCK_K)
            else:   # dot8f
                acc = tl.dot(w, xt, acc)
                acc2 = tl.dot(w2, xt, acc2)
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K
            xt_ptrs += BLOCK_K
        return acc, acc2

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def _fp8_skinny_dot_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_ym,
                               x16_scale, xs_ptr, cnt_ptr, SPLITS, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                               USE_WS: tl.constexpr, F16: tl.constexpr, FP8X: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, WAIT: tl.constexpr,
                               FIXUP: tl.constexpr, EARLY: tl.constexpr = False, XQ: tl.constexpr = False,
                               PRECISE: tl.constexpr = True, SILU: tl.constexpr = False, d_ptr=None, stride_d=0,
                               tok_ptr=None, g_ptr=None, stride_g=0, on_ptr=None, HAS_DELTA: tl.constexpr = False,
                               DORA: tl.constexpr = 0):
        # SILU (W8A8 dot8 / dot8f, no split-K, no bias: kernels/fp8_dot8_silu.py): w is a fused gate_up [2N, K], y
        # [M, N] = SiLU-and-mul of gate rows n and up rows N + n (both tiles in this program, one x tile for both
        # dots), and ws_ptr [M, num_programs(1)] fp32 gets each output row's |max| over this program's columns.
        # SILU + HAS_DELTA: gate_up's LoRA delta d [M, 2N] (x's dtype) added to both halves before the activation;
        # DORA 1 / 2: those sums times g[slot(row)] on the rows with an adapter (2: where on[slot] != 0)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        safe_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        w_ptrs = w_ptr + safe_n[:, None] * K + (k_start + offs_k)[None, :]                          # [BN, BK]
        xt_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + offs_k)[:, None]    # [BK, BM]: x^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                                        # y^T tile
        if WAIT:   # as in _fp8_gemv_kernel (before any load: the pipeliner's prologue reads x too)
            if not EARLY:   # EARLY: a plain dependent (its launch and set-up overlap the kernel before it)
                _prefetch_rows_l2(w_ptr, safe_n, K, k_start, k_end, 32)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if SILU:   # gate rows offs_n and up rows N + offs_n (_dot8_pair)
            acc, acc_u = _dot8_pair(w_ptrs, w_ptrs + N.to(tl.int64) * K, xt_ptrs, m_ok, k_start, k_end, offs_k,
                                    BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, PRECISE)
        else:
            for k0 in range(k_start, k_end, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs, eviction_policy="evict_first")
                    xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
                else:
                    k_ok = (k0 + offs_k) < k_end
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                    xt = tl.load(xt_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
                if FP8X and XQ:
                    # W8A8 with x quantized here (dot8b): one scale per (token, BLOCK_K block of k) from the amax of
                    # the block's x values (DeepSeek-V3's 1 x 128 activation tiles: no per-token quantization launch,
                    # finer scales than per token). The scale is the power of two 2^(E - 7), E = amax's exponent:
                    # x * 2^(7 - E) is exact and below 256 (no saturation, no division: an IEEE division per token and
                    # block cost ~150 instructions per K step in the SASS). xt [BK, BM] bf16/fp16 -> e4m3; the FP8
                    # MMA's fp32 partial of the block times its scales is added to acc in full fp32 (PRECISE's promotion)
                    xf = xt.to(tl.float32)
                    amax = tl.max(tl.abs(xf), axis=0)                                                 # [BM]
                    s_exp = tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 7, 1)     # biased exponent
                    bscale = (s_exp << 23).to(tl.float32, bitcast=True)                               # 2^(E - 7)
                    inv = ((254 - s_exp) << 23).to(tl.float32, bitcast=True)                      # 1 / bscale, exact
                    xq = (xf * inv[None, :]).to(w.dtype)
                    acc += tl.dot(w, xq) * bscale[None, :]
                elif FP8X and PRECISE:
                    # W8A8 (dot8): x already e4m3 (per-token scales xs), both operands straight into the FP8 MMA.
                    # Hopper's FP8 MMA accumulates in reduced precision (~14 bits kept; Triton's sm_90 default lets it
                    # run over all of K): at K = 4096 that truncation reached 3.5e-3 of |y| (fp16 outputs 0.9 off at
                    # |y| ~ 240). max_num_imprecise_acc = BLOCK_K adds each K tile's partial into acc in full fp32, as
                    # _scaled_mm (use_fast_accum=False) and DeepSeek-V3's 128-element promotion do
                    acc = tl.dot(w, xt, acc, max_num_imprecise_acc=BLOCK_K)
                elif FP8X:   # dot8f: the FP8 MMA accumulating over all of K (the fast, imprecise form; measurements)
                    acc = tl.dot(w, xt, acc)
                elif F16:
                    # fp16 MMA operands: e4m3 -> fp16 is one cvt per 2 values (-> bf16 costs ~3x the instructions,
                    # which bound the bf16 form at ~2.5 TB/s on the H200). x is scaled by 2^-4 (exact) into fp16:
                    # |x| < 2^20 fits (larger would be inf: no clamp, it cost 2 instructions per x value), a bf16
                    # x keeps its 8 significant bits down to 2^-10 and an absolute error <= 2^-21 below; the fp32
                    # accumulator is scaled back in the epilogue. x16_scale = 2^-4 is a runtime argument: as a
                    # constant, Triton moved the multiply after the fp16 rounding (mul.f16x2), where it overflows
                    x16 = (xt.to(tl.float32) * x16_scale).to(tl.float16)
                    acc = tl.dot(w.to(tl.float16), x16, acc)
                else:
                    # e4m3 -> x's dtype in registers (exact: every e4m3 value is a bf16/fp16 value)
                    acc = tl.dot(w.to(xt.dtype), xt, acc)
                w_ptrs += BLOCK_K
                xt_ptrs += BLOCK_K
        if PDL and not WAIT:
            tl.extra.cuda.gdc_launch_dependents()
        if F16:
            acc = acc / x16_scale
        if FP8X and not XQ:
            xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
            acc = acc * xs[None, :]
            if SILU:
                acc_u = acc_u * xs[None, :]
        ok = n_ok[:, None] & m_ok[None, :]
        if SILU:   # each output rounded as the GEMM's store would, then activation.py's roundings (fp8_gemv_silu.py)
            g = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
            u = acc_u * tl.load(s_ptr + N + offs_n, mask=n_ok, other=0.0)[:, None]
            if HAS_DELTA:   # LoRABatch.around_delta's d, computed before this GEMM (models/fp8_fused.py)
                d_ptrs = d_ptr + offs_m.to(tl.int64)[None, :] * stride_d + offs_n[:, None]
                g = g + tl.load(d_ptrs, mask=ok, other=0.0).to(tl.float32)
                u = u + tl.load(d_ptrs + N, mask=ok, other=0.0).to(tl.float32)
                if DORA > 0:
                    slot = tl.load(tok_ptr + offs_m, mask=m_ok, other=-1)                      # [BLOCK_M]
                    use = slot >= 0
                    slot = tl.maximum(slot, 0).to(tl.int64)
                    if DORA == 2:
                        use = use & (tl.load(on_ptr + slot, mask=m_ok, other=0) != 0)
                    g_ptrs = g_ptr + slot[None, :] * stride_g + offs_n[:, None]
                    g = g * tl.load(g_ptrs, mask=ok & use[None, :], other=1.0)
                    u = u * tl.load(g_ptrs + N, mask=ok & use[None, :], other=1.0)
            h = _silu_mul_rounded(g, u, y_ptr.dtype.element_ty)
            tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None], h, mask=ok)
            amax = tl.max(tl.where(ok, tl.abs(h.to(tl.float32)), 0.0), axis=0)                 # [BLOCK_M]
            tl.store(ws_ptr + offs_m.to(tl.int64) * tl.num_programs(1) + pid_n, amax, mask=m_ok)
        elif USE_WS:
            tl.store(ws_ptr + (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None], acc, mask=ok)
            if FIXUP:   # no second launch: the tile's last split to finish sums the partials (split order) into y
                tl.debug_barrier()   # every thread's partials stored before the counter moves
                tile = pid_n * tl.num_programs(0) + pid_m
                done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")   # release ours, acquire the others'
                if done == SPLITS - 1:
                    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    for split in range(0, SPLITS):   # deterministic: the same order whoever finishes last
                        total += tl.load(ws_ptr + (split * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None],
                                         mask=ok, other=0.0, cache_modifier=".cg")
                    total = total * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
                    if HAS_BIAS:
                        total = total + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
                    tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ok)
                    tl.atomic_xchg(cnt_ptr + tile, 0)   # reset for the next launch (CUDA-graph replays too)
        else:
            acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
            if HAS_BIAS:
                acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
