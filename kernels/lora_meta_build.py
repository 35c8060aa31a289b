"""LoRAMetaBuilder.build in ONE Triton launch (one program) instead of ~50 small torch kernels.

Same outputs as the torch build (lora_meta.py; every buffer, not only what the kernels read):
    token_slot[:T]            <- the step's slots (-1: no adapter)
    sorted_token_ids[:T]      <- tokens grouped by slot ascending (token order kept), no-adapter tokens last
    seg_slots[L], seg_starts[L + 1], num_segments[1]
    tile_slots / tile_starts / tile_ends[max_tiles], num_tiles[1]   (tiles of BM rows within a segment)

Why: every mixed-step and decode graph rebuilds the metadata on the device (so a graph serves any slot mix),
and the torch build is a chain of ~50 tiny kernels (two sorts of which cub runs in several passes, scans,
gathers, wheres and copies: ~1-2 us each inside a graph) on the critical path of every step, ahead of the
first layer. Here one program of up to 2048 tokens does it:
  1. key = (slot, token) packed in int64 (no adapter: slot L), one tl.sort: the grouped order;
  2. segment starts where the sorted slot changes (the previous element through a scratch round trip and a
     CTA barrier), segment index = cumsum of the starts; tile starts every BM rows of a segment, tile index =
     cumsum of those;
  3. the unused tails (seg_starts = adapted tokens, seg_slots = -1, empty tiles) filled first, then the used
     entries scattered over them after a barrier.
Steps longer than MAX_TOKENS keep the torch build.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

MAX_TOKENS = 2048   # one program sorts next_pow2(T) keys in registers

if HAS_TRITON:

    @triton.jit
    def _lora_meta_kernel(
        slot_in_ptr, token_slot_ptr, sorted_ids_ptr, scratch_ptr,
        seg_slots_ptr, seg_starts_ptr, num_segments_ptr,
        tile_slots_ptr, tile_starts_ptr, tile_ends_ptr, num_tiles_ptr,
        T, L, BM, MAX_TILES,
        TP: tl.constexpr, FILL: tl.constexpr,
    ):
        offs = tl.arange(0, TP)
        t_ok = offs < T
        s = tl.load(slot_in_ptr + offs, mask=t_ok, other=-1).to(tl.int32)
        tl.store(token_slot_ptr + offs, s, mask=t_ok)
        # the grouped order: (slot, token) ascending; no adapter -> slot L, padding past T -> L + 1
        slot_key = tl.where(t_ok, tl.where(s < 0, L, s), L + 1).to(tl.int64)
        ks = tl.sort(slot_key * TP + offs)
        sslot = (ks // TP).to(tl.int32)                 # [TP] slot of each sorted position
        stok = (ks % TP).to(tl.int32)                   # [TP] its token
        tl.store(sorted_ids_ptr + offs, stok, mask=t_ok)
        adapted = sslot < L
        n_adapted = tl.sum(adapted.to(tl.int32), axis=0)

        # unused tails first (the used entries are scattered over them after the barrier)
        for i in range(0, L + 1, FILL):
            o = i + tl.arange(0, FILL)
            tl.store(seg_starts_ptr + o, tl.zeros_like(o) + n_adapted, mask=o <= L)
            tl.store(seg_slots_ptr + o, tl.full((FILL,), -1, tl.int32), mask=o < L)
        for i in range(0, MAX_TILES, FILL):
            o = i + tl.arange(0, FILL)
            tl.store(tile_slots_ptr + o, tl.full((FILL,), -1, tl.int32), mask=o < MAX_TILES)
            tl.store(tile_starts_ptr + o, tl.zeros_like(o), mask=o < MAX_TILES)
            tl.store(tile_ends_ptr + o, tl.zeros_like(o), mask=o < MAX_TILES)
        # the previous sorted slot of each position, through memory (no register shift across threads)
        tl.store(scratch_ptr + offs, sslot)
        tl.debug_barrier()
        prev = tl.load(scratch_ptr + offs - 1, mask=offs > 0, other=-1)
        seg_first = adapted & (sslot != prev)
        seg_idx = tl.cumsum(seg_first.to(tl.int32), axis=0) - 1        # [TP] segment of each position
        tl.store(num_segments_ptr, tl.sum(seg_first.to(tl.int32), axis=0))
        tl.store(seg_starts_ptr + seg_idx, offs, mask=seg_first)
        tl.store(seg_slots_ptr + seg_idx, sslot, mask=seg_first)
        tl.debug_barrier()
        start = tl.load(seg_starts_ptr + seg_idx, mask=adapted, other=0)
        end = tl.load(seg_starts_ptr + seg_idx + 1, mask=adapted, other=0)   # the next start, or n_adapted
        tile_first = adapted & ((offs - start) % BM == 0)
        tile_idx = tl.cumsum(tile_first.to(tl.int32), axis=0) - 1
        tl.store(num_tiles_ptr, tl.sum(tile_first.to(tl.int32), axis=0))
        tl.store(tile_slots_ptr + tile_idx, sslot, mask=tile_first)
        tl.store(tile_starts_ptr + tile_idx, offs, mask=tile_first)
        tl.store(tile_ends_ptr + tile_idx, end, mask=tile_first)


def build_with_kernel(builder, token_slot: Tensor, block_m: int) -> None:
    """Fill `builder`'s buffers (a LoRAMetaBuilder) for token_slot ([T] int32/int64, T <= MAX_TOKENS) in one
    launch; the caller has checked the arguments and makes the LoRAMeta views."""
    T = token_slot.numel()
    assert 1 <= T <= MAX_TOKENS and token_slot.is_contiguous()
    scratch = getattr(builder, "_meta_scratch", None)
    TP = max(16, 1 << (T - 1).bit_length())
    if scratch is None or scratch.numel() < TP:
        scratch = builder._meta_scratch = torch.empty(max(TP, 256), dtype=torch.int32, device=token_slot.device)
    _lora_meta_kernel[(1,)](
        token_slot, builder.token_slot, builder.sorted_token_ids, scratch,
        builder.seg_slots, builder.seg_starts, builder.num_segments,
        builder.tile_slots, builder.tile_starts, builder.tile_ends, builder.num_tiles,
        T, builder.max_slots, block_m, builder.max_tiles,
        TP=TP, FILL=1024, num_warps=8 if TP >= 1024 else 4,
    )
