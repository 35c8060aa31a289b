"""PinnedArena's free list (pageable memory here; the pinned arena under real copies is in
test_cold_path_gpu.py): first fit, coalescing, no overlap between live blocks, None when full."""
from __future__ import annotations

import random

import torch

from loraserve.inference.lora.pinned_arena import GRANULE, PinnedArena, release_blocks


def _span(arena, t):
    off = t.data_ptr() - arena.base
    return off, off + -(-t.numel() // GRANULE) * GRANULE


def test_blocks_never_overlap_and_free_space_coalesces():
    arena = PinnedArena(64 * GRANULE, [], pin=False)
    rng = random.Random(0)
    live = []
    for _ in range(400):
        if live and rng.random() < 0.45:
            arena.release(live.pop(rng.randrange(len(live))))
            continue
        t = arena.alloc(rng.randint(1, 9 * GRANULE))
        if t is None:
            continue
        t.fill_(len(live) % 251)
        spans = sorted(_span(arena, x) for x in live + [t])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two live blocks overlap"
        live.append(t)
    for t in live:
        arena.release(t)
    assert arena.alloc(1) is not None   # reclaims the retired ranges
    arena2 = PinnedArena(64 * GRANULE, [], pin=False)
    blocks = [arena2.alloc(GRANULE) for _ in range(64)]
    assert all(b is not None for b in blocks) and arena2.alloc(1) is None and arena2.num_fallbacks == 1
    for b in blocks[::2] + blocks[1::2]:   # every other first: the free list ends as one range
        arena2.release(b)
    whole = arena2.alloc(64 * GRANULE)
    assert whole is not None and whole.data_ptr() == arena2.base and arena2.free == []


def test_release_blocks_gives_back_what_an_adapter_holds():
    arena = PinnedArena(8 * GRANULE, [], pin=False)

    class Adapter:
        pass

    a = Adapter()
    a.arena_blocks = [arena.alloc(3 * GRANULE), arena.alloc(5 * GRANULE)]
    assert arena.alloc(1) is None
    release_blocks(arena, a)
    assert a.arena_blocks == [] and arena.alloc(8 * GRANULE) is not None
    release_blocks(arena, Adapter())   # an adapter made in memory holds none
    assert torch.is_tensor(arena.buf)
