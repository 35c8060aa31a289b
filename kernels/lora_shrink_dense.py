"""Dense multi-LoRA shrink: every token against every slot's A in one GEMM (issue 10, opt-in).

Semantics, with the slot pool's A seen as one matrix W = lora_a.view(L * S * R, H_in) (a free view of
the pool's [L, S, R, H_in] layout) and NR = L * S * R:
    out[j, t, n] = x[t, K_j] @ W[n, K_j]          for every token t, every row n of W, K chunk j
(fp32 partials; backend "mm": SPLIT_K = 1, one cuBLAS GEMM). Token t's own intermediate for slice s is
the R columns at n = slot(t) * S * R + s * R: the streaming expand reads exactly those
(lora_expand(..., dense_slots=True), a slot offset on its partials pointer), so the rows of other slots,
of tokens without an adapter and past each rank are computed and never read.

Why: at decode-size steps with many adapters (64 tokens / 32 adapters: 2 tokens each) the tiled shrink
(lora_shrink) runs one program per (adapter tile, rank block, K split, slice): a 3-level metadata chain,
then 8 KB blocks of A through 16-row tl.dot tiles with 2 valid rows; it streamed A at 1.3-1.5 TB/s
(kernels/PERF_NOTES.md). Here every program reads a contiguous [BLOCK_N, BLOCK_K] block of W (16 KB at
64 x 128) per step straight from the pool, no metadata, all tokens at once (x [T, K] comes from L2); the
FLOPs of computing every token against every slot (2 * T * H_in * NR = 0.8 GFLOP for qkv at 64 tokens /
32 slots of rank 16) are free at this size. Rows of slots no token of a program's row block uses are
masked off (no bytes; the program exits when none of its rows is used), so it reads the A of the used
slots up to the pool's max rank R (the tiled shrink: up to each slot's own rank). lora_apply takes it
for 32-256 tokens and a pool of <= T slots (opt-in: LORASERVE_LORA_DENSE=triton|mm, lora_apply.DENSE_MODE;
the mm backend reads every slot).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import pdl_launch

if HAS_TRITON:

    @triton.jit
    def _lora_shrink_dense_kernel(
        x_ptr, w_ptr, out_ptr, token_slot_ptr, T, NR, K, SLOT_ROWS,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ok, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        if USE_PDL:  # as lora_shrink: let the expand launch now; wait for the kernel before us (x)
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < T
        # rows of W whose slot no token of this row block uses are never read (no bytes): their
        # columns of out are read by nobody (a token reads only its own slot's), left unwritten
        tslot = tl.load(token_slot_ptr + offs_m, mask=m_ok, other=-1)             # [BLOCK_M]
        row_slot = offs_n // SLOT_ROWS
        used = tl.max((tslot[:, None] == row_slot[None, :]).to(tl.int32), axis=0) > 0   # [BLOCK_N]
        if tl.max(used.to(tl.int32), axis=0) == 0:
            return
        n_ok = (offs_n < NR) & used
        k0 = pid_k * (K_STEPS * BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(K_STEPS):  # pipelined by num_stages: W blocks (cp.async) several steps ahead
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                wt = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = offs_k < K - i * BLOCK_K
                xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")   # [BLOCK_M, BLOCK_N]
            else:
                acc += tl.dot(xt, tl.trans(wt))
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        out_ptrs = out_ptr + pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


_MM_OUT_DTYPE: bool | None = None   # torch.mm(..., out_dtype=float32) works here (None: not tried yet)


def dense_view(lora_a: Tensor) -> Tensor | None:
    """W [L * S * R, H_in], a view of lora_a [L, S, R, H_in] (no copy), or None when its strides
    do not allow one (the dense path then does not apply)."""
    L, S, R, H = lora_a.shape
    sl, ss, sr, sk = lora_a.stride()
    if sk != 1 or ss != R * sr or (L > 1 and sl != S * ss):
        return None
    return lora_a.as_strided((L * S * R, H), (sr, 1))


def dense_shrink_config(num_tokens: int, num_rows: int, hidden_in: int, num_sms: int = 132) -> dict:
    """BLOCK_M covers up to 64 tokens (x tiles from L2); BLOCK_N 64 rows of W (32 below 1024 rows);
    BLOCK_K 128 columns (8-16 KB of W per step, 3 stages: 2 steps in flight, <= 96 KB of shared memory,
    so 2 programs fit an SM); then split K (a power of two, <= 32, >= 2 steps per split) up to about 2
    programs per SM. 64 tokens / 32 slots of rank 16: qkv (NR 1536) 24 column blocks x 8 splits of 4
    steps; gate_up (1024) 16 x 16 of 2; o (512) 16 x 16 of 2; down (512, K 14336) 16 x 16 of 7."""
    block_m = min(64, max(16, 1 << max(0, (num_tokens - 1).bit_length())))
    block_n, block_k = (64 if num_rows >= 1024 else 32), 128
    m_blocks = -(-num_tokens // block_m)
    n_blocks = -(-num_rows // block_n)
    k_steps = -(-hidden_in // block_k)
    split = 1
    while split < 32 and m_blocks * n_blocks * split * 2 <= 2 * num_sms and k_steps >= 4 * split:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                K_STEPS=-(-k_steps // split), num_warps=4, num_stages=3)


def dense_split_k(x: Tensor, lora_a: Tensor, backend: str = "triton") -> int:
    """The partials' leading dim :func:`lora_shrink_dense` writes for these shapes."""
    if backend == "mm":
        return 1
    from .lora_shrink import _num_sms

    L, S, R, H = lora_a.shape
    return dense_shrink_config(x.shape[0], L * S * R, H, _num_sms(x.device.index if x.is_cuda else None))["SPLIT_K"]


