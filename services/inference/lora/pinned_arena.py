"""PinnedArena: one pinned host block, allocated once, that adapter weight files are read into.

With LORASERVE_PINNED_READ (CUDA) a weights file is read straight into pinned memory, so the
host->GPU copy into a slot is asynchronous and needs no staging copy. A fresh pinned allocation
per adapter costs a cudaHostAlloc and page locking of a power-of-two block (torch's caching host
allocator rounds up): 73 ms of the 90 ms "read" of the 84 MB 8B adapter on the H200 host
(2026-11-30), on the cold path. TensorRT-LLM's host PEFT cache is likewise allocated up front.

First fit over a free list sorted by offset, neighbours coalesced, 4 KiB granules. A released
range is reused only after the host->GPU copies issued before its release have completed: the
release records an event on each stream that copies from host memory (the slots' copy stream and
the current stream), and an allocation that needs a retired range waits for its events (on the
loader thread, never the engine's). When the arena has no room, `alloc` returns None and the
caller falls back to torch's pinned allocator. Thread-safe.
"""
from __future__ import annotations

import threading

import torch

GRANULE = 4096


def _round(nbytes: int) -> int:
    return -(-max(nbytes, 1) // GRANULE) * GRANULE


class PinnedArena:
    def __init__(self, nbytes: int, streams: list, pin: bool = True):
        """nbytes: arena size; streams: CUDA streams whose host->GPU copies may read arena memory;
        pin=False: pageable memory (the free-list logic tested on a CPU-only machine)."""
        self.nbytes = _round(nbytes)
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)   # [nbytes] uint8, pinned
        self.base = self.buf.data_ptr()
        self.streams = [s for s in streams if s is not None]
        self.free: list[list[int]] = [[0, self.nbytes]]          # [offset, size], sorted by offset
        self.retired: list[tuple[int, int, list]] = []           # (offset, size, events) awaiting copies
        self.num_used = 0                                        # bytes handed out (granule-rounded)
        self.num_fallbacks = 0                                   # allocations that did not fit
        self._lock = threading.Lock()

    def owns(self, t: torch.Tensor) -> bool:
        return self.base <= t.data_ptr() < self.base + self.nbytes

    def alloc(self, nbytes: int) -> torch.Tensor | None:
        """A [nbytes] uint8 view of the arena, or None when no free range is large enough."""
        size = _round(nbytes)
        with self._lock:
            self._reclaim(wait=False)
            off = self._first_fit(size)
            if off is None and self.retired:
                self._reclaim(wait=True)
                off = self._first_fit(size)
            if off is None:
                self.num_fallbacks += 1
                return None
            self.num_used += size
        return self.buf[off:off + nbytes]

    def release(self, block: torch.Tensor) -> None:
        """Give back a range `alloc` returned (after the copies issued so far that may read it)."""
        off = block.data_ptr() - self.base
        assert self.owns(block) and off % GRANULE == 0, "not a block of this arena"
        events = []
        for stream in self.streams:
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
        with self._lock:
            self.retired.append((off, _round(block.numel()), events))

    # ---- free list (under the lock) ------------------------------------------------------------
    def _first_fit(self, size: int) -> int | None:
        for i, (off, free) in enumerate(self.free):
            if free >= size:
                if free == size:
                    self.free.pop(i)
                else:
                    self.free[i] = [off + size, free - size]
                return off
        return None

    def _reclaim(self, wait: bool) -> None:
        keep = []
        for off, size, events in self.retired:
            if wait:
                for ev in events:
                    ev.synchronize()
            elif not all(ev.query() for ev in events):
                keep.append((off, size, events))
                continue
            self._insert(off, size)
            self.num_used -= size
        self.retired = keep

    def _insert(self, off: int, size: int) -> None:
        i = 0
        while i < len(self.free) and self.free[i][0] < off:
            i += 1
        self.free.insert(i, [off, size])
        if i + 1 < len(self.free) and off + size == self.free[i + 1][0]:   # merge with the next
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:     # merge with the previous
            self.free[i - 1][1] += self.free.pop(i)[1]


def arena_blocks(adapter) -> list:
    """The arena blocks an adapter's weights were read into (set by LoRAManager._parse)."""
    return getattr(adapter, "arena_blocks", None) or []


def release_blocks(arena: PinnedArena | None, adapter) -> None:
    """Give an adapter's arena blocks back (its host copy is dropped or was replaced by a copy)."""
    blocks = arena_blocks(adapter)
    if arena is not None and blocks:
        adapter.arena_blocks = []
        for b in blocks:
            arena.release(b)
