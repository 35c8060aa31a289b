"""Greedy sampling over tensor-parallel vocabulary shards in three launches (+ the small all-reduce between):
the Triton form of services/inference/tp/sampling.py's shard_stats / combine.

    Semantics (rank q of W holds the logits' columns [vocab_start, vocab_start + Vr), of which the first
    `valid` are tokens; row t):
      tp_shard_stats: x = local[t, :valid] as fp32, NaN -> -inf; over the shard's finite-or--inf values
        stats[t, q] = (m = max, its first global index, s = sum exp(x - m) (0 when m = -inf),
                       n = number of +inf, the first +inf's global index (vocab_start when n = 0), 0, 0, 0)
        and stats[t, p] = 0 for p != q (a sum over the ranks then gathers every rank's row, exactly);
      tp_combine(stats summed over the ranks) = sampler.sample() of the whole row for all-greedy rows:
        a row with +inf: the first +inf, logprob -log(count); else the first index of the global max M,
        logprob M - lse, lse = M + log(sum_q s_q exp(m_q - M)); ok = +inf present or lse finite.
    local: [T, Vr] bf16/fp16/fp32; stats: [T, W, 8] fp32 (written whole); tokens [T] int64, logprobs [T] fp32,
    ok [T] bool, packed [3, T] fp64 (token, logprob, ok: the engine's one device->host copy).

Why: the torch version is ~12 launches on each rank (four reductions over the 64k-column shard, each in one
block at batch 1) and ~20 tiny ones for the combine; inside a batch-1 decode step of the 8B shape under TP=2
they cost about as much as the LM head itself. The shard pass reuses kernels/greedy.py's chunk kernel (the
shard split over T x cdiv(valid, CHUNK) programs); one program per row merges the chunks into the rank's
stats row; one program per row combines the ranks. Chunks are merged in a fixed order (deterministic); the
sum of exp is two-level, so the logprob may differ from torch's in the last fp32 bits; the token never does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from . import greedy as _greedy
from .pdl import pdl_kwargs

NUM_FIELDS = 8   # per rank and row; 3 of padding: a [T, W, 8] fp32 message is a multiple of 16 bytes
MAX_ROWS = 256   # the decode buckets the sampler graphs cover


if HAS_TRITON:
    from .greedy import _greedy_chunk_kernel

    @triton.jit
    def _tp_stats_kernel(wsf_ptr, wsi_ptr, out_ptr, num_chunks, vocab_start, RANK: tl.constexpr,
                         WORLD: tl.constexpr, W_PAD: tl.constexpr, C_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: the workspaces are the chunk kernel's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cs = tl.arange(0, C_PAD)
        cm = cs < num_chunks
        big = 2147483647
        plane = tl.num_programs(0) * num_chunks
        at = row * num_chunks + cs
        m = tl.load(wsf_ptr + at, mask=cm, other=float("-inf"))           # chunk max over finite/-inf values
        s = tl.load(wsf_ptr + plane + at, mask=cm, other=0.0)             # sum exp(x - chunk max)
        idx = tl.load(wsi_ptr + at, mask=cm, other=big)                   # first index of the chunk max
        n_pos = tl.load(wsi_ptr + plane + at, mask=cm, other=0)
        first_pos = tl.load(wsi_ptr + 2 * plane + at, mask=cm, other=big)
        M = tl.max(m, axis=0)
        M_safe = tl.where(M == float("-inf"), 0.0, M)
        S = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - M_safe)), axis=0)
        tok = tl.min(tl.where(m == M, idx, big), axis=0)
        tok = tl.where(M == float("-inf"), 0, tok)   # no candidate in this shard (combine never picks it)
        total_pos = tl.sum(n_pos, axis=0)
        first = tl.where(total_pos > 0, tl.min(first_pos, axis=0), 0)
        # this rank's fields at column RANK of the [W, 8] row, zeros in every other rank's columns
        ranks = tl.arange(0, W_PAD)
        fields = tl.arange(0, 8)
        mine = ranks[:, None] == RANK
        f = fields[None, :]
        val = tl.where(f == 0, M, tl.where(f == 1, (tok + vocab_start).to(tl.float32),
              tl.where(f == 2, S, tl.where(f == 3, total_pos.to(tl.float32),
              tl.where(f == 4, (first + vocab_start).to(tl.float32), 0.0)))))
        val = tl.where(mine, val, 0.0)
        offs = row * WORLD * 8 + ranks[:, None] * 8 + f
        tl.store(out_ptr + offs, val, mask=(ranks[:, None] < WORLD) & (f < 8))

    @triton.jit
    def _tp_combine_kernel(stats_ptr, tok_ptr, lp_ptr, ok_ptr, packed_ptr, packed_stride,
                           WORLD: tl.constexpr, W_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # the stats are the all-gather's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, W_PAD)
        rm = r < WORLD
        base = stats_ptr + row * WORLD * 8 + r * 8
        m = tl.load(base + 0, mask=rm, other=float("-inf"))
        idx = tl.load(base + 1, mask=rm, other=0.0)
        s = tl.load(base + 2, mask=rm, other=0.0)
        n_inf = tl.load(base + 3, mask=rm, other=0.0)
        first_inf = tl.load(base + 4, mask=rm, other=0.0)
        big_r = 1 << 20
        tot_inf = tl.sum(n_inf, axis=0)
        has_inf = tot_inf > 0
        M = tl.max(m, axis=0)
        r_star = tl.min(tl.where(m == M, r, big_r), axis=0)                  # the lowest rank holding the max
        tok_fin = tl.sum(tl.where(r == r_star, idx, 0.0), axis=0)
        M_safe = tl.where((M == float("inf")) | (M == float("-inf")), 0.0, M)
        lse_fin = M_safe + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - M_safe)), axis=0))
        tok_inf = tl.min(tl.where(n_inf > 0, first_inf, 1.0e30), axis=0)
        lse_inf = tl.log(tl.maximum(tot_inf, 1.0))
        finite = (lse_fin == lse_fin) & (lse_fin != float("inf")) & (lse_fin != float("-inf"))
        ok = has_inf | finite
        token = tl.where(has_inf, tok_inf, tl.where(ok, tok_fin, 0.0))
        logprob = tl.where(has_inf, 0.0 - lse_inf, tl.where(ok, M - lse_fin, 0.0))
        tl.store(tok_ptr + row, token.to(tl.int64))
        tl.store(lp_ptr + row, logprob)
        tl.store(ok_ptr + row, ok.to(tl.int8))
        tl.store(packed_ptr + row, token.to(tl.float64))
        tl.store(packed_ptr + packed_stride + row, logprob.to(tl.float64))
        tl.store(packed_ptr + 2 * packed_stride + row, ok.to(tl.float64))


def tp_stats_ok(local: Tensor) -> bool:
    """The shapes the Triton path serves: CUDA (or the interpreter's CPU tensors), [T <= MAX_ROWS, Vr] with a
    contiguous last dim."""
    return (HAS_TRITON and local.dim() == 2 and 0 < local.shape[0] <= MAX_ROWS and local.stride(-1) == 1
            and local.shape[1] < 2 ** 24)


def tp_shard_stats(local: Tensor, vocab_start: int, vocab_size: int, rank: int, world: int,
                   out: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """local [T, Vr] -> stats [T, world, 8] fp32 (this rank's row filled, zeros elsewhere; module doc).
    chunk: columns per program of the shard pass (default kernels/greedy.py's CHUNK; tests use small ones)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use tp/sampling.py's shard_stats")
    T, Vr = local.shape
    assert local.stride(-1) == 1 and 0 <= rank < world
    # the last shard's padding rows are no tokens (a shard of padding only: every column masked, m = -inf)
    valid = max(0, min(Vr, vocab_size - vocab_start))
    chunk = chunk or _greedy.CHUNK
    C = max(1, triton.cdiv(valid, chunk))
    dev = local.device
    wsf = torch.empty(2, T, C, dtype=torch.float32, device=dev)   # [max, sum exp] per chunk
    wsi = torch.empty(3, T, C, dtype=torch.int32, device=dev)     # [argmax, +inf count, first +inf] per chunk
    if out is None:
        out = torch.empty(T, world, 8, dtype=torch.float32, device=dev)
    assert out.shape == (T, world, 8) and out.is_contiguous() and out.dtype == torch.float32
    pdl = pdl_kwargs(dev)   # (after a kernel launched without PDL, a PDL launch simply waits for its end)
    _greedy_chunk_kernel[(T, C)](local, wsf, wsi, valid, local.stride(0), C, CHUNK=chunk, num_warps=8, **pdl)
    w_pad = max(2, triton.next_power_of_2(world))
    _tp_stats_kernel[(T,)](wsf, wsi, out, C, vocab_start, RANK=rank, WORLD=world, W_PAD=w_pad,
                           C_PAD=max(16, triton.next_power_of_2(C)), num_warps=1, **pdl)
    return out


def tp_combine(stats: Tensor, packed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """stats [T, W, 8] (every rank's row, after the sum over ranks) -> (tokens [T] int64, logprobs [T] fp32,
    ok [T] bool, packed [3, T] fp64); packed may be given ([3, >= T] fp64, last dim contiguous)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use tp/sampling.py's combine")
    T, W, F = stats.shape
    assert F == 8 and stats.is_contiguous() and stats.dtype == torch.float32
    dev = stats.device
    tokens = torch.empty(T, dtype=torch.int64, device=dev)
    logprobs = torch.empty(T, dtype=torch.float32, device=dev)
    ok = torch.empty(T, dtype=torch.int8, device=dev)
    if packed is None:
        packed = torch.empty(3, T, dtype=torch.float64, device=dev)
    assert packed.shape[0] == 3 and packed.shape[1] >= T and packed.stride(1) == 1 and packed.dtype == torch.float64
    _tp_combine_kernel[(T,)](stats, tokens, logprobs, ok, packed, packed.stride(0), WORLD=W,
                             W_PAD=max(2, triton.next_power_of_2(W)), num_warps=1, **pdl_kwargs(dev))
    return tokens, logprobs, ok.view(torch.bool), packed
