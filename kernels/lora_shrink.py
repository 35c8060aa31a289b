"""Batched multi-LoRA shrink (SGMV/BGMV "A" side) as one Triton launch for all slices.

Semantics, for every token t with slot a = token_slot[t] >= 0 and every slice s:
    out[s, t, :r_a] = x[t] @ lora_a[a, s, :r_a, :].T        (fp32 accumulate, fp32 store)
with r_a = min(ranks[a], R). Columns >= r_a and rows of tokens without an adapter are
undefined: left as they were, or garbage under split-K. Scales live in B, not here.

Work split (see lora_meta.py): program (tile, rank_block * SPLIT_K + k_split, slice).
 * A tile is <= BLOCK_M tokens of one slot; unused tiles exit on their first load.
 * Rank blocks of BLOCK_N rows of A: blocks past r_a exit, the last one masks its rows, so
   an adapter of rank 8 reads 8 rows of A even when R = 64 (mixed ranks cost no padding).
 * Split-K when even the fewest tiles the batch could have would leave the SMs idle
   (decode: one adapter's A is read by one program per rank block otherwise, and a lone
   program streams a few tens of GB/s). Each K split stores its fp32 partial into a
   workspace [SPLIT_K, S, T, R] and ``torch.sum`` over the split axis writes ``out``: a fixed
   summation order, so results are bitwise reproducible (CUDA-graph replay == eager), unlike
   fp32 atomics. Undefined entries of ``out`` then hold garbage, which expand never reads.
   Given a 4-D ``out`` [SPLIT_K, S, T, R] the partials stay there un-reduced and lora_expand
   sums them as it loads them: one launch fewer per projection (what lora_apply does).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta, pdl_launch, stream_enabled
from .lora_prefetch import prefetch_on

if HAS_TRITON:
    from .lora_prefetch import l2_prefetch

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, out_ptr, ranks_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, R,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_ok, stride_os, stride_om, stride_or,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, EAGER_META: tl.constexpr,
        USE_PDL: tl.constexpr = False, PREFETCH_A: tl.constexpr = False, PF_THREADS: tl.constexpr = 128,
    ):
        if USE_PDL:  # programmatic dependent launch: let the expand start now (it waits for us), and
            tl.extra.cuda.gdc_launch_dependents()  # wait for the kernel before us (x) in EVERY program
            if not PREFETCH_A:  # so that our completion implies its completion
                tl.extra.cuda.gdc_wait()  # (PREFETCH_A: after the metadata and A's L2 prefetch, below)
        tile = tl.program_id(0)
        pid_n = tl.program_id(1) // SPLIT_K
        pid_k = tl.program_id(1) % SPLIT_K
        s = tl.program_id(2)

        n0 = pid_n * BLOCK_N
        if EAGER_META:  # the streaming variant: (slot, start, end) then (rank, token ids) at once
            slot = tl.load(tile_slots_ptr + tile)
            start = tl.load(tile_starts_ptr + tile)
            end = tl.load(tile_ends_ptr + tile)
            if slot < 0:
                if PREFETCH_A:  # every program waits: our completion implies the kernels' before us
                    tl.extra.cuda.gdc_wait()
                return
            rank = tl.minimum(tl.load(ranks_ptr + slot), R)
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < end
            tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            if n0 >= rank:
                if PREFETCH_A:
                    tl.extra.cuda.gdc_wait()
                return
            if PREFETCH_A:  # rows [n0, n0 + BLOCK_N) of this slot's slice are contiguous (launcher-checked):
                # this K split's 1/SPLIT_K of their bytes into L2 while the kernel before us finishes; only
                # the segment's first tile (the others read the same A: one prefetch per adapter and step)
                prev_slot = tl.load(tile_slots_ptr + tl.maximum(tile - 1, 0))
                first = (tile == 0) | (prev_slot != slot)
                blk = tl.minimum(rank - n0, BLOCK_N).to(tl.int64) * K * (a_ptr.dtype.element_ty.primitive_bitwidth // 8)
                blk = tl.where(first, blk, 0)
                part = (blk + (SPLIT_K * 16 - 1)) // (SPLIT_K * 16) * 16
                a_blk = a_ptr + slot.to(tl.int64) * stride_al + s * stride_as + n0 * stride_ar
                l2_prefetch(a_blk.to(tl.pointer_type(tl.int8)) + pid_k * part,
                            tl.minimum(part, blk - pid_k * part), PF_THREADS)
                tl.extra.cuda.gdc_wait()  # x (and the partials' last reader) are the kernel before us'
        else:  # classic: four dependent levels before the first x / A load
            if PREFETCH_A:  # (the launcher pairs PREFETCH_A with EAGER_META; never skip the wait)
                tl.extra.cuda.gdc_wait()
            slot = tl.load(tile_slots_ptr + tile)
            if slot < 0:
                return
            rank = tl.minimum(tl.load(ranks_ptr + slot), R)
            if n0 >= rank:
                return
            start = tl.load(tile_starts_ptr + tile)
            end = tl.load(tile_ends_ptr + tile)
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < end
            tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < rank
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = (a_ptr + slot.to(tl.int64) * stride_al + s * stride_as
                  + offs_n[:, None] * stride_ar + offs_k[None, :] * stride_ak)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                at = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = offs_k < K - k * (BLOCK_K * SPLIT_K)
                xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(at))
            x_ptrs += BLOCK_K * SPLIT_K * stride_xk
            a_ptrs += BLOCK_K * SPLIT_K * stride_ak

        # With SPLIT_K > 1, out is the workspace and stride_ok steps between the K splits.
        out_ptrs = (out_ptr + pid_k * stride_ok + s * stride_os + tok[:, None] * stride_om
                    + offs_n[None, :] * stride_or)
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


def contiguous_rows(w: Tensor) -> bool:
    """w's last dim is contiguous, its rows back to back, and a row a multiple of 16 bytes: a run of
    rows is one byte range (what lora_prefetch.l2_prefetch takes)."""
    return (w.stride(-1) == 1 and w.stride(-2) == w.shape[-1] and w.shape[-1] * w.element_size() % 16 == 0
            and w.data_ptr() % 16 == 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # interpreter / CPU: any plausible count will do
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def shrink_config(num_tokens: int, rank: int, hidden_in: int, num_slices: int = 1,
                  block_m: int = 16, num_sms: int = 132, grid_tiles: int | None = None,
                  stream: bool | None = None) -> dict:
    """Launch parameters from host-known sizes only (never the slot mix, which lives on the GPU).

    Decode is a batched GEMV bound by reading A: rank blocks of 16 rows multiply programs.
    Large steps reuse each x tile over a whole rank block. Then split H_in (up to 32 ways,
    keeping >= 1 K block per split) until even the fewest tiles the batch could have give
    about 4 programs per SM, as long as the partials' round trip through memory stays
    below the bytes the shrink must read anyway (x and one adapter's A).
    From 32 to 128 tokens the batch usually holds many adapters (many more tiles than the
    fewest), so at most 4 splits of 256 columns. Measured on an H200 at 64 tokens / 32
    adapters / rank 16 (us per projection, shrink + expand; 16 splits x 128 before):
    qkv 18.7 -> 15.2, o 11.5 -> 9.8, gate_up 46.5 -> 27.3, down 15.4 -> 16.4. Other sizes
    keep the earlier rule (not re-measured).

    With the streaming variant (stream_enabled(stream), see lora_meta.LORA_STREAM) and
    <= 256 tokens, the split instead counts the tiles the grid launches (grid_tiles: all of
    them are active when every token run has its own adapter, the case that matters for
    decode) and stops at about 4 programs per SM: at 64 tokens / 32 adapters (36 tiles) qkv
    splits 4 ways, gate_up 4, o and down 8, so every program streams 16-57 KB of A through
    its pipelined K loop instead of one or two 8 KB blocks. Decode (1-16 tokens) takes 128
    columns per K block and up to 32 splits: latency, not bytes, bounds it.
    """
    if stream_enabled(stream) and num_tokens <= 256:
        if bgmv_applies(num_tokens, rank):
            from .lora_shrink_bgmv import bgmv_shrink_config

            tiles = grid_tiles if grid_tiles is not None else -(-num_tokens // block_m)
            return dict(bgmv_shrink_config(num_tokens, rank, hidden_in, num_slices, tiles, num_sms), BGMV=True)
        return _stream_shrink_config(num_tokens, rank, hidden_in, num_slices, block_m, num_sms, grid_tiles)
    block_n = 16 if num_tokens <= 256 else max(16, min(64, _next_pow2(rank)))
    block_k = min(128, max(16, _next_pow2(hidden_in)))
    max_split = 32 if num_tokens <= 256 else large_split_cap(num_tokens)
    if 32 <= num_tokens <= 128 and block_m <= 16:
        max_split = 4
        block_k = min(256, max(16, _next_pow2(hidden_in // 4)))
    min_programs = -(-num_tokens // block_m) * num_slices * -(-rank // block_n)
    k_blocks = -(-hidden_in // block_k)
    partial_bytes = 2 * num_slices * num_tokens * rank * 4  # one split's write + read back
    must_read = 2 * hidden_in * (num_tokens + num_slices * rank)
    split_k = 1
    while (split_k < max_split and min_programs * split_k < 4 * num_sms and k_blocks >= 2 * split_k
           and 2 * split_k * partial_bytes <= must_read):
        split_k *= 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


def large_split_cap(num_tokens: int) -> int:
    """The most K splits of a step of num_tokens > 256 that lora_apply sends down the "partials" path
    (lora_apply.partials_max_tokens): LORASERVE_LORA_SHRINK_SPLIT_LARGE (default 2). There the streaming expand
    re-reads the partials per column group: at the mixed step (T 320) the rule's 8 splits (1.3 MB of partials) made
    the layer's LoRA 50.6 us, 4 splits 40.6, 2 splits 33.7 ("reduced" with 8 splits + torch.sum: 36.8; H200 probe
    2026-12-01 00:55, see partials_max_tokens). Larger steps ("reduced") keep the rule. Read at each call (resident
    helper, issue 12)."""
    from .lora_apply import partials_max_tokens

    if num_tokens > partials_max_tokens():
        return 32
    return max(1, int(os.environ.get("LORASERVE_LORA_SHRINK_SPLIT_LARGE", "2")))


def bgmv_applies(num_tokens: int, rank: int) -> bool:
    """The BGMV shrink takes this step (streaming path only): lora_meta.LORA_BGMV is on, the step
    has <= LORA_BGMV_MAX_TOKENS tokens and rank <= 64 (one 16-row A block per rank block); above 32
    tokens only at rank <= 16 (H200 probe 22:01: qkv rank 64 / 32 adapters / 64 tokens took 38.2 us
    with the BGMV shrink vs 33.2 with the dot shrink: its 4 rank blocks x K chunks of partials cost
    the expand 13.4 -> 18.4 us)."""
    from . import lora_meta

    return (lora_meta.LORA_BGMV and num_tokens <= lora_meta.LORA_BGMV_MAX_TOKENS
            and rank <= (min(64, lora_meta.LORA_BGMV_MAX_RANK) if num_tokens <= 32
                         else min(64, lora_meta.LORA_BGMV_WIDE_MAX_RANK)))


def _stream_shrink_config(num_tokens: int, rank: int, hidden_in: int, num_slices: int, block_m: int,
                          num_sms: int, grid_tiles: int | None) -> dict:
    """shrink_config's streaming variant for <= 256 tokens (see its docstring)."""
    block_n = 16
    block_k = min(128 if num_tokens <= 16 else 256, max(16, _next_pow2(hidden_in)))
    tiles = grid_tiles if grid_tiles is not None else -(-num_tokens // block_m)
    programs = tiles * num_slices * -(-rank // block_n)
    k_blocks = -(-hidden_in // block_k)
    partial_bytes = 2 * num_slices * num_tokens * rank * 4  # one split's write + read back
    must_read = 2 * hidden_in * (num_tokens + num_slices * rank)
    # Fused projections at decode: 16 splits, not 32 (the shrink's 4-stage K loop has the
    # extra blocks in flight at once anyway), so the streaming expand sums every slice's
    # partials in 1-2 rounds of loads instead of 2-4 (its register budget per round).
    max_split = 16 if num_slices > 1 else 32
    split_k = 1
    while (split_k < max_split and programs * split_k * 2 <= 4 * num_sms and k_blocks >= 2 * split_k
           and 2 * split_k * partial_bytes <= must_read):
        split_k *= 2
    # 4 stages: 3 K blocks (~24 KB of A and x) in flight per program, 48 KB of shared memory
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=4)


def shrink_split_k(x: Tensor, lora_a: Tensor, block_m: int, grid_tiles: int | None = None,
                   stream: bool | None = None) -> int:
    """The SPLIT_K :func:`lora_shrink` picks for these shapes (the partials' leading dim);
    pass the meta's grid_tiles (what lora_shrink uses) for the streaming variant."""
    L, S, R, H = lora_a.shape
    sms = _num_sms(x.device.index if x.is_cuda else None)
    return shrink_config(x.shape[0], R, H, S, block_m, sms, grid_tiles, stream)["SPLIT_K"]


def lora_shrink(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor,
                *, config: dict | None = None, stream: bool | None = None) -> Tensor:
    """out[s, t, :r] = x[t] @ lora_a[slot(t), s, :r].T for all slices s, in one launch.

    x:      [T, H_in] fp16/bf16/fp32 (any strides).
    lora_a: [L, S, R, H_in], same dtype as x; rows >= an adapter's rank are never read.
    meta:   LoRAMeta for these T tokens (meta.num_tokens == T).
    ranks:  [L] int32 real rank per slot (0: adapter has no weights for this module).
    out:    [S, T, R] float32, written in place and returned. Entries of tokens without an
            adapter and columns >= rank are undefined (kept as they were without split-K,
            garbage with it). Or [SPLIT_K, S, T, R] float32: the un-reduced split-K partials
            (SPLIT_K = out.shape[0] overrides the config), for lora_expand to sum.
    config: optional override of :func:`shrink_config` (benchmarks).
    stream: the config variant (None: lora_meta.LORA_STREAM, env LORASERVE_LORA_STREAM).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    assert H2 == H, f"lora_a hidden {H2} != x hidden {H}"
    assert x.dtype == lora_a.dtype, f"x {x.dtype} and lora_a {lora_a.dtype} must match"
    assert out.shape[-3:] == (S, T, R) and out.dim() in (3, 4) and out.dtype == torch.float32, \
        f"out must be float32 [S={S}, T={T}, R={R}] (or [SPLIT_K, S, T, R]), got {out.dtype} {tuple(out.shape)}"
    assert meta.num_tokens == T, f"meta built for {meta.num_tokens} tokens, x has {T}"
    assert ranks.shape == (L,) and ranks.dtype == torch.int32, "ranks must be int32 [L]"
    if T == 0:
        return out
    assert meta.tile_slots.device == x.device == lora_a.device == out.device == ranks.device, \
        "x, lora_a, out, ranks and meta must be on one device"
    sms = _num_sms(x.device.index if x.is_cuda else None)
    cfg = dict(shrink_config(T, R, H, S, meta.block_m, sms, meta.grid_tiles, stream), **(config or {}))
    if cfg.get("BGMV") and out.dim() == 4 and not (x.is_cuda and x.dtype == torch.float32):
        from .lora_shrink_bgmv import lora_shrink_bgmv

        # out's split count rules (as for the dot kernel): the BLOCK_K that gives it, if any does
        bk = cfg["BLOCK_K"]
        if -(-H // bk) != out.shape[0]:
            bk = max(16, 1 << max(0, (-(-H // out.shape[0]) - 1).bit_length()))
        if -(-H // bk) == out.shape[0]:
            return lora_shrink_bgmv(x, lora_a, meta, ranks, out, config=dict(config or {}, BLOCK_K=bk),
                                    num_sms=sms)
    if cfg.pop("BGMV", False):  # fp32 on a GPU (or a 3-D out): the dot kernel at the BGMV split
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 128), num_warps=4, num_stages=3)
    if out.dim() == 4:
        cfg["SPLIT_K"] = out.shape[0]
    BN, BK, SK = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    if out.dim() == 4:
        dest = out
    else:
        dest = out if SK == 1 else torch.empty((SK, S, T, R), dtype=torch.float32, device=out.device)
    dest_strides = (0, *out.stride()) if dest is out and out.dim() == 3 else dest.stride()
    grid = (meta.grid_tiles, triton.cdiv(R, BN) * SK, S)
    from . import lora_meta

    pdl = pdl_launch(x.device) if T <= lora_meta.LORA_PDL_SHRINK_MAX_TOKENS else {}
    pf_a = prefetch_on("l", x.device, pdl) and stream_enabled(stream) and contiguous_rows(lora_a)
    _lora_shrink_kernel[grid](
        x, lora_a, dest, ranks,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        H, R,
        x.stride(0), x.stride(1),
        *lora_a.stride(),
        *dest_strides,
        BLOCK_M=meta.block_m, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK,
        EVEN_K=H % (BK * SK) == 0, IEEE=x.dtype == torch.float32, EAGER_META=stream_enabled(stream),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], PREFETCH_A=pf_a, PF_THREADS=32 * cfg["num_warps"],
        **pdl,
    )
    if SK > 1 and dest is not out:
        torch.sum(dest, dim=0, out=out)  # fixed order: deterministic, unlike atomics
    return out