def dense_partials(out: Tensor, num_slices: int, rank: int) -> Tensor:
    """[SPLIT_K, S, T, R] view of the dense shrink's out [SPLIT_K, T, L * S * R] at slot 0; the
    expand adds slot * S * R (its dense_slots mode) to reach each token's own slot."""
    SK, T, NR = out.shape
    so, sm, sn = out.stride()
    return out.as_strided((SK, num_slices, T, rank), (so, rank * sn, sm, sn))


def lora_shrink_dense(x: Tensor, lora_a: Tensor, out: Tensor, token_slot: Tensor, *, backend: str = "triton",
                      config: dict | None = None) -> Tensor:
    """out [SPLIT_K, T, L * S * R] float32 <- x [T, H_in] @ W^T per K chunk (module docstring).

    x: fp16/bf16/fp32 (any strides); lora_a [L, S, R, H_in] in x's dtype with a flat (L, S, R) view
    (dense_view); token_slot [T] int32 (-1: none), the meta's: the triton backend skips the rows of slots
    no token of a row block uses (their columns stay unwritten: only a token of that slot would read
    them); backend "triton" (this module's kernel, SPLIT_K from dense_shrink_config) or "mm" (one cuBLAS
    GEMM into out[0] over every slot, fp32 output where torch offers it, else rounded to x's dtype first).
    """
    T, H = x.shape
    W = dense_view(lora_a)
    assert W is not None, f"lora_a strides {lora_a.stride()} have no flat [L*S*R, H] view"
    assert W.shape[1] == H and x.dtype == lora_a.dtype, f"x {tuple(x.shape)} {x.dtype} vs lora_a {lora_a.dtype}"
    NR = W.shape[0]
    assert out.dim() == 3 and out.shape[1:] == (T, NR) and out.dtype == torch.float32, \
        f"out must be float32 [SPLIT_K, T={T}, {NR}], got {out.dtype} {tuple(out.shape)}"
    assert token_slot.shape == (T,) and token_slot.dtype == torch.int32, "token_slot must be int32 [T]"
    if T == 0:
        return out
    if backend == "mm":
        assert out.shape[0] == 1, "the mm backend writes one partial"
        if x.is_cuda and x.dtype != torch.float32:
            global _MM_OUT_DTYPE
            if _MM_OUT_DTYPE is not False:
                try:
                    torch.mm(x, W.t(), out_dtype=torch.float32, out=out[0])
                    _MM_OUT_DTYPE = True
                    return out
                except (TypeError, RuntimeError):  # a torch without mm's out_dtype (checked before any launch)
                    if _MM_OUT_DTYPE:
                        raise
                    _MM_OUT_DTYPE = False
            out[0].copy_(torch.mm(x, W.t()))   # x's dtype, then fp32: the expand rounds h to it anyway
            return out
        torch.mm(x.float(), W.float().t(), out=out[0])
        return out
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    from .lora_shrink import _num_sms

    cfg = dict(dense_shrink_config(T, NR, H, _num_sms(x.device.index if x.is_cuda else None)), **(config or {}))
    SK = out.shape[0]
    k_steps = -(-H // cfg["BLOCK_K"])
    cfg["K_STEPS"] = -(-k_steps // SK)
    assert -(-k_steps // cfg["K_STEPS"]) <= SK, f"out has {SK} K splits, the config needs more"
    grid = (triton.cdiv(NR, cfg["BLOCK_N"]), SK, triton.cdiv(T, cfg["BLOCK_M"]))
    _lora_shrink_dense_kernel[grid](
        x, W, out, token_slot, T, NR, H, lora_a.shape[1] * lora_a.shape[2],
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), *out.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], K_STEPS=cfg["K_STEPS"],
        EVEN_K=H % (cfg["BLOCK_K"] * cfg["K_STEPS"]) == 0 and H == SK * cfg["BLOCK_K"] * cfg["K_STEPS"],
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl_launch(x.device),
    )
    # splits past the last K block (SK * K_STEPS * BLOCK_K > H by whole steps) store zeros: every
    # program runs its K_STEPS, masked loads past K give 0
    return out
