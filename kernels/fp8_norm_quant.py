"""RMSNorm (+ residual add) and SiLU-and-mul that also quantize their output per token to e4m3 (W8A8 GEMM inputs).

    rms_norm_quant:    out = rms_norm(x [+ residual]) exactly as kernels/rmsnorm.py (residual updated in place),
                       then (x_q, scale) = per_token_quant_fp8(out) exactly as kernels/fp8_gemm.py
    silu_mul_quant:    out = silu_and_mul(gate_up) exactly as kernels/activation.py, then the same quantization
    x, residual, out: [T, H] (last dim contiguous); x_q: [T, H] e4m3; scale: [T, 1] fp32; gate_up: [T, 2I], out [T, I].

Why: a W8A8 FP8 GEMM (dot8 / cuBLASLt tensor-wise at 33..64 tokens, _scaled_mm above) quantizes its input per token
in a launch of its own, 3 of them per decoder layer behind a norm or the activation (kernels/PERF_NOTES.md, FP8 third
pass: the 8B FP8 layer at batch 64 spends ~64 us outside its GEMMs). The producer holds the whole row already (one
program per token), so the amax and the e4m3 codes cost it one more pass over data it just wrote (L1/L2), no launch.
The bf16 output is still written: the LoRA kernels read the unquantized activation. Same arithmetic as the unfused
pair (torch.div_rn, the same amax), so x_q and scale equal per_token_quant_fp8(out) bit for bit.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .fp8_gemm import FP8, FP8_MAX, MIN_SCALE
from .pdl import pdl_kwargs

if HAS_TRITON:

    @triton.jit
    def _quant_row(y_ptr, q_ptr, s_ptr, row, n, stride_y, stride_q, amax, fp8_max, FP8_MAX_C: tl.constexpr,
                   MIN_SCALE_C: tl.constexpr, BLOCK: tl.constexpr):
        # the row's scale from its amax, then its e4m3 codes from the values this thread stored (same offsets: its
        # own writes, visible to it without a barrier); per_token_quant_fp8's arithmetic
        scale = tl.maximum(tl.div_rn(amax, fp8_max), MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        offs = tl.arange(0, BLOCK)
        for k0 in range(0, n, BLOCK):
            ok = (k0 + offs) < n
            v = tl.load(y_ptr + row * stride_y + k0 + offs, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.div_rn(v, scale), -FP8_MAX_C), FP8_MAX_C)
            tl.store(q_ptr + row * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _lora_delta_row(v, d_row_ptr, offs, ok, tok_ptr, row, g_ptr, stride_g, on_ptr, DORA: tl.constexpr):
        # v [BLOCK] fp32 (a GEMM row's values, its epilogue applied) + the row's LoRA delta d (the expand's output,
        # y's dtype); DORA 1: times g[slot] where the row has an adapter (g = 1 on plain LoRA slots), 2: only where
        # on[slot] != 0 (LoRABatch's per-slot DoRA flags): lora_expand's epilogue g * (y + delta) on a bias-free GEMM
        v = v + tl.load(d_row_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if DORA > 0:
            slot = tl.load(tok_ptr + row)
            use = slot >= 0
            slot = tl.maximum(slot, 0).to(tl.int64)
            if DORA == 2:
                use = use & (tl.load(on_ptr + slot) != 0)
            use_b = (offs * 0 + use.to(tl.int32)) != 0   # (a block mask: the interpreter takes no scalar one)
            v = v * tl.load(g_ptr + slot * stride_g + offs, mask=ok & use_b, other=1.0)
        return v

    @triton.jit
    def _quant_regs(y, q_ptrs, s_ptr, ok, amax, fp8_max, FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr):
        # the row's scale from its amax, then the codes of y (its values in registers); per_token_quant_fp8's math
        scale = tl.maximum(tl.div_rn(amax, fp8_max), MIN_SCALE_C)
        tl.store(s_ptr, scale)
        q = tl.minimum(tl.maximum(tl.div_rn(y.to(tl.float32), scale), -FP8_MAX_C), FP8_MAX_C)
        tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, out_ptr, q_ptr, s_ptr, H, eps, fp8_max, stride_x, stride_r,
                               stride_o, stride_q, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                               FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr, USE_PDL: tl.constexpr = False,
                               REREAD: tl.constexpr = True):
        if USE_PDL:   # kernels/pdl.py: every input comes from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        dtype = x.dtype
        if HAS_RESIDUAL:   # kernels/rmsnorm.py's _rms_norm_kernel, line for line
            r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        normed = (xf * inv).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (w * normed).to(dtype)
        tl.store(out_ptr + row * stride_o + offs, y, mask=ok)
        # the codes from the stored row read back, not from these registers: an e4m3 store of y itself made Triton
        # lay the whole row out for it (16 values a thread, through shared memory after the residual add), so the
        # sum of squares above was added in another order than rms_norm's and rounded some rows one bf16 ulp away
        # (H200, test_fp8_fused). Read back, the norm keeps _rms_norm_kernel's layout and order; the amax is exact
        # in any order
        amax = tl.max(tl.where(ok, tl.abs(y.to(tl.float32)), 0.0), axis=0)
        if REREAD:
            tl.debug_barrier()   # every thread's part of the row stored before any thread reads it back
            _quant_row(out_ptr, q_ptr, s_ptr, row, H, stride_o, stride_q, amax, fp8_max, FP8_MAX_C, MIN_SCALE_C,
                       BLOCK // 2)   # (another block shape than the norm's: no layout shared with it)
        else:   # from the registers (one pass fewer; the norm then rounds as the fp8 store's layout sums)
            _quant_regs(y, q_ptr + row * stride_q + offs, s_ptr + row, ok, amax, fp8_max, FP8_MAX_C, MIN_SCALE_C)

    @triton.jit
    def _silu_mul_quant_kernel(x_ptr, out_ptr, q_ptr, s_ptr, I, fp8_max, stride_x, stride_o, stride_q,
                               BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr,
                               USE_PDL: tl.constexpr = False, ONE_PASS: tl.constexpr = False):
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        if ONE_PASS:   # the whole row in registers (I <= BLOCK): one load, the codes from registers (max is exact)
            ok = offs < I
            g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
            u = tl.load(x_ptr + row * stride_x + I + offs, mask=ok, other=0.0)
            gf = g.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
            y = (act * u.to(tl.float32)).to(g.dtype)
            tl.store(out_ptr + row * stride_o + offs, y, mask=ok)
            amax1 = tl.max(tl.where(ok, tl.abs(y.to(tl.float32)), 0.0), axis=0)
            _quant_regs(y, q_ptr + row * stride_q + offs, s_ptr + row, ok, amax1, fp8_max, FP8_MAX_C, MIN_SCALE_C)
            return
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, I, BLOCK):   # kernels/activation.py's _silu_and_mul_kernel, chunk by chunk
            ok = (k0 + offs) < I
            g = tl.load(x_ptr + row * stride_x + k0 + offs, mask=ok, other=0.0)
            u = tl.load(x_ptr + row * stride_x + I + k0 + offs, mask=ok, other=0.0)
            gf = g.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
            y = (act * u.to(tl.float32)).to(g.dtype)
            tl.store(out_ptr + row * stride_o + k0 + offs, y, mask=ok)
            amax = tl.maximum(amax, tl.where(ok, tl.abs(y.to(tl.float32)), 0.0))
        _quant_row(out_ptr, q_ptr, s_ptr, row, I, stride_o, stride_q, tl.max(amax, axis=0), fp8_max, FP8_MAX_C,
                   MIN_SCALE_C, BLOCK)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def _splitk_add_rms_norm_kernel(ws_ptr, s_ptr, xs_ptr, res_ptr, w_ptr, out_ptr, q_ptr, qs_ptr, M, H, SPLITS, eps,
                                    fp8_max, stride_r, stride_o, stride_q, ROW_SCALE: tl.constexpr,
                                    QUANT: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr,
                                    MIN_SCALE_C: tl.constexpr, USE_PDL: tl.constexpr = False,
                                    REREAD: tl.constexpr = True, d_ptr=None, stride_d=0, tok_ptr=None, g_ptr=None,
                                    stride_g=0, on_ptr=None, HAS_DELTA: tl.constexpr = False,
                                    DORA: tl.constexpr = 0):
        # x = (sum over the splits of ws[split, row, :], in split order) [* xs[row]] * s, rounded to the dtype: what
        # fp8_gemv's _splitk_sum_kernel (or the tw kind's _rescale_rows_cols_kernel) stores; then kernels/rmsnorm.py's
        # residual add + RMSNorm on it; QUANT: also its per-token e4m3 codes (rms_norm_quant's)
        if USE_PDL:   # the partials come from the GEMV before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLITS):
            acc += tl.load(ws_ptr + (split * M + row) * H + offs, mask=ok, other=0.0)
        if ROW_SCALE:
            acc = acc * tl.load(xs_ptr + row)
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
        dtype = r.dtype
        xv = acc * tl.load(s_ptr + offs, mask=ok, other=0.0)
        if HAS_DELTA:   # the step's LoRA delta of this projection (LoRABatch.around_delta), DoRA's g on its rows
            xv = _lora_delta_row(xv, d_ptr + row * stride_d, offs, ok, tok_ptr, row, g_ptr, stride_g, on_ptr, DORA)
        x = xv.to(dtype)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        normed = (xf * inv).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (w * normed).to(dtype)
        tl.store(out_ptr + row * stride_o + offs, y, mask=ok)
        if QUANT:   # as _rms_norm_quant_kernel: the codes from the row read back (the norm keeps rms_norm's order)
            amax = tl.max(tl.where(ok, tl.abs(y.to(tl.float32)), 0.0), axis=0)
            if REREAD:
                tl.debug_barrier()
                _quant_row(out_ptr, q_ptr, qs_ptr, row, H, stride_o, stride_q, amax, fp8_max, FP8_MAX_C, MIN_SCALE_C,
                           BLOCK // 2)
            else:
                _quant_regs(y, q_ptr + row * stride_q + offs, qs_ptr + row, ok, amax, fp8_max, FP8_MAX_C, MIN_SCALE_C)


def _warps(env: str, default: int) -> int:
    """A probe's override of a launch's warp count (LORASERVE_FP8_NORM_WARPS / _SILU_WARPS; unset: the default)."""
    v = os.environ.get(env, "").strip()
    return int(v) if v in ("1", "2", "4", "8", "16", "32") else default


def norm_warps(rows: int, block: int) -> int:
    """Warps of a norm + codes launch (one program per row): block // 512 (8 at H 4096, rms_norm's layout); at 33..64
    rows (the W8A8 decode bucket) 16 where the row has >= 4096 values (LORASERVE_FP8_NORM_WARPS_BATCH, default 16;
    0: block // 512 there too). H200, 4 8B layers' bs64 decode graph: -1.2 us a layer alone, -1.8 on top of the dot8
    SiLU epilogue (eighth pass probe 1), -1.6 to -2.0 in probe 2 (seventh pass -0.6 / -1.3); at one token it cost
    +0.4 / +0.7, so not there.
    Another summation order than rms_norm's: outputs up to two bf16 ulps off the unfused norm (tests pin 0 for their
    bit-for-bit checks and bound the 16-warp rows apart). LORASERVE_FP8_NORM_WARPS: every launch (probes)."""
    default = min(16, max(1, block // 512))
    if 33 <= rows <= 64 and block >= 4096 and os.environ.get("LORASERVE_FP8_NORM_WARPS_BATCH", "16").strip() != "0":
        default = _warps("LORASERVE_FP8_NORM_WARPS_BATCH", 16)
    return _warps("LORASERVE_FP8_NORM_WARPS", default)


def norm_reread_on() -> bool:
    """LORASERVE_FP8_NORM_REREAD=0: the norms' e4m3 codes from registers (one pass; rows may round one bf16 ulp away
    from rms_norm's, the layout the fp8 store asks for summing in another order); default 1: read back."""
    return os.environ.get("LORASERVE_FP8_NORM_REREAD", "1").strip() != "0"


