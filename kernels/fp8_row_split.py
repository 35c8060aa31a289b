"""Row-split forms of kernels/fp8_norm_quant.py's per-token kernels, for decode batches of a few dozen rows.

    silu_mul_quant_split:  == silu_mul_quant (out bit for bit, codes and scales bit for bit)
    norm_quant_split:      == splitk_add_rms_norm(..., quant=True) / rms_norm_quant, but the row's sum of squares is
                           added chunk by chunk (fixed order), so out may round one bf16 ulp away from rms_norm's
    gate_up: [T, 2I]; out [T, I] / [T, H]; x_q: e4m3 like out; scale: [T, 1] fp32.

Why: the one-program-per-row kernels run T programs; at T = 64 that is under half of an H200's 132 SMs, each
streaming its row alone (bs64 decode layer, H200 probe 2026-12-01 02:00: silu_mul_quant 6.8 us, the deferred norm +
codes 4.6 us a call, against 1.3 us for the bf16 silu_and_mul over (T, I / 1024) programs). Here a row is cut into
CHUNK-wide pieces, one program each (T x C programs): each does its piece's elementwise work and stores its partial
(amax, or sum of squares) and bumps the row's arrival counter (acq_rel); the row's last program to arrive reduces the
partials in chunk order (deterministic whoever arrives last) and does the row-wide rest from L2 (the codes; for the
norm also the normalisation), then zeroes the counter for the next launch (CUDA-graph replays too). The pattern is
kernels/skinny_gemm.py's split-K fixup. No spin-waits, so the interpreter (one program after another) runs it too.
Switch: LORASERVE_FP8_ROW_SPLIT = 0 (off) | silu | norm | 1 (both), at T <= ROW_SPLIT_MAX_ROWS.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .fp8_gemm import FP8, FP8_MAX, MIN_SCALE
from .pdl import pdl_kwargs

ROW_SPLIT_MAX_ROWS = 128   # above this one program per row already fills the GPU (and the counters stay small)
_COUNTER_SLOTS = 4096
# one row's arrival counter every 128 bytes (not one L2 line for all rows' atomics). Measured (H200 05:09): no change
# (split silu 12.5 us, norm 5.7 a call either way, vs the row kernels' 6.8 / 4.6): the split forms stay opt-in
CNT_STRIDE = 32
_COUNTERS: dict[torch.device, Tensor] = {}


def row_split_mode() -> str:
    """LORASERVE_FP8_ROW_SPLIT: '0' off (default), 'silu', 'norm', '1' both."""
    v = os.environ.get("LORASERVE_FP8_ROW_SPLIT", "0").strip().lower()
    return {"": "0", "0": "0", "off": "0", "1": "1", "all": "1", "on": "1", "silu": "silu", "norm": "norm"}.get(v, "0")


def _key(device: torch.device) -> torch.device:
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def row_split_on(kind: str, rows: int, device: torch.device | None = None) -> bool:
    """Whether the split form runs: the switch names `kind` ('silu' / 'norm'), 1..ROW_SPLIT_MAX_ROWS rows, and the
    counters exist or may be made now (never first inside a CUDA-graph capture: the row kernel then)."""
    mode = row_split_mode()
    if not (HAS_TRITON and 0 < rows <= ROW_SPLIT_MAX_ROWS and (mode == "1" or mode == kind)):
        return False
    return (device is None or device.type != "cuda" or _key(device) in _COUNTERS
            or not torch.cuda.is_current_stream_capturing())


def reserve_counters(device: torch.device) -> None:
    """Make the device's counters now (the FP8 model does at conversion), so that a graph captured later can use them
    (a buffer first made inside a capture would live in that graph's pool)."""
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _counters(device)


def _counters(device: torch.device) -> Tensor:
    """[_COUNTER_SLOTS] int32 zeros per device, one per row; every launch leaves them zero (the last program of a row
    resets its own), so one buffer serves all the launches of a step (they run one after another)."""
    device = _key(device)
    cnt = _COUNTERS.get(device)
    if cnt is None:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "row-split counters first needed inside a CUDA-graph capture (row_split_on gates this)"
        cnt = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return cnt


if HAS_TRITON:

    @triton.jit
    def _silu_mul_quant_split_kernel(x_ptr, out_ptr, q_ptr, s_ptr, part_ptr, cnt_ptr, I, fp8_max, stride_x, stride_o,
                                     stride_q, C, CHUNK: tl.constexpr, TAIL: tl.constexpr, C_P2: tl.constexpr,
                                     FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr,
                                     USE_PDL: tl.constexpr = False):
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < I
        # kernels/activation.py's _silu_and_mul_kernel, line for line
        g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        u = tl.load(x_ptr + row * stride_x + I + offs, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        y = (act * u.to(tl.float32)).to(g.dtype)
        tl.store(out_ptr + row * stride_o + offs, y, mask=ok)
        tl.store(part_ptr + row * C + c, tl.max(tl.where(ok, tl.abs(y.to(tl.float32)), 0.0), axis=0))
        tl.debug_barrier()   # every thread's stores done before the counter moves
        done = tl.atomic_add(cnt_ptr + row * 32, 1, sem="acq_rel")   # (CNT_STRIDE) release ours, acquire the others'
        if done == C - 1:   # the row's last program: its scale, then all its codes (from L2)
            po = tl.arange(0, C_P2)
            amax = tl.max(tl.load(part_ptr + row * C + po, mask=po < C, other=0.0, cache_modifier=".cg"), axis=0)
            scale = tl.maximum(tl.div_rn(amax, fp8_max), MIN_SCALE_C)   # per_token_quant_fp8's arithmetic
            tl.store(s_ptr + row, scale)
            # the whole row in one load (TAIL >= I: one L2 round trip, not one per chunk; the tail's cost is latency)
            to = tl.arange(0, TAIL)
            for k0 in range(0, I, TAIL):
                tok = (k0 + to) < I
                v = tl.load(out_ptr + row * stride_o + k0 + to, mask=tok, other=0.0, cache_modifier=".cg")
                q = tl.minimum(tl.maximum(tl.div_rn(v.to(tl.float32), scale), -FP8_MAX_C), FP8_MAX_C)
                tl.store(q_ptr + row * stride_q + k0 + to, q.to(q_ptr.dtype.element_ty), mask=tok)
            tl.atomic_xchg(cnt_ptr + row * 32, 0, sem="relaxed")   # zero for the next launch (ordered by its end)

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def _norm_quant_split_kernel(x_ptr, ws_ptr, s_ptr, xs_ptr, res_ptr, w_ptr, out_ptr, q_ptr, qs_ptr, part_ptr,
                                 cnt_ptr, M, H, SPLITS, eps, fp8_max, stride_x, stride_r, stride_o, stride_q, C,
                                 PARTIALS: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                 CHUNK: tl.constexpr, TAIL: tl.constexpr, C_P2: tl.constexpr,
                                 FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr, USE_PDL: tl.constexpr = False):
        # x = PARTIALS: (sum over the splits of ws[split, row, :], in split order) [* xs[row]] * s, rounded to the
        # dtype (fp8_norm_quant._splitk_add_rms_norm_kernel's); else x[row]; [+ residual, stored]; RMSNorm; codes
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < H
        if PARTIALS:
            acc = tl.zeros((CHUNK,), dtype=tl.float32)
            for split in range(SPLITS):
                acc += tl.load(ws_ptr + (split * M + row) * H + offs, mask=ok, other=0.0)
            if ROW_SCALE:
                acc = acc * tl.load(xs_ptr + row)
            r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
            x = (acc * tl.load(s_ptr + offs, mask=ok, other=0.0)).to(r.dtype)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
        else:
            x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
        xf = x.to(tl.float32)
        tl.store(part_ptr + row * C + c, tl.sum(xf * xf, axis=0))
        tl.debug_barrier()   # every thread's stores done before the counter moves
        done = tl.atomic_add(cnt_ptr + row * 32, 1, sem="acq_rel")   # (CNT_STRIDE)
        if done == C - 1:   # the row's last program: the norm of the whole row (x from L2), then its codes
            po = tl.arange(0, C_P2)
            parts = tl.load(part_ptr + row * C + po, mask=po < C, other=0.0, cache_modifier=".cg")
            inv = 1.0 / tl.sqrt(tl.sum(parts, axis=0) / H + eps)
            to = tl.arange(0, TAIL)
            if TAIL >= H:   # the row in registers: one L2 round trip, the codes without reading it back
                tok = to < H
                if PARTIALS or HAS_RESIDUAL:   # x as stored by the row's programs
                    xv = tl.load(res_ptr + row * stride_r + to, mask=tok, other=0.0, cache_modifier=".cg")
                else:
                    xv = tl.load(x_ptr + row * stride_x + to, mask=tok, other=0.0)
                normed = (xv.to(tl.float32) * inv).to(xv.dtype).to(tl.float32)
                y = (tl.load(w_ptr + to, mask=tok, other=0.0).to(tl.float32) * normed).to(xv.dtype)
                tl.store(out_ptr + row * stride_o + to, y, mask=tok)
                yf = y.to(tl.float32)
                scale = tl.maximum(tl.div_rn(tl.max(tl.where(tok, tl.abs(yf), 0.0), axis=0), fp8_max), MIN_SCALE_C)
                tl.store(qs_ptr + row, scale)
                q = tl.minimum(tl.maximum(tl.div_rn(yf, scale), -FP8_MAX_C), FP8_MAX_C)
                tl.store(q_ptr + row * stride_q + to, q.to(q_ptr.dtype.element_ty), mask=tok)
            else:
                amax = tl.zeros((TAIL,), dtype=tl.float32)
                for k0 in range(0, H, TAIL):
                    tok = (k0 + to) < H
                    if PARTIALS or HAS_RESIDUAL:
                        xv = tl.load(res_ptr + row * stride_r + k0 + to, mask=tok, other=0.0, cache_modifier=".cg")
                    else:
                        xv = tl.load(x_ptr + row * stride_x + k0 + to, mask=tok, other=0.0)
                    normed = (xv.to(tl.float32) * inv).to(xv.dtype).to(tl.float32)
                    w = tl.load(w_ptr + k0 + to, mask=tok, other=0.0).to(tl.float32)
                    y = (w * normed).to(xv.dtype)
                    tl.store(out_ptr + row * stride_o + k0 + to, y, mask=tok)
                    amax = tl.maximum(amax, tl.where(tok, tl.abs(y.to(tl.float32)), 0.0))
                scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), fp8_max), MIN_SCALE_C)
                tl.store(qs_ptr + row, scale)
                tl.debug_barrier()   # the row's out stored before its threads read it back
                for k0 in range(0, H, TAIL):
                    hok = (k0 + to) < H
                    v = tl.load(out_ptr + row * stride_o + k0 + to, mask=hok, other=0.0).to(tl.float32)
                    q = tl.minimum(tl.maximum(tl.div_rn(v, scale), -FP8_MAX_C), FP8_MAX_C)
                    tl.store(q_ptr + row * stride_q + k0 + to, q.to(q_ptr.dtype.element_ty), mask=hok)
            tl.atomic_xchg(cnt_ptr + row * 32, 0, sem="relaxed")   # zero for the next launch (ordered by its end)


