"""The MLP's gate_up GEMV with SiLU-and-mul in its epilogue (decode, kernels/fp8_gemv.py fp8_gemv(..., silu=True)).

    Semantics: g = (x @ dequant(w_q[:I])^T), u = (x @ dequant(w_q[I:])^T), each rounded to x's dtype, then
               out[m, i] = (silu(g[m, i]).to(dtype) * u[m, i]).to(dtype)     (kernels/activation.py's rounding)
    x: [M, K] bf16/fp16 (fp32 in the interpreter); w_q: [2I, K] e4m3 (gate rows, then up rows: the fused
    gate_up_proj); w_scale: [2I] fp32; out: [M, I] in x's dtype. No bias (Llama's MLP has none).

Why: at one token the decoder layer is a chain of ~12 short kernels and each boundary costs a launch and a ramp
(kernels/PERF_NOTES.md, batch-1 decode). The grouped GEMV kinds (gemv2 / gemv4 / gemvh2 / gemvh4: one x row per
program, 2 or 4 groups of BLOCK_N weight rows) already hold several row groups per program; with SILU their groups
are gate row i and up row I + i (GROUPS 2), or gate rows i, i + BLOCK_N and their up rows (GROUPS 4), so each
program has both halves of its outputs and applies SiLU-and-mul before its one store: the separate activation launch
goes. With split-K the partials go to the usual [SPLIT, M, 2I] workspace and the split-K sum applies the activation
(_splitk_sum_silu_kernel: sum + SiLU-mul in the launch that was there anyway). The arithmetic is the unfused pair's
(same tiles, same summation order, the same roundings), so the output equals GEMV + silu_and_mul bit for bit.
The bf16 engine's GEMV computes SiLU in the down projection instead (llama.py GEMV_SILU, off: it recomputes the
activation per weight row); here it is computed once per output, in the producer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

SILU_KINDS = ("gemv2", "gemv4", "gemvh2", "gemvh4")


def silu_config_ok(cfg: tuple, n: int) -> bool:
    """Whether a GEMV config can run gate_up [n = 2I rows] with the SiLU epilogue: a grouped kind whose gate-row
    block (BLOCK_N x GROUPS / 2) divides I, so that no program straddles the gate / up boundary."""
    kind, bn = cfg[0], cfg[2]
    if kind not in SILU_KINDS or n % 2:
        return False
    return (n // 2) % (bn * int(kind[-1]) // 2) == 0


def gemv_silu_ref(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """Pure-torch reference: fp32 GEMV (one rounding to x's dtype per output), then HF's SiLU-and-mul."""
    y = (x.float() @ w_q.float().t() * w_scale[None, :]).to(x.dtype)   # [M, 2I]
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _group_rows(pid_n, N, GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, SILU: tl.constexpr):
        # the 4 row blocks [BLOCK_N] a grouped GEMV program (gemv2/4, gemvh2/4) accumulates: consecutive blocks, or
        # with SILU gate rows and their up rows N / 2 further (GROUPS 2: one gate block + its up block; GROUPS 4:
        # two gate blocks + theirs). Blocks past GROUPS are computed but unused.
        if SILU:
            offs_0 = pid_n * (GROUPS // 2 * BLOCK_N) + tl.arange(0, BLOCK_N)
            offs_1 = offs_0 + (N // 2 if GROUPS == 2 else BLOCK_N)
            offs_2 = offs_0 + N // 2
            offs_3 = offs_1 + N // 2
        else:
            offs_0 = pid_n * (GROUPS * BLOCK_N) + tl.arange(0, BLOCK_N)
            offs_1 = offs_0 + BLOCK_N
            offs_2 = offs_0 + 2 * BLOCK_N
            offs_3 = offs_0 + 3 * BLOCK_N
        return offs_0, offs_1, offs_2, offs_3

    @triton.jit
    def _silu_mul_rounded(g, u, dt: tl.constexpr):
        # g, u: fp32 GEMV outputs; rounded to the dtype as the GEMV's store would, then activation.py's roundings
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt)

    @triton.jit
    def _silu_pair_store(acc_g, acc_u, row, M, N, offs, s_ptr, y_ptr, stride_ym):
        # acc_g, acc_u: [BLOCK_N, BLOCK_K] fp32 accumulators of gate rows offs and up rows N/2 + offs;
        # y: [M, N/2]: one SiLU-and-mul output per gate row
        half = N // 2
        ok = (offs < half) & ((offs * 0 + row) < M)
        g = tl.sum(acc_g, axis=1) * tl.load(s_ptr + offs, mask=ok, other=0.0)          # [BLOCK_N]
        u = tl.sum(acc_u, axis=1) * tl.load(s_ptr + half + offs, mask=ok, other=0.0)
        out = _silu_mul_rounded(g, u, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs, out, mask=ok)

    @triton.jit(do_not_specialize=["M", "SPLITS"])
    def _splitk_sum_silu_kernel(ws_ptr, s_ptr, y_ptr, M, N, SPLITS, stride_ym, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # y[row, i] = silu-mul(sum_split ws[split, row, i] * s[i], sum_split ws[split, row, I + i] * s[I + i]),
        # I = N / 2; the splits in order (deterministic), as _splitk_sum_kernel
        row = tl.program_id(0).to(tl.int64)
        half = N // 2
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < half
        s_g = tl.load(s_ptr + offs, mask=ok, other=0.0)   # weights' data: older than the GEMV before us
        s_u = tl.load(s_ptr + half + offs, mask=ok, other=0.0)
        if PDL:   # a programmatic dependent of the GEMV: wait for its partials
            tl.extra.cuda.gdc_wait()
        acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLITS):
            base = ws_ptr + (split * M + row) * N
            acc_g += tl.load(base + offs, mask=ok, other=0.0)
            acc_u += tl.load(base + half + offs, mask=ok, other=0.0)
        out = _silu_mul_rounded(acc_g * s_g, acc_u * s_u, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_ym + offs, out, mask=ok)


def splitk_sum_silu(ws: Tensor, w_scale: Tensor, out: Tensor, pdl: bool) -> None:
    """ws [SPLIT, M, 2I] fp32 partials -> out [M, I] (SiLU-and-mul of the scaled sums), one launch."""
    splits, M, N = ws.shape
    block = min(1024, triton.next_power_of_2(N // 2))
    _splitk_sum_silu_kernel[(M, triton.cdiv(N // 2, block))](ws, w_scale, out, M, N, splits, out.stride(0), BLOCK=block,
                                                             PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