def silu_one_pass_on() -> bool:
    """LORASERVE_FP8_SILU_ONE_PASS=0: silu_mul_quant in 2048-wide chunks and a second pass for the codes (the previous
    form; H200 bs64: 7.7 us a layer for 64 rows of 14336, one program per row)."""
    return os.environ.get("LORASERVE_FP8_SILU_ONE_PASS", "1").strip() != "0"


def splitk_add_rms_norm(ws: Tensor, w_scale: Tensor, residual: Tensor, weight: Tensor, eps: float,
                        x_scale: Tensor | None = None, quant: bool = False, delta: Tensor | None = None,
                        dora: tuple | None = None):
    """A GEMV's deferred epilogue (fp8_gemv(..., defer_sum=True)), then fused_add_rms_norm with its output: ws
    [SPLIT, T, H] fp32 split-K partials (summed in split order, times w_scale [H]), or [1, T, H] = a unit-scale FP8
    GEMM's result with x_scale [T, 1] (times x_scale[row] * w_scale). residual [T, H] += that (in place), out =
    RMSNorm(residual) * weight. One launch where there were two; the values are the unfused pair's bit for bit.
    Returns (out, residual), with quant also (x_q [T, H] e4m3, scale [T, 1] fp32) of out (per_token_quant_fp8's).
    delta [T, H] (the projection's LoRA delta, LoRABatch.around_delta): added to the GEMM's values before they are
    rounded; dora (token_slot [T] int32, g [L, H] fp32, on [L] int32 or None): those values times g[slot] on the rows
    with an adapter (where on[slot] != 0), lora_expand's DoRA epilogue (no bias). Not bit for bit the unfused path
    (there the GEMM output is rounded before the delta joins it): bf16-rounding-level differences."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    splits, T, H = ws.shape
    assert ws.dtype == torch.float32 and ws.is_contiguous() and w_scale.shape == (H,)
    assert residual.shape == (T, H) and residual.stride(-1) == 1 and weight.shape == (H,)
    assert x_scale is None or (splits == 1 and x_scale.numel() == T and x_scale.dtype == torch.float32)
    out = torch.empty_like(residual)
    x_q = torch.empty((T, H), dtype=FP8, device=ws.device) if quant else out
    q_scale = torch.empty((T, 1), dtype=torch.float32, device=ws.device) if quant else w_scale
    if T > 0:
        block = triton.next_power_of_2(H)
        _splitk_add_rms_norm_kernel[(T,)](
            ws, w_scale, x_scale if x_scale is not None else w_scale, residual, weight, out, x_q, q_scale, T, H,
            splits, eps, FP8_MAX, residual.stride(0), out.stride(0), x_q.stride(0), ROW_SCALE=x_scale is not None,
            QUANT=quant, BLOCK=block, FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE, REREAD=norm_reread_on(),
            num_warps=norm_warps(T, block), **_delta_kwargs(delta, dora, T, H), **pdl_kwargs(ws.device))
    return (out, residual, x_q, q_scale) if quant else (out, residual)


def _delta_kwargs(delta: Tensor | None, dora: tuple | None, T: int, N: int) -> dict:
    """The LoRA-delta arguments of the deferred-epilogue kernels (_lora_delta_row): none without a delta."""
    if delta is None:
        return {}
    assert delta.shape == (T, N) and delta.stride(-1) == 1, (delta.shape, T, N)
    kw = dict(d_ptr=delta, stride_d=delta.stride(0), HAS_DELTA=True)
    if dora is not None:
        tok, g, on = dora
        assert tok.shape[0] >= T and tok.dtype == torch.int32 and g.dim() == 2 and g.shape[1] == N and g.stride(-1) == 1
        kw.update(tok_ptr=tok, g_ptr=g, stride_g=g.stride(0), on_ptr=on, DORA=2 if on is not None else 1)
    return kw


def rms_norm_quant(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
                   ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(out [T, H], residual (updated in place, as fused_add_rms_norm) or None, x_q [T, H] e4m3, scale [T, 1] fp32).
    out is a new tensor (x is left as it was, also with a residual)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: rms_norm_ref + per_token_quant_fp8_ref")
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, H] with a contiguous last dim"
    T, H = x.shape
    assert weight.shape == (H,) and weight.dtype == x.dtype
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    out = torch.empty_like(x)
    x_q = torch.empty((T, H), dtype=FP8, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    if T == 0:
        return out, residual, x_q, scale
    block = triton.next_power_of_2(H)
    res = residual if residual is not None else x
    _rms_norm_quant_kernel[(T,)](x, res, weight, out, x_q, scale, H, eps, FP8_MAX, x.stride(0), res.stride(0),
                                 out.stride(0), x_q.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block,
                                 REREAD=norm_reread_on(),
                                 FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE,
                                 num_warps=norm_warps(T, block),
                                 **pdl_kwargs(x.device))
    return out, residual, x_q, scale


def silu_mul_quant(gate_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gate_up [T, 2I] -> (silu(gate) * up [T, I], its e4m3 codes [T, I], scale [T, 1] fp32), one launch."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: silu_and_mul_ref + per_token_quant_fp8_ref")
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(-1) == 1
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    x_q = torch.empty((T, I), dtype=FP8, device=gate_up.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=gate_up.device)
    if T == 0:
        return out, x_q, scale
    one_pass = silu_one_pass_on() and I <= 16384
    block = max(16, triton.next_power_of_2(I)) if one_pass else min(2048, max(16, triton.next_power_of_2(I)))
    warps = min(16, max(4, block // 1024)) if one_pass else (4 if block <= 1024 else 8)
    warps = _warps("LORASERVE_FP8_SILU_WARPS", warps)
    _silu_mul_quant_kernel[(T,)](gate_up, out, x_q, scale, I, FP8_MAX, gate_up.stride(0), out.stride(0),
                                 x_q.stride(0), BLOCK=block, FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE, ONE_PASS=one_pass,
                                 num_warps=warps, **pdl_kwargs(gate_up.device))
    return out, x_q, scale