def _chunk(n: int, env: str, default: int) -> int:
    chunk = int(os.environ.get(env, "") or default)
    assert chunk >= 16 and chunk & (chunk - 1) == 0, f"{env} must be a power of two >= 16, got {chunk}"
    return min(chunk, max(16, triton.next_power_of_2(n)))


def silu_mul_quant_split(gate_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gate_up [T, 2I] -> (silu(gate) * up [T, I], its e4m3 codes [T, I], scale [T, 1] fp32): silu_mul_quant's
    values bit for bit over (T, cdiv(I, CHUNK)) programs (LORASERVE_FP8_ROW_SPLIT_CHUNK, default 1024)."""
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(-1) == 1
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    assert T * CNT_STRIDE <= _COUNTER_SLOTS
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    x_q = torch.empty((T, I), dtype=FP8, device=gate_up.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=gate_up.device)
    if T == 0:
        return out, x_q, scale
    chunk = _chunk(I, "LORASERVE_FP8_ROW_SPLIT_CHUNK", 1024)
    C = triton.cdiv(I, chunk)
    part = torch.empty((T, C), dtype=torch.float32, device=gate_up.device)   # per-chunk amax
    tail = min(16384, max(16, triton.next_power_of_2(I)))   # the whole row (8B: 14336; 64 values a thread at 8 warps)
    warps = 8 if tail > 4096 else 4
    _silu_mul_quant_split_kernel[(T, C)](gate_up, out, x_q, scale, part, _counters(gate_up.device), I, FP8_MAX,
                                         gate_up.stride(0), out.stride(0), x_q.stride(0), C, CHUNK=chunk, TAIL=tail,
                                         C_P2=max(2, triton.next_power_of_2(C)), FP8_MAX_C=FP8_MAX,
                                         MIN_SCALE_C=MIN_SCALE, num_warps=warps, **pdl_kwargs(gate_up.device))
    return out, x_q, scale


def norm_quant_split(x: Tensor | None, residual: Tensor | None, weight: Tensor, eps: float,
                     ws: Tensor | None = None, w_scale: Tensor | None = None, x_scale: Tensor | None = None):
    """Either x [T, H] (rms_norm_quant's inputs) or ws [SPLIT, T, H] fp32 + w_scale [H] (+ x_scale [T, 1]) with a
    residual (splitk_add_rms_norm's). Returns (out [T, H], residual (updated in place) or None, x_q e4m3, scale
    [T, 1] fp32) over (T, cdiv(H, CHUNK)) programs (LORASERVE_FP8_ROW_SPLIT_NORM_CHUNK, default 1024)."""
    partials = ws is not None
    if partials:
        splits, T, H = ws.shape
        assert ws.dtype == torch.float32 and ws.is_contiguous() and w_scale.shape == (H,) and residual is not None
        assert x_scale is None or (splits == 1 and x_scale.numel() == T and x_scale.dtype == torch.float32)
        ref = residual
    else:
        assert x is not None and x.dim() == 2 and x.stride(-1) == 1, "x must be [T, H] with a contiguous last dim"
        (T, H), splits, ref = x.shape, 1, x
    if residual is not None:
        assert residual.shape == (T, H) and residual.stride(-1) == 1 and residual.dtype == ref.dtype
    assert weight.shape == (H,) and T * CNT_STRIDE <= _COUNTER_SLOTS
    dev = ref.device
    out = torch.empty((T, H), dtype=ref.dtype, device=dev)
    x_q = torch.empty((T, H), dtype=FP8, device=dev)
    q_scale = torch.empty((T, 1), dtype=torch.float32, device=dev)
    if T == 0:
        return out, residual, x_q, q_scale
    chunk = _chunk(H, "LORASERVE_FP8_ROW_SPLIT_NORM_CHUNK", 1024)
    C = triton.cdiv(H, chunk)
    part = torch.empty((T, C), dtype=torch.float32, device=dev)   # per-chunk sums of squares
    tail = min(8192, max(32, triton.next_power_of_2(H)))   # the whole row (8B: 4096) when it fits
    res = residual if residual is not None else ref
    xx = x if x is not None else ref
    _norm_quant_split_kernel[(T, C)](
        xx, ws if partials else ref, w_scale if partials else weight,
        x_scale if x_scale is not None else (w_scale if partials else weight), res, weight, out, x_q, q_scale, part,
        _counters(dev), T, H, splits, eps, FP8_MAX, xx.stride(0), res.stride(0), out.stride(0), x_q.stride(0), C,
        PARTIALS=partials, ROW_SCALE=x_scale is not None, HAS_RESIDUAL=residual is not None, CHUNK=chunk, TAIL=tail,
        C_P2=max(2, triton.next_power_of_2(C)), FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE,
        num_warps=4, **pdl_kwargs(dev))
    return out, residual, x_q, q_scale
