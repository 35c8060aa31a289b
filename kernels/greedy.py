"""Greedy sampling of a few rows in two launches: argmax, log-probability and the finite check, Triton.

    Semantics (exactly services/inference/sampler.py's sample() for all-greedy rows without min_tokens
    bans or top logprobs; x = logits[b] [V], any float dtype, read as fp32):
        clean = x with NaN -> -inf; if the row holds +inf: 0 at the +inf entries, -inf elsewhere
        lse = logsumexp(clean);  ok = isfinite(lse)
        token = first index of max(clean) (0 when not ok);  logprob = clean[token] - lse (0 when not ok)
    logits: [B, V]; returns tokens [B] int64, logprobs [B] fp32, ok [B] bool.

Why: at batch 1 the torch version is ~10 launches, four of them reductions over the 128k vocabulary that
each run in one block (H200: 15-30 us each, ~90 us of a ~5 ms decode step). Here the vocabulary is split
over B x cdiv(V, CHUNK) programs (max, first argmax, sum of exp relative to the chunk's max, +inf count and
first +inf per chunk), and one program per row merges the chunks in a fixed order (deterministic).
logsumexp is summed in two levels (chunk, then rows of chunks), so lse may differ from torch's in the
last fp32 bit; the token never does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs

CHUNK = 4096
MAX_ROWS = 64   # above this the torch path's reductions fill the GPU themselves


def greedy_sample_ref(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The torch ops of sampler.sample() for all-greedy rows (sanitize, argmax, gather - lse)."""
    x = logits.float()
    clean = torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    posinf = torch.isposinf(clean)
    clean = torch.where(posinf.any(dim=-1, keepdim=True), torch.where(posinf, 0.0, float("-inf")), clean)
    lse = torch.logsumexp(clean, dim=-1)
    ok = torch.isfinite(lse)
    clean = torch.where(ok[:, None], clean, 0.0)
    lse = torch.where(ok, lse, 0.0)
    tokens = clean.argmax(dim=-1)
    return tokens, clean.gather(1, tokens[:, None]).squeeze(1) - lse, ok


if HAS_TRITON:

    @triton.jit
    def _greedy_chunk_kernel(x_ptr, wsf_ptr, wsi_ptr, V, stride_x, num_chunks, CHUNK: tl.constexpr,
                             USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: the logits are the kernels before us's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        valid = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)                        # NaN -> -inf
        posinf = x == float("inf")
        n_pos = tl.sum(posinf.to(tl.int32), axis=0)
        big = 2147483647
        first_pos = tl.min(tl.where(posinf, offs, big), axis=0)
        xf = tl.where(posinf, float("-inf"), x)
        m = tl.max(xf, axis=0)
        idx = tl.min(tl.where(valid & (xf == m), offs, big), axis=0)   # first index of the chunk's max
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.where(xf == float("-inf"), 0.0, tl.exp(xf - m_safe)), axis=0)
        # workspaces [2, B, C] fp32 (max, sum of exp) and [3, B, C] int32 (argmax, +inf count, first +inf)
        at = row * num_chunks + c
        plane = tl.num_programs(0) * num_chunks
        tl.store(wsf_ptr + at, m)
        tl.store(wsf_ptr + plane + at, s)
        tl.store(wsi_ptr + at, idx)
        tl.store(wsi_ptr + plane + at, n_pos)
        tl.store(wsi_ptr + 2 * plane + at, first_pos)

    @triton.jit
    def _greedy_merge_kernel(wsf_ptr, wsi_ptr, tok_ptr, lp_ptr, ok_ptr, num_chunks, C_PAD: tl.constexpr,
                             USE_PDL: tl.constexpr = False):
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cs = tl.arange(0, C_PAD)
        cm = cs < num_chunks
        big = 2147483647
        plane = tl.num_programs(0) * num_chunks
        at = row * num_chunks + cs
        m = tl.load(wsf_ptr + at, mask=cm, other=float("-inf"))
        s = tl.load(wsf_ptr + plane + at, mask=cm, other=0.0)
        idx = tl.load(wsi_ptr + at, mask=cm, other=big)
        n_pos = tl.load(wsi_ptr + plane + at, mask=cm, other=0)
        first_pos = tl.load(wsi_ptr + 2 * plane + at, mask=cm, other=big)
        total_pos = tl.sum(n_pos, axis=0)
        M = tl.max(m, axis=0)
        M_safe = tl.where(M == float("-inf"), 0.0, M)
        S = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - M_safe)), axis=0)
        tok_max = tl.min(tl.where(m == M, idx, big), axis=0)
        has_pos = total_pos > 0
        finite = M > float("-inf")
        lse = tl.where(has_pos, tl.log(total_pos.to(tl.float32)), M_safe + tl.log(tl.where(finite, S, 1.0)))
        ok = has_pos | finite
        token = tl.where(has_pos, tl.min(first_pos, axis=0), tl.where(finite, tok_max, 0))
        logprob = tl.where(has_pos, 0.0 - lse, tl.where(finite, M_safe - lse, 0.0))
        tl.store(tok_ptr + row, token.to(tl.int64))
        tl.store(lp_ptr + row, logprob)
        tl.store(ok_ptr + row, ok.to(tl.int8))


def greedy_ok(logits: Tensor) -> bool:
    """The shapes this kernel serves: [B <= MAX_ROWS, V < 2^31] with a contiguous last dim, on CUDA."""
    return (HAS_TRITON and logits.is_cuda and logits.dim() == 2 and 0 < logits.shape[0] <= MAX_ROWS
            and logits.stride(-1) == 1 and logits.shape[1] < 2 ** 31 - 1)


def greedy_sample(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [B] int64, logprobs [B] fp32, ok [B] bool of logits [B, V] (see the module docstring);
    two launches, no host sync (CUDA-graph capturable)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use greedy_sample_ref")
    B, V = logits.shape
    assert logits.stride(-1) == 1, "the vocabulary dim must be contiguous"
    C = triton.cdiv(V, CHUNK)
    wsf = torch.empty(2, B, C, dtype=torch.float32, device=logits.device)
    wsi = torch.empty(3, B, C, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    ok = torch.empty(B, dtype=torch.int8, device=logits.device)
    pdl = pdl_kwargs(logits.device)
    _greedy_chunk_kernel[(B, C)](logits, wsf, wsi, V, logits.stride(0), C, CHUNK=CHUNK, num_warps=8, **pdl)
    _greedy_merge_kernel[(B,)](wsf, wsi, tokens, logprobs, ok, C, C_PAD=max(16, triton.next_power_of_2(C)),
                               num_warps=1, **pdl)
    return tokens, logprobs, ok.view(torch.bool)
