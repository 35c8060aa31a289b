"""The batch-1 FP8 GEMV with fp16 products (kinds gemvh2 / gemvh4; kernels/fp8_gemv.py launches it, semantics there).

Per weight pair one cvt e4m3x2 -> f16x2 and one f16x2 FMA into an fp16 partial that FLUSH K tiles share before it is
widened into the fp32 accumulator: about a third fewer SASS instructions per weight byte than the fp32 CUDA-core kinds,
whose instruction issue (not HBM) bounded them at ~0.83 of copy bandwidth on the H200.
"""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

# gemvh: x * 2^-8 into fp16, so that FLUSH (<= 4) products of |w_q| <= 448 stay finite for |x| < 9362 (2^-8 keeps x's
# bf16 precision down to |x| = 2^-6; below it the fp16 subnormals lose bits of products that small)
GEMVH_X_SCALE = 2.0 ** -8


if HAS_TRITON:
    from .fp8_gemv_silu import _group_rows, _silu_pair_store

    @triton.jit
    def _half_store(acc, row, M, N, offs_n, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, pid_k,
                    HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr):
        # y[row, offs_n] = sum_k acc * w_scale (+ bias), or the split's fp32 partial into ws [SPLIT, M, N]
        y = tl.sum(acc, axis=1)                                                   # [BLOCK_N]
        ok = (offs_n < N) & ((offs_n * 0 + row) < M)
        if USE_WS:
            tl.store(ws_ptr + (pid_k * M + row).to(tl.int64) * N + offs_n, y, mask=ok)
        else:
            y = y * tl.load(s_ptr + offs_n, mask=ok, other=0.0)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _half_chunk(acc0, acc1, acc2, acc3, p0, p1, p2, p3, x_ptrs, x16_scale, f0, f1, f2, f3, USE_FIRST: tl.constexpr,
                    GROUPS: tl.constexpr, BLOCK_K: tl.constexpr, FLUSH: tl.constexpr):
        # FLUSH K tiles: fp16 products of each group's weight tile and x (x * x16_scale in fp16, shared by the groups)
        # summed in fp16 partials, then widened into the fp32 accumulators. USE_FIRST: tile 0's weights are f0..f3
        # (loaded before the programmatic-dependent wait)
        h0 = tl.zeros(acc0.shape, dtype=tl.float16)
        h1 = tl.zeros(acc0.shape, dtype=tl.float16)
        h2 = tl.zeros(acc0.shape, dtype=tl.float16)
        h3 = tl.zeros(acc0.shape, dtype=tl.float16)
        for j in tl.static_range(FLUSH):
            x = (tl.load(x_ptrs + j * BLOCK_K).to(tl.float32) * x16_scale).to(tl.float16)
            if USE_FIRST and j == 0:
                w0, w1, w2, w3 = f0, f1, f2, f3
            else:
                w0 = tl.load(p0 + j * BLOCK_K, eviction_policy="evict_first")
                w1 = tl.load(p1 + j * BLOCK_K, eviction_policy="evict_first") if GROUPS >= 2 else w0
                w2 = tl.load(p2 + j * BLOCK_K, eviction_policy="evict_first") if GROUPS >= 4 else w0
                w3 = tl.load(p3 + j * BLOCK_K, eviction_policy="evict_first") if GROUPS >= 4 else w0
            h0 += w0.to(tl.float16) * x
            if GROUPS >= 2:
                h1 += w1.to(tl.float16) * x
            if GROUPS >= 4:
                h2 += w2.to(tl.float16) * x
                h3 += w3.to(tl.float16) * x
        return acc0 + h0.to(tl.float32), acc1 + h1.to(tl.float32), acc2 + h2.to(tl.float32), acc3 + h3.to(tl.float32)

    # gemvh2 / gemvh4 (one x row per program): _fp8_gemv_groups_kernel with the products in fp16 (_half_chunk). x is
    # scaled by x16_scale (2^-8) into fp16 so that FLUSH products of |w| <= 448 stay finite for |x| < 9362; the
    # accumulator is scaled back. EARLY (a programmatic dependent): the first weight tiles in flight before the wait.
    @triton.jit(do_not_specialize=["M"])
    def _fp8_gemv_half_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_ym,
                              x16_scale, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, GROUPS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLUSH: tl.constexpr, PDL: tl.constexpr,
                              WAIT: tl.constexpr, EARLY: tl.constexpr = False, SILU: tl.constexpr = False):
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_k = tl.arange(0, BLOCK_K)
        offs_0, offs_1, offs_2, offs_3 = _group_rows(pid_n, N, GROUPS, BLOCK_N, SILU)   # (fp8_gemv_silu.py)
        k_start = pid_k * K_PER_SPLIT   # the launcher keeps K_PER_SPLIT a multiple of FLUSH * BLOCK_K dividing K
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        # rows past N re-read row 0 (no mask in the K loop); the stores are masked
        p0 = w_ptr + tl.where(offs_0 < N, offs_0, 0).to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
        p1 = w_ptr + tl.where(offs_1 < N, offs_1, 0).to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
        p2 = w_ptr + tl.where(offs_2 < N, offs_2, 0).to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
        p3 = w_ptr + tl.where(offs_3 < N, offs_3, 0).to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
        # x in the weight tiles' layout (repeated addresses: L1), as in _fp8_gemv_groups_kernel
        x_ptrs = x_ptr + row.to(tl.int64) * stride_xm + k_start + offs_k[None, :] + tl.zeros((BLOCK_N, BLOCK_K),
                                                                                            dtype=tl.int32)
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if EARLY:   # weights are no kernel's output: the first tiles load while the kernel before us finishes
            f0 = tl.load(p0, eviction_policy="evict_first")
            f1 = tl.load(p1, eviction_policy="evict_first") if GROUPS >= 2 else f0
            f2 = tl.load(p2, eviction_policy="evict_first") if GROUPS >= 4 else f0
            f3 = tl.load(p3, eviction_policy="evict_first") if GROUPS >= 4 else f0
        else:
            f0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)   # unused (USE_FIRST False)
            f1 = f0
            f2 = f0
            f3 = f0
        if WAIT:   # a programmatic dependent: x is the kernel before us's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        k_first = k_start
        if EARLY:   # the first chunk, peeled: its tile 0 is f0..f3
            acc0, acc1, acc2, acc3 = _half_chunk(acc0, acc1, acc2, acc3, p0, p1, p2, p3, x_ptrs, x16_scale,
                                                 f0, f1, f2, f3, True, GROUPS, BLOCK_K, FLUSH)
            p0 += FLUSH * BLOCK_K
            p1 += FLUSH * BLOCK_K
            p2 += FLUSH * BLOCK_K
            p3 += FLUSH * BLOCK_K
            x_ptrs += FLUSH * BLOCK_K
            k_first = k_start + FLUSH * BLOCK_K
        for k0 in range(k_first, k_end, FLUSH * BLOCK_K):
            acc0, acc1, acc2, acc3 = _half_chunk(acc0, acc1, acc2, acc3, p0, p1, p2, p3, x_ptrs, x16_scale,
                                                 f0, f1, f2, f3, False, GROUPS, BLOCK_K, FLUSH)
            p0 += FLUSH * BLOCK_K
            p1 += FLUSH * BLOCK_K
            p2 += FLUSH * BLOCK_K
            p3 += FLUSH * BLOCK_K
            x_ptrs += FLUSH * BLOCK_K
        if PDL and not WAIT:
            tl.extra.cuda.gdc_launch_dependents()
        inv = 1.0 / x16_scale
        if SILU and not USE_WS:   # y [M, N / 2]: SiLU-and-mul of each gate row and its up row
            _silu_pair_store(acc0 * inv, (acc1 if GROUPS == 2 else acc2) * inv, row, M, N, offs_0, s_ptr, y_ptr,
                             stride_ym)
            if GROUPS >= 4:
                _silu_pair_store(acc1 * inv, acc3 * inv, row, M, N, offs_1, s_ptr, y_ptr, stride_ym)
        else:
            _half_store(acc0 * inv, row, M, N, offs_0, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, pid_k, HAS_BIAS, USE_WS)
            if GROUPS >= 2:
                _half_store(acc1 * inv, row, M, N, offs_1, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, pid_k, HAS_BIAS,
                            USE_WS)
            if GROUPS >= 4:
                _half_store(acc2 * inv, row, M, N, offs_2, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, pid_k, HAS_BIAS,
                            USE_WS)
                _half_store(acc3 * inv, row, M, N, offs_3, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, pid_k, HAS_BIAS,
                            USE_WS)
