"""Attention over a paged KV cache: the Triton step kernel on CUDA, pure torch elsewhere.

KV cache of one layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's token j lives in block block_table[j // block_size] at offset j % block_size.
Each step writes the new tokens' K/V at `slot_mapping`, then every query token attends to
all earlier tokens of its own sequence (causal), prefix chunks included (chunked prefill).

CUDA (with Triton): the whole step is one launch of kernels/unified_attention.py (prompts,
prompt chunks and decode tokens together, GQA without copies); pure-decode steps take the
kernel DECODE_KERNEL names. CPU: the torch code below (SDPA per prompt, batched decode rows),
which is also what the kernel's tests compare against.

FP8 KV cache (paged_attention_fp8): the step's K/V are quantized with per-tensor scales held in
device memory ([1] fp32, so CUDA graphs follow them) and written as e4m3 bytes; the kernels widen
the codes in registers; the CPU path dequantizes the blocks the step uses.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .context import Context, get_context, split_mixed

log = logging.getLogger(__name__)

# pure-decode steps (the CUDA-graph path) on CUDA: "unified" (the step kernel) or "paged_decode"
# (kernels/paged_attention.py). H200, bf16, Llama-3-8B heads (benchmarks/bench_attention.py):
# unified 13.1 / 42 / 40 us vs paged_decode (split-KV) 13.4 / 59 / 57 us at batch 1 x 4k / 1 x 32k / 64 x 512
# (kernels/PERF_NOTES.md, 2026-11-30).
DECODE_KERNEL = "unified"


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: [N, KVH, D]; caches viewed as [num_blocks * block_size, KVH, D]
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    # -> [length, KVH, D]
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    # q: [B, H, D], one query token per sequence
    bsz, num_heads, head_dim = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kvh
    nb = (max_len + block_size - 1) // block_size
    tables = block_tables[:, :nb]
    k = k_cache[tables].flatten(1, 2)  # (B, L, KVH, D)
    v = v_cache[tables].flatten(1, 2)
    qg = q.view(bsz, kvh, group, head_dim)
    # matmuls in the cache dtype (fp32 accumulate), softmax in fp32
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k).float() * scale  # (B, KVH, G, L)
    pos = torch.arange(k.shape[1], device=q.device)
    mask = pos[None, :] >= context_lens[:, None]  # (B, L)
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", probs.to(v.dtype), v)
    return out.reshape(bsz, num_heads, head_dim).to(q.dtype)


def _use_kernel(q: torch.Tensor) -> bool:
    from loraserve.kernels import triton_available

    return q.is_cuda and triton_available()


def prefill_cudnn_mode() -> str:
    """LORASERVE_PREFILL_CUDNN: "1" dense cuDNN attention for steps of fresh prompts of one length (see
    dense_prefill_len), "0" the unified kernel for every step. Read per step (benchmarks flip it)."""
    return os.environ.get("LORASERVE_PREFILL_CUDNN", "0").strip().lower()


# shortest prompt the dense path takes (shorter: the unified kernel; cuDNN's fixed cost and the K/V gathers)
PREFILL_CUDNN_MIN_LEN = int(os.environ.get("LORASERVE_PREFILL_CUDNN_MIN_LEN", "256"))


def dense_prefill_len(ctx: Context, q: torch.Tensor, k_cache: torch.Tensor) -> int:
    """L when every sequence of the step is a whole fresh prompt of L >= PREFILL_CUDNN_MIN_LEN tokens (host
    lengths: context length == query length == L for all, so the step's rows are [B, L] back to back and each
    row sees only its own prompt), B * L >= B_L_MIN, the cache holds q's dtype (not FP8), the switch is on, no
    CUDA graph is being captured (static shapes: the graphs keep the unified kernel) and the shape (B, L) has met
    this test PREFILL_CUDNN_AFTER times before; else 0."""
    qlens, lens = ctx.query_lens, ctx.context_lens_list
    if ctx.decode_only or not qlens or lens is None or prefill_cudnn_mode() in ("", "0", "off", "false", "no"):
        return 0
    L = qlens[0]
    if L < PREFILL_CUDNN_MIN_LEN or L * len(qlens) != q.shape[0] or list(lens) != list(qlens) \
            or qlens.count(L) != len(qlens) or k_cache.dtype != q.dtype or q.dtype not in (torch.bfloat16, torch.float16) \
            or q.shape[2] % 8 or q.shape[2] > 128 or _DENSE_FAILED:
        return 0
    if B_L_MIN > L * len(qlens) or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return 0
    # cuDNN builds a plan per new (B, L) on its first call (~40 ms of host on the H200; the process's first call
    # ~0.6-0.9 s): a shape takes the dense path from its PREFILL_CUDNN_AFTER-th recurrence on, so one-off shapes
    # never pay for a plan (a lone prompt of a new length would, at every new length)
    key = (len(qlens), L)
    seen = _SHAPES_SEEN.get(key, 0)
    if seen < PREFILL_CUDNN_AFTER:
        if len(_SHAPES_SEEN) >= 4096:   # bounded: the shapes of a long run
            _SHAPES_SEEN.clear()
        _SHAPES_SEEN[key] = seen + 1
        return 0
    return L


B_L_MIN = 4096   # smallest step (tokens) worth a plan: at 8 x 1024 the dense call saves ~0.1-0.2 ms a layer
PREFILL_CUDNN_AFTER = int(os.environ.get("LORASERVE_PREFILL_CUDNN_AFTER", "1"))
_SHAPES_SEEN: dict[tuple[int, int], int] = {}   # (B, L) -> steps of that shape met so far (up to PREFILL_CUDNN_AFTER)
_DENSE_FAILED = False   # cuDNN refused the dense call once (no plan for this GPU / cuDNN): the unified kernel after


def dense_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            L: int, scale: float) -> torch.Tensor:
    """Causal attention of B = N / L fresh prompts of L tokens each, q [N, H, D] -> [N, H, D], through cuDNN's fused
    attention (torch's SDPA cuDNN op, GQA native: K/V keep their KVH heads). The step's K/V are read back from the
    cache rows rope_store_kv just wrote (two [N, KVH, D] gathers: the rotated K exists only there). Every view is
    [B, L, heads, D] memory seen as [B, heads, L, D] (cuDNN's preferred layout; its output comes back the same
    way, so the reshape below is a view). H200, 8 x 1024, Llama-3-8B heads (benchmarks/prefill_attention_cmp.py):
    151.5 us vs the unified kernel 272-385 us in the same runs. cuDNN builds a plan per new (B, L) on its first
    call (~40 ms on the H200 host, the process's first ~0.9 s), cached after."""
    N, H, D = q.shape
    kvh = k_cache.shape[2]
    B = N // L
    k = k_cache.view(-1, kvh, D).index_select(0, slot_mapping)
    v = v_cache.view(-1, kvh, D).index_select(0, slot_mapping)
    o = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.view(B, L, H, D).transpose(1, 2), k.view(B, L, kvh, D).transpose(1, 2), v.view(B, L, kvh, D).transpose(1, 2),
        None, False, 0.0, True, False, scale=scale)[0]
    return o.transpose(1, 2).reshape(N, H, D)


def _kernel_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context,
                      scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Every step kind in one launch; q: [N, H, D] -> [N, H, D]. k_scale, v_scale: [1] fp32 device
    tensors for an FP8 cache (None otherwise). Steps of fresh prompts of one length: dense_prefill_attention
    when LORASERVE_PREFILL_CUDNN is on."""
    if ctx.dense_prefill is None:   # decided once per step (the first layer), from the host lengths
        ctx.dense_prefill = dense_prefill_len(ctx, q, k_cache) if k_scale is None else 0
    if ctx.dense_prefill:
        try:
            return dense_prefill_attention(q, k_cache, v_cache, ctx.slot_mapping, ctx.dense_prefill, scale)
        except RuntimeError:   # cuDNN without a plan for it (raised at plan build, before any launch)
            global _DENSE_FAILED
            _DENSE_FAILED, ctx.dense_prefill = True, 0
            log.exception("dense cuDNN prefill attention failed: the unified kernel from now on")
    if ctx.decode_only and DECODE_KERNEL == "paged_decode":
        from loraserve.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                                      max_seq_len=ctx.max_seq_len, k_scale=k_scale, v_scale=v_scale)
    from loraserve.kernels.unified_attention import plan_num_splits, unified_attention

    if ctx.query_start_loc is None:  # a Context built without prepare_attention: fill it once per step
        if ctx.decode_only:  # device-side arange: also fine inside a CUDA-graph capture
            ctx.query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
            ctx.max_query_len = 1
        else:
            qlens = torch.tensor(ctx.query_lens, dtype=torch.int32)
            ctx.query_start_loc = F.pad(qlens.cumsum(0, dtype=torch.int32), (1, 0)).to(q.device)
            ctx.max_query_len = int(qlens.max())
    if ctx.num_splits is None and ctx.context_lens_list is not None:  # host lengths known: plan once per step
        ctx.num_splits = plan_num_splits(ctx.query_lens, ctx.context_lens_list, q.shape[1], k_cache.shape[2],
                                         q.element_size(), q.device)
    # without host lengths (a CUDA-graph context) the launcher picks the split from static sizes
    return unified_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                             ctx.max_query_len, scale, max_seq_len=ctx.max_seq_len, num_splits=ctx.num_splits,
                             k_scale=k_scale, v_scale=v_scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [N, H, D], k/v: [N, KVH, D] for the N tokens of this step -> [N, H, D]."""
    ctx = get_context()
    store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    if _use_kernel(q):
        return _kernel_attention(q, k_cache, v_cache, ctx, scale)
    if ctx.decode_only:
        max_len = max(ctx.context_lens_list) if ctx.context_lens_list else None
        return _decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, max_len, scale)
    out = torch.empty_like(q)
    prefill = ctx.prefill_seqs
    if prefill is None:  # a Context built without prepare_attention / split_mixed
        split_mixed(ctx, q.device)
        prefill = ctx.prefill_seqs
    if ctx.decode_rows is not None:
        # a mixed step: the one-token (decode) sequences go through the batched decode path at once
        rows, seqs = ctx.decode_rows, ctx.decode_seqs
        out[rows] = _decode(q[rows], k_cache, v_cache, ctx.block_tables[seqs], ctx.context_lens[seqs],
                            ctx.decode_max_len, scale)
    num_heads, kvh = q.shape[1], k.shape[1]
    for i, start, qlen, total in prefill:
        qi = q[start:start + qlen].transpose(0, 1)  # (H, q, D)
        if total == qlen:  # whole sequence in this step: use the fresh K/V, no gather
            ki, vi = k[start:start + qlen], v[start:start + qlen]
        else:
            ki = _gather(k_cache, ctx.block_tables[i], total)
            vi = _gather(v_cache, ctx.block_tables[i], total)
        # 4-D (1, H, L, D): the fused flash / memory-efficient SDPA kernels take only 4-D inputs
        qi = qi.unsqueeze(0)
        ki = ki.transpose(0, 1).repeat_interleave(num_heads // kvh, dim=0).unsqueeze(0)
        vi = vi.transpose(0, 1).repeat_interleave(num_heads // kvh, dim=0).unsqueeze(0)
        # query i sits at position total - qlen + i and sees keys 0..that position
        if total == qlen:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(total - qlen, total, device=q.device)
            kpos = torch.arange(total, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[start:start + qlen] = oi[0].transpose(0, 1)
    return out


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x [N, KVH, D] / a per-tensor scale -> e4m3 codes, saturating at +-448 (torch's cast would give NaN
    past it). Device ops only (scale: [1] fp32 on x's device, or a float): no host sync, graph-safe."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# CUDA: how an FP8 step's K/V reach the cache: "triton" (kernels/kv_store.py, one launch) or "torch"
FP8_KV_STORE = os.environ.get("LORASERVE_FP8_KV_STORE", "triton")


def _store_kv_fp8_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    """Quantize k, v [N, KVH, D] and write the codes as bytes (index_copy_ has no float8 CPU kernel);
    returns the codes."""
    k_q, v_q = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    store_kv(k_q.view(torch.uint8), v_q.view(torch.uint8), k_cache.view(torch.uint8), v_cache.view(torch.uint8),
             slot_mapping)
    return k_q, v_q


def paged_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, scale: float, k_scale: torch.Tensor | float,
                        v_scale: torch.Tensor | float) -> torch.Tensor:
    """paged_attention over an e4m3 KV cache (models/fp8.py's Fp8KVAttention calls it).
    q: [N, H, D], k/v: [N, KVH, D]; caches [num_blocks, block_size, KVH, D] float8_e4m3fn holding
    K / k_scale and V / v_scale; k_scale, v_scale: [1] fp32 tensors on q's device (graph-safe: read,
    never synced; floats also work eagerly). The step's K/V are quantized and written at their slots
    (CUDA: kernels/kv_store.py in one launch; CPU: torch, as bytes). CUDA: the Triton kernels read the codes. CPU: the
    blocks this step's sequences use are gathered once, dequantized to q's dtype, and handed to
    paged_attention with the block tables renumbered into that compact copy (so every query sees
    K/V as the cache holds them)."""
    ctx = get_context()
    if _use_kernel(q):
        if not isinstance(k_scale, torch.Tensor):  # eager callers with float scales
            k_scale = torch.full((1,), float(k_scale), dtype=torch.float32, device=q.device)
            v_scale = torch.full((1,), float(v_scale), dtype=torch.float32, device=q.device)
        if FP8_KV_STORE == "triton":   # one launch (kernels/kv_store.py) instead of ~10 torch ops per layer
            from loraserve.kernels.kv_store import store_kv_fp8

            store_kv_fp8(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
        else:
            _store_kv_fp8_torch(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
        return _kernel_attention(q, k_cache, v_cache, ctx, scale, k_scale, v_scale)
    k_q, v_q = _store_kv_fp8_torch(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
    block_size = k_cache.shape[1]
    tables, slots = ctx.block_tables, ctx.slot_mapping
    used, renumbered = torch.unique(tables, return_inverse=True)           # [U], tables' shape
    lookup = torch.zeros(k_cache.shape[0], dtype=slots.dtype, device=slots.device)
    lookup[used.long()] = torch.arange(used.numel(), dtype=slots.dtype, device=slots.device)

    def dequantize(codes: torch.Tensor, s) -> torch.Tensor:
        return (codes.float() * s).to(q.dtype)

    k_deq = dequantize(k_cache.view(torch.uint8)[used.long()].view(k_cache.dtype), k_scale)  # [U, bs, KVH, D]
    v_deq = dequantize(v_cache.view(torch.uint8)[used.long()].view(v_cache.dtype), v_scale)
    ctx.block_tables = renumbered.to(tables.dtype)
    ctx.slot_mapping = lookup[slots.long() // block_size] * block_size + slots % block_size
    try:
        # the step's own K/V as the cache holds them (whole-prompt sequences read these, not the cache)
        return paged_attention(q, dequantize(k_q, k_scale), dequantize(v_q, v_scale), k_deq, v_deq, scale)
    finally:
        ctx.block_tables, ctx.slot_mapping = tables, slots


def attend_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_attention for a step whose K/V are already in the cache (kernels/rope.py's rope_store_kv
    wrote them): q [N, H, D] -> [N, H, D]; CUDA with Triton only (the one-launch kernel)."""
    return _kernel_attention(q, k_cache, v_cache, get_context(), scale)
